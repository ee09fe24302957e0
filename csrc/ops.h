// C++ entry points of the fastdiss ops, for programs that embed the sampler (see csrc/example/main.cpp).
//
// Each function calls the op through the PyTorch dispatcher, so the CPU or CUDA kernel is picked
// from the inputs' device exactly as `torch.ops.fastdiss.*` does from Python. Linking against the
// library that defines these functions also guarantees that its op registrations are loaded.
#pragma once

#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace fastdiss {

// DDIM update from time t to s < t, per token (docs/method.md, section 1):
//   x_s = alpha_s * x0_hat + sigma_s * (x_t - alpha_t * x0_hat) / sigma_t
// x0_hat, x_t: (B, L, D) float32/float16/bfloat16; alpha_*, sigma_*: (B, L) float32. Math in float32.
at::Tensor ddim_step(const at::Tensor& x0_hat, const at::Tensor& x_t, const at::Tensor& alpha_t,
                     const at::Tensor& sigma_t, const at::Tensor& alpha_s, const at::Tensor& sigma_s);

// The sampler step: optional clamp of x0_hat to the nearest embedding, then the DDIM update.
// With clamp, x0_used[b, l] = embedding_normed[argmax_v <x0_hat[b, l], embedding_normed[v]>] (the rounding
// logits; exact argmax over float32 logits, ties -> lowest index, NaN counts as the maximum); without
// clamp, x0_used = x0_hat. Returns (x_s, x0_used); x0_used is the self-conditioning input of the next step.
std::tuple<at::Tensor, at::Tensor> ddim_step_clamp(const at::Tensor& x0_hat, const at::Tensor& x_t,
                                                   const at::Tensor& alpha_t, const at::Tensor& sigma_t,
                                                   const at::Tensor& alpha_s, const at::Tensor& sigma_s,
                                                   const at::Tensor& embedding_normed, bool clamp);

// "torch=<version>;cuda=<yes|no>;archs=<TORCH_CUDA_ARCH_LIST or none>" as recorded at build time.
std::string build_info();

}  // namespace fastdiss
