#include "tokenizer/tokenizer.hpp"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "tokenizer/unicode.hpp"
#include "util/error.hpp"

namespace kscope {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

std::string read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail(ErrorKind::io, path, "cannot open");
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

int b64val(char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  return -1;
}

bool base64_decode(std::string_view s, std::string& out) {
  out.clear();
  uint32_t acc = 0;
  int bits = 0;
  for (char c : s) {
    if (c == '=') break;
    const int v = b64val(c);
    if (v < 0) return false;
    acc = (acc << 6) | v;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<char>((acc >> bits) & 0xFF));
    }
  }
  return true;
}

// The DeepSeek-V3 pre-tokenizer sequence, as its tokenizer.json spells it.
const char* kDeepseekSplits[] = {
    "\\p{N}{1,3}",
    "[\xe4\xb8\x80-\xe9\xbe\xa5\xe3\x81\x80-\xe3\x82\x9f\xe3\x82\xa0-\xe3\x83\xbf]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
};

}  // namespace

const std::vector<char32_t>& byte_to_unicode() {
  static const std::vector<char32_t> m = [] {
    std::vector<char32_t> v(256);
    std::vector<bool> direct(256, false);
    for (int b = '!'; b <= '~'; ++b) direct[b] = true;
    for (int b = 0xA1; b <= 0xAC; ++b) direct[b] = true;
    for (int b = 0xAE; b <= 0xFF; ++b) direct[b] = true;
    int n = 0;
    for (int b = 0; b < 256; ++b) v[b] = direct[b] ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + n++);
    return v;
  }();
  return m;
}

std::unique_ptr<Tokenizer> Tokenizer::from_tiktoken(const std::string& path, PreTokenizer pre,
                                                    std::vector<SpecialToken> specials) {
  std::unique_ptr<Tokenizer> t(new Tokenizer);
  t->kind_ = Kind::tiktoken;
  t->pre_ = pre;
  std::string text = read_all(path);
  if (!text.empty() && text[0] == '{') {
    // tiktoken's npm encoder JSON: bpe_ranks lines "<first> <offset> b64 b64 ..." hold ranks offset, offset+1, ...
    json j;
    try {
      j = json::parse(text);
    } catch (const json::exception& e) {
      fail(ErrorKind::format, path, "not valid JSON: {}", e.what());
    }
    if (!j.contains("bpe_ranks") || !j["bpe_ranks"].is_string())
      fail(ErrorKind::format, path, "expected tiktoken's encoder JSON with a 'bpe_ranks' string");
    std::string conv;
    std::istringstream rl(j["bpe_ranks"].get<std::string>());
    std::string l;
    while (std::getline(rl, l)) {
      std::istringstream ws(l);
      std::string first, off, b64;
      if (!(ws >> first >> off)) continue;
      long r = std::stol(off);
      while (ws >> b64) conv += b64 + " " + std::to_string(r++) + "\n";
    }
    text = std::move(conv);
  }
  std::istringstream in(text);
  std::string line, tok;
  int ln = 0;
  while (std::getline(in, line)) {
    ++ln;
    if (line.empty()) continue;
    const auto sp = line.find(' ');
    if (sp == std::string::npos) fail(ErrorKind::format, path, "line {}: expected 'base64 rank'", ln);
    if (!base64_decode(std::string_view(line).substr(0, sp), tok) || tok.empty())
      fail(ErrorKind::format, path, "line {}: token is not base64", ln);
    long rank;
    try {
      size_t used;
      rank = std::stol(line.substr(sp + 1), &used);
      if (used != line.size() - sp - 1 || rank < 0) throw std::invalid_argument("");
    } catch (const std::exception&) {
      fail(ErrorKind::format, path, "line {}: rank is not a non-negative integer", ln);
    }
    if (rank >= static_cast<long>(t->bytes_.size())) t->bytes_.resize(rank + 1);
    if (!t->bytes_[rank].empty()) fail(ErrorKind::format, path, "line {}: rank {} appears twice", ln, rank);
    t->bytes_[rank] = tok;
    if (!t->ranks_.emplace(tok, static_cast<int32_t>(rank)).second)
      fail(ErrorKind::format, path, "line {}: token appears twice", ln);
  }
  for (size_t i = 0; i < t->bytes_.size(); ++i)
    if (t->bytes_[i].empty()) fail(ErrorKind::format, path, "rank {} is missing (ranks must be 0..n-1)", i);
  for (int b = 0; b < 256; ++b)
    if (!t->ranks_.count(std::string(1, static_cast<char>(b))))
      fail(ErrorKind::format, path, "single byte 0x{:02x} has no rank: some text could not be encoded", b);
  t->specials_ = std::move(specials);
  t->finish_specials();
  return t;
}

std::unique_ptr<Tokenizer> Tokenizer::from_hf_json(const std::string& path) {
  std::unique_ptr<Tokenizer> t(new Tokenizer);
  t->kind_ = Kind::hf_bpe;
  json j;
  try {
    j = json::parse(read_all(path));
  } catch (const json::exception& e) {
    fail(ErrorKind::format, path, "not valid JSON: {}", e.what());
  }
  auto bad = [&](const std::string& field, const std::string& what) { fail(ErrorKind::format, path, "field '{}': {}", field, what); };
  if (!j.contains("model") || !j["model"].is_object()) bad("model", "missing");
  const json& m = j["model"];
  if (m.value("type", "") != "BPE") bad("model.type", "expected BPE");
  if (m.value("byte_fallback", false)) bad("model.byte_fallback", "byte fallback is not supported");
  if (m.contains("continuing_subword_prefix") && !m["continuing_subword_prefix"].is_null() && m["continuing_subword_prefix"] != "")
    bad("model.continuing_subword_prefix", "not supported");
  if (m.value("ignore_merges", false)) bad("model.ignore_merges", "not supported");
  if (j.contains("normalizer") && !j["normalizer"].is_null()) {
    const json& nz = j["normalizer"];
    if (!(nz.value("type", "") == "Sequence" && nz.contains("normalizers") && nz["normalizers"].empty()))
      bad("normalizer", "only an empty normalizer is supported, got " + nz.dump().substr(0, 80));
  }
  // pre-tokenizer: DeepSeek-V3's Sequence of three Isolated splits and a regex-free ByteLevel
  const json& pt = j.value("pre_tokenizer", json());
  bool ok = pt.is_object() && pt.value("type", "") == "Sequence" && pt.contains("pretokenizers") && pt["pretokenizers"].size() == 4;
  if (ok) {
    for (int i = 0; i < 3; ++i) {
      const json& s = pt["pretokenizers"][i];
      ok &= s.value("type", "") == "Split" && s.value("behavior", "") == "Isolated" && !s.value("invert", false) &&
            s.contains("pattern") && s["pattern"].value("Regex", "") == kDeepseekSplits[i];
    }
    const json& bl = pt["pretokenizers"][3];
    ok &= bl.value("type", "") == "ByteLevel" && !bl.value("use_regex", true) && !bl.value("add_prefix_space", true);
  }
  if (!ok) bad("pre_tokenizer", "unsupported: kscope implements DeepSeek-V3's sequence (Split \\p{N}{1,3}, Split CJK, Split main regex, ByteLevel without regex)");
  t->pre_ = PreTokenizer::deepseek_v3;

  const auto& b2u = byte_to_unicode();
  std::unordered_map<char32_t, int> u2b;
  for (int b = 0; b < 256; ++b) u2b[b2u[b]] = b;
  // Byte-level text -> bytes; a string with a character outside the map decodes to its own UTF-8 (HF's rule).
  auto to_bytes = [&](const std::string& s, bool& all_mapped) {
    std::vector<char32_t> cps;
    std::vector<uint32_t> off;
    uni::decode_utf8(s, cps, off);
    std::string out;
    all_mapped = true;
    for (char32_t c : cps) {
      auto it = u2b.find(c);
      if (it == u2b.end()) {
        all_mapped = false;
        return s;
      }
      out.push_back(static_cast<char>(it->second));
    }
    return out;
  };
  if (!m.contains("vocab") || !m["vocab"].is_object()) bad("model.vocab", "missing");
  for (auto it = m["vocab"].begin(); it != m["vocab"].end(); ++it) {
    if (!it->is_number_integer() || it->get<int64_t>() < 0) bad("model.vocab", "ids must be non-negative integers");
    const int32_t id = it->get<int32_t>();
    bool mapped;
    std::string b = to_bytes(it.key(), mapped);
    if (id >= static_cast<int32_t>(t->bytes_.size())) t->bytes_.resize(id + 1);
    t->bytes_[id] = b;
    // a token outside the byte-level alphabet (a special token's text) decodes to its own UTF-8 and is not
    // reachable by merges
    if (mapped) t->ranks_[b] = id;
  }
  t->byte_id_.assign(256, -1);
  for (int b = 0; b < 256; ++b) {
    auto it = t->ranks_.find(std::string(1, static_cast<char>(b)));
    if (it == t->ranks_.end()) bad("model.vocab", fmt::format("byte 0x{:02x} has no token", b));
    t->byte_id_[b] = it->second;
  }
  if (!m.contains("merges") || !m["merges"].is_array()) bad("model.merges", "missing");
  int32_t rank = 0;
  for (const json& mg : m["merges"]) {
    std::string a, b;
    if (mg.is_string()) {
      const std::string s = mg.get<std::string>();
      const auto sp = s.find(' ');
      if (sp == std::string::npos) bad("model.merges", "'" + s + "' is not 'left right'");
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (mg.is_array() && mg.size() == 2 && mg[0].is_string() && mg[1].is_string()) {
      a = mg[0].get<std::string>();
      b = mg[1].get<std::string>();
    } else {
      bad("model.merges", "entries must be 'left right' strings or [left, right] pairs");
    }
    const auto ia = m["vocab"].find(a), ib = m["vocab"].find(b), ic = m["vocab"].find(a + b);
    if (ia == m["vocab"].end() || ib == m["vocab"].end() || ic == m["vocab"].end())
      bad("model.merges", "merge '" + a + " " + b + "' uses a token missing from the vocab");
    const uint64_t key = (static_cast<uint64_t>(ia->get<uint32_t>()) << 32) | ib->get<uint32_t>();
    t->merges_.emplace(key, std::make_pair(rank++, ic->get<int32_t>()));
  }
  if (j.contains("added_tokens")) {
    for (const json& a : j["added_tokens"]) {
      if (!a.is_object() || !a.contains("id") || !a.contains("content")) bad("added_tokens", "entries need id and content");
      if (a.value("lstrip", false) || a.value("rstrip", false) || a.value("single_word", false))
        bad("added_tokens", "lstrip/rstrip/single_word are not supported ('" + a["content"].get<std::string>() + "')");
      SpecialToken s{a["content"].get<std::string>(), a["id"].get<int32_t>(), a.value("special", false)};
      if (s.id >= static_cast<int32_t>(t->bytes_.size())) t->bytes_.resize(s.id + 1);
      bool mapped;
      const std::string b = to_bytes(s.text, mapped);
      t->bytes_[s.id] = b;
      t->specials_.push_back(std::move(s));
    }
  }
  t->finish_specials();
  return t;
}

std::unique_ptr<Tokenizer> Tokenizer::load(const std::string& dir) {
  const fs::path d(dir);
  if (fs::exists(d / "tokenizer.json")) return from_hf_json((d / "tokenizer.json").string());
  if (fs::exists(d / "tiktoken.model")) {
    // Kimi-K2: special tokens are the 256 + 2 ids after the base vocabulary, named by tokenizer_config.json's
    // added_tokens_decoder, the rest <|reserved_token_{id}|>.
    std::vector<SpecialToken> specials;
    std::map<int32_t, std::string> names;
    const fs::path cfgp = d / "tokenizer_config.json";
    if (fs::exists(cfgp)) {
      json c;
      try {
        c = json::parse(read_all(cfgp.string()));
      } catch (const json::exception& e) {
        fail(ErrorKind::format, cfgp.string(), "not valid JSON: {}", e.what());
      }
      if (c.contains("added_tokens_decoder")) {
        for (auto it = c["added_tokens_decoder"].begin(); it != c["added_tokens_decoder"].end(); ++it) {
          if (!it->is_object() || !it->contains("content") || !(*it)["content"].is_string())
            fail(ErrorKind::format, cfgp.string(), "added_tokens_decoder['{}'] needs a string 'content'", it.key());
          names[std::stoi(it.key())] = (*it)["content"].get<std::string>();
        }
      }
    }
    auto t = from_tiktoken((d / "tiktoken.model").string(), PreTokenizer::kimi, {});
    const int32_t base = t->size();
    for (int32_t id = base; id < base + 256 + 2; ++id) {
      auto it = names.find(id);
      specials.push_back({it != names.end() ? it->second : fmt::format("<|reserved_token_{}|>", id), id, true});
    }
    for (auto& [id, n] : names)
      if (id < base || id >= base + 258)
        fail(ErrorKind::format, cfgp.string(), "added token {} ('{}') is outside the special range [{}, {})", id, n, base, base + 258);
    t->specials_ = std::move(specials);
    t->finish_specials();
    return t;
  }
  fail(ErrorKind::io, dir, "no tokenizer.json or tiktoken.model here");
}

void Tokenizer::finish_specials() {
  special_ids_.clear();
  max_special_len_ = 0;
  special_first_.assign(256, 0);
  for (auto& s : specials_) {
    if (s.id < 0) fail(ErrorKind::format, "tokenizer", "special token '{}' has a negative id", s.text);
    if (s.id >= static_cast<int32_t>(bytes_.size())) bytes_.resize(s.id + 1);
    if (kind_ == Kind::tiktoken) bytes_[s.id] = s.text;
    special_ids_[s.text] = s.id;
    if (!s.text.empty()) special_first_[static_cast<unsigned char>(s.text[0])] = 1;
    max_special_len_ = std::max(max_special_len_, s.text.size());
  }
  is_special_.assign(bytes_.size(), 0);
  for (auto& s : specials_) is_special_[s.id] = 1;
}

void Tokenizer::limit_ids(int32_t n) { limit_ = n; }

bool Tokenizer::is_special(int32_t id) const { return id >= 0 && id < size() && is_special_[id]; }

std::optional<int32_t> Tokenizer::token_id(std::string_view text) const {
  auto it = special_ids_.find(std::string(text));
  if (it != special_ids_.end()) return it->second;
  auto r = ranks_.find(std::string(text));
  if (r != ranks_.end()) return r->second;
  return std::nullopt;
}

const std::string& Tokenizer::token_bytes(int32_t id) const {
  if (id < 0 || id >= size() || id >= limit_)
    fail(ErrorKind::input, "decode", "token id {} is outside the vocabulary [0, {})", id, std::min(size(), limit_));
  return bytes_[id];
}

std::string Tokenizer::token_display(int32_t id) const {
  const std::string& b = token_bytes(id);
  std::string out;
  size_t i = 0;
  while (i < b.size()) {
    const size_t n = uni::complete_utf8_prefix(std::string_view(b).substr(i, 4));
    std::vector<char32_t> c;
    std::vector<uint32_t> o;
    size_t bad = 0;
    const unsigned char ch = static_cast<unsigned char>(b[i]);
    const size_t len = ch < 0x80 ? 1 : (ch & 0xE0) == 0xC0 ? 2 : (ch & 0xF0) == 0xE0 ? 3 : (ch & 0xF8) == 0xF0 ? 4 : 1;
    if (i + len <= b.size()) uni::decode_utf8(std::string_view(b).substr(i, len), c, o, &bad);
    (void)n;
    if (i + len <= b.size() && bad == 0 && c.size() == 1) {
      out.append(b, i, len);
      i += len;
    } else {
      out += fmt::format("\\x{:02x}", ch);
      ++i;
    }
  }
  return out;
}

std::vector<std::string> Tokenizer::pretokenize_text(std::string_view text) const {
  std::vector<char32_t> cps;
  std::vector<uint32_t> off;
  uni::decode_utf8(text, cps, off);
  std::vector<Piece> pieces;
  pretokenize(pre_, cps.data(), static_cast<uint32_t>(cps.size()), pieces);
  std::vector<std::string> out;
  for (auto& p : pieces) out.emplace_back(text.substr(off[p.begin], off[p.end] - off[p.begin]));
  return out;
}

// Byte-pair merge of one piece: repeatedly merge the adjacent pair of lowest priority, leftmost on ties.
// tiktoken: a pair's priority is the rank of the merged bytes (and a piece that is itself a token is taken
// whole). HF: the merge's position in `merges`.
void Tokenizer::bpe(std::string_view piece, std::vector<int32_t>& out) const {
  if (kind_ == Kind::tiktoken) {
    auto whole = ranks_.find(std::string(piece));
    if (whole != ranks_.end()) {
      out.push_back(whole->second);
      return;
    }
  }
  const size_t n = piece.size();
  constexpr int32_t kNone = std::numeric_limits<int32_t>::max();
  // parts: start offsets of current symbols (+ end sentinel); ids for HF
  std::vector<uint32_t> start(n + 1);
  for (size_t i = 0; i <= n; ++i) start[i] = static_cast<uint32_t>(i);
  std::vector<int32_t> ids;
  if (kind_ == Kind::hf_bpe) {
    ids.resize(n);
    for (size_t i = 0; i < n; ++i) ids[i] = byte_id_[static_cast<unsigned char>(piece[i])];
  }
  std::string key;
  auto pair_rank = [&](size_t i, int32_t* merged) -> int32_t {  // pair (symbol i, symbol i+1)
    if (i + 2 > start.size() - 1) return kNone;
    if (kind_ == Kind::tiktoken) {
      key.assign(piece.data() + start[i], start[i + 2] - start[i]);
      auto it = ranks_.find(key);
      return it == ranks_.end() ? kNone : it->second;
    }
    auto it = merges_.find((static_cast<uint64_t>(ids[i]) << 32) | static_cast<uint32_t>(ids[i + 1]));
    if (it == merges_.end()) return kNone;
    if (merged) *merged = it->second.second;
    return it->second.first;
  };
  std::vector<int32_t> rank(n > 0 ? n - 1 : 0);
  for (size_t i = 0; i + 1 < n; ++i) rank[i] = pair_rank(i, nullptr);
  while (rank.size() > 0) {
    size_t best = 0;
    for (size_t i = 1; i < rank.size(); ++i)
      if (rank[i] < rank[best]) best = i;
    if (rank[best] == kNone) break;
    int32_t merged = -1;
    if (kind_ == Kind::hf_bpe) {
      pair_rank(best, &merged);
      ids[best] = merged;
      ids.erase(ids.begin() + best + 1);
    }
    start.erase(start.begin() + best + 1);
    rank.erase(rank.begin() + best);
    if (best < rank.size()) rank[best] = pair_rank(best, nullptr);
    if (best > 0) rank[best - 1] = pair_rank(best - 1, nullptr);
  }
  if (kind_ == Kind::hf_bpe) {
    out.insert(out.end(), ids.begin(), ids.end());
    return;
  }
  for (size_t i = 0; i + 1 < start.size(); ++i) {
    auto it = ranks_.find(std::string(piece.substr(start[i], start[i + 1] - start[i])));
    out.push_back(it->second);  // every single byte has a rank (checked at load)
  }
}

void Tokenizer::encode_ordinary(std::string_view text, std::vector<int32_t>& out) const {
  thread_local std::vector<char32_t> cps;
  thread_local std::vector<uint32_t> off;
  thread_local std::vector<Piece> pieces;
  uni::decode_utf8(text, cps, off);
  pretokenize(pre_, cps.data(), static_cast<uint32_t>(cps.size()), pieces);
  for (const Piece& p : pieces) bpe(text.substr(off[p.begin], off[p.end] - off[p.begin]), out);
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool parse_special) const {
  {
    std::vector<char32_t> c;
    std::vector<uint32_t> o;
    size_t bad = 0;
    uni::decode_utf8(text, c, o, &bad);
    if (bad) {
      for (size_t i = 0; i < c.size(); ++i)
        if (c[i] == 0xFFFD && !(o[i + 1] - o[i] == 3 && text.substr(o[i], 3) == "\xEF\xBF\xBD"))
          fail(ErrorKind::input, "encode", "text is not valid UTF-8 (byte offset {})", o[i]);
    }
  }
  std::vector<int32_t> out;
  if (!parse_special || specials_.empty()) {
    encode_ordinary(text, out);
    return out;
  }
  // Leftmost-longest match of special/added token text; the text between is ordinary.
  size_t pos = 0, last = 0;
  while (pos < text.size()) {
    size_t best_len = 0;
    int32_t best_id = -1;
    if (!special_first_[static_cast<unsigned char>(text[pos])]) {
      ++pos;
      continue;
    }
    for (size_t len = std::min(max_special_len_, text.size() - pos); len > 0; --len) {
      auto it = special_ids_.find(std::string(text.substr(pos, len)));
      if (it != special_ids_.end() && it->second < limit_) {
        best_len = len;
        best_id = it->second;
        break;
      }
    }
    if (best_len == 0) {
      ++pos;
      continue;
    }
    if (pos > last) encode_ordinary(text.substr(last, pos - last), out);
    out.push_back(best_id);
    pos = last = pos + best_len;
  }
  if (last < text.size()) encode_ordinary(text.substr(last), out);
  return out;
}

std::string Tokenizer::decode_bytes(const std::vector<int32_t>& ids) const {
  std::string out;
  for (int32_t id : ids) out += token_bytes(id);
  return out;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  const std::string b = decode_bytes(ids);
  std::vector<char32_t> cps;
  std::vector<uint32_t> off;
  size_t bad = 0;
  uni::decode_utf8(b, cps, off, &bad);
  if (!bad) return b;
  std::string out;
  for (char32_t c : cps) uni::append_utf8(out, c);
  return out;
}

std::string StreamDecoder::push(int32_t id) {
  pending_ += tok_.token_bytes(id);
  const size_t n = uni::complete_utf8_prefix(pending_);
  std::string ready = pending_.substr(0, n);
  pending_.erase(0, n);
  if (uni::valid_utf8(ready)) return ready;
  std::vector<char32_t> cps;
  std::vector<uint32_t> off;
  uni::decode_utf8(ready, cps, off);
  std::string out;
  for (char32_t c : cps) uni::append_utf8(out, c);
  return out;
}

std::string StreamDecoder::finish() {
  std::vector<char32_t> cps;
  std::vector<uint32_t> off;
  uni::decode_utf8(pending_, cps, off);
  pending_.clear();
  std::string out;
  for (char32_t c : cps) uni::append_utf8(out, c);
  return out;
}

}  // namespace kscope
