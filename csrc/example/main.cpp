// fastdiss_example: calls the fastdiss ops from C++ (no Python) and checks them against the formula.
//
//   ./fastdiss_example          # CPU
//   ./fastdiss_example cuda     # CUDA (library built with -DFASTDISS_WITH_CUDA=ON and a CUDA torch)
//
// Exit status 0 when every check passes, 1 otherwise.
#include <cstdio>
#include <cstring>

#include <ATen/ATen.h>

#include "ops.h"

namespace {

// x_s = alpha_s x0 + sigma_s (x_t - alpha_t x0) / sigma_t in float64: the oracle for the op.
at::Tensor ddim_reference(const at::Tensor& x0, const at::Tensor& xt, const at::Tensor& a_t, const at::Tensor& s_t,
                          const at::Tensor& a_s, const at::Tensor& s_s) {
  auto c = [](const at::Tensor& v) { return v.to(at::kDouble).unsqueeze(-1); };
  const at::Tensor x0d = x0.to(at::kDouble);
  return c(a_s) * x0d + c(s_s) * (xt.to(at::kDouble) - c(a_t) * x0d) / c(s_t);
}

bool report(const char* what, double error, double tolerance) {
  const bool ok = error <= tolerance;
  std::printf("  %-46s max |error| = %.3e  (tolerance %.1e)  %s\n", what, error, tolerance, ok ? "ok" : "FAILED");
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  const bool use_cuda = argc > 1 && std::strcmp(argv[1], "cuda") == 0;
  const at::Device device(use_cuda ? at::kCUDA : at::kCPU);
  std::printf("fastdiss build: %s\n", fastdiss::build_info().c_str());
  std::printf("device: %s\n", use_cuda ? "cuda" : "cpu");
  at::manual_seed(0);

  const int64_t B = 2, L = 5, D = 16, V = 50;
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(device);
  // Per-token noise levels: t in (0.05, 1), s < t, with the sqrt schedule alpha^2 = 1 - sqrt(t + 1e-4).
  const at::Tensor t = at::rand({B, L}, f32) * 0.95 + 0.05;
  const at::Tensor s = t * at::rand({B, L}, f32);
  auto alpha = [](const at::Tensor& u) { return (1 - at::sqrt(u + 1e-4)).sqrt(); };
  auto sigma = [](const at::Tensor& u) { return at::sqrt(u + 1e-4).sqrt(); };
  const at::Tensor a_t = alpha(t), s_t = sigma(t), a_s = alpha(s), s_s = sigma(s);
  const at::Tensor x_t = at::randn({B, L, D}, f32);
  const at::Tensor x0_hat = at::randn({B, L, D}, f32);

  bool ok = true;
  std::printf("ddim_step on (B, L, D) = (%lld, %lld, %lld):\n", (long long)B, (long long)L, (long long)D);
  const at::Tensor x_s = fastdiss::ddim_step(x0_hat, x_t, a_t, s_t, a_s, s_s);
  const at::Tensor head = x_s[0][0].slice(0, 0, 4).cpu();
  std::printf("  x_s[0, 0, :4] = [%.5f, %.5f, %.5f, %.5f]\n", head[0].item<float>(), head[1].item<float>(),
              head[2].item<float>(), head[3].item<float>());
  const double err = (x_s.to(at::kDouble) - ddim_reference(x0_hat, x_t, a_t, s_t, a_s, s_s)).abs().max().item<double>();
  ok &= report("ddim_step vs float64 formula", err, 1e-5);

  // Clamp: each x0_hat is a slightly perturbed embedding row, so the nearest row is known.
  const at::Tensor emb = at::randn({V, D}, f32);
  const at::Tensor target = at::randint(V, {B, L}, f32.dtype(at::kLong));
  const at::Tensor x0_near = emb.index_select(0, target.flatten()).view({B, L, D}) + 0.01 * at::randn({B, L, D}, f32);
  const auto [x_s2, x0_used] = fastdiss::ddim_step_clamp(x0_near, x_t, a_t, s_t, a_s, s_s, emb, true);
  const at::Tensor expected_used = emb.index_select(0, target.flatten()).view({B, L, D});
  std::printf("ddim_step_clamp with V = %lld embeddings:\n", (long long)V);
  ok &= report("x0_used vs the nearest embedding rows", (x0_used - expected_used).abs().max().item<double>(), 0.0);
  const double err2 =
      (x_s2.to(at::kDouble) - ddim_reference(expected_used, x_t, a_t, s_t, a_s, s_s)).abs().max().item<double>();
  ok &= report("x_s vs float64 formula on the clamped x0", err2, 1e-5);

  std::printf("%s\n", ok ? "all checks passed" : "SOME CHECKS FAILED");
  return ok ? 0 : 1;
}
