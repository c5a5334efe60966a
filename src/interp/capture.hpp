// Capture: any set of sites x positions, reduction none or mean, during generation or over given text
// (teacher forcing / replay of a stored rollout). Interventions can run in the same pass.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "interp/intervention.hpp"
#include "interp/positions.hpp"
#include "model/model.hpp"
#include "runtime/generate.hpp"

namespace kscope {

enum class Reduction { none, mean };
Reduction parse_reduction(const std::string& s);

struct CaptureSpec {
  std::vector<Site> sites;
  PositionSpec positions;
  Reduction reduction = Reduction::none;
};

// What one sequence gave: the selected positions and, per site, their rows (mean: one row).
struct CapturedSeq {
  std::vector<int64_t> positions;
  std::map<std::string, std::vector<float>> rows;    // site -> [n, width]
  std::map<std::string, int64_t> width;
  std::map<std::string, std::vector<int32_t>> router_ids;  // "L.router" -> [n, k] chosen experts
  std::map<std::string, std::vector<float>> router_weights;  // "L.router" -> [n, k]
  std::vector<int32_t> tokens;  // the whole sequence (prompt + response)
  int64_t prompt_len = 0;
  FinishReason finish = FinishReason::length;
};

// Keeps every row of the wanted sites (selection and reduction happen in finish()). On a device its rows are
// filed on the model's delivery thread while the next step runs (async_reads): finish() waits for them.
class CaptureHook : public Hook {
 public:
  CaptureHook(CaptureSpec spec, int64_t n_seqs);
  ~CaptureHook() override;
  bool wants(const Site& s) const override;
  bool writes(const Site&) const override { return false; }
  bool async_reads() const override { return true; }
  bool concurrent_reads() const override { return true; }
  void on(const Site& s, int64_t seq, float* data, int64_t n_rows, int64_t width, int64_t pos0) override;
  void on_router(int64_t layer, int64_t seq, const float* logits, int32_t* idx, float* weight, int64_t n,
                 int64_t e, int64_t k, int64_t pos0) override;
  // Selects and reduces sequence seq's rows for its final layout.
  CapturedSeq finish(int64_t seq, const SeqLayout& layout) const;
  // Activation bytes filed so far and the thread-seconds on() spent filing them (allocation and copy, summed over
  // the threads that filed; on a device that is the delivery threads' work per pass, which must stay under a
  // decode step's time to stay hidden: Model::delivery_stats() has its wall time and what the caller waited).
  struct FilingStats {
    double bytes = 0, seconds = 0;
  };
  FilingStats filing() const;

 private:
  // A site's rows of one sequence. Activation rows go into fixed blocks of whole rows (about 64 KB, so they come
  // from the heap and are never moved or copied as the capture grows: growing one vector per sequence and site
  // meant reallocation copies and fresh pages on every doubling); router rows (k values) into vectors.
  struct Rows {
    std::mutex mu;  // on() for one (sequence, site) at a time; different ones file in parallel
    std::vector<int64_t> pos;
    std::vector<std::unique_ptr<float[]>> blocks;
    int64_t block_rows = 0;
    std::vector<float> data;  // router weights
    std::vector<int32_t> ids;
    int64_t width = 0, k = 0;
    const float* row(int64_t i) const { return blocks[i / block_rows].get() + (i % block_rows) * width; }
  };
  CaptureSpec spec_;
  mutable std::mutex mu_;  // seqs_'s maps, filing_: rows come from the delivery threads, router rows from the pass
  std::vector<std::map<std::string, Rows>> seqs_;
  FilingStats filing_;
};

struct CaptureRequest {
  std::vector<int32_t> prompt;
  std::vector<int32_t> response;  // replay: given response tokens (teacher forcing); empty with generate
  std::vector<Turn> turns;        // chat turn boundaries, when the prompt is a chat
  bool generate = false;          // generate the response (with `sampling`, `max_new_tokens`, stops)
  GenerateRequest gen;
  std::vector<Intervention> interventions;
};

// Runs the requests as one ragged batch and returns each sequence's capture. A generated sequence's last kept
// token is fed once more so every kept token has states.
std::vector<CapturedSeq> run_capture(Model& model, const std::vector<CaptureRequest>& reqs, const CaptureSpec& spec);

}  // namespace kscope
