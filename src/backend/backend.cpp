#include "backend/backend.hpp"

#include "backend/cpu/cpu_backend.hpp"
#include "util/error.hpp"
#ifdef KSCOPE_HAVE_CUDA
#include "backend/cuda/cuda_backend.hpp"
#endif

namespace kscope {

void Backend::sample_rows(const float* logits, int64_t V, const std::vector<int64_t>& rows,
                          const std::vector<RowDraw>& draws, int32_t* tok, float* logit) {
  std::vector<float> row(host_memory() ? 0 : V);
  for (size_t i = 0; i < rows.size(); ++i) {
    const float* l = logits + rows[i] * V;
    if (!host_memory()) {
      download(row.data(), l, V * sizeof(float));
      l = row.data();
    }
    tok[i] = choose_with_draw(l, V, draws[i]);
    logit[i] = l[tok[i]];
  }
}

std::shared_ptr<Backend> make_backend(const std::string& name) {
  if (name == "cpu") return std::make_shared<CpuBackend>();
  if (name == "cpu-staged") return std::make_shared<CpuBackend>(ThreadPool::global(), true);
  if (name == "cuda" || name.rfind("cuda:", 0) == 0) {
    int dev = 0;
    if (name.size() > 5) {
      const std::string n = name.substr(5);
      KSCOPE_CHECK(!n.empty() && n.find_first_not_of("0123456789") == std::string::npos, input, "--device",
                   "'{}': expected cuda or cuda:N", name);
      dev = std::stoi(n);
    }
#ifdef KSCOPE_HAVE_CUDA
    return make_cuda_backend(dev);
#else
    (void)dev;
    fail(ErrorKind::unsupported, "--device", "this kscope was built without CUDA (nvcc was not found at build time)");
#endif
  }
  fail(ErrorKind::input, "--device", "unknown device '{}' (expected cpu, cuda or cuda:N)", name);
}

}  // namespace kscope
