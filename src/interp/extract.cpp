#include "interp/extract.hpp"

#include <cmath>
#include <set>

#include "tokenizer/unicode.hpp"
#include "util/error.hpp"

namespace kscope {

VectorFile mean_difference(const ActivationStore& pos, const ActivationStore& neg, const std::vector<std::string>& sites,
                           const std::string& trait) {
  const auto& pc = pos.manifest()["config"];
  const auto& nc = neg.manifest()["config"];
  if (pc["model_identity"] != nc["model_identity"])
    fail(ErrorKind::input, "mean-difference", "the stores come from different models ({} and {})",
         pc["model_identity"].get<std::string>(), nc["model_identity"].get<std::string>());
  VectorFile v;
  for (const std::string& site : sites) {
    std::vector<double> mp, mn;
    double norm_sum = 0;
    int64_t norm_n = 0;
    for (int side = 0; side < 2; ++side) {
      const ActivationStore& s = side == 0 ? pos : neg;
      std::vector<double>& m = side == 0 ? mp : mn;
      int64_t rows = 0;
      for (int64_t sh = 0; sh < s.n_shards(); ++sh) {
        int64_t w = 0;
        const auto x = s.read(site, sh, &w);
        if (m.empty()) m.assign(w, 0.0);
        if (static_cast<int64_t>(m.size()) != w) fail(ErrorKind::input, "mean-difference", "site '{}' has different widths", site);
        for (size_t r = 0; r * w < x.size(); ++r) {
          double n2 = 0;
          for (int64_t d = 0; d < w; ++d) {
            m[d] += x[r * w + d];
            n2 += static_cast<double>(x[r * w + d]) * x[r * w + d];
          }
          norm_sum += std::sqrt(n2);
          ++norm_n;
          ++rows;
        }
      }
      if (rows == 0) fail(ErrorKind::input, "mean-difference", "a store has no rows for site '{}'", site);
      for (auto& x : m) x /= static_cast<double>(rows);
    }
    std::vector<float> d(mp.size());
    for (size_t i = 0; i < d.size(); ++i) d[i] = static_cast<float>(mp[i] - mn[i]);
    v.vectors[site] = std::move(d);
    v.norms[site] = norm_sum / norm_n;
  }
  v.meta["model_identity"] = pc["model_identity"].get<std::string>();
  v.meta["method"] = "mean_difference";
  v.meta["trait"] = trait;
  v.meta["normalization"] = "none (raw mean difference)";
  v.meta["source_hash"] = pc.value("source_hash", "") + "-" + nc.value("source_hash", "");
  v.meta["positions"] = pc.value("positions", "");
  return v;
}

double french_fraction(const std::string& text) {
  // function words that mark French and are not also common English, German or Spanish words
  static const std::set<std::string> fr = {
      "le", "la", "les", "des", "du", "une", "est", "sont", "et", "pour", "dans", "qui", "que", "sur", "pas", "par",
      "avec", "ce", "cette", "ces", "au", "aux", "ne", "sa", "son", "ses", "il", "elle", "ils", "nous", "vous", "leur",
      "mais", "comme", "plus", "fichier", "fichiers", "lorsque", "peut", "être", "été", "où", "à", "sous", "chaque",
      "tous", "toutes", "aussi", "sans", "également", "afin", "donc", "selon", "cela", "dont", "avoir", "fait", "utilisé",
      "commande", "valeur", "défaut", "répertoire", "voir", "aussi", "ou", "si", "lorsqu", "qu", "d", "l", "n", "s", "j", "c"};
  std::vector<char32_t> cps;
  std::vector<uint32_t> off;
  uni::decode_utf8(text, cps, off);
  int64_t words = 0, hits = 0;
  std::string w;
  auto flush = [&] {
    if (w.empty()) return;
    ++words;
    hits += fr.count(w);
    w.clear();
  };
  for (char32_t c : cps) {
    if (uni::props(c) & uni::kL) {
      // lower-case ASCII and the Latin-1 capitals
      if (c >= 'A' && c <= 'Z') c += 32;
      else if (c >= 0xC0 && c <= 0xDE && c != 0xD7) c += 32;
      uni::append_utf8(w, c);
    } else {
      flush();  // apostrophes split "l'option" into "l" + "option"
    }
  }
  flush();
  return words ? static_cast<double>(hits) / words : 0.0;
}

}  // namespace kscope
