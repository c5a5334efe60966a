// The device path of hooks, run on the CPU ("cpu-staged": the CPU's ops behind host_memory() == false): steering
// as row ops, captures staged and delivered after the pass, and captures filed on the model's delivery thread
// while the next pass runs. Whatever the path, a capture holds the same bits.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <future>
#include <map>
#include <thread>

#include "backend/cpu/cpu_backend.hpp"
#include "interp/capture.hpp"
#include "runtime/engine.hpp"
#include "testutil.hpp"
#include "util/error.hpp"
#include "util/thread_pool.hpp"

using namespace kscope;

namespace {

std::string fixture(const std::string& n) { return test::fixtures() + "/reference/" + n; }

class AsyncReads : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    host_ = Model::load(fixture("kimi_bf16")).release();
    staged_ = Model::load(fixture("kimi_bf16"), make_backend("cpu-staged")).release();
  }
  static void TearDownTestSuite() {
    delete host_;
    delete staged_;
  }
  static Site site(const std::string& s) { return parse_site(s, 3); }
  static Model* host_;
  static Model* staged_;
};
Model* AsyncReads::host_ = nullptr;
Model* AsyncReads::staged_ = nullptr;

std::vector<int32_t> prompt_of(int i, int n) {
  std::vector<int32_t> p;
  for (int t = 0; t < n; ++t) p.push_back((37 * t + 11 * i + 5) % 512);
  return p;
}

// A mixed batch: replayed and generated sequences of different lengths (so the batch shrinks as they finish and
// the batch-to-request mapping moves between steps), with steering on some of them, capturing residual,
// attention, router and final-norm sites at every position.
std::vector<CaptureRequest> mixed_requests() {
  std::vector<float> v(160);
  for (int d = 0; d < 160; ++d) v[d] = std::sin(0.37f * d);
  std::vector<CaptureRequest> reqs;
  for (int i = 0; i < 6; ++i) {
    CaptureRequest r;
    r.prompt = prompt_of(i, 3 + 2 * i);
    if (i % 3 == 0) {
      r.response = prompt_of(i + 7, 4 + i);
    } else {
      r.generate = true;
      r.gen.max_new_tokens = 2 + 3 * i;
      r.gen.ignore_eos = true;
      r.gen.sampling = {0.8, 0, 1.0, static_cast<uint64_t>(40 + i)};
    }
    if (i % 2 == 1) {
      Intervention iv;
      iv.site = {SiteKind::resid_post, 1};
      iv.vector = v;
      iv.coef = 0.5 * i;
      iv.positions = PositionSpec::parse("response");
      r.interventions = {iv};
    }
    reqs.push_back(r);
  }
  return reqs;
}

CaptureSpec all_sites() {
  CaptureSpec spec;
  for (const char* s : {"embed", "0.resid_post", "1.attn_out", "1.resid_post", "1.router", "2.mlp_out", "final_norm"})
    spec.sites.push_back(parse_site(s, 3));
  return spec;
}

void expect_same(const std::vector<CapturedSeq>& a, const std::vector<CapturedSeq>& b, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].tokens, b[i].tokens) << what << " seq " << i;
    EXPECT_EQ(a[i].positions, b[i].positions) << what << " seq " << i;
    EXPECT_EQ(a[i].rows, b[i].rows) << what << " seq " << i;
    EXPECT_EQ(a[i].router_ids, b[i].router_ids) << what << " seq " << i;
    EXPECT_EQ(a[i].router_weights, b[i].router_weights) << what << " seq " << i;
  }
}

TEST_F(AsyncReads, the_device_path_captures_the_same_bits_as_the_host_path_filed_now_or_on_the_delivery_thread) {
  const auto reqs = mixed_requests();
  const auto spec = all_sites();
  const auto on_host = run_capture(*host_, reqs, spec);
  staged_->set_async_reads(false);
  const auto staged_sync = run_capture(*staged_, reqs, spec);
  staged_->set_async_reads(true);
  const auto staged_async = run_capture(*staged_, reqs, spec);
  expect_same(on_host, staged_sync, "staged, delivered before forward returns");
  expect_same(on_host, staged_async, "staged, filed on the delivery thread");
  // every kept token has its rows, so nothing was lost or filed twice
  for (size_t i = 0; i < reqs.size(); ++i)
    EXPECT_EQ(staged_async[i].rows.at("1.resid_post").size(), staged_async[i].positions.size() * 160) << i;
  EXPECT_GT(on_host[5].tokens.size(), on_host[1].tokens.size());  // sequences did finish at different steps
}

// Records the order of its reads and, for the first read of each pass, whether forward() had already returned.
struct Recorder : Hook {
  std::vector<Site> sites;
  bool async = true;
  std::atomic<bool> forward_returned{false};
  std::atomic<bool> saw_return{false};
  std::atomic<int> first_reads{0};
  std::chrono::milliseconds hold{0};
  std::mutex mu;
  std::vector<std::string> log;
  int throw_at = -1;
  bool wants(const Site& s) const override { return std::find(sites.begin(), sites.end(), s) != sites.end(); }
  bool writes(const Site&) const override { return false; }
  bool async_reads() const override { return async; }
  void on(const Site& s, int64_t seq, float* d, int64_t n, int64_t w, int64_t pos0) override {
    if (hold.count() > 0 && first_reads++ == 0) {  // hold the first read until forward() returns (or time runs out)
      const auto until = std::chrono::steady_clock::now() + hold;
      while (!forward_returned && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      saw_return = forward_returned.load();
    }
    std::lock_guard<std::mutex> lk(mu);
    const int k = static_cast<int>(log.size());
    log.push_back(s.str() + "/" + std::to_string(seq) + "@" + std::to_string(pos0) + "x" + std::to_string(n) + ":" +
                  std::to_string(d[0]) + "," + std::to_string(d[n * w - 1]));
    if (k == throw_at) fail(ErrorKind::internal, "recorder", "read {} refused", k);
  }
  ~Recorder() override {
    try {
      wait_reads();
    } catch (...) {
    }
  }
};

TEST_F(AsyncReads, forward_returns_before_its_reads_are_filed_and_wait_reads_waits_for_them) {
  Recorder rec;
  rec.sites = {site("0.resid_post"), site("final_norm")};
  rec.hold = std::chrono::milliseconds(5000);
  const auto p = prompt_of(1, 7);
  KvCache cache = staged_->new_cache();
  std::vector<ForwardItem> items{{&cache, p.data(), static_cast<int64_t>(p.size()), false}};
  std::vector<std::vector<float>> logits;
  staged_->set_async_reads(true);
  staged_->forward(items, logits, &rec);
  rec.forward_returned = true;  // the delivery thread is holding the first read until now
  rec.wait_reads();
  EXPECT_TRUE(rec.saw_return) << "the first read was filed before forward() returned";
  EXPECT_EQ(rec.log.size(), 2u);

  // the same hook filed synchronously: its first read happens inside forward(), which cannot return before it
  Recorder sync;
  sync.sites = rec.sites;
  sync.async = false;
  sync.hold = std::chrono::milliseconds(200);
  KvCache c2 = staged_->new_cache();
  std::vector<ForwardItem> items2{{&c2, p.data(), static_cast<int64_t>(p.size()), false}};
  staged_->forward(items2, logits, &sync);
  sync.forward_returned = true;
  EXPECT_FALSE(sync.saw_return);
  EXPECT_EQ(sync.log, rec.log);  // same rows, same order
}

TEST_F(AsyncReads, reads_keep_pass_order_across_a_generation_whose_batch_shrinks) {
  std::vector<GenerateRequest> reqs;
  for (int i = 0; i < 5; ++i) {
    GenerateRequest r;
    r.prompt = prompt_of(i, 2 + i);
    r.max_new_tokens = 1 + 2 * i;
    r.ignore_eos = true;
    reqs.push_back(r);
  }
  std::vector<std::vector<std::string>> logs;
  for (bool async : {false, true}) {
    Recorder rec;
    rec.sites = {site("embed"), site("1.resid_mid"), site("2.resid_post")};
    rec.async = async;
    GenerateOptions o;
    o.observer = &rec;
    o.feed_last = true;
    generate(*staged_, reqs, o);  // returns with every read filed
    logs.push_back(rec.log);
  }
  EXPECT_EQ(logs[0], logs[1]);
  EXPECT_EQ(logs[0].size(), 3u * (5 + 20 + 5));  // per site: 5 prefills, 20 decode steps, 5 last-token feeds
}

TEST_F(AsyncReads, an_error_in_a_read_on_the_delivery_thread_reaches_its_hook_and_not_the_next_pass) {
  Recorder rec;
  rec.sites = {site("1.resid_post")};
  rec.throw_at = 0;
  const auto p = prompt_of(2, 5);
  KvCache cache = staged_->new_cache();
  std::vector<ForwardItem> items{{&cache, p.data(), static_cast<int64_t>(p.size()), false}};
  std::vector<std::vector<float>> logits;
  staged_->forward(items, logits, &rec);  // returns: the read runs later
  KvCache c2 = staged_->new_cache();
  std::vector<ForwardItem> items2{{&c2, p.data(), static_cast<int64_t>(p.size()), false}};
  staged_->forward(items2, logits, nullptr);  // another caller's pass is not failed by that hook's error
  try {
    rec.wait_reads();
    ADD_FAILURE() << "the read's error was lost";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("read 0 refused"), std::string::npos) << e.what();
  }
  // and the model is fine
  KvCache c3 = staged_->new_cache();
  std::vector<ForwardItem> items3{{&c3, p.data(), static_cast<int64_t>(p.size()), false}};
  std::vector<std::vector<float>> again, ref;
  staged_->forward(items3, again, nullptr);
  KvCache c4 = host_->new_cache();
  std::vector<ForwardItem> items4{{&c4, p.data(), static_cast<int64_t>(p.size()), false}};
  host_->forward(items4, ref, nullptr);
  EXPECT_EQ(again, ref);
}

TEST_F(AsyncReads, a_capture_destroyed_right_after_its_pass_waits_for_its_rows) {
  const auto p = prompt_of(3, 40);
  for (int round = 0; round < 20; ++round) {
    CaptureSpec spec;
    spec.sites = {site("0.resid_post"), site("1.resid_post"), site("2.resid_post"), site("final_norm")};
    auto cap = std::make_unique<CaptureHook>(spec, 1);
    KvCache cache = staged_->new_cache();
    std::vector<ForwardItem> items{{&cache, p.data(), static_cast<int64_t>(p.size()), false}};
    std::vector<std::vector<float>> logits;
    staged_->forward(items, logits, cap.get());
    cap.reset();  // rows may still be in flight: the destructor waits (the sanitizer run would see a write after free)
  }
  staged_->drain();
}

TEST_F(AsyncReads, the_engine_files_inline_captures_on_the_delivery_thread_with_the_same_bits) {
  std::vector<float> v(160);
  for (int d = 0; d < 160; ++d) v[d] = std::cos(0.21f * d);
  auto run = [&](Model& m) {
    Engine engine(m, 4, 16);
    std::vector<std::future<EngineResult>> fs;
    for (int i = 0; i < 6; ++i) {
      auto pr = std::make_shared<std::promise<EngineResult>>();
      fs.push_back(pr->get_future());
      EngineRequest r;
      r.prompt = prompt_of(i, 3 + i);
      r.max_new_tokens = 2 + i;
      r.ignore_eos = true;
      r.sampling = {0.0, 0, 1.0, 0};
      if (i % 2) {
        Intervention iv;
        iv.site = {SiteKind::resid_post, 0};
        iv.vector = v;
        iv.coef = 0.3 * i;
        r.interventions = {iv};
      }
      CaptureSpec spec;
      spec.sites = {{SiteKind::resid_post, 1}, {SiteKind::final_norm, -1}};
      r.capture = spec;
      r.on_done = [pr](EngineResult res) { pr->set_value(std::move(res)); };
      engine.submit(std::move(r));
    }
    std::vector<EngineResult> out;
    for (auto& f : fs) out.push_back(f.get());
    return out;
  };
  const auto h = run(*host_);
  staged_->set_async_reads(true);
  const auto s = run(*staged_);
  ASSERT_EQ(h.size(), s.size());
  for (size_t i = 0; i < h.size(); ++i) {
    ASSERT_TRUE(h[i].capture && s[i].capture);
    EXPECT_EQ(h[i].tokens, s[i].tokens) << i;
    EXPECT_EQ(h[i].capture->positions, s[i].capture->positions) << i;
    EXPECT_EQ(h[i].capture->rows, s[i].capture->rows) << i;
    EXPECT_FALSE(s[i].capture->rows.at("final_norm").empty()) << i;
  }
}

// Counts how many of its reads run at once (each holds a few milliseconds) and records each (site, sequence)'s
// positions in the order they arrive.
struct Overlap : Hook {
  std::vector<Site> sites;
  bool concurrent = true;
  std::atomic<int> in{0}, most{0};
  std::mutex mu;
  std::map<std::string, std::vector<int64_t>> pos;
  bool wants(const Site& s) const override { return std::find(sites.begin(), sites.end(), s) != sites.end(); }
  bool writes(const Site&) const override { return false; }
  bool async_reads() const override { return true; }
  bool concurrent_reads() const override { return concurrent; }
  void on(const Site& s, int64_t seq, float*, int64_t n, int64_t, int64_t pos0) override {
    const int now = ++in;
    for (int m = most.load(); now > m && !most.compare_exchange_weak(m, now);) {
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(4));
    {
      std::lock_guard<std::mutex> lk(mu);
      auto& v = pos[s.str() + "/" + std::to_string(seq)];
      for (int64_t i = 0; i < n; ++i) v.push_back(pos0 + i);
    }
    --in;
  }
  ~Overlap() override {
    try {
      wait_reads();
    } catch (...) {
    }
  }
};

TEST(AsyncReadsPool, a_pass_s_rows_are_filed_in_parallel_for_hooks_that_allow_it_each_sequence_in_pass_order) {
  setenv("KSCOPE_DELIVERY_THREADS", "4", 1);  // read when the model's delivery thread starts (its first pass)
  auto m = Model::load(fixture("kimi_bf16"), make_backend("cpu-staged"));
  std::vector<GenerateRequest> reqs;
  for (int i = 0; i < 8; ++i) {
    GenerateRequest r;
    r.prompt = prompt_of(i, 2 + i % 3);
    r.max_new_tokens = 4;
    r.ignore_eos = true;
    reqs.push_back(r);
  }
  for (bool concurrent : {true, false}) {
    Overlap h;
    h.sites = {parse_site("0.resid_post", 3), parse_site("2.resid_post", 3), parse_site("final_norm", 3)};
    h.concurrent = concurrent;
    GenerateOptions o;
    o.observer = &h;
    const auto before = m->delivery_stats();
    generate(*m, reqs, o);  // returns with every read filed
    const auto after = m->delivery_stats();
    if (concurrent)
      EXPECT_GE(h.most.load(), 2) << "one pass's 8 sequences were filed one at a time";
    else
      EXPECT_EQ(h.most.load(), 1) << "a hook without concurrent_reads() was called from two threads at once";
    ASSERT_EQ(h.pos.size(), 3u * 8u);
    for (auto& [key, v] : h.pos) {
      const int i = std::stoi(key.substr(key.find('/') + 1));
      const int64_t want = static_cast<int64_t>(reqs[i].prompt.size()) + 4 - 1;  // the last token is not fed
      ASSERT_EQ(static_cast<int64_t>(v.size()), want) << key;
      for (int64_t p = 0; p < want; ++p) EXPECT_EQ(v[p], p) << key;  // nothing lost, doubled or out of order
    }
    EXPECT_GE(after.jobs - before.jobs, 4);  // the prefill and three decode steps, each delivered after its pass
    EXPECT_GT(after.busy_seconds - before.busy_seconds, 0.0);
    EXPECT_GE(after.waited_seconds, before.waited_seconds);
  }
  unsetenv("KSCOPE_DELIVERY_THREADS");
}

TEST(ThreadCounts, come_from_the_environment_and_a_malformed_count_is_an_error_naming_the_variable) {
  unsetenv("KSCOPE_TEST_THREADS");
  EXPECT_EQ(ThreadPool::env_threads("KSCOPE_TEST_THREADS", 5), 5);
  setenv("KSCOPE_TEST_THREADS", "", 1);  // set but empty: as if unset
  EXPECT_EQ(ThreadPool::env_threads("KSCOPE_TEST_THREADS", 5), 5);
  setenv("KSCOPE_TEST_THREADS", "3", 1);
  EXPECT_EQ(ThreadPool::env_threads("KSCOPE_TEST_THREADS", 5), 3);
  for (const char* bad : {"0", "-2", "abc", "4x", "99999999999999999999", "5000"}) {
    setenv("KSCOPE_TEST_THREADS", bad, 1);
    try {
      ThreadPool::env_threads("KSCOPE_TEST_THREADS", 5);
      ADD_FAILURE() << "'" << bad << "' was taken as a thread count";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::config);
      EXPECT_NE(std::string(e.what()).find("KSCOPE_TEST_THREADS"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(bad), std::string::npos) << e.what();
    }
  }
  unsetenv("KSCOPE_TEST_THREADS");
  // the delivery pool's count: a bad value stops the generation that would start it, with the variable's name
  setenv("KSCOPE_DELIVERY_THREADS", "many", 1);
  auto m = Model::load(fixture("kimi_bf16"), make_backend("cpu-staged"));
  GenerateRequest r;
  r.prompt = prompt_of(0, 3);
  r.max_new_tokens = 2;
  r.ignore_eos = true;
  Overlap h;
  h.sites = {parse_site("0.resid_post", 3)};
  GenerateOptions o;
  o.observer = &h;
  try {
    generate(*m, {r}, o);
    ADD_FAILURE() << "KSCOPE_DELIVERY_THREADS=many was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("KSCOPE_DELIVERY_THREADS"), std::string::npos) << e.what();
  }
  unsetenv("KSCOPE_DELIVERY_THREADS");
}

}  // namespace
