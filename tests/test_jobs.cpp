// Research jobs over real HTTP: a full extraction job through the API, steering evaluation, projection and
// massive-activation jobs chained on it, cancel, restart (an interrupted job resumes from its files with nothing
// lost or duplicated), generation answering while a job runs, and every error path.
#include <gtest/gtest.h>

#include <fmt/format.h>
#include <httplib.h>

#include <chrono>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <thread>

#include "server/server.hpp"
#include "testutil.hpp"

using namespace kscope;
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

const std::string kDemo = std::string(KSCOPE_SOURCE_DIR) + "/models/demo";

struct Running {
  std::unique_ptr<KscopeServer> server;
  std::thread thread;
  int port = 0;
  explicit Running(const std::string& jobs_dir) {
    ServerOptions o;
    o.model_dir = kDemo;
    o.jobs_dir = jobs_dir;
    server = std::make_unique<KscopeServer>(Model::load(kDemo), o);
    port = server->bind("127.0.0.1", 0);
    thread = std::thread([this] { server->serve(); });
  }
  ~Running() {
    server->stop();
    thread.join();
    server.reset();
  }
  json call(const std::string& method, const std::string& path, const json& body = nullptr, int* status = nullptr) const {
    httplib::Client c("127.0.0.1", port);
    c.set_read_timeout(60, 0);
    httplib::Result r = method == "POST" ? c.Post(path.c_str(), body.is_null() ? "" : body.dump(), "application/json")
                        : method == "DELETE" ? c.Delete(path.c_str()) : c.Get(path.c_str());
    EXPECT_TRUE(r) << method << " " << path;
    if (!r) return {};
    if (status) *status = r->status;
    try {
      return json::parse(r->body);
    } catch (...) {
      return json(r->body);
    }
  }
  // polls until the job leaves queued/running
  json wait(const std::string& id, double seconds = 180) const {
    const auto t0 = std::chrono::steady_clock::now();
    for (;;) {
      const json j = call("GET", "/jobs/" + id);
      if (j["state"] != "queued" && j["state"] != "running") return j;
      if (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > seconds) return j;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }
};

std::vector<std::string> lines(const std::string& path) {
  std::vector<std::string> v;
  std::stringstream ss(test::read_file(path));
  std::string l;
  while (std::getline(ss, l))
    if (!l.empty()) v.push_back(l);
  return v;
}

TEST(Jobs, extraction_then_steering_projection_and_massive_through_the_api) {
  test::TempDir d;
  Running srv(d.str() + "/jobs");
  int st = 0;
  const json traits = srv.call("GET", "/traits");
  EXPECT_GE(traits["traits"].size(), 12u);
  json j = srv.call("POST", "/jobs", {{"kind", "extract"}, {"params", {{"trait", "french"}, {"max_new_tokens", 12}}}}, &st);
  EXPECT_EQ(st, 202) << j.dump();
  const std::string id = j["id"];
  EXPECT_EQ(j["state"], "queued");
  j = srv.wait(id);
  ASSERT_EQ(j["state"], "done") << j.dump() << srv.call("GET", "/jobs/" + id + "/log").dump();
  EXPECT_EQ(j["result"]["vectors"]["trait"], "french");
  EXPECT_GE(j["result"]["vectors"]["best"]["probe"]["test_auroc"].get<double>(), 0.9);
  EXPECT_EQ(j["progress"]["label"], "vectors");
  const json files = srv.call("GET", "/jobs/" + id + "/files");
  std::set<std::string> names;
  for (auto& f : files["files"]) names.insert(f["path"]);
  for (auto f : {"french/vectors/probe.safetensors", "french/vectors/summary.json", "french/responses.jsonl", "french/vet.json"})
    EXPECT_TRUE(names.count(f)) << f << " " << files.dump();
  // a file comes back byte for byte
  const json summary = srv.call("GET", "/jobs/" + id + "/files/french/vectors/summary.json");
  EXPECT_EQ(summary, json::parse(test::read_file(d.str() + "/jobs/" + id + "/out/french/vectors/summary.json")));
  EXPECT_NE(srv.call("GET", "/jobs/" + id + "/log").get<std::string>().find("vectors:"), std::string::npos);

  // steering evaluation from the extraction job, then projection onto its vector, then massive activations
  j = srv.call("POST", "/jobs", {{"kind", "steer-eval"}, {"params", {{"from_job", id}, {"method", "mean_diff"}, {"sites", "2-3"},
                                                                       {"max_new_tokens", 8}, {"max_questions", 5}}}}, &st);
  ASSERT_EQ(st, 202) << j.dump();
  const json se = srv.wait(j["id"]);
  ASSERT_EQ(se["state"], "done") << se.dump();
  EXPECT_FALSE(se["result"]["baseline"].is_null());
  EXPECT_GT(se["result"]["candidates"].get<int>(), 2);
  j = srv.call("POST", "/jobs", {{"kind", "project"},
                                 {"params", {{"vectors", {{{"job", id}, {"method", "mean_diff"}}}},
                                             {"rollouts", {{{"id", "fr"}, {"text", "Le fichier est créé s'il n'existe pas."}},
                                                           {{"id", "en"}, {"text", "The file is created if it does not exist."}}}}}}},
               &st);
  ASSERT_EQ(st, 202) << j.dump();
  const std::string pid = j["id"];
  ASSERT_EQ(srv.wait(pid)["state"], "done");
  const json fr = srv.call("GET", "/jobs/" + pid + "/files/project/rollout-fr.json"), en = srv.call("GET", "/jobs/" + pid + "/files/project/rollout-en.json");
  auto mean = [](const json& t) {
    double m = 0;
    const auto& c = t["series"].begin().value()["centred"];
    for (auto& x : c) m += x.get<double>();
    return m / c.size();
  };
  EXPECT_GT(mean(fr), mean(en));
  j = srv.call("POST", "/jobs", {{"kind", "massive"}, {"params", {{"prompts", {"The file.", "Le fichier."}}, {"ratio", 5}}}}, &st);
  ASSERT_EQ(st, 202);
  const json ma = srv.wait(j["id"]);
  ASSERT_EQ(ma["state"], "done") << ma.dump();
  EXPECT_TRUE(ma["result"].contains("recommended_exclude"));
  // listing and metrics
  const json all = srv.call("GET", "/jobs");
  EXPECT_EQ(all["jobs"].size(), 4u);
  httplib::Client c("127.0.0.1", srv.port);
  const auto m = c.Get("/metrics");
  ASSERT_TRUE(m);
  EXPECT_NE(m->body.find("kscope_jobs{state=\"done\"} 4"), std::string::npos) << m->body;
  EXPECT_NE(m->body.find("kscope_process_resident_bytes "), std::string::npos) << m->body;
  // a finished job can be deleted; then it is gone
  EXPECT_EQ(srv.call("DELETE", "/jobs/" + pid)["deleted"], true);
  srv.call("GET", "/jobs/" + pid, nullptr, &st);
  EXPECT_EQ(st, 404);
}

TEST(Jobs, bad_job_requests_get_4xx_naming_the_field) {
  test::TempDir d;
  Running srv(d.str() + "/jobs");
  struct Case {
    json body;
    int status;
    std::string needle;
  };
  const std::vector<Case> cases = {
      {{{"kind", "train"}}, 400, "kind"},
      {{{"kind", "extract"}, {"params", {{"trait", "french"}, {"max_pairz", 3}}}}, 400, "params.max_pairz"},
      {{{"kind", "extract"}, {"params", {{"trait", "../../etc/passwd"}}}}, 400, "params.trait"},
      {{{"kind", "extract"}, {"params", {{"trait", "no_such"}}}}, 400, "not a shipped trait"},
      {{{"kind", "extract"}, {"params", {{"trait", "french"}, {"sites", "9"}}}}, 400, "params.sites"},
      {{{"kind", "extract"}, {"params", {{"trait", "french"}, {"judge", "gpt"}}}}, 400, "params.judge"},
      {{{"kind", "extract"}, {"params", {{"dataset", {{"name", "x"}}}}}}, 400, "params.dataset"},
      {{{"kind", "steer-eval"}, {"params", {{"from_job", "job-nope"}}}}, 404, "job-nope"},
      {{{"kind", "project"}, {"params", {{"vectors", json::array()}}}}, 400, "params.vectors"},
      {{{"kind", "extract"}, {"params", {{"trait", "french"}}}, {"extra", 1}}, 400, "extra"},
  };
  for (auto& c : cases) {
    int st = 0;
    const json r = srv.call("POST", "/jobs", c.body, &st);
    EXPECT_EQ(st, c.status) << c.body.dump() << " -> " << r.dump();
    EXPECT_NE(r.dump().find(c.needle), std::string::npos) << c.body.dump() << " -> " << r.dump();
  }
  int st = 0;
  srv.call("GET", "/jobs/job-missing", nullptr, &st);
  EXPECT_EQ(st, 404);
  srv.call("GET", "/jobs/job-missing/files/../../x", nullptr, &st);
  EXPECT_EQ(st, 404);
  // a path out of the job's directory is refused
  const json j = srv.call("POST", "/jobs", {{"kind", "massive"}, {"params", {{"prompts", {"x y"}}}}});
  srv.wait(j["id"]);
  const json r = srv.call("GET", "/jobs/" + j["id"].get<std::string>() + "/files/..%2f..%2fjob.json", nullptr, &st);
  EXPECT_GE(st, 400) << r.dump();
  EXPECT_EQ(srv.call("POST", "/jobs", "[1]", &st).is_object(), true);
  EXPECT_EQ(st, 400);
  EXPECT_EQ(json::parse(test::read_file(d.str() + "/jobs/" + j["id"].get<std::string>() + "/job.json"))["state"], "done");
}

TEST(Jobs, cancel_stops_a_running_job_and_generation_answers_meanwhile) {
  test::TempDir d;
  Running srv(d.str() + "/jobs");
  // the same completion on an idle server
  const json req = {{"prompt", "The following options are available:"}, {"max_tokens", 12}, {"temperature", 0}};
  const json idle = srv.call("POST", "/v1/completions", req);
  const json j = srv.call("POST", "/jobs", {{"kind", "extract"}, {"params", {{"trait", "anxiety"}, {"vet", false}, {"max_new_tokens", 48},
                                                                            {"batch", 8}, {"stop_after", "responses"}}}});
  const std::string id = j["id"];
  for (int i = 0; i < 2000; ++i) {
    const json s = srv.call("GET", "/jobs/" + id);
    if (s["state"] == "running" && s["progress"]["done"].get<int64_t>() > 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  // generation shares the model with the job, step by step, and gives the same tokens
  const json busy = srv.call("POST", "/v1/completions", req);
  EXPECT_EQ(busy["choices"][0]["text"], idle["choices"][0]["text"]);
  const json c = srv.call("POST", "/jobs/" + id + "/cancel");
  const json done = srv.wait(id, 60);
  EXPECT_EQ(done["state"], "canceled") << done.dump();
  EXPECT_LT(lines(d.str() + "/jobs/" + id + "/out/anxiety/responses.jsonl").size(), 400u);
  EXPECT_NE(srv.call("GET", "/jobs/" + id + "/log").get<std::string>().find("canceled"), std::string::npos);
  // canceling a finished job changes nothing
  EXPECT_EQ(srv.call("POST", "/jobs/" + id + "/cancel")["state"], "canceled");
}

TEST(Jobs, an_interrupted_job_resumes_after_a_restart_without_losing_or_duplicating) {
  test::TempDir d;
  const std::string jobs = d.str() + "/jobs";
  std::string id;
  {
    Running srv(jobs);
    const json j = srv.call("POST", "/jobs", {{"kind", "extract"}, {"params", {{"trait", "anxiety"}, {"vet", false}, {"max_pairs", 64},
                                                                              {"max_new_tokens", 16}, {"batch", 8}, {"stop_after", "responses"}}}});
    id = j["id"];
    // a finished job too, to see it listed after the restart
    for (int i = 0; i < 3000; ++i) {
      if (fs::exists(jobs + "/" + id + "/out/anxiety/responses.jsonl") && lines(jobs + "/" + id + "/out/anxiety/responses.jsonl").size() >= 16) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }  // the server goes down mid-job
  const json rec = json::parse(test::read_file(jobs + "/" + id + "/job.json"));
  EXPECT_EQ(rec["state"], "interrupted") << rec.dump();
  const size_t before = lines(jobs + "/" + id + "/out/anxiety/responses.jsonl").size();
  EXPECT_GE(before, 16u);
  EXPECT_LT(before, 128u) << "finished before the restart";
  Running srv(jobs);
  const json done = srv.wait(id);
  ASSERT_EQ(done["state"], "done") << done.dump();
  EXPECT_EQ(done["runs"], 2);
  const auto rs = lines(jobs + "/" + id + "/out/anxiety/responses.jsonl");
  ASSERT_EQ(rs.size(), 128u);
  std::set<std::pair<int64_t, std::string>> keys;
  for (auto& l : rs) {
    const json x = json::parse(l);
    keys.insert({x["pair"].get<int64_t>(), x["side"].get<std::string>()});
  }
  EXPECT_EQ(keys.size(), 128u);
  EXPECT_NE(srv.call("GET", "/jobs/" + id + "/log").get<std::string>().find("server restarted"), std::string::npos);
}

TEST(Jobs, a_server_without_a_jobs_directory_says_so) {
  ServerOptions o;
  o.model_dir = kDemo;
  KscopeServer server(Model::load(kDemo), o);
  const int port = server.bind("127.0.0.1", 0);
  std::thread th([&] { server.serve(); });
  httplib::Client c("127.0.0.1", port);
  const auto r = c.Post("/jobs", R"({"kind": "massive"})", "application/json");
  server.stop();
  th.join();
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 400);
  EXPECT_NE(r->body.find("--jobs"), std::string::npos);
}

}  // namespace
