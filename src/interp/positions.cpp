#include "interp/positions.hpp"

#include <algorithm>
#include <limits>

#include "util/error.hpp"

namespace kscope {

namespace {
constexpr int64_t kOpen = std::numeric_limits<int64_t>::max();

[[noreturn]] void bad(const std::string& text, const std::string& what) {
  fail(ErrorKind::input, "positions '" + text + "'", "{} (examples: all, prompt[-1], response[:5], turn[assistant], think, [10:20])", what);
}

int64_t parse_int(const std::string& s, const std::string& text) {
  if (s.empty() || s.find_first_not_of("-0123456789") != std::string::npos || s.find('-', 1) != std::string::npos)
    bad(text, "'" + s + "' is not an integer");
  return std::stoll(s);
}
}  // namespace

PositionSpec PositionSpec::parse(const std::string& text) {
  PositionSpec ps;
  ps.terms_.clear();
  ps.text_ = text;
  std::string s;
  for (char c : text)
    if (c != ' ') s += c;
  if (s.empty()) bad(text, "empty");
  size_t i = 0;
  while (i < s.size()) {
    Term t;
    auto take_word = [&] {
      size_t j = i;
      while (j < s.size() && std::isalpha(static_cast<unsigned char>(s[j]))) ++j;
      std::string w = s.substr(i, j - i);
      i = j;
      return w;
    };
    auto take_bracket = [&]() -> std::string {
      if (i >= s.size() || s[i] != '[') return {};
      const size_t j = s.find(']', i);
      if (j == std::string::npos) bad(text, "unclosed '['");
      std::string inside = s.substr(i + 1, j - i - 1);
      i = j + 1;
      return inside;
    };
    auto index_or_slice = [&](const std::string& in) {
      if (in.empty()) bad(text, "empty brackets");
      const auto colon = in.find(':');
      if (colon == std::string::npos) {
        t.kind = 1;
        t.a = parse_int(in, text);
        t.has_a = true;
      } else {
        t.kind = 2;
        const std::string a = in.substr(0, colon), b = in.substr(colon + 1);
        if (!a.empty()) t.a = parse_int(a, text), t.has_a = true;
        if (!b.empty()) t.b = parse_int(b, text), t.has_b = true;
      }
    };
    if (s[i] == '[') {
      t.region = Region::absolute;
      index_or_slice(take_bracket());
    } else {
      const std::string w = take_word();
      if (w == "all") t.region = Region::all;
      else if (w == "prompt") t.region = Region::prompt;
      else if (w == "response") t.region = Region::response;
      else if (w == "think") t.region = Region::think;
      else if (w == "turn") {
        t.region = Region::turn;
        t.role = take_bracket();
        if (t.role != "system" && t.role != "user" && t.role != "assistant" && t.role != "tool")
          bad(text, "turn[ROLE] needs a role: system, user, assistant or tool");
      } else bad(text, "'" + w + "' is not a region");
      if (i < s.size() && s[i] == '[') index_or_slice(take_bracket());
    }
    ps.terms_.push_back(t);
    if (i < s.size()) {
      if (s[i] != ',') bad(text, std::string("unexpected '") + s[i] + "'");
      ++i;
      if (i == s.size()) bad(text, "trailing ','");
    }
  }
  return ps;
}

bool PositionSpec::needs_total() const {
  for (const Term& t : terms_) {
    if (t.region != Region::all && t.region != Region::response && t.region != Region::absolute) continue;
    if ((t.kind == 1 && t.a < 0) || (t.kind == 2 && ((t.has_a && t.a < 0) || (t.has_b && t.b < 0)))) return true;
  }
  return false;
}

bool PositionSpec::term_contains(const Term& t, int64_t p, const SeqLayout& l) const {
  const bool known = l.total_len >= 0;
  auto need = [&] {
    if (!known)
      fail(ErrorKind::input, "positions '" + text_ + "'", "a negative index into response/all needs the final length, unknown while generating");
  };
  // spans of the region
  std::vector<std::pair<int64_t, int64_t>> spans;
  switch (t.region) {
    case Region::all: case Region::absolute: spans.push_back({0, known ? l.total_len : kOpen}); break;
    case Region::prompt: spans.push_back({0, l.prompt_len}); break;
    case Region::response: spans.push_back({l.prompt_len, known ? l.total_len : kOpen}); break;
    case Region::turn:
      for (const Turn& u : l.turns)
        if (u.role == t.role && u.content_end > u.content_start) spans.push_back({u.content_start, u.content_end});
      break;
    case Region::think:
      for (const Turn& u : l.turns)
        if (u.think_start >= 0 && u.think_end > u.think_start) spans.push_back({u.think_start, u.think_end});
      break;
  }
  // index k of p within the region (and the region's size)
  int64_t k = -1, size = 0;
  for (auto [lo, hi] : spans) {
    if (p >= lo && p < hi && k < 0) k = size + (p - lo);
    size = (hi == kOpen || size == kOpen) ? kOpen : size + (hi - lo);
  }
  if (t.region == Region::absolute) k = p;  // absolute positions index the sequence itself
  if (k < 0) return false;
  if (t.kind == 0) return true;
  auto resolve = [&](int64_t v) -> int64_t {
    if (v >= 0) return v;
    if (size == kOpen) need();
    return size + v;
  };
  if (t.kind == 1) return k == resolve(t.a);
  const int64_t a = t.has_a ? resolve(t.a) : 0;
  const int64_t b = t.has_b ? resolve(t.b) : kOpen;
  return k >= a && k < b;
}

bool PositionSpec::contains(int64_t p, const SeqLayout& l) const {
  for (const Term& t : terms_)
    if (term_contains(t, p, l)) return true;
  return false;
}

std::vector<int64_t> PositionSpec::resolve(const SeqLayout& l) const {
  if (l.total_len < 0) fail(ErrorKind::internal, "positions", "resolve() needs a finished sequence");
  std::vector<int64_t> out;
  for (int64_t p = 0; p < l.total_len; ++p)
    if (contains(p, l)) out.push_back(p);
  return out;
}

}  // namespace kscope
