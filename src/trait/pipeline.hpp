// The trait pipeline (docs/traits.md): extraction as resumable stages under EXP/TRAIT/, and steering evaluation.
//
//   responses   positive and negative responses, generated in large batches      responses.jsonl
//   vet         judge scores (trait, coherence, on-topic); paired filtering       vet.jsonl, vet.json
//   activations mean over response tokens at the chosen sites (replayed)          acts/pos, acts/neg (stores)
//   vectors     mean difference, logistic probe, paired PCA per site; held-out
//               accuracy, AUROC and effect size                                  vectors/*.safetensors, summary.*
//
// A stage whose inputs (settings + the previous stage's outputs) are unchanged is skipped; an interrupted stage
// resumes where its files end (responses and judgments are appended line by line, stores shard by shard).
#pragma once
#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "model/model.hpp"
#include "trait/dataset.hpp"
#include "trait/judge.hpp"

namespace kscope {

// Where the pipeline reports: log lines, and progress of the current step (label, done, total).
// `poll` is called at every report and may throw to stop the run (a cancelled background job): every stage
// leaves its files resumable at any report.
struct PipelineIO {
  std::function<void(const std::string&)> log;
  std::function<void(const std::string&, int64_t, int64_t)> progress;
  std::function<void()> poll;
  void say(const std::string& s) const {
    if (poll) poll();
    if (log) log(s);
  }
  void step(const std::string& label, int64_t done, int64_t total) const {
    if (poll) poll();
    if (progress) progress(label, done, total);
  }
};

struct TraitContext {
  Model& model;
  const Tokenizer& tok;
  ChatFormat chat;
  Judge* judge = nullptr;  // needed unless the dataset's scorer and loglik coherence cover everything
  PipelineIO io;
};

struct ExtractOptions {
  std::string out;                 // experiment directory; the trait's files go to out/<trait>/
  std::string sites = "all";       // layers / sites (parse_site_list), resid_post by default
  std::string positions = "response";
  int64_t max_new_tokens = 96;
  int64_t batch = 64;              // sequences per generation / capture batch
  double temperature = 0;          // 0: greedy
  uint64_t seed = 0;
  int64_t max_pairs = 0;           // 0: every pair of the dataset
  bool vet = true;
  double pos_min = 50, neg_max = 50, coherence_min = 50, on_topic_min = 0;
  std::string coherence = "";      // judge | loglik ("" = the dataset's)
  double test_fraction = 0.2;
  uint64_t split_seed = 0;
  double probe_C = 1.0;
  std::vector<int64_t> exclude_dims;
  std::set<std::string> force;     // stages to rerun ("all" = every stage)
  std::string stop_after;          // run up to and including this stage
  int64_t fail_after_rows = -1;    // testing: throw after this many response rows were appended (simulated crash)
};

// Runs the stages; returns the vectors summary (per method and site: held-out accuracy, AUROC, effect size).
nlohmann::json run_extract(TraitContext& ctx, const TraitDataset& ds, const ExtractOptions& o);

// ---- steering evaluation ----

// The adaptive coefficient search for one site, as a pure rule (tested on its own): grow the coefficient by
// `grow` while the candidate stays coherent; once a coefficient was incoherent, bisect between the largest
// coherent and the smallest incoherent one; before any coherent one, shrink by `shrink`. Done after `max_steps`
// candidates or when the bracket is tighter than `tol` (relative).
struct SearchRule {
  double grow = 2.0, shrink = 0.5, tol = 0.15;
  int max_steps = 6;
};
struct SearchState {
  double coef = 0;                 // the next coefficient to try (relative units)
  double good = 0;                 // largest coherent so far (0: none)
  double bad = 0;                  // smallest incoherent so far (0: none)
  int steps = 0;
  bool done = false;
};
void search_step(SearchState& s, bool coherent, const SearchRule& r);

struct SteerEvalOptions {
  std::string out;                 // experiment directory (out/<trait>/steer/)
  std::string vectors;             // vector file ("" = out/<trait>/vectors/<method>.safetensors)
  std::string method = "probe";
  std::string sites = "30%-60%";
  std::string mode = "adaptive";   // adaptive | grid | ablate
  std::vector<double> grid = {0.25, 0.5, 1, 2};  // relative coefficients (grid mode)
  double start = 0.5;              // first coefficient, in units of mean‖h‖/‖v‖ at the site
  SearchRule rule;
  double coherence_min = 70, on_topic_min = 0;
  std::string coherence = "";      // judge | loglik ("" = the dataset's)
  std::string positions = "response";
  int64_t max_new_tokens = 96;
  int64_t max_questions = 0;
  double temperature = 0;
  uint64_t seed = 0;
  bool force = false;
  std::vector<int64_t> exclude_dims;  // zeroed in the steering vector
  int64_t fail_after_steps = -1;      // testing: throw after this many logged steps (simulated crash)
};

// Runs (or resumes) the evaluation; returns the summary (baseline, best site, delta, coherence, coefficient).
nlohmann::json run_steer_eval(TraitContext& ctx, const TraitDataset& ds, const SteerEvalOptions& o);

}  // namespace kscope
