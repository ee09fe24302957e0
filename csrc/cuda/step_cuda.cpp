// CUDA registrations of the sampler step ops: validate, make inputs contiguous, allocate outputs and
// workspace through PyTorch (caching allocator, so the ops can be captured in CUDA graphs), launch the
// kernels of step_kernels.cu on the current stream.
//
// Host code only, so it is a .cpp for the host compiler: nvcc would parse torch's headers once more per
// GPU architecture. No ATen/cuda header is used (those need cuBLAS/cuSPARSE headers); c10/cuda needs only
// the CUDA runtime plus a generated c10/cuda/impl/cuda_cmake_macros.h that CPU wheels of torch lack --
// the compile check (tests/test_cuda_compile.py) supplies that one-line header on CPU-only CI.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "step_kernels.h"

namespace fastdiss {
namespace {

cuda::DType latent_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: break;
  }
  TORCH_CHECK_TYPE(false, "fastdiss: unsupported latent dtype ", t);
  return cuda::DType::kFloat32;  // unreachable
}

// The current CUDA stream of `device` (torch.cuda.current_stream()), what CUDA graph capture records.
void* current_stream(const at::Device& device) { return c10::cuda::getCurrentCUDAStream(device.index()).stream(); }

cuda::StepCoefs coefs_of(const at::Tensor& a_t, const at::Tensor& s_t, const at::Tensor& a_s, const at::Tensor& s_s) {
  return {a_t.data_ptr<float>(), s_t.data_ptr<float>(), a_s.data_ptr<float>(), s_s.data_ptr<float>()};
}

at::Tensor ddim_step_cuda(const at::Tensor& x0_hat, const at::Tensor& x_t, const at::Tensor& alpha_t,
                          const at::Tensor& sigma_t, const at::Tensor& alpha_s, const at::Tensor& sigma_s) {
  const char* op = "fastdiss::ddim_step";
  check_step_inputs(op, x0_hat, x_t, alpha_t, sigma_t, alpha_s, sigma_s);
  const c10::cuda::CUDAGuard guard(x_t.device());
  const at::Tensor x0 = x0_hat.contiguous(), xt = x_t.contiguous();
  const at::Tensor a_t = alpha_t.contiguous(), s_t = sigma_t.contiguous(), a_s = alpha_s.contiguous(),
                   s_s = sigma_s.contiguous();
  at::Tensor out = at::empty(xt.sizes(), xt.options());
  const std::string err = cuda::launch_ddim_step(latent_dtype(xt.scalar_type()), x0.data_ptr(), xt.data_ptr(),
                                                 coefs_of(a_t, s_t, a_s, s_s), out.data_ptr(),
                                                 xt.size(0) * xt.size(1), xt.size(2), current_stream(xt.device()));
  TORCH_CHECK(err.empty(), op, ": CUDA kernel launch failed: ", err);
  return out;
}

std::tuple<at::Tensor, at::Tensor> ddim_step_clamp_cuda(const at::Tensor& x0_hat, const at::Tensor& x_t,
                                                        const at::Tensor& alpha_t, const at::Tensor& sigma_t,
                                                        const at::Tensor& alpha_s, const at::Tensor& sigma_s,
                                                        const at::Tensor& embedding_normed, bool clamp) {
  const char* op = "fastdiss::ddim_step_clamp";
  check_step_inputs(op, x0_hat, x_t, alpha_t, sigma_t, alpha_s, sigma_s);
  check_embedding(op, embedding_normed, x_t, clamp);
  const c10::cuda::CUDAGuard guard(x_t.device());
  const at::Tensor x0 = x0_hat.contiguous(), xt = x_t.contiguous(), emb = embedding_normed.contiguous();
  const at::Tensor a_t = alpha_t.contiguous(), s_t = sigma_t.contiguous(), a_s = alpha_s.contiguous(),
                   s_s = sigma_s.contiguous();
  at::Tensor x_s = at::empty(xt.sizes(), xt.options());
  at::Tensor x0_used = at::empty(xt.sizes(), xt.options());
  const int64_t tokens = xt.size(0) * xt.size(1), dim = xt.size(2), vocab = emb.size(0);
  const int splits = clamp ? cuda::nearest_embedding_splits(tokens, vocab, xt.get_device()) : 0;
  at::Tensor work_value = at::empty({splits, tokens}, xt.options().dtype(at::kFloat));
  at::Tensor work_index = at::empty({splits, tokens}, xt.options().dtype(at::kLong));
  const std::string err = cuda::launch_ddim_step_clamp(
      latent_dtype(xt.scalar_type()), x0.data_ptr(), xt.data_ptr(), coefs_of(a_t, s_t, a_s, s_s), emb.data_ptr(),
      vocab, clamp, splits, work_value.data_ptr<float>(), work_index.data_ptr<int64_t>(), x_s.data_ptr(),
      x0_used.data_ptr(), tokens, dim, current_stream(xt.device()));
  TORCH_CHECK(err.empty(), op, ": CUDA kernel launch failed: ", err);
  return {x_s, x0_used};
}

}  // namespace
}  // namespace fastdiss

TORCH_LIBRARY_IMPL(fastdiss, CUDA, m) {
  m.impl("ddim_step", &fastdiss::ddim_step_cuda);
  m.impl("ddim_step_clamp", &fastdiss::ddim_step_clamp_cuda);
}
