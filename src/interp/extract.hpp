// Trait-vector extraction from activation stores, and programmatic text scorers.
#pragma once
#include <string>
#include <vector>

#include "interp/vectors.hpp"
#include "store/activation_store.hpp"

namespace kscope {

// Per site: mean of the positive store's rows minus mean of the negative's (both stores must come from the same
// model and hold the site). The file also records each site's mean row norm over both stores (for relative
// steering coefficients), the method, the trait name and both stores' source hashes.
VectorFile mean_difference(const ActivationStore& pos, const ActivationStore& neg, const std::vector<std::string>& sites,
                           const std::string& trait);

// The fraction of a text's words that are French function words (a language-ID scorer for the demo model; the
// word list is in extract.cpp). 0 for a text with no words.
double french_fraction(const std::string& text);

}  // namespace kscope
