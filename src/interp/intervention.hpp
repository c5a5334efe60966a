// Interventions on the residual stream, per row of one batch: each sequence carries its own list (site,
// operation, vector, coefficient, positions); rows with different lists, or none, share every forward pass.
#pragma once
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "interp/positions.hpp"
#include "model/model.hpp"

namespace kscope {

enum class InterventionOp {
  add,     // h += c·v   (relative: c in units of the site's mean norm, c·mean_norm/‖v‖·v)
  ablate,  // h -= (h·v̂) v̂
  clamp,   // h += (c − h·v̂) v̂   (the projection onto v̂ becomes c)
};
const char* op_name(InterventionOp op);
InterventionOp parse_op(const std::string& s);

struct Intervention {
  Site site{SiteKind::resid_post, 0};
  InterventionOp op = InterventionOp::add;
  std::vector<float> vector;  // [width of the site]
  double coef = 1.0;
  bool relative = false;
  double mean_norm = 0.0;     // the site's mean ‖h‖ (needed when relative)
  PositionSpec positions;
  std::string label;          // for messages and logs
};

// Applies each sequence's interventions to its rows. Sequence i of the batch uses lists[i] and layouts[i].
class SteeringHook : public Hook {
 public:
  SteeringHook(std::vector<std::vector<Intervention>> lists, std::vector<SeqLayout> layouts);
  bool wants(const Site& s) const override;
  void on(const Site& s, int64_t seq, float* data, int64_t n_rows, int64_t width, int64_t pos0) override;
  bool row_ops(const Site& s, int64_t seq, int64_t n_rows, int64_t width, int64_t pos0, std::vector<RowOp>& ops) override;
  // Checks every vector's width against the model and every spec against generation (no final length needed).
  void validate(const ModelConfig& cfg) const;

 private:
  std::vector<std::vector<Intervention>> lists_;
  std::vector<SeqLayout> layouts_;
  std::vector<Site> sites_;
};

// Applies one intervention to one row (the math, shared with tests and the GPU reference).
void apply_intervention(const Intervention& iv, float* h, int64_t width);
// The same intervention as a backend row op on row `row` (nothing for an add with coefficient 0).
std::optional<RowOp> row_op(const Intervention& iv, int64_t row, int64_t width);

}  // namespace kscope
