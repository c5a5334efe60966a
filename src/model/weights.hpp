// The model's weights by module, each linear kept in its stored format (no dequantized copy).
#pragma once
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "io/safetensors.hpp"
#include "model/config.hpp"

namespace kscope {

enum class WeightFormat { dense, fp8_block, int4_group };
const char* format_name(WeightFormat f);

// y = x · Wᵀ with W [out, in] as stored:
//   dense      weight F32/F16/BF16 [out, in]
//   fp8_block  weight F8_E4M3 [out, in] + weight_scale_inv F32 [ceil(out/bo), ceil(in/bi)]; w = q · s
//   int4_group weight_packed I32 [out, ceil(in/8)] (8 nibbles q+8, element i in bits 4i)
//              + weight_scale [out, ceil(in/g)] + weight_shape [2]; w = (nibble - 8) · s
struct Linear {
  std::string name;  // module name, e.g. model.layers.3.self_attn.q_a_proj
  int64_t out = 0, in = 0;
  WeightFormat format = WeightFormat::dense;
  const TensorInfo* weight = nullptr;
  const TensorInfo* scale = nullptr;
  int block_out = 0, block_in = 0, group = 0;

  size_t bytes() const { return weight->nbytes + (scale ? scale->nbytes : 0); }
  // Dequantizes one row (length `in`) into fp32: the reference for every kernel.
  void dequant_row(int64_t row, float* dst) const;
};

struct MlpWeights {
  Linear gate, up, down;  // gate/up [I, H], down [H, I]
};

struct MoeWeights {
  Linear router;                     // mlp.gate.weight [E, H], kept as stored (bf16 on the hub)
  std::vector<float> score_bias;     // e_score_correction_bias [E] (empty when absent)
  std::vector<MlpWeights> experts;   // [E]
  std::optional<MlpWeights> shared;  // one MLP of width moe_intermediate_size * n_shared_experts
};

struct AttentionWeights {
  std::optional<Linear> q_proj;               // q_lora_rank null: [heads*qk_head_dim, H]
  std::optional<Linear> q_a_proj, q_b_proj;   // [q_lora, H], [heads*qk_head_dim, q_lora]
  std::vector<float> q_a_norm;                // [q_lora]
  Linear kv_a_proj;                           // kv_a_proj_with_mqa [kv_lora + rope, H]
  std::vector<float> kv_a_norm;               // [kv_lora]
  Linear kv_b_proj;                           // [heads*(nope+v), kv_lora]
  Linear o_proj;                              // [H, heads*v]
};

struct LayerWeights {
  std::vector<float> input_norm, post_attention_norm;  // [H]
  AttentionWeights attn;
  std::optional<MlpWeights> mlp;  // dense layers
  std::optional<MoeWeights> moe;  // MoE layers
};

struct ModelWeights {
  TensorStore store;
  const TensorInfo* embed = nullptr;  // [vocab, H], dense
  Linear lm_head;                     // [vocab, H]; the embedding itself when tied
  std::vector<float> final_norm;      // [H]
  std::vector<LayerWeights> layers;
  std::vector<std::string> ignored;   // tensors present but not run (MTP layers), reported by `info`

  // Validates every tensor against the config: names, dtypes, shapes, quantization. Missing or unexpected
  // tensors, wrong shapes and format/config contradictions throw Error(weights) naming the tensor.
  static ModelWeights load(const ModelConfig& cfg, const std::string& path);
};

// Reads a small float vector (norm weight, bias) of any float dtype, checking its shape.
std::vector<float> load_vector(const TensorStore& st, const std::string& name, int64_t n);

}  // namespace kscope
