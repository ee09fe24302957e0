// The arithmetic of the step ops, shared by the CPU and CUDA kernels so both follow one rule.
// Standard headers only: the CUDA kernels include it without any torch header.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FASTDISS_HD __host__ __device__ __forceinline__
#else
#define FASTDISS_HD inline
#endif

namespace fastdiss {

// Argmax rule for the nearest embedding: is candidate (value, index) better than the best so far?
// Larger logit wins; on equal logits the lower index wins (deterministic whatever the reduction order);
// NaN counts as the maximum, as in torch.argmax. index < 0 marks "no candidate yet" / "no candidate".
FASTDISS_HD bool argmax_better(float value, int64_t index, float best, int64_t best_index) {
  if (index < 0) return false;
  if (best_index < 0) return true;
  const bool v_nan = value != value, b_nan = best != best;
  if (v_nan || b_nan) return v_nan && (!b_nan || index < best_index);
  return value > best || (value == best && index < best_index);
}

}  // namespace fastdiss
