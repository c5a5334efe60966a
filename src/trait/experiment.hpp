// What the trait commands share: the experiment directory's stage records, atomic files, resumable JSONL logs,
// layer ranges, prompt rendering for a dataset's style, log-likelihood coherence and small SVG line plots.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "model/model.hpp"
#include "tokenizer/chat.hpp"
#include "tokenizer/tokenizer.hpp"
#include "trait/dataset.hpp"

namespace kscope {

// Writes `text` to path.tmp, fsyncs and renames it over path.
void write_atomic(const std::string& path, const std::string& text);
std::string read_file(const std::string& path);
std::string hash_json(const nlohmann::json& j);  // FNV-1a-64 hex of j's canonical dump

// An append-only JSONL file that survives interruption: opening it reads every complete line and cuts a torn
// last line; append() writes whole lines and flushes them to disk.
class JsonlLog {
 public:
  explicit JsonlLog(std::string path);
  const std::vector<nlohmann::json>& lines() const { return lines_; }
  void append(const nlohmann::json& j);
  void append_all(const std::vector<nlohmann::json>& js);
  void clear();  // truncates
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::vector<nlohmann::json> lines_;
};

// stages.json of a trait's directory: per stage, the hash of its inputs and what it wrote. A stage whose inputs
// hash is recorded (and whose outputs exist) is skipped unless forced.
class StageLog {
 public:
  explicit StageLog(std::string dir);
  bool up_to_date(const std::string& stage, const std::string& inputs) const;
  // The inputs hash recorded for a stage that was started (resumable work in progress), "" when none.
  std::string started(const std::string& stage) const;
  void start(const std::string& stage, const std::string& inputs);
  void finish(const std::string& stage, const std::string& inputs, const nlohmann::json& summary);
  nlohmann::json summary(const std::string& stage) const;

 private:
  void save() const;
  std::string path_;
  nlohmann::json j_;
};

// Layer selections: "all", "30%-60%" (of the layer count, inclusive, rounded to the nearest layer), "10-20",
// "3,5,9", or a mix "2,30%-40%". Returned ascending and unique.
std::vector<int64_t> parse_layers(const std::string& spec, int64_t n_layers);
// Sites: a comma list of named sites, "*.KIND" for every layer, or a layer selection (of `kind` sites).
std::vector<Site> parse_site_list(const std::string& spec, const ModelConfig& cfg, const std::string& kind = "resid_post");

// Prompt ids for one side of a pair / an evaluation question, in the dataset's style (instruct: chat with the
// system prompt, if any, and the question; document: the text itself).
std::vector<int32_t> render_prompt(const Tokenizer& tok, ChatFormat chat, const std::string& style, const std::string& system,
                                   const std::string& text);

// Mean log-probability per token of each response given its prompt under the (unsteered) model, in batches.
std::vector<double> mean_logliks(Model& model, const std::vector<std::vector<int32_t>>& prompts,
                                 const std::vector<std::vector<int32_t>>& responses, int64_t batch);

// A small SVG line chart: series of (x, y) points, optional shaded x-bands with labels, axis titles.
struct PlotSeries {
  std::string name;
  std::vector<double> x, y;
  bool dashed = false;
  bool points = true;
};
struct PlotBand {
  double x0, x1;
  std::string label, color;
};
struct Plot {
  Plot() = default;
  Plot(std::string t, std::string x, std::string y) : title(std::move(t)), xlabel(std::move(x)), ylabel(std::move(y)) {}
  std::string title, xlabel, ylabel;
  std::vector<PlotSeries> series;
  std::vector<PlotBand> bands;
  std::vector<double> hlines;  // dashed horizontal reference lines
  bool log_y = false;
  int width = 560, height = 300;
  std::string svg() const;  // one panel
};
// Several panels side by side in one SVG.
std::string svg_panels(const std::vector<Plot>& panels, const std::string& title);
std::string html_escape(const std::string& s);

// Reads dimensions to exclude: a comma list "12,345" or a massive-activation report's "recommended_exclude".
std::vector<int64_t> parse_exclude_dims(const std::string& spec);

}  // namespace kscope
