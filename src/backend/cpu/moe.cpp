#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "backend/cpu/cpu_backend.hpp"

namespace kscope {

namespace {
// Indices of the k largest values, largest first; ties go to the lower index (a fixed, documented order).
void top_k(const float* v, int64_t n, int64_t k, std::vector<int32_t>& out) {
  out.resize(n);
  std::iota(out.begin(), out.end(), 0);
  std::partial_sort(out.begin(), out.begin() + k, out.end(), [&](int32_t a, int32_t b) {
    return v[a] > v[b] || (v[a] == v[b] && a < b);
  });
  out.resize(k);
}
}  // namespace

void CpuBackend::route(const ModelConfig& cfg, const float* logits, const std::vector<float>& bias, int64_t n,
                       int32_t* idx, float* weight) {
  const int64_t E = cfg.n_routed_experts, K = cfg.num_experts_per_tok, G = cfg.n_group;
  const int64_t per_group = E / G;
  pool_.parallel_for(n, 4, [&](int64_t b, int64_t e) {
    std::vector<float> scores(E), choice(E), gscore(G);
    std::vector<int32_t> sel, gsel;
    for (int64_t t = b; t < e; ++t) {
      const float* l = logits + t * E;
      if (cfg.scoring_func == ScoringFunc::sigmoid) {
        for (int64_t i = 0; i < E; ++i) scores[i] = 1.0f / (1.0f + std::exp(-l[i]));
      } else {
        const float mx = *std::max_element(l, l + E);
        float s = 0;
        for (int64_t i = 0; i < E; ++i) s += (scores[i] = std::exp(l[i] - mx));
        for (int64_t i = 0; i < E; ++i) scores[i] /= s;
      }
      // the correction bias steers selection only; the weights come from the raw scores
      for (int64_t i = 0; i < E; ++i) choice[i] = scores[i] + (bias.empty() ? 0.0f : bias[i]);
      if (cfg.topk_method != TopkMethod::greedy && G > 1) {
        for (int64_t g = 0; g < G; ++g) {
          const float* c = (cfg.topk_method == TopkMethod::noaux_tc ? choice.data() : scores.data()) + g * per_group;
          if (cfg.topk_method == TopkMethod::noaux_tc) {  // sum of the group's two best
            float a = -std::numeric_limits<float>::infinity(), bb = a;
            for (int64_t i = 0; i < per_group; ++i) {
              if (c[i] > a) { bb = a; a = c[i]; } else if (c[i] > bb) bb = c[i];
            }
            gscore[g] = a + bb;
          } else {  // group_limited_greedy: the group's best
            gscore[g] = *std::max_element(c, c + per_group);
          }
        }
        top_k(gscore.data(), G, cfg.topk_group, gsel);
        std::vector<char> keep(G, 0);
        for (auto g : gsel) keep[g] = 1;
        for (int64_t i = 0; i < E; ++i)
          if (!keep[i / per_group]) choice[i] = -std::numeric_limits<float>::infinity();
      }
      top_k(choice.data(), E, K, sel);
      float sum = 0;
      for (int64_t k = 0; k < K; ++k) {
        idx[t * K + k] = sel[k];
        weight[t * K + k] = scores[sel[k]];
        sum += scores[sel[k]];
      }
      for (int64_t k = 0; k < K; ++k) {
        if (cfg.norm_topk_prob) weight[t * K + k] /= (sum + 1e-20f);
        weight[t * K + k] *= static_cast<float>(cfg.routed_scaling_factor);
      }
    }
  });
}

void CpuBackend::moe_experts(const MoeWeights& w, const float* x, int64_t n, int64_t k, const int32_t* idx,
                             const float* weight, float* out) {
  const int64_t E = static_cast<int64_t>(w.experts.size());
  const int64_t H = w.experts.empty() ? 0 : w.experts[0].down.out;
  // Permute tokens by expert: rows[e] lists (token, slot) pairs routed to expert e.
  std::vector<std::vector<int64_t>> rows(E);
  for (int64_t i = 0; i < n * k; ++i) rows[idx[i]].push_back(i);
  std::vector<float> y(n * k * H);  // [n, k, H] each slot's expert output
  std::vector<float> xin, yout;
  for (int64_t e = 0; e < E; ++e) {
    const auto& r = rows[e];
    if (r.empty()) continue;
    const int64_t m = static_cast<int64_t>(r.size());
    xin.resize(m * H);
    yout.resize(m * H);
    for (int64_t j = 0; j < m; ++j) std::copy(x + (r[j] / k) * H, x + (r[j] / k + 1) * H, xin.begin() + j * H);
    mlp(w.experts[e], xin.data(), m, yout.data());
    for (int64_t j = 0; j < m; ++j) std::copy(yout.begin() + j * H, yout.begin() + (j + 1) * H, y.begin() + r[j] * H);
  }
  // Weighted combine per token, experts in ascending id order (HF's order), independent of the batch.
  for (int64_t t = 0; t < n; ++t) {
    std::vector<int64_t> slots(k);
    std::iota(slots.begin(), slots.end(), 0);
    std::sort(slots.begin(), slots.end(), [&](int64_t a, int64_t b) { return idx[t * k + a] < idx[t * k + b]; });
    float* o = out + t * H;
    std::fill(o, o + H, 0.0f);
    for (auto s : slots) {
      const float wt = weight[t * k + s];
      const float* ys = y.data() + (t * k + s) * H;
      for (int64_t i = 0; i < H; ++i) o[i] += ys[i] * wt;
    }
  }
}

}  // namespace kscope
