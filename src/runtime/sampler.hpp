// Token sampling: greedy, or temperature + top-k + top-p with a per-sequence seeded generator.
#pragma once
#include <cstdint>
#include <random>
#include <vector>

namespace kscope {

struct SamplingParams {
  double temperature = 0.0;  // 0 = greedy
  int64_t top_k = 0;         // 0 = off
  double top_p = 1.0;        // 1 = off
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& p) : p_(p), rng_(p.seed) {}
  // Picks a token from logits [vocab]; ids in `banned` are never chosen. Returns the token and its log-probability
  // under the unmodified distribution (temperature 1, no truncation).
  int32_t sample(const float* logits, int64_t vocab, float* logprob = nullptr);
  const SamplingParams& params() const { return p_; }

 private:
  SamplingParams p_;
  std::mt19937_64 rng_;
};

// log-softmax of one logit row at `token`
float log_softmax_at(const float* logits, int64_t vocab, int32_t token);

}  // namespace kscope
