#include "cli.hpp"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "backend/backend.hpp"
#ifdef KSCOPE_HAVE_CUDA
#include "backend/cuda/cuda_backend.hpp"
#endif
#include "model/config.hpp"
#include "store/activation_store.hpp"
#include "util/error.hpp"

namespace kscope::cli {

void Progress::update(double frac, const std::string& extra) {
  if (!on) return;
  const int w = 30, k = static_cast<int>(std::min(1.0, frac) * w);
  const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::cerr << "\r" << label << " [" << std::string(k, '#') << std::string(w - k, '.') << "] "
            << fmt::format("{:5.1f}% {:.0f}s {}", 100 * frac, el, extra) << std::flush;
}
void Progress::done() {
  if (on) std::cerr << "\n";
}

std::string g_device = std::getenv("KSCOPE_DEVICE") ? std::getenv("KSCOPE_DEVICE") : "cpu";

int64_t g_max_pass_tokens = 0;

std::unique_ptr<Model> load_model(const std::string& path) {
  auto model = load_model_on_device(path);
  model->set_max_pass_tokens(g_max_pass_tokens);
  return model;
}

std::unique_ptr<Model> load_model_on_device(const std::string& path) {
  auto backend = make_backend(g_device);
#ifdef KSCOPE_HAVE_CUDA
  if (auto* cb = dynamic_cast<CudaBackend*>(backend.get())) {
    auto bar = std::make_shared<Progress>(Progress{"loading to " + g_device});
    cb->on_load_progress = [bar](uint64_t done, uint64_t total) {
      bar->update(static_cast<double>(done) / std::max<uint64_t>(total, 1), fmt::format("{:.2f} GB", done / 1e9));
    };
    auto model = Model::load(path, backend);
    bar->done();
    cb->on_load_progress = nullptr;
    const CudaPlan& p = cb->plan();
    std::cerr << fmt::format(
        "kscope: {} | weights {:.2f} GB loaded in {:.1f} s ({:.2f} GB/s) | KV cache budget {:.2f} GB = {} tokens "
        "({} B/token) | workspace {:.2f} GB = {} tokens per forward pass\n",
        p.device, p.weight_bytes / 1e9, p.load_seconds, p.load_bytes / 1e9 / std::max(p.load_seconds, 1e-9),
        p.kv_budget_bytes / 1e9, p.kv_capacity_tokens, p.kv_bytes_per_token, p.workspace_bytes / 1e9, p.max_batch_tokens);
    return model;
  }
#endif
  return Model::load(path, backend);
}

std::vector<int32_t> parse_ids(const std::string& s, const std::string& where) {
  std::vector<int32_t> v;
  std::stringstream ss(s);
  std::string tok;
  while (std::getline(ss, tok, ',')) {
    if (tok.empty()) continue;
    try {
      size_t pos = 0;
      const long long x = std::stoll(tok, &pos);
      if (pos != tok.size() || x < 0 || x > INT32_MAX) throw std::invalid_argument("");
      v.push_back(static_cast<int32_t>(x));
    } catch (const std::exception&) {
      fail(ErrorKind::input, where, "'{}' is not a token id (expected comma-separated non-negative integers)", tok);
    }
  }
  if (v.empty()) fail(ErrorKind::input, where, "no token ids");
  return v;
}

json read_json_file(const std::string& path) {
  std::ifstream f(path);
  if (!f) fail(ErrorKind::io, path, "cannot open");
  try {
    return json::parse(f);
  } catch (const json::exception& e) {
    fail(ErrorKind::input, path, "not valid JSON: {}", e.what());
  }
}

std::string read_text_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail(ErrorKind::io, path, "cannot open");
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::string file_hash(const std::string& path) { return fmt::format("{:016x}", fnv1a64_file(path)); }

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::string cur;
  int depth = 0;
  for (char c : s) {
    if (c == '[') ++depth;
    if (c == ']') --depth;
    if (c == ',' && depth == 0) {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

TextIO::TextIO(const std::string& model_dir, int64_t vocab, const std::string& chat_format) : dir(model_dir) {
  if (std::filesystem::exists(model_dir + "/tokenizer.json") || std::filesystem::exists(model_dir + "/tiktoken.model")) {
    tok = Tokenizer::load(model_dir);
    if (vocab > 0) tok->limit_ids(static_cast<int32_t>(vocab));
    chat = chat_format.empty() ? default_chat_format(*tok, model_dir) : parse_chat_format(chat_format);
  }
}

const Tokenizer& TextIO::need(const std::string& what) const {
  if (!tok)
    fail(ErrorKind::input, dir, "{} needs a tokenizer, and this checkpoint has none (give token ids, or make it with make-model --tokenizer)", what);
  return *tok;
}

RenderedChat render_chat_json(const Tokenizer& tok, ChatFormat fmt, const json& j, bool gen_prompt, const std::string& where) {
  ChatOptions o;
  o.add_generation_prompt = gen_prompt;
  json msgs = j;
  if (j.is_object()) {
    if (!j.contains("messages")) fail(ErrorKind::input, where, "expected a list of messages or {{messages, tools}}");
    msgs = j["messages"];
    if (j.contains("tools")) o.tools = j["tools"];
  }
  return render_chat(tok, fmt, parse_messages(msgs), o);
}

json turns_json(const std::vector<Turn>& turns) {
  json t = json::array();
  for (const Turn& x : turns) {
    json o = {{"role", x.role}, {"start", x.start}, {"end", x.end}, {"content_start", x.content_start},
              {"content_end", x.content_end}};
    if (x.think_start >= 0) o["think"] = {x.think_start, x.think_end};
    t.push_back(o);
  }
  return t;
}

namespace {
std::vector<int32_t> ids_of(const json& j, const std::string& where, const TextIO& io, const char* field) {
  if (j.is_string() && std::string(field) != "ids") return io.need(where + ": '" + field + "' text").encode(j.get<std::string>());
  if (!j.is_array()) fail(ErrorKind::input, where, "field '{}' must be text or a list of token ids", field);
  std::vector<int32_t> ids;
  for (auto& x : j) {
    if (!x.is_number_integer() || x.get<int64_t>() < 0 || x.get<int64_t>() > INT32_MAX)
      fail(ErrorKind::input, where, "field '{}' must hold non-negative integers", field);
    ids.push_back(x.get<int32_t>());
  }
  return ids;
}
}  // namespace

std::vector<PromptLine> load_prompts(const TextIO& io, const std::vector<std::string>& texts, const std::string& chat_file,
                                     const std::vector<std::string>& id_lists, const std::string& jsonl) {
  std::vector<PromptLine> out;
  for (auto& s : id_lists) out.push_back({parse_ids(s, "--ids"), {}, {}, json::object(), "--ids"});
  for (auto& t : texts) out.push_back({io.need("--prompt").encode(t), {}, {}, json::object(), "--prompt"});
  if (!chat_file.empty()) {
    const json j = read_json_file(chat_file);
    // one conversation (a list of messages or {messages, tools}) or a list of them
    const bool many = j.is_array() && !j.empty() && (j[0].is_array() || (j[0].is_object() && j[0].contains("messages")));
    for (const json& c : many ? j : json::array({j})) {
      const auto r = render_chat_json(io.need("--chat"), io.chat, c, true, chat_file);
      out.push_back({r.ids, {}, r.turns, json::object(), chat_file});
    }
  }
  if (!jsonl.empty()) {
    std::ifstream f(jsonl);
    if (!f) fail(ErrorKind::io, jsonl, "cannot open");
    std::string text;
    int ln = 0;
    while (std::getline(f, text)) {
      ++ln;
      if (text.find_first_not_of(" \t\r") == std::string::npos) continue;
      const std::string where = fmt::format("{}: line {}", jsonl, ln);
      json j;
      try {
        j = json::parse(text);
      } catch (const json::exception& e) {
        fail(ErrorKind::input, where, "not valid JSON: {}", e.what());
      }
      if (!j.is_object()) fail(ErrorKind::input, where, "expected an object with 'ids', 'text' or 'messages'");
      PromptLine p;
      p.line = j;
      p.where = where;
      if (j.contains("messages")) {
        const auto r = render_chat_json(io.need("a prompt with 'messages'"), io.chat, j, !j.contains("response"), where);
        p.prompt = r.ids;
        p.turns = r.turns;
      } else if (j.contains("text")) {
        p.prompt = ids_of(j["text"], where, io, "text");
      } else if (j.contains("ids")) {
        p.prompt = ids_of(j["ids"], where, io, "ids");
      } else {
        fail(ErrorKind::input, where, "expected an object with 'ids', 'text' or 'messages'");
      }
      if (p.prompt.empty()) fail(ErrorKind::input, where, "the prompt is empty");
      if (j.contains("response")) p.response = ids_of(j["response"], where, io, "response");
      out.push_back(std::move(p));
    }
  }
  return out;
}

std::vector<std::vector<Intervention>> load_interventions(const std::vector<PromptLine>& prompts,
                                                          const std::vector<std::string>& args, const ModelConfig& cfg,
                                                          VectorCache& vc) {
  std::vector<Intervention> common;
  for (const auto& a : args) common.push_back(parse_intervention_arg(a, cfg, vc));
  std::vector<std::vector<Intervention>> out(prompts.size(), common);
  for (size_t i = 0; i < prompts.size(); ++i) {
    const json& l = prompts[i].line;
    if (!l.contains("interventions")) continue;
    if (!l["interventions"].is_array()) fail(ErrorKind::input, prompts[i].where + ": interventions", "expected a list");
    for (size_t k = 0; k < l["interventions"].size(); ++k)
      out[i].push_back(intervention_from_json(l["interventions"][k], cfg, vc,
                                              fmt::format("{}: interventions[{}]", prompts[i].where, k)));
  }
  return out;
}

void load_norms(VectorCache& vc, const std::string& norms_file) {
  if (norms_file.empty()) return;
  const json j = read_json_file(norms_file);
  const json& n = j.contains("mean_norm") ? j["mean_norm"] : j;
  if (!n.is_object()) fail(ErrorKind::input, norms_file, "expected {{\"mean_norm\": {{site: value}}}}");
  for (auto& [k, v] : n.items()) {
    if (!v.is_number()) fail(ErrorKind::input, norms_file, "mean_norm['{}'] must be a number", k);
    vc.norms_override[k] = v.get<double>();
  }
}

}  // namespace kscope::cli
