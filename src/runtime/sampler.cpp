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

int32_t Sampler::pick(const int32_t* ids, const float* vals, int64_t keep) {
  std::vector<double> pr(keep);
  const double mx = vals[0];
  double s = 0;
  for (int64_t i = 0; i < keep; ++i) s += (pr[i] = std::exp((vals[i] - mx) / p_.temperature));
  for (auto& v : pr) v /= s;
  if (p_.top_p < 1.0) {  // smallest prefix whose mass reaches top_p
    double c = 0;
    int64_t m = 0;
    while (m < keep) {
      c += pr[m++];
      if (c >= p_.top_p) break;
    }
    keep = std::max<int64_t>(1, m);
    s = 0;
    for (int64_t i = 0; i < keep; ++i) s += pr[i];
    for (int64_t i = 0; i < keep; ++i) pr[i] /= s;
  }
  const double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng_);
  double c = 0;
  for (int64_t i = 0; i < keep; ++i) {
    c += pr[i];
    if (u < c) return ids[i];
  }
  return ids[keep - 1];
}

int32_t Sampler::sample(const float* l, int64_t n, float* logprob) {
  int32_t tok;
  if (p_.temperature <= 0.0) {
    tok = static_cast<int32_t>(std::max_element(l, l + n) - l);  // first maximum: lowest id on ties
  } else {
    std::vector<int32_t> ids(n);
    std::iota(ids.begin(), ids.end(), 0);
    // candidates sorted by logit, descending (ties: lower id first)
    auto by_logit = [&](int32_t a, int32_t b) { return l[a] > l[b] || (l[a] == l[b] && a < b); };
    int64_t keep = n;
    if (p_.top_k > 0 && p_.top_k < n) {
      keep = p_.top_k;
      std::partial_sort(ids.begin(), ids.begin() + keep, ids.end(), by_logit);
    } else {
      std::sort(ids.begin(), ids.end(), by_logit);
    }
    std::vector<float> vals(keep);
    for (int64_t i = 0; i < keep; ++i) vals[i] = l[ids[i]];
    tok = pick(ids.data(), vals.data(), keep);
  }
  if (logprob) *logprob = log_softmax_at(l, n, tok);
  return tok;
}

int32_t Sampler::sample(const LogitSummary& s, int64_t vocab, float* logprob) {
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
    tok = pick(s.top_ids.data(), s.top_vals.data(), keep);
    val = s.top_vals[std::find(s.top_ids.begin(), s.top_ids.begin() + keep, tok) - s.top_ids.begin()];
  }
  if (logprob) *logprob = s.logprob_of(val);
  return tok;
}

}  // namespace kscope
