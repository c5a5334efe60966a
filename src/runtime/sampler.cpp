#include "runtime/sampler.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "util/error.hpp"

namespace kscope {

float log_softmax_at(const float* l, int64_t n, int32_t token) {
  const float mx = *std::max_element(l, l + n);
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += std::exp(static_cast<double>(l[i] - mx));
  return static_cast<float>(l[token] - mx - std::log(s));
}

RowDraw Sampler::draw_for_row() {
  RowDraw d;
  d.on = true;
  d.temperature = p_.temperature;
  d.top_p = p_.top_p;
  d.top_k = p_.top_k;
  d.u = draw();
  return d;
}

int32_t Sampler::sample(const float* l, int64_t n, float* logprob) {
  int32_t tok;
  if (p_.temperature <= 0.0) {
    tok = static_cast<int32_t>(std::max_element(l, l + n) - l);  // first maximum: lowest id on ties
  } else {
    tok = choose_with_draw(l, n, draw_for_row());
  }
  if (logprob) *logprob = log_softmax_at(l, n, tok);
  return tok;
}

int32_t Sampler::sample(const LogitSummary& s, int64_t vocab, float* logprob) {
  if (s.sampled >= 0) {  // drawn where the row was, with draw_for_row()'s u
    if (logprob) *logprob = s.logprob_of(s.sampled_logit);
    return s.sampled;
  }
  if (!s.full.empty()) return sample(s.full.data(), vocab, logprob);
  const int64_t top = static_cast<int64_t>(s.top_ids.size());
  if (top == 0 || needs_full_row(top))
    fail(ErrorKind::internal, "sampler", "a summary of {} logits cannot serve this sampling (top_k {})", top, p_.top_k);
  int32_t tok;
  float val;
  if (p_.temperature <= 0.0) {
    tok = s.top_ids[0];
    val = s.top_vals[0];
  } else {
    const int64_t keep = std::min<int64_t>(p_.top_k, vocab);
    tok = pick_sorted(s.top_ids.data(), s.top_vals.data(), keep, p_.temperature, p_.top_p, draw());
    val = s.top_vals[std::find(s.top_ids.begin(), s.top_ids.begin() + keep, tok) - s.top_ids.begin()];
  }
  if (logprob) *logprob = s.logprob_of(val);
  return tok;
}

}  // namespace kscope
