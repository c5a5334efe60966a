// kscope: interpretability engine for DeepSeek-V3 / Kimi-K2 checkpoints. `kscope --help` lists the commands.
#include <CLI/CLI.hpp>
#include <chrono>
#include <filesystem>
#include <iostream>

#include "cli.hpp"
#include "commands.hpp"
#include "model/info.hpp"
#include "model/make_model.hpp"
#include "tokenizer/kimi.hpp"
#include "util/error.hpp"
#ifdef KSCOPE_HAVE_CUDA
#include "backend/cuda/device.hpp"
#endif

using namespace kscope;
using namespace kscope::cli;
namespace fs = std::filesystem;

namespace {

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
               cfg.n_shared_experts, cfg.moe_intermediate_size, cfg.scoring_func == ScoringFunc::sigmoid ? "sigmoid" : "softmax",
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
      if (n == "config.json" || n.rfind("model", 0) == 0 || n.rfind("tokenizer", 0) == 0 || n == "tiktoken.model")
        fs::remove(e.path());
    }
  }
  Progress bar{"writing"};
  make_model(out, spec, [&](uint64_t done, uint64_t total) { bar.update(static_cast<double>(done) / total, human_bytes(done)); });
  bar.done();
  const ModelConfig cfg = load_config(out);
  const ModelWeights w = ModelWeights::load(cfg, out);  // what we wrote must load
  const ModelInfo mi = model_info(cfg, w);
  fmt::print("wrote {} ({} preset, {}, seed {}): {} parameters, {}\n", out, spec.preset, format, spec.seed,
             human_count(mi.total_params), human_bytes(mi.total_bytes));
  return 0;
}

struct TokArgs {
  std::string text, file, chat, chat_format;
  bool parse_special = false, pieces = false, no_gen_prompt = false;
};

int cmd_tokenize(const std::string& dir, const TokArgs& a) {
  auto tok = Tokenizer::load(dir);
  json out;
  std::vector<int32_t> ids;
  if (!a.chat.empty()) {
    const ChatFormat f = a.chat_format.empty() ? default_chat_format(*tok, dir) : parse_chat_format(a.chat_format);
    const auto r = render_chat_json(*tok, f, read_json_file(a.chat), !a.no_gen_prompt, a.chat);
    ids = r.ids;
    out["chat_format"] = chat_format_name(f);
    out["turns"] = turns_json(r.turns);
  } else {
    const std::string text = !a.file.empty() ? read_text_file(a.file) : a.text;
    ids = tok->encode(text, a.parse_special);
    if (a.pieces) out["pieces"] = tok->pretokenize_text(text);
  }
  json toks = json::array();
  for (int32_t id : ids) toks.push_back(tok->token_display(id));
  out["ids"] = ids;
  out["tokens"] = toks;
  out["count"] = ids.size();
  std::cout << out.dump(2) << "\n";
  return 0;
}

int cmd_detokenize(const std::string& dir, const std::vector<std::string>& id_lists, bool per_token) {
  auto tok = Tokenizer::load(dir);
  for (const auto& s : id_lists) {
    const auto ids = parse_ids(s, "--ids");
    if (per_token) {
      json toks = json::array();
      for (int32_t id : ids) toks.push_back({{"id", id}, {"token", tok->token_display(id)}, {"special", tok->is_special(id)}});
      std::cout << json({{"text", tok->decode(ids)}, {"tokens", toks}}).dump() << "\n";
    } else {
      std::cout << tok->decode(ids) << "\n";
    }
  }
  return 0;
}

struct GenArgs {
  std::vector<std::string> ids, prompts, steer;
  std::string prompts_file, chat, chat_format, norms;
  bool stream = false, ignore_eos = false;
  int64_t max_new_tokens = 32, top_k = 0;
  double temperature = 0, top_p = 1;
  uint64_t seed = 0;
  std::vector<int32_t> stop;
};

int cmd_generate(const std::string& path, const GenArgs& a) {
  const ModelConfig cfg0 = load_config(path);
  TextIO io(path, cfg0.vocab_size, a.chat_format);
  const auto prompts = load_prompts(io, a.prompts, a.chat, a.ids, a.prompts_file);
  if (prompts.empty()) fail(ErrorKind::input, "generate", "no prompts: give --prompt, --chat, --ids or --prompts");
  if (a.stream && prompts.size() != 1) fail(ErrorKind::input, "--stream", "streams one prompt; {} were given", prompts.size());
  if (a.stream) io.need("--stream");
  std::vector<GenerateRequest> reqs;
  for (size_t i = 0; i < prompts.size(); ++i) {
    GenerateRequest r;
    r.prompt = prompts[i].prompt;
    r.max_new_tokens = a.max_new_tokens;
    r.sampling = {a.temperature, a.top_k, a.top_p, a.seed + i};
    r.stop_tokens = a.stop;
    r.ignore_eos = a.ignore_eos;
    const json& j = prompts[i].line;
    auto num = [&](const char* k, auto& dst) {
      if (!j.contains(k)) return;
      if (!j[k].is_number()) fail(ErrorKind::input, prompts[i].where, "field '{}' must be a number", k);
      dst = j[k].get<std::decay_t<decltype(dst)>>();
    };
    num("max_new_tokens", r.max_new_tokens);
    num("temperature", r.sampling.temperature);
    num("top_p", r.sampling.top_p);
    num("top_k", r.sampling.top_k);
    num("seed", r.sampling.seed);
    if (j.contains("stop")) {
      if (!j["stop"].is_array()) fail(ErrorKind::input, prompts[i].where, "field 'stop' must be a list of token ids");
      for (auto& s : j["stop"]) {
        if (!s.is_number_integer()) fail(ErrorKind::input, prompts[i].where, "field 'stop' must be a list of token ids");
        r.stop_tokens.push_back(s.get<int32_t>());
      }
    }
    reqs.push_back(std::move(r));
  }
  const auto t0 = std::chrono::steady_clock::now();
  auto model = cli::load_model(path);
  const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // per-row interventions: --steer/--ablate/--clamp for every row, plus each JSONL line's own
  VectorCache vc(model->config());
  load_norms(vc, a.norms);
  auto ivs = load_interventions(prompts, a.steer, model->config(), vc);
  std::vector<SeqLayout> layouts;
  bool any = false;
  for (size_t i = 0; i < prompts.size(); ++i) {
    layouts.push_back({static_cast<int64_t>(prompts[i].prompt.size()), -1, prompts[i].turns});
    any |= !ivs[i].empty();
  }
  SteeringHook steer(std::move(ivs), layouts);
  steer.validate(model->config());

  Progress bar{"generating"};
  int64_t max_steps = 0;
  for (auto& r : reqs) max_steps = std::max(max_steps, r.max_new_tokens);
  GenerateOptions opts;
  if (any) opts.observer = &steer;
  std::unique_ptr<StreamDecoder> sd;
  if (a.stream) {
    sd = std::make_unique<StreamDecoder>(*io.tok);
    bar.on = false;
    opts.on_token = [&](int64_t, int32_t t) { std::cout << sd->push(t) << std::flush; };
  }
  opts.on_step = [&](int64_t step, int64_t active) {
    bar.update(static_cast<double>(step + 1) / std::max<int64_t>(1, max_steps), fmt::format("{} active", active));
  };
  const auto t1 = std::chrono::steady_clock::now();
  const auto res = generate(*model, reqs, opts);
  bar.done();
  if (sd) std::cout << sd->finish() << "\n";
  const double gen_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
  int64_t n_tok = 0;
  for (size_t i = 0; i < res.size(); ++i) {
    json j = {{"index", i}, {"prompt", reqs[i].prompt}, {"tokens", res[i].tokens}, {"logprobs", res[i].logprobs},
              {"finish_reason", finish_reason_name(res[i].finish)}};
    if (res[i].stop_token >= 0) j["stop_token"] = res[i].stop_token;
    if (io.tok) j["text"] = io.tok->decode(res[i].tokens);
    if (!a.stream) std::cout << j.dump() << "\n";
    n_tok += res[i].tokens.size() + (res[i].stop_token >= 0);
  }
  std::cout.flush();
  std::cerr << fmt::format("{} sequences, {} new tokens in {:.2f} s ({:.1f} tok/s); model opened in {:.2f} s\n", res.size(),
                           n_tok, gen_s, n_tok / std::max(gen_s, 1e-9), load_s);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "kscope: load DeepSeek-V3 / Kimi-K2 checkpoints as they ship (BF16, FP8 block, INT4 pack-quantized), run them\n"
      "exactly, generate in ragged batches, and read and write the residual stream while doing it.\n\n"
      "Start here:\n"
      "  kscope make-model out/tiny --preset tiny          # a small random checkpoint in the real format\n"
      "  kscope info out/tiny                              # what it holds, memory it needs\n"
      "  kscope generate out/tiny --ids 1,17,33 --max-new-tokens 8\n"
      "  kscope tokenize out/demo --text \"Hello\"                # with a tokenizer (make-model --tokenizer DIR)\n"
      "  kscope generate out/demo --prompt \"Once upon\" --steer v.safetensors@2.resid_post*4:response\n"
      "  kscope capture out/demo --prompts p.jsonl --sites '*.resid_post' --positions response --generate 32 --out acts/\n"
      "The trait pipeline (docs/traits.md), on the embedded demo model:\n"
      "  kscope extract models/demo --trait french --out exp      # responses, vetting, activations, vectors\n"
      "  kscope steer-eval models/demo --trait french --out exp --method mean_diff --sites all\n"
      "  kscope project models/demo --vectors exp/french/vectors/mean_diff.safetensors --rollouts examples/french/rollouts.jsonl --out exp/project"};
  app.require_subcommand(1);
  app.add_option("--device", cli::g_device,
                 "where commands that run the model compute: cpu (fp32 reference) | cuda | cuda:N (BF16 activations, "
                 "weights as stored; KSCOPE_DEVICE sets the default) | cpu-staged (the CPU's ops behind the GPU's hook path, "
                 "for testing)")
      ->capture_default_str();
  app.add_option("--max-pass-tokens", cli::g_max_pass_tokens,
                 "most new tokens one forward pass carries; longer prompts and larger batches run as several passes "
                 "with the same results (bounds the activation workspace). 0: the GPU's memory plan decides (printed "
                 "on load), no limit on the CPU")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);

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
  mk->add_option("--tokenizer", spec.tokenizer_dir, "copy this tokenizer into the checkpoint; the vocabulary and bos/eos/pad ids follow it");
  mk->footer("Example: kscope make-model out/k2-slice --preset kimi-k2-slice --layers 3 --format int4");

  TokArgs ta;
  auto* tokc = app.add_subcommand("tokenize", "Text or a chat to token ids and token strings (JSON out)");
  tokc->add_option("DIR", path, "checkpoint or tokenizer directory (tokenizer.json, or tiktoken.model + tokenizer_config.json)")->required();
  tokc->add_option("--text", ta.text, "text to encode");
  tokc->add_option("--file", ta.file, "encode this file's contents");
  tokc->add_option("--chat", ta.chat, "render a chat (JSON: list of messages, or {messages, tools}) and encode it");
  tokc->add_option("--chat-format", ta.chat_format, "kimi-k2 | kimi-k2-thinking | deepseek-v3 (default: from the tokenizer)");
  tokc->add_flag("--no-generation-prompt", ta.no_gen_prompt, "do not end the chat with the assistant's opening");
  tokc->add_flag("--parse-special", ta.parse_special, "text spelling a special token becomes that token (off: it stays text)");
  tokc->add_flag("--pieces", ta.pieces, "also print the pre-tokenizer's pieces");
  tokc->footer("Examples:\n  kscope tokenize out/demo --text \"Hello, world\" --pieces\n"
               "  kscope tokenize out/demo --chat chat.json     # ids + turn boundaries (role, token spans, thinking span)");

  std::vector<std::string> detok_ids;
  bool per_token = false;
  auto* detok = app.add_subcommand("detokenize", "Token ids to text");
  detok->add_option("DIR", path, "checkpoint or tokenizer directory")->required();
  detok->add_option("--ids", detok_ids, "comma-separated ids; repeat for several lines")->required();
  detok->add_flag("--tokens", per_token, "JSON with each token's string and whether it is special");

  std::string qin, qformat;
  auto* quant = app.add_subcommand("quantize", "Convert an unquantized checkpoint to DeepSeek-V3 FP8 or compressed-tensors INT4");
  quant->add_option("MODEL", qin, "unquantized checkpoint (BF16/F16/F32)")->required();
  quant->add_option("OUT", out, "output directory")->required();
  quant->add_option("--format", qformat, "fp8 (every decoder projection, 128x128 blocks) | int4 (routed experts, groups of 32)")->required();
  quant->footer("Writes exactly the formats the loader reads (and the hub ships): e4m3 weight + fp32 weight_scale_inv per\n"
                "block; weight_packed/weight_scale/weight_shape with Kimi-K2-Thinking's ignore list. Tokenizer files are copied.\n"
                "Example: kscope quantize models/demo out/demo-int4 --format int4");

  std::string ranks;
  auto* mktok = app.add_subcommand("make-tokenizer", "Write a Kimi-K2-format tokenizer (tiktoken.model + tokenizer_config.json)");
  mktok->add_option("OUT", out, "output directory")->required();
  mktok->add_option("--ranks", ranks, "tiktoken ranks: a .tiktoken file or tiktoken's npm encoder JSON (e.g. o200k_base.json)")->required();
  mktok->footer("Kimi's own tiktoken.model is not public; this builds one with Kimi's pattern and special-token layout over\n"
                "other ranks. Example: kscope make-tokenizer out/kimi-tok --ranks node_modules/tiktoken/encoders/o200k_base.json");

  GenArgs ga;
  auto* gen = app.add_subcommand("generate", "Generate from text, chats or token ids in one ragged batch, steered per row (JSON lines out)");
  gen->add_option("MODEL", path, "checkpoint directory")->required();
  gen->add_option("--prompt", ga.prompts, "a text prompt; repeat for a batch (needs the checkpoint's tokenizer)");
  gen->add_option("--chat", ga.chat, "a chat JSON file: one conversation (messages or {messages, tools}) or a list of them");
  gen->add_option("--chat-format", ga.chat_format, "kimi-k2 | kimi-k2-thinking | deepseek-v3 (default: from the tokenizer)");
  gen->add_option("--ids", ga.ids, "a prompt as comma-separated token ids; repeat for a batch");
  gen->add_option("--prompts", ga.prompts_file,
                  "JSONL, one prompt a line: {\"ids\"|\"text\"|\"messages\": ..., optional max_new_tokens, temperature, "
                  "top_k, top_p, seed, stop, interventions: [{vector, site, op, coef, relative, positions}]}");
  gen->add_option("--steer", ga.steer,
                  "intervention on every row (repeatable): FILE@SITE*COEF[:POSITIONS] adds COEF*v (COEF ending in n: units "
                  "of the site's mean norm); FILE@SITE!ablate[:POSITIONS]; FILE@SITE=VALUE[:POSITIONS] clamps the projection");
  gen->add_option("--norms", ga.norms, "mean norms per site from kscope calibrate (for relative coefficients)");
  gen->add_flag("--stream", ga.stream, "print one prompt's text as it is generated");
  gen->add_option("--max-new-tokens", ga.max_new_tokens, "tokens to generate per sequence")->capture_default_str();
  gen->add_option("--temperature", ga.temperature, "0 = greedy")->capture_default_str();
  gen->add_option("--top-k", ga.top_k, "keep the k most likely tokens (0 = off)")->capture_default_str();
  gen->add_option("--top-p", ga.top_p, "nucleus: keep the smallest set with this mass (1 = off)")->capture_default_str();
  gen->add_option("--seed", ga.seed, "sampling seed; sequence i uses seed + i")->capture_default_str();
  gen->add_option("--stop", ga.stop, "extra stop token id (repeatable); the config's eos ids always stop");
  gen->add_flag("--ignore-eos", ga.ignore_eos, "do not stop at the config's eos ids");
  gen->footer(
      "Each output line: {index, prompt, tokens, text (with a tokenizer), logprobs, finish_reason (stop|length|context),\n"
      "stop_token?}. Sequences of different lengths and different interventions share every forward pass with no\n"
      "padding: a row's tokens are the same alone or batched. Sites: L.resid_pre, L.attn_out, L.resid_mid,\n"
      "L.mlp_out, L.resid_post, embed, final_norm, logits. Positions: all, prompt, response, prompt[-1],\n"
      "response[:5], turn[assistant], think, [a:b], unions with ','.\n"
      "Examples:\n"
      "  kscope generate M --prompt 'The weather' --steer french.safetensors@2.resid_post*0.8n:response --norms norms.json\n"
      "  kscope generate M --chat chat.json --steer refusal.safetensors@10.resid_post!ablate --stream");

  std::vector<std::function<int()>> runners;
  add_interp_commands(app, runners);
  add_trait_commands(app, runners);
  add_serve_command(app, runners);

  try {
    app.parse(argc, argv);
    if (*info) return cmd_info(path, gpus, context, batch, as_json);
    if (*mk) return cmd_make_model(out, spec, format, force);
    if (*gen) return cmd_generate(path, ga);
    if (*tokc) return cmd_tokenize(path, ta);
    if (*quant) {
      Progress bar{"quantizing"};
      quantize_checkpoint(qin, out, parse_stored_format(qformat),
                          [&](uint64_t d, uint64_t t) { bar.update(static_cast<double>(d) / t); });
      bar.done();
      fmt::print("wrote {} ({})\n", out, qformat);
      return 0;
    }
    if (*detok) return cmd_detokenize(path, detok_ids, per_token);
    if (*mktok) {
      const int base = write_kimi_tokenizer(out, ranks);
      fmt::print("wrote {}: {} base ranks + 258 special ids (Kimi-K2 layout, Kimi's pre-tokenizer)\n", out, base);
      return 0;
    }
    for (auto& r : runners)
      if (int rc = r(); rc >= 0) return rc;
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
