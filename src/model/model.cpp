#include "model/model.hpp"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <condition_variable>
#include <deque>
#include <set>
#include <thread>

#include "backend/cpu/cpu_backend.hpp"
#include "util/error.hpp"
#include "util/thread_pool.hpp"

namespace kscope {

namespace {
const char* kSiteNames[] = {"embed", "resid_pre", "attn_out", "resid_mid", "mlp_out", "router", "resid_post", "final_norm", "logits"};
}

std::string Site::str() const {
  const char* n = kSiteNames[static_cast<int>(kind)];
  return layer < 0 ? std::string(n) : std::to_string(layer) + "." + n;
}

Site parse_site(const std::string& s, int64_t n_layers) {
  const auto dot = s.find('.');
  std::string name = dot == std::string::npos ? s : s.substr(dot + 1);
  int64_t layer = -1;
  if (dot != std::string::npos) {
    const std::string l = s.substr(0, dot);
    if (l.empty() || l.find_first_not_of("0123456789") != std::string::npos)
      fail(ErrorKind::input, "site '" + s + "'", "expected LAYER.NAME (e.g. 20.resid_post) or embed, final_norm, logits");
    layer = std::stoll(l);
    if (layer >= n_layers) fail(ErrorKind::input, "site '" + s + "'", "layer {} is outside [0, {})", layer, n_layers);
  } else if (s.find_first_not_of("0123456789") == std::string::npos) {
    fail(ErrorKind::input, "site '" + s + "'", "a bare layer number is ambiguous: name the site (e.g. {}.resid_post)", s);
  }
  for (int k = 0; k < 9; ++k) {
    if (name != kSiteNames[k]) continue;
    const auto kind = static_cast<SiteKind>(k);
    const bool global = kind == SiteKind::embed || kind == SiteKind::final_norm || kind == SiteKind::logits;
    if (global && layer >= 0) fail(ErrorKind::input, "site '" + s + "'", "'{}' is model-wide: no layer", name);
    if (!global && layer < 0) fail(ErrorKind::input, "site '" + s + "'", "'{}' needs a layer (e.g. 3.{})", name, name);
    return {kind, layer};
  }
  fail(ErrorKind::input, "site '" + s + "'",
       "unknown site '{}' (expected resid_pre, attn_out, resid_mid, mlp_out, router, resid_post, embed, final_norm, logits)", name);
}

bool HookList::wants(const Site& s) const {
  for (auto* h : hooks)
    if (h->wants(s)) return true;
  return false;
}
bool HookList::writes(const Site& s) const {
  for (auto* h : hooks)
    if (h->wants(s) && h->writes(s)) return true;
  return false;
}
bool HookList::reads(const Site& s) const {
  for (auto* h : hooks)
    if (h->wants(s) && h->reads(s)) return true;
  return false;
}
bool HookList::row_ops(const Site& s, int64_t seq, int64_t n, int64_t w, int64_t pos0, std::vector<RowOp>& ops) {
  for (auto* h : hooks)
    if (h->wants(s) && h->writes(s) && !h->row_ops(s, seq, n, w, pos0, ops)) return false;
  return true;
}
void HookList::on_read(const Site& s, int64_t seq, float* d, int64_t n, int64_t w, int64_t pos0) {
  for (auto* h : hooks)
    if (h->wants(s) && h->reads(s)) h->on_read(s, seq, d, n, w, pos0);
}
void HookList::readers(const Site& s, int64_t seq, std::vector<std::pair<Hook*, int64_t>>& out) {
  for (auto* h : hooks)
    if (h->wants(s) && h->reads(s)) h->readers(s, seq, out);
}
void HookList::on(const Site& s, int64_t seq, float* d, int64_t n, int64_t w, int64_t pos0) {
  for (auto* h : hooks)
    if (h->wants(s)) h->on(s, seq, d, n, w, pos0);
}
void HookList::on_router(int64_t layer, int64_t seq, const float* logits, int32_t* idx, float* weight,
                         int64_t n, int64_t e, int64_t k, int64_t pos0) {
  for (auto* h : hooks)
    if (h->wants({SiteKind::router, layer})) h->on_router(layer, seq, logits, idx, weight, n, e, k, pos0);
}

// One MoE block: the router's fp32 logits and top-k, on_route (the model's router hooks), the routed experts into y,
// the shared expert added (inside the expert launches where the backend stacks it with the routed experts). Running
// the shared expert on a second stream beside the router was measured slower at one token on the H100: its matmul
// fills every multiprocessor, so the router's one-block kernels wait for it.
void moe_block(Backend& be, const ModelConfig& cfg, const MoeWeights& m, const float* x, int64_t N, float* y,
               const std::function<void(float*, int32_t*, float*)>& on_route, const uint16_t* x_bf16) {
  const int64_t E = cfg.n_routed_experts, K = cfg.num_experts_per_tok, H = cfg.hidden_size;
  Buf<float> rl(be, N * E), wt(be, N * K);
  Buf<int32_t> idx(be, N * K);
  be.linear(m.router, x, N, rl.data());
  be.route(cfg, rl.data(), m.score_bias, N, idx.data(), wt.data());
  if (on_route) on_route(rl.data(), idx.data(), wt.data());
  be.moe_experts(m, x, N, K, idx.data(), wt.data(), y);
  if (m.shared && !be.moe_includes_shared(m)) {
    Buf<float> sh(be, N * H);
    be.mlp_bf16(*m.shared, x, x_bf16, N, sh.data());
    be.add(y, sh.data(), N * H);
  }
}

Model::Model(ModelConfig cfg, ModelWeights weights, std::shared_ptr<Backend> backend)
    : cfg_(std::move(cfg)), w_(std::move(weights)), backend_(std::move(backend)) {
  if (!backend_) backend_ = std::make_shared<CpuBackend>();
  inv_freq_ = cfg_.rope_inv_freq();
  attn_factor_ = cfg_.rope_attention_factor();
  attn_scale_ = static_cast<float>(cfg_.attention_scale());
  backend_->prepare(cfg_, w_);
}

std::unique_ptr<Model> Model::load(const std::string& path, std::shared_ptr<Backend> backend) {
  ModelConfig cfg = load_config(path);
  ModelWeights w = ModelWeights::load(cfg, path);
  return std::make_unique<Model>(std::move(cfg), std::move(w), std::move(backend));
}

KvCache Model::new_cache() const {
  KvCache c;
  c.state = backend_->new_kv(cfg_);
  return c;
}

struct Model::Deferred {
  Hook* to;  // the reading hook (a leaf: wrappers resolved at emit time)
  Site site;
  int64_t seq;  // to's own sequence number
  float* host;
  int64_t n, width, pos0;
  int64_t mark;  // the backend mark after its copy (-1: synchronous)
};

// One thread that runs posted jobs in order; each post's future is ready when its job has run (or thrown). Its
// pool (the courier thread and helpers: KSCOPE_DELIVERY_THREADS, default half the host's threads, at most 8) files
// one pass's rows in parallel; it is its own, so filing never waits on, or holds up, the global pool.
class Model::Courier {
 public:
  Courier() : pool_(pool_size()), thread_([this] { loop(); }) {}
  ThreadPool& pool() { return pool_; }
  ~Courier() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  std::shared_future<void> post(std::function<void()> job) {
    std::packaged_task<void()> task(std::move(job));
    std::shared_future<void> f = task.get_future().share();
    {
      std::lock_guard<std::mutex> lk(mu_);
      jobs_.push_back(std::move(task));
    }
    cv_.notify_one();
    return f;
  }

 private:
  void loop() {
    for (;;) {
      std::packaged_task<void()> task;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [this] { return stop_ || !jobs_.empty(); });
        if (jobs_.empty()) return;  // stopping, nothing left
        task = std::move(jobs_.front());
        jobs_.pop_front();
      }
      task();  // an exception lands in the task's future
    }
  }
  static int pool_size() {
    return ThreadPool::env_threads("KSCOPE_DELIVERY_THREADS", static_cast<int>(std::clamp(std::thread::hardware_concurrency() / 2, 1u, 8u)));
  }
  ThreadPool pool_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::packaged_task<void()>> jobs_;
  bool stop_ = false;
  std::thread thread_;
};

Model::~Model() {
  drain();
  courier_.reset();
}

// Waits only: an error thrown by a hook's on_read() belongs to that hook (Hook::wait_reads), not to whoever runs
// the next pass (on a server, another request).
void Model::drain() {
  if (!pending_.valid()) return;
  const auto t0 = std::chrono::steady_clock::now();
  pending_.wait();
  pending_ = {};
  std::lock_guard<std::mutex> lk(stats_mu_);
  delivery_.waited_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

Model::DeliveryStats Model::delivery_stats() const {
  std::lock_guard<std::mutex> lk(stats_mu_);
  return delivery_;
}

namespace {
// Ends a pass: waits for whatever it issued and recycles the staging memory and marks for the next pass; where
// the pass's reads are still being delivered on the delivery thread, its set stays untouched and the other
// set (free: the reads before were waited for) becomes current.
struct StageScope {
  Backend& be;
  bool keep = false;
  ~StageScope() {
    be.wait();
    if (keep)
      be.stage_swap();
    else
      be.stage_reset();
  }
};
}  // namespace

// Hooks see host rows. On a host-memory backend that is the buffer itself. On a device, writes that hooks can
// describe as row ops are applied there, and reads are copied out asynchronously and delivered after the pass;
// a hook that can do neither gets the batch's rows copied out, and back when it may have written.
void Model::emit(Hook* hook, const Site& site, const std::vector<ForwardItem>& items, const std::vector<int64_t>& row0,
                 float* data, int64_t N, int64_t width, std::vector<Deferred>& later) {
  if (!hook || !hook->wants(site)) return;
  Backend& be = *backend_;
  if (be.host_memory()) {
    for (size_t i = 0; i < items.size(); ++i)
      if (items[i].n > 0)
        hook->on(site, static_cast<int64_t>(i), data + row0[i] * width, items[i].n, width, items[i].cache->length);
    return;
  }
  std::vector<RowOp> ops;
  bool described = true;
  if (hook->writes(site)) {
    for (size_t i = 0; i < items.size() && described; ++i) {
      if (items[i].n == 0) continue;
      std::vector<RowOp> o;
      described = hook->row_ops(site, static_cast<int64_t>(i), items[i].n, width, items[i].cache->length, o);
      for (auto& x : o) {
        KSCOPE_CHECK(x.row >= 0 && x.row < items[i].n, internal, "hook", "row op outside its sequence's rows");
        x.row += row0[i];
        ops.push_back(x);
      }
    }
  }
  if (!described) {
    std::vector<float> copy(N * width);
    be.download(copy.data(), data, copy.size() * sizeof(float));
    for (size_t i = 0; i < items.size(); ++i)
      if (items[i].n > 0)
        hook->on(site, static_cast<int64_t>(i), copy.data() + row0[i] * width, items[i].n, width, items[i].cache->length);
    be.upload(data, copy.data(), copy.size() * sizeof(float));
    return;
  }
  if (!ops.empty()) be.apply_row_ops(data, width, ops);
  if (hook->reads(site)) {
    auto* host = static_cast<float*>(be.stage_host(N * width * sizeof(float)));
    be.download_async(host, data, N * width * sizeof(float));
    const int64_t mk = be.mark();
    std::vector<std::pair<Hook*, int64_t>> to;
    for (size_t i = 0; i < items.size(); ++i) {
      if (items[i].n == 0) continue;
      to.clear();
      hook->readers(site, static_cast<int64_t>(i), to);
      for (auto& [h, seq] : to)
        later.push_back({h, site, seq, host + row0[i] * width, items[i].n, width, items[i].cache->length, mk});
    }
  }
}

// Each site's rows go to their hooks as soon as their copy is done, while the device still computes the layers
// after it.
void Model::deliver_now(Backend& be, const std::vector<Deferred>& later, ThreadPool* pool) {
  for (size_t i = 0; i < later.size();) {
    size_t j = i + 1;  // [i, j): the reads behind one copy
    while (j < later.size() && later[j].mark == later[i].mark) ++j;
    be.wait_mark(later[i].mark);
    auto file = [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) {
        const Deferred& d = later[i + k];
        d.to->on_read(d.site, d.seq, d.host, d.n, d.width, d.pos0);
      }
    };
    if (pool)
      pool->parallel_for(static_cast<int64_t>(j - i), 2, file);
    else
      file(0, static_cast<int64_t>(j - i));
    i = j;
  }
}

// Called right after the pass is issued. The reads of the pass before are waited for first (reads stay in pass
// order, and their staging set is then free). With every reader able to take its rows on another thread, they
// go to the delivery thread and the caller returns to issue the next step while the host files them.
bool Model::deliver(std::vector<Deferred>& later) {
  drain();
  if (later.empty()) return false;
  bool async = async_reads_;
  for (auto& d : later) async = async && d.to->async_reads();
  if (!async) {
    deliver_now(*backend_, later);
    later.clear();
    return false;
  }
  if (!courier_) courier_ = std::make_unique<Courier>();
  auto job = std::make_shared<std::vector<Deferred>>(std::move(later));
  later.clear();
  Backend* be = backend_.get();
  bool concurrent = true;
  for (auto& d : *job) concurrent = concurrent && d.to->concurrent_reads();
  ThreadPool* pool = concurrent ? &courier_->pool() : nullptr;
  pending_ = courier_->post([this, be, job, pool] {
    const auto t0 = std::chrono::steady_clock::now();
    deliver_now(*be, *job, pool);
    std::lock_guard<std::mutex> lk(stats_mu_);
    ++delivery_.jobs;
    delivery_.busy_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  });
  std::set<Hook*> hooks;
  for (auto& d : *job) hooks.insert(d.to);
  for (Hook* h : hooks) h->set_reads_done(pending_);
  return true;
}

void Model::attention(int64_t layer, const float* x, const uint16_t* x_bf16, const std::vector<ForwardItem>& items,
                      const std::vector<int64_t>& row0, const int64_t* pos, int64_t N,
                      const std::vector<uint8_t>& absorbed, float* out) {
  Backend& be = *backend_;
  const auto& a = w_.layers[layer].attn;
  const int64_t nh = cfg_.num_attention_heads;
  const int64_t dq = cfg_.qk_head_dim(), dr = cfg_.qk_rope_head_dim, C = cfg_.kv_lora_rank;
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  // queries [N, heads, nope + rope]
  Buf<float> q(be, N * nh * dq);
  if (a.q_proj) {
    be.linear_bf16(*a.q_proj, x, x_bf16, N, q.data());
  } else {
    const int64_t Q = a.q_a_proj->out;
    Buf<float> qa(be, N * Q);
    Buf<uint16_t> qa16(be, x_bf16 ? N * Q : 0);
    be.linear_bf16(*a.q_a_proj, x, x_bf16, N, qa.data());
    be.rmsnorm_bf16(qa.data(), a.q_a_norm, N, Q, eps, qa.data(), qa16.data());
    be.linear_bf16(*a.q_b_proj, qa.data(), qa16.data(), N, q.data());
  }
  be.rope(q.data(), N, nh, nh * dq, dq, cfg_.qk_nope_head_dim, dr, pos, inv_freq_, attn_factor_, cfg_.rope.interleave);
  // compressed kv [N, kv_lora + rope]: normed latent + shared rope key, appended to each sequence's cache
  Buf<float> ckv(be, N * (C + dr)), lat(be, N * C);
  be.linear_bf16(a.kv_a_proj, x, x_bf16, N, ckv.data());
  be.rmsnorm(ckv.data(), a.kv_a_norm, N, C, eps, lat.data(), C + dr);
  be.rope(ckv.data(), N, 1, C + dr, 0, C, dr, pos, inv_freq_, attn_factor_, cfg_.rope.interleave);
  std::vector<AttnSeq> seqs;
  for (size_t i = 0; i < items.size(); ++i) {
    if (items[i].n == 0) continue;
    KvCache& kc = *items[i].cache;
    be.kv_append(*kc.state, layer, lat.data(), ckv.data(), row0[i], items[i].n, C, dr);
    AttnSeq& s = seqs.emplace_back();
    s.row0 = row0[i];
    s.n_new = items[i].n;
    s.past = kc.length;
    s.kv = kc.state.get();
    s.layer = layer;
    s.absorbed = absorbed[i] != 0;
  }
  Buf<float> o(be, N * nh * cfg_.v_head_dim);
  be.mla_attention(cfg_, a, q.data(), seqs, attn_scale_, o.data());
  be.linear(a.o_proj, o.data(), N, out);
}

Buf<float> Model::run(std::vector<ForwardItem>& items, const std::vector<uint8_t>& logit_rows,
                      const std::vector<uint8_t>& absorbed, Hook* obs, std::vector<int64_t>& rows,
                      std::vector<Deferred>& later) {
  Backend& be = *backend_;
  const int64_t H = cfg_.hidden_size, V = cfg_.vocab_size;
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  std::vector<int64_t> row0(items.size());
  int64_t N = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    KSCOPE_CHECK(items[i].cache && items[i].cache->state, input, "forward", "sequence {} has no cache for this model", i);
    KSCOPE_CHECK(items[i].cache->length + items[i].n <= cfg_.max_position_embeddings, input, "forward",
                 "sequence {} would reach {} tokens, past max_position_embeddings {}", i,
                 items[i].cache->length + items[i].n, cfg_.max_position_embeddings);
    row0[i] = N;
    N += items[i].n;
  }
  std::vector<int32_t> ids(N);
  std::vector<int64_t> pos(N);
  for (size_t i = 0; i < items.size(); ++i)
    for (int64_t t = 0; t < items[i].n; ++t) {
      const int32_t id = items[i].tokens[t];
      KSCOPE_CHECK(id >= 0 && id < V, input, "embed", "token id {} is outside the vocabulary [0, {})", id, V);
      ids[row0[i] + t] = id;
      pos[row0[i] + t] = items[i].cache->length + t;
    }

  Buf<int32_t> ids_b(be, ids);
  Buf<int64_t> pos_b(be, pos);
  Buf<float> h(be, N * H), x(be, N * H), y(be, N * H);  // residual [N, H], normed input, sublayer output
  // bf16(x), written by the norms, for backends whose matmuls read bf16 (nothing writes x between a norm and the
  // matmuls that read it: no hook site lies between them)
  Buf<uint16_t> x16(be, be.bf16_inputs() ? N * H : 0);
  be.embed(*w_.embed, ids_b.data(), N, h.data());
  emit(obs, {SiteKind::embed, -1}, items, row0, h.data(), N, H, later);
  // The residual adds run with the norm after them (add_rmsnorm_bf16: one launch on a device) unless a hook
  // writes at a site between the two: a hook that only reads sees the same rows after the norm as before it (the
  // norm writes x, not h), and its reads keep their order.
  auto writes_at = [&](SiteKind k, int64_t l) { return obs && obs->wants({k, l}) && obs->writes({k, l}); };
  const int64_t L = cfg_.num_hidden_layers;
  bool normed = false;  // x already holds layer l's input norm (done with the previous layer's last add)
  for (int64_t l = 0; l < L; ++l) {
    const auto& lw = w_.layers[l];
    emit(obs, {SiteKind::resid_pre, l}, items, row0, h.data(), N, H, later);
    if (!normed) be.rmsnorm_bf16(h.data(), lw.input_norm, N, H, eps, x.data(), x16.data());
    attention(l, x.data(), x16.data(), items, row0, pos_b.data(), N, absorbed, y.data());
    if (!writes_at(SiteKind::attn_out, l) && !writes_at(SiteKind::resid_mid, l)) {
      be.add_rmsnorm_bf16(h.data(), y.data(), lw.post_attention_norm, N, H, eps, x.data(), x16.data());
      emit(obs, {SiteKind::attn_out, l}, items, row0, y.data(), N, H, later);
      emit(obs, {SiteKind::resid_mid, l}, items, row0, h.data(), N, H, later);
    } else {
      emit(obs, {SiteKind::attn_out, l}, items, row0, y.data(), N, H, later);
      be.add(h.data(), y.data(), N * H);
      emit(obs, {SiteKind::resid_mid, l}, items, row0, h.data(), N, H, later);
      be.rmsnorm_bf16(h.data(), lw.post_attention_norm, N, H, eps, x.data(), x16.data());
    }
    if (lw.moe) {
      const int64_t E = cfg_.n_routed_experts, K = cfg_.num_experts_per_tok;
      std::function<void(float*, int32_t*, float*)> on_route;
      if (obs && obs->wants({SiteKind::router, l}))
        on_route = [&](float* rl, int32_t* idx, float* wt) {
          const bool host = be.host_memory();
          std::vector<float> rlh, wth;
          std::vector<int32_t> idxh;
          if (!host) {
            rlh.resize(N * E);
            wth.resize(N * K);
            idxh.resize(N * K);
            be.download(rlh.data(), rl, rlh.size() * sizeof(float));
            be.download(wth.data(), wt, wth.size() * sizeof(float));
            be.download(idxh.data(), idx, idxh.size() * sizeof(int32_t));
          }
          float* rlp = host ? rl : rlh.data();
          float* wtp = host ? wt : wth.data();
          int32_t* idxp = host ? idx : idxh.data();
          for (size_t i = 0; i < items.size(); ++i)
            if (items[i].n > 0)
              obs->on_router(l, static_cast<int64_t>(i), rlp + row0[i] * E, idxp + row0[i] * K, wtp + row0[i] * K,
                             items[i].n, E, K, items[i].cache->length);
          for (int64_t j = 0; j < N * K; ++j) {
            KSCOPE_CHECK(idxp[j] >= 0 && idxp[j] < E, input, "router hook", "layer {}: expert id {} outside [0, {})", l, idxp[j], E);
            for (int64_t o = j - j % K; o < j; ++o)  // a token's k experts are distinct (each expert one row per token)
              KSCOPE_CHECK(idxp[o] != idxp[j], input, "router hook", "layer {}: row {} chose expert {} twice", l, j / K, idxp[j]);
          }
          if (!host && obs->writes({SiteKind::router, l})) {
            be.upload(idx, idxh.data(), idxh.size() * sizeof(int32_t));
            be.upload(wt, wth.data(), wth.size() * sizeof(float));
          }
        };
      moe_block(be, cfg_, *lw.moe, x.data(), N, y.data(), on_route, x16.data());
    } else {
      be.mlp_bf16(*lw.mlp, x.data(), x16.data(), N, y.data());
    }
    // the next norm: layer l + 1's input norm (bf16 copy for its matmuls), or the final norm (fp32 only)
    const bool last = l + 1 == L;
    normed = !writes_at(SiteKind::mlp_out, l) && !writes_at(SiteKind::resid_post, l) &&
             (last || !writes_at(SiteKind::resid_pre, l + 1));
    if (normed) {
      be.add_rmsnorm_bf16(h.data(), y.data(), last ? w_.final_norm : w_.layers[l + 1].input_norm, N, H, eps, x.data(),
                          last ? nullptr : x16.data());
      emit(obs, {SiteKind::mlp_out, l}, items, row0, y.data(), N, H, later);
      emit(obs, {SiteKind::resid_post, l}, items, row0, h.data(), N, H, later);
    } else {
      emit(obs, {SiteKind::mlp_out, l}, items, row0, y.data(), N, H, later);
      be.add(h.data(), y.data(), N * H);
      emit(obs, {SiteKind::resid_post, l}, items, row0, h.data(), N, H, later);
    }
  }
  if (!normed) be.rmsnorm(h.data(), w_.final_norm, N, H, eps, x.data());
  emit(obs, {SiteKind::final_norm, -1}, items, row0, x.data(), N, H, later);
  // lm_head only on the rows whose logits are wanted
  rows.clear();
  for (size_t i = 0; i < items.size(); ++i) {
    if (items[i].n == 0 || logit_rows[i] == 0) continue;
    if (logit_rows[i] == 2)
      for (int64_t t = 0; t < items[i].n; ++t) rows.push_back(row0[i] + t);
    else
      rows.push_back(row0[i] + items[i].n - 1);
  }
  const int64_t R = static_cast<int64_t>(rows.size());
  if (R == 0) return Buf<float>();
  Buf<int64_t> rows_b(be, rows);
  Buf<float> xs(be, R * H), lg(be, R * V);
  be.gather_rows(x.data(), rows_b.data(), R, H, xs.data());
  be.linear(w_.lm_head, xs.data(), R, lg.data());
  return lg;
}

int64_t Model::max_pass_tokens() const {
  const int64_t b = backend_->max_pass_tokens();
  if (max_pass_tokens_ > 0 && b > 0) return std::min(max_pass_tokens_, b);
  return max_pass_tokens_ > 0 ? max_pass_tokens_ : b;
}

std::vector<uint8_t> Model::attention_forms(const std::vector<ForwardItem>& items) const {
  std::vector<uint8_t> absorbed(items.size());
  for (size_t i = 0; i < items.size(); ++i)
    absorbed[i] = mla_mode == MlaMode::absorbed || (mla_mode == MlaMode::automatic && items[i].n == 1);
  return absorbed;
}

std::vector<std::vector<ForwardItem>> Model::passes(const std::vector<ForwardItem>& items) const {
  int64_t total = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    KSCOPE_CHECK(items[i].n > 0, input, "forward", "sequence {} has no new tokens", i);
    total += items[i].n;
  }
  const int64_t limit = max_pass_tokens();
  if (limit <= 0 || total <= limit) return {items};
  std::vector<std::vector<ForwardItem>> out;
  std::vector<int64_t> done(items.size(), 0);
  for (int64_t left = total; left > 0;) {
    auto& pass = out.emplace_back(items);
    int64_t room = limit;
    for (size_t i = 0; i < items.size(); ++i) {
      const int64_t take = std::min(items[i].n - done[i], room);
      pass[i].tokens = items[i].tokens + done[i];
      pass[i].n = take;
      done[i] += take;
      room -= take;
      left -= take;
    }
  }
  return out;
}

void Model::forward(std::vector<ForwardItem>& items, std::vector<std::vector<float>>& logits, Hook* obs) {
  std::lock_guard<std::mutex> one_pass(forward_mu_);
  const int64_t V = cfg_.vocab_size;
  const auto absorbed = attention_forms(items);
  auto plan = passes(items);
  logits.assign(items.size(), {});
  std::vector<int64_t> left(items.size());
  for (size_t i = 0; i < items.size(); ++i) left[i] = items[i].n;
  for (auto& pass : plan) {
    StageScope stage{*backend_};
    // all rows of an all_logits item; else the last row, in the pass that carries it
    std::vector<uint8_t> want(items.size());
    for (size_t i = 0; i < items.size(); ++i) {
      left[i] -= pass[i].n;
      want[i] = pass[i].n == 0 ? 0 : items[i].all_logits ? 2 : left[i] == 0 ? 1 : 0;
    }
    std::vector<int64_t> rows;
    std::vector<Deferred> later;
    Buf<float> lg = run(pass, want, absorbed, obs, rows, later);
    stage.keep = deliver(later);
    std::vector<float> lgh = lg.host();
    size_t r = 0;
    for (size_t i = 0; i < items.size(); ++i) {
      if (want[i] == 0) continue;
      const int64_t nr = want[i] == 2 ? pass[i].n : 1;
      logits[i].insert(logits[i].end(), lgh.begin() + r * V, lgh.begin() + (r + nr) * V);
      if (obs && obs->wants({SiteKind::logits, -1}))  // the hook sees (and may change) what forward() returns
        obs->on({SiteKind::logits, -1}, i, logits[i].data() + logits[i].size() - nr * V, nr, V,
                pass[i].cache->length + pass[i].n - nr);
      r += nr;
    }
    for (auto& it : pass) it.cache->length += it.n;
  }
}

void Model::forward(std::vector<ForwardItem>& items, const std::vector<RowDraw>& draws, int64_t top,
                    std::vector<LogitSummary>& out, Hook* obs) {
  std::lock_guard<std::mutex> one_pass(forward_mu_);
  KSCOPE_CHECK(draws.size() == items.size(), internal, "forward", "one RowDraw per item");
  const int64_t V = cfg_.vocab_size;
  const int64_t M = std::clamp<int64_t>(top, 1, V);
  const auto absorbed = attention_forms(items);
  auto plan = passes(items);
  out.assign(items.size(), {});
  std::vector<int64_t> left(items.size());
  for (size_t i = 0; i < items.size(); ++i) left[i] = items[i].n;
  Backend& be = *backend_;
  for (auto& pass : plan) {
    StageScope stage{be};
    std::vector<uint8_t> want(items.size());
    std::vector<int64_t> fin;  // items whose last token is in this pass: their logits rows, in item order
    for (size_t i = 0; i < items.size(); ++i) {
      left[i] -= pass[i].n;
      want[i] = pass[i].n > 0 && left[i] == 0;
      if (want[i]) fin.push_back(static_cast<int64_t>(i));
    }
    std::vector<int64_t> rows;
    std::vector<Deferred> later;
    Buf<float> lg = run(pass, want, absorbed, obs, rows, later);
    const int64_t B = static_cast<int64_t>(fin.size());
    if (B == 0) {
      stage.keep = deliver(later);
      for (auto& it : pass) it.cache->length += it.n;
      continue;
    }
    std::vector<float> mx(B), tv(B * M);
    std::vector<double> ls(B);
    std::vector<int32_t> ti(B * M);
    const bool hook_logits = obs && obs->wants({SiteKind::logits, -1});
    std::vector<float> all;
    if (!hook_logits) {
      stage.keep = deliver(later);
      be.logits_top(lg.data(), B, V, M, mx.data(), ls.data(), tv.data(), ti.data());
    } else {
      all = lg.host();
      stage.keep = deliver(later);
    }
    if (hook_logits) {  // the hook may change the logits: reduce what it leaves
      for (int64_t j = 0; j < B; ++j) {
        const ForwardItem& it = pass[fin[j]];
        obs->on({SiteKind::logits, -1}, fin[j], all.data() + j * V, 1, V, it.cache->length + it.n - 1);
      }
      CpuBackend().logits_top(all.data(), B, V, M, mx.data(), ls.data(), tv.data(), ti.data());
    }
    for (int64_t j = 0; j < B; ++j) {
      LogitSummary& s = out[fin[j]];
      s.max = mx[j];
      s.log_sum = ls[j];
      s.top_vals.assign(tv.begin() + j * M, tv.begin() + (j + 1) * M);
      s.top_ids.assign(ti.begin() + j * M, ti.begin() + (j + 1) * M);
    }
    std::vector<int64_t> drawn;  // rows of lg
    std::vector<RowDraw> ds;
    for (int64_t j = 0; j < B; ++j)
      if (draws[fin[j]].on) {
        drawn.push_back(j);
        ds.push_back(draws[fin[j]]);
      }
    if (!drawn.empty()) {
      std::vector<int32_t> tok(drawn.size());
      std::vector<float> lv(drawn.size());
      if (hook_logits) {  // sample what the hook left
        for (size_t j = 0; j < drawn.size(); ++j) {
          const float* l = all.data() + drawn[j] * V;
          tok[j] = choose_with_draw(l, V, ds[j]);
          lv[j] = l[tok[j]];
        }
      } else {
        be.sample_rows(lg.data(), V, drawn, ds, tok.data(), lv.data());
      }
      for (size_t j = 0; j < drawn.size(); ++j) {
        out[fin[drawn[j]]].sampled = tok[j];
        out[fin[drawn[j]]].sampled_logit = lv[j];
      }
    }
    for (auto& it : pass) it.cache->length += it.n;
  }
}

}  // namespace kscope
