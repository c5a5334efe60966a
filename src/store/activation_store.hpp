// The activation store: a directory of safetensors shards and a manifest.json.
//
//   DIR/manifest.json         model identity, capture settings, d_model, dtype, the shard list (sequences,
//                             rows, FNV-1a-64 checksum of the file) and, per sequence, its tokens, prompt
//                             length, shard, first row and captured positions
//   DIR/shard-00000.safetensors
//       "<site>"              [rows, d_model] (F32 or BF16), one row per captured position (mean: per sequence)
//       "<L>.router.ids"      [rows, k] I32   chosen experts, ascending id
//       "<L>.router.weights"  [rows, k] F32   their routing weights
//       "seq", "pos"          [rows] I32      sequence index and position of each row (pos -1 for means)
//
// A shard holds whole sequences (a fixed number per shard), is written to a .tmp name and renamed when
// complete, then the manifest is rewritten the same way. An interrupted capture resumes after the last shard in
// the manifest and writes byte-identical shards. numpy: `safetensors.numpy.load_file(shard)`, or read the
// 8-byte header length, the JSON header and np.frombuffer the data (docs/activations.md).
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "interp/capture.hpp"
#include "io/safetensors.hpp"

namespace kscope {

struct StoreConfig {
  std::string model_identity, model_type, model_path;
  std::vector<std::string> sites;
  std::string positions = "all", reduction = "none", dtype = "float32";  // float32 | bfloat16
  int64_t d_model = 0;
  int64_t shard_sequences = 256;
  std::string source;       // what the sequences came from (prompts file)
  std::string source_hash;  // its FNV-1a-64, so a resume over different input is refused
  nlohmann::json extra;     // generation settings etc., part of the identity of the capture
  nlohmann::json to_json() const;
};

class StoreWriter {
 public:
  // Opens DIR for writing. An existing manifest with the same settings resumes after its last shard; different
  // settings are refused (naming the field) unless `overwrite`.
  StoreWriter(std::string dir, StoreConfig cfg, bool overwrite = false);
  int64_t next_sequence() const { return next_seq_; }  // the first sequence not yet in a completed shard
  bool complete() const { return manifest_.value("complete", false); }
  // Adds sequence `index` (must be next_sequence() + buffered); writes a shard every shard_sequences.
  void add(int64_t index, const CapturedSeq& c);
  void finish();  // writes the last partial shard and marks the store complete
  const nlohmann::json& manifest() const { return manifest_; }

 private:
  void write_shard();
  void write_manifest();
  std::string dir_;
  StoreConfig cfg_;
  nlohmann::json manifest_;
  std::vector<std::pair<int64_t, CapturedSeq>> pending_;
  int64_t next_seq_ = 0;
};

class ActivationStore {
 public:
  static ActivationStore open(const std::string& dir);  // validates the manifest and every shard's checksum
  const nlohmann::json& manifest() const { return manifest_; }
  int64_t n_sequences() const;
  int64_t n_shards() const;
  // Rows of `site` in shard s, as fp32 [rows, width]; width returned through *width.
  std::vector<float> read(const std::string& site, int64_t shard, int64_t* width = nullptr) const;
  // Router expert ids ("<L>.router.ids") of one sequence, [n, k].
  std::vector<int32_t> sequence_ids(const std::string& router_site, int64_t seq) const;
  // Rows of `site` for one sequence, fp32 [n, width].
  std::vector<float> sequence_rows(const std::string& site, int64_t seq, int64_t* width = nullptr) const;

 private:
  std::string dir_;
  nlohmann::json manifest_;
};

// Captures reqs[writer.next_sequence() ..] into the store in compute batches of `batch` sequences, then
// finishes it. progress(done, total) after each batch; an exception from it stops the job as a crash would.
void capture_to_store(Model& model, const std::vector<CaptureRequest>& reqs, const CaptureSpec& spec, StoreWriter& writer,
                      int64_t batch, const std::function<void(int64_t, int64_t)>& progress = nullptr);

uint64_t fnv1a64_file(const std::string& path);
uint64_t fnv1a64(const void* data, size_t n, uint64_t h = 1469598103934665603ull);

}  // namespace kscope
