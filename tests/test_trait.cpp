// The trait pipeline: statistics against closed forms and independent computations, the judge scoring rule,
// the self-judge against the model's own logits, the OpenAI-compatible judge client against a local test
// server (retries, cache, concurrency) and against kscope's own server, the adaptive search rule, datasets,
// and the whole pipeline end to end on the demo model (programmatic scorer, self-judge, HTTP judge), with
// resumption after a simulated crash and a steering run that moves the projection on the extracted vector.
#include <gtest/gtest.h>

#include <fmt/format.h>
#include <httplib.h>

#include <atomic>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "interp/capture.hpp"
#include "interp/vectors.hpp"
#include "runtime/generate.hpp"
#include "runtime/sampler.hpp"
#include "server/server.hpp"
#include "testutil.hpp"
#include "tokenizer/chat.hpp"
#include "tokenizer/tokenizer.hpp"
#include "trait/analysis.hpp"
#include "trait/dataset.hpp"
#include "trait/experiment.hpp"
#include "trait/judge.hpp"
#include "trait/pipeline.hpp"
#include "trait/stats.hpp"
#include "util/error.hpp"

using namespace kscope;
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

const std::string kDemo = std::string(KSCOPE_SOURCE_DIR) + "/models/demo";
const std::string kTraits = std::string(KSCOPE_SOURCE_DIR) + "/traits";

stats::Rows rows(std::vector<std::vector<float>> r) {
  stats::Rows o;
  o.n = r.size();
  o.d = r.empty() ? 0 : r[0].size();
  for (auto& x : r) o.x.insert(o.x.end(), x.begin(), x.end());
  return o;
}

// ---- statistics ----

TEST(TraitStats, MeanDifferenceClosedForm) {
  const auto p = rows({{1, 2, 3}, {3, 2, 1}}), n = rows({{0, 0, 0}, {2, 2, 2}});
  const auto d = stats::mean_difference(p, n);
  EXPECT_EQ(d, (std::vector<double>{1, 1, 1}));
  EXPECT_THROW(stats::mean_difference(p, rows({{1, 2}})), Error);
}

TEST(TraitStats, AurocCohenAccuracyClosedForms) {
  EXPECT_DOUBLE_EQ(stats::auroc({3, 4, 5}, {0, 1, 2}), 1.0);
  EXPECT_DOUBLE_EQ(stats::auroc({0, 1}, {2, 3}), 0.0);
  EXPECT_DOUBLE_EQ(stats::auroc({1, 1}, {1, 1}), 0.5);
  // pos {1, 3}, neg {2}: pairs (1<2), (3>2) -> 0.5; with a tie {2,3} vs {2}: (tie 0.5 + 1) / 2 = 0.75
  EXPECT_DOUBLE_EQ(stats::auroc({1, 3}, {2}), 0.5);
  EXPECT_DOUBLE_EQ(stats::auroc({2, 3}, {2}), 0.75);
  // d = (mean_p - mean_n) / pooled sd; pos {1,2,3} (var 1), neg {4,5,6} (var 1) -> -3
  EXPECT_DOUBLE_EQ(stats::cohens_d({1, 2, 3}, {4, 5, 6}), -3.0);
  // pooled over unequal variances: pos {0, 2} var 2, neg {0, 0, 3} var 3 -> sqrt((2 + 6) / 3)
  EXPECT_NEAR(stats::cohens_d({0, 2}, {0, 0, 3}), (1.0 - 1.0) / std::sqrt(8.0 / 3), 1e-12);
  EXPECT_DOUBLE_EQ(stats::accuracy({1, 2, -1}, {-2, 0.5}, 0.0), 3.0 / 5);
}

// The probe's optimum: gradient zero, and it matches plain gradient descent on the same objective.
TEST(TraitStats, LogisticProbeIsTheRegularizedOptimum) {
  std::mt19937 rng(7);
  std::normal_distribution<float> g;
  std::vector<std::vector<float>> P, N;
  for (int i = 0; i < 30; ++i) {
    P.push_back({1.0f + g(rng), 0.5f * g(rng), g(rng)});
    N.push_back({-1.0f + g(rng), 0.5f * g(rng), g(rng)});
  }
  stats::ProbeOptions o;
  o.C = 0.7;
  o.normalize_rows = false;
  const auto pr = stats::logistic_probe(rows(P), rows(N), o);
  EXPECT_LT(pr.grad_norm, 1e-7);
  // gradient descent on F(θ) = C Σ log(1 + exp(-y' θ·z)) + ½‖θ‖², z = [x, 1]
  std::vector<double> th(4, 0.0);
  for (int it = 0; it < 20000; ++it) {
    std::vector<double> gr = th;
    for (int side = 0; side < 2; ++side)
      for (auto& x : side ? N : P) {
        const double m = th[0] * x[0] + th[1] * x[1] + th[2] * x[2] + th[3];
        const double p = 1 / (1 + std::exp(-m));
        const double r = o.C * (p - (side ? 0.0 : 1.0));
        for (int k = 0; k < 3; ++k) gr[k] += r * x[k];
        gr[3] += r;
      }
    for (int k = 0; k < 4; ++k) th[k] -= 0.004 * gr[k];
  }
  for (int k = 0; k < 3; ++k) EXPECT_NEAR(pr.w[k], th[k], 1e-4) << k;
  EXPECT_NEAR(pr.b, th[3], 1e-4);
  EXPECT_GT(pr.w[0], 0.5);  // the separating direction
}

TEST(TraitStats, ProbeSurvivesSeparableWideData) {
  // d >> n, perfectly separable: the L2 term keeps the solution finite; Newton still converges
  std::mt19937 rng(3);
  std::normal_distribution<float> g;
  std::vector<std::vector<float>> P, N;
  for (int i = 0; i < 8; ++i) {
    std::vector<float> a(200), b(200);
    for (auto& x : a) x = g(rng);
    for (auto& x : b) x = g(rng);
    a[5] += 4;
    b[5] -= 4;
    P.push_back(a);
    N.push_back(b);
  }
  const auto pr = stats::logistic_probe(rows(P), rows(N));
  EXPECT_LT(pr.grad_norm, 1e-6);
  EXPECT_LT(pr.iterations, 50);
  for (auto& x : P) EXPECT_GT(stats::probe_logit(pr, x.data(), 200, true), 0);
  for (auto& x : N) EXPECT_LT(stats::probe_logit(pr, x.data(), 200, true), 0);
}

TEST(TraitStats, PairedPcaFindsTheSharedDifference) {
  // differences = a_i·u + small orthogonal noise with a_i of mixed magnitude: the top direction is ±u,
  // signed to agree with the mean difference
  const std::vector<double> u = {0.6, 0.8, 0.0};
  std::vector<std::vector<float>> P, N;
  const double a[] = {1.0, 2.0, 1.5, 3.0, 0.5};
  const double noise[] = {0.01, -0.02, 0.015, 0.0, -0.01};
  for (int i = 0; i < 5; ++i) {
    N.push_back({static_cast<float>(i), 1.0f, -1.0f});
    P.push_back({static_cast<float>(i + a[i] * u[0]), static_cast<float>(1 + a[i] * u[1]), static_cast<float>(-1 + noise[i])});
  }
  double share = 0;
  const auto v = stats::paired_pca(rows(P), rows(N), &share);
  EXPECT_NEAR(v[0], 0.6, 1e-4);
  EXPECT_NEAR(v[1], 0.8, 1e-4);
  EXPECT_NEAR(v[2], 0.0, 2e-3);
  EXPECT_GT(share, 0.999);
  // reversed pairs give the reversed direction (sign follows the mean difference)
  const auto w = stats::paired_pca(rows(N), rows(P));
  EXPECT_NEAR(w[0], -0.6, 1e-4);
}

TEST(TraitStats, CholeskySolve) {
  std::vector<double> A = {4, 2, 2, 3};
  const auto x = stats::cholesky_solve(A, {2, 1}, 2);  // [4 2; 2 3] x = [2; 1] -> x = [0.5, 0]
  EXPECT_NEAR(x[0], 0.5, 1e-12);
  EXPECT_NEAR(x[1], 0.0, 1e-12);
}

// ---- judge scoring rule ----

TEST(TraitJudge, ScoreIsProbabilityWeightedOverIntegerTokens) {
  EXPECT_EQ(number_token_value(" 75"), 75);
  EXPECT_EQ(number_token_value("100"), 100);
  EXPECT_EQ(number_token_value("0"), 0);
  EXPECT_FALSE(number_token_value("101"));
  EXPECT_FALSE(number_token_value("07"));
  EXPECT_FALSE(number_token_value("-5"));
  EXPECT_FALSE(number_token_value("7.5"));
  EXPECT_FALSE(number_token_value("REF"));
  // 0.5·80 + 0.3·60 over mass 0.8 -> 72.5; words ignored
  const auto j = score_from_probs({{"80", 0.5}, {" 60", 0.3}, {"The", 0.2}}, 0.25);
  ASSERT_TRUE(j.score);
  EXPECT_NEAR(*j.score, 72.5, 1e-12);
  EXPECT_NEAR(j.mass, 0.8, 1e-12);
  // refusal: too little mass on numbers
  const auto r = score_from_probs({{"REFUSAL", 0.9}, {"50", 0.1}}, 0.25);
  EXPECT_FALSE(r.score);
  EXPECT_NEAR(r.mass, 0.1, 1e-12);
}

TEST(TraitJudge, TemplatesNameUnknownFields) {
  EXPECT_EQ(fill_template("{a} and {b} {not a field} {}", {{"a", "x"}, {"b", "y"}}, "t"), "x and y {not a field} {}");
  try {
    fill_template("score {answr}", {{"answer", "x"}}, "judge.trait");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("{answr}"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("judge.trait"), std::string::npos) << e.what();
  }
}

TEST(TraitJudge, CacheSurvivesATornLine) {
  test::TempDir d;
  const std::string path = d.str() + "/cache.jsonl";
  {
    JudgeCache c(path);
    c.put("a", {42.0, 0.9});
    c.put("b", {std::nullopt, 0.1});
  }
  std::ofstream(path, std::ios::app) << "{\"k\": \"c\", \"s\"";  // interrupted mid-line
  JudgeCache c(path);
  EXPECT_EQ(c.size(), 2u);
  EXPECT_EQ(*c.get("a")->score, 42.0);
  EXPECT_FALSE(c.get("b")->score);
}

// The self-judge reads every number token's probability from the model's own last-position logits.
TEST(TraitJudge, SelfJudgeMatchesTheModelsLogits) {
  auto model = Model::load(kDemo);
  auto tok = Tokenizer::load(kDemo);
  tok->limit_ids(model->config().vocab_size);
  const ChatFormat chat = default_chat_format(*tok, kDemo);
  SelfJudge sj(*model, *tok, chat, "demo");
  sj.min_mass = 0;
  ASSERT_GE(sj.number_tokens().size(), 10u);  // at least the digits
  const std::vector<std::string> prompts = {"Rate this from 0 to 100: the cat sat on the mat.", "Score: 7"};
  const auto got = sj.score(prompts);
  for (size_t i = 0; i < prompts.size(); ++i) {
    ChatMessage m{"user", prompts[i], "", {}, "", ""};
    auto ids = render_chat(*tok, chat, {m}).ids;
    KvCache c = model->new_cache();
    std::vector<ForwardItem> items{{&c, ids.data(), static_cast<int64_t>(ids.size()), false}};
    std::vector<std::vector<float>> logits;
    model->forward(items, logits);
    double mass = 0, s = 0;
    for (int32_t id = 0; id < static_cast<int32_t>(model->config().vocab_size); ++id) {
      if (tok->is_special(id)) continue;
      const auto v = number_token_value(tok->token_bytes(id));
      if (!v) continue;
      const double p = std::exp(log_softmax_at(logits[0].data(), model->config().vocab_size, id));
      mass += p;
      s += p * *v;
    }
    EXPECT_NEAR(got[i].mass, mass, 1e-9 + 1e-6 * mass);
    ASSERT_TRUE(got[i].score);
    // the reference reads float log-softmax values (relative error ~6e-8 each)
    EXPECT_NEAR(*got[i].score, s / mass, 2e-6 * s / mass);
  }
}

// ---- a local OpenAI-compatible test server ----

struct FakeJudge {
  httplib::Server srv;
  std::thread th;
  int port = 0;
  std::atomic<int> requests{0}, throttled{0};
  std::atomic<int> in_flight{0}, max_in_flight{0};
  int fail_first = 0;  // answer 429 to the first N requests
  json last;
  std::mutex mu;
  // the score distribution for a prompt: 80 with p, 20 with 1 - p - 0.05, and "The" with 0.05; p from the
  // prompt's text (responses containing 'e' more often score higher), so scores are deterministic and varied
  static double p_of(const std::string& prompt) {
    const size_t a = prompt.find("[RESPONSE START]"), b = prompt.find("[RESPONSE END]");
    const std::string r = a == std::string::npos ? prompt : prompt.substr(a, b - a);
    double e = 0;
    for (char c : r) e += c == 'e';
    return 0.1 + 0.8 * std::min(1.0, e / std::max<size_t>(1, r.size()) * 8);
  }
  FakeJudge() {
    srv.Post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res) {
      const int n = ++requests;
      const int f = ++in_flight;
      for (int m = max_in_flight; f > m && !max_in_flight.compare_exchange_weak(m, f);) {
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      --in_flight;
      const json j = json::parse(req.body);
      {
        std::lock_guard<std::mutex> l(mu);
        last = j;
      }
      if (n <= fail_first) {
        ++throttled;
        res.status = 429;
        res.set_header("Retry-After", "0");
        res.set_content("{\"error\": {\"message\": \"rate limited\"}}", "application/json");
        return;
      }
      const std::string prompt = j["messages"][0]["content"];
      const double p = p_of(prompt);
      const json top = json::array({{{"token", "80"}, {"logprob", std::log(p)}},
                                    {{"token", " 20"}, {"logprob", std::log(0.95 - p)}},
                                    {{"token", "The"}, {"logprob", std::log(0.05)}}});
      const json out = {{"id", "x"}, {"object", "chat.completion"}, {"model", j["model"]},
                        {"choices", {{{"index", 0}, {"message", {{"role", "assistant"}, {"content", "80"}}},
                                      {"logprobs", {{"content", {{{"token", "80"}, {"logprob", std::log(p)}, {"top_logprobs", top}}}}}},
                                      {"finish_reason", "length"}}}}};
      res.set_content(out.dump(), "application/json");
    });
    port = srv.bind_to_any_port("127.0.0.1");
    th = std::thread([this] { srv.listen_after_bind(); });
    while (!srv.is_running()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ~FakeJudge() {
    srv.stop();
    th.join();
  }
  std::string url() const { return fmt::format("http://127.0.0.1:{}/v1", port); }
  static double expected(const std::string& prompt) {
    const double p = p_of(prompt);
    return (80 * p + 20 * (0.95 - p)) / 0.95;
  }
};

TEST(TraitJudge, OpenAIClientScoresRetriesAndCaches) {
  FakeJudge fj;
  fj.fail_first = 2;
  OpenAIJudgeOptions o;
  o.base_url = fj.url();
  o.model = "judge-model";
  o.concurrency = 4;
  o.backoff_s = 0.01;
  OpenAIJudge j(o);
  test::TempDir d;
  j.cache = std::make_shared<JudgeCache>(d.str() + "/c.jsonl");
  std::vector<std::string> prompts;
  for (int i = 0; i < 24; ++i) prompts.push_back(fmt::format("[RESPONSE START]{}[RESPONSE END]", std::string(i, 'e') + std::string(24 - i, 'x')));
  const auto got = j.score(prompts);
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_TRUE(got[i].score) << i;
    EXPECT_NEAR(*got[i].score, FakeJudge::expected(prompts[i]), 1e-9) << i;
    EXPECT_NEAR(got[i].mass, 0.95, 1e-9);
  }
  EXPECT_EQ(fj.throttled, 2);
  EXPECT_EQ(j.retries, 2);
  EXPECT_GT(fj.max_in_flight, 1);  // concurrent requests
  EXPECT_LE(fj.max_in_flight, 4);
  // the request is OpenAI-shaped: one token, logprobs with top_logprobs
  EXPECT_EQ(fj.last["max_tokens"], 1);
  EXPECT_EQ(fj.last["logprobs"], true);
  EXPECT_EQ(fj.last["top_logprobs"], 20);
  EXPECT_EQ(fj.last["model"], "judge-model");
  // everything again: all from the cache, no request
  const int before = fj.requests;
  OpenAIJudge j2(o);
  j2.cache = std::make_shared<JudgeCache>(d.str() + "/c.jsonl");
  const auto again = j2.score(prompts);
  EXPECT_EQ(fj.requests, before);
  EXPECT_EQ(j2.asked, 0);
  for (size_t i = 0; i < prompts.size(); ++i) EXPECT_EQ(*again[i].score, *got[i].score);
}

TEST(TraitJudge, OpenAIClientErrorsAreClear) {
  OpenAIJudgeOptions o;
  o.base_url = "http://127.0.0.1:1/v1";  // nothing listens there
  o.model = "m";
  o.max_retries = 1;
  o.backoff_s = 0.01;
  OpenAIJudge j(o);
  try {
    j.score({"x"});
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("127.0.0.1:1/v1/chat/completions"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("2 tries"), std::string::npos) << e.what();
  }
  o.model = "";
  EXPECT_THROW(OpenAIJudge{o}, Error);
}

// kscope's own server is a judge: the client against it gives what the self-judge gives over the same top 20.
TEST(TraitJudge, OpenAIClientAgainstKscopeServerMatchesSelfJudge) {
  ServerOptions so;
  so.model_dir = kDemo;
  KscopeServer server(Model::load(kDemo), so);
  const int port = server.bind("127.0.0.1", 0);
  std::thread th([&] { server.serve(); });
  OpenAIJudgeOptions o;
  o.base_url = fmt::format("http://127.0.0.1:{}/v1", port);
  o.model = "kscope";
  o.concurrency = 4;
  OpenAIJudge oj(o);
  oj.min_mass = 0;
  auto model = Model::load(kDemo);
  auto tok = Tokenizer::load(kDemo);
  tok->limit_ids(model->config().vocab_size);
  SelfJudge sj(*model, *tok, default_chat_format(*tok, kDemo), "demo", 20);
  sj.min_mass = 0;
  const std::vector<std::string> prompts = {"How coherent is this, 0 to 100? 1 2 3 4 5", "Give a number: 42, 17, 99, 3",
                                            "The options are 10, 20 and 50."};
  const auto a = oj.score(prompts), b = sj.score(prompts);
  server.stop();
  th.join();
  for (size_t i = 0; i < prompts.size(); ++i) {
    EXPECT_NEAR(a[i].mass, b[i].mass, 1e-4 * std::max(1e-6, b[i].mass) + 1e-7) << i;
    ASSERT_EQ(a[i].score.has_value(), b[i].score.has_value()) << i;
    if (a[i].score) {
      EXPECT_NEAR(*a[i].score, *b[i].score, 1e-3) << i;
    }
  }
}

// ---- search rule, layers, logs, datasets ----

TEST(TraitSteer, AdaptiveSearchRule) {
  SearchRule r;  // grow 2, shrink 0.5, tol 0.15, 6 steps
  SearchState s;
  s.coef = 0.5;
  search_step(s, true, r);  // coherent: grow
  EXPECT_DOUBLE_EQ(s.coef, 1.0);
  search_step(s, true, r);
  EXPECT_DOUBLE_EQ(s.coef, 2.0);
  search_step(s, false, r);  // incoherent: bisect between 1 and 2
  EXPECT_DOUBLE_EQ(s.good, 1.0);
  EXPECT_DOUBLE_EQ(s.bad, 2.0);
  EXPECT_DOUBLE_EQ(s.coef, 1.5);
  search_step(s, true, r);  // good 1.5, bad 2 -> 1.75
  EXPECT_DOUBLE_EQ(s.coef, 1.75);
  EXPECT_FALSE(s.done);
  search_step(s, true, r);  // good 1.75, bad 2: 2/1.75 = 1.14 < 1.15 -> done
  EXPECT_TRUE(s.done);
  // incoherent from the start: shrink until coherent, then bisect
  SearchState t;
  t.coef = 0.5;
  search_step(t, false, r);
  EXPECT_DOUBLE_EQ(t.coef, 0.25);
  search_step(t, true, r);
  EXPECT_DOUBLE_EQ(t.coef, 0.375);
  // the step budget ends a search
  SearchState u;
  u.coef = 1;
  for (int i = 0; i < 6; ++i) search_step(u, true, r);
  EXPECT_TRUE(u.done);
  EXPECT_DOUBLE_EQ(u.coef, 64);
}

TEST(TraitSteer, LayerSelections) {
  EXPECT_EQ(parse_layers("30%-60%", 61), (std::vector<int64_t>{18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36}));
  EXPECT_EQ(parse_layers("all", 4), (std::vector<int64_t>{0, 1, 2, 3}));
  EXPECT_EQ(parse_layers("3,1,1-2", 4), (std::vector<int64_t>{1, 2, 3}));
  EXPECT_EQ(parse_layers("100%", 61), (std::vector<int64_t>{60}));
  EXPECT_THROW(parse_layers("61", 61), Error);
  EXPECT_THROW(parse_layers("5-2", 61), Error);
  EXPECT_THROW(parse_layers("x", 61), Error);
  EXPECT_THROW(parse_layers("2.5", 61), Error);
}

TEST(TraitSteer, JsonlLogCutsATornLine) {
  test::TempDir d;
  const std::string p = d.str() + "/log.jsonl";
  {
    JsonlLog l(p);
    l.append({{"a", 1}});
    l.append_all({{{"a", 2}}, {{"a", 3}}});
  }
  std::ofstream(p, std::ios::app) << "{\"a\": 4";
  JsonlLog l(p);
  ASSERT_EQ(l.lines().size(), 3u);
  l.append({{"a", 5}});
  JsonlLog m(p);
  ASSERT_EQ(m.lines().size(), 4u);
  EXPECT_EQ(m.lines()[3]["a"], 5);
}

TEST(TraitDatasets, ShippedTraitsAreUsable) {
  const std::vector<std::string> names = {"anxiety", "confidence", "guilt", "rationalization", "obedience", "eval_awareness",
                                          "deception", "lying", "concealment", "conflicted", "ulterior_motive"};
  for (auto& n : names) {
    const auto d = TraitDataset::load(kTraits + "/" + n + ".json");
    EXPECT_EQ(d.name, n);
    EXPECT_GE(d.pairs.size(), 40u) << n;
    EXPECT_GE(d.eval_questions.size(), 20u) << n;
    std::set<std::string> qs;
    for (auto& p : d.pairs) qs.insert(p.question);
    EXPECT_GE(qs.size(), 40u) << n;
    EXPECT_FALSE(d.definition.empty());
  }
  const auto fr = TraitDataset::load(kTraits + "/french.json");
  EXPECT_EQ(fr.style, "document");
  EXPECT_EQ(fr.scorer, "french");
}

TEST(TraitDatasets, MalformedDatasetsNameTheField) {
  test::TempDir d;
  auto expect_error = [&](const std::string& text, const std::string& needle) {
    const std::string p = d.str() + "/t.json";
    test::write_file(p, text);
    try {
      TraitDataset::load(p);
      ADD_FAILURE() << "accepted: " << text;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
    }
  };
  const std::string ok = R"("name": "t", "definition": "d", "instructions": [{"pos": "a", "neg": "b"}], "questions": ["q"], "eval_questions": ["e"])";
  expect_error("{" + ok + ", \"extra\": 1}", "unknown field 'extra'");
  expect_error(R"({"definition": "d"})", "missing field 'name'");
  expect_error(R"({"name": "t", "definition": "d", "instructions": [{"pos": "a"}], "questions": ["q"], "eval_questions": ["e"]})", "instructions[0]: missing field 'neg'");
  expect_error(R"({"name": "t", "definition": "d", "instructions": [{"pos": "a", "neg": "b"}], "questions": ["q"], "eval_questions": ["q"]})", "also used for extraction");
  expect_error("{" + ok + R"(, "judge": {"trait": "{answr}"}})", "{answr}");
  expect_error("{" + ok + R"(, "steer": "up"})", "'steer'");
  expect_error("{" + ok + R"(, "thresholds": {"pos": 3}})", "thresholds.pos");
  expect_error("{not json", "not valid JSON");
}

// ---- the pipeline end to end on the demo model ----

struct Demo {
  std::unique_ptr<Model> model = Model::load(kDemo);
  std::unique_ptr<Tokenizer> tok;
  ChatFormat chat;
  Demo() {
    tok = Tokenizer::load(kDemo);
    tok->limit_ids(model->config().vocab_size);
    chat = default_chat_format(*tok, kDemo);
  }
  TraitContext ctx(Judge* j = nullptr) { return TraitContext{*model, *tok, chat, j, {}}; }
};

ExtractOptions small(const std::string& out) {
  ExtractOptions o;
  o.out = out;
  o.max_new_tokens = 12;
  o.batch = 16;
  o.pos_min = 20;
  o.neg_max = 10;
  return o;
}

TEST(TraitPipeline, ExtractSteerProjectOnTheDemoModel) {
  Demo demo;
  test::TempDir d;
  const auto ds = TraitDataset::load(kTraits + "/french.json");
  auto ctx = demo.ctx();
  const json r = run_extract(ctx, ds, small(d.str()));
  const std::string dir = d.str() + "/french";
  // every stage's output exists; the French direction separates held-out pairs
  for (auto f : {"responses.jsonl", "vet.json", "vet.jsonl", "stages.json", "vectors/summary.json", "vectors/summary.md",
                 "vectors/mean_diff.safetensors", "vectors/probe.safetensors", "vectors/pca.safetensors"})
    EXPECT_TRUE(fs::exists(dir + "/" + f)) << f;
  const json sum = r["vectors"];
  EXPECT_GE(sum["test_pairs"].get<int>(), 4);
  for (auto m : {"mean_diff", "probe", "pca"}) EXPECT_GE(sum["best"][m]["test_auroc"].get<double>(), 0.9) << m;
  const auto vf = VectorFile::load(dir + "/vectors/mean_diff.safetensors");
  EXPECT_EQ(vf.meta.at("trait"), "french");
  EXPECT_EQ(vf.vectors.size(), 4u);
  EXPECT_EQ(vf.norms.size(), 4u);
  // the mean-difference vector equals an independent mean over the stores
  {
    const auto P = ActivationStore::open(dir + "/acts/pos"), N = ActivationStore::open(dir + "/acts/neg");
    const json split = json::parse(vf.meta.at("split"));
    EXPECT_EQ(split["train_pairs"].get<int64_t>() + split["test_pairs"].get<int64_t>(), P.n_sequences());
    const auto kept = json::parse(test::read_file(dir + "/vet.json"))["kept_pairs"].get<std::vector<int64_t>>();
    const auto test_ids = sum["test_pair_ids"].get<std::set<int64_t>>();
    std::vector<double> diff(256, 0.0);
    int64_t n = 0;
    for (size_t k = 0; k < kept.size(); ++k) {
      if (test_ids.count(kept[k])) continue;
      const auto p = P.sequence_rows("2.resid_post", k), q = N.sequence_rows("2.resid_post", k);
      for (int i = 0; i < 256; ++i) diff[i] += p[i] - q[i];
      ++n;
    }
    EXPECT_EQ(n, split["train_pairs"].get<int64_t>());
    const auto& v = vf.at("2.resid_post", "mean_diff");
    for (int i = 0; i < 256; ++i) EXPECT_NEAR(v[i], diff[i] / n, 1e-5 * (1 + std::abs(diff[i] / n))) << i;
  }
  // a rerun skips every stage (nothing regenerated)
  const auto mtime = fs::last_write_time(dir + "/responses.jsonl");
  std::vector<std::string> said;
  ctx.io.log = [&](const std::string& s) { said.push_back(s); };
  run_extract(ctx, ds, small(d.str()));
  EXPECT_EQ(fs::last_write_time(dir + "/responses.jsonl"), mtime);
  int up = 0;
  for (auto& s : said) up += s.find("up to date") != std::string::npos;
  EXPECT_EQ(up, 4);

  // steering evaluation, adaptive, on two sites
  SteerEvalOptions so;
  so.out = d.str();
  so.method = "mean_diff";
  so.sites = "2-3";
  so.max_new_tokens = 12;
  so.max_questions = 8;
  so.coherence_min = 25;
  const json s = run_steer_eval(ctx, ds, so);
  ASSERT_FALSE(s["best_site"].is_null()) << s.dump();
  EXPECT_GT(s["delta"].get<double>(), 10.0) << s.dump();  // French rises
  EXPECT_GE(s["coherence"].get<double>(), 25.0);
  for (auto f : {"results.jsonl", "summary.json", "summary.md", "plot.svg", "best_responses.jsonl"})
    EXPECT_TRUE(fs::exists(dir + "/steer/" + f)) << f;
  // each step batched every site's candidate: the first step logged the baseline and both sites
  JsonlLog log(dir + "/steer/results.jsonl");
  EXPECT_EQ(log.lines()[1]["kind"], "baseline");
  EXPECT_EQ(log.lines()[2]["step"], 0);
  EXPECT_EQ(log.lines()[3]["step"], 0);

  // grid and ablation modes
  SteerEvalOptions g = so;
  g.mode = "grid";
  g.grid = {0.25, 1.0};
  g.out = d.str() + "/grid";
  fs::create_directories(g.out + "/french");
  fs::copy(dir + "/vectors", g.out + "/french/vectors", fs::copy_options::recursive);
  const json gs = run_steer_eval(ctx, ds, g);
  EXPECT_EQ(gs["candidates"], 4);
  SteerEvalOptions a = g;
  a.mode = "ablate";
  a.force = true;
  const json as = run_steer_eval(ctx, ds, a);
  EXPECT_EQ(as["candidates"], 3);  // two sites and both at once

  // projection: steering toward French raises the projection of the generated text onto the French vector
  const auto targets = projection_targets(vf, "french", "3.resid_post", {});
  std::vector<GenerateRequest> reqs;
  std::vector<std::vector<Intervention>> ivs;
  std::vector<SeqLayout> lays;
  for (int steer = 0; steer < 2; ++steer)
    for (int q = 0; q < 6; ++q) {
      GenerateRequest gr;
      gr.prompt = demo.tok->encode(ds.eval_questions[q]);
      gr.max_new_tokens = 16;
      gr.ignore_eos = true;
      reqs.push_back(gr);
      std::vector<Intervention> l;
      if (steer) {
        Intervention iv;
        iv.site = parse_site("2.resid_post", 4);
        iv.vector = vf.at("2.resid_post", "v");
        iv.coef = 0.5;
        iv.relative = true;
        iv.mean_norm = vf.norms.at("2.resid_post");
        iv.positions = PositionSpec::parse("response");
        l.push_back(iv);
      }
      ivs.push_back(l);
      SeqLayout lay;
      lay.prompt_len = gr.prompt.size();
      lays.push_back(lay);
    }
  SteeringHook hook(ivs, lays);
  GenerateOptions go;
  go.observer = &hook;
  const auto res = generate(*demo.model, reqs, go);
  std::vector<Rollout> rs;
  for (size_t i = 0; i < res.size(); ++i) {
    Rollout ro;
    ro.id = fmt::format("{}-{}", i < 6 ? "plain" : "steered", i % 6);
    ro.ids = reqs[i].prompt;
    ro.ids.insert(ro.ids.end(), res[i].tokens.begin(), res[i].tokens.end());
    ro.prompt_len = reqs[i].prompt.size();
    rs.push_back(ro);
  }
  ProjectOptions po{d.str() + "/project", 4};
  project_rollouts(*demo.model, *demo.tok, targets, rs, po, {});
  double plain = 0, steered = 0;
  for (size_t i = 0; i < rs.size(); ++i) {
    const json t = json::parse(test::read_file(po.out + "/rollout-" + rs[i].id + ".json"));
    const auto& c = t["series"]["french@3.resid_post"]["centred"];
    double m = 0;
    for (size_t p = rs[i].prompt_len; p < c.size(); ++p) m += c[p].get<double>();
    m /= c.size() - rs[i].prompt_len;
    (i < 6 ? plain : steered) += m / 6;
    EXPECT_TRUE(fs::exists(po.out + "/rollout-" + rs[i].id + ".svg"));
  }
  EXPECT_GT(steered, plain + 1.0) << "steered " << steered << " plain " << plain;
  EXPECT_LT(plain, 0.0);  // unsteered English sits on the English side of the midpoint
}

TEST(TraitPipeline, ResumesAfterInterruptionWithoutLosingOrDuplicating) {
  Demo demo;
  test::TempDir a, b;
  const auto ds = TraitDataset::load(kTraits + "/french.json");
  auto ctx = demo.ctx();
  // uninterrupted
  run_extract(ctx, ds, small(a.str()));
  // crash after the first batch of responses, then resume
  ExtractOptions o = small(b.str());
  o.fail_after_rows = 16;
  EXPECT_THROW(run_extract(ctx, ds, o), Error);
  EXPECT_EQ(JsonlLog(b.str() + "/french/responses.jsonl").lines().size(), 16u);
  // a torn line at the end (killed mid-write) is cut, not duplicated
  std::ofstream(b.str() + "/french/responses.jsonl", std::ios::app) << "{\"pair\": 9, \"si";
  o.fail_after_rows = -1;
  run_extract(ctx, ds, o);
  const auto ra = JsonlLog(a.str() + "/french/responses.jsonl").lines(), rb = JsonlLog(b.str() + "/french/responses.jsonl").lines();
  ASSERT_EQ(rb.size(), ra.size());
  std::map<std::pair<int64_t, std::string>, json> ma, mb;
  for (auto& l : ra) ma[{l["pair"], l["side"]}] = l;
  for (auto& l : rb) mb[{l["pair"], l["side"]}] = l;
  EXPECT_EQ(ma, mb);
  EXPECT_EQ(test::read_file(a.str() + "/french/vectors/summary.json"), test::read_file(b.str() + "/french/vectors/summary.json"));
  // steer-eval: crash after one step, resume, same log as uninterrupted
  SteerEvalOptions so;
  so.method = "probe";
  so.sites = "2-3";
  so.max_new_tokens = 8;
  so.max_questions = 5;
  so.coherence_min = 25;
  so.out = a.str();
  run_steer_eval(ctx, ds, so);
  so.out = b.str();
  so.fail_after_steps = 1;
  EXPECT_THROW(run_steer_eval(ctx, ds, so), Error);
  so.fail_after_steps = -1;
  run_steer_eval(ctx, ds, so);
  EXPECT_EQ(test::read_file(a.str() + "/french/steer/results.jsonl"), test::read_file(b.str() + "/french/steer/results.jsonl"));
  // other settings on the same log are refused, --force starts over
  so.max_questions = 4;
  EXPECT_THROW(run_steer_eval(ctx, ds, so), Error);
}

// Instruct-style trait with the self-judge: the demo model is a base model (man pages), so it puts little
// probability on number tokens; the judge's mass rule is lowered and the thresholds opened so that the run
// exercises every stage with real self-judge scores.
TEST(TraitPipeline, SelfJudgeEndToEnd) {
  Demo demo;
  test::TempDir d;
  const auto ds = TraitDataset::load(kTraits + "/anxiety.json");
  SelfJudge sj(*demo.model, *demo.tok, demo.chat, "demo");
  sj.min_mass = 1e-6;
  sj.cache = std::make_shared<JudgeCache>(d.str() + "/judge-cache.jsonl");
  auto ctx = demo.ctx(&sj);
  ExtractOptions o = small(d.str());
  o.max_pairs = 30;
  o.max_new_tokens = 8;
  o.pos_min = 0;
  o.neg_max = 100;
  o.coherence_min = 0;
  o.sites = "1-3";
  const json r = run_extract(ctx, ds, o);
  EXPECT_EQ(r["vet"]["kept"], 30);
  EXPECT_EQ(sj.asked, 120);  // trait + coherence for 60 responses
  const auto vet = JsonlLog(d.str() + "/anxiety/vet.jsonl").lines();
  for (auto& v : vet) {
    ASSERT_FALSE(v["trait"].is_null());
    EXPECT_GE(v["trait"].get<double>(), 0);
    EXPECT_LE(v["trait"].get<double>(), 100);
    EXPECT_FALSE(v["coherence"].is_null());
  }
  EXPECT_TRUE(fs::exists(d.str() + "/anxiety/vectors/probe.safetensors"));
  // a stricter default mass rule refuses these judgments, and vetting then says why
  SelfJudge strict(*demo.model, *demo.tok, demo.chat, "demo");
  auto ctx2 = demo.ctx(&strict);
  ExtractOptions o2 = o;
  o2.out = d.str() + "/strict";
  try {
    run_extract(ctx2, ds, o2);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("passed vetting"), std::string::npos) << e.what();
  }
  const auto v2 = JsonlLog(o2.out + "/anxiety/vet.jsonl").lines();
  EXPECT_NE(v2[0]["why"].get<std::string>().find("too little mass"), std::string::npos);
}

TEST(TraitPipeline, HttpJudgeEndToEnd) {
  FakeJudge fj;
  Demo demo;
  test::TempDir d;
  const auto ds = TraitDataset::load(kTraits + "/deception.json");
  OpenAIJudgeOptions jo;
  jo.base_url = fj.url();
  jo.model = "test-judge";
  OpenAIJudge j(jo);
  j.cache = std::make_shared<JudgeCache>(d.str() + "/judge-cache.jsonl");
  auto ctx = demo.ctx(&j);
  ExtractOptions o = small(d.str());
  o.max_pairs = 40;
  o.max_new_tokens = 8;
  o.pos_min = 0;
  o.neg_max = 100;
  o.coherence_min = 0;
  o.sites = "3";
  const json r = run_extract(ctx, ds, o);
  EXPECT_EQ(fj.requests, 160);
  // the vetting scores are the server's, by the logprob rule
  const auto vet = JsonlLog(d.str() + "/deception/vet.jsonl").lines();
  const auto resp = JsonlLog(d.str() + "/deception/responses.jsonl").lines();
  std::map<std::pair<int64_t, std::string>, std::string> text;
  for (auto& l : resp) text[{l["pair"], l["side"]}] = l["response"];
  for (auto& v : vet) {
    const auto& p = ds.pairs[v["pair"].get<int64_t>()];
    const std::string prompt = ds.rubric.trait(ds.name, ds.definition, p.question, text[{v["pair"], v["side"]}]);
    EXPECT_NEAR(v["trait"].get<double>(), FakeJudge::expected(prompt), 1e-9);
  }
  // steer-eval through the same judge; then a thresholded vetting keeps only pairs that pass on both sides
  SteerEvalOptions so;
  so.out = d.str();
  so.sites = "3";
  so.max_new_tokens = 8;
  so.max_questions = 4;
  so.coherence_min = 0;
  so.rule.max_steps = 2;
  const json s = run_steer_eval(ctx, ds, so);
  EXPECT_FALSE(s["baseline"].is_null());
  ExtractOptions o3 = o;
  o3.pos_min = 50;
  o3.neg_max = 50;
  o3.stop_after = "vet";
  const int before = fj.requests;
  run_extract(ctx, ds, o3);
  EXPECT_EQ(fj.requests, before);  // re-vetting reuses the cached judgments
  const json v3 = json::parse(test::read_file(d.str() + "/deception/vet.json"));
  std::map<std::pair<int64_t, std::string>, bool> pass;
  const JsonlLog vlog(d.str() + "/deception/vet.jsonl");
  for (auto& v : vlog.lines()) pass[{v["pair"], v["side"]}] = v["pass"];
  const auto kept = v3["kept_pairs"].get<std::vector<int64_t>>();
  for (int64_t k = 0; k < 40; ++k) {
    const bool both = pass[std::make_pair(k, std::string("pos"))] && pass[std::make_pair(k, std::string("neg"))];
    const bool is_kept = std::find(kept.begin(), kept.end(), k) != kept.end();
    EXPECT_EQ(is_kept, both) << k;
  }
}

// ---- projection, massive activations, lens ----

TEST(TraitAnalysis, ProjectionFormulas) {
  ProjectionTarget t;
  t.name = "x@s";
  t.site = "s";
  t.unit = {0.6f, 0.8f, 0.0f};
  t.midpoint = 1.0;
  t.mean_norm = 10.0;
  const float h[3] = {3, 4, 12};
  const auto p = project_row(t, h, 3);
  EXPECT_NEAR(p.raw, 5.0, 1e-6);
  EXPECT_NEAR(p.centred, 4.0, 1e-6);
  EXPECT_NEAR(p.normalized, 0.5, 1e-6);
  EXPECT_NEAR(p.cosine, 5.0 / 13.0, 1e-6);
  t.exclude = {2};  // an excluded dimension is out of ‖h‖ too
  EXPECT_NEAR(project_row(t, h, 3).cosine, 1.0, 1e-6);
}

TEST(TraitAnalysis, StoreProjectionEqualsStreamedProjection) {
  Demo demo;
  test::TempDir d;
  VectorFile vf;
  std::vector<float> v(256);
  for (int i = 0; i < 256; ++i) v[i] = std::cos(0.3f * i);
  vf.vectors["2.resid_post"] = v;
  vf.norms["2.resid_post"] = 7.0;
  vf.meta["model_identity"] = demo.model->config().identity_hash();
  vf.meta["trait"] = "wave";
  vf.meta["midpoints"] = R"({"2.resid_post": 0.25})";
  const auto targets = projection_targets(vf, "wave", "all", {});
  const std::string rp = d.str() + "/rollouts.jsonl";
  test::write_file(rp, R"({"id": "chat", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does ls do?"}, {"role": "assistant", "content": "It lists files.", "reasoning_content": "The user asks about ls."}]})" "\n"
                       R"({"id": "doc", "text": "The following options are available:"})" "\n");
  const auto rs = load_rollouts(rp, *demo.tok, demo.chat);
  ASSERT_EQ(rs.size(), 2u);
  ProjectOptions po{d.str() + "/streamed", 2};
  project_rollouts(*demo.model, *demo.tok, targets, rs, po, {});
  const json tr = json::parse(test::read_file(po.out + "/rollout-chat.json"));
  ASSERT_EQ(tr["turns"].size(), 3u);
  EXPECT_EQ(tr["turns"][2]["role"], "assistant");
  // every token carries its turn's role; the per-turn means cover the turns' tokens
  for (size_t ti = 0; ti < 3; ++ti)
    for (int64_t p = tr["turns"][ti]["start"]; p < tr["turns"][ti]["end"].get<int64_t>(); ++p)
      EXPECT_EQ(tr["roles"][p], tr["turns"][ti]["role"]) << p;
  EXPECT_EQ(tr["turn_means"][1]["tokens"].get<int64_t>(), tr["turns"][1]["end"].get<int64_t>() - tr["turns"][1]["start"].get<int64_t>());
  // capture the same sequences to a store (reduction none) and project from it
  CaptureSpec spec;
  spec.sites = {parse_site("2.resid_post", 4)};
  StoreConfig sc;
  sc.model_identity = demo.model->config().identity_hash();
  sc.sites = {"2.resid_post"};
  sc.d_model = 256;
  StoreWriter w(d.str() + "/store", sc);
  std::vector<CaptureRequest> reqs;
  for (auto& r : rs) {
    CaptureRequest c;
    c.prompt = r.ids;
    reqs.push_back(c);
  }
  capture_to_store(*demo.model, reqs, spec, w, 2);
  ProjectOptions ps{d.str() + "/stored", 2};
  project_store(ActivationStore::open(d.str() + "/store"), demo.tok.get(), targets, ps, {});
  const json a = json::parse(test::read_file(po.out + "/rollout-chat.json")), b = json::parse(test::read_file(ps.out + "/rollout-0.json"));
  const auto& sa = a["series"]["wave@2.resid_post"], &sb = b["series"]["wave@2.resid_post"];
  ASSERT_EQ(sa["raw"].size(), sb["raw"].size());
  for (size_t i = 0; i < sa["raw"].size(); ++i) {
    EXPECT_NEAR(sa["raw"][i].get<double>(), sb["raw"][i].get<double>(), 1e-4 * (1 + std::abs(sb["raw"][i].get<double>()))) << i;
    EXPECT_NEAR(sa["centred"][i].get<double>(), sa["raw"][i].get<double>() - 0.25, 1e-9);
  }
}

TEST(TraitAnalysis, MassiveActivationsMatchAnIndependentCapture) {
  Demo demo;
  test::TempDir d;
  std::vector<std::vector<int32_t>> prompts;
  for (auto s : {"The following options are available:", "Les options suivantes sont disponibles :", "This manual page documents"})
    prompts.push_back(demo.tok->encode(s));
  MassiveOptions mo;
  mo.ratio = 8;
  mo.persistent = 0.5;
  const json r = massive_activations(*demo.model, prompts, mo, d.str(), {});
  EXPECT_TRUE(fs::exists(d.str() + "/massive.json"));
  EXPECT_TRUE(fs::exists(d.str() + "/massive.svg"));
  // independently: capture every resid_post row, compute max |h_d| / median_d(mean_t |h_d|)
  CaptureSpec spec;
  for (int l = 0; l < 4; ++l) spec.sites.push_back(parse_site(std::to_string(l) + ".resid_post", 4));
  std::vector<CaptureRequest> reqs;
  for (auto& p : prompts) {
    CaptureRequest c;
    c.prompt = p;
    reqs.push_back(c);
  }
  const auto caps = run_capture(*demo.model, reqs, spec);
  std::map<int64_t, int> count;
  for (int l = 0; l < 4; ++l) {
    const std::string site = std::to_string(l) + ".resid_post";
    std::vector<double> mx(256, 0), sum(256, 0);
    int64_t n = 0;
    for (auto& c : caps) {
      const auto& x = c.rows.at(site);
      for (size_t r0 = 0; r0 * 256 < x.size(); ++r0, ++n)
        for (int i = 0; i < 256; ++i) {
          mx[i] = std::max<double>(mx[i], std::abs(x[r0 * 256 + i]));
          sum[i] += std::abs(x[r0 * 256 + i]);
        }
    }
    std::vector<double> mean(256);
    for (int i = 0; i < 256; ++i) mean[i] = sum[i] / n;
    std::nth_element(mean.begin(), mean.begin() + 128, mean.end());
    const double typical = mean[128];
    EXPECT_NEAR(r["layers"][l]["typical_abs"].get<double>(), typical, 1e-5 * typical);
    const auto& top = r["layers"][l]["top"][0];
    EXPECT_NEAR(top["max_abs"].get<double>(), *std::max_element(mx.begin(), mx.end()), 1e-4);
    std::vector<int64_t> massive;
    for (int i = 0; i < 256; ++i)
      if (mx[i] / typical >= mo.ratio) massive.push_back(i), ++count[i];
    EXPECT_EQ(r["layers"][l]["massive"].get<std::vector<int64_t>>(), massive) << l;
  }
  std::vector<int64_t> rec;
  for (auto& [dim, c] : count)
    if (c >= 2) rec.push_back(dim);
  EXPECT_EQ(r["recommended_exclude"].get<std::vector<int64_t>>(), rec);
  // the report feeds --exclude-dims
  EXPECT_EQ(parse_exclude_dims(d.str() + "/massive.json"), rec);
  EXPECT_EQ(parse_exclude_dims("5,3,5"), (std::vector<int64_t>{3, 5}));
  EXPECT_THROW(parse_exclude_dims("5,x"), Error);
}

TEST(TraitAnalysis, LensRanksTokensByUnembeddedDirection) {
  Demo demo;
  const auto& W = demo.model->weights().lm_head;
  const auto& g = demo.model->weights().final_norm;
  // v = row t of the unembedding divided by the norm weight: token t's logit is ‖W_t‖², the largest when
  // rows have similar norms; check the ranking against explicit dot products for every token
  std::vector<float> row(W.in), v(W.in);
  const int32_t t = 300;
  W.dequant_row(t, row.data());
  for (int64_t i = 0; i < W.in; ++i) v[i] = row[i] / g[i];
  const json r = vector_lens(*demo.model, demo.tok.get(), v, 5);
  std::vector<std::pair<double, int64_t>> all;
  for (int64_t j = 0; j < demo.model->config().vocab_size; ++j) {
    W.dequant_row(j, row.data());
    double s = 0;
    for (int64_t i = 0; i < W.in; ++i) s += static_cast<double>(row[i]) * v[i] * g[i];
    all.push_back({s, j});
  }
  std::sort(all.rbegin(), all.rend());
  for (int k = 0; k < 5; ++k) {
    EXPECT_EQ(r["top"][k]["id"].get<int64_t>(), all[k].second) << k;
    EXPECT_NEAR(r["top"][k]["logit"].get<double>(), all[k].first, 1e-6 * std::abs(all[k].first));
    EXPECT_EQ(r["bottom"][k]["id"].get<int64_t>(), all[all.size() - 1 - k].second) << k;
  }
  EXPECT_EQ(r["top"][0]["token"], demo.tok->token_display(static_cast<int32_t>(all[0].second)));
}

}  // namespace
