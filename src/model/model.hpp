// One DeepSeek-V3 / Kimi-K2 model: config + weights in their stored format + the forward pass, written once
// as calls on a Backend. Sequences are ragged (no padding): each carries its own latent KV cache.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.hpp"
#include "model/config.hpp"
#include "model/weights.hpp"

namespace kscope {

// The compressed MLA cache of one sequence: per layer, the normed latent and the rotated rope key per token.
struct KvCache {
  std::vector<std::vector<float>> latent;  // [layer][pos * kv_lora]
  std::vector<std::vector<float>> k_rope;  // [layer][pos * rope]
  int64_t length = 0;
  size_t bytes() const;
};

// Hook sites (ARCHITECTURE.md): per layer L resid_pre, attn_out, resid_mid, mlp_out, resid_post; model-wide embed,
// final_norm, logits. `layer` is -1 for model-wide sites.
enum class SiteKind { embed, resid_pre, attn_out, resid_mid, mlp_out, resid_post, final_norm, logits };
struct Site {
  SiteKind kind;
  int64_t layer;
  std::string str() const;  // "12.resid_post", "final_norm"
};

// Receives the rows of one sequence at a site: data [n_rows, width], rows are that sequence's new tokens.
// Only sites the observer wants are materialised; a site nobody asked for costs nothing.
class Observer {
 public:
  virtual ~Observer() = default;
  virtual bool wants(const Site& site) const = 0;
  virtual void on(const Site& site, int64_t seq, const float* data, int64_t n_rows, int64_t width) = 0;
};

enum class MlaMode { automatic, expanded, absorbed };

struct ForwardItem {
  KvCache* cache = nullptr;      // extended in place by the new tokens
  const int32_t* tokens = nullptr;
  int64_t n = 0;
  bool all_logits = false;       // logits for every new token, else only the last
};

class Model {
 public:
  Model(ModelConfig cfg, ModelWeights weights, std::shared_ptr<Backend> backend);
  static std::unique_ptr<Model> load(const std::string& path, std::shared_ptr<Backend> backend = nullptr);

  const ModelConfig& config() const { return cfg_; }
  const ModelWeights& weights() const { return w_; }
  Backend& backend() { return *backend_; }

  KvCache new_cache() const;
  // Runs the new tokens of every item through the model in one ragged batch. logits[i] holds [rows, vocab]
  // with rows = n (all_logits) or 1.
  void forward(std::vector<ForwardItem>& items, std::vector<std::vector<float>>& logits, Observer* obs = nullptr);

  MlaMode mla_mode = MlaMode::automatic;  // automatic: absorbed for single-token steps, expanded otherwise

 private:
  void attention(int64_t layer, const float* x, const std::vector<ForwardItem>& items, const std::vector<int64_t>& row0,
                 const std::vector<int64_t>& pos, float* out);
  void emit(Observer* obs, const Site& site, const std::vector<ForwardItem>& items, const std::vector<int64_t>& row0,
            const float* data, int64_t width);

  ModelConfig cfg_;
  ModelWeights w_;
  std::shared_ptr<Backend> backend_;
  std::vector<double> inv_freq_;
  double attn_factor_ = 1.0;
  float attn_scale_ = 1.0f;
};

}  // namespace kscope
