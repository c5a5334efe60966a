#include "trait/stats.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "util/error.hpp"

namespace kscope::stats {

double dot(const float* a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < b.size(); ++i) s += a[i] * b[i];
  return s;
}

double norm(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x * x;
  return std::sqrt(s);
}

std::vector<double> mean_row(const Rows& a) {
  std::vector<double> m(a.d, 0.0);
  for (int64_t i = 0; i < a.n; ++i)
    for (int64_t j = 0; j < a.d; ++j) m[j] += a.row(i)[j];
  for (auto& x : m) x /= static_cast<double>(std::max<int64_t>(a.n, 1));
  return m;
}

std::vector<double> mean_difference(const Rows& pos, const Rows& neg) {
  if (pos.d != neg.d) fail(ErrorKind::input, "mean difference", "widths differ ({} and {})", pos.d, neg.d);
  if (pos.n == 0 || neg.n == 0) fail(ErrorKind::input, "mean difference", "a side has no rows");
  auto a = mean_row(pos);
  const auto b = mean_row(neg);
  for (size_t j = 0; j < a.size(); ++j) a[j] -= b[j];
  return a;
}

std::vector<double> cholesky_solve(std::vector<double>& A, std::vector<double> b, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    double s = A[j * n + j];
    for (int64_t k = 0; k < j; ++k) s -= A[j * n + k] * A[j * n + k];
    if (!(s > 0)) fail(ErrorKind::internal, "cholesky", "matrix not positive definite (pivot {} = {})", j, s);
    const double l = std::sqrt(s);
    A[j * n + j] = l;
    for (int64_t i = j + 1; i < n; ++i) {
      double t = A[i * n + j];
      for (int64_t k = 0; k < j; ++k) t -= A[i * n + k] * A[j * n + k];
      A[i * n + j] = t / l;
    }
  }
  for (int64_t i = 0; i < n; ++i) {  // L y = b
    double t = b[i];
    for (int64_t k = 0; k < i; ++k) t -= A[i * n + k] * b[k];
    b[i] = t / A[i * n + i];
  }
  for (int64_t i = n - 1; i >= 0; --i) {  // Lᵀ x = y
    double t = b[i];
    for (int64_t k = i + 1; k < n; ++k) t -= A[k * n + i] * b[k];
    b[i] = t / A[i * n + i];
  }
  return b;
}

namespace {

// The design matrix of the probe: rows (normalized or not) with a constant 1 appended, in double.
struct Design {
  std::vector<double> z;  // [n, d+1]
  std::vector<double> y;  // 0/1
  int64_t n = 0, d1 = 0;
};

Design design(const Rows& pos, const Rows& neg, bool normalize) {
  Design D;
  D.n = pos.n + neg.n;
  D.d1 = pos.d + 1;
  D.z.resize(D.n * D.d1);
  D.y.resize(D.n);
  int64_t r = 0;
  for (int side = 0; side < 2; ++side) {
    const Rows& s = side == 0 ? pos : neg;
    for (int64_t i = 0; i < s.n; ++i, ++r) {
      double nn = 0;
      for (int64_t j = 0; j < s.d; ++j) nn += static_cast<double>(s.row(i)[j]) * s.row(i)[j];
      const double sc = normalize && nn > 0 ? 1.0 / std::sqrt(nn) : 1.0;
      for (int64_t j = 0; j < s.d; ++j) D.z[r * D.d1 + j] = s.row(i)[j] * sc;
      D.z[r * D.d1 + s.d] = 1.0;
      D.y[r] = side == 0 ? 1.0 : 0.0;
    }
  }
  return D;
}

double softplus(double m) { return m > 0 ? m + std::log1p(std::exp(-m)) : std::log1p(std::exp(m)); }

}  // namespace

Probe logistic_probe(const Rows& pos, const Rows& neg, const ProbeOptions& o) {
  if (pos.d != neg.d) fail(ErrorKind::input, "probe", "widths differ ({} and {})", pos.d, neg.d);
  if (pos.n == 0 || neg.n == 0) fail(ErrorKind::input, "probe", "a side has no rows");
  if (!(o.C > 0)) fail(ErrorKind::input, "probe", "C must be positive (got {})", o.C);
  const Design D = design(pos, neg, o.normalize_rows);
  const int64_t n = D.n, d1 = D.d1;
  // K = Z Zᵀ once
  std::vector<double> K(n * n);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j <= i; ++j) {
      double s = 0;
      for (int64_t k = 0; k < d1; ++k) s += D.z[i * d1 + k] * D.z[j * d1 + k];
      K[i * n + j] = K[j * n + i] = s;
    }
  std::vector<double> th(d1, 0.0), m(n), p(n), g(d1);
  auto objective = [&](const std::vector<double>& t, std::vector<double>& margin) {
    double f = 0;
    for (int64_t i = 0; i < n; ++i) {
      double s = 0;
      for (int64_t k = 0; k < d1; ++k) s += D.z[i * d1 + k] * t[k];
      margin[i] = s;
      f += o.C * softplus(D.y[i] > 0.5 ? -s : s);
    }
    for (double x : t) f += 0.5 * x * x;
    return f;
  };
  double f = objective(th, m);
  Probe out;
  for (int it = 0; it < o.max_iter; ++it) {
    for (int64_t i = 0; i < n; ++i) p[i] = 1.0 / (1.0 + std::exp(-m[i]));
    // g = C Zᵀ(p - y) + θ
    for (int64_t k = 0; k < d1; ++k) g[k] = th[k];
    for (int64_t i = 0; i < n; ++i) {
      const double r = o.C * (p[i] - D.y[i]);
      for (int64_t k = 0; k < d1; ++k) g[k] += r * D.z[i * d1 + k];
    }
    // δ = H⁻¹g with H = I + C ZᵀSZ: δ = g - Zᵀ(s ⊙ M⁻¹(s ⊙ Zg)), M = I + diag(s) K diag(s), s = sqrt(C p(1-p))
    std::vector<double> s(n), zg(n, 0.0);
    for (int64_t i = 0; i < n; ++i) {
      s[i] = std::sqrt(o.C * p[i] * (1 - p[i]));
      for (int64_t k = 0; k < d1; ++k) zg[i] += D.z[i * d1 + k] * g[k];
      zg[i] *= s[i];
    }
    std::vector<double> M(n * n);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) M[i * n + j] = (i == j ? 1.0 : 0.0) + s[i] * K[i * n + j] * s[j];
    auto u = cholesky_solve(M, zg, n);
    std::vector<double> delta = g;
    for (int64_t i = 0; i < n; ++i) {
      const double c = s[i] * u[i];
      for (int64_t k = 0; k < d1; ++k) delta[k] -= c * D.z[i * d1 + k];
    }
    double dec = 0;
    for (int64_t k = 0; k < d1; ++k) dec += g[k] * delta[k];
    out.iterations = it + 1;
    if (dec / 2 < o.tol) break;
    // backtracking line search (Armijo)
    double t = 1.0;
    bool moved = false;
    std::vector<double> th2(d1), m2(n);
    for (int ls = 0; ls < 40; ++ls, t *= 0.5) {
      for (int64_t k = 0; k < d1; ++k) th2[k] = th[k] - t * delta[k];
      const double f2 = objective(th2, m2);
      if (f2 <= f - 0.25 * t * dec) {
        th.swap(th2);
        m.swap(m2);
        f = f2;
        moved = true;
        break;
      }
    }
    if (!moved) break;  // at the optimum within rounding
  }
  // final gradient norm
  for (int64_t i = 0; i < n; ++i) p[i] = 1.0 / (1.0 + std::exp(-m[i]));
  for (int64_t k = 0; k < d1; ++k) g[k] = th[k];
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < d1; ++k) g[k] += o.C * (p[i] - D.y[i]) * D.z[i * d1 + k];
  out.grad_norm = norm(g);
  out.loss = f;
  out.b = th[d1 - 1];
  out.w.assign(th.begin(), th.end() - 1);
  return out;
}

double probe_logit(const Probe& p, const float* x, int64_t d, bool normalize_rows) {
  double nn = 0, s = 0;
  for (int64_t j = 0; j < d; ++j) {
    nn += static_cast<double>(x[j]) * x[j];
    s += x[j] * p.w[j];
  }
  if (normalize_rows && nn > 0) s /= std::sqrt(nn);
  return s + p.b;
}

std::vector<double> paired_pca(const Rows& pos, const Rows& neg, double* share) {
  if (pos.d != neg.d || pos.n != neg.n) fail(ErrorKind::input, "paired PCA", "the sides must be paired row for row ({}x{} and {}x{})", pos.n, pos.d, neg.n, neg.d);
  if (pos.n == 0) fail(ErrorKind::input, "paired PCA", "no pairs");
  const int64_t n = pos.n, d = pos.d;
  std::vector<double> D(n * d);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < d; ++j) D[i * d + j] = static_cast<double>(pos.row(i)[j]) - neg.row(i)[j];
  std::vector<double> G(n * n);
  double trace = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j <= i; ++j) {
      double s = 0;
      for (int64_t k = 0; k < d; ++k) s += D[i * d + k] * D[j * d + k];
      G[i * n + j] = G[j * n + i] = s;
      if (i == j) trace += s;
    }
  // power iteration from a deterministic start that is not orthogonal to a sign-consistent eigenvector
  std::vector<double> u(n), nu(n);
  for (int64_t i = 0; i < n; ++i) u[i] = 1.0 + 0.01 * static_cast<double>(i % 7);
  double lambda = 0;
  for (int it = 0; it < 5000; ++it) {
    for (int64_t i = 0; i < n; ++i) {
      double s = 0;
      for (int64_t j = 0; j < n; ++j) s += G[i * n + j] * u[j];
      nu[i] = s;
    }
    const double nn = norm(nu);
    if (!(nn > 0)) break;
    double diff = 0;
    for (int64_t i = 0; i < n; ++i) {
      nu[i] /= nn;
      diff = std::max(diff, std::abs(nu[i] - u[i]));
    }
    u.swap(nu);
    lambda = nn;
    if (diff < 1e-13) break;
  }
  std::vector<double> v(d, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < d; ++j) v[j] += u[i] * D[i * d + j];
  const double vn = norm(v);
  if (vn > 0)
    for (auto& x : v) x /= vn;
  const auto md = mean_difference(pos, neg);
  double agree = 0;
  for (int64_t j = 0; j < d; ++j) agree += v[j] * md[j];
  if (agree < 0)
    for (auto& x : v) x = -x;
  if (share) *share = trace > 0 ? lambda / trace : 0.0;
  return v;
}

double auroc(const std::vector<double>& pos, const std::vector<double>& neg) {
  if (pos.empty() || neg.empty()) return std::nan("");
  std::vector<std::pair<double, int>> all;
  for (double x : pos) all.push_back({x, 1});
  for (double x : neg) all.push_back({x, 0});
  std::sort(all.begin(), all.end(), [](auto& a, auto& b) { return a.first < b.first; });
  double rank_sum = 0;  // ranks of the positives, ties averaged (1-based)
  for (size_t i = 0; i < all.size();) {
    size_t j = i;
    while (j < all.size() && all[j].first == all[i].first) ++j;
    const double r = (static_cast<double>(i + 1) + static_cast<double>(j)) / 2;
    for (size_t k = i; k < j; ++k)
      if (all[k].second) rank_sum += r;
    i = j;
  }
  const double np = pos.size(), nn = neg.size();
  return (rank_sum - np * (np + 1) / 2) / (np * nn);
}

double cohens_d(const std::vector<double>& pos, const std::vector<double>& neg) {
  auto mv = [](const std::vector<double>& x, double& m, double& v) {
    m = std::accumulate(x.begin(), x.end(), 0.0) / x.size();
    v = 0;
    for (double y : x) v += (y - m) * (y - m);
    v /= std::max<double>(1, x.size() - 1);
  };
  if (pos.size() < 2 || neg.size() < 2) return std::nan("");
  double mp, vp, mn, vn;
  mv(pos, mp, vp);
  mv(neg, mn, vn);
  const double pooled = std::sqrt(((pos.size() - 1) * vp + (neg.size() - 1) * vn) / (pos.size() + neg.size() - 2));
  return pooled > 0 ? (mp - mn) / pooled : (mp > mn ? INFINITY : mp < mn ? -INFINITY : 0.0);
}

double accuracy(const std::vector<double>& pos, const std::vector<double>& neg, double threshold) {
  if (pos.empty() && neg.empty()) return std::nan("");
  double right = 0;
  for (double x : pos) right += x > threshold;
  for (double x : neg) right += x <= threshold;
  return right / (pos.size() + neg.size());
}

}  // namespace kscope::stats
