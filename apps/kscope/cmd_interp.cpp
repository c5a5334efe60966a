// kscope capture | calibrate | vectors
#include <CLI/CLI.hpp>
#include <cmath>
#include <filesystem>
#include <fstream>

#include "cli.hpp"
#include "commands.hpp"
#include "interp/capture.hpp"
#include "interp/extract.hpp"
#include "interp/sweep.hpp"
#include "interp/vectors.hpp"
#include "store/activation_store.hpp"
#include "util/error.hpp"

namespace kscope::cli {

namespace {

struct CaptureArgs {
  std::string model, out, prompts_file, chat, sites, positions = "all", reduction = "none", dtype = "float32", norms;
  std::vector<std::string> texts, ids, steer;
  int64_t generate = 0, batch = 16, shard_sequences = 256;
  double temperature = 0, top_p = 1;
  int64_t top_k = 0;
  uint64_t seed = 0;
  bool overwrite = false, ignore_eos = false;
};

std::vector<Site> parse_sites(const std::string& list, const ModelConfig& cfg) {
  std::vector<Site> out;
  for (const auto& s : split_list(list)) {
    if (s.find('*') != std::string::npos) {  // "*.resid_post": every layer
      const std::string name = s.substr(s.find('.') + 1);
      for (int64_t l = 0; l < cfg.num_hidden_layers; ++l)
        if (name != "router" || cfg.is_moe_layer(l)) out.push_back(parse_site(std::to_string(l) + "." + name, cfg.num_hidden_layers));
    } else {
      out.push_back(parse_site(s, cfg.num_hidden_layers));
    }
  }
  if (out.empty()) fail(ErrorKind::input, "--sites", "no sites");
  return out;
}

std::vector<CaptureRequest> build_requests(const CaptureArgs& a, const ModelConfig& cfg, const TextIO& io) {
  auto prompts = load_prompts(io, a.texts, a.chat, a.ids, a.prompts_file);
  if (prompts.empty()) fail(ErrorKind::input, "capture", "no prompts: give --prompts, --prompt, --chat or --ids");
  VectorCache vc(cfg);
  load_norms(vc, a.norms);
  const auto ivs = load_interventions(prompts, a.steer, cfg, vc);
  std::vector<CaptureRequest> reqs;
  for (size_t i = 0; i < prompts.size(); ++i) {
    CaptureRequest r;
    r.prompt = prompts[i].prompt;
    r.response = prompts[i].response;
    r.turns = prompts[i].turns;
    r.interventions = ivs[i];
    if (a.generate > 0 && r.response.empty()) {
      r.generate = true;
      r.gen.max_new_tokens = prompts[i].line.value("max_new_tokens", a.generate);
      r.gen.sampling = {a.temperature, a.top_k, a.top_p, a.seed + i};
      r.gen.ignore_eos = a.ignore_eos;
    }
    reqs.push_back(std::move(r));
  }
  return reqs;
}

// What capture and calibrate share: the model, the capture spec and the requests.
struct Job {
  std::unique_ptr<Model> model;
  CaptureSpec spec;
  std::vector<CaptureRequest> reqs;
};
Job prepare(const CaptureArgs& a) {
  Job j;
  j.model = load_model(a.model);
  const auto& cfg = j.model->config();
  TextIO io(a.model, cfg.vocab_size, "");
  j.spec.sites = parse_sites(a.sites, cfg);
  j.spec.positions = PositionSpec::parse(a.positions);
  j.spec.reduction = parse_reduction(a.reduction);
  j.reqs = build_requests(a, cfg, io);
  return j;
}

int run_capture_cmd(const CaptureArgs& a) {
  Job job = prepare(a);
  auto& model = job.model;
  const auto& cfg = model->config();
  const auto& spec = job.spec;
  const auto& reqs = job.reqs;
  StoreConfig sc;
  sc.model_identity = cfg.identity_hash();
  sc.model_type = cfg.model_type;
  sc.model_path = a.model;
  for (auto& s : spec.sites) sc.sites.push_back(s.str());
  sc.positions = a.positions;
  sc.reduction = a.reduction;
  sc.dtype = a.dtype;
  sc.d_model = cfg.hidden_size;
  sc.shard_sequences = a.shard_sequences;
  sc.source = !a.prompts_file.empty() ? a.prompts_file : "command line";
  sc.source_hash = !a.prompts_file.empty() ? file_hash(a.prompts_file) : "";
  sc.extra = {{"generate", a.generate}, {"temperature", a.temperature}, {"top_k", a.top_k}, {"top_p", a.top_p},
              {"seed", a.seed}, {"steer", a.steer}, {"n_sequences", reqs.size()}};
  StoreWriter w(a.out, sc, a.overwrite);
  if (w.complete() && w.next_sequence() >= static_cast<int64_t>(reqs.size())) {
    fmt::print("{}: already complete ({} sequences)\n", a.out, w.next_sequence());
    return 0;
  }
  if (w.next_sequence() > 0) std::cerr << fmt::format("resuming after sequence {} of {}\n", w.next_sequence(), reqs.size());
  Progress bar{"capturing"};
  const auto t0 = std::chrono::steady_clock::now();
  capture_to_store(*model, reqs, spec, w, a.batch, [&](int64_t done, int64_t total) {
    bar.update(static_cast<double>(done) / total, fmt::format("{}/{} sequences", done, total));
  });
  bar.done();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  int64_t rows = 0;
  for (auto& sh : w.manifest()["shards"]) rows += sh["rows"].get<int64_t>();
  fmt::print("{}: {} sequences, {} rows x {} sites in {} shards ({:.1f} s)\n", a.out, reqs.size(), rows, spec.sites.size(),
             w.manifest()["shards"].size(), s);
  return 0;
}

int run_calibrate(const CaptureArgs& a) {
  Job job = prepare(a);  // (calibrate's reduction is "none": it needs every row's norm)
  auto& model = job.model;
  const auto& cfg = model->config();
  const auto& spec = job.spec;
  const auto& reqs = job.reqs;
  std::map<std::string, double> sum;
  std::map<std::string, int64_t> count;
  Progress bar{"calibrating"};
  for (size_t b = 0; b < reqs.size(); b += a.batch) {
    std::vector<CaptureRequest> part(reqs.begin() + b, reqs.begin() + std::min(reqs.size(), b + a.batch));
    for (const auto& c : run_capture(*model, part, spec))
      for (auto& [site, rows] : c.rows) {
        const int64_t w = c.width.at(site);
        for (size_t r = 0; r * w < rows.size(); ++r) {
          double n = 0;
          for (int64_t d = 0; d < w; ++d) n += static_cast<double>(rows[r * w + d]) * rows[r * w + d];
          sum[site] += std::sqrt(n);
          ++count[site];
        }
      }
    bar.update(static_cast<double>(std::min(reqs.size(), b + a.batch)) / reqs.size());
  }
  bar.done();
  json out = {{"model_identity", cfg.identity_hash()}, {"positions", a.positions}, {"sequences", reqs.size()},
              {"mean_norm", json::object()}, {"rows", json::object()}};
  for (auto& [site, s] : sum) {
    out["mean_norm"][site] = s / count[site];
    out["rows"][site] = count[site];
  }
  std::ofstream f(a.out);
  f << out.dump(2) << "\n";
  if (!f) fail(ErrorKind::io, a.out, "write failed");
  fmt::print("{}: mean norms of {} sites over {} sequences\n", a.out, sum.size(), reqs.size());
  return 0;
}

void add_prompt_options(CLI::App* c, CaptureArgs& a) {
  c->add_option("MODEL", a.model, "checkpoint directory")->required();
  c->add_option("--prompts", a.prompts_file,
                "JSONL, one sequence a line: {\"text\"|\"ids\"|\"messages\": ..., \"response\": text or ids (replayed), "
                "\"interventions\": [...]}");
  c->add_option("--prompt", a.texts, "a text prompt (repeatable)");
  c->add_option("--chat", a.chat, "a chat JSON file (one conversation or a list)");
  c->add_option("--ids", a.ids, "a prompt as comma-separated token ids (repeatable)");
  c->add_option("--sites", a.sites, "comma-separated sites, e.g. 3.resid_post,5.mlp_out,2.router; '*.resid_post' = every layer")->required();
  c->add_option("--positions", a.positions, "positions (all, prompt, response[:5], prompt[-1], turn[assistant], think, [a:b])")->capture_default_str();
  c->add_option("--generate", a.generate, "generate up to N tokens for prompts without a 'response' (0: replay only)");
  c->add_option("--temperature", a.temperature, "sampling temperature when generating")->capture_default_str();
  c->add_option("--top-k", a.top_k, "top-k when generating")->capture_default_str();
  c->add_option("--top-p", a.top_p, "top-p when generating")->capture_default_str();
  c->add_option("--seed", a.seed, "sampling seed; sequence i uses seed + i")->capture_default_str();
  c->add_flag("--ignore-eos", a.ignore_eos, "do not stop at eos when generating");
  c->add_option("--steer", a.steer, "an intervention applied while capturing (FILE@SITE*COEF[:POSITIONS], see generate --help)");
  c->add_option("--norms", a.norms, "mean norms per site (kscope calibrate) for relative coefficients");
  c->add_option("--batch", a.batch, "sequences per forward batch")->capture_default_str();
}

}  // namespace

void add_interp_commands(CLI::App& app, std::vector<std::function<int()>>& runners) {
  static CaptureArgs cap, cal;
  auto* c = app.add_subcommand("capture", "Capture activations at sites x positions into an activation store (resumable)");
  add_prompt_options(c, cap);
  c->add_option("--out", cap.out, "store directory (safetensors shards + manifest.json)")->required();
  c->add_option("--reduction", cap.reduction, "none (a row per position) | mean (a row per sequence)")->capture_default_str();
  c->add_option("--dtype", cap.dtype, "float32 | bfloat16")->capture_default_str();
  c->add_option("--shard-sequences", cap.shard_sequences, "sequences per shard")->capture_default_str();
  c->add_flag("--overwrite", cap.overwrite, "replace a store made with other settings (default: resume the same one)");
  c->footer(
      "A position's state is what the model computes when that token is its input; generated tokens are fed once\n"
      "more at the end so every kept token has states. Interrupt and rerun the same command to resume: finished\n"
      "shards are kept and the rest are written identically.\n"
      "Examples:\n"
      "  kscope capture M --prompts p.jsonl --sites '*.resid_post' --positions response --generate 64 --out acts/\n"
      "  kscope capture M --prompts rollouts.jsonl --sites 10.resid_post,10.router --positions 'turn[assistant]' --out acts/");
  runners.push_back([c] { return *c ? run_capture_cmd(cap) : -1; });

  auto* k = app.add_subcommand("calibrate", "Mean norm of the activations at each site (for relative steering coefficients)");
  add_prompt_options(k, cal);
  k->add_option("--out", cal.out, "output JSON {mean_norm: {site: value}}")->required();
  k->footer("Example: kscope calibrate M --prompts neutral.jsonl --sites '*.resid_post' --out norms.json");
  runners.push_back([k] { return *k ? run_calibrate(cal) : -1; });

  static std::string sw_model, sw_vec, sw_sites, sw_coefs = "0.25,0.5,1,2,4", sw_prompts, sw_scorer = "french",
                     sw_out, sw_norms, sw_positions = "response";
  static std::vector<std::string> sw_texts;
  static int64_t sw_max_new = 24;
  static double sw_drop = 1.5;
  static bool sw_absolute = false;
  auto* sw = app.add_subcommand("steer-sweep",
                                "Steer with a vector at every (site, coefficient) in one batch; score, check coherence, report the best");
  sw->add_option("MODEL", sw_model, "checkpoint directory (with a tokenizer)")->required();
  sw->add_option("--vector", sw_vec, "vector file (e.g. from kscope vectors mean-diff)")->required();
  sw->add_option("--sites", sw_sites, "sites to try (default: every site in the vector file)");
  sw->add_option("--coefs", sw_coefs, "coefficients to try")->capture_default_str();
  sw->add_flag("--absolute", sw_absolute, "coefficients are absolute (default: units of the site's mean norm)");
  sw->add_option("--norms", sw_norms, "mean norms per site (default: the vector file's)");
  sw->add_option("--prompts", sw_prompts, "JSONL of prompts ({\"text\"|\"ids\"|\"messages\"}) to steer");
  sw->add_option("--prompt", sw_texts, "a prompt (repeatable)");
  sw->add_option("--positions", sw_positions, "where to steer")->capture_default_str();
  sw->add_option("--max-new-tokens", sw_max_new, "tokens generated per row (greedy)")->capture_default_str();
  sw->add_option("--scorer", sw_scorer, "french: 100 x the fraction of French function words")->capture_default_str();
  sw->add_option("--coherence-drop", sw_drop,
                 "a candidate counts while its log-likelihood per token (under the unsteered model) is within this of the baseline's")
      ->capture_default_str();
  sw->add_option("--out", sw_out, "write results.jsonl, summary.json, table.md and plot.svg here");
  sw->footer("Example: kscope steer-sweep models/demo --vector french.safetensors --prompts examples/french/questions.jsonl --out out/sweep");
  runners.push_back([sw] {
    if (!*sw) return -1;
    auto model = load_model(sw_model);
    TextIO io(sw_model, model->config().vocab_size, "");
    const auto prompts = load_prompts(io, sw_texts, "", {}, sw_prompts);
    VectorCache vc(model->config());
    load_norms(vc, sw_norms);
    const VectorFile& vf = vc.get(sw_vec);
    SweepSpec spec;
    for (auto& p : prompts) spec.prompts.push_back(p.prompt);
    std::vector<std::string> sites = split_list(sw_sites);
    if (sites.empty())
      for (auto& [k, x] : vf.vectors) sites.push_back(k);
    for (auto& s : sites) {
      spec.sites.push_back(parse_site(s, model->config().num_hidden_layers));
      spec.vectors[s] = vf.at(s, sw_vec);
      const double n = vc.norms_override.count(s) ? vc.norms_override.at(s) : vf.norms.count(s) ? vf.norms.at(s) : 0.0;
      if (!sw_absolute && !(n > 0)) fail(ErrorKind::input, sw_vec, "no mean norm for site '{}': give --norms or --absolute", s);
      spec.mean_norms[s] = n;
    }
    for (auto& c : split_list(sw_coefs)) spec.coefs.push_back(std::stod(c));
    spec.relative = !sw_absolute;
    spec.positions = sw_positions;
    spec.max_new_tokens = sw_max_new;
    spec.coherence_drop = sw_drop;
    const auto t0 = std::chrono::steady_clock::now();
    const auto r = run_sweep(*model, io.need("steer-sweep"), spec, make_scorer(sw_scorer),
                             [](const std::string& m) { std::cerr << m << "\n"; });
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::cout << r.table();
    const auto& best = r.best;
    for (const auto& row : r.rows)
      if (row.site == best.site && row.coef == best.coef && row.prompt < 2)
        std::cout << fmt::format("\n  {} ->{}", json(io.tok->decode(prompts[row.prompt].prompt)).dump(), json(row.text).dump());
    std::cout << fmt::format("\n\n{} rows in {:.1f} s\n", r.rows.size(), secs);
    if (!sw_out.empty()) {
      std::filesystem::create_directories(sw_out);
      std::ofstream rows(sw_out + "/results.jsonl");
      for (const auto& row : r.rows)
        rows << json({{"site", row.site}, {"coef", row.coef}, {"prompt", row.prompt}, {"text", row.text}, {"score", row.score},
                      {"loglik", row.loglik}}).dump() << "\n";
      std::ofstream(sw_out + "/summary.json") << r.summary().dump(2) << "\n";
      std::ofstream(sw_out + "/table.md") << r.table();
      std::ofstream(sw_out + "/plot.svg") << r.svg(fmt::format("steering with {} (scorer: {})", std::filesystem::path(sw_vec).filename().string(), sw_scorer));
      std::cout << fmt::format("wrote {}/results.jsonl, summary.json, table.md, plot.svg\n", sw_out);
    }
    return 0;
  });

  static std::string vin, vout, vmodel, vhint;
  auto* v = app.add_subcommand("vectors", "Inspect vector files; import and export llama.cpp/repeng control-vector GGUF");
  v->require_subcommand(1);
  auto* vi = v->add_subcommand("info", "Sites, norms and metadata of a vector file");
  vi->add_option("FILE", vin, "vector file (.safetensors)")->required();
  auto* ve = v->add_subcommand("export-gguf", "Write the L.resid_post vectors as a control vector (direction.L)");
  ve->add_option("FILE", vin, "vector file")->required();
  ve->add_option("OUT", vout, "output .gguf")->required();
  ve->add_option("--model-hint", vhint, "controlvector.model_hint")->capture_default_str();
  static std::string vpos, vneg, vsites, vtrait;
  auto* vd = v->add_subcommand("mean-diff", "A vector per site: mean of a positive store's rows minus a negative store's");
  vd->add_option("--pos", vpos, "activation store of the positive examples (e.g. French text)")->required();
  vd->add_option("--neg", vneg, "activation store of the negative examples (e.g. English text)")->required();
  vd->add_option("--sites", vsites, "sites (default: every non-router site of the stores)");
  vd->add_option("--trait", vtrait, "trait name for the metadata");
  vd->add_option("OUT", vout, "output vector file (.safetensors)")->required();
  vd->footer("The file also holds each site's mean activation norm (for relative coefficients, *Cn).\n"
             "Example: kscope vectors mean-diff --pos acts/fr --neg acts/en --trait french french.safetensors");
  auto* vm = v->add_subcommand("import-gguf", "Read a control vector (direction.L -> L.resid_post) for a model");
  vm->add_option("FILE", vin, "control vector .gguf")->required();
  vm->add_option("OUT", vout, "output vector file (.safetensors)")->required();
  vm->add_option("--model", vmodel, "the checkpoint it is for (its identity goes into the file)")->required();
  v->footer("direction.N is added to the output of block N by llama.cpp (and repeng's layer N): kscope's N.resid_post.");
  runners.push_back([v, vi, ve, vm, vd] {
    if (!*v) return -1;
    if (*vi) {
      const auto f = VectorFile::load(vin);
      json j = {{"metadata", f.meta}, {"sites", json::object()}};
      for (auto& [site, x] : f.vectors) {
        double n = 0;
        for (float y : x) n += static_cast<double>(y) * y;
        j["sites"][site] = {{"width", x.size()}, {"norm", std::sqrt(n)}};
        if (f.norms.count(site)) j["sites"][site]["site_mean_norm"] = f.norms.at(site);
      }
      std::cout << j.dump(2) << "\n";
    } else if (*ve) {
      export_control_vector_gguf(VectorFile::load(vin), vout, vhint.empty() ? "kscope" : vhint);
      fmt::print("wrote {}\n", vout);
    } else if (*vd) {
      const auto p = ActivationStore::open(vpos), n = ActivationStore::open(vneg);
      std::vector<std::string> sites = split_list(vsites);
      if (sites.empty())
        for (auto& s : p.manifest()["config"]["sites"])
          if (s.get<std::string>().find("router") == std::string::npos) sites.push_back(s.get<std::string>());
      mean_difference(p, n, sites, vtrait).save(vout);
      fmt::print("wrote {}: {} sites\n", vout, sites.size());
    } else if (*vm) {
      const ModelConfig cfg = load_config(vmodel);
      import_control_vector_gguf(vin, cfg).save(vout);
      fmt::print("wrote {} for model identity {}\n", vout, cfg.identity_hash());
    }
    return 0;
  });
}

}  // namespace kscope::cli
