// One DeepSeek-V3 / Kimi-K2 model: config + weights in their stored format + the forward pass, written once
// as calls on a Backend. Sequences are ragged (no padding): each carries its own latent KV cache.
#pragma once
#include <cstdint>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "backend/backend.hpp"
#include "model/config.hpp"
#include "model/logits.hpp"
#include "model/weights.hpp"

namespace kscope {

class ThreadPool;

// The compressed MLA cache of one sequence: per layer, the normed latent and the rotated rope key per token,
// held by the model's backend (host memory on CPU, device memory on CUDA).
struct KvCache {
  std::unique_ptr<KvState> state;
  int64_t length = 0;
  size_t bytes() const { return state ? state->bytes() : 0; }
};

// Hook sites (ARCHITECTURE.md): per layer L resid_pre, attn_out, resid_mid, mlp_out, router, resid_post;
// model-wide embed, final_norm, logits. `layer` is -1 for model-wide sites.
enum class SiteKind { embed, resid_pre, attn_out, resid_mid, mlp_out, router, resid_post, final_norm, logits };
struct Site {
  SiteKind kind;
  int64_t layer;
  std::string str() const;  // "12.resid_post", "final_norm"
  bool operator==(const Site& o) const { return kind == o.kind && layer == o.layer; }
  bool operator<(const Site& o) const { return layer != o.layer ? layer < o.layer : kind < o.kind; }
};
// "12.resid_post", "embed", ...; throws Error(input) naming the text for an unknown name or a layer outside
// [0, n_layers). A bare layer number is refused: every site is named.
Site parse_site(const std::string& s, int64_t n_layers);

// Sees, and may change, the rows of one sequence at a site as the forward pass makes them. Rows are that
// sequence's new tokens at positions pos0, pos0+1, ...; data [n_rows, width]. Changes flow on into the rest of
// the pass (a hook at `L.attn_out` changes what is added to the residual). Only sites some hook wants are
// materialised; a site nobody asked for costs nothing.
class Hook {
 public:
  virtual ~Hook() = default;
  virtual bool wants(const Site& site) const = 0;
  // false when the hook only reads at this site (a device backend then need not copy the rows back)
  virtual bool writes(const Site& site) const { return true; }
  // true when the hook (or, for a list, one of its members that does not write) reads the rows here
  virtual bool reads(const Site& site) const { return !writes(site); }
  virtual void on(const Site& site, int64_t seq, float* data, int64_t n_rows, int64_t width, int64_t pos0) = 0;
  // Device fast path, used only where writes(site): describe the writes on() would make as row ops (rows
  // relative to this sequence's first row) and return true, or return false to have the rows copied out, on()
  // called and the rows copied back. After the ops, on_read() shows the rows to the hook's readers (by default
  // on()); a device backend delivers them asynchronously: before forward() returns, or for hooks whose
  // async_reads(), on the model's delivery thread while the next pass runs.
  virtual bool row_ops(const Site& site, int64_t seq, int64_t n_rows, int64_t width, int64_t pos0,
                       std::vector<RowOp>& ops) {
    return false;
  }
  virtual void on_read(const Site& site, int64_t seq, float* data, int64_t n_rows, int64_t width, int64_t pos0) {
    on(site, seq, data, n_rows, width, pos0);
  }
  // The hooks whose on_read() takes batch item `seq`'s rows at this site, each with its own sequence number,
  // resolved now (a wrapper that renames or dispatches sequences forwards to its inner hooks). A device backend
  // delivers reads to these hooks directly, possibly after the wrapper's mapping has moved on.
  virtual void readers(const Site& site, int64_t seq, std::vector<std::pair<Hook*, int64_t>>& out) {
    if (reads(site)) out.push_back({this, seq});
  }
  // True when on_read() may run on the model's delivery thread after forward() has returned, while the caller
  // goes on (next pass, on(), on_router(), row_ops() on its own thread): the hook then guards its own state, calls
  // wait_reads() before it reads what it collected, and in its destructor. Reads stay in pass order, and a
  // pass's reads are all in before the next pass's begin. A device backend then copies and files a pass's
  // captures while the next pass runs, instead of holding the next step back.
  virtual bool async_reads() const { return false; }
  // True when, on the delivery thread, on_read() may run on several threads at once for different (site, seq)
  // pairs of one pass (never twice at once for one pair): the delivery thread then files a pass's rows in
  // parallel, which matters where filing into fresh memory (first-touch page faults) is slower than a step.
  virtual bool concurrent_reads() const { return false; }
  // Blocks until every read handed to this hook asynchronously is in; rethrows an error thrown by on_read().
  void wait_reads() const {
    if (reads_done_.valid()) reads_done_.get();
  }
  // Set by the model when it hands this hook's reads to its delivery thread.
  void set_reads_done(std::shared_future<void> f) { reads_done_ = std::move(f); }
  // L.router: router logits [n_rows, E] (read-only) and the chosen experts idx/weight [n_rows, k]. A hook whose
  // writes({router, L}) is true may change idx/weight (force, ablate or reweight experts); the experts then run
  // on what it left.
  virtual void on_router(int64_t layer, int64_t seq, const float* logits, int32_t* idx, float* weight,
                         int64_t n_rows, int64_t n_experts, int64_t k, int64_t pos0) {}

 private:
  std::shared_future<void> reads_done_;
};

// Several hooks in order (interventions before captures, so a capture sees what flows on).
class HookList : public Hook {
 public:
  std::vector<Hook*> hooks;
  bool wants(const Site& s) const override;
  bool writes(const Site& s) const override;
  bool reads(const Site& s) const override;
  void on(const Site& s, int64_t seq, float* d, int64_t n, int64_t w, int64_t pos0) override;
  bool row_ops(const Site& s, int64_t seq, int64_t n, int64_t w, int64_t pos0, std::vector<RowOp>& ops) override;
  void on_read(const Site& s, int64_t seq, float* d, int64_t n, int64_t w, int64_t pos0) override;
  void readers(const Site& s, int64_t seq, std::vector<std::pair<Hook*, int64_t>>& out) override;
  void on_router(int64_t layer, int64_t seq, const float* logits, int32_t* idx, float* weight,
                 int64_t n, int64_t e, int64_t k, int64_t pos0) override;
};

// Forwards to `inner` with batch item j renamed to sequence (*index)[j] (a sub-batch of a larger request list).
class RemapHook : public Hook {
 public:
  RemapHook(Hook* inner, const std::vector<int64_t>* index) : inner_(inner), index_(index) {}
  bool wants(const Site& s) const override { return inner_->wants(s); }
  bool writes(const Site& s) const override { return inner_->writes(s); }
  bool reads(const Site& s) const override { return inner_->reads(s); }
  void on(const Site& s, int64_t seq, float* d, int64_t n, int64_t w, int64_t pos0) override {
    inner_->on(s, (*index_)[seq], d, n, w, pos0);
  }
  bool row_ops(const Site& s, int64_t seq, int64_t n, int64_t w, int64_t pos0, std::vector<RowOp>& ops) override {
    return inner_->row_ops(s, (*index_)[seq], n, w, pos0, ops);
  }
  void on_read(const Site& s, int64_t seq, float* d, int64_t n, int64_t w, int64_t pos0) override {
    inner_->on_read(s, (*index_)[seq], d, n, w, pos0);
  }
  void readers(const Site& s, int64_t seq, std::vector<std::pair<Hook*, int64_t>>& out) override {
    inner_->readers(s, (*index_)[seq], out);
  }
  void on_router(int64_t layer, int64_t seq, const float* logits, int32_t* idx, float* weight, int64_t n,
                 int64_t e, int64_t k, int64_t pos0) override {
    inner_->on_router(layer, (*index_)[seq], logits, idx, weight, n, e, k, pos0);
  }

 private:
  Hook* inner_;
  const std::vector<int64_t>* index_;
};

using Observer = Hook;  // read-only use of the same interface

enum class MlaMode { automatic, expanded, absorbed };

struct ForwardItem {
  KvCache* cache = nullptr;      // extended in place by the new tokens
  const int32_t* tokens = nullptr;
  int64_t n = 0;
  bool all_logits = false;       // logits for every new token, else only the last
};

// One MoE block as the model runs it (router, top-k, routed experts, shared expert added): y[N, H]
// from the normed input x[N, H]. on_route, when given, sees the router's logits [N, E], choices and weights [N, K]
// in backend memory before the experts run, and may rewrite the choices and weights (the model's router hooks).
// x_bf16: bf16(x) for a backend with bf16_inputs() (the shared expert's input), or nullptr.
void moe_block(Backend& be, const ModelConfig& cfg, const MoeWeights& m, const float* x, int64_t N, float* y,
               const std::function<void(float* logits, int32_t* idx, float* weight)>& on_route = nullptr,
               const uint16_t* x_bf16 = nullptr);

class Model {
 public:
  Model(ModelConfig cfg, ModelWeights weights, std::shared_ptr<Backend> backend);
  static std::unique_ptr<Model> load(const std::string& path, std::shared_ptr<Backend> backend = nullptr);

  const ModelConfig& config() const { return cfg_; }
  const ModelWeights& weights() const { return w_; }
  Backend& backend() { return *backend_; }

  KvCache new_cache() const;
  // Runs the new tokens of every item through the model in one ragged batch. logits[i] holds [rows, vocab]
  // with rows = n (all_logits) or 1. Forward passes from several threads (a server's engine and its background
  // jobs) are serialized: one pass at a time, in the order they ask.
  void forward(std::vector<ForwardItem>& items, std::vector<std::vector<float>>& logits, Hook* hook = nullptr);
  // The same pass, returning each item's last-row logits reduced (LogitSummary): its top `top` logits and
  // normalizer, and where draws[i].on a token drawn from the whole row where the row is (on a device: on the
  // device). Copies back a few bytes per sequence instead of the vocabulary. all_logits is ignored here.
  void forward(std::vector<ForwardItem>& items, const std::vector<RowDraw>& draws, int64_t top,
               std::vector<LogitSummary>& out, Hook* hook = nullptr);

  MlaMode mla_mode = MlaMode::automatic;  // automatic: absorbed for single-token steps, expanded otherwise

  // Most new tokens one pass carries: the workspace a pass needs grows with its tokens. forward() with more runs
  // several passes in order, each sequence's tokens cut at pass boundaries (a sequence's attention form is chosen
  // from all its new tokens, so the results are the same bits as one pass). 0: the backend's limit
  // (Backend::max_pass_tokens: the CUDA backend's memory plan; none on the CPU).
  void set_max_pass_tokens(int64_t n) { max_pass_tokens_ = n; }
  int64_t max_pass_tokens() const;

  // Device backends: a pass whose readers all have async_reads() has its captures filed on the model's delivery
  // thread while the caller goes on (the next step is issued at once). Off: every read is in before forward()
  // returns. Tests compare the two.
  void set_async_reads(bool on) { async_reads_ = on; }
  // Waits for the last pass's asynchronous reads. forward() does this itself before delivering the next pass,
  // generate() before it returns; hooks wait for their own reads, and get a read's error, with wait_reads().
  void drain();
  // What delivering asynchronous reads cost so far: jobs (one per pass), the delivery thread's busy seconds
  // (waiting for copies and filing rows), and the seconds forward() spent waiting for the pass before's reads
  // (drain(): the part of the capture cost the caller sees).
  struct DeliveryStats {
    int64_t jobs = 0;
    double busy_seconds = 0, waited_seconds = 0;
  };
  DeliveryStats delivery_stats() const;
  ~Model();

 private:
  // absorbed[i]: sequence i attends in the absorbed (decode) form
  void attention(int64_t layer, const float* x, const uint16_t* x_bf16, const std::vector<ForwardItem>& items,
                 const std::vector<int64_t>& row0,
                 const int64_t* pos, int64_t N, const std::vector<uint8_t>& absorbed, float* out);
  struct Deferred;  // a read delivered after the pass (device backends)
  void emit(Hook* hook, const Site& site, const std::vector<ForwardItem>& items, const std::vector<int64_t>& row0,
            float* data, int64_t N, int64_t width, std::vector<Deferred>& later);
  // One pass of forward(): every item with n > 0 (items with n == 0 sit this pass out, keeping their index for the
  // hooks). Logits [rows, V] in backend memory for `rows`: per item, logit_rows[i] 0 none, 1 its last row, 2 all
  // of its rows; reads deferred into `later`.
  Buf<float> run(std::vector<ForwardItem>& items, const std::vector<uint8_t>& logit_rows,
                 const std::vector<uint8_t>& absorbed, Hook* hook, std::vector<int64_t>& rows,
                 std::vector<Deferred>& later);
  // forward()'s passes: each a copy of the items with the tokens it carries (n == 0: none this pass).
  std::vector<std::vector<ForwardItem>> passes(const std::vector<ForwardItem>& items) const;
  std::vector<uint8_t> attention_forms(const std::vector<ForwardItem>& items) const;
  // Hands a pass's deferred reads to their hooks: now, or on the delivery thread (returns true: the pass's staging
  // memory must outlive it, see Backend::stage_swap).
  bool deliver(std::vector<Deferred>& later);
  // pool: files the reads after each copy in parallel (every reader concurrent_reads()); nullptr: in order
  static void deliver_now(Backend& be, const std::vector<Deferred>& later, ThreadPool* pool = nullptr);
  class Courier;  // the delivery thread

  ModelConfig cfg_;
  ModelWeights w_;
  std::shared_ptr<Backend> backend_;
  std::mutex forward_mu_;
  bool async_reads_ = true;
  int64_t max_pass_tokens_ = 0;
  std::unique_ptr<Courier> courier_;
  std::shared_future<void> pending_;  // the last pass's asynchronous reads
  mutable std::mutex stats_mu_;
  DeliveryStats delivery_;
  std::vector<double> inv_freq_;
  double attn_factor_ = 1.0;
  float attn_scale_ = 1.0f;
};

}  // namespace kscope
