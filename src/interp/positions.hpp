// A small language for the positions of a sequence that a capture or an intervention applies to.
//
//   all | prompt | response | think | turn[ROLE] | [a:b]     regions (ROLE: system, user, assistant, tool)
//   REGION[i]      one position of the region, Python-style (negative counts from its end)
//   REGION[a:b]    a slice of the region (either bound may be omitted)
//   SPEC,SPEC      union
// Examples: prompt[-1] (last prompt token), response[:5] (first five generated tokens), turn[assistant],
// turn[user][-1], think, [10:20] (absolute positions), prompt[-3:],response.
//
// Position p is the p-th token of the sequence (prompt tokens first, then generated ones); its state is what
// the model computes when that token is its input. The last generated token is fed once more at the end of a
// capture so that every kept token has states.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "tokenizer/chat.hpp"

namespace kscope {

struct SeqLayout {
  int64_t prompt_len = 0;
  int64_t total_len = -1;   // prompt + generated tokens with states; -1 while still generating
  std::vector<Turn> turns;  // from the chat renderer, when the prompt is a chat
};

class PositionSpec {
 public:
  PositionSpec() : terms_(1), text_("all") {}  // all positions
  static PositionSpec parse(const std::string& text);  // throws Error(input) naming the text

  // Whether position p is selected. While generating (total_len < 0), a spec that needs the final length
  // (a negative index into `response` or `all`) throws; check needs_total() up front.
  bool contains(int64_t p, const SeqLayout& l) const;
  std::vector<int64_t> resolve(const SeqLayout& l) const;  // selected positions of a finished sequence, ascending
  bool needs_total() const;
  const std::string& text() const { return text_; }

 private:
  enum class Region { all, prompt, response, turn, think, absolute };
  struct Term {
    Region region = Region::all;
    std::string role;
    int kind = 0;  // 0 whole region, 1 single index, 2 slice
    int64_t a = 0, b = 0;
    bool has_a = false, has_b = false;
  };
  bool term_contains(const Term& t, int64_t p, const SeqLayout& l) const;
  std::vector<Term> terms_;
  std::string text_;
};

}  // namespace kscope
