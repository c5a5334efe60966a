// The fields of an HF config.json that change the math of a DeepSeek-V3 / Kimi-K2 model.
#pragma once
#include <cstdint>
#include <optional>
#include <regex>
#include <string>
#include <vector>

namespace kscope {

enum class QuantMethod { none, fp8_block, int4_pack };
enum class ScoringFunc { sigmoid, softmax };
enum class TopkMethod { noaux_tc, greedy, group_limited_greedy };

struct RopeConfig {
  std::string type = "default";  // default | yarn
  double theta = 10000.0;
  double factor = 1.0;
  int64_t original_max_position_embeddings = 0;
  double beta_fast = 32.0, beta_slow = 1.0;
  double mscale = 0.0, mscale_all_dim = 0.0;  // 0 = absent
  std::optional<double> attention_factor;
  bool truncate = true;
  bool interleave = true;  // DeepSeek-V3 stores rope dims as interleaved pairs
};

struct QuantConfig {
  QuantMethod method = QuantMethod::none;
  int block_out = 128, block_in = 128;  // fp8 weight_block_size
  int group_size = 32;                  // int4
  std::vector<std::string> ignore;      // compressed-tensors ignore list ("re:" prefix = regex)
  std::vector<std::regex> ignore_re;    // the "re:" entries, compiled once
  bool ignored(const std::string& module_name) const;
};

struct ModelConfig {
  std::string model_type;  // deepseek_v3 | kimi_k2
  int64_t vocab_size = 0, hidden_size = 0, intermediate_size = 0, moe_intermediate_size = 0;
  int64_t num_hidden_layers = 0, num_attention_heads = 0;
  std::optional<int64_t> q_lora_rank;
  int64_t kv_lora_rank = 0, qk_nope_head_dim = 0, qk_rope_head_dim = 0, v_head_dim = 0;
  int64_t n_routed_experts = 0, n_shared_experts = 0, num_experts_per_tok = 0;
  int64_t n_group = 1, topk_group = 1;
  TopkMethod topk_method = TopkMethod::noaux_tc;
  ScoringFunc scoring_func = ScoringFunc::sigmoid;
  bool norm_topk_prob = true;
  double routed_scaling_factor = 1.0;
  int64_t first_k_dense_replace = 0, moe_layer_freq = 1;
  double rms_norm_eps = 1e-6;
  int64_t max_position_embeddings = 0;
  RopeConfig rope;
  std::optional<int64_t> bos_token_id, pad_token_id;
  std::vector<int64_t> eos_token_ids;
  bool tie_word_embeddings = false;
  QuantConfig quant;
  int64_t num_nextn_predict_layers = 0;  // MTP layers shipped after the last layer (not run)
  std::string source;                    // the file it came from, for messages

  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  bool is_moe_layer(int64_t layer) const {
    return n_routed_experts > 0 && layer >= first_k_dense_replace && layer % moe_layer_freq == 0;
  }
  // Softmax scale: qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (as HF does).
  double attention_scale() const;
  // YaRN inverse frequencies [qk_rope_head_dim / 2] and the cos/sin multiplier.
  std::vector<double> rope_inv_freq() const;
  double rope_attention_factor() const;
  // A stable hash of every field that changes the math (model identity for vectors and captures).
  std::string identity_hash() const;
};

// Parses config.json text; `source` names the file in errors. Unknown or contradictory values throw
// Error(config) naming the field.
ModelConfig parse_config(const std::string& json_text, const std::string& source);
ModelConfig load_config(const std::string& model_dir);

}  // namespace kscope
