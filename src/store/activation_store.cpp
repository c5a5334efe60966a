#include "store/activation_store.hpp"

#include <filesystem>
#include <cstring>
#include <fstream>

#include "util/error.hpp"
#include "util/numeric.hpp"

namespace kscope {
namespace fs = std::filesystem;
using json = nlohmann::json;

uint64_t fnv1a64(const void* data, size_t n, uint64_t h) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= 1099511628211ull;
  }
  return h;
}

uint64_t fnv1a64_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail(ErrorKind::io, path, "cannot open");
  std::vector<char> buf(1 << 20);
  uint64_t h = 1469598103934665603ull;
  while (f) {
    f.read(buf.data(), buf.size());
    h = fnv1a64(buf.data(), static_cast<size_t>(f.gcount()), h);
  }
  return h;
}

json StoreConfig::to_json() const {
  return {{"model_identity", model_identity}, {"model_type", model_type}, {"model_path", model_path},
          {"sites", sites}, {"positions", positions}, {"reduction", reduction}, {"dtype", dtype},
          {"d_model", d_model}, {"shard_sequences", shard_sequences}, {"source", source},
          {"source_hash", source_hash}, {"extra", extra}};
}

namespace {
void write_json_atomic(const std::string& path, const json& j) {
  {
    std::ofstream f(path + ".tmp");
    f << j.dump(1) << "\n";
    f.flush();
    if (!f) fail(ErrorKind::io, path, "write failed");
  }
  fs::rename(path + ".tmp", path);
}
std::string shard_name(int64_t i) { return fmt::format("shard-{:05d}.safetensors", i); }
}  // namespace

StoreWriter::StoreWriter(std::string dir, StoreConfig cfg, bool overwrite) : dir_(std::move(dir)), cfg_(std::move(cfg)) {
  if (cfg_.dtype != "float32" && cfg_.dtype != "bfloat16")
    fail(ErrorKind::input, "--dtype", "'{}' (expected float32 or bfloat16)", cfg_.dtype);
  if (cfg_.shard_sequences <= 0) fail(ErrorKind::input, "--shard-sequences", "must be positive");
  fs::create_directories(dir_);
  const std::string mpath = dir_ + "/manifest.json";
  const json want = cfg_.to_json();
  if (fs::exists(mpath) && !overwrite) {
    std::ifstream f(mpath);
    try {
      manifest_ = json::parse(f);
    } catch (const json::exception& e) {
      fail(ErrorKind::format, mpath, "not valid JSON ({}); use a new directory or --overwrite", e.what());
    }
    const json& have = manifest_["config"];
    for (auto it = want.begin(); it != want.end(); ++it)
      if (!have.contains(it.key()) || have[it.key()] != it.value())
        fail(ErrorKind::input, mpath, "was written with a different '{}' ({} here, {} there): use a new --out or --overwrite",
             it.key(), it.value().dump(), have.value(it.key(), json()).dump());
    for (const json& s : manifest_["shards"]) next_seq_ += s["sequences"].get<int64_t>();
  } else {
    if (overwrite)
      for (auto& e : fs::directory_iterator(dir_)) {
        const auto n = e.path().filename().string();
        if (n == "manifest.json" || n.rfind("shard-", 0) == 0) fs::remove(e.path());
      }
    manifest_ = {{"format", "kscope-activations"}, {"version", 1}, {"config", want}, {"shards", json::array()},
                 {"sequences", json::array()}, {"complete", false}};
    write_manifest();
  }
  // leftovers of an interrupted run: temp files, and shards written after the manifest's last one
  const int64_t n_shards = static_cast<int64_t>(manifest_["shards"].size());
  for (auto& e : fs::directory_iterator(dir_)) {
    const auto n = e.path().filename().string();
    if (n.size() > 4 && n.substr(n.size() - 4) == ".tmp") fs::remove(e.path());
    else if (n.rfind("shard-", 0) == 0 && std::stoll(n.substr(6, 5)) >= n_shards) fs::remove(e.path());
  }
}

void StoreWriter::add(int64_t index, const CapturedSeq& c) {
  if (index != next_seq_ + static_cast<int64_t>(pending_.size()))
    fail(ErrorKind::internal, dir_, "sequence {} added out of order (expected {})", index, next_seq_ + pending_.size());
  pending_.emplace_back(index, c);
  if (static_cast<int64_t>(pending_.size()) == cfg_.shard_sequences) write_shard();
}

void StoreWriter::write_shard() {
  if (pending_.empty()) return;
  const int64_t shard = static_cast<int64_t>(manifest_["shards"].size());
  const std::string name = shard_name(shard), path = dir_ + "/" + name;
  const bool bf16 = cfg_.dtype == "bfloat16";
  std::map<std::string, OwnedTensor> t;
  std::vector<int32_t> seq, pos;
  json seqs = json::array();
  int64_t rows = 0;
  for (auto& [idx, c] : pending_) {
    const bool mean = cfg_.reduction == "mean";
    const int64_t n = mean ? 1 : static_cast<int64_t>(c.positions.size());
    seqs.push_back({{"index", idx}, {"shard", shard}, {"row", rows}, {"rows", n}, {"prompt_len", c.prompt_len},
                    {"tokens", c.tokens}, {"positions", c.positions}});
    for (int64_t r = 0; r < n; ++r) {
      seq.push_back(static_cast<int32_t>(idx));
      pos.push_back(mean ? -1 : static_cast<int32_t>(c.positions[r]));
    }
    rows += n;
  }
  auto append = [&](const std::string& name_, DType dt, int64_t width, const void* data, size_t nbytes) {
    auto& o = t[name_];
    o.dtype = dt;
    o.shape = {0, width};
    o.bytes.insert(o.bytes.end(), static_cast<const uint8_t*>(data), static_cast<const uint8_t*>(data) + nbytes);
  };
  for (const std::string& site : cfg_.sites) {
    for (auto& [idx, c] : pending_) {
      if (auto it = c.rows.find(site); it != c.rows.end()) {
        const int64_t w = c.width.at(site);
        if (bf16) {
          std::vector<uint16_t> h(it->second.size());
          for (size_t i = 0; i < h.size(); ++i) h[i] = f32_to_bf16(it->second[i]);
          append(site, DType::BF16, w, h.data(), h.size() * 2);
        } else {
          append(site, DType::F32, w, it->second.data(), it->second.size() * 4);
        }
      } else if (auto r = c.router_ids.find(site); r != c.router_ids.end()) {
        const int64_t k = c.width.at(site);
        append(site + ".ids", DType::I32, k, r->second.data(), r->second.size() * 4);
        const auto& w = c.router_weights.at(site);
        append(site + ".weights", DType::F32, k, w.data(), w.size() * 4);
      }
    }
  }
  for (auto& [n, o] : t) o.shape[0] = static_cast<int64_t>(o.bytes.size() / dtype_size(o.dtype) / o.shape[1]);
  t["seq"] = {DType::I32, {rows}, std::vector<uint8_t>(reinterpret_cast<uint8_t*>(seq.data()), reinterpret_cast<uint8_t*>(seq.data()) + seq.size() * 4)};
  t["pos"] = {DType::I32, {rows}, std::vector<uint8_t>(reinterpret_cast<uint8_t*>(pos.data()), reinterpret_cast<uint8_t*>(pos.data()) + pos.size() * 4)};
  write_safetensors(path, t, {{"format", "kscope-activations"}, {"shard", std::to_string(shard)}});
  manifest_["shards"].push_back({{"file", name}, {"first_sequence", pending_.front().first},
                                 {"sequences", static_cast<int64_t>(pending_.size())}, {"rows", rows},
                                 {"fnv1a64", fmt::format("{:016x}", fnv1a64_file(path))}});
  for (auto& s : seqs) manifest_["sequences"].push_back(s);
  next_seq_ += static_cast<int64_t>(pending_.size());
  pending_.clear();
  write_manifest();
}

void StoreWriter::finish() {
  write_shard();
  manifest_["complete"] = true;
  write_manifest();
}

void StoreWriter::write_manifest() { write_json_atomic(dir_ + "/manifest.json", manifest_); }

ActivationStore ActivationStore::open(const std::string& dir) {
  ActivationStore s;
  s.dir_ = dir;
  const std::string mpath = dir + "/manifest.json";
  std::ifstream f(mpath);
  if (!f) fail(ErrorKind::io, mpath, "cannot open (is '{}' an activation store?)", dir);
  try {
    s.manifest_ = json::parse(f);
  } catch (const json::exception& e) {
    fail(ErrorKind::format, mpath, "not valid JSON: {}", e.what());
  }
  if (s.manifest_.value("format", "") != "kscope-activations") fail(ErrorKind::format, mpath, "not a kscope activation store");
  for (const json& sh : s.manifest_["shards"]) {
    const std::string p = dir + "/" + sh["file"].get<std::string>();
    if (!fs::exists(p)) fail(ErrorKind::io, p, "shard listed in the manifest is missing");
    const std::string got = fmt::format("{:016x}", fnv1a64_file(p));
    if (got != sh["fnv1a64"].get<std::string>())
      fail(ErrorKind::format, p, "checksum {} does not match the manifest's {}", got, sh["fnv1a64"].get<std::string>());
  }
  return s;
}

void capture_to_store(Model& model, const std::vector<CaptureRequest>& reqs, const CaptureSpec& spec, StoreWriter& writer,
                      int64_t batch, const std::function<void(int64_t, int64_t)>& progress) {
  const int64_t total = static_cast<int64_t>(reqs.size());
  batch = std::max<int64_t>(1, batch);
  for (int64_t b = writer.next_sequence(); b < total; b += batch) {
    const int64_t e = std::min(total, b + batch);
    std::vector<CaptureRequest> part(reqs.begin() + b, reqs.begin() + e);
    const auto caps = run_capture(model, part, spec);
    for (int64_t i = b; i < e; ++i) writer.add(i, caps[i - b]);
    if (progress) progress(e, total);
  }
  writer.finish();
}

int64_t ActivationStore::n_sequences() const { return static_cast<int64_t>(manifest_["sequences"].size()); }
int64_t ActivationStore::n_shards() const { return static_cast<int64_t>(manifest_["shards"].size()); }

std::vector<float> ActivationStore::read(const std::string& site, int64_t shard, int64_t* width) const {
  if (shard < 0 || shard >= n_shards()) fail(ErrorKind::input, dir_, "no shard {}", shard);
  SafetensorsFile f(dir_ + "/" + manifest_["shards"][shard]["file"].get<std::string>());
  auto it = f.tensors().find(site);
  if (it == f.tensors().end()) fail(ErrorKind::input, f.path(), "no site '{}' in this store", site);
  if (width) *width = it->second.shape.size() > 1 ? it->second.shape[1] : 1;
  return to_f32(it->second);
}

std::vector<int32_t> ActivationStore::sequence_ids(const std::string& router_site, int64_t seq) const {
  if (seq < 0 || seq >= n_sequences()) fail(ErrorKind::input, dir_, "no sequence {}", seq);
  const json& s = manifest_["sequences"][seq];
  SafetensorsFile f(dir_ + "/" + manifest_["shards"][s["shard"].get<int64_t>()]["file"].get<std::string>());
  const std::string name = router_site + ".ids";
  auto it = f.tensors().find(name);
  if (it == f.tensors().end() || it->second.dtype != DType::I32) fail(ErrorKind::input, f.path(), "no router ids '{}'", name);
  const int64_t k = it->second.shape[1], r0 = s["row"], n = s["rows"];
  std::vector<int32_t> out(n * k);
  std::memcpy(out.data(), it->second.data + r0 * k * 4, out.size() * 4);
  return out;
}

std::vector<float> ActivationStore::sequence_rows(const std::string& site, int64_t seq, int64_t* width) const {
  if (seq < 0 || seq >= n_sequences()) fail(ErrorKind::input, dir_, "no sequence {}", seq);
  const json& s = manifest_["sequences"][seq];
  int64_t w = 0;
  const auto all = read(site, s["shard"].get<int64_t>(), &w);
  const int64_t r0 = s["row"], n = s["rows"];
  if (width) *width = w;
  return {all.begin() + r0 * w, all.begin() + (r0 + n) * w};
}

}  // namespace kscope
