// The K-step DDIM sampler in C++: the denoiser as two AOTInductor packages (written by
// `fastdiss export`), the step arithmetic as the fused op fastdiss::ddim_step_clamp, no Python.
//
//   AOTISampler sampler("exported/");                    // encoder.pt2, decoder.pt2, embedding.pt
//   auto out = sampler.generate(src, src_mask, lengths, std::nullopt, sampler.step_table(/*steps=*/4),
//                               /*clamp=*/false, /*seed=*/0);
//
// It reproduces fastdiss.sampling.Sampler step for step: the schedule values come as tables (from
// Python's step_schedule, passed in or stored by `fastdiss export`), the predicted lengths from the
// exported encoder (the Sampler's length rule, traced), the update is the same op, the
// self-conditioning hand-over the same. No schedule or length formula lives here, so for the same
// inputs and initial noise the two loops agree to float32 rounding of the two network implementations.
//
// From Python the class is torch.classes.fastdiss.AOTISampler (fastdiss/cpp_engine.py wraps it).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/custom_class.h>

namespace torch::inductor {
class AOTIModelPackageLoader;
}

namespace fastdiss {

// Per-step values of a K-step grid, float32 on the CPU, as fastdiss.python_engine.step_schedule gives
// them: t_net (K,) network times, alpha / sigma (K+1,) at the grid points.
struct StepTable {
  at::Tensor t_net, alpha, sigma;
};

// What the loop needs besides the graphs (stored by fastdiss/export.py in decoder.pt2's metadata).
struct ExportInfo {
  double noise_factor = 1.0;   // x_{t_0} = noise_factor * eps
  int64_t d_latent = 0, max_len = 0, vocab_size = 0, pad_id = 0, n_dec = 0, max_batch = 0;
  int64_t default_steps = 4;
  bool default_clamp = false;
  std::string spacing;         // the time spacing and network time shift the step tables were made for
  double time_shift = 0.0;
  std::map<int64_t, StepTable> step_tables;  // by K: the step counts exported (`fastdiss export --steps-list`)
  std::string device = "cpu";
};

// Output of AOTISampler::generate. ids / token_logp: (B, L) with L = max length; row b is valid up
// to lengths[b] (the rest is pad_id / 0). latents: final x_{t_K} (B, L, d); x0: last x0_hat (B, L, d).
struct Generation {
  at::Tensor ids, lengths, token_logp, latents, x0;
};

class AOTISampler : public torch::CustomClassHolder {
 public:
  explicit AOTISampler(const std::string& export_dir);
  ~AOTISampler() override;

  // Encoder once per batch: {memory (B, Ls, d), lengths (B,) int64 (top-1 predicted), k_0, v_0, ..., k_{n-1}, v_{n-1}}.
  // src (B, Ls) int64 ids in [0, vocab); src_mask (B, Ls) bool, true = padding.
  std::vector<at::Tensor> encode(const at::Tensor& src, const at::Tensor& src_mask);

  // All K steps from x = x_{t_0}: returns (x_{t_K}, x0 of the last step, clamped when `clamp`).
  // state: encode()'s output (rows may be repeated per candidate); src_mask: its (B, Ls) mask;
  // tgt_mask (B, L) bool; t_net (K,), alpha / sigma (K+1,) float32 (a StepTable, or step_schedule's from Python).
  std::tuple<at::Tensor, at::Tensor> denoise(const std::vector<at::Tensor>& state, const at::Tensor& src_mask,
                                             const at::Tensor& x, const at::Tensor& tgt_mask, const at::Tensor& t_net,
                                             const at::Tensor& alpha, const at::Tensor& sigma, bool clamp);

  // Rounding head: (ids, token log-prob) = max over v of log_softmax(x0 @ norm(E)^T), as the Python sampler.
  std::tuple<at::Tensor, at::Tensor> round(const at::Tensor& x0);

  // The stored table for K = steps; throws naming the exported step counts and the fix (re-export
  // with --steps-list) when K is not among them.
  const StepTable& step_table(int64_t steps) const;

  // Source ids -> target ids, all in C++. lengths (B,) int64: entries <= 0 take the encoder's predicted
  // length. noise: the initial x_{t_0} (B, L, d) with L >= every length, or nullopt to draw noise_factor *
  // randn from a CPU generator seeded with `seed` (the same numbers torch.randn(generator=...) gives).
  Generation generate(const at::Tensor& src, const at::Tensor& src_mask, const at::Tensor& lengths,
                      const std::optional<at::Tensor>& noise, const StepTable& table, bool clamp, int64_t seed);

  // Seconds per decoder call (median of `iters` timed calls after 2 warm-ups), for the benchmark's
  // compute baseline: the network alone, called from C++ with no loop around it.
  double time_decoder(const std::vector<at::Tensor>& state, const at::Tensor& src_mask, const at::Tensor& x,
                      const at::Tensor& tgt_mask, int64_t iters);

  const ExportInfo& info() const { return info_; }
  const at::Tensor& embedding() const { return embedding_; }
  // Python-facing views of info() (custom classes cannot return structs).
  std::vector<std::string> info_strings() const;
  std::vector<at::Tensor> step_table_py(int64_t steps) const;  // [t_net, alpha, sigma]
  // generate with the stored table for K = steps.
  std::vector<at::Tensor> generate_py(const at::Tensor& src, const at::Tensor& src_mask, const at::Tensor& lengths,
                                      const std::optional<at::Tensor>& noise, int64_t steps, bool clamp,
                                      int64_t seed);

 private:
  void check_state(const std::vector<at::Tensor>& state, const at::Tensor& src_mask, int64_t batch) const;
  std::vector<at::Tensor> decoder_inputs(const std::vector<at::Tensor>& state, const at::Tensor& src_mask) const;

  std::string dir_;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> encoder_, decoder_;
  at::Tensor embedding_;  // norm(E) (V, d) on the model's device
  ExportInfo info_;
};

// Reads "k=v" metadata of decoder.pt2 into an ExportInfo (throws naming the missing key).
ExportInfo parse_export_info(const std::unordered_map<std::string, std::string>& metadata, const std::string& where);

}  // namespace fastdiss
