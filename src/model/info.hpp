// What a checkpoint holds and what running it takes: parameters by kind, bytes by format, memory plan.
#pragma once
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>

#include "model/config.hpp"
#include "model/weights.hpp"

namespace kscope {

struct ModelInfo {
  std::map<std::string, int64_t> params_by_kind;   // embedding, attention, dense_mlp, routed_experts, ...
  std::map<std::string, uint64_t> bytes_by_kind;
  std::map<std::string, uint64_t> bytes_by_format; // bf16, f32, f16, fp8-block, int4-group (scales included)
  int64_t total_params = 0;
  uint64_t total_bytes = 0;
  uint64_t kv_bytes_per_token = 0;                 // compressed MLA cache, bf16, all layers
  int64_t active_params_per_token = 0;             // dense + attention + top-k experts + shared
};

ModelInfo model_info(const ModelConfig& cfg, const ModelWeights& w);

struct MemoryPlan {
  int gpus = 1;
  int64_t context = 0, batch = 1;
  uint64_t weights_per_gpu = 0, kv_per_gpu = 0, workspace_per_gpu = 0, total_per_gpu = 0;
};
// Weights split evenly (experts and layers spread over GPUs), KV for batch x context tokens, plus a workspace
// for one step's activations.
MemoryPlan plan_memory(const ModelConfig& cfg, const ModelInfo& info, int gpus, int64_t context, int64_t batch);

nlohmann::json info_json(const ModelConfig& cfg, const ModelInfo& info, const MemoryPlan& plan);
std::string human_bytes(uint64_t b);
std::string human_count(int64_t n);

}  // namespace kscope
