// Trait datasets (docs/traits.md): a definition the judge grades against, contrastive prompt pairs, held-out
// evaluation questions, optional judge templates and scoring settings, and the direction steering should push.
//
// Two styles of pairs:
//   instruct  opposing system prompts ("instructions": [{"pos", "neg"}]) crossed with extraction "questions":
//             pair (i, q) is the same user question under instruction i's positive and negative system prompt;
//   document  document prefixes for base models ("pairs": [{"pos", "neg"}]) that the model continues.
// Explicit instruct pairs ("pairs": [{"pos", "neg", "question"}]) may be given instead of the cross product.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "trait/judge.hpp"

namespace kscope {

struct TraitPair {
  std::string pos, neg;  // system prompts (instruct) or document prefixes (document)
  std::string question;  // the user turn (instruct); empty for documents
  int64_t question_index = -1;  // pairs sharing a question share a split
};

struct TraitDataset {
  std::string name, definition, style = "instruct";  // instruct | document
  std::vector<TraitPair> pairs;
  std::vector<std::string> eval_questions;
  Rubric rubric = Rubric::defaults();
  std::string scorer;           // a programmatic trait scorer ("french") instead of the judge, optional
  std::string coherence = "judge";  // judge | loglik: how coherence is scored by default
  int steer_sign = +1;          // +1: steering should increase the trait; -1: decrease it
  // default thresholds the dataset recommends (flags override)
  std::optional<double> pos_min, neg_max, coherence_min;
  std::string path;             // where it was read from
  std::string hash;             // FNV-1a-64 of the file's bytes

  // Reads and validates a dataset; every error names the file and the field.
  static TraitDataset load(const std::string& path);
  // A shipped trait by name (traits/NAME.json under $KSCOPE_TRAITS, ./traits or the source tree), or a path.
  static TraitDataset find(const std::string& name_or_path);
  nlohmann::json describe() const;
};

// The shipped traits' directory: $KSCOPE_TRAITS, else ./traits when it exists, else the source tree's.
std::string traits_dir();
std::vector<std::string> shipped_traits();

}  // namespace kscope
