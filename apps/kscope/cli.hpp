// Helpers shared by the kscope commands.
#pragma once
#include <unistd.h>

#include <chrono>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "interp/intervention.hpp"
#include "interp/steer_spec.hpp"
#include "model/model.hpp"
#include "runtime/generate.hpp"
#include "tokenizer/chat.hpp"
#include "tokenizer/tokenizer.hpp"

namespace kscope::cli {

using json = nlohmann::json;

// A one-line progress bar on stderr (only when stderr is a terminal, or KSCOPE_PROGRESS=1).
struct Progress {
  std::string label;
  bool on = isatty(2) || std::getenv("KSCOPE_PROGRESS");
  std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
  void update(double frac, const std::string& extra = "");
  void done();
};

// --device (global): cpu | cpu-staged | cuda | cuda:N; default from KSCOPE_DEVICE, else cpu.
extern std::string g_device;
// --max-pass-tokens (global): most new tokens one forward pass carries (0: the device's memory plan decides).
extern int64_t g_max_pass_tokens;
// Loads a checkpoint onto --device; on a GPU with a progress bar for the upload and the memory plan on stderr.
std::unique_ptr<Model> load_model(const std::string& path);
std::unique_ptr<Model> load_model_on_device(const std::string& path);

std::vector<int32_t> parse_ids(const std::string& s, const std::string& where);
json read_json_file(const std::string& path);
std::string read_text_file(const std::string& path);
// FNV-1a-64 of a file's bytes, hex
std::string file_hash(const std::string& path);
std::vector<std::string> split_list(const std::string& s);  // "a,b" -> {a, b}; commas inside [] are kept

// A checkpoint's tokenizer (when it has one), limited to the model's vocabulary, and its chat format.
struct TextIO {
  std::unique_ptr<Tokenizer> tok;
  ChatFormat chat = ChatFormat::kimi_k2;
  std::string dir;
  TextIO(const std::string& model_dir, int64_t vocab, const std::string& chat_format);
  const Tokenizer& need(const std::string& what) const;
};

RenderedChat render_chat_json(const Tokenizer& tok, ChatFormat fmt, const json& j, bool gen_prompt, const std::string& where);
json turns_json(const std::vector<Turn>& turns);

// One prompt: ids, chat turns, an optional given response (for replay), and its JSONL line (per-prompt settings).
struct PromptLine {
  std::vector<int32_t> prompt, response;
  std::vector<Turn> turns;
  json line = json::object();
  std::string where;
};
// --prompt TEXT, --chat FILE, --ids LIST and --prompts FILE.jsonl (lines {ids|text|messages, response?, ...}).
std::vector<PromptLine> load_prompts(const TextIO& io, const std::vector<std::string>& texts, const std::string& chat_file,
                                     const std::vector<std::string>& id_lists, const std::string& jsonl);

// Per-prompt interventions: the --steer/--ablate/--clamp arguments for every prompt, plus each JSONL line's
// "interventions" list.
std::vector<std::vector<Intervention>> load_interventions(const std::vector<PromptLine>& prompts,
                                                          const std::vector<std::string>& args, const ModelConfig& cfg,
                                                          VectorCache& vc);
void load_norms(VectorCache& vc, const std::string& norms_file);

}  // namespace kscope::cli
