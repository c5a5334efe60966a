// Interventions from text (CLI) and JSON (prompt files, HTTP), with vector files loaded and checked once.
//
//   FILE@SITE*COEF[:POSITIONS]     add COEF·v (COEF ending in 'n': units of the site's mean norm, COEF·mean/‖v‖·v)
//   FILE@SITE!ablate[:POSITIONS]   remove the component along v
//   FILE@SITE=VALUE[:POSITIONS]    clamp the projection onto v̂ to VALUE
// e.g. traits/french.safetensors@2.resid_post*0.8n:response  or  v.safetensors@10.resid_post!ablate
//
//   {"vector": "FILE" | [floats], "site": "2.resid_post", "op": "add"|"ablate"|"clamp", "coef": 4.0,
//    "relative": false, "mean_norm": 12.5 (optional override), "positions": "response"}
#pragma once
#include <map>
#include <nlohmann/json.hpp>
#include <string>

#include "interp/intervention.hpp"
#include "interp/vectors.hpp"

namespace kscope {

class VectorCache {
 public:
  explicit VectorCache(const ModelConfig& cfg) : cfg_(cfg) {}
  const VectorFile& get(const std::string& path);  // loads once, refuses files for another model
  std::map<std::string, double> norms_override;    // site -> mean norm, from `kscope calibrate` (--norms)

 private:
  const ModelConfig& cfg_;
  std::map<std::string, VectorFile> files_;
};

Intervention parse_intervention_arg(const std::string& arg, const ModelConfig& cfg, VectorCache& vc);
Intervention intervention_from_json(const nlohmann::json& j, const ModelConfig& cfg, VectorCache& vc, const std::string& where);

}  // namespace kscope
