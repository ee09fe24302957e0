// The C++ sampling loop (see aoti_sampler.h): AOTInductor encoder once, K decoder calls, the fused
// DDIM step op between them, and the rounding head at the end.
#include "aoti_sampler.h"

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <exception>
#include <sstream>
#include <unordered_map>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/jit/serialization/pickle.h>
#include <torch/custom_class.h>
#include <torch/library.h>

namespace fastdiss {
namespace {

// fastdiss::ddim_step_clamp through the dispatcher: the CPU or CUDA kernel from the inputs' device, exactly
// what torch.ops.fastdiss.ddim_step_clamp runs from Python. Looked up by name, so this file links without
// the op library (the op must be registered by the time the loop runs: fastdiss._C or libfastdiss_ops).
std::tuple<at::Tensor, at::Tensor> ddim_step_clamp(const at::Tensor& x0_hat, const at::Tensor& x_t,
                                                   const at::Tensor& alpha_t, const at::Tensor& sigma_t,
                                                   const at::Tensor& alpha_s, const at::Tensor& sigma_s,
                                                   const at::Tensor& embedding_normed, bool clamp) {
  static auto op = [] {
    auto handle = c10::Dispatcher::singleton().findSchema({"fastdiss::ddim_step_clamp", ""});
    TORCH_CHECK(handle.has_value(),
                "AOTISampler needs the op fastdiss::ddim_step_clamp, which is not registered: load fastdiss._C "
                "(import fastdiss) or link libfastdiss_ops");
    return handle->typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                            const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                            const at::Tensor&, bool)>();
  }();
  return op.call(x0_hat, x_t, alpha_t, sigma_t, alpha_s, sigma_s, embedding_normed, clamp);
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  TORCH_CHECK(f.good(), "cannot open ", path);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

const std::string& need(const std::unordered_map<std::string, std::string>& md, const std::string& key,
                        const std::string& where) {
  auto it = md.find(key);
  TORCH_CHECK_VALUE(it != md.end(), where, " lacks the metadata entry '", key,
                    "'; it was not written by `fastdiss export` (re-export the model)");
  return it->second;
}

// "0.5,0.25" (Python's repr of float32 values, exact as doubles) -> a float32 tensor of `count` values.
at::Tensor parse_floats(const std::string& text, const std::string& key, int64_t count, const std::string& where) {
  std::vector<float> values;
  std::istringstream in(text);
  std::string tok;
  while (std::getline(in, tok, ',')) {
    size_t used = 0;
    double v = 0.0;
    try {
      v = std::stod(tok, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    TORCH_CHECK_VALUE(used == tok.size() && used > 0, where, ": metadata entry '", key, "' holds '", tok,
                      "', not a number (re-export the model)");
    values.push_back(static_cast<float>(v));
  }
  TORCH_CHECK_VALUE(static_cast<int64_t>(values.size()) == count, where, ": metadata entry '", key, "' holds ",
                    values.size(), " values, expected ", count, " (re-export the model)");
  return at::tensor(values, at::kFloat);
}

void check_mask(const char* what, const char* name, const at::Tensor& mask, int64_t b, int64_t l,
                const at::Device& device) {
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, what, ": ", name, " must be a bool tensor (true = padding); got ",
                   mask.scalar_type());
  TORCH_CHECK_VALUE(mask.dim() == 2 && mask.size(0) == b && mask.size(1) == l, what, ": ", name,
                    " must have shape [", b, ", ", l, "]; got ", mask.sizes());
  TORCH_CHECK_VALUE(mask.device() == device, what, ": ", name, " must be on ", device, "; got ", mask.device());
}

void check_coefs(const char* what, const at::Tensor& t_net, const at::Tensor& alpha, const at::Tensor& sigma) {
  TORCH_CHECK_VALUE(t_net.dim() == 1 && t_net.size(0) >= 1, what, ": t_net must have shape (K,) with K >= 1 steps; got ",
                    t_net.sizes());
  const int64_t k = t_net.size(0);
  const at::Tensor* ts[] = {&t_net, &alpha, &sigma};
  const char* names[] = {"t_net", "alpha", "sigma"};
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK_TYPE(ts[i]->scalar_type() == at::kFloat, what, ": ", names[i], " must be float32; got ",
                     ts[i]->scalar_type());
    if (i > 0)
      TORCH_CHECK_VALUE(ts[i]->dim() == 1 && ts[i]->size(0) == k + 1, what, ": ", names[i],
                        " must have shape (K + 1,) = [", k + 1, "] (one value per grid point); got ", ts[i]->sizes());
  }
}

}  // namespace

ExportInfo parse_export_info(const std::unordered_map<std::string, std::string>& md, const std::string& where) {
  auto i64 = [&](const char* k) { return static_cast<int64_t>(std::stoll(need(md, k, where))); };
  auto f64 = [&](const char* k) { return std::stod(need(md, k, where)); };
  const std::string format = need(md, "format", where);
  TORCH_CHECK_VALUE(format == "fastdiss-aoti", where, " has format '", format, "', expected 'fastdiss-aoti'");
  TORCH_CHECK_VALUE(i64("format_version") == 2, where, " has format version ", i64("format_version"),
                    "; this sampler reads version 2, which stores the step tables and predicts lengths in the "
                    "encoder (re-export the model: `fastdiss export --ckpt CKPT --out DIR`)");
  ExportInfo info;
  info.noise_factor = f64("noise_factor");
  info.d_latent = i64("d_latent");
  info.max_len = i64("max_len");
  info.vocab_size = i64("vocab_size");
  info.pad_id = i64("pad_id");
  info.n_dec = i64("n_dec");
  info.max_batch = i64("max_batch");
  info.default_steps = i64("default_steps");
  info.default_clamp = i64("default_clamp") != 0;
  info.spacing = need(md, "spacing", where);
  info.time_shift = f64("time_shift");
  info.device = need(md, "device", where);
  std::istringstream steps(need(md, "steps_list", where));
  for (std::string tok; std::getline(steps, tok, ',');) {
    const int64_t k = std::stoll(tok);
    TORCH_CHECK_VALUE(k >= 1, where, ": steps_list holds ", k, ", not a positive step count (re-export the model)");
    auto table = [&](const std::string& name, int64_t count) {
      const std::string key = name + "_" + std::to_string(k);
      return parse_floats(need(md, key, where), key, count, where);
    };
    info.step_tables[k] = StepTable{table("t_net", k), table("alpha", k + 1), table("sigma", k + 1)};
  }
  return info;
}

AOTISampler::AOTISampler(const std::string& export_dir) : dir_(export_dir) {
  namespace fs = std::filesystem;
  for (const char* name : {"encoder.pt2", "decoder.pt2", "embedding.pt"})
    TORCH_CHECK_VALUE(fs::is_regular_file(fs::path(dir_) / name), "'", dir_, "' is not a fastdiss export: ", name,
                      " is missing (create one with `fastdiss export --ckpt CKPT --out DIR`)");
  const std::string dec_path = (fs::path(dir_) / "decoder.pt2").string();
  decoder_ = std::make_unique<torch::inductor::AOTIModelPackageLoader>(dec_path);
  encoder_ = std::make_unique<torch::inductor::AOTIModelPackageLoader>((fs::path(dir_) / "encoder.pt2").string());
  info_ = parse_export_info(decoder_->get_metadata(), dec_path);
  const std::string bytes = read_file((fs::path(dir_) / "embedding.pt").string());
  at::Tensor emb = torch::jit::pickle_load(std::vector<char>(bytes.begin(), bytes.end())).toTensor();
  TORCH_CHECK_VALUE(emb.dim() == 2 && emb.size(0) == info_.vocab_size && emb.size(1) == info_.d_latent,
                    dir_, "/embedding.pt has shape ", emb.sizes(), ", expected [", info_.vocab_size, ", ",
                    info_.d_latent, "]");
  embedding_ = emb.to(at::Device(info_.device)).contiguous();
}

AOTISampler::~AOTISampler() = default;

std::vector<at::Tensor> AOTISampler::encode(const at::Tensor& src, const at::Tensor& src_mask) {
  const char* what = "AOTISampler.encode";
  const at::Device device = embedding_.device();
  TORCH_CHECK_TYPE(src.scalar_type() == at::kLong, what, ": src must hold int64 token ids; got ", src.scalar_type());
  TORCH_CHECK_VALUE(src.dim() == 2 && src.size(0) >= 1 && src.size(1) >= 1, what,
                    ": src must have shape (batch, length) with both >= 1; got ", src.sizes());
  TORCH_CHECK_VALUE(src.device() == device, what, ": src must be on ", device, " (the device the model was "
                    "exported for); got ", src.device());
  TORCH_CHECK_VALUE(src.size(0) <= info_.max_batch && src.size(1) <= info_.max_len, what, ": src shape ",
                    src.sizes(), " exceeds the export's limits (batch <= ", info_.max_batch, ", length <= ",
                    info_.max_len, ")");
  check_mask(what, "src_mask", src_mask, src.size(0), src.size(1), device);
  const int64_t lo = src.min().item<int64_t>(), hi = src.max().item<int64_t>();
  TORCH_CHECK_VALUE(lo >= 0 && hi < info_.vocab_size, what, ": src holds ids in [", lo, ", ", hi,
                    "], outside the vocabulary [0, ", info_.vocab_size, ")");
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> out = encoder_->run({src.contiguous(), src_mask.contiguous()});
  TORCH_CHECK(static_cast<int64_t>(out.size()) == 2 + 2 * info_.n_dec, what, ": encoder.pt2 returned ", out.size(),
              " tensors, expected ", 2 + 2 * info_.n_dec, " (memory, lengths, k/v per decoder layer)");
  return out;
}

void AOTISampler::check_state(const std::vector<at::Tensor>& state, const at::Tensor& src_mask,
                              int64_t batch) const {
  const char* what = "AOTISampler.denoise";
  TORCH_CHECK_VALUE(static_cast<int64_t>(state.size()) == 2 + 2 * info_.n_dec, what, ": state must be encode()'s ",
                    2 + 2 * info_.n_dec, " tensors (memory, lengths, k/v per decoder layer); got ",
                    state.size());
  const int64_t src_len = state[0].dim() == 3 ? state[0].size(1) : -1;
  TORCH_CHECK_VALUE(state[0].dim() == 3 && state[0].size(0) == batch, what, ": state[0] (memory) must have shape (",
                    batch, ", Ls, d_model) for x's batch ", batch, "; got ", state[0].sizes());
  for (size_t i = 2; i < state.size(); ++i)
    TORCH_CHECK_VALUE(state[i].dim() == 4 && state[i].size(0) == batch && state[i].size(2) == src_len, what,
                      ": state[", i, "] (cross-attention ", (i % 2 ? "V" : "K"), " of decoder layer ", (i - 2) / 2,
                      ") must have shape (", batch, ", H, ", src_len, ", d/H); got ", state[i].sizes());
  check_mask(what, "src_mask", src_mask, batch, src_len, embedding_.device());
}

std::vector<at::Tensor> AOTISampler::decoder_inputs(const std::vector<at::Tensor>& state,
                                                    const at::Tensor& src_mask) const {
  // [x_t, sc, t, tgt_mask, memory, src_mask, k_0, v_0, ...]; the graph was compiled for contiguous inputs.
  std::vector<at::Tensor> inputs(4);
  inputs.push_back(state[0].contiguous());
  inputs.push_back(src_mask.contiguous());
  for (size_t i = 2; i < state.size(); ++i) inputs.push_back(state[i].contiguous());
  return inputs;
}

std::tuple<at::Tensor, at::Tensor> AOTISampler::denoise(const std::vector<at::Tensor>& state,
                                                        const at::Tensor& src_mask, const at::Tensor& x,
                                                        const at::Tensor& tgt_mask, const at::Tensor& t_net,
                                                        const at::Tensor& alpha, const at::Tensor& sigma,
                                                        bool clamp) {
  const char* what = "AOTISampler.denoise";
  const at::Device device = embedding_.device();
  TORCH_CHECK_TYPE(x.scalar_type() == embedding_.scalar_type(), what, ": x must be ", embedding_.scalar_type(),
                   " (the exported model's dtype); got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 3 && x.size(0) >= 1 && x.size(1) >= 1 && x.size(2) == info_.d_latent, what,
                    ": x must have shape (B, L, d_latent=", info_.d_latent, ") with B, L >= 1; got ", x.sizes());
  TORCH_CHECK_VALUE(x.size(1) <= info_.max_len, what, ": target length ", x.size(1), " exceeds max_len ",
                    info_.max_len);
  TORCH_CHECK_VALUE(x.device() == device, what, ": x must be on ", device, "; got ", x.device());
  const int64_t B = x.size(0), L = x.size(1);
  check_state(state, src_mask, B);
  check_mask(what, "tgt_mask", tgt_mask, B, L, device);
  check_coefs(what, t_net, alpha, sigma);
  at::NoGradGuard no_grad;
  const int64_t K = t_net.size(0);

  // Everything the steps read is built once: per-token planes of the network time and of alpha / sigma
  // (row k is step k's (B, L) input), and the decoder's input list, whose first three slots change.
  const at::Tensor t_tok = t_net.to(device).view({K, 1, 1}).expand({K, B, L}).contiguous();
  const at::Tensor a_tok = alpha.to(device).view({K + 1, 1, 1}).expand({K + 1, B, L}).contiguous();
  const at::Tensor s_tok = sigma.to(device).view({K + 1, 1, 1}).expand({K + 1, B, L}).contiguous();
  std::vector<at::Tensor> inputs = decoder_inputs(state, src_mask);
  inputs[3] = tgt_mask.contiguous();

  at::Tensor x_k = x.contiguous();
  at::Tensor sc = at::zeros_like(x_k);  // no self-conditioning signal at the first step
  for (int64_t k = 0; k < K; ++k) {
    inputs[0] = x_k;
    inputs[1] = sc;
    inputs[2] = t_tok[k];
    const at::Tensor x0_hat = decoder_->run(inputs)[0];
    auto [x_next, x0_used] = ddim_step_clamp(x0_hat, x_k, a_tok[k], s_tok[k], a_tok[k + 1], s_tok[k + 1],
                                             embedding_, clamp);
    x_k = std::move(x_next);
    sc = std::move(x0_used);  // self-conditioning input of the next step: this step's (clamped) x0
  }
  return {x_k, sc};
}

std::tuple<at::Tensor, at::Tensor> AOTISampler::round(const at::Tensor& x0) {
  TORCH_CHECK_VALUE(x0.dim() >= 1 && x0.size(-1) == info_.d_latent, "AOTISampler.round: x0 must end in d_latent=",
                    info_.d_latent, "; got ", x0.sizes());
  at::NoGradGuard no_grad;
  const at::Tensor logits = at::matmul(x0, embedding_.to(x0.scalar_type()).t()).to(at::kFloat);
  auto [logp, ids] = at::max(at::log_softmax(logits, -1), -1);
  return {ids, logp};
}

Generation AOTISampler::generate(const at::Tensor& src, const at::Tensor& src_mask, const at::Tensor& lengths,
                                 const std::optional<at::Tensor>& noise, const StepTable& table, bool clamp,
                                 int64_t seed) {
  const char* what = "AOTISampler.generate";
  const at::Device device = embedding_.device();
  const int64_t B = src.dim() == 2 ? src.size(0) : -1;
  TORCH_CHECK_VALUE(lengths.dim() == 1 && lengths.size(0) == B, what, ": lengths must have shape (B,) = [", B,
                    "] (<= 0: predicted); got ", lengths.sizes());
  TORCH_CHECK_TYPE(lengths.scalar_type() == at::kLong, what, ": lengths must be int64; got ", lengths.scalar_type());
  std::vector<at::Tensor> state = encode(src, src_mask);
  at::NoGradGuard no_grad;
  at::Tensor lens = lengths.to(device);
  lens = at::where(lens > 0, lens, state[1]);  // state[1]: the encoder's predicted lengths
  const int64_t longest = lens.max().item<int64_t>();
  TORCH_CHECK_VALUE(longest <= info_.max_len, what, ": lengths must be <= max_len ", info_.max_len, "; got ",
                    longest);
  at::Tensor x;
  if (noise.has_value()) {
    const at::Tensor& n = *noise;
    TORCH_CHECK_VALUE(n.dim() == 3 && n.size(0) == B && n.size(1) >= longest && n.size(2) == info_.d_latent, what,
                      ": noise must have shape (B=", B, ", L >= ", longest, ", d_latent=", info_.d_latent, "); got ",
                      n.sizes());
    x = n.to(device, embedding_.scalar_type());
  } else {
    // noise_factor * randn from a CPU generator: the numbers torch.randn(B, L, d, generator=g) gives for
    // g = torch.Generator().manual_seed(seed), so a CPU export reproduces the Python sampler's draw.
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed));
    x = (at::randn({B, longest, info_.d_latent}, gen, at::TensorOptions().dtype(embedding_.scalar_type())) *
         info_.noise_factor)
            .to(device);
  }
  const int64_t L = x.size(1);
  const at::Tensor tgt_mask = at::arange(L, lens.options()).unsqueeze(0) >= lens.unsqueeze(1);
  auto [x_final, x0] = denoise(state, src_mask, x, tgt_mask, table.t_net, table.alpha, table.sigma, clamp);
  auto [ids, logp] = round(x0);
  ids.masked_fill_(tgt_mask, info_.pad_id);
  logp.masked_fill_(tgt_mask, 0.0);
  return {ids, lens, logp, x_final, x0};
}

const StepTable& AOTISampler::step_table(int64_t steps) const {
  auto it = info_.step_tables.find(steps);
  if (it == info_.step_tables.end()) {
    std::ostringstream have, want;
    for (const auto& [k, table] : info_.step_tables) {
      have << (have.tellp() > 0 ? ", " : "") << k;
      want << k << ",";
    }
    want << steps;
    TORCH_CHECK_VALUE(false, "the export in '", dir_, "' has step tables for K = ", have.str(), ", not K = ", steps,
                      "; re-export with `fastdiss export --ckpt CKPT --out ", dir_, " --steps-list ", want.str(),
                      "`");
  }
  return it->second;
}

std::vector<at::Tensor> AOTISampler::step_table_py(int64_t steps) const {
  const StepTable& t = step_table(steps);
  return {t.t_net, t.alpha, t.sigma};
}

std::vector<at::Tensor> AOTISampler::generate_py(const at::Tensor& src, const at::Tensor& src_mask,
                                                 const at::Tensor& lengths, const std::optional<at::Tensor>& noise,
                                                 int64_t steps, bool clamp, int64_t seed) {
  Generation g = generate(src, src_mask, lengths, noise, step_table(steps), clamp, seed);
  return {g.ids, g.lengths, g.token_logp, g.latents, g.x0};
}

double AOTISampler::time_decoder(const std::vector<at::Tensor>& state, const at::Tensor& src_mask,
                                 const at::Tensor& x, const at::Tensor& tgt_mask, int64_t iters) {
  TORCH_CHECK_VALUE(iters >= 1, "AOTISampler.time_decoder: iters must be >= 1; got ", iters);
  check_state(state, src_mask, x.size(0));
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> inputs = decoder_inputs(state, src_mask);
  inputs[0] = x.contiguous();
  inputs[1] = at::zeros_like(inputs[0]);
  inputs[2] = at::full({x.size(0), x.size(1)}, 0.5, x.options().dtype(at::kFloat));
  inputs[3] = tgt_mask.contiguous();
  const bool sync = !x.device().is_cpu();  // device work must finish inside the timed region
  auto call = [&] {
    at::Tensor out = decoder_->run(inputs)[0];
    if (sync) out.sum().item<double>();
  };
  call();
  call();
  std::vector<double> seconds;
  for (int64_t i = 0; i < iters; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    call();
    seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::nth_element(seconds.begin(), seconds.begin() + seconds.size() / 2, seconds.end());
  return seconds[seconds.size() / 2];
}

std::vector<std::string> AOTISampler::info_strings() const {
  std::ostringstream nf, ts, steps;
  nf.precision(17);
  ts.precision(17);
  nf << info_.noise_factor;
  ts << info_.time_shift;
  for (const auto& [k, table] : info_.step_tables) steps << (steps.tellp() > 0 ? "," : "") << k;
  return {"noise_factor=" + nf.str(), "d_latent=" + std::to_string(info_.d_latent),
          "max_len=" + std::to_string(info_.max_len), "vocab_size=" + std::to_string(info_.vocab_size),
          "pad_id=" + std::to_string(info_.pad_id), "n_dec=" + std::to_string(info_.n_dec),
          "max_batch=" + std::to_string(info_.max_batch), "default_steps=" + std::to_string(info_.default_steps),
          "default_clamp=" + std::to_string(info_.default_clamp ? 1 : 0), "spacing=" + info_.spacing,
          "time_shift=" + ts.str(), "steps_list=" + steps.str(), "device=" + info_.device};
}

}  // namespace fastdiss

// torch.classes.fastdiss.AOTISampler. A fragment, so the op schemas in csrc/ops.cpp stay in one place.
TORCH_LIBRARY_FRAGMENT(fastdiss, m) {
  m.class_<fastdiss::AOTISampler>("AOTISampler")
      .def(torch::init<std::string>())
      .def("encode", &fastdiss::AOTISampler::encode)
      .def("denoise", &fastdiss::AOTISampler::denoise)
      .def("round", &fastdiss::AOTISampler::round)
      .def("step_table", &fastdiss::AOTISampler::step_table_py)
      .def("generate", &fastdiss::AOTISampler::generate_py)
      .def("info", &fastdiss::AOTISampler::info_strings)
      .def("time_decoder", &fastdiss::AOTISampler::time_decoder);
}
