// Generation: sampling rules, stop tokens and finish reasons, and rows that do not see each other.
#include <gtest/gtest.h>

#include <cmath>
#include <deque>
#include <map>

#include "backend/backend.hpp"
#include "model/make_model.hpp"
#include "model/model.hpp"
#include "runtime/generate.hpp"
#include "testutil.hpp"
#include "util/error.hpp"

using namespace kscope;

namespace {

class Generate : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new test::TempDir;
    MakeModelSpec s;
    s.preset = "tiny";
    s.seed = 11;
    make_model(dir_->str() + "/m", s);
    model_ = Model::load(dir_->str() + "/m").release();
  }
  static void TearDownTestSuite() {
    delete model_;
    delete dir_;
  }
  static GenerateRequest req(std::vector<int32_t> p, int64_t n, double temp = 0, uint64_t seed = 0) {
    GenerateRequest r;
    r.prompt = std::move(p);
    r.max_new_tokens = n;
    r.sampling.temperature = temp;
    r.sampling.seed = seed;
    r.ignore_eos = true;
    return r;
  }
  static test::TempDir* dir_;
  static Model* model_;
};
test::TempDir* Generate::dir_ = nullptr;
Model* Generate::model_ = nullptr;

TEST(Sampler, greedy_takes_the_first_maximum) {
  Sampler s({});
  const float l[5] = {0.1f, 2.0f, -1.0f, 2.0f, 0.5f};
  float lp;
  EXPECT_EQ(s.sample(l, 5, &lp), 1);
  // log p(1) = 2 - log(sum exp)
  double z = 0;
  for (float x : l) z += std::exp(x);
  EXPECT_NEAR(lp, 2.0 - std::log(z), 1e-6);
}

TEST(Sampler, sampling_frequencies_follow_temperature_top_k_and_top_p) {
  const float l[4] = {std::log(0.5f), std::log(0.3f), std::log(0.15f), std::log(0.05f)};
  auto freq = [&](SamplingParams p, int n) {
    Sampler s(p);
    std::map<int, int> c;
    for (int i = 0; i < n; ++i) ++c[s.sample(l, 4)];
    return c;
  };
  const int n = 20000;
  auto f = freq({1.0, 0, 1.0, 3}, n);
  EXPECT_NEAR(f[0] / double(n), 0.5, 0.02);
  EXPECT_NEAR(f[3] / double(n), 0.05, 0.01);
  f = freq({1.0, 2, 1.0, 3}, n);  // top-k 2: renormalized 0.5/0.8, 0.3/0.8
  EXPECT_EQ(f[2] + f[3], 0);
  EXPECT_NEAR(f[0] / double(n), 0.625, 0.02);
  f = freq({1.0, 0, 0.8, 3}, n);  // top-p 0.8: {0, 1} reach 0.8
  EXPECT_EQ(f[2] + f[3], 0);
  f = freq({0.25, 0, 1.0, 3}, n);  // low temperature sharpens: p ∝ p^4
  const double z = std::pow(.5, 4) + std::pow(.3, 4) + std::pow(.15, 4) + std::pow(.05, 4);
  EXPECT_NEAR(f[0] / double(n), std::pow(.5, 4) / z, 0.02);
}

TEST(Sampler, the_same_seed_gives_the_same_tokens) {
  std::vector<float> l(100);
  for (int i = 0; i < 100; ++i) l[i] = std::sin(i * 1.3f);
  Sampler a({0.9, 0, 1.0, 42}), b({0.9, 0, 1.0, 42}), c({0.9, 0, 1.0, 43});
  std::vector<int> ta, tb, tc;
  for (int i = 0; i < 50; ++i) {
    ta.push_back(a.sample(l.data(), 100));
    tb.push_back(b.sample(l.data(), 100));
    tc.push_back(c.sample(l.data(), 100));
  }
  EXPECT_EQ(ta, tb);
  EXPECT_NE(ta, tc);
}

TEST_F(Generate, sampled_rows_are_the_same_alone_or_batched_with_others_of_other_lengths) {
  std::vector<GenerateRequest> reqs = {req({1, 2, 3}, 12, 0.8, 5), req({7}, 9, 0.0), req({9, 8, 7, 6, 5, 4, 3, 2, 1}, 12, 1.2, 6),
                                       req({100, 200}, 3, 0.5, 7)};
  const auto batched = generate(*model_, reqs);
  for (size_t i = 0; i < reqs.size(); ++i) {
    const auto alone = generate(*model_, {reqs[i]});
    EXPECT_EQ(alone[0].tokens, batched[i].tokens) << i;
    EXPECT_EQ(alone[0].logprobs, batched[i].logprobs) << i;  // bit-identical: no padding, fixed summation order
    EXPECT_EQ(batched[i].tokens.size(), static_cast<size_t>(reqs[i].max_new_tokens));
    EXPECT_EQ(batched[i].finish, FinishReason::length);
  }
}

TEST_F(Generate, stop_tokens_end_a_row_without_ending_the_batch) {
  const auto free_run = generate(*model_, {req({4, 5, 6}, 10)})[0];
  ASSERT_GE(free_run.tokens.size(), 5u);
  auto r = req({4, 5, 6}, 10);
  r.stop_tokens = {free_run.tokens[3]};
  // the stop id may appear earlier too: the row stops at its first occurrence
  size_t first = 0;
  while (free_run.tokens[first] != free_run.tokens[3]) ++first;
  const auto res = generate(*model_, {r, req({4, 5, 6}, 10)});
  EXPECT_EQ(res[0].finish, FinishReason::stop);
  EXPECT_EQ(res[0].stop_token, free_run.tokens[3]);
  EXPECT_EQ(res[0].tokens, std::vector<int32_t>(free_run.tokens.begin(), free_run.tokens.begin() + first));
  EXPECT_EQ(res[0].logprobs.size(), first + 1);  // the stop token's log-probability is reported too
  EXPECT_EQ(res[1].tokens, free_run.tokens);   // the other row ran on
}

TEST_F(Generate, the_configs_eos_stops_unless_ignored) {
  const auto free_run = generate(*model_, {req({10, 11}, 8)})[0];
  // make the model's eos the token it would emit third, via a copy of the config
  ModelConfig cfg = model_->config();
  cfg.eos_token_ids = {free_run.tokens[2]};
  Model m(cfg, ModelWeights::load(cfg, dir_->str() + "/m"), nullptr);
  auto r = req({10, 11}, 8);
  r.ignore_eos = false;
  const auto res = generate(m, {r})[0];
  EXPECT_EQ(res.finish, FinishReason::stop);
  EXPECT_LE(res.tokens.size(), 2u);
  r.ignore_eos = true;
  EXPECT_EQ(generate(m, {r})[0].tokens, free_run.tokens);
}

TEST_F(Generate, a_row_stops_at_the_context_limit) {
  ModelConfig cfg = model_->config();
  cfg.max_position_embeddings = 6;
  Model m(cfg, ModelWeights::load(cfg, dir_->str() + "/m"), nullptr);
  const auto res = generate(m, {req({1, 2, 3, 4}, 10)})[0];
  EXPECT_EQ(res.finish, FinishReason::context);
  EXPECT_EQ(res.tokens.size(), 3u);  // positions 4 and 5 filled by generated tokens, the third has no room
}

TEST_F(Generate, bad_requests_name_the_request_and_field) {
  auto expect = [&](GenerateRequest r, const std::string& frag) {
    try {
      generate(*model_, {req({1}, 1), r});
      FAIL() << frag;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("request 1"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(frag), std::string::npos) << e.what();
    }
  };
  expect(req({}, 3), "empty");
  expect(req({1, 99999}, 3), "99999");
  expect(req({-4}, 3), "-4");
  auto r = req({1}, 3);
  r.sampling.top_p = 0;
  expect(r, "top_p");
  r = req({1}, 3);
  r.stop_tokens = {100000};
  expect(r, "stop token");
  r = req({1}, 3);
  r.sampling.temperature = -1;
  expect(r, "temperature");
}

// A router hook that writes an expert id out of range, or the same expert twice for one token, gets a clear error
// naming the layer and the expert (the MoE kernels count on k distinct experts per token).
TEST_F(Generate, a_router_hook_writing_a_bad_choice_is_told_what_is_wrong) {
  struct Bad : Hook {
    bool twice = false;
    bool wants(const Site& s) const override { return s.kind == SiteKind::router; }
    bool writes(const Site&) const override { return true; }
    void on(const Site&, int64_t, float*, int64_t, int64_t, int64_t) override {}
    void on_router(int64_t, int64_t, const float*, int32_t* idx, float*, int64_t, int64_t e, int64_t k, int64_t) override {
      if (twice && k > 1) idx[1] = idx[0];
      else idx[0] = static_cast<int32_t>(e);
    }
  };
  for (bool twice : {false, true}) {
    Bad bad;
    bad.twice = twice;
    GenerateOptions o;
    o.observer = &bad;
    try {
      generate(*model_, {req({1, 2, 3}, 2)}, o);
      FAIL() << "no error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(twice ? "twice" : "outside"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("router hook"), std::string::npos) << e.what();
    }
  }
}

TEST_F(Generate, zero_new_tokens_returns_empty_rows) {
  const auto res = generate(*model_, {req({1, 2}, 0)});
  EXPECT_TRUE(res[0].tokens.empty());
  EXPECT_EQ(res[0].finish, FinishReason::length);
}

// A forward pass cut into passes of at most N new tokens (Model::set_max_pass_tokens: what bounds the GPU's
// workspace) gives the same bits as one pass: generation (prefills split mid-prompt, sampled and greedy rows), all
// logits of a prompt, and what a hook reads at every layer, row by row with its positions.
TEST_F(Generate, passes_cut_at_a_token_limit_give_the_same_bits_as_one_pass) {
  struct Recorder : Hook {
    std::map<std::pair<int64_t, int64_t>, std::vector<float>> rows;  // (layer, seq) -> rows in order
    std::map<std::pair<int64_t, int64_t>, std::vector<int64_t>> pos;
    bool wants(const Site& s) const override { return s.kind == SiteKind::resid_post || s.kind == SiteKind::attn_out; }
    bool writes(const Site&) const override { return false; }
    void on(const Site& s, int64_t seq, float* d, int64_t n, int64_t w, int64_t pos0) override {
      const auto key = std::make_pair(s.layer * 2 + (s.kind == SiteKind::attn_out), seq);
      rows[key].insert(rows[key].end(), d, d + n * w);
      for (int64_t t = 0; t < n; ++t) pos[key].push_back(pos0 + t);
    }
  };
  std::vector<GenerateRequest> reqs = {req({3, 14, 15, 92, 65, 35, 89}, 6, 0.9, 5), req({2, 71, 82}, 6),
                                       req({1, 41, 42, 13, 56, 23, 73, 9, 99, 12, 7, 31, 30}, 6, 1.2, 8)};
  std::vector<std::vector<GenerateResult>> runs;
  std::deque<Recorder> recs(3);
  int k = 0;
  for (int64_t limit : {0, 4, 1}) {
    model_->set_max_pass_tokens(limit);
    GenerateOptions o;
    o.observer = &recs[k++];
    runs.push_back(generate(*model_, reqs, o));
  }
  model_->set_max_pass_tokens(0);
  {  // the device path of hooks (staged rows, row ops, reads on the delivery thread), passes of 3 tokens
    auto staged = Model::load(dir_->str() + "/m", make_backend("cpu-staged"));
    staged->set_max_pass_tokens(3);
    recs.emplace_back();
    GenerateOptions o;
    o.observer = &recs.back();
    runs.push_back(generate(*staged, reqs, o));
  }
  for (size_t r = 1; r < runs.size(); ++r) {
    for (size_t i = 0; i < reqs.size(); ++i) {
      EXPECT_EQ(runs[r][i].tokens, runs[0][i].tokens) << "run " << r << " seq " << i;
      EXPECT_EQ(runs[r][i].logprobs, runs[0][i].logprobs) << "run " << r << " seq " << i;
    }
    EXPECT_EQ(recs[r].rows, recs[0].rows) << "run " << r;
    EXPECT_EQ(recs[r].pos, recs[0].pos) << "run " << r;
  }
  // every logit of two prompts, one pass vs passes of 5 tokens
  auto all_logits = [&](int64_t limit) {
    model_->set_max_pass_tokens(limit);
    KvCache a = model_->new_cache(), b = model_->new_cache();
    std::vector<ForwardItem> items = {{&a, reqs[0].prompt.data(), 7, true}, {&b, reqs[2].prompt.data(), 13, true}};
    std::vector<std::vector<float>> lg;
    model_->forward(items, lg);
    model_->set_max_pass_tokens(0);
    EXPECT_EQ(a.length, 7);
    EXPECT_EQ(b.length, 13);
    return lg;
  };
  const auto one = all_logits(0), cut = all_logits(5);
  ASSERT_EQ(one[1].size(), static_cast<size_t>(13 * model_->config().vocab_size));
  EXPECT_EQ(cut, one);
}

}  // namespace
