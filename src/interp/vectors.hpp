// Vector files: safetensors with one fp32 tensor per site ("20.resid_post" -> [d]) and __metadata__ holding the
// model identity, the site convention, method, trait, normalization, source data hash and the sites' mean norms.
// Loading for a model checks identity and convention and refuses a mismatch. llama.cpp / repeng control-vector
// GGUF files import and export with direction.N <-> N.resid_post (both add direction N to the output of
// block N, which kscope calls N.resid_post; there is no direction for the embedding).
#pragma once
#include <map>
#include <string>
#include <vector>

#include "model/config.hpp"

namespace kscope {

// The site convention every vector file records; a file with another is refused.
extern const char* const kSiteConvention;

struct VectorFile {
  std::map<std::string, std::vector<float>> vectors;  // site -> [width]
  std::map<std::string, std::string> meta;            // model_identity, site_convention, method, trait, ...
  std::map<std::string, double> norms;                // site -> mean ‖h‖ there (for relative coefficients)

  static VectorFile load(const std::string& path);  // .safetensors or control-vector .gguf
  void save(const std::string& path) const;
  // Refuses a file made for another model (identity) or under another site convention, naming the file.
  void check_model(const ModelConfig& cfg, const std::string& path) const;
  const std::vector<float>& at(const std::string& site, const std::string& path) const;
};

void export_control_vector_gguf(const VectorFile& v, const std::string& path, const std::string& model_hint);
// direction.N -> N.resid_post for `cfg`; the result carries cfg's identity (the GGUF carries none).
VectorFile import_control_vector_gguf(const std::string& path, const ModelConfig& cfg);

}  // namespace kscope
