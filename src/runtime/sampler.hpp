// Token sampling: greedy, or temperature + top-k + top-p with a per-sequence seeded generator.
#pragma once
#include <cstdint>
#include <random>
#include <vector>

#include "model/logits.hpp"

namespace kscope {

struct SamplingParams {
  double temperature = 0.0;  // 0 = greedy
  int64_t top_k = 0;         // 0 = off
  double top_p = 1.0;        // 1 = off
  uint64_t seed = 0;
};

// The most logits per row a summary carries for top-k sampling and top_logprobs (larger top_k takes whole rows).
constexpr int64_t kSummaryTop = 64;

class Sampler {
 public:
  explicit Sampler(const SamplingParams& p) : p_(p), rng_(p.seed) {}
  // Picks a token from logits [vocab]; ids in `banned` are never chosen. Returns the token and its log-probability
  // under the unmodified distribution (temperature 1, no truncation).
  int32_t sample(const float* logits, int64_t vocab, float* logprob = nullptr);
  // The same choice from a reduced row (Model::forward's LogitSummary): exact for greedy and for top-k sampling
  // with top_k <= the summary's size; otherwise the summary must carry the full row.
  int32_t sample(const LogitSummary& s, int64_t vocab, float* logprob = nullptr);
  // Whether sample(summary) needs the row sampled where it is (RowDraw) when the summary holds the `top` largest
  // logits; if so, draw_for_row() makes that draw (and advances the generator exactly as sample() would).
  bool needs_full_row(int64_t top) const { return p_.temperature > 0.0 && (p_.top_k <= 0 || p_.top_k > top); }
  RowDraw draw_for_row();
  const SamplingParams& params() const { return p_; }

 private:
  double draw() { return std::uniform_real_distribution<double>(0.0, 1.0)(rng_); }
  SamplingParams p_;
  std::mt19937_64 rng_;
};

// log-softmax of one logit row at `token`
float log_softmax_at(const float* logits, int64_t vocab, int32_t token);

}  // namespace kscope
