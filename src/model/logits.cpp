#include "model/logits.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace kscope {

int32_t pick_sorted(const int32_t* ids, const float* vals, int64_t keep, double temperature, double top_p, double u) {
  std::vector<double> pr(keep);
  const double mx = vals[0];
  double s = 0;
  for (int64_t i = 0; i < keep; ++i) s += (pr[i] = std::exp((vals[i] - mx) / temperature));
  for (auto& v : pr) v /= s;
  if (top_p < 1.0) {  // smallest prefix whose mass reaches top_p
    double c = 0;
    int64_t m = 0;
    while (m < keep) {
      c += pr[m++];
      if (c >= top_p) break;
    }
    keep = std::max<int64_t>(1, m);
    s = 0;
    for (int64_t i = 0; i < keep; ++i) s += pr[i];
    for (int64_t i = 0; i < keep; ++i) pr[i] /= s;
  }
  double c = 0;
  for (int64_t i = 0; i < keep; ++i) {
    c += pr[i];
    if (u < c) return ids[i];
  }
  return ids[keep - 1];
}

int32_t choose_with_draw(const float* l, int64_t n, const RowDraw& d) {
  std::vector<int32_t> ids(n);
  std::iota(ids.begin(), ids.end(), 0);
  auto by_logit = [&](int32_t a, int32_t b) { return l[a] > l[b] || (l[a] == l[b] && a < b); };
  int64_t keep = n;
  if (d.top_k > 0 && d.top_k < n) {
    keep = d.top_k;
    std::partial_sort(ids.begin(), ids.begin() + keep, ids.end(), by_logit);
  } else {
    std::sort(ids.begin(), ids.end(), by_logit);
  }
  std::vector<float> vals(keep);
  for (int64_t i = 0; i < keep; ++i) vals[i] = l[ids[i]];
  return pick_sorted(ids.data(), vals.data(), keep, d.temperature, d.top_p, d.u);
}

}  // namespace kscope
