// CUDA kernels of the sampler step ops. Needs only the CUDA toolkit (no torch headers); the torch glue
// that validates tensors and registers the ops is csrc/cuda/step_cuda.cpp.
//
// ddim_step:        one thread per element, grid-stride.
// ddim_step_clamp:  (1) nearest_partial_kernel: a 32-token x 64-vocab tile per block, dot products from
//                   shared-memory tiles in float32, the vocabulary split into slices across grid.y so a
//                   batch of one sentence still fills the GPU; each (slice, token) keeps its best (logit,
//                   index). No logits tensor is ever written to memory.
//                   (2) ddim_finish_kernel: one block per token reduces the slices' winners, gathers the
//                   embedding row and applies the DDIM update, writing x_s and x0_used in the same pass.
// Tie rule (csrc/step_math.h): larger logit wins, equal logits -> lowest index, NaN is the maximum. Each
// logit sums over dim in order 0..D-1 with fmaf, so the result does not depend on the launch geometry.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>

#include "../step_math.h"
#include "step_kernels.h"

namespace fastdiss {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kTokTile = 32;            // tokens per block in the nearest-embedding search
constexpr int kVocabTile = 64;          // vocabulary rows per shared-memory tile
constexpr int kDimTile = 32;            // embedding dims per shared-memory tile
constexpr int kLanesPerTok = kThreads / kTokTile;        // 8 threads share a token ...
constexpr int kColsPerLane = kVocabTile / kLanesPerTok;  // ... each scoring 8 vocabulary rows per tile

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// The DDIM update with explicitly rounded operations: no FMA contraction and no fast-math division, so
// float32 results equal PyTorch's eager evaluation of the same formula (the Python sampler's reference).
__device__ __forceinline__ float ddim(float x0, float xt, float a_t, float s_t, float a_s, float s_s) {
  const float eps = __fdiv_rn(__fsub_rn(xt, __fmul_rn(a_t, x0)), s_t);
  return __fadd_rn(__fmul_rn(a_s, x0), __fmul_rn(s_s, eps));
}

template <typename T>
__global__ void ddim_step_kernel(const T* __restrict__ x0, const T* __restrict__ xt, StepCoefs c,
                                 T* __restrict__ out, int64_t n, int64_t dim) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t tok = i / dim;
    out[i] = from_float<T>(ddim(to_float(x0[i]), to_float(xt[i]), c.alpha_t[tok], c.sigma_t[tok], c.alpha_s[tok],
                                c.sigma_s[tok]));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    nearest_partial_kernel(const T* __restrict__ x0, const T* __restrict__ emb, int64_t tokens, int64_t vocab,
                           int64_t dim, int64_t vocab_per_split, float* __restrict__ work_value,
                           int64_t* __restrict__ work_index) {
  __shared__ float xs[kTokTile][kDimTile + 1];  // +1: no bank conflicts on column reads
  __shared__ float es[kVocabTile][kDimTile + 1];
  const int t = threadIdx.x, row = t / kLanesPerTok, lane = t % kLanesPerTok;
  const int64_t tok0 = static_cast<int64_t>(blockIdx.x) * kTokTile;
  const int64_t v_begin = static_cast<int64_t>(blockIdx.y) * vocab_per_split;
  const int64_t v_end = v_begin + vocab_per_split < vocab ? v_begin + vocab_per_split : vocab;

  float best = 0.f;
  int64_t best_index = -1;
  for (int64_t v0 = v_begin; v0 < v_end; v0 += kVocabTile) {
    float acc[kColsPerLane];
#pragma unroll
    for (int j = 0; j < kColsPerLane; ++j) acc[j] = 0.f;
    for (int64_t d0 = 0; d0 < dim; d0 += kDimTile) {
      for (int e = t; e < kTokTile * kDimTile; e += kThreads) {
        const int r = e / kDimTile, k = e % kDimTile;
        const int64_t tok = tok0 + r, d = d0 + k;
        xs[r][k] = (tok < tokens && d < dim) ? to_float(x0[tok * dim + d]) : 0.f;
      }
      for (int e = t; e < kVocabTile * kDimTile; e += kThreads) {
        const int r = e / kDimTile, k = e % kDimTile;
        const int64_t v = v0 + r, d = d0 + k;
        es[r][k] = (v < v_end && d < dim) ? to_float(emb[v * dim + d]) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kDimTile; ++k) {
        const float xv = xs[row][k];
#pragma unroll
        for (int j = 0; j < kColsPerLane; ++j) acc[j] = fmaf(xv, es[lane + kLanesPerTok * j][k], acc[j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < kColsPerLane; ++j) {
      const int64_t v = v0 + lane + kLanesPerTok * j;
      if (v < v_end && argmax_better(acc[j], v, best, best_index)) best = acc[j], best_index = v;
    }
  }
  // The kLanesPerTok threads of a token are adjacent lanes of one warp: combine them with shuffles.
#pragma unroll
  for (int offset = kLanesPerTok / 2; offset > 0; offset /= 2) {
    const float other = __shfl_xor_sync(0xffffffffu, best, offset);
    const int64_t other_index =
        static_cast<int64_t>(__shfl_xor_sync(0xffffffffu, static_cast<long long>(best_index), offset));
    if (argmax_better(other, other_index, best, best_index)) best = other, best_index = other_index;
  }
  const int64_t tok = tok0 + row;
  if (lane == 0 && tok < tokens) {
    work_value[blockIdx.y * tokens + tok] = best;
    work_index[blockIdx.y * tokens + tok] = best_index;
  }
}

template <typename T>
__global__ void ddim_finish_kernel(const T* __restrict__ x0, const T* __restrict__ xt, StepCoefs c,
                                   const T* __restrict__ emb, bool clamp, int splits,
                                   const float* __restrict__ work_value, const int64_t* __restrict__ work_index,
                                   T* __restrict__ out, T* __restrict__ x0_used, int64_t tokens, int64_t dim) {
  __shared__ int64_t s_index;
  const int64_t tok = blockIdx.x;
  if (clamp && threadIdx.x < 32) {  // warp 0 reduces the slices' winners
    float best = 0.f;
    int64_t best_index = -1;
    for (int s = threadIdx.x; s < splits; s += 32) {
      const float v = work_value[s * tokens + tok];
      const int64_t i = work_index[s * tokens + tok];
      if (argmax_better(v, i, best, best_index)) best = v, best_index = i;
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      const float other = __shfl_xor_sync(0xffffffffu, best, offset);
      const int64_t other_index =
          static_cast<int64_t>(__shfl_xor_sync(0xffffffffu, static_cast<long long>(best_index), offset));
      if (argmax_better(other, other_index, best, best_index)) best = other, best_index = other_index;
    }
    if (threadIdx.x == 0) s_index = best_index;
  }
  __syncthreads();
  const T* src = clamp ? emb + s_index * dim : x0 + tok * dim;
  const float a_t = c.alpha_t[tok], s_t = c.sigma_t[tok], a_s = c.alpha_s[tok], s_s = c.sigma_s[tok];
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    const T v = src[d];
    x0_used[tok * dim + d] = v;
    out[tok * dim + d] = from_float<T>(ddim(to_float(v), to_float(xt[tok * dim + d]), a_t, s_t, a_s, s_s));
  }
}

template <typename F>
std::string dispatch(DType dtype, F&& launch) {
  switch (dtype) {
    case DType::kFloat32: launch(float{}); break;
    case DType::kFloat16: launch(__half{}); break;
    case DType::kBFloat16: launch(__nv_bfloat16{}); break;
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int multiprocessor_count(int device) {
  static std::atomic<int> cache[64];  // zero-initialised (static storage)
  if (device >= 0 && device < 64 && cache[device].load() > 0) return cache[device].load();
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) {
    cudaGetLastError();  // clear the error: a guess only changes how the work is split
    return 108;
  }
  if (device >= 0 && device < 64) cache[device].store(sms);
  return sms;
}

}  // namespace

std::string launch_ddim_step(DType dtype, const void* x0, const void* xt, StepCoefs coefs, void* out,
                             int64_t tokens, int64_t dim, void* stream) {
  const int64_t n = tokens * dim;
  if (n == 0) return {};
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(n, kThreads), int64_t{1} << 20));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    ddim_step_kernel<T><<<blocks, kThreads, 0, s>>>(static_cast<const T*>(x0), static_cast<const T*>(xt), coefs,
                                                    static_cast<T*>(out), n, dim);
  });
}

int nearest_embedding_splits(int64_t tokens, int64_t vocab, int device) {
  const int64_t token_blocks = std::max<int64_t>(1, ceil_div(tokens, kTokTile));
  const int64_t vocab_tiles = std::max<int64_t>(1, ceil_div(vocab, kVocabTile));
  const int64_t wanted = ceil_div(2 * multiprocessor_count(device), token_blocks);  // ~2 blocks per SM
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({wanted, vocab_tiles, 1024})));
}

std::string launch_ddim_step_clamp(DType dtype, const void* x0, const void* xt, StepCoefs coefs, const void* emb,
                                   int64_t vocab, bool clamp, int splits, float* work_value, int64_t* work_index,
                                   void* out, void* x0_used, int64_t tokens, int64_t dim, void* stream) {
  if (tokens == 0) return {};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  // Slices are whole vocabulary tiles; recount so that none is empty.
  const int64_t vocab_per_split = ceil_div(ceil_div(vocab, kVocabTile), std::max(splits, 1)) * kVocabTile;
  const int used_splits = clamp ? static_cast<int>(ceil_div(vocab, vocab_per_split)) : 0;
  const int64_t dim_warps = std::max<int64_t>(1, ceil_div(dim, 32));  // finish: one thread per dim, up to 256
  const int finish_threads = static_cast<int>(std::min<int64_t>(kThreads, dim_warps * 32));
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (clamp) {
      const dim3 grid(static_cast<unsigned>(ceil_div(tokens, kTokTile)), static_cast<unsigned>(used_splits));
      nearest_partial_kernel<T><<<grid, kThreads, 0, s>>>(static_cast<const T*>(x0), static_cast<const T*>(emb),
                                                          tokens, vocab, dim, vocab_per_split, work_value,
                                                          work_index);
    }
    ddim_finish_kernel<T><<<static_cast<unsigned>(tokens), finish_threads, 0, s>>>(
        static_cast<const T*>(x0), static_cast<const T*>(xt), coefs, static_cast<const T*>(emb), clamp, used_splits,
        work_value, work_index, static_cast<T*>(out), static_cast<T*>(x0_used), tokens, dim);
  });
}

}  // namespace cuda
}  // namespace fastdiss
