// Host-side launchers of the CUDA step kernels (csrc/cuda/step_kernels.cu), called by step_cuda.cpp.
//
// This interface is plain C++ (no torch, no CUDA types): the kernels compile with nothing but the CUDA
// toolkit, and the torch glue (csrc/cuda/step_cuda.cpp) needs no CUDA library headers beyond the runtime.
// Both halves can therefore be compile-checked with nvcc on a machine whose torch is a CPU build.
// Every pointer is to contiguous device memory; `stream` is a cudaStream_t. Each launcher returns ""
// on success, else the CUDA error text.
#pragma once

#include <cstdint>
#include <string>

namespace fastdiss {
namespace cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// Per-token schedule coefficients, float32, one value per token.
struct StepCoefs {
  const float* alpha_t;
  const float* sigma_t;
  const float* alpha_s;
  const float* sigma_s;
};

// out = alpha_s * x0 + sigma_s * (xt - alpha_t * x0) / sigma_t over tokens x dim elements.
std::string launch_ddim_step(DType dtype, const void* x0, const void* xt, StepCoefs coefs, void* out,
                             int64_t tokens, int64_t dim, void* stream);

// How many vocabulary slices the nearest-embedding search splits into on `device`, so that small
// batches still fill the GPU. The caller allocates the workspace: splits * tokens floats and int64s.
int nearest_embedding_splits(int64_t tokens, int64_t vocab, int device);

// The fused step: x0_used = clamp ? emb[argmax_v <x0, emb[v]>] : x0 (argmax_better rule, step_math.h),
// then out = DDIM(x0_used). emb is (vocab, dim) with the dtype of x0.
std::string launch_ddim_step_clamp(DType dtype, const void* x0, const void* xt, StepCoefs coefs, const void* emb,
                                   int64_t vocab, bool clamp, int splits, float* work_value, int64_t* work_index,
                                   void* out, void* x0_used, int64_t tokens, int64_t dim, void* stream);

}  // namespace cuda
}  // namespace fastdiss
