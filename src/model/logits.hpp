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

  float logprob_of(float logit) const { return static_cast<float>((logit - max) - log_sum); }
};

}  // namespace kscope
