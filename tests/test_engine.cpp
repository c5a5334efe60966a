// Continuous batching: requests that join a running batch, with different interventions, get exactly the
// tokens and log-probabilities they get alone; cancel, queue limits and inline capture behave.
#include <gtest/gtest.h>

#include <future>

#include "runtime/engine.hpp"
#include "runtime/generate.hpp"
#include "testutil.hpp"
#include "util/error.hpp"

using namespace kscope;

namespace {

struct Waiter {
  std::promise<EngineResult> p;
  std::future<EngineResult> f = p.get_future();
};

EngineRequest req(std::vector<int32_t> prompt, int64_t n, double temp, uint64_t seed, std::shared_ptr<Waiter> w) {
  EngineRequest r;
  r.prompt = std::move(prompt);
  r.max_new_tokens = n;
  r.sampling = {temp, 0, 1.0, seed};
  r.ignore_eos = true;
  r.on_done = [w](EngineResult res) { w->p.set_value(std::move(res)); };
  return r;
}

class EngineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { model_ = Model::load(std::string(KSCOPE_SOURCE_DIR) + "/models/demo").release(); }
  static void TearDownTestSuite() { delete model_; }
  static Model* model_;
};
Model* EngineTest::model_ = nullptr;

TEST_F(EngineTest, requests_joining_a_running_batch_match_generation_alone) {
  Engine engine(*model_, 8, 64);
  std::vector<float> v(256);
  for (int i = 0; i < 256; ++i) v[i] = std::sin(0.2f * i);
  std::vector<std::shared_ptr<Waiter>> ws;
  std::vector<EngineRequest> copies;
  for (int i = 0; i < 6; ++i) {
    auto w = std::make_shared<Waiter>();
    std::vector<int32_t> prompt;
    for (int t = 0; t < 3 + i * 2; ++t) prompt.push_back(100 + 37 * t + i);
    auto r = req(prompt, 10 + i, i % 2 ? 0.8 : 0.0, 10 + i, w);
    if (i % 3 == 1) {
      Intervention iv;
      iv.site = {SiteKind::resid_post, 1 + i % 3};
      iv.vector = v;
      iv.coef = 0.7 * i;
      iv.positions = PositionSpec::parse("response");
      r.interventions = {iv};
    }
    copies.push_back(r);
    engine.submit(std::move(r));
    ws.push_back(w);
    if (i == 2) std::this_thread::sleep_for(std::chrono::milliseconds(30));  // later ones join a running batch
  }
  for (int i = 0; i < 6; ++i) {
    const EngineResult got = ws[i]->f.get();
    GenerateRequest g;
    g.prompt = copies[i].prompt;
    g.max_new_tokens = copies[i].max_new_tokens;
    g.sampling = copies[i].sampling;
    g.ignore_eos = true;
    SteeringHook steer({copies[i].interventions}, {SeqLayout{static_cast<int64_t>(g.prompt.size())}});
    GenerateOptions o;
    o.observer = &steer;
    const auto alone = generate(*model_, {g}, o)[0];
    EXPECT_EQ(got.tokens, alone.tokens) << i;
    EXPECT_EQ(got.logprobs, alone.logprobs) << i;
    EXPECT_EQ(got.finish_reason, "length");
  }
  const auto st = engine.stats();
  EXPECT_EQ(st.completed, 6);
  EXPECT_GT(st.generated_tokens, 60);
}

TEST_F(EngineTest, a_request_can_be_cancelled_from_its_token_callback_or_by_id) {
  Engine engine(*model_, 4, 16);
  auto w = std::make_shared<Waiter>();
  auto r = req({5, 6, 7}, 50, 0.0, 0, w);
  int seen = 0;
  r.on_token = [&seen](const TokenEvent&) { return ++seen < 3; };
  engine.submit(std::move(r));
  const auto res = w->f.get();
  EXPECT_EQ(res.finish_reason, "cancelled");
  EXPECT_EQ(res.tokens.size(), 3u);
  auto w2 = std::make_shared<Waiter>();
  const uint64_t id = engine.submit(req({5, 6, 7}, 900, 0.0, 0, w2));
  engine.cancel(id);
  EXPECT_EQ(w2->f.get().finish_reason, "cancelled");
}

TEST_F(EngineTest, a_full_queue_refuses_and_bad_requests_name_the_field) {
  Engine engine(*model_, 1, 2);
  std::vector<std::shared_ptr<Waiter>> ws;
  int refused = 0;
  for (int i = 0; i < 12; ++i) {
    auto w = std::make_shared<Waiter>();
    try {
      engine.submit(req({1, 2, 3}, 200, 0.0, 0, w));
      ws.push_back(w);
    } catch (const QueueFull&) {
      ++refused;
    }
  }
  EXPECT_GT(refused, 0);
  for (auto& w : ws) w->f.get();
  auto expect = [&](EngineRequest r, const std::string& frag) {
    try {
      engine.submit(std::move(r));
      FAIL() << frag;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(frag), std::string::npos) << e.what();
    }
  };
  auto w = std::make_shared<Waiter>();
  expect(req({}, 3, 0, 0, w), "prompt");
  expect(req({1, 99999}, 3, 0, 0, w), "99999");
  auto r = req({1}, 3, 0, 0, w);
  r.sampling.top_p = 2;
  expect(r, "top_p");
  r = req({1}, 0, 0, 0, w);
  expect(r, "max_tokens");
}

TEST_F(EngineTest, inline_capture_equals_a_capture_run) {
  Engine engine(*model_, 4, 16);
  auto w = std::make_shared<Waiter>();
  auto r = req({10, 20, 30, 40}, 5, 0.0, 0, w);
  CaptureSpec spec;
  spec.sites = {{SiteKind::resid_post, 2}};
  spec.positions = PositionSpec::parse("prompt[-1],response");
  r.capture = spec;
  engine.submit(std::move(r));
  const auto res = w->f.get();
  ASSERT_TRUE(res.capture.has_value());
  CaptureRequest c;
  c.prompt = {10, 20, 30, 40};
  c.generate = true;
  c.gen.max_new_tokens = 5;
  c.gen.ignore_eos = true;
  const auto ref = run_capture(*model_, {c}, spec)[0];
  EXPECT_EQ(res.capture->positions, ref.positions);
  EXPECT_EQ(res.capture->rows.at("2.resid_post"), ref.rows.at("2.resid_post"));
  EXPECT_EQ(res.capture->positions.size(), 6u);
}

}  // namespace
