// kscope: interpretability engine for DeepSeek-V3 / Kimi-K2 checkpoints. `kscope --help` lists the commands.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "model/info.hpp"
#include "model/make_model.hpp"
#include "model/model.hpp"
#include "runtime/generate.hpp"
#include "util/error.hpp"
#ifdef KSCOPE_HAVE_CUDA
#include "backend/cuda/device.hpp"
#endif

using namespace kscope;
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

// A one-line progress bar on stderr (only when stderr is a terminal, or KSCOPE_PROGRESS=1).
struct Progress {
  std::string label;
  bool on = isatty(2) || std::getenv("KSCOPE_PROGRESS");
  std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
  void update(double frac, const std::string& extra = "") {
    if (!on) return;
    const int w = 30, k = static_cast<int>(frac * w);
    std::cerr << "\r" << label << " [" << std::string(k, '#') << std::string(w - k, '.') << "] "
              << fmt::format("{:5.1f}% {}", 100 * frac, extra) << std::flush;
  }
  void done() {
    if (on) std::cerr << "\n";
  }
};

std::vector<int32_t> parse_ids(const std::string& s, const std::string& where) {
  std::vector<int32_t> v;
  std::stringstream ss(s);
  std::string tok;
  while (std::getline(ss, tok, ',')) {
    if (tok.empty()) continue;
    try {
      size_t pos = 0;
      const long long x = std::stoll(tok, &pos);
      if (pos != tok.size() || x < 0 || x > INT32_MAX) throw std::invalid_argument("");
      v.push_back(static_cast<int32_t>(x));
    } catch (const std::exception&) {
      fail(ErrorKind::input, where, "'{}' is not a token id (expected comma-separated non-negative integers)", tok);
    }
  }
  if (v.empty()) fail(ErrorKind::input, where, "no token ids");
  return v;
}

int cmd_info(const std::string& path, int gpus, int64_t context, int64_t batch, bool as_json) {
  const auto t0 = std::chrono::steady_clock::now();
  const ModelConfig cfg = load_config(path);
  const ModelWeights w = ModelWeights::load(cfg, path);
  const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const ModelInfo mi = model_info(cfg, w);
  const MemoryPlan plan = plan_memory(cfg, mi, gpus, context, batch);
  if (as_json) {
    std::cout << info_json(cfg, mi, plan).dump(2) << "\n";
    return 0;
  }
  fmt::print("{}  ({} {}, identity {})\n", path, cfg.model_type,
             cfg.quant.method == QuantMethod::none ? "unquantized"
             : cfg.quant.method == QuantMethod::fp8_block ? "fp8 block-quantized" : "int4 pack-quantized",
             cfg.identity_hash());
  fmt::print("  layers {} ({} dense, {} MoE)  hidden {}  vocab {}  heads {}  max positions {}\n", cfg.num_hidden_layers,
             cfg.first_k_dense_replace, cfg.num_hidden_layers - cfg.first_k_dense_replace, cfg.hidden_size,
             cfg.vocab_size, cfg.num_attention_heads, cfg.max_position_embeddings);
  fmt::print("  MLA: q_lora {}  kv_lora {}  qk nope/rope {}/{}  v {}  rope {} theta {} factor {}{}\n",
             cfg.q_lora_rank ? std::to_string(*cfg.q_lora_rank) : "none", cfg.kv_lora_rank, cfg.qk_nope_head_dim,
             cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.rope.type, cfg.rope.theta, cfg.rope.factor,
             cfg.rope.interleave ? " (interleaved)" : "");
  if (cfg.n_routed_experts)
    fmt::print("  MoE: {} routed experts top-{} ({}), {} shared, intermediate {}, {} scores, scale {}\n",
               cfg.n_routed_experts, cfg.num_experts_per_tok,
               cfg.n_group > 1 ? fmt::format("{} groups, best {} kept", cfg.n_group, cfg.topk_group) : std::string("ungrouped"),
               cfg.n_shared_experts,
               cfg.moe_intermediate_size, cfg.scoring_func == ScoringFunc::sigmoid ? "sigmoid" : "softmax",
               cfg.routed_scaling_factor);
  fmt::print("\n  {:<16} {:>12} {:>12}\n", "parameters", "count", "bytes");
  for (auto& [k, v] : mi.params_by_kind) fmt::print("  {:<16} {:>12} {:>12}\n", k, human_count(v), human_bytes(mi.bytes_by_kind.at(k)));
  fmt::print("  {:<16} {:>12} {:>12}\n", "total", human_count(mi.total_params), human_bytes(mi.total_bytes));
  fmt::print("  active per token: {}\n\n  {:<16} {:>12}\n", human_count(mi.active_params_per_token), "format", "bytes");
  for (auto& [k, v] : mi.bytes_by_format) fmt::print("  {:<16} {:>12}\n", k, human_bytes(v));
  if (!w.ignored.empty()) fmt::print("  ({} MTP tensors present and not run)\n", w.ignored.size());
  fmt::print("\n  memory on {} GPU(s) for batch {} x context {}: weights {} + KV cache {} ({} per token) + workspace {} = {} per GPU\n",
             plan.gpus, plan.batch, plan.context, human_bytes(plan.weights_per_gpu), human_bytes(plan.kv_per_gpu),
             human_bytes(mi.kv_bytes_per_token), human_bytes(plan.workspace_per_gpu), human_bytes(plan.total_per_gpu));
#ifdef KSCOPE_HAVE_CUDA
  for (const auto& d : cuda_devices())
    fmt::print("  GPU {}: {} ({} free of {}){}\n", d.index, d.name, human_bytes(d.free_bytes), human_bytes(d.total_bytes),
               d.free_bytes >= plan.total_per_gpu ? "" : "  -- too small for this plan");
#endif
  fmt::print("  opened and validated in {:.2f} s\n", load_s);
  return 0;
}

int cmd_make_model(const std::string& out, MakeModelSpec spec, const std::string& format, bool force) {
  spec.format = parse_stored_format(format);
  if (fs::exists(out) && !fs::is_empty(out)) {
    if (!force) fail(ErrorKind::input, out, "directory is not empty (use --force to replace its checkpoint)");
    for (auto& e : fs::directory_iterator(out)) {
      const auto n = e.path().filename().string();
      if (n == "config.json" || n.rfind("model", 0) == 0) fs::remove(e.path());
    }
  }
  Progress bar{"writing"};
  make_model(out, spec, [&](uint64_t done, uint64_t total) {
    bar.update(static_cast<double>(done) / total, human_bytes(done));
  });
  bar.done();
  const ModelConfig cfg = load_config(out);
  const ModelWeights w = ModelWeights::load(cfg, out);  // what we wrote must load
  const ModelInfo mi = model_info(cfg, w);
  fmt::print("wrote {} ({} preset, {}, seed {}): {} parameters, {}\n", out, spec.preset, format, spec.seed,
             human_count(mi.total_params), human_bytes(mi.total_bytes));
  return 0;
}

struct GenArgs {
  std::vector<std::string> ids;
  std::string prompts_file;
  int64_t max_new_tokens = 32;
  double temperature = 0, top_p = 1;
  int64_t top_k = 0;
  uint64_t seed = 0;
  std::vector<int32_t> stop;
  bool ignore_eos = false;
};

int cmd_generate(const std::string& path, const GenArgs& a) {
  std::vector<GenerateRequest> reqs;
  auto add = [&](std::vector<int32_t> prompt, const json* j) {
    GenerateRequest r;
    r.prompt = std::move(prompt);
    r.max_new_tokens = a.max_new_tokens;
    r.sampling = {a.temperature, a.top_k, a.top_p, a.seed + reqs.size()};
    r.stop_tokens = a.stop;
    r.ignore_eos = a.ignore_eos;
    if (j) {  // per-line overrides
      const std::string where = fmt::format("{}: line {}", a.prompts_file, reqs.size() + 1);
      auto num = [&](const char* k, auto& dst) {
        if (j->contains(k)) {
          if (!(*j)[k].is_number()) fail(ErrorKind::input, where, "field '{}' must be a number", k);
          dst = (*j)[k].get<std::decay_t<decltype(dst)>>();
        }
      };
      num("max_new_tokens", r.max_new_tokens);
      num("temperature", r.sampling.temperature);
      num("top_p", r.sampling.top_p);
      num("top_k", r.sampling.top_k);
      num("seed", r.sampling.seed);
      if (j->contains("stop")) {
        if (!(*j)["stop"].is_array()) fail(ErrorKind::input, where, "field 'stop' must be a list of token ids");
        for (auto& s : (*j)["stop"]) {
          if (!s.is_number_integer()) fail(ErrorKind::input, where, "field 'stop' must be a list of token ids");
          r.stop_tokens.push_back(s.get<int32_t>());
        }
      }
    }
    reqs.push_back(std::move(r));
  };
  for (auto& s : a.ids) add(parse_ids(s, "--ids"), nullptr);
  if (!a.prompts_file.empty()) {
    std::ifstream f(a.prompts_file);
    if (!f) fail(ErrorKind::io, a.prompts_file, "cannot open");
    std::string line;
    int ln = 0;
    while (std::getline(f, line)) {
      ++ln;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      const std::string where = fmt::format("{}: line {}", a.prompts_file, ln);
      json j;
      try {
        j = json::parse(line);
      } catch (const json::exception& e) {
        fail(ErrorKind::input, where, "not valid JSON: {}", e.what());
      }
      if (!j.is_object() || !j.contains("ids") || !j["ids"].is_array() || j["ids"].empty())
        fail(ErrorKind::input, where, "expected an object with a non-empty 'ids' list");
      std::vector<int32_t> ids;
      for (auto& x : j["ids"]) {
        if (!x.is_number_integer() || x.get<int64_t>() < 0 || x.get<int64_t>() > INT32_MAX)
          fail(ErrorKind::input, where, "field 'ids' must hold non-negative integers");
        ids.push_back(x.get<int32_t>());
      }
      add(std::move(ids), &j);
    }
  }
  if (reqs.empty()) fail(ErrorKind::input, "generate", "no prompts: give --ids or --prompts");
  const auto t0 = std::chrono::steady_clock::now();
  auto model = Model::load(path);
  const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  Progress bar{"generating"};
  int64_t max_steps = 0;
  for (auto& r : reqs) max_steps = std::max(max_steps, r.max_new_tokens);
  const auto t1 = std::chrono::steady_clock::now();
  GenerateOptions opts;
  opts.on_step = [&](int64_t step, int64_t active) {
    bar.update(std::min(1.0, static_cast<double>(step + 1) / std::max<int64_t>(1, max_steps)),
               fmt::format("{} active", active));
  };
  const auto res = generate(*model, reqs, opts);
  bar.done();
  const double gen_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
  int64_t n_tok = 0;
  for (size_t i = 0; i < res.size(); ++i) {
    json j = {{"index", i}, {"prompt", reqs[i].prompt}, {"tokens", res[i].tokens}, {"logprobs", res[i].logprobs},
              {"finish_reason", finish_reason_name(res[i].finish)}};
    if (res[i].stop_token >= 0) j["stop_token"] = res[i].stop_token;
    std::cout << j.dump() << "\n";
    n_tok += res[i].tokens.size() + (res[i].stop_token >= 0);
  }
  std::cout.flush();
  std::cerr << fmt::format("{} sequences, {} new tokens in {:.2f} s ({:.1f} tok/s); model opened in {:.2f} s\n",
                           res.size(), n_tok, gen_s, n_tok / std::max(gen_s, 1e-9), load_s);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "kscope: load DeepSeek-V3 / Kimi-K2 checkpoints as they ship (BF16, FP8 block, INT4 pack-quantized),\n"
      "run them exactly, and generate in ragged batches.\n\n"
      "Start here:\n"
      "  kscope make-model out/tiny --preset tiny          # a small random checkpoint in the real format\n"
      "  kscope info out/tiny                              # what it holds, memory it needs\n"
      "  kscope generate out/tiny --ids 1,17,33 --max-new-tokens 8"};
  app.require_subcommand(1);

  std::string path;
  int gpus = 1;
  int64_t context = 4096, batch = 1;
  bool as_json = false;
  auto* info = app.add_subcommand("info", "Summarize a checkpoint: config, parameters by kind, bytes by format, memory plan");
  info->add_option("MODEL", path, "checkpoint directory (config.json + safetensors)")->required();
  info->add_option("--gpus", gpus, "plan memory for this many GPUs")->capture_default_str()->check(CLI::PositiveNumber);
  info->add_option("--context", context, "tokens of context per sequence for the KV plan")->capture_default_str()->check(CLI::PositiveNumber);
  info->add_option("--batch", batch, "sequences in flight for the KV plan")->capture_default_str()->check(CLI::PositiveNumber);
  info->add_flag("--json", as_json, "print JSON instead of a table");
  info->footer("Example: kscope info /models/Kimi-K2-Instruct --gpus 8 --context 32768 --batch 64");

  MakeModelSpec spec;
  std::string out, format = "bf16";
  bool force = false;
  auto* mk = app.add_subcommand("make-model", "Write a random-weight checkpoint of a chosen shape, format and seed");
  mk->add_option("OUT", out, "output directory")->required();
  mk->add_option("--preset", spec.preset,
                 "tiny (Kimi-shaped, 4 layers) | dsv3-tiny (DeepSeek-shaped, grouped routing, no q_lora) | mid (CPU "
                 "benchmark size) | kimi-k2-slice (true K2 dimensions, 1 dense + MoE layers) | dsv3-slice")
      ->capture_default_str();
  mk->add_option("--format", format, "bf16 | fp8 (DeepSeek-V3 128x128 blocks) | int4 (compressed-tensors, routed experts)")
      ->capture_default_str();
  mk->add_option("--seed", spec.seed, "random seed (same seed, same weights)")->capture_default_str();
  mk->add_option("--layers", spec.layers, "override the number of layers");
  mk->add_option("--experts", spec.experts, "override the number of routed experts");
  mk->add_option("--vocab", spec.vocab, "override the vocabulary size");
  mk->add_option("--shard-size", spec.shard_bytes, "bytes per safetensors shard")->capture_default_str();
  mk->add_flag("--force", force, "replace a checkpoint already in OUT");
  mk->footer("Example: kscope make-model out/k2-slice --preset kimi-k2-slice --layers 3 --format int4");

  GenArgs ga;
  auto* gen = app.add_subcommand("generate", "Generate from token-id prompts in one ragged batch (JSON lines out)");
  gen->add_option("MODEL", path, "checkpoint directory")->required();
  gen->add_option("--ids", ga.ids, "a prompt as comma-separated token ids; repeat for a batch");
  gen->add_option("--prompts", ga.prompts_file,
                  "JSONL file, one prompt a line: {\"ids\": [...], optional max_new_tokens, temperature, top_k, top_p, seed, stop}");
  gen->add_option("--max-new-tokens", ga.max_new_tokens, "tokens to generate per sequence")->capture_default_str();
  gen->add_option("--temperature", ga.temperature, "0 = greedy")->capture_default_str();
  gen->add_option("--top-k", ga.top_k, "keep the k most likely tokens (0 = off)")->capture_default_str();
  gen->add_option("--top-p", ga.top_p, "nucleus: keep the smallest set with this mass (1 = off)")->capture_default_str();
  gen->add_option("--seed", ga.seed, "sampling seed; sequence i uses seed + i")->capture_default_str();
  gen->add_option("--stop", ga.stop, "extra stop token id (repeatable); the config's eos ids always stop");
  gen->add_flag("--ignore-eos", ga.ignore_eos, "do not stop at the config's eos ids");
  gen->footer(
      "Each output line: {index, prompt, tokens, logprobs, finish_reason (stop|length|context), stop_token?}.\n"
      "Sequences of different lengths share every forward pass with no padding: a sequence's tokens are the\n"
      "same alone or batched. Example: kscope generate out/tiny --ids 1,2,3 --ids 5,6 --temperature 0.8 --seed 7");

  try {
    app.parse(argc, argv);
    if (*info) return cmd_info(path, gpus, context, batch, as_json);
    if (*mk) return cmd_make_model(out, spec, format, force);
    if (*gen) return cmd_generate(path, ga);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
