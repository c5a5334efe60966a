// One row of logits reduced to what sampling and logprobs need, so a device backend need not copy the whole
// vocabulary back for every sequence and step.
#pragma once
#include <cstdint>
#include <vector>

namespace kscope {

struct LogitSummary {
  float max = 0;                 // largest logit
  double log_sum = 0;            // log Σ exp(l − max); log p(t) = (l[t] − max) − log_sum
  std::vector<float> top_vals;   // the M largest logits, descending; ties: lower id first
  std::vector<int32_t> top_ids;
  std::vector<float> full;       // the whole row, when it was asked for (else empty)
  int32_t sampled = -1;          // the token drawn where the logits are (RowDraw), -1 if none
  float sampled_logit = 0;

  float logprob_of(float logit) const { return static_cast<float>((logit - max) - log_sum); }
};

// Temperature sampling of one row done where the row is (on the device for a device backend), with the uniform
// draw u in [0, 1) made by the caller's own seeded generator, so every backend turns the same u into the same token.
struct RowDraw {
  bool on = false;
  double temperature = 1.0, top_p = 1.0;
  int64_t top_k = 0;  // 0 = off
  double u = 0.0;
};

// The reference rule (runtime's Sampler uses it): candidates sorted by logit, descending, ties to the lower id,
// truncated to top_k, softmax at the temperature, the smallest prefix whose mass reaches top_p, then the first
// candidate whose cumulative probability exceeds u.
int32_t pick_sorted(const int32_t* ids, const float* vals, int64_t keep, double temperature, double top_p, double u);
int32_t choose_with_draw(const float* logits, int64_t vocab, const RowDraw& d);

}  // namespace kscope
