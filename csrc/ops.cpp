// Schemas of the fastdiss ops (namespace `fastdiss`) and their C++ entry points.
//
// Kernels register per device: csrc/cpu/step_cpu.cpp (CPU), csrc/cuda/step_cuda.cpp (CUDA).
// Fake (meta) implementations for torch.compile / export live in fastdiss/_ops_meta.py.
#include "ops.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#if !defined(FASTDISS_BUILD_INFO) && __has_include("fastdiss_build_info.h")
#include "fastdiss_build_info.h"  // written by CMakeLists.txt (setup.py passes -DFASTDISS_BUILD_INFO)
#endif
#ifndef FASTDISS_BUILD_INFO
#define FASTDISS_BUILD_INFO "torch=unknown;cuda=unknown;archs=unknown"
#endif

namespace fastdiss {

std::string build_info() { return FASTDISS_BUILD_INFO; }

at::Tensor ddim_step(const at::Tensor& x0_hat, const at::Tensor& x_t, const at::Tensor& alpha_t,
                     const at::Tensor& sigma_t, const at::Tensor& alpha_s, const at::Tensor& sigma_s) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastdiss::ddim_step", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(x0_hat, x_t, alpha_t, sigma_t, alpha_s, sigma_s);
}

std::tuple<at::Tensor, at::Tensor> ddim_step_clamp(const at::Tensor& x0_hat, const at::Tensor& x_t,
                                                   const at::Tensor& alpha_t, const at::Tensor& sigma_t,
                                                   const at::Tensor& alpha_s, const at::Tensor& sigma_s,
                                                   const at::Tensor& embedding_normed, bool clamp) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastdiss::ddim_step_clamp", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>();
  return op.call(x0_hat, x_t, alpha_t, sigma_t, alpha_s, sigma_s, embedding_normed, clamp);
}

}  // namespace fastdiss

TORCH_LIBRARY(fastdiss, m) {
  m.def("ddim_step(Tensor x0_hat, Tensor x_t, Tensor alpha_t, Tensor sigma_t, Tensor alpha_s, Tensor sigma_s)"
        " -> Tensor");
  m.def("ddim_step_clamp(Tensor x0_hat, Tensor x_t, Tensor alpha_t, Tensor sigma_t, Tensor alpha_s,"
        " Tensor sigma_s, Tensor embedding_normed, bool clamp) -> (Tensor, Tensor)");
  m.def("build_info() -> str", &fastdiss::build_info);
}

// The step ops are sampling-only (the argmax has no gradient): a backward through them fails with a
// clear "not implemented" error instead of silently returning no gradient.
TORCH_LIBRARY_IMPL(fastdiss, Autograd, m) {
  m.impl("ddim_step", torch::autograd::autogradNotImplementedFallback());
  m.impl("ddim_step_clamp", torch::autograd::autogradNotImplementedFallback());
}
