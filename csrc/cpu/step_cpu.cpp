// CPU kernels of the sampler step ops (schemas in csrc/ops.cpp).
//
// Tokens are split across threads with at::parallel_for; each token's row of D values is updated in
// float32 (vectorised for float32 inputs) and rounded once to the output dtype. The DDIM formula is
// evaluated in the order of the PyTorch reference (fastdiss.functional.ddim_step_reference), so float32
// results match eager PyTorch bit for bit where the compiler does not contract into FMAs.
#include <algorithm>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "../checks.h"
#include "../step_math.h"

namespace fastdiss {
namespace {

struct Coefs {
  float alpha_t, sigma_t, alpha_s, sigma_s;
};

// out[d] = alpha_s * x0[d] + sigma_s * (xt[d] - alpha_t * x0[d]) / sigma_t for one token.
template <typename scalar_t>
void ddim_row(const scalar_t* x0, const scalar_t* xt, scalar_t* out, int64_t dim, Coefs c) {
  for (int64_t d = 0; d < dim; ++d) {
    const float x0v = static_cast<float>(x0[d]);
    const float eps = (static_cast<float>(xt[d]) - c.alpha_t * x0v) / c.sigma_t;
    out[d] = static_cast<scalar_t>(c.alpha_s * x0v + c.sigma_s * eps);
  }
}

template <>
void ddim_row<float>(const float* x0, const float* xt, float* out, int64_t dim, Coefs c) {
  using Vec = at::vec::Vectorized<float>;
  const Vec a_t(c.alpha_t), s_t(c.sigma_t), a_s(c.alpha_s), s_s(c.sigma_s);
  int64_t d = 0;
  for (; d + Vec::size() <= dim; d += Vec::size()) {
    const Vec x0v = Vec::loadu(x0 + d);
    const Vec eps = (Vec::loadu(xt + d) - a_t * x0v) / s_t;
    (a_s * x0v + s_s * eps).store(out + d);
  }
  for (; d < dim; ++d) {
    const float eps = (xt[d] - c.alpha_t * x0[d]) / c.sigma_t;
    out[d] = c.alpha_s * x0[d] + c.sigma_s * eps;
  }
}

struct CoefPtrs {
  const float *alpha_t, *sigma_t, *alpha_s, *sigma_s;
  Coefs at(int64_t token) const { return {alpha_t[token], sigma_t[token], alpha_s[token], sigma_s[token]}; }
};

CoefPtrs coef_ptrs(const at::Tensor& a_t, const at::Tensor& s_t, const at::Tensor& a_s, const at::Tensor& s_s) {
  return {a_t.data_ptr<float>(), s_t.data_ptr<float>(), a_s.data_ptr<float>(), s_s.data_ptr<float>()};
}

// Threads get whole tokens; a grain of ~32k elements keeps tiny steps single-threaded.
int64_t token_grain(int64_t dim) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(dim, 1)); }

#define FASTDISS_DISPATCH_LATENT(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

at::Tensor ddim_step_cpu(const at::Tensor& x0_hat, const at::Tensor& x_t, const at::Tensor& alpha_t,
                         const at::Tensor& sigma_t, const at::Tensor& alpha_s, const at::Tensor& sigma_s) {
  check_step_inputs("fastdiss::ddim_step", x0_hat, x_t, alpha_t, sigma_t, alpha_s, sigma_s);
  const at::Tensor x0 = x0_hat.contiguous(), xt = x_t.contiguous();
  const at::Tensor a_t = alpha_t.contiguous(), s_t = sigma_t.contiguous(), a_s = alpha_s.contiguous(),
                   s_s = sigma_s.contiguous();
  at::Tensor out = at::empty(xt.sizes(), xt.options());
  const int64_t tokens = xt.size(0) * xt.size(1), dim = xt.size(2);
  if (out.numel() == 0) return out;
  const CoefPtrs coefs = coef_ptrs(a_t, s_t, a_s, s_s);
  FASTDISS_DISPATCH_LATENT(xt.scalar_type(), "fastdiss::ddim_step (CPU)", [&] {
    const scalar_t* x0p = x0.data_ptr<scalar_t>();
    const scalar_t* xtp = xt.data_ptr<scalar_t>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    at::parallel_for(0, tokens, token_grain(dim), [&](int64_t begin, int64_t end) {
      for (int64_t tok = begin; tok < end; ++tok)
        ddim_row(x0p + tok * dim, xtp + tok * dim, outp + tok * dim, dim, coefs.at(tok));
    });
  });
  return out;
}

// Index of the best logit in one row under argmax_better (ties -> lowest index, NaN is the maximum).
int64_t argmax_row(const float* logits, int64_t vocab) {
  float best = logits[0];
  int64_t best_index = 0;
  for (int64_t v = 1; v < vocab; ++v)
    if (argmax_better(logits[v], v, best, best_index)) best = logits[v], best_index = v;
  return best_index;
}

// Nearest embedding row (by dot product) of every token. The logits come from at::mm (BLAS: far faster
// than hand-written dot loops on CPU) in float32, a chunk of tokens at a time so the (tokens x V) logits
// never exceed ~4 MB; the argmax is ours so its tie rule is the one the CUDA kernel uses.
std::vector<int64_t> nearest_embedding(const at::Tensor& x0, const at::Tensor& emb, int64_t tokens) {
  const int64_t vocab = emb.size(0), dim = emb.size(1);
  const at::Tensor x0f = x0.reshape({tokens, dim}).to(at::kFloat);
  const at::Tensor emb_t = emb.to(at::kFloat).t();
  const int64_t chunk = std::max<int64_t>(1, (int64_t{1} << 20) / vocab);
  std::vector<int64_t> index(tokens);
  for (int64_t start = 0; start < tokens; start += chunk) {
    const int64_t n = std::min(chunk, tokens - start);
    const at::Tensor logits = at::mm(x0f.narrow(0, start, n), emb_t).contiguous();
    const float* lp = logits.data_ptr<float>();
    at::parallel_for(0, n, std::max<int64_t>(1, 32768 / vocab), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) index[start + r] = argmax_row(lp + r * vocab, vocab);
    });
  }
  return index;
}

std::tuple<at::Tensor, at::Tensor> ddim_step_clamp_cpu(const at::Tensor& x0_hat, const at::Tensor& x_t,
                                                       const at::Tensor& alpha_t, const at::Tensor& sigma_t,
                                                       const at::Tensor& alpha_s, const at::Tensor& sigma_s,
                                                       const at::Tensor& embedding_normed, bool clamp) {
  const char* op = "fastdiss::ddim_step_clamp";
  check_step_inputs(op, x0_hat, x_t, alpha_t, sigma_t, alpha_s, sigma_s);
  check_embedding(op, embedding_normed, x_t, clamp);
  const at::Tensor x0 = x0_hat.contiguous(), xt = x_t.contiguous(), emb = embedding_normed.contiguous();
  const at::Tensor a_t = alpha_t.contiguous(), s_t = sigma_t.contiguous(), a_s = alpha_s.contiguous(),
                   s_s = sigma_s.contiguous();
  at::Tensor x_s = at::empty(xt.sizes(), xt.options());
  at::Tensor x0_used = at::empty(xt.sizes(), xt.options());
  const int64_t tokens = xt.size(0) * xt.size(1), dim = xt.size(2);
  if (tokens == 0) return {x_s, x0_used};
  const std::vector<int64_t> index = clamp ? nearest_embedding(x0, emb, tokens) : std::vector<int64_t>();
  const CoefPtrs coefs = coef_ptrs(a_t, s_t, a_s, s_s);
  FASTDISS_DISPATCH_LATENT(xt.scalar_type(), "fastdiss::ddim_step_clamp (CPU)", [&] {
    const scalar_t* x0p = x0.data_ptr<scalar_t>();
    const scalar_t* xtp = xt.data_ptr<scalar_t>();
    const scalar_t* embp = emb.data_ptr<scalar_t>();
    scalar_t* xsp = x_s.data_ptr<scalar_t>();
    scalar_t* usedp = x0_used.data_ptr<scalar_t>();
    at::parallel_for(0, tokens, token_grain(dim), [&](int64_t begin, int64_t end) {
      for (int64_t tok = begin; tok < end; ++tok) {
        const scalar_t* src = clamp ? embp + index[tok] * dim : x0p + tok * dim;
        std::copy(src, src + dim, usedp + tok * dim);
        ddim_row(src, xtp + tok * dim, xsp + tok * dim, dim, coefs.at(tok));
      }
    });
  });
  return {x_s, x0_used};
}

}  // namespace
}  // namespace fastdiss

TORCH_LIBRARY_IMPL(fastdiss, CPU, m) {
  m.impl("ddim_step", &fastdiss::ddim_step_cpu);
  m.impl("ddim_step_clamp", &fastdiss::ddim_step_clamp_cpu);
}
