// kscope extract | steer-eval | project | massive | lens | traits
#include <CLI/CLI.hpp>
#include <filesystem>
#include <fstream>

#include "cli.hpp"
#include "commands.hpp"
#include "trait/analysis.hpp"
#include "trait/dataset.hpp"
#include "trait/experiment.hpp"
#include "trait/judge.hpp"
#include "trait/pipeline.hpp"
#include "util/error.hpp"

namespace kscope::cli {
namespace fs = std::filesystem;

namespace {

// --judge and friends, shared by extract and steer-eval.
struct JudgeArgs {
  std::string kind = "self", url, model, key, cache;
  int concurrency = 8, retries = 5, self_batch = 16;
  double min_mass = 0.25;
  void add(CLI::App* c) {
    c->add_option("--judge", kind,
                  "self: the loaded model grades with the same rubric (no network); openai: an OpenAI-compatible server "
                  "(--judge-url/--judge-model or KSCOPE_JUDGE_URL/KSCOPE_JUDGE_MODEL; key from KSCOPE_JUDGE_KEY or OPENAI_API_KEY); "
                  "none: only programmatic scorers")
        ->capture_default_str();
    c->add_option("--judge-url", url, "base URL of the judge, e.g. https://api.openai.com/v1 (implies --judge openai)");
    c->add_option("--judge-model", model, "the judge's model name");
    c->add_option("--judge-key", key, "API key (prefer the environment)");
    c->add_option("--judge-concurrency", concurrency, "parallel judge requests")->capture_default_str();
    c->add_option("--judge-retries", retries, "retries of a failed request (429, 5xx, network), with exponential backoff")->capture_default_str();
    c->add_option("--judge-min-mass", min_mass,
                  "a judgment needs at least this probability on the integer tokens 0..100, else it counts as a refusal")
        ->capture_default_str();
    c->add_option("--judge-cache", cache, "judgment cache (JSONL; default EXP/judge-cache.jsonl)");
  }
  std::unique_ptr<Judge> make(Model& model, const TextIO& io, const std::string& exp_dir) const {
    std::unique_ptr<Judge> j;
    std::string k = kind;
    if (!url.empty()) k = "openai";
    if (k == "none") return nullptr;
    if (k == "self") {
      j = std::make_unique<SelfJudge>(model, io.need("the self-judge"), io.chat, fs::path(io.dir).filename().string() + "@" + model.config().identity_hash(), 0,
                                      self_batch);
    } else if (k == "openai") {
      OpenAIJudgeOptions o;
      o.base_url = url;
      o.model = model_name();
      o.api_key = key;
      o.concurrency = concurrency;
      o.max_retries = retries;
      j = std::make_unique<OpenAIJudge>(judge_options_from_env(o));
    } else {
      fail(ErrorKind::input, "--judge", "'{}' is not self, openai or none", kind);
    }
    j->min_mass = min_mass;
    fs::create_directories(exp_dir);
    j->cache = std::make_shared<JudgeCache>(cache.empty() ? exp_dir + "/judge-cache.jsonl" : cache);
    return j;
  }
  std::string model_name() const { return model; }
};

// Progress bars keyed by step label.
PipelineIO make_io() {
  auto bar = std::make_shared<std::unique_ptr<Progress>>();
  auto label = std::make_shared<std::string>();
  PipelineIO io;
  io.log = [bar](const std::string& s) {
    if (*bar) {
      (*bar)->done();
      bar->reset();
    }
    std::cerr << s << "\n";
  };
  io.progress = [bar, label](const std::string& l, int64_t d, int64_t t) {
    if (!*bar || *label != l) {
      if (*bar) (*bar)->done();
      *bar = std::make_unique<Progress>(Progress{l});
      *label = l;
    }
    (*bar)->update(t > 0 ? static_cast<double>(d) / t : 1.0, fmt::format("{}/{}", d, t));
  };
  return io;
}

std::vector<double> parse_doubles(const std::string& s, const std::string& where) {
  std::vector<double> out;
  for (auto& x : split_list(s)) {
    try {
      size_t used = 0;
      out.push_back(std::stod(x, &used));
      if (used != x.size()) throw std::invalid_argument("x");
    } catch (...) {
      fail(ErrorKind::input, where, "'{}' is not a number", x);
    }
  }
  return out;
}

}  // namespace

void add_trait_commands(CLI::App& app, std::vector<std::function<int()>>& runners) {
  // ---- extract ----
  static std::string ex_model, ex_trait, ex_chat, ex_force, ex_exclude;
  static ExtractOptions ex;
  static JudgeArgs ex_judge;
  static bool ex_no_vet = false;
  static std::optional<double> ex_pos_min, ex_neg_max, ex_coh_min;
  ex.out = "experiments";
  auto* e = app.add_subcommand("extract", "Extract trait vectors: generate contrastive responses, vet them with a judge, capture, "
                                          "fit mean-difference / probe / PCA vectors per site, evaluate on held-out pairs");
  e->add_option("MODEL", ex_model, "checkpoint directory (with a tokenizer)")->required();
  e->add_option("--trait", ex_trait, "a shipped trait (kscope traits) or a dataset file")->required();
  e->add_option("--out", ex.out, "experiment directory; this trait's files go to OUT/TRAIT/")->capture_default_str();
  e->add_option("--sites", ex.sites, "layers or sites to capture: all, 30%-60%, 10-20, 3,5,9, or named sites (12.resid_post)")->capture_default_str();
  e->add_option("--positions", ex.positions, "positions averaged per response (see kscope capture --help)")->capture_default_str();
  e->add_option("--max-new-tokens", ex.max_new_tokens, "response length")->capture_default_str();
  e->add_option("--batch", ex.batch, "sequences per generation / capture batch")->capture_default_str();
  e->add_option("--temperature", ex.temperature, "sampling temperature of the responses (0 = greedy)")->capture_default_str();
  e->add_option("--seed", ex.seed, "sampling seed")->capture_default_str();
  e->add_option("--max-pairs", ex.max_pairs, "use only the first N pairs (0 = all)")->capture_default_str();
  e->add_flag("--no-vet", ex_no_vet, "keep every pair (no judge needed for the trait score)");
  e->add_option("--pos-min", ex_pos_min, "a positive response must score at least this (default: the dataset's, else 50)");
  e->add_option("--neg-max", ex_neg_max, "a negative response must score at most this (default: the dataset's, else 50)");
  e->add_option("--coherence-min", ex_coh_min, "both responses must be at least this coherent (default: the dataset's, else 50)");
  e->add_option("--on-topic-min", ex.on_topic_min, "also require the judge's on-topic score (0 = off)")->capture_default_str();
  e->add_option("--coherence", ex.coherence, "judge | loglik (default: the dataset's)");
  e->add_option("--test-fraction", ex.test_fraction, "fraction of questions held out for evaluation")->capture_default_str();
  e->add_option("--split-seed", ex.split_seed, "seed of the held-out split")->capture_default_str();
  e->add_option("--probe-C", ex.probe_C, "inverse L2 strength of the logistic probe (scikit-learn's C)")->capture_default_str();
  e->add_option("--exclude-dims", ex_exclude, "dimensions to zero before fitting: a list or a kscope massive report");
  e->add_option("--force", ex_force, "rerun stages even if up to date: all or a list of responses,vet,activations,vectors");
  e->add_option("--stop-after", ex.stop_after, "stop after this stage");
  e->add_option("--chat-format", ex_chat, "kimi-k2 | kimi-k2-thinking | deepseek-v3 (default: from the tokenizer)");
  ex_judge.add(e);
  e->footer(
      "Stages (each skipped when its inputs are unchanged; an interrupted run resumes where it stopped):\n"
      "  responses -> vet -> activations -> vectors        files under OUT/TRAIT/ (docs/traits.md)\n"
      "Examples:\n"
      "  kscope extract models/demo --trait french --out exp                       (programmatic scorer, no judge)\n"
      "  kscope extract K2 --trait anxiety --sites 20%-70% --judge-url https://api.openai.com/v1 --judge-model gpt-4.1-mini\n"
      "  kscope extract K2 --trait lying --judge self --batch 256 --force vectors");
  runners.push_back([e] {
    if (!*e) return -1;
    const TraitDataset ds = TraitDataset::find(ex_trait);
    auto model = load_model(ex_model);
    TextIO io(ex_model, model->config().vocab_size, ex_chat);
    ExtractOptions o = ex;
    o.vet = !ex_no_vet;
    o.pos_min = ex_pos_min.value_or(ds.pos_min.value_or(50));
    o.neg_max = ex_neg_max.value_or(ds.neg_max.value_or(50));
    o.coherence_min = ex_coh_min.value_or(ds.coherence_min.value_or(50));
    o.exclude_dims = parse_exclude_dims(ex_exclude);
    for (auto& f : split_list(ex_force)) {
      static const std::set<std::string> ok = {"all", "responses", "vet", "activations", "vectors"};
      if (!ok.count(f)) fail(ErrorKind::input, "--force", "'{}' is not a stage (all, responses, vet, activations, vectors)", f);
      o.force.insert(f);
    }
    auto judge = ex_judge.make(*model, io, o.out);
    TraitContext ctx{*model, io.need("extract"), io.chat, judge.get(), make_io()};
    const auto r = run_extract(ctx, ds, o);
    if (r.contains("vectors")) {
      std::cout << read_file(o.out + "/" + ds.name + "/vectors/summary.md");
      std::cout << fmt::format("\nvectors: {0}/{1}/vectors/{{mean_diff,probe,pca}}.safetensors\n", o.out, ds.name);
    } else {
      std::cout << r.dump(2) << "\n";
    }
    if (judge && judge->cache) std::cerr << fmt::format("judge: {} asked, {} cached judgments\n", judge->asked, judge->cache->size());
    return 0;
  });

  // ---- steer-eval ----
  static std::string se_model, se_trait, se_chat, se_grid = "0.25,0.5,1,2", se_exclude;
  static SteerEvalOptions se;
  static JudgeArgs se_judge;
  static std::optional<double> se_coh_min;
  se.out = "experiments";
  auto* s = app.add_subcommand("steer-eval", "Steering evaluation: baseline, then an adaptive coefficient search (or a grid, or "
                                             "ablation) per site, judged for the trait and coherence");
  s->add_option("MODEL", se_model, "checkpoint directory (with a tokenizer)")->required();
  s->add_option("--trait", se_trait, "a shipped trait or a dataset file (its eval_questions are used)")->required();
  s->add_option("--out", se.out, "experiment directory (results in OUT/TRAIT/steer/)")->capture_default_str();
  s->add_option("--vectors", se.vectors, "vector file (default OUT/TRAIT/vectors/METHOD.safetensors)");
  s->add_option("--method", se.method, "mean_diff | probe | pca, when --vectors is not given")->capture_default_str();
  s->add_option("--sites", se.sites, "candidate layers/sites: 30%-60%, 10,20,30, all, or 12.resid_post")->capture_default_str();
  s->add_option("--mode", se.mode, "adaptive | grid | ablate")->capture_default_str();
  s->add_option("--grid", se_grid, "relative coefficients of grid mode")->capture_default_str();
  s->add_option("--start", se.start, "first coefficient, in units of the site's mean ‖h‖ / ‖v‖")->capture_default_str();
  s->add_option("--grow", se.rule.grow, "factor while coherent")->capture_default_str();
  s->add_option("--shrink", se.rule.shrink, "factor while incoherent (before any coherent one)")->capture_default_str();
  s->add_option("--steps", se.rule.max_steps, "candidates per site")->capture_default_str();
  s->add_option("--coherence-min", se_coh_min, "a candidate counts when its mean coherence is at least this (default: the dataset's, else 70)");
  s->add_option("--on-topic-min", se.on_topic_min, "also require this mean on-topic score (0 = off)")->capture_default_str();
  s->add_option("--coherence", se.coherence, "judge | loglik (default: the dataset's)");
  s->add_option("--positions", se.positions, "where the vector is added")->capture_default_str();
  s->add_option("--max-new-tokens", se.max_new_tokens, "tokens per answer")->capture_default_str();
  s->add_option("--max-questions", se.max_questions, "use only the first N evaluation questions (0 = all)")->capture_default_str();
  s->add_option("--temperature", se.temperature, "sampling temperature (0 = greedy)")->capture_default_str();
  s->add_option("--seed", se.seed, "sampling seed")->capture_default_str();
  s->add_option("--exclude-dims", se_exclude, "dimensions zeroed in the vector (list or kscope massive report)");
  s->add_flag("--force", se.force, "discard the results log and start over");
  s->add_option("--chat-format", se_chat, "kimi-k2 | kimi-k2-thinking | deepseek-v3 (default: from the tokenizer)");
  se_judge.add(s);
  s->footer(
      "Every step's candidates (site x coefficient) and questions are one batch. Results are appended to\n"
      "OUT/TRAIT/steer/results.jsonl; rerunning the same command resumes. Outputs: summary.md (baseline, best site,\n"
      "delta, coherence, coefficient), summary.json, plot.svg, best_responses.jsonl.\n"
      "Examples:\n"
      "  kscope steer-eval models/demo --trait french --out exp --sites 1-3\n"
      "  kscope steer-eval K2 --trait anxiety --sites 30%-60% --judge-url $URL --judge-model gpt-4.1-mini\n"
      "  kscope steer-eval K2 --trait lying --mode grid --grid 0.5,1,2,4 --sites 25,30,35");
  runners.push_back([s] {
    if (!*s) return -1;
    const TraitDataset ds = TraitDataset::find(se_trait);
    auto model = load_model(se_model);
    TextIO io(se_model, model->config().vocab_size, se_chat);
    SteerEvalOptions o = se;
    o.grid = parse_doubles(se_grid, "--grid");
    o.coherence_min = se_coh_min.value_or(ds.coherence_min.value_or(70));
    o.exclude_dims = parse_exclude_dims(se_exclude);
    auto judge = se_judge.make(*model, io, o.out);
    TraitContext ctx{*model, io.need("steer-eval"), io.chat, judge.get(), make_io()};
    run_steer_eval(ctx, ds, o);
    std::cout << read_file(o.out + "/" + ds.name + "/steer/summary.md");
    return 0;
  });

  // ---- project ----
  static std::string pr_model, pr_rollouts, pr_store, pr_sites = "best", pr_out = "experiments/project", pr_exclude, pr_chat;
  static std::vector<std::string> pr_vectors;
  static int64_t pr_batch = 4;
  auto* p = app.add_subcommand("project", "Project rollouts onto trait vectors per token (raw, centred, normalized, cosine); traces and plots");
  p->add_option("MODEL", pr_model, "checkpoint directory (its tokenizer renders the rollouts)")->required();
  p->add_option("--vectors", pr_vectors, "vector files (repeatable; e.g. exp/anxiety/vectors/probe.safetensors)")->required();
  p->add_option("--sites", pr_sites, "best (each file's best held-out site), all, or a list of sites")->capture_default_str();
  p->add_option("--rollouts", pr_rollouts, "JSONL of rollouts: {\"id\", \"messages\": [...OpenAI messages, thinking, tools...]} or {\"text\"}");
  p->add_option("--store", pr_store, "an activation store captured with --reduction none, instead of --rollouts");
  p->add_option("--out", pr_out, "directory for rollout-ID.json traces, rollout-ID.svg plots and summary.jsonl")->capture_default_str();
  p->add_option("--exclude-dims", pr_exclude, "extra dimensions to leave out (the files' own exclusions always apply)");
  p->add_option("--batch", pr_batch, "rollouts per forward pass")->capture_default_str();
  p->add_option("--chat-format", pr_chat, "kimi-k2 | kimi-k2-thinking | deepseek-v3 (default: from the tokenizer)");
  p->footer(
      "centred = h·v̂ − (projection of the pos/neg midpoint); normalized = h·v̂ / the site's mean ‖h‖; cosine = h·v̂ / ‖h‖.\n"
      "Examples:\n"
      "  kscope project models/demo --vectors exp/french/vectors/mean_diff.safetensors --rollouts examples/french/rollouts.jsonl --out exp/project\n"
      "  kscope project K2 --vectors exp/lying/vectors/probe.safetensors --vectors exp/deception/vectors/probe.safetensors \\\n"
      "      --rollouts audit.jsonl --sites best --out exp/project/audit");
  runners.push_back([p] {
    if (!*p) return -1;
    if (pr_rollouts.empty() == pr_store.empty()) fail(ErrorKind::input, "project", "give exactly one of --rollouts and --store");
    auto model = load_model(pr_model);
    TextIO io(pr_model, model->config().vocab_size, pr_chat);
    std::vector<ProjectionTarget> targets;
    for (auto& f : pr_vectors) {
      VectorFile vf = VectorFile::load(f);
      vf.check_model(model->config(), f);
      for (auto& t : projection_targets(vf, f, pr_sites, parse_exclude_dims(pr_exclude))) targets.push_back(std::move(t));
    }
    ProjectOptions o{pr_out, pr_batch};
    json r;
    if (!pr_rollouts.empty()) {
      const auto rs = load_rollouts(pr_rollouts, io.need("project"), io.chat);
      r = project_rollouts(*model, *io.tok, targets, rs, o, make_io());
    } else {
      r = project_store(ActivationStore::open(pr_store), io.tok.get(), targets, o, make_io());
    }
    std::cout << r.dump(2) << "\n";
    return 0;
  });

  // ---- massive ----
  static std::string ma_model, ma_prompts, ma_out = "experiments/massive";
  static MassiveOptions ma;
  auto* m = app.add_subcommand("massive", "Massive-activation calibration: dimensions far above the typical magnitude, per layer; "
                                          "recommends dimensions to exclude");
  m->add_option("MODEL", ma_model, "checkpoint directory")->required();
  m->add_option("--prompts", ma_prompts, "JSONL of neutral prompts ({\"text\"} or {\"messages\"}); default: traits/neutral.jsonl");
  m->add_option("--out", ma_out, "directory for massive.json and massive.svg")->capture_default_str();
  m->add_option("--ratio", ma.ratio, "massive when max |h_d| is at least this times the layer's median mean |h|")->capture_default_str();
  m->add_option("--persistent", ma.persistent, "recommend excluding dimensions massive in at least this fraction of layers")->capture_default_str();
  m->add_option("--top", ma.top, "dimensions listed per layer")->capture_default_str();
  m->add_option("--batch", ma.batch, "prompts per forward pass")->capture_default_str();
  m->footer("Use the report with: kscope extract ... --exclude-dims OUT/massive.json (and project / steer-eval).\n"
            "Example: kscope massive models/demo --out exp/massive");
  runners.push_back([m] {
    if (!*m) return -1;
    auto model = load_model(ma_model);
    TextIO io(ma_model, model->config().vocab_size, "");
    const std::string file = ma_prompts.empty() ? traits_dir() + "/neutral.jsonl" : ma_prompts;
    std::vector<std::vector<int32_t>> prompts;
    for (auto& pl : load_prompts(io, {}, "", {}, file)) prompts.push_back(pl.prompt);
    const json r = massive_activations(*model, prompts, ma, ma_out, make_io());
    std::cout << fmt::format("{} prompts, {} tokens; recommended to exclude: {}\n", r["prompts"].get<int64_t>(), r["tokens"].get<int64_t>(),
                             r["recommended_exclude"].dump());
    for (auto& l : r["layers"])
      std::cout << fmt::format("  layer {:>2}: typical |h| {:.3g}; top dim {} at {:.1f}x{}\n", l["layer"].get<int64_t>(), l["typical_abs"].get<double>(),
                               l["top"][0]["dim"].get<int64_t>(), l["top"][0]["ratio"].get<double>(),
                               l["massive"].empty() ? "" : fmt::format(" (massive: {})", l["massive"].dump()));
    std::cout << fmt::format("wrote {0}/massive.json, {0}/massive.svg\n", ma_out);
    return 0;
  });

  // ---- lens ----
  static std::string le_model, le_vector, le_site;
  static int64_t le_k = 20;
  static bool le_json = false;
  auto* l = app.add_subcommand("lens", "Logit lens of a vector: its top and bottom tokens through the final norm and the unembedding");
  l->add_option("MODEL", le_model, "checkpoint directory")->required();
  l->add_option("--vector", le_vector, "vector file")->required();
  l->add_option("--site", le_site, "site in the file (default: its best site, else its only one)");
  l->add_option("-k,--top", le_k, "tokens at each end")->capture_default_str();
  l->add_flag("--json", le_json, "JSON output");
  l->footer("Example: kscope lens models/demo --vector exp/french/vectors/mean_diff.safetensors --site 3.resid_post");
  runners.push_back([l] {
    if (!*l) return -1;
    auto model = load_model(le_model);
    TextIO io(le_model, model->config().vocab_size, "");
    VectorFile vf = VectorFile::load(le_vector);
    vf.check_model(model->config(), le_vector);
    std::string site = le_site;
    if (site.empty()) {
      if (vf.meta.count("best_site") && !vf.meta.at("best_site").empty()) site = vf.meta.at("best_site");
      else if (vf.vectors.size() == 1) site = vf.vectors.begin()->first;
      else fail(ErrorKind::input, "--site", "{} holds {} sites: choose one", le_vector, vf.vectors.size());
    }
    const json r = vector_lens(*model, io.tok.get(), vf.at(site, le_vector), le_k);
    if (le_json) {
      std::cout << json({{"site", site}, {"lens", r}}).dump(2) << "\n";
      return 0;
    }
    std::cout << fmt::format("{} @ {}\n{:>30}   {:<30}\n", le_vector, site, "top (promoted)", "bottom (suppressed)");
    for (size_t i = 0; i < r["top"].size(); ++i)
      std::cout << fmt::format("{:>20} {:>9.3f}   {:<20} {:>9.3f}\n", json(r["top"][i]["token"]).dump(), r["top"][i]["logit"].get<double>(),
                               json(r["bottom"][i]["token"]).dump(), r["bottom"][i]["logit"].get<double>());
    return 0;
  });

  // ---- traits ----
  static std::string tr_name;
  auto* t = app.add_subcommand("traits", "List the shipped trait datasets, or show one");
  t->add_option("NAME", tr_name, "a trait to show (pairs, questions, definition)");
  t->footer("Datasets live in traits/ (or $KSCOPE_TRAITS); the format is in docs/traits.md.");
  runners.push_back([t] {
    if (!*t) return -1;
    if (!tr_name.empty()) {
      std::cout << TraitDataset::find(tr_name).describe().dump(2) << "\n";
      return 0;
    }
    for (auto& n : shipped_traits()) {
      const auto d = TraitDataset::load(traits_dir() + "/" + n + ".json").describe();
      std::cout << fmt::format("{:<16} {:>4} pairs {:>3} questions {:>3} eval  {}\n", n, d["pairs"].get<int64_t>(), d["questions"].get<int64_t>(),
                               d["eval_questions"].get<int64_t>(), d["style"].get<std::string>());
    }
    return 0;
  });
}

}  // namespace kscope::cli
