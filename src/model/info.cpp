#include "model/info.hpp"

#include <fmt/format.h>

namespace kscope {

namespace {
std::string fmt_of(const TensorInfo* t, WeightFormat f) {
  if (f != WeightFormat::dense) return format_name(f);
  switch (t->dtype) {
    case DType::BF16: return "bf16";
    case DType::F16: return "f16";
    case DType::F32: return "f32";
    default: return dtype_name(t->dtype);
  }
}
}  // namespace

ModelInfo model_info(const ModelConfig& cfg, const ModelWeights& w) {
  ModelInfo mi;
  auto add_lin = [&](const std::string& kind, const Linear& l) {
    mi.params_by_kind[kind] += l.out * l.in;
    mi.bytes_by_kind[kind] += l.bytes();
    mi.bytes_by_format[fmt_of(l.weight, l.format)] += l.bytes();
  };
  auto add_vec = [&](const std::string& kind, size_t n, uint64_t bytes) {
    mi.params_by_kind[kind] += static_cast<int64_t>(n);
    mi.bytes_by_kind[kind] += bytes;
  };
  mi.params_by_kind["embedding"] += w.embed->numel();
  mi.bytes_by_kind["embedding"] += w.embed->nbytes;
  mi.bytes_by_format[fmt_of(w.embed, WeightFormat::dense)] += w.embed->nbytes;
  if (!cfg.tie_word_embeddings) add_lin("lm_head", w.lm_head);
  add_vec("norms", w.final_norm.size(), w.final_norm.size() * 2);
  int64_t expert_params = 0, shared_params = 0;
  for (const auto& l : w.layers) {
    add_vec("norms", l.input_norm.size() * 2 + l.attn.kv_a_norm.size() + l.attn.q_a_norm.size(),
            (l.input_norm.size() * 2 + l.attn.kv_a_norm.size() + l.attn.q_a_norm.size()) * 2);
    for (const Linear* p : {l.attn.q_proj ? &*l.attn.q_proj : nullptr, l.attn.q_a_proj ? &*l.attn.q_a_proj : nullptr,
                            l.attn.q_b_proj ? &*l.attn.q_b_proj : nullptr, &l.attn.kv_a_proj, &l.attn.kv_b_proj, &l.attn.o_proj})
      if (p) add_lin("attention", *p);
    if (l.mlp) {
      add_lin("dense_mlp", l.mlp->gate);
      add_lin("dense_mlp", l.mlp->up);
      add_lin("dense_mlp", l.mlp->down);
    }
    if (l.moe) {
      add_lin("router", l.moe->router);
      add_vec("router", l.moe->score_bias.size(), l.moe->score_bias.size() * 4);
      for (const auto& e : l.moe->experts) {
        add_lin("routed_experts", e.gate);
        add_lin("routed_experts", e.up);
        add_lin("routed_experts", e.down);
        expert_params = e.gate.out * e.gate.in * 3;
      }
      if (l.moe->shared) {
        add_lin("shared_experts", l.moe->shared->gate);
        add_lin("shared_experts", l.moe->shared->up);
        add_lin("shared_experts", l.moe->shared->down);
        shared_params = l.moe->shared->gate.out * l.moe->shared->gate.in * 3;
      }
    }
  }
  for (auto& [k, v] : mi.params_by_kind) mi.total_params += v;
  for (auto& [k, v] : mi.bytes_by_kind) mi.total_bytes += v;
  mi.kv_bytes_per_token = static_cast<uint64_t>(cfg.num_hidden_layers) * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2;
  int64_t n_moe = 0;
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) n_moe += cfg.is_moe_layer(l);
  mi.active_params_per_token = mi.total_params - mi.params_by_kind["routed_experts"] - mi.params_by_kind["embedding"] +
                               n_moe * cfg.num_experts_per_tok * expert_params;
  (void)shared_params;
  return mi;
}

MemoryPlan plan_memory(const ModelConfig& cfg, const ModelInfo& info, int gpus, int64_t context, int64_t batch) {
  MemoryPlan p;
  p.gpus = std::max(1, gpus);
  p.context = context;
  p.batch = batch;
  p.weights_per_gpu = (info.total_bytes + p.gpus - 1) / p.gpus;
  p.kv_per_gpu = (info.kv_bytes_per_token * context * batch + p.gpus - 1) / p.gpus;
  // one step's activations for a prefill chunk of up to 4096 tokens: residual, normed copy, q, and the MoE
  // permutation buffers (top-k copies of the hidden state and the expert intermediate), fp32.
  const uint64_t tok = std::min<int64_t>(4096, std::max<int64_t>(1, batch * std::min<int64_t>(context, 4096)));
  const uint64_t per_tok = 4ull * (3 * cfg.hidden_size + cfg.num_attention_heads * cfg.qk_head_dim() +
                                   std::max<int64_t>(1, cfg.num_experts_per_tok) * (cfg.hidden_size + 2 * cfg.moe_intermediate_size) +
                                   2 * cfg.intermediate_size + cfg.vocab_size / 8);
  p.workspace_per_gpu = tok * per_tok;
  p.total_per_gpu = p.weights_per_gpu + p.kv_per_gpu + p.workspace_per_gpu;
  return p;
}

std::string human_bytes(uint64_t b) {
  const char* u[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(b);
  int i = 0;
  while (v >= 1024 && i < 4) {
    v /= 1024;
    ++i;
  }
  return i == 0 ? fmt::format("{} B", b) : fmt::format("{:.2f} {}", v, u[i]);
}

std::string human_count(int64_t n) {
  const double v = static_cast<double>(n);
  if (v >= 1e12) return fmt::format("{:.2f}T", v / 1e12);
  if (v >= 1e9) return fmt::format("{:.2f}B", v / 1e9);
  if (v >= 1e6) return fmt::format("{:.2f}M", v / 1e6);
  if (v >= 1e3) return fmt::format("{:.1f}K", v / 1e3);
  return std::to_string(n);
}

nlohmann::json info_json(const ModelConfig& cfg, const ModelInfo& info, const MemoryPlan& plan) {
  nlohmann::json j;
  j["model_type"] = cfg.model_type;
  j["identity"] = cfg.identity_hash();
  j["layers"] = cfg.num_hidden_layers;
  j["hidden_size"] = cfg.hidden_size;
  j["vocab_size"] = cfg.vocab_size;
  j["total_params"] = info.total_params;
  j["active_params_per_token"] = info.active_params_per_token;
  j["params_by_kind"] = info.params_by_kind;
  j["bytes_by_kind"] = info.bytes_by_kind;
  j["bytes_by_format"] = info.bytes_by_format;
  j["kv_bytes_per_token"] = info.kv_bytes_per_token;
  j["memory_plan"] = {{"gpus", plan.gpus}, {"context", plan.context}, {"batch", plan.batch},
                      {"weights_per_gpu", plan.weights_per_gpu}, {"kv_per_gpu", plan.kv_per_gpu},
                      {"workspace_per_gpu", plan.workspace_per_gpu}, {"total_per_gpu", plan.total_per_gpu}};
  return j;
}

}  // namespace kscope
