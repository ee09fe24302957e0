// Input validation shared by the CPU and CUDA implementations of the step ops.
//
// Every message names the op, the argument, what was given and what is expected. Dtype problems
// raise TypeError in Python (TORCH_CHECK_TYPE), shape/device problems ValueError (TORCH_CHECK_VALUE).
#pragma once

#include <ostream>

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

namespace fastdiss {

// Prints a dtype the way Python users see it ("torch.bfloat16"), as the fake impls in _ops_meta.py do.
struct PyDtype {
  at::ScalarType type;
};
inline std::ostream& operator<<(std::ostream& os, PyDtype d) {
  return os << "torch." << c10::getDtypeNames(d.type).first;
}

inline bool is_latent_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// x0_hat, x_t: (B, L, D) float32/float16/bfloat16, same shape, dtype and device.
// alpha_t, sigma_t, alpha_s, sigma_s: (B, L) float32 on the same device (one value per token).
inline void check_step_inputs(const char* op, const at::Tensor& x0_hat, const at::Tensor& x_t,
                              const at::Tensor& alpha_t, const at::Tensor& sigma_t,
                              const at::Tensor& alpha_s, const at::Tensor& sigma_s) {
  TORCH_CHECK_VALUE(x_t.dim() == 3, op, ": x_t must be a 3-D tensor (B, L, D); got shape ", x_t.sizes());
  TORCH_CHECK_TYPE(is_latent_dtype(x_t.scalar_type()), op,
                   ": x_t must be float32, float16 or bfloat16; got ", PyDtype{x_t.scalar_type()});
  TORCH_CHECK_VALUE(x0_hat.sizes() == x_t.sizes(), op, ": x0_hat must have the shape of x_t ", x_t.sizes(),
                    "; got ", x0_hat.sizes());
  TORCH_CHECK_TYPE(x0_hat.scalar_type() == x_t.scalar_type(), op, ": x0_hat must have the dtype of x_t (",
                   PyDtype{x_t.scalar_type()}, "); got ", PyDtype{x0_hat.scalar_type()});
  TORCH_CHECK_VALUE(x0_hat.device() == x_t.device(), op, ": x0_hat must be on the device of x_t (", x_t.device(),
                    "); got ", x0_hat.device());
  const at::Tensor* coefs[] = {&alpha_t, &sigma_t, &alpha_s, &sigma_s};
  const char* names[] = {"alpha_t", "sigma_t", "alpha_s", "sigma_s"};
  for (int i = 0; i < 4; ++i) {
    const at::Tensor& c = *coefs[i];
    TORCH_CHECK_VALUE(c.dim() == 2 && c.size(0) == x_t.size(0) && c.size(1) == x_t.size(1), op, ": ", names[i],
                      " must have shape (B, L) = [", x_t.size(0), ", ", x_t.size(1), "] (one value per token of x_t ",
                      x_t.sizes(), "); got ", c.sizes());
    TORCH_CHECK_TYPE(c.scalar_type() == at::kFloat, op, ": ", names[i], " must be float32; got ",
                     PyDtype{c.scalar_type()});
    TORCH_CHECK_VALUE(c.device() == x_t.device(), op, ": ", names[i], " must be on the device of x_t (",
                      x_t.device(), "); got ", c.device());
  }
}

// embedding_normed: (V, D) with the dtype and device of x_t; V >= 1 when it is used (clamp=true).
inline void check_embedding(const char* op, const at::Tensor& embedding_normed, const at::Tensor& x_t, bool clamp) {
  TORCH_CHECK_VALUE(embedding_normed.dim() == 2 && embedding_normed.size(1) == x_t.size(2), op,
                    ": embedding_normed must have shape (V, D) with D = ", x_t.size(2), " (the last dim of x_t ",
                    x_t.sizes(), "); got ", embedding_normed.sizes());
  TORCH_CHECK_TYPE(embedding_normed.scalar_type() == x_t.scalar_type(), op,
                   ": embedding_normed must have the dtype of x_t (", PyDtype{x_t.scalar_type()}, "); got ",
                   PyDtype{embedding_normed.scalar_type()});
  TORCH_CHECK_VALUE(embedding_normed.device() == x_t.device(), op, ": embedding_normed must be on the device of x_t (",
                    x_t.device(), "); got ", embedding_normed.device());
  TORCH_CHECK_VALUE(!clamp || embedding_normed.size(0) > 0, op,
                    ": embedding_normed must have at least one row when clamp=True; got shape ",
                    embedding_normed.sizes());
}

}  // namespace fastdiss
