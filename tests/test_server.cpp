// The HTTP server over real loopback HTTP: OpenAI-shaped requests (streaming too), concurrent requests with
// different steering in one batch matching each alone, inline capture matching a capture run, every error path.
#include <gtest/gtest.h>

#include <fmt/format.h>
#include <httplib.h>

#include <future>
#include <nlohmann/json.hpp>
#include <thread>

#include "interp/capture.hpp"
#include "interp/vectors.hpp"
#include "runtime/generate.hpp"
#include "server/server.hpp"
#include "testutil.hpp"
#include "tokenizer/tokenizer.hpp"

using namespace kscope;
using json = nlohmann::json;

namespace {

const std::string kDemo = std::string(KSCOPE_SOURCE_DIR) + "/models/demo";

struct Running {
  std::unique_ptr<KscopeServer> server;
  std::thread thread;
  int port = 0;
  Running(ServerOptions o) {
    o.model_dir = kDemo;
    server = std::make_unique<KscopeServer>(Model::load(kDemo), o);
    port = server->bind("127.0.0.1", 0);
    thread = std::thread([this] { server->serve(); });
  }
  ~Running() {
    server->stop();
    thread.join();
  }
  httplib::Client client(const std::string& key = "") const {
    httplib::Client c("127.0.0.1", port);
    c.set_read_timeout(60, 0);
    if (!key.empty()) c.set_bearer_token_auth(key);
    return c;
  }
};

json post(const httplib::Client& c0, const std::string& path, const json& body, int* status = nullptr) {
  auto& c = const_cast<httplib::Client&>(c0);
  auto r = c.Post(path.c_str(), body.dump(), "application/json");
  EXPECT_TRUE(r) << "no response for " << path;
  if (!r) return {};
  if (status) *status = r->status;
  return json::parse(r->body);
}

class Server : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new test::TempDir;
    const auto cfg = load_config(kDemo);
    VectorFile v;
    std::vector<float> d(256);
    for (int i = 0; i < 256; ++i) d[i] = std::sin(0.41f * i);
    v.vectors["2.resid_post"] = d;
    v.vectors["3.resid_post"] = d;
    v.meta["model_identity"] = cfg.identity_hash();
    v.norms["2.resid_post"] = 9.0;
    v.save(dir_->str() + "/wave.safetensors");
    ServerOptions o;
    o.vectors_dir = dir_->str();
    o.max_batch = 16;
    srv_ = new Running(o);
  }
  static void TearDownTestSuite() {
    delete srv_;
    delete dir_;
  }
  static test::TempDir* dir_;
  static Running* srv_;
};
test::TempDir* Server::dir_ = nullptr;
Running* Server::srv_ = nullptr;

TEST_F(Server, completions_and_chat_answer_in_the_openai_shape_with_the_engines_tokens) {
  auto c = srv_->client();
  const json r = post(c, "/v1/completions", {{"prompt", "The file"}, {"max_tokens", 10}, {"temperature", 0}, {"logprobs", 3}, {"ignore_eos", true}});
  EXPECT_EQ(r["object"], "text_completion");
  EXPECT_EQ(r["usage"]["completion_tokens"], 10);
  EXPECT_EQ(r["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(r["choices"][0]["logprobs"]["top_logprobs"][0].size(), 3u);
  // the same tokens as the library's greedy generation
  auto model = Model::load(kDemo);
  auto tok = Tokenizer::load(kDemo);
  GenerateRequest g;
  g.prompt = tok->encode("The file");
  g.max_new_tokens = 10;
  g.ignore_eos = true;
  const auto ref = generate(*model, {g})[0];
  EXPECT_EQ(r["choices"][0]["token_ids"].get<std::vector<int32_t>>(), ref.tokens);
  EXPECT_EQ(r["choices"][0]["text"], tok->decode(ref.tokens));
  const json ch = post(c, "/v1/chat/completions", {{"messages", {{{"role", "user"}, {"content", "Bonjour"}}}}, {"max_tokens", 6},
                                                   {"temperature", 0}, {"logprobs", true}, {"top_logprobs", 2}});
  EXPECT_EQ(ch["object"], "chat.completion");
  EXPECT_EQ(ch["choices"][0]["message"]["role"], "assistant");
  EXPECT_TRUE(ch["choices"][0]["message"]["content"].is_string());
  EXPECT_EQ(ch["choices"][0]["logprobs"]["content"][0]["top_logprobs"].size(), 2u);
  EXPECT_GT(ch["usage"]["prompt_tokens"].get<int>(), 2);
  auto& cc = const_cast<httplib::Client&>(c);
  const auto models = json::parse(cc.Get("/v1/models")->body);
  EXPECT_EQ(models["data"][0]["id"], "kscope");
}

TEST_F(Server, streaming_sends_the_same_text_as_one_answer) {
  auto c = srv_->client();
  const json body = {{"messages", {{{"role", "user"}, {"content", "Les options"}}}}, {"max_tokens", 12}, {"temperature", 0}, {"ignore_eos", true}};
  const json whole = post(c, "/v1/chat/completions", body);
  json sbody = body;
  sbody["stream"] = true;
  sbody["stream_options"] = {{"include_usage", true}};
  std::string raw;
  auto& cc = const_cast<httplib::Client&>(c);
  auto res = cc.Post("/v1/chat/completions", httplib::Headers{}, sbody.dump(), "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->get_header_value("Content-Type"), "text/event-stream");
  std::string text, finish;
  bool done = false, usage = false;
  std::istringstream in(res->body);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("data: ", 0) != 0) continue;
    if (line == "data: [DONE]") {
      done = true;
      continue;
    }
    const json e = json::parse(line.substr(6));
    if (e.contains("usage")) usage = e["usage"]["completion_tokens"] == 12;
    if (e["choices"].empty()) continue;
    const json& ch = e["choices"][0];
    if (ch["delta"].contains("content")) text += ch["delta"]["content"].get<std::string>();
    if (!ch["finish_reason"].is_null()) finish = ch["finish_reason"];
  }
  EXPECT_TRUE(done);
  EXPECT_TRUE(usage);
  EXPECT_EQ(finish, "length");
  EXPECT_EQ(text, whole["choices"][0]["message"]["content"].get<std::string>());
}

TEST_F(Server, concurrent_requests_with_different_steering_match_each_alone) {
  auto mk = [](int i) {
    json b = {{"prompt", "This option"}, {"max_tokens", 12}, {"temperature", i % 2 ? 0.9 : 0.0}, {"seed", 100 + i}, {"ignore_eos", true}};
    if (i % 3 != 2)
      b["kscope"] = {{"interventions", {{{"vector", "wave"}, {"site", i % 3 ? "3.resid_post" : "2.resid_post"}, {"coef", 0.5 * i}}}}};
    return b;
  };
  std::vector<json> alone;
  for (int i = 0; i < 8; ++i) alone.push_back(post(srv_->client(), "/v1/completions", mk(i)));
  std::vector<std::future<json>> fs;
  for (int i = 0; i < 8; ++i) fs.push_back(std::async(std::launch::async, [&, i] { return post(srv_->client(), "/v1/completions", mk(i)); }));
  int differ = 0;
  for (int i = 0; i < 8; ++i) {
    const json r = fs[i].get();
    EXPECT_EQ(r["choices"][0]["token_ids"], alone[i]["choices"][0]["token_ids"]) << i;
    EXPECT_EQ(r["choices"][0]["logprobs"], alone[i]["choices"][0]["logprobs"]) << i;
    differ += alone[i]["choices"][0]["token_ids"] != alone[(i + 1) % 8]["choices"][0]["token_ids"];
  }
  EXPECT_GT(differ, 0);
}

TEST_F(Server, inline_capture_equals_a_capture_run) {
  const json r = post(srv_->client(), "/v1/completions",
                      {{"prompt", "The file"}, {"max_tokens", 5}, {"temperature", 0}, {"ignore_eos", true},
                       {"kscope", {{"capture", {{"sites", {"2.resid_post", "1.router"}}, {"positions", "all"}, {"reduction", "mean"}}}}}});
  auto model = Model::load(kDemo);
  auto tok = Tokenizer::load(kDemo);
  CaptureRequest c;
  c.prompt = tok->encode("The file");
  c.generate = true;
  c.gen.max_new_tokens = 5;
  c.gen.ignore_eos = true;
  CaptureSpec spec;
  spec.sites = {{SiteKind::resid_post, 2}};
  spec.reduction = Reduction::mean;
  const auto ref = run_capture(*model, {c}, spec)[0];
  const auto got = r["kscope"]["capture"]["sites"]["2.resid_post"][0].get<std::vector<float>>();
  EXPECT_EQ(got, ref.rows.at("2.resid_post"));
  EXPECT_TRUE(r["kscope"]["capture"].contains("router"));
}

TEST_F(Server, stop_sequences_cut_the_text) {
  const json body = {{"prompt", "The following options are available:"}, {"max_tokens", 16}, {"temperature", 0}, {"ignore_eos", true}};
  const std::string full = post(srv_->client(), "/v1/completions", body)["choices"][0]["text"];
  ASSERT_GT(full.size(), 12u);
  const std::string stop = full.substr(8, 4);
  json b = body;
  b["stop"] = {stop};
  const json r = post(srv_->client(), "/v1/completions", b);
  EXPECT_EQ(r["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(r["choices"][0]["text"], full.substr(0, full.find(stop)));
}

TEST_F(Server, tokenizer_endpoints_and_metrics) {
  auto c = srv_->client();
  const json t = post(c, "/tokenize", {{"text", "Hello world"}});
  const json d = post(c, "/detokenize", {{"ids", t["ids"]}});
  EXPECT_EQ(d["text"], "Hello world");
  const json a = post(c, "/apply-template", {{"messages", {{{"role", "user"}, {"content", "hi"}}}}});
  EXPECT_EQ(a["chat_format"], "deepseek-v3");
  EXPECT_NE(a["text"].get<std::string>().find("<｜User｜>hi"), std::string::npos);
  auto& cc = const_cast<httplib::Client&>(c);
  const std::string m = cc.Get("/metrics")->body;
  for (auto k : {"kscope_queue_length", "kscope_batch_size", "kscope_generated_tokens_total", "# TYPE kscope_requests_total counter"})
    EXPECT_NE(m.find(k), std::string::npos) << k;
}

TEST_F(Server, bad_requests_get_json_errors_naming_the_field) {
  auto c = srv_->client();
  auto& cc = const_cast<httplib::Client&>(c);
  struct Case {
    json body;
    int status;
    std::string param;
  };
  auto J = [](const char* t) { return json::parse(t); };
  const std::vector<Case> cases = {
      {J(R"({"prompt": "x", "bogus": 1})"), 400, "bogus"},
      {J(R"({"prompt": "x", "temperature": 5})"), 400, "temperature"},
      {J(R"({"prompt": "x", "max_tokens": 0})"), 400, "max_tokens"},
      {J(R"({"prompt": "x", "n": 2})"), 400, "n"},
      {J(R"({"prompt": 5})"), 400, "prompt"},
      {J(R"({"prompt": [1, 999999]})"), 400, "prompt"},
      {J(R"({"max_tokens": 3})"), 400, "prompt"},
      {J(R"({"prompt": "x", "model": "gpt-4"})"), 404, "model"},
      {J(R"({"prompt": "x", "kscope": {"capture": {"sites": ["9.resid_post"]}}})"), 400, "site '9.resid_post'"},
      {J(R"({"prompt": "x", "kscope": {"capture": {"sites": ["2.resid_post"], "positions": "replies"}}})"), 400, "positions 'replies'"},
      {J(R"({"prompt": "x", "kscope": {"interventions": [{"vector": [1, 2, 3], "site": "2.resid_post", "coef": 1}]}})"), 400, "kscope.interventions[0]"},
      {J(R"({"prompt": "x", "kscope": {"interventions": [{"vector": "../../etc/passwd", "site": "2.resid_post"}]}})"), 400, "kscope.interventions[0].vector"},
      {J(R"({"prompt": "x", "kscope": {"interventions": [{"vector": "missing", "site": "2.resid_post"}]}})"), 400, "kscope.interventions[0].vector"},
      {J(R"({"prompt": "x", "kscope": {"steer": 1}})"), 400, "kscope.steer"},
  };
  for (const Case& k : cases) {
    int status = 0;
    const json r = post(c, "/v1/completions", k.body, &status);
    EXPECT_EQ(status, k.status) << k.body.dump();
    ASSERT_TRUE(r.contains("error")) << r.dump();
    EXPECT_NE(r["error"]["message"].get<std::string>().find(k.param), std::string::npos) << r.dump();
  }
  auto res = cc.Post("/v1/completions", "{not json", "application/json");
  EXPECT_EQ(res->status, 400);
  EXPECT_NE(res->body.find("not valid JSON"), std::string::npos);
  res = cc.Post("/v1/chat/completions", json({{"messages", {{{"role", "robot"}, {"content", "x"}}}}}).dump(), "application/json");
  EXPECT_EQ(res->status, 400);
  EXPECT_NE(res->body.find("messages[0].role"), std::string::npos);
  res = cc.Get("/nowhere");
  EXPECT_EQ(res->status, 404);
  EXPECT_NE(res->body.find("\"error\""), std::string::npos);
}

TEST(ServerLimits, auth_body_size_queue_and_timeout_limits_answer_with_their_codes) {
  ServerOptions o;
  o.api_key = "sekrit";
  o.max_body_bytes = 4096;
  o.max_batch = 1;
  o.max_queue = 1;
  o.request_timeout_s = 1.5;
  Running s(o);
  auto c = s.client();
  auto& cc = const_cast<httplib::Client&>(c);
  auto r = cc.Post("/v1/completions", json({{"prompt", "x"}, {"max_tokens", 2}}).dump(), "application/json");
  EXPECT_EQ(r->status, 401);
  EXPECT_EQ(cc.Get("/health")->status, 200);  // health needs no key
  auto ok = s.client("sekrit");
  auto& oc = const_cast<httplib::Client&>(ok);
  r = oc.Post("/v1/completions", json({{"prompt", std::string(10000, 'a')}}).dump(), "application/json");
  EXPECT_EQ(r->status, 413);
  // one slot and one queue place: a third concurrent request is refused with 429; a long one times out with 504
  std::vector<std::future<int>> fs;
  for (int i = 0; i < 4; ++i)
    fs.push_back(std::async(std::launch::async, [&s] {
      auto cl = s.client("sekrit");
      auto& c2 = const_cast<httplib::Client&>(cl);
      auto rr = c2.Post("/v1/completions", json({{"prompt", "The"}, {"max_tokens", 1000}, {"ignore_eos", true}}).dump(), "application/json");
      return rr ? rr->status : -1;
    }));
  std::map<int, int> codes;
  for (auto& f : fs) ++codes[f.get()];
  EXPECT_GT(codes[429], 0);
  EXPECT_GT(codes[504], 0);
}

TEST(ServerLimits, a_client_that_disconnects_cancels_its_generation) {
  ServerOptions o;
  Running s(o);
  {
    httplib::Client c("127.0.0.1", s.port);
    int chunks = 0;
    httplib::Request req;
    req.method = "POST";
    req.path = "/v1/completions";
    req.set_header("Content-Type", "application/json");
    req.body = json({{"prompt", "The"}, {"max_tokens", 800}, {"stream", true}, {"ignore_eos", true}}).dump();
    req.content_receiver = [&](const char*, size_t, uint64_t, uint64_t) { return ++chunks < 3; };  // read a little, then hang up
    httplib::Response res;
    httplib::Error err;
    c.send(req, res, err);
    EXPECT_GE(chunks, 3);
  }
  for (int i = 0; i < 100; ++i) {
    httplib::Client c("127.0.0.1", s.port);
    const std::string m = c.Get("/metrics")->body;
    if (m.find("kscope_generations_cancelled_total 1") != std::string::npos) return;  // cancelled
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ADD_FAILURE() << "the generation was not cancelled after the client left";
}

TEST(ServerLimits, a_client_that_leaves_a_non_streaming_request_cancels_it) {
  ServerOptions o;
  Running s(o);
  {
    httplib::Client c("127.0.0.1", s.port);
    c.set_read_timeout(0, 300000);  // give up after 0.3 s, long before 4000 tokens are done
    const auto r = c.Post("/v1/completions", json({{"prompt", "The"}, {"max_tokens", 4000}, {"ignore_eos", true}}).dump(), "application/json");
    EXPECT_FALSE(r);
  }
  for (int i = 0; i < 100; ++i) {
    httplib::Client c("127.0.0.1", s.port);
    const std::string m = c.Get("/metrics")->body;
    if (m.find("kscope_generations_cancelled_total 1") != std::string::npos) {
      EXPECT_NE(m.find("kscope_batch_size 0"), std::string::npos) << m;
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ADD_FAILURE() << "the generation was not cancelled after the client left";
}

}  // namespace

namespace {

TEST_F(Server, vectors_upload_list_use_and_delete) {
  auto c = srv_->client();
  auto& cc = const_cast<httplib::Client&>(c);
  std::vector<float> d(256, 0.0f);
  d[7] = 1.0f;
  int status = 0;
  json r = post(c, "/vectors", {{"name", "unit7"}, {"vectors", {{"2.resid_post", d}}}, {"norms", {{"2.resid_post", 9.0}}}}, &status);
  EXPECT_EQ(status, 201) << r.dump();
  const json list = json::parse(cc.Get("/vectors")->body);
  bool found = false;
  for (auto& v : list["vectors"]) found |= v["name"] == "unit7";
  EXPECT_TRUE(found);
  r = post(c, "/v1/completions", {{"prompt", "The"}, {"max_tokens", 4}, {"temperature", 0},
                                  {"kscope", {{"interventions", {{{"vector", "unit7"}, {"site", "2.resid_post"}, {"coef", 1.0}, {"relative", true}}}}}}}, &status);
  EXPECT_EQ(status, 200) << r.dump();
  post(c, "/vectors", {{"name", "bad"}, {"vectors", {{"2.resid_post", {1, 2}}}}}, &status);
  EXPECT_EQ(status, 400);
  post(c, "/vectors", {{"name", "../x"}, {"vectors", {{"2.resid_post", d}}}}, &status);
  EXPECT_EQ(status, 400);
  EXPECT_EQ(cc.Delete("/vectors/unit7")->status, 200);
  EXPECT_EQ(cc.Delete("/vectors/unit7")->status, 404);
}

TEST_F(Server, capture_over_given_text_equals_the_cli_capture) {
  const json r = post(srv_->client(), "/capture", {{"sequences", {"The file is created.", {{"text", "Le fichier"}, {"response", " est créé."}}}},
                                                   {"sites", {"1.resid_post"}}, {"positions", "all"}});
  ASSERT_EQ(r["sequences"].size(), 2u) << r.dump();
  auto model = Model::load(kDemo);
  auto tok = Tokenizer::load(kDemo);
  CaptureRequest a;
  a.prompt = tok->encode("The file is created.");
  CaptureSpec spec;
  spec.sites = {{SiteKind::resid_post, 1}};
  const auto ref = run_capture(*model, {a}, spec)[0];
  const auto& rows = r["sequences"][0]["sites"]["1.resid_post"];
  ASSERT_EQ(rows.size(), ref.positions.size());
  for (size_t i = 0; i < rows.size(); ++i)
    EXPECT_EQ(rows[i].get<std::vector<float>>(), std::vector<float>(ref.rows.at("1.resid_post").begin() + i * 256, ref.rows.at("1.resid_post").begin() + (i + 1) * 256));
  EXPECT_EQ(r["sequences"][1]["tokens"].size(), r["sequences"][1]["positions"].size());
  int status = 0;
  post(srv_->client(), "/capture", {{"sequences", {"x"}}, {"sites", {"1.resid_post"}}, {"store", "s1"}}, &status);
  EXPECT_EQ(status, 400);  // no --stores directory on this server
}

}  // namespace

namespace {

TEST(ServerLoad, sixty_four_clients_are_all_answered_and_the_server_keeps_its_counts) {
  ServerOptions o;
  o.max_batch = 64;
  o.max_queue = 256;
  Running s(o);
  const int clients = 64, per_client = 3, max_tokens = 8;
  std::vector<double> lat;
  std::mutex mu;
  int ok = 0;
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> ts;
  for (int c = 0; c < clients; ++c)
    ts.emplace_back([&, c] {
      httplib::Client cl("127.0.0.1", s.port);
      cl.set_read_timeout(120, 0);
      for (int k = 0; k < per_client; ++k) {
        const auto a = std::chrono::steady_clock::now();
        auto r = cl.Post("/v1/completions",
                         json({{"prompt", "Request " + std::to_string(c * 10 + k)}, {"max_tokens", max_tokens}, {"seed", c}, {"ignore_eos", true}}).dump(),
                         "application/json");
        const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - a).count();
        std::lock_guard<std::mutex> lk(mu);
        lat.push_back(ms);
        const bool good = r && r->status == 200 && json::parse(r->body)["usage"]["completion_tokens"] == max_tokens;
        ok += good;
        if (!good) ADD_FAILURE() << "client " << c << " request " << k << ": " << (r ? std::to_string(r->status) + " " + r->body : "no response (" + httplib::to_string(r.error()) + ")");
      }
    });
  for (auto& t : ts) t.join();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(ok, clients * per_client);
  std::sort(lat.begin(), lat.end());
  auto pct = [&](double p) { return lat[static_cast<size_t>(p * (lat.size() - 1))]; };
  std::printf("    load: %d clients x %d requests x %d tokens in %.2f s: %.1f requests/s, %.0f tokens/s; latency p50 %.0f ms, p95 %.0f ms, p99 %.0f ms\n",
              clients, per_client, max_tokens, secs, clients * per_client / secs, clients * per_client * max_tokens / secs, pct(0.5),
              pct(0.95), pct(0.99));
  httplib::Client cl("127.0.0.1", s.port);
  const std::string m = cl.Get("/metrics")->body;
  EXPECT_NE(m.find(fmt::format("kscope_generations_completed_total {}", clients * per_client)), std::string::npos) << m;
  EXPECT_NE(m.find("kscope_queue_length 0"), std::string::npos);
  EXPECT_NE(m.find("kscope_batch_size 0"), std::string::npos);
}

}  // namespace
