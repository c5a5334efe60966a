// The statistics of the trait pipeline, small and exact enough to test against closed forms: difference of
// means, an L2-regularized logistic-regression probe, the principal direction of paired differences, AUROC,
// accuracy and effect size of projections.
#pragma once
#include <cstdint>
#include <vector>

namespace kscope::stats {

// Rows of a dense [n, d] matrix, row-major.
struct Rows {
  std::vector<float> x;
  int64_t n = 0, d = 0;
  const float* row(int64_t i) const { return x.data() + i * d; }
};

std::vector<double> mean_row(const Rows& a);
// mean(pos) - mean(neg)
std::vector<double> mean_difference(const Rows& pos, const Rows& neg);

struct ProbeOptions {
  double C = 1.0;          // inverse regularization strength, as scikit-learn's: loss = C·Σ logloss + ½‖w‖²
  bool normalize_rows = true;  // fit on x/‖x‖ (activation norms vary a lot across tokens and prompts)
  int max_iter = 50;
  double tol = 1e-14;      // stop when half the Newton decrement falls below this
};
struct Probe {
  std::vector<double> w;  // [d]
  double b = 0;           // intercept (regularized with the weights, liblinear's convention)
  int iterations = 0;
  double loss = 0;        // the objective at the solution
  double grad_norm = 0;   // ‖∇‖ at the solution (0 at the optimum)
};
// Logistic regression, pos labelled 1 and neg 0, by Newton's method with the Hessian solved through the
// n×n kernel (Woodbury), so d in the thousands costs O(n²d) per step.
Probe logistic_probe(const Rows& pos, const Rows& neg, const ProbeOptions& o = {});
double probe_logit(const Probe& p, const float* x, int64_t d, bool normalize_rows);

// The top eigenvector of the second-moment matrix of the paired differences pos_i - neg_i (uncentered: PCA of
// the differences together with their negations, as RepE's random pair flips make it), signed to agree with
// the mean difference. Power iteration on the n×n Gram matrix. eigenvalue_share: its share of the trace.
std::vector<double> paired_pca(const Rows& pos, const Rows& neg, double* eigenvalue_share = nullptr);

// Area under the ROC curve of scores (positives should score higher); ties count one half.
double auroc(const std::vector<double>& pos, const std::vector<double>& neg);
// Cohen's d with the pooled standard deviation.
double cohens_d(const std::vector<double>& pos, const std::vector<double>& neg);
// Fraction classified right with "score > threshold means positive".
double accuracy(const std::vector<double>& pos, const std::vector<double>& neg, double threshold);

double dot(const float* a, const std::vector<double>& b);
double norm(const std::vector<double>& v);
// Solves A x = b for symmetric positive-definite A [n, n] (Cholesky; A is overwritten).
std::vector<double> cholesky_solve(std::vector<double>& A, std::vector<double> b, int64_t n);

}  // namespace kscope::stats
