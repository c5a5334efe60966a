#pragma once
#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "io/safetensors.hpp"

namespace kscope::test {

inline std::string fixtures() { return KSCOPE_FIXTURES; }
// A fresh directory under the system temp dir, removed by the caller's TempDir.
struct TempDir {
  std::filesystem::path path;
  TempDir();
  ~TempDir();
  std::string str() const { return path.string(); }
};

// ‖a − b‖ / ‖b‖; NaN or size mismatch gives +inf. Refuses (returns inf) an all-zero reference.
double rel_err(const float* a, const float* b, size_t n);
inline double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() != b.size() ? INFINITY : rel_err(a.data(), b.data(), a.size());
}
std::vector<int32_t> read_i32(const TensorInfo& t);
std::string read_file(const std::string& path);
void write_file(const std::string& path, const std::string& text);
// Runs a shell command, returns exit status and combined output.
int run(const std::string& cmd, std::string* output = nullptr);

}  // namespace kscope::test
