#include "interp/intervention.hpp"

#include <algorithm>
#include <cmath>

#include "backend/cpu/cpu_backend.hpp"
#include "util/error.hpp"

namespace kscope {

const char* op_name(InterventionOp op) {
  switch (op) {
    case InterventionOp::add: return "add";
    case InterventionOp::ablate: return "ablate";
    case InterventionOp::clamp: return "clamp";
  }
  return "?";
}

InterventionOp parse_op(const std::string& s) {
  if (s == "add") return InterventionOp::add;
  if (s == "ablate") return InterventionOp::ablate;
  if (s == "clamp") return InterventionOp::clamp;
  fail(ErrorKind::input, "op", "'{}' is not an operation (expected add, ablate or clamp)", s);
}

std::optional<RowOp> row_op(const Intervention& iv, int64_t row, int64_t width) {
  const float* v = iv.vector.data();
  double vv = 0;
  for (int64_t i = 0; i < width; ++i) vv += static_cast<double>(v[i]) * v[i];
  RowOp op;
  op.row = row;
  op.v = v;
  op.vnorm = std::sqrt(vv);
  if (iv.op == InterventionOp::add) {
    if (iv.coef == 0.0) return std::nullopt;  // exactly a no-op
    op.kind = RowOp::add;
    op.add_coef = static_cast<float>(iv.relative ? iv.coef * iv.mean_norm / op.vnorm : iv.coef);
    return op;
  }
  op.kind = RowOp::project;
  op.target = iv.op == InterventionOp::ablate ? 0.0 : iv.coef;
  return op;
}

void apply_intervention(const Intervention& iv, float* h, int64_t width) {
  if (auto op = row_op(iv, 0, width)) apply_row_op(*op, h, width);
}

SteeringHook::SteeringHook(std::vector<std::vector<Intervention>> lists, std::vector<SeqLayout> layouts)
    : lists_(std::move(lists)), layouts_(std::move(layouts)) {
  if (layouts_.size() != lists_.size()) fail(ErrorKind::internal, "steering", "one layout per sequence");
  for (auto& l : lists_)
    for (auto& iv : l)
      if (std::find(sites_.begin(), sites_.end(), iv.site) == sites_.end()) sites_.push_back(iv.site);
}

bool SteeringHook::wants(const Site& s) const { return std::find(sites_.begin(), sites_.end(), s) != sites_.end(); }

void SteeringHook::validate(const ModelConfig& cfg) const {
  for (size_t i = 0; i < lists_.size(); ++i)
    for (const auto& iv : lists_[i]) {
      const std::string where = "sequence " + std::to_string(i) + ", intervention " + iv.label;
      if (iv.site.kind == SiteKind::router) fail(ErrorKind::input, where, "the router site cannot be steered");
      const int64_t width = iv.site.kind == SiteKind::logits ? cfg.vocab_size : cfg.hidden_size;
      if (static_cast<int64_t>(iv.vector.size()) != width)
        fail(ErrorKind::input, where, "vector has {} values but {} is {} wide", iv.vector.size(), iv.site.str(), width);
      double vv = 0;
      for (float x : iv.vector) {
        if (!std::isfinite(x)) fail(ErrorKind::input, where, "vector holds a non-finite value");
        vv += static_cast<double>(x) * x;
      }
      if (vv == 0 && iv.op != InterventionOp::add) fail(ErrorKind::input, where, "cannot {} along a zero vector", op_name(iv.op));
      if (vv == 0 && iv.relative) fail(ErrorKind::input, where, "a relative coefficient needs a non-zero vector");
      if (iv.relative && !(iv.mean_norm > 0))
        fail(ErrorKind::input, where, "a relative coefficient needs the site's mean norm (calibrate it, or store it in the vector file)");
      if (iv.positions.needs_total())
        fail(ErrorKind::input, where, "positions '{}' need the final length, unknown while generating", iv.positions.text());
    }
}

bool SteeringHook::row_ops(const Site& s, int64_t seq, int64_t n_rows, int64_t width, int64_t pos0,
                           std::vector<RowOp>& ops) {
  if (seq < 0 || seq >= static_cast<int64_t>(lists_.size())) return true;
  for (const Intervention& iv : lists_[seq]) {
    if (!(iv.site == s)) continue;
    for (int64_t r = 0; r < n_rows; ++r)
      if (iv.positions.contains(pos0 + r, layouts_[seq]))
        if (auto op = row_op(iv, r, width)) ops.push_back(*op);
  }
  return true;
}

void SteeringHook::on(const Site& s, int64_t seq, float* data, int64_t n_rows, int64_t width, int64_t pos0) {
  if (seq < 0 || seq >= static_cast<int64_t>(lists_.size())) return;
  for (const Intervention& iv : lists_[seq]) {
    if (!(iv.site == s)) continue;
    for (int64_t r = 0; r < n_rows; ++r)
      if (iv.positions.contains(pos0 + r, layouts_[seq])) apply_intervention(iv, data + r * width, width);
  }
}

}  // namespace kscope
