// Writes random-weight checkpoints of a chosen shape, format and seed, exactly as HF checkpoints ship
// (config.json in the hub dialect + safetensors shards + index), streaming tensor by tensor.
#pragma once
#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace kscope {

enum class StoredFormat { bf16, fp8, int4 };
StoredFormat parse_stored_format(const std::string& s);

struct MakeModelSpec {
  std::string preset = "tiny";  // tiny | dsv3-tiny | mid | kimi-k2-slice | dsv3-slice
  StoredFormat format = StoredFormat::bf16;
  uint64_t seed = 0;
  int64_t layers = 0;        // override num_hidden_layers (0 = preset's)
  int64_t experts = 0;       // override n_routed_experts
  int64_t vocab = 0;         // override vocab_size
  uint64_t shard_bytes = 2ull << 30;
  // A tokenizer directory (tokenizer.json, or tiktoken.model + tokenizer_config.json) copied into the checkpoint;
  // the vocabulary and bos/eos/pad ids follow it: Kimi layout -> the base ranks + 256 (the tokenizer's last 2
  // special ids have no embedding row, as in Kimi-K2); tokenizer.json -> its size rounded up to 128 (DeepSeek-V3
  // pads 128815 ids to 129280 rows).
  std::string tokenizer_dir;
};

// The hub-dialect config.json of a preset (with overrides applied); throws Error(input) on an unknown preset.
nlohmann::json preset_config(const MakeModelSpec& spec);
const std::vector<std::string>& preset_names();

// The quantization_config a format writes into config.json (null for bf16).
nlohmann::json quantization_config_json(StoredFormat f);
// Whether a tensor is stored quantized in a format: fp8 every decoder-layer projection (the router stays bf16, as
// in DeepSeek-V3); int4 the routed experts only (Kimi-K2-Thinking's ignore list keeps attention, shared experts
// and dense MLPs in bf16).
bool stored_quantized(const std::string& tensor_name, StoredFormat f);

// Converts an unquantized checkpoint to fp8 or int4, tensor by tensor, copying everything else (tokenizer
// files included) and adding the quantization_config.
void quantize_checkpoint(const std::string& in_dir, const std::string& out_dir, StoredFormat f,
                         const std::function<void(uint64_t, uint64_t)>& progress = nullptr);

// progress(done_bytes, total_bytes)
void make_model(const std::string& out_dir, const MakeModelSpec& spec,
                const std::function<void(uint64_t, uint64_t)>& progress = nullptr);

}  // namespace kscope
