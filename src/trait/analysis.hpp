// Reading trait vectors against the model: per-token projections of rollouts (streamed through the model or
// read from an activation store), massive-activation calibration, and the logit lens of a vector.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "interp/vectors.hpp"
#include "model/model.hpp"
#include "store/activation_store.hpp"
#include "tokenizer/chat.hpp"
#include "trait/pipeline.hpp"

namespace kscope {

// One direction to project onto: a site of a vector file, unit-normalized, with the numbers that turn a raw
// projection into the centred and normalized ones.
struct ProjectionTarget {
  std::string name;        // "anxiety@20.resid_post"
  std::string site;
  std::vector<float> unit;  // v / ‖v‖ (excluded dimensions zeroed first)
  double midpoint = 0;     // projection of the pos/neg class-mean midpoint (0 when the file has none)
  double mean_norm = 0;    // the site's mean ‖h‖ (0 when unknown)
  std::vector<int64_t> exclude;
};
// Targets for `sites` of a vector file ("best" = the file's best site, "all" = every site); dimensions the file
// was extracted without, plus `extra_exclude`, are zeroed in both the vector and the activations.
std::vector<ProjectionTarget> projection_targets(const VectorFile& vf, const std::string& path, const std::string& sites,
                                                 const std::vector<int64_t>& extra_exclude);

// Per-token projections of h onto a target: raw h·v̂, centred (raw - midpoint), normalized (raw / mean norm),
// cosine (raw / ‖h‖).
struct Projection {
  double raw, centred, normalized, cosine;
};
Projection project_row(const ProjectionTarget& t, const float* h, int64_t width);

struct Rollout {
  std::string id;
  std::vector<int32_t> ids;
  std::vector<Turn> turns;  // from the chat renderer (roles, content and thinking spans)
  int64_t prompt_len = -1;  // store rollouts: where the prompt ends (-1: unknown)
};
// JSONL rollouts: {"id"?, "messages": [...], "tools"?} (OpenAI messages with reasoning_content, tool_calls, tool
// turns) or {"id"?, "text": "..."}; errors name the line.
std::vector<Rollout> load_rollouts(const std::string& path, const Tokenizer& tok, ChatFormat chat);

struct ProjectOptions {
  std::string out;
  int64_t batch = 4;  // rollouts per forward pass
};
// Streams rollouts through the model (no activation store needed) and writes, per rollout, a trace JSON and an
// SVG plot marking turns, plus summary.jsonl (per turn means). Returns the summary.
nlohmann::json project_rollouts(Model& model, const Tokenizer& tok, const std::vector<ProjectionTarget>& targets,
                                const std::vector<Rollout>& rollouts, const ProjectOptions& o, const PipelineIO& io);
// The same from an activation store captured with reduction none (its sites must include the targets').
nlohmann::json project_store(const ActivationStore& store, const Tokenizer* tok, const std::vector<ProjectionTarget>& targets,
                             const ProjectOptions& o, const PipelineIO& io);

struct MassiveOptions {
  double ratio = 100;        // a dimension is massive at a layer when max |h_d| >= ratio x the layer's typical magnitude
  double persistent = 0.5;   // recommended for exclusion when massive in at least this fraction of layers
  int64_t top = 8;           // dimensions reported per layer
  int64_t batch = 8;
};
// Runs the prompts through the model, reading every layer's resid_post (streamed, nothing stored). Per layer and
// dimension: max |h| over tokens and the position it came from; the layer's typical magnitude is the median
// over dimensions of mean |h|. Writes massive.json and massive.svg to out (when not empty).
nlohmann::json massive_activations(Model& model, const std::vector<std::vector<int32_t>>& prompts, const MassiveOptions& o,
                                   const std::string& out, const PipelineIO& io);

// Logit lens of a vector: logits = W_U (final-norm weight ⊙ v); the top and bottom k tokens.
nlohmann::json vector_lens(const Model& model, const Tokenizer* tok, const std::vector<float>& v, int64_t k);

}  // namespace kscope
