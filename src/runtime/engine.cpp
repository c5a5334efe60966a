#include "runtime/engine.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "util/error.hpp"

namespace kscope {

struct Engine::Live {
  uint64_t id;
  EngineRequest req;
  KvCache cache;
  std::unique_ptr<Sampler> sampler;
  std::unique_ptr<SteeringHook> steer;
  std::unique_ptr<CaptureHook> cap;
  HookList hooks;
  EngineResult result;
  int32_t next = -1;       // token to feed next step
  bool prefilled = false;
  bool final_feed = false;  // feeding the last kept token for its states, then done
  bool counted = false;     // counted in stats_.active (admitted into the running batch)
  std::string pending_finish;
};

Engine::Engine(Model& model, int64_t max_batch, int64_t max_queue)
    : model_(model), max_batch_(std::max<int64_t>(1, max_batch)), max_queue_(std::max<int64_t>(1, max_queue)) {
  thread_ = std::thread([this] { loop(); });
}

Engine::~Engine() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

uint64_t Engine::submit(EngineRequest req) {
  const auto& cfg = model_.config();
  if (req.prompt.empty()) fail(ErrorKind::input, "prompt", "is empty");
  for (int32_t t : req.prompt)
    if (t < 0 || t >= cfg.vocab_size) fail(ErrorKind::input, "prompt", "token {} is outside the vocabulary [0, {})", t, cfg.vocab_size);
  if (static_cast<int64_t>(req.prompt.size()) >= cfg.max_position_embeddings)
    fail(ErrorKind::input, "prompt", "{} tokens leave no room under max_position_embeddings {}", req.prompt.size(), cfg.max_position_embeddings);
  if (req.max_new_tokens < 1) fail(ErrorKind::input, "max_tokens", "must be at least 1");
  if (req.sampling.temperature < 0) fail(ErrorKind::input, "temperature", "must be >= 0");
  if (!(req.sampling.top_p > 0 && req.sampling.top_p <= 1)) fail(ErrorKind::input, "top_p", "must be in (0, 1]");
  if (req.top_logprobs < 0 || req.top_logprobs > 20) fail(ErrorKind::input, "top_logprobs", "must be in [0, 20]");
  for (int32_t t : req.stop_tokens)
    if (t < 0 || t >= cfg.vocab_size) fail(ErrorKind::input, "stop", "token {} is outside the vocabulary", t);
  auto live = std::make_shared<Live>();
  req.layout.prompt_len = static_cast<int64_t>(req.prompt.size());
  req.layout.total_len = -1;
  live->steer = std::make_unique<SteeringHook>(std::vector<std::vector<Intervention>>{req.interventions},
                                               std::vector<SeqLayout>{req.layout});
  live->steer->validate(cfg);
  if (req.capture) {
    for (const Site& s : req.capture->sites)
      if (s.kind == SiteKind::router && !cfg.is_moe_layer(s.layer))
        fail(ErrorKind::input, "capture.sites", "layer {} is dense: it has no router", s.layer);
    live->cap = std::make_unique<CaptureHook>(*req.capture, 1);
  }
  live->hooks.hooks.push_back(live->steer.get());
  if (live->cap) live->hooks.hooks.push_back(live->cap.get());
  live->sampler = std::make_unique<Sampler>(req.sampling);
  live->cache = model_.new_cache();
  live->result.prompt_tokens = static_cast<int64_t>(req.prompt.size());
  live->req = std::move(req);
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (static_cast<int64_t>(queue_.size()) >= max_queue_) throw QueueFull();
    live->id = next_id_++;
    queue_.push_back(live);
    ++stats_.queued;
  }
  cv_.notify_all();
  return live->id;
}

void Engine::cancel(uint64_t id) {
  std::lock_guard<std::mutex> lk(mu_);
  cancelled_.push_back(id);
  cv_.notify_all();
}

EngineStats Engine::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  return stats_;
}

void Engine::finish(Live& r, const std::string& reason) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    ++stats_.completed;
    if (reason == "cancelled") ++stats_.cancelled;
    // the batch gauge drops before the answer goes out, so a client reading /metrics after its answer never
    // sees itself still running
    if (r.counted) --stats_.active;
    r.counted = false;
  }
  r.result.finish_reason = reason;
  if (r.cap) {
    SeqLayout l = r.req.layout;
    l.total_len = r.cache.length;
    r.result.capture = r.cap->finish(0, l);
    r.result.capture->tokens = r.req.prompt;
    r.result.capture->tokens.insert(r.result.capture->tokens.end(), r.result.tokens.begin(), r.result.tokens.end());
  }
  r.cache.state.reset();  // the KV cache goes back to the budget now, not when the last reference drops
  if (r.req.on_done) r.req.on_done(std::move(r.result));
}

void Engine::loop() {
  std::vector<std::shared_ptr<Live>> active;
  for (;;) {
    std::vector<std::shared_ptr<Live>> rejected;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return stop_ || !queue_.empty() || !active.empty(); });
      if (stop_) break;
      // Admission: a request joins when the KV cache can hold its whole need (prompt + max_tokens); otherwise
      // it waits for running requests to free theirs, or fails when even an idle engine could not hold it.
      while (!queue_.empty() && static_cast<int64_t>(active.size()) < max_batch_) {
        auto& q = queue_.front();
        const auto& cfg = model_.config();
        const int64_t need = std::min<int64_t>(static_cast<int64_t>(q->req.prompt.size()) + q->req.max_new_tokens + 1,
                                               cfg.max_position_embeddings);
        const int64_t free_tokens = model_.backend().kv_free_tokens(cfg);
        if (free_tokens < need) {
          if (!active.empty()) break;
          q->pending_finish = fmt::format("error: KV cache: this request needs {} tokens of cache, the device holds {} "
                                          "beside the weights; lower max_tokens or the prompt", need, free_tokens);
          rejected.push_back(q);
          queue_.pop_front();
          --stats_.queued;
          continue;
        }
        if (free_tokens != INT64_MAX) model_.backend().kv_reserve(*q->cache.state, need);
        active.push_back(q);
        queue_.pop_front();
        --stats_.queued;
      }
      stats_.active = static_cast<int64_t>(active.size());
      for (auto& a : active) a->counted = true;
      for (uint64_t id : cancelled_)
        for (auto& a : active)
          if (a->id == id && a->pending_finish.empty()) a->pending_finish = "cancelled";
      cancelled_.clear();
    }
    for (auto& r : rejected) finish(*r, r->pending_finish);
    // cancelled requests leave before the step
    for (auto it = active.begin(); it != active.end();) {
      if ((*it)->pending_finish == "cancelled") {
        finish(**it, "cancelled");
        it = active.erase(it);
      } else {
        ++it;
      }
    }
    if (active.empty()) {  // (the gauge must not keep showing requests that just left)
      std::lock_guard<std::mutex> lk(mu_);
      stats_.active = 0;
      continue;
    }
    const auto t0 = std::chrono::steady_clock::now();
    try {
      step(active);
    } catch (const std::exception& e) {
      // a step that fails (e.g. out of memory) fails its requests, never the process
      for (auto& a : active) finish(*a, std::string("error: ") + e.what());
      active.clear();
    }
    std::lock_guard<std::mutex> lk(mu_);
    stats_.busy_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ++stats_.steps;
    stats_.active = static_cast<int64_t>(active.size());
  }
  for (auto& a : active) finish(*a, "cancelled");
  for (auto& q : queue_) finish(*q, "cancelled");
}

void Engine::step(std::vector<std::shared_ptr<Live>>& active) {
  const auto& cfg = model_.config();
  const int64_t V = cfg.vocab_size;
  std::vector<ForwardItem> items;
  for (auto& a : active) {
    ForwardItem it;
    it.cache = &a->cache;
    if (!a->prefilled) {
      it.tokens = a->req.prompt.data();
      it.n = static_cast<int64_t>(a->req.prompt.size());
    } else {
      it.tokens = &a->next;
      it.n = 1;
    }
    items.push_back(it);
  }
  struct Dispatch : Hook {  // batch item i -> request i's own hooks (as its sequence 0)
    std::vector<std::shared_ptr<Live>>* act;
    bool wants(const Site& s) const override {
      for (auto& a : *act)
        if (a->hooks.wants(s)) return true;
      return false;
    }
    bool writes(const Site& s) const override {
      for (auto& a : *act)
        if (a->hooks.wants(s) && a->hooks.writes(s)) return true;
      return false;
    }
    bool reads(const Site& s) const override {
      for (auto& a : *act)
        if (a->hooks.wants(s) && a->hooks.reads(s)) return true;
      return false;
    }
    void on(const Site& s, int64_t seq, float* d, int64_t n, int64_t w, int64_t pos0) override {
      auto& h = (*act)[seq]->hooks;
      if (h.wants(s)) h.on(s, 0, d, n, w, pos0);
    }
    bool row_ops(const Site& s, int64_t seq, int64_t n, int64_t w, int64_t pos0, std::vector<RowOp>& ops) override {
      auto& h = (*act)[seq]->hooks;
      return !(h.wants(s) && h.writes(s)) || h.row_ops(s, 0, n, w, pos0, ops);
    }
    void on_read(const Site& s, int64_t seq, float* d, int64_t n, int64_t w, int64_t pos0) override {
      auto& h = (*act)[seq]->hooks;
      if (h.wants(s) && h.reads(s)) h.on_read(s, 0, d, n, w, pos0);
    }
    void readers(const Site& s, int64_t seq, std::vector<std::pair<Hook*, int64_t>>& out) override {
      auto& h = (*act)[seq]->hooks;
      if (h.wants(s) && h.reads(s)) h.readers(s, 0, out);
    }
    void on_router(int64_t l, int64_t seq, const float* lg, int32_t* idx, float* wt, int64_t n, int64_t e,
                   int64_t k, int64_t pos0) override {
      auto& h = (*act)[seq]->hooks;
      if (h.wants({SiteKind::router, l})) h.on_router(l, 0, lg, idx, wt, n, e, k, pos0);
    }
  } dispatch;
  dispatch.act = &active;
  int64_t top = 1;
  for (auto& a : active) {
    top = std::max<int64_t>(top, a->req.top_logprobs);
    if (a->req.sampling.top_k > 0 && a->req.sampling.top_k <= kSummaryTop) top = std::max(top, a->req.sampling.top_k);
  }
  std::vector<RowDraw> draws;  // final-feed rows draw nothing (their sample is not used)
  for (auto& a : active)
    draws.push_back(!a->final_feed && a->sampler->needs_full_row(top) ? a->sampler->draw_for_row() : RowDraw{});
  std::vector<LogitSummary> logits;
  model_.forward(items, draws, top, logits, &dispatch);
  int64_t new_tokens = 0, prompt_tokens = 0;
  std::vector<std::shared_ptr<Live>> still;
  for (size_t i = 0; i < active.size(); ++i) {
    Live& r = *active[i];
    if (!r.prefilled) prompt_tokens += static_cast<int64_t>(r.req.prompt.size());
    r.prefilled = true;
    if (r.final_feed) {  // that was the extra feed for states: done
      finish(r, r.pending_finish);
      continue;
    }
    float lp = 0;
    const int32_t tok = r.sampler->sample(logits[i], V, &lp);
    const auto& eos = cfg.eos_token_ids;
    const bool stop = (!r.req.ignore_eos && std::find(eos.begin(), eos.end(), tok) != eos.end()) ||
                      std::find(r.req.stop_tokens.begin(), r.req.stop_tokens.end(), tok) != r.req.stop_tokens.end();
    if (stop) {
      finish(r, "stop");
      continue;
    }
    TokenEvent ev{tok, lp, {}};
    if (r.req.top_logprobs > 0) {
      const LogitSummary& ls = logits[i];
      const float lz = ls.max + static_cast<float>(ls.log_sum);
      const int64_t k = std::min<int64_t>(r.req.top_logprobs, static_cast<int64_t>(ls.top_ids.size()));
      for (int64_t j = 0; j < k; ++j) ev.top.push_back({ls.top_ids[j], ls.top_vals[j] - lz});
    }
    r.result.tokens.push_back(tok);
    r.result.logprobs.push_back(lp);
    ++new_tokens;
    const bool keep_going = !r.req.on_token || r.req.on_token(ev);
    std::string reason;
    if (!keep_going) reason = "cancelled";
    else if (static_cast<int64_t>(r.result.tokens.size()) >= r.req.max_new_tokens) reason = "length";
    else if (r.cache.length + 1 > cfg.max_position_embeddings) reason = "context";
    if (reason.empty()) {
      r.next = tok;
      still.push_back(active[i]);
    } else if (r.cap && reason != "context" && reason != "cancelled") {
      r.next = tok;  // feed the last kept token once more so it has states
      r.final_feed = true;
      r.pending_finish = reason;
      still.push_back(active[i]);
    } else {
      finish(r, reason);
    }
  }
  active.swap(still);
  std::lock_guard<std::mutex> lk(mu_);
  stats_.generated_tokens += new_tokens;
  stats_.prompt_tokens += prompt_tokens;
}

}  // namespace kscope
