// Steering sweep: every (site, coefficient) candidate is a row of one batched generation (each row its own
// intervention), scored by a programmatic scorer and by coherence (mean log-likelihood of the generated tokens
// under the unsteered model). Reports the seed notes' summary: baseline, best site, delta, coherence, coefficient.
#pragma once
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "interp/intervention.hpp"
#include "model/model.hpp"
#include "tokenizer/tokenizer.hpp"

namespace kscope {

// Text -> score in [0, 100] (a programmatic scorer; LLM judges plug in the same way).
using Scorer = std::function<double(const std::string&)>;
Scorer make_scorer(const std::string& name);  // "french": 100 x the French function-word fraction

struct SweepSpec {
  std::vector<std::vector<int32_t>> prompts;
  std::vector<Site> sites;
  std::vector<double> coefs;
  std::vector<float> vector_for(const Site& s) const { return vectors.at(s.str()); }
  std::map<std::string, std::vector<float>> vectors;  // site -> direction
  std::map<std::string, double> mean_norms;           // site -> mean ‖h‖ (relative coefficients)
  bool relative = true;
  std::string positions = "response";
  int64_t max_new_tokens = 24;
  double coherence_drop = 1.5;  // a candidate counts while its coherence is within this of the baseline's
};

struct SweepRow {
  std::string site;  // "" for the baseline
  double coef = 0;
  int64_t prompt = 0;
  std::string text;
  double score = 0, loglik = 0;
};

struct SweepCandidate {
  std::string site;
  double coef = 0, score = 0, loglik = 0;
  bool coherent = true;
};

struct SweepResult {
  std::vector<SweepRow> rows;
  std::vector<SweepCandidate> candidates;  // the baseline first
  SweepCandidate best;                     // the best coherent candidate (the baseline if none beats it)
  nlohmann::json summary() const;
  std::string table() const;                // Markdown: every candidate, then the summary row
  std::string svg(const std::string& title) const;  // score and coherence against coefficient, one line per site
};

SweepResult run_sweep(Model& model, const Tokenizer& tok, const SweepSpec& spec, const Scorer& scorer,
                      const std::function<void(const std::string&)>& log = nullptr);

}  // namespace kscope
