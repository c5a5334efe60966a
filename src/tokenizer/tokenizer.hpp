// Tokenizers as the models ship them: tiktoken-style BPE (Kimi-K2's tiktoken.model + tokenizer_config.json)
// and HF tokenizer.json byte-level BPE (DeepSeek-V3). Encode, decode, and stream-decode token by token.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "tokenizer/pretokenize.hpp"

namespace kscope {

struct SpecialToken {
  std::string text;
  int32_t id;
  bool special;  // HF "special" flag (non-special added tokens exist, e.g. DeepSeek's <｜User｜>)
};

class Tokenizer {
 public:
  enum class Kind { tiktoken, hf_bpe };

  // A checkpoint or tokenizer directory: tokenizer.json (HF) or tiktoken.model + tokenizer_config.json (Kimi).
  static std::unique_ptr<Tokenizer> load(const std::string& dir);
  // A tiktoken ranks file (base64 token, space, rank per line) with a pre-tokenizer and special tokens.
  static std::unique_ptr<Tokenizer> from_tiktoken(const std::string& ranks_path, PreTokenizer pre,
                                                  std::vector<SpecialToken> specials);
  static std::unique_ptr<Tokenizer> from_hf_json(const std::string& tokenizer_json_path);

  // parse_special: text spelling an added/special token becomes that token; otherwise all text is ordinary
  // (so user content can never inject control tokens). Invalid UTF-8 is an error naming the byte offset.
  std::vector<int32_t> encode(std::string_view text, bool parse_special = false) const;
  // Concatenated bytes of the tokens (may end inside a UTF-8 character; see StreamDecoder). Ids outside the
  // tokenizer, or at or past the model limit, are an error naming the id.
  std::string decode_bytes(const std::vector<int32_t>& ids) const;
  // decode_bytes with invalid UTF-8 replaced by U+FFFD (what tiktoken and HF return).
  std::string decode(const std::vector<int32_t>& ids) const;
  const std::string& token_bytes(int32_t id) const;
  // Display form of a token: its text, with bytes that are not valid UTF-8 shown as \xNN.
  std::string token_display(int32_t id) const;

  std::optional<int32_t> token_id(std::string_view special_text) const;
  const std::vector<SpecialToken>& specials() const { return specials_; }
  bool is_special(int32_t id) const;
  int32_t size() const { return static_cast<int32_t>(bytes_.size()); }  // ids are [0, size)
  Kind kind() const { return kind_; }
  PreTokenizer pre() const { return pre_; }
  // Ids at or past `n` (tokenizer ids the embedding table lacks, e.g. Kimi's 163840, 163841) are never
  // produced by encode and refused by decode.
  void limit_ids(int32_t n);
  int32_t id_limit() const { return limit_; }

  // The pieces the pre-tokenizer cuts text into (for tests and for `kscope tokenize --pieces`).
  std::vector<std::string> pretokenize_text(std::string_view text) const;

 private:
  Tokenizer() = default;
  void finish_specials();
  void encode_ordinary(std::string_view text, std::vector<int32_t>& out) const;
  void bpe(std::string_view piece, std::vector<int32_t>& out) const;

  Kind kind_ = Kind::tiktoken;
  PreTokenizer pre_ = PreTokenizer::o200k;
  std::vector<std::string> bytes_;                    // id -> bytes
  std::unordered_map<std::string, int32_t> ranks_;    // bytes -> id (the BPE vocabulary, specials excluded)
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges_;  // HF: (left, right) -> (rank, merged id)
  std::vector<int32_t> byte_id_;                      // HF: id of each single byte
  std::vector<SpecialToken> specials_;
  std::unordered_map<std::string, int32_t> special_ids_;
  std::vector<char> is_special_;
  int32_t limit_ = INT32_MAX;
  size_t max_special_len_ = 0;
  std::vector<char> special_first_;  // [256] bytes that can start a special token
};

// Turns a stream of token ids into text without ever splitting a UTF-8 character: push() returns the text
// that became complete; finish() returns what is left (invalid bytes as U+FFFD).
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& t) : tok_(t) {}
  std::string push(int32_t id);
  std::string finish();

 private:
  const Tokenizer& tok_;
  std::string pending_;
};

// The GPT-2 byte <-> unicode map that byte-level BPE vocabularies are written in.
const std::vector<char32_t>& byte_to_unicode();

}  // namespace kscope
