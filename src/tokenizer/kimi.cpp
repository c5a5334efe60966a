#include "tokenizer/kimi.hpp"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "tokenizer/tokenizer.hpp"
#include "util/error.hpp"

namespace kscope {

const std::map<int, std::string>& kimi_special_names() {
  static const std::map<int, std::string> m = {
      {0, "[BOS]"}, {1, "[EOS]"}, {2, "<|im_end|>"}, {3, "<|im_user|>"}, {4, "<|im_assistant|>"},
      {6, "<|start_header_id|>"}, {7, "<|end_header_id|>"}, {9, "[EOT]"}, {10, "<|im_system|>"},
      {11, "<|tool_calls_section_begin|>"}, {12, "<|tool_calls_section_end|>"}, {13, "<|tool_call_begin|>"},
      {14, "<|tool_call_argument_begin|>"}, {15, "<|tool_call_end|>"}, {17, "<|im_middle|>"}, {22, "<think>"},
      {23, "</think>"}, {254, "[UNK]"}, {255, "[PAD]"}};
  return m;
}

int write_kimi_tokenizer(const std::string& out_dir, const std::string& ranks_path) {
  namespace fs = std::filesystem;
  auto t = Tokenizer::from_tiktoken(ranks_path, PreTokenizer::kimi, {});
  const int base = t->size();
  fs::create_directories(out_dir);
  {
    static const char* b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    std::ofstream f(out_dir + "/tiktoken.model.tmp", std::ios::binary);
    for (int id = 0; id < base; ++id) {
      const std::string& b = t->token_bytes(id);
      std::string e;
      size_t i = 0;
      for (; i + 2 < b.size(); i += 3) {
        const uint32_t v = (uint8_t(b[i]) << 16) | (uint8_t(b[i + 1]) << 8) | uint8_t(b[i + 2]);
        e += {b64[v >> 18], b64[(v >> 12) & 63], b64[(v >> 6) & 63], b64[v & 63]};
      }
      if (b.size() - i == 1) {
        const uint32_t v = uint8_t(b[i]) << 16;
        e += {b64[v >> 18], b64[(v >> 12) & 63], '=', '='};
      } else if (b.size() - i == 2) {
        const uint32_t v = (uint8_t(b[i]) << 16) | (uint8_t(b[i + 1]) << 8);
        e += {b64[v >> 18], b64[(v >> 12) & 63], b64[(v >> 6) & 63], '='};
      }
      f << e << ' ' << id << '\n';
    }
    if (!f) fail(ErrorKind::io, out_dir + "/tiktoken.model", "write failed");
  }
  fs::rename(out_dir + "/tiktoken.model.tmp", out_dir + "/tiktoken.model");
  nlohmann::json dec = nlohmann::json::object();
  for (auto& [off, name] : kimi_special_names())
    dec[std::to_string(base + off)] = {{"content", name}, {"lstrip", false}, {"normalized", false}, {"rstrip", false},
                                       {"single_word", false}, {"special", true}};
  nlohmann::json cfg = {{"added_tokens_decoder", dec},
                        {"bos_token", "[BOS]"},
                        {"eos_token", "[EOS]"},
                        {"pad_token", "[PAD]"},
                        {"unk_token", "[UNK]"},
                        {"tokenizer_class", "TikTokenTokenizer"},
                        {"kscope_chat_format", "kimi-k2"},
                        {"model_max_length", 131072}};
  std::ofstream f(out_dir + "/tokenizer_config.json");
  f << cfg.dump(2) << "\n";
  return base;
}

}  // namespace kscope
