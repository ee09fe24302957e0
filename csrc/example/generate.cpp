// fastdiss_generate: source token ids in, generated token ids out, from a model exported with
// `fastdiss export --ckpt CKPT --out DIR`. No Python and no tokenizer: ids are plain integers, so a
// C++ service can embed the sampler and keep its own tokenizer.
//
//   fastdiss_generate DIR "12 7 99 4" "5 6"          # one sentence per argument (ids split by spaces or commas)
//   fastdiss_generate DIR --file sources.txt         # one sentence per line
//
// Options: --steps K (one of the step counts the export holds tables for; default: the export's sampling
//          config), --clamp, --seed N (initial noise), --length N (force the target length; default:
//          predicted by the exported encoder), --threads N. The time spacing and time shift are those
//          of the export's step tables (`fastdiss export --steps-list 1,2,4 --spacing S --time-shift F`).
// Output: one line per sentence, the generated ids separated by spaces. Exit status 2 on bad usage.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "ops.h"
#include "sampler/aoti_sampler.h"

namespace {

[[noreturn]] void usage(const std::string& error) {
  std::fprintf(stderr,
               "error: %s\n"
               "usage: fastdiss_generate EXPORT_DIR [--steps K] [--clamp] [--seed N] [--length N] [--threads N]\n"
               "                         (--file PATH | IDS...)\n"
               "  IDS: one sentence per argument, token ids separated by spaces or commas\n",
               error.c_str());
  std::exit(2);
}

// "12 7,99" -> {12, 7, 99}
std::vector<int64_t> parse_ids(const std::string& text, const std::string& where) {
  std::string s = text;
  for (char& c : s)
    if (c == ',') c = ' ';
  std::istringstream in(s);
  std::vector<int64_t> ids;
  std::string tok;
  while (in >> tok) {
    size_t used = 0;
    long long v = 0;
    try {
      v = std::stoll(tok, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != tok.size() || v < 0) usage(where + ": '" + tok + "' is not a non-negative integer token id");
    ids.push_back(static_cast<int64_t>(v));
  }
  return ids;
}

int64_t parse_int(const std::string& flag, const char* value) {
  try {
    size_t used = 0;
    const long long v = std::stoll(value, &used);
    if (used == std::string(value).size()) return static_cast<int64_t>(v);
  } catch (const std::exception&) {
  }
  usage(flag + " expects an integer, got '" + value + "'");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) usage("missing EXPORT_DIR");
  const std::string dir = argv[1];
  int64_t steps = -1, seed = 0, length = -1, threads = 0;
  std::string file;
  bool clamp = false, clamp_given = false;
  std::vector<std::vector<int64_t>> sentences;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> const char* {
      if (i + 1 >= argc) usage(a + " needs a value");
      return argv[++i];
    };
    if (a == "--steps") steps = parse_int(a, value());
    else if (a == "--seed") seed = parse_int(a, value());
    else if (a == "--length") length = parse_int(a, value());
    else if (a == "--threads") threads = parse_int(a, value());
    else if (a == "--file") file = value();
    else if (a == "--clamp") clamp = clamp_given = true;
    else if (a == "--spacing" || a == "--time-shift")
      usage(a + " is fixed when the model is exported (the step tables are made for it): re-export with "
            "`fastdiss export --ckpt CKPT --out DIR " + a + " ...`");
    else if (a.rfind("--", 0) == 0) usage("unknown option " + a);
    else sentences.push_back(parse_ids(a, "argument " + std::to_string(i)));
  }
  if (!file.empty()) {
    std::ifstream in(file);
    if (!in) usage("cannot read " + file);
    std::string line;
    for (int n = 1; std::getline(in, line); ++n)
      if (line.find_first_not_of(" \t\r,") != std::string::npos)
        sentences.push_back(parse_ids(line, file + ":" + std::to_string(n)));
  }
  if (sentences.empty()) usage("no source sentences (give ids as arguments or --file PATH)");
  for (const auto& s : sentences)
    if (s.empty()) usage("a source sentence has no ids");
  if (threads > 0) at::set_num_threads(static_cast<int>(threads));

  try {
    fastdiss::AOTISampler sampler(dir);
    const fastdiss::ExportInfo& info = sampler.info();
    if (steps < 0) steps = info.default_steps;
    if (!clamp_given) clamp = info.default_clamp;
    const fastdiss::StepTable& table = sampler.step_table(steps);
    std::fprintf(stderr, "fastdiss_generate: %zu sentence(s), %lld steps, %s spacing, time shift %g%s, ops %s\n",
                 sentences.size(), static_cast<long long>(steps), info.spacing.c_str(), info.time_shift,
                 clamp ? ", clamp" : "", fastdiss::build_info().c_str());

    // Padded batch: pad_id beyond each sentence, src_mask true there.
    const int64_t B = static_cast<int64_t>(sentences.size());
    int64_t Ls = 0;
    for (const auto& s : sentences) Ls = std::max<int64_t>(Ls, static_cast<int64_t>(s.size()));
    at::Tensor src = at::full({B, Ls}, info.pad_id, at::kLong);
    at::Tensor src_mask = at::ones({B, Ls}, at::kBool);
    for (int64_t b = 0; b < B; ++b)
      for (size_t j = 0; j < sentences[b].size(); ++j) {
        src[b][static_cast<int64_t>(j)] = sentences[b][j];
        src_mask[b][static_cast<int64_t>(j)] = false;
      }
    const at::Device device(info.device);
    const at::Tensor lengths = at::full({B}, length > 0 ? length : -1, at::kLong);
    const fastdiss::Generation out = sampler.generate(src.to(device), src_mask.to(device), lengths.to(device),
                                                      std::nullopt, table, clamp, seed);
    const at::Tensor ids = out.ids.cpu(), lens = out.lengths.cpu();
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = lens[b].item<int64_t>();
      const int64_t* row = ids[b].data_ptr<int64_t>();
      for (int64_t j = 0; j < n; ++j) std::printf(j ? " %lld" : "%lld", static_cast<long long>(row[j]));
      std::printf("\n");
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fastdiss_generate: %s\n", e.what());
    return 1;
  }
  return 0;
}
