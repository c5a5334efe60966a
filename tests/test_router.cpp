// Router top-k against hand-computed cases: the correction bias chooses but does not weigh, groups are
// scored by their top-2 (noaux_tc) or best (group_limited_greedy), masked groups never win, weights are
// normalized and scaled; softmax scoring too.
#include <gtest/gtest.h>

#include <cmath>

#include "backend/cpu/cpu_backend.hpp"

using namespace kscope;

namespace {

ModelConfig router_cfg(int64_t E, int64_t K, int64_t G, int64_t TG) {
  ModelConfig c;
  c.n_routed_experts = E;
  c.num_experts_per_tok = K;
  c.n_group = G;
  c.topk_group = TG;
  c.norm_topk_prob = true;
  c.routed_scaling_factor = 2.0;
  return c;
}

float logit(float p) { return std::log(p / (1 - p)); }  // sigmoid^-1

struct Routed {
  std::vector<int32_t> idx;
  std::vector<float> w;
};
Routed route(const ModelConfig& c, const std::vector<float>& logits, const std::vector<float>& bias) {
  CpuBackend be;
  Routed r{std::vector<int32_t>(c.num_experts_per_tok), std::vector<float>(c.num_experts_per_tok)};
  be.route(c, logits.data(), bias, 1, r.idx.data(), r.w.data());
  return r;
}

TEST(Router, bias_changes_the_choice_but_weights_come_from_raw_scores) {
  auto c = router_cfg(4, 2, 1, 1);
  const std::vector<float> l = {logit(.9f), logit(.8f), logit(.7f), logit(.1f)};
  auto r = route(c, l, {0, 0, 0, 0});
  EXPECT_EQ(r.idx, (std::vector<int32_t>{0, 1}));
  EXPECT_NEAR(r.w[0], 2.0 * .9 / 1.7, 1e-6);
  r = route(c, l, {0, 0, 0, 0.85f});  // expert 3: .1 + .85 = .95 now chosen first
  EXPECT_EQ(r.idx, (std::vector<int32_t>{3, 0}));
  EXPECT_NEAR(r.w[0], 2.0 * .1 / 1.0, 1e-6);  // weight from the raw score .1
  EXPECT_NEAR(r.w[1], 2.0 * .9 / 1.0, 1e-6);
}

TEST(Router, groups_are_scored_by_their_two_best_and_masked_groups_never_win) {
  // 8 experts in 4 groups of 2; keep 2 groups. Group sums: g0 .9+.1=1.0, g1 .6+.6=1.2, g2 .55+.55=1.1, g3 .2+.2
  auto c = router_cfg(8, 3, 4, 2);
  const std::vector<float> p = {.9f, .1f, .6f, .6f, .55f, .55f, .2f, .2f};
  std::vector<float> l;
  for (float x : p) l.push_back(logit(x));
  auto r = route(c, l, std::vector<float>(8, 0.f));
  // groups 1 and 2 win; expert 0 (.9, the best single) is in a masked group
  EXPECT_EQ(r.idx, (std::vector<int32_t>{2, 3, 4}));
  // with negative bias everywhere, masked experts (-inf) still never appear
  r = route(c, l, std::vector<float>(8, -5.f));
  for (auto i : r.idx) EXPECT_TRUE(i >= 2 && i <= 5) << i;
}

TEST(Router, group_limited_greedy_scores_groups_by_their_best) {
  auto c = router_cfg(8, 2, 4, 1);
  c.topk_method = TopkMethod::group_limited_greedy;
  c.scoring_func = ScoringFunc::softmax;
  c.norm_topk_prob = false;
  c.routed_scaling_factor = 1.0;
  const std::vector<float> l = {3.f, -2.f, 2.f, 2.f, 0.f, 0.f, 0.f, 0.f};
  auto r = route(c, l, {});
  EXPECT_EQ(r.idx, (std::vector<int32_t>{0, 1}));  // group 0 holds the single best
  double z = 0;
  for (float x : l) z += std::exp(x);
  EXPECT_NEAR(r.w[0], std::exp(3.0) / z, 1e-6);  // softmax over all experts, unnormalized top-k
  EXPECT_NEAR(r.w[1], std::exp(-2.0) / z, 1e-7);
}

TEST(Router, greedy_ignores_groups) {
  auto c = router_cfg(8, 2, 4, 1);
  c.topk_method = TopkMethod::greedy;
  const std::vector<float> l = {5.f, -2.f, 4.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  EXPECT_EQ(route(c, l, {}).idx, (std::vector<int32_t>{0, 2}));
}

}  // namespace
