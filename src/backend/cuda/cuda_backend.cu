#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>
#include <mutex>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>

#include "backend/cuda/cuda_backend.hpp"
#include "backend/cuda/kernels.cuh"
#include "util/error.hpp"
#include "util/numeric.hpp"
#include "util/thread_pool.hpp"

namespace kscope {

using cuda::bf16;
using cuda::DLin;

namespace {

#define CK(call)                                                                                   \
  do {                                                                                             \
    const cudaError_t e_ = (call);                                                                 \
    if (e_ != cudaSuccess) ::kscope::cuda_fail(e_, #call);                                         \
  } while (0)

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

[[noreturn]] void cuda_fail(cudaError_t e, const char* what) {
  cudaGetLastError();
  if (e == cudaErrorMemoryAllocation)
    fail(ErrorKind::resource, "cuda", "out of device memory ({})", what);
  fail(ErrorKind::internal, "cuda", "{} failed: {}", what, cudaGetErrorString(e));
}

// A sequence's cache on the device: bf16 latents and rope keys per layer, grown by doubling within the plan's
// KV budget.
struct CudaKv final : KvState {
  std::shared_ptr<CudaBackend::Impl> owner;
  int64_t C = 0, dr = 0;
  std::vector<bf16*> lat, rope;
  std::vector<int64_t> len, cap;
  size_t bytes() const override {
    size_t n = 0;
    for (auto c : cap) n += static_cast<size_t>(c) * (C + dr) * sizeof(bf16);
    return n;
  }
  ~CudaKv() override;
};

struct CudaBackend::Impl {
  int device = 0;
  cudaStream_t stream = nullptr;
  std::unordered_map<const Linear*, DLin> lin;
  std::unordered_set<const Linear*> fp32_input;  // routers: fp32 activations, as the reference computes them
  struct DMoe {
    DLin gate, up, down;
    bool shared = false;  // the shared expert is stacked as expert E (moe_includes_shared)
  };
  std::unordered_map<const MoeWeights*, DMoe> moe;
  struct DAttn { bf16* w_uk = nullptr; bf16* w_uvt = nullptr; };
  std::unordered_map<const AttentionWeights*, DAttn> attn;
  std::unordered_map<const TensorInfo*, void*> tensors;  // uploaded tensors (shared by tied embeddings)
  // The host bytes each entry above was made from: a descriptor at a reused address (a new object where a freed
  // one lived) is not mistaken for the one prepared.
  // Keyed by kind too: a struct and its first member share an address.
  enum Kind { kTensor, kLinear, kMoe, kAttn };
  std::map<std::pair<int, const void*>, const void*> source;
  bool current(Kind kind, const void* key, const void* data) const {
    auto it = source.find({kind, key});
    return it != source.end() && it->second == data;
  }
  std::unordered_map<const void*, float*> params;        // norm weights and biases by host address
  std::map<std::vector<float>, float*> inv_freqs;         // rope frequency tables by value
  std::vector<void*> owned;
  CudaPlan plan;
  uint64_t kv_bytes = 0;
  uint64_t kv_budget = UINT64_MAX;
  std::mutex mu;
  int sms = 0;  // multiprocessors (sizes the split of decode attention)
  bool invariant_attention = false;  // decode attention split per row by its own length (set_batch_invariant_attention)
  // Two staging sets (Backend::stage_swap): a pinned arena for asynchronous copies (captures, row-op vectors) and
  // the events recorded by mark(), both reused when their set is recycled. A mark's id carries its set.
  struct StageSet {
    std::vector<std::pair<uint8_t*, size_t>> arena;
    size_t arena_chunk = 0, arena_off = 0;
    std::vector<cudaEvent_t> marks;
    size_t mark_next = 0;
    // copy-stream mode (set_capture_copy_stream): device snapshots of the rows being copied out (one buffer of
    // kSnapBytes per set, part of the plan's reserve), and the events that order each copy after its snapshot
    uint8_t* snap = nullptr;
    size_t snap_off = 0;
    std::vector<cudaEvent_t> order;
    size_t order_next = 0;
    void recycle() {
      arena_chunk = arena_off = 0;
      mark_next = 0;
      snap_off = 0;
      order_next = 0;
    }
  };
  static constexpr size_t kSnapBytes = 64u << 20;
  cudaStream_t copy_stream = nullptr;  // captures' device-to-host copies, off the compute stream
  bool use_copy_stream = false;  // on from the constructor (set_capture_copy_stream)
  // An event of the current set, recorded on stream s (reused when the set is recycled).
  cudaEvent_t next_event(std::vector<cudaEvent_t>& pool, size_t& next, cudaStream_t s) {
    if (next == pool.size()) {
      cudaEvent_t e;
      CK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
      pool.push_back(e);
    }
    CK(cudaEventRecord(pool[next], s));
    return pool[next++];
  }
  StageSet sets[2];
  int cur = 0;
  // pinned staging for uploads
  static constexpr size_t kStage = 32u << 20;
  void* stage[2] = {nullptr, nullptr};
  cudaEvent_t stage_ev[2] = {nullptr, nullptr};
  int stage_next = 0;
  uint64_t load_total = 0, load_done = 0;
  std::function<void(uint64_t, uint64_t)>* progress = nullptr;

  ~Impl() {
    if (stream) cudaStreamSynchronize(stream);
    if (copy_stream) cudaStreamSynchronize(copy_stream);
    for (void* p : owned) cudaFree(p);
    for (auto& set : sets) {
      for (auto& c : set.arena) cudaFreeHost(c.first);
      for (auto e : set.marks) cudaEventDestroy(e);
      for (auto e : set.order) cudaEventDestroy(e);
    }
    if (copy_stream) cudaStreamDestroy(copy_stream);
    for (int i = 0; i < 2; ++i) {
      if (stage[i]) cudaFreeHost(stage[i]);
      if (stage_ev[i]) cudaEventDestroy(stage_ev[i]);
    }
    if (stream) {
      cuda::release_split_counters(stream);
      cudaStreamDestroy(stream);
    }
  }

  void* dmalloc(size_t bytes, const std::string& what) {
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, std::max<size_t>(bytes, 256));
    if (e != cudaSuccess) {
      cudaGetLastError();
      size_t fr = 0, tot = 0;
      cudaMemGetInfo(&fr, &tot);
      fail(ErrorKind::resource, "cuda", "out of device memory for {}: {} bytes wanted, {} free of {}", what, bytes, fr, tot);
    }
    owned.push_back(p);
    return p;
  }

  // Streams `bytes` produced by `fill(dst_host, offset, n)` to dst through two pinned buffers: the host fills one
  // while the other is in flight.
  template <class F>
  void stream_in(uint8_t* dst, size_t bytes, F&& fill_chunk) {
    for (int i = 0; i < 2; ++i)
      if (!stage[i]) {
        CK(cudaMallocHost(&stage[i], kStage));
        CK(cudaEventCreateWithFlags(&stage_ev[i], cudaEventDisableTiming));
      }
    for (size_t off = 0; off < bytes; off += kStage) {
      const size_t n = std::min(kStage, bytes - off);
      const int b = stage_next;
      stage_next ^= 1;
      CK(cudaEventSynchronize(stage_ev[b]));
      fill_chunk(static_cast<uint8_t*>(stage[b]), off, n);
      CK(cudaMemcpyAsync(dst + off, stage[b], n, cudaMemcpyHostToDevice, stream));
      CK(cudaEventRecord(stage_ev[b], stream));
      load_done += n;
      if (progress && *progress) (*progress)(load_done, load_total);
    }
  }

  // Raw bytes of a tensor.
  void put_raw(const TensorInfo& t, uint8_t* dst) {
    plan.load_bytes += t.nbytes;
    stream_in(dst, t.nbytes, [&](uint8_t* h, size_t off, size_t n) { std::memcpy(h, t.data + off, n); });
  }
  // A float tensor (F32/F16/BF16) converted to bf16 or f32 on the way. With bf16_exact: cleared when a value
  // (converted to f32) is not a bf16 value.
  template <class Out>
  void put_converted(const TensorInfo& t, Out* dst, bool* bf16_exact = nullptr) {
    const int64_t n_el = t.numel();
    plan.load_bytes += t.nbytes;
    stream_in(reinterpret_cast<uint8_t*>(dst), n_el * sizeof(Out), [&](uint8_t* h, size_t off, size_t n) {
      const int64_t e0 = off / sizeof(Out), ne = n / sizeof(Out);
      Out* o = reinterpret_cast<Out*>(h);
      for (int64_t i = 0; i < ne; ++i) {
        float f;
        const int64_t j = e0 + i;
        switch (t.dtype) {
          case DType::F32: std::memcpy(&f, t.data + 4 * j, 4); break;
          case DType::BF16: { uint16_t v; std::memcpy(&v, t.data + 2 * j, 2); f = bf16_to_f32(v); break; }
          case DType::F16: { uint16_t v; std::memcpy(&v, t.data + 2 * j, 2); f = f16_to_f32(v); break; }
          default: fail(ErrorKind::weights, t.file + ": tensor '" + t.name + "'", "expected a float dtype");
        }
        if constexpr (std::is_same_v<Out, float>) o[i] = f;
        else { const uint16_t b = f32_to_bf16(f); std::memcpy(o + i, &b, 2); }
        if (bf16_exact && *bf16_exact) {
          uint32_t u;
          std::memcpy(&u, &f, 4);
          if (u & 0xffffu) *bf16_exact = false;
        }
      }
    });
  }

  static size_t weight_bytes(const Linear& l) {
    switch (l.format) {
      case WeightFormat::fp8_block: return static_cast<size_t>(l.out) * l.in;
      case WeightFormat::int4_group: return static_cast<size_t>(l.out) * cdiv(l.in, 8) * 4;
      default: return static_cast<size_t>(l.out) * l.in * 2;
    }
  }
  static size_t scale_count(const Linear& l) {
    switch (l.format) {
      case WeightFormat::fp8_block: return cdiv(l.out, l.block_out) * cdiv(l.in, l.block_in);
      case WeightFormat::int4_group: return l.out * cdiv(l.in, l.group);
      default: return 0;
    }
  }
  static DLin describe(const Linear& l) {
    DLin d;
    d.N = static_cast<int>(l.out);
    d.K = static_cast<int>(l.in);
    switch (l.format) {
      case WeightFormat::fp8_block:
        d.fmt = cuda::kFp8;
        d.bo = l.block_out;
        d.bi = l.block_in;
        d.s_cols = static_cast<int>(cdiv(l.in, l.block_in));
        d.w_ld = l.in;
        break;
      case WeightFormat::int4_group:
        d.fmt = cuda::kInt4;
        d.g = l.group;
        d.s_cols = static_cast<int>(cdiv(l.in, l.group));
        d.w_ld = cdiv(l.in, 8) * 4;
        break;
      default:
        d.fmt = cuda::kBf16;
        d.w_ld = l.in * 2;
    }
    return d;
  }
  // INT4 scales stay bf16 on the device when the checkpoint ships them so (compressed-tensors does): the matmuls
  // read half the scale bytes of fp32 (INT4 weight + scale bytes 1.25 -> 1.125 per weight byte), the real model's
  // scales take half the memory, and they load as raw bytes. Every other scale is fp32.
  static bool bf16_scales(const Linear& l) {
    return l.format == WeightFormat::int4_group && l.scale && l.scale->dtype == DType::BF16;
  }
  // Uploads linear l into w and its scales into s (fp32) or s16 (bf16) at the given offsets.
  void put_linear(const Linear& l, uint8_t* w, float* s, uint16_t* s16) {
    if (l.format == WeightFormat::dense) {
      if (l.weight->dtype == DType::BF16) put_raw(*l.weight, w);
      else put_converted<uint16_t>(*l.weight, reinterpret_cast<uint16_t*>(w));
      return;
    }
    put_raw(*l.weight, w);
    if (!s16) {
      put_converted<float>(*l.scale, s);
      return;
    }
    KSCOPE_CHECK(static_cast<size_t>(l.scale->numel()) == scale_count(l), weights, l.scale->file + ": tensor '" + l.scale->name + "'",
                 "{} scales for a [{}, {}] INT4 matrix in groups of {} (expected {})", l.scale->numel(), l.out, l.in, l.group,
                 scale_count(l));
    if (l.scale->dtype == DType::BF16) {
      put_raw(*l.scale, reinterpret_cast<uint8_t*>(s16));
    } else {  // an expert whose scales came in another dtype, stacked with bf16 ones: exact bf16 values only
      bool exact = true;
      put_converted<uint16_t>(*l.scale, s16, &exact);
      KSCOPE_CHECK(exact, weights, l.scale->file + ": tensor '" + l.scale->name + "'",
                   "{} scales beside experts with bf16 scales hold values bf16 cannot represent", dtype_name(l.scale->dtype));
    }
  }
  // Device memory for n linears' scales in their storage (nullptr for bf16 weights).
  void alloc_scales(const Linear& l, int64_t n, const std::string& name, float** s, uint16_t** s16) {
    *s = nullptr;
    *s16 = nullptr;
    if (l.format == WeightFormat::dense) return;
    if (bf16_scales(l)) *s16 = static_cast<uint16_t*>(dmalloc(scale_count(l) * n * 2, name));
    else *s = static_cast<float*>(dmalloc(scale_count(l) * n * 4, name));
  }

  const float* param(const std::vector<float>& v) {
    auto it = params.find(v.data());
    if (it != params.end()) return it->second;
    return nullptr;
  }
};

CudaKv::~CudaKv() {
  for (size_t l = 0; l < lat.size(); ++l) {
    if (lat[l]) cudaFreeAsync(lat[l], owner->stream);
    if (rope[l]) cudaFreeAsync(rope[l], owner->stream);
  }
  std::lock_guard<std::mutex> g(owner->mu);
  owner->kv_bytes -= bytes();
}

CudaBackend::CudaBackend(int device) : impl_(std::make_shared<Impl>()) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    cudaGetLastError();
    fail(ErrorKind::unsupported, "cuda", "no CUDA device is visible to this process");
  }
  KSCOPE_CHECK(device >= 0 && device < n, input, "cuda", "device {} does not exist ({} visible)", device, n);
  impl_->device = device;
  CK(cudaSetDevice(device));
  CK(cudaStreamCreateWithFlags(&impl_->stream, cudaStreamNonBlocking));
  CK(cudaStreamCreateWithFlags(&impl_->copy_stream, cudaStreamNonBlocking));
  impl_->use_copy_stream = true;
  // keep freed workspace in the stream-ordered pool instead of returning it to the driver every step
  cudaMemPool_t pool;
  CK(cudaDeviceGetDefaultMemPool(&pool, device));
  uint64_t threshold = UINT64_MAX;
  CK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
  cudaDeviceProp p{};
  CK(cudaGetDeviceProperties(&p, device));
  impl_->plan.device = p.name;
  impl_->plan.total_bytes = p.totalGlobalMem;
}

CudaBackend::~CudaBackend() = default;

const CudaPlan& CudaBackend::plan() const { return impl_->plan; }
int64_t CudaBackend::max_pass_tokens() const { return impl_->plan.max_batch_tokens; }
uint64_t CudaBackend::kv_bytes() const { return impl_->kv_bytes; }
void CudaBackend::force_simple_gemm(bool on) { cuda::set_simple_gemm(on); }
void CudaBackend::force_few_rows(bool on) { cuda::set_few_rows(on); }
void CudaBackend::set_few_by_rows(bool on) { cuda::set_few_by_rows(on); }
void CudaBackend::set_few_piece(int rows) { cuda::set_few_piece(rows); }
void CudaBackend::set_few_late(bool on) { cuda::set_few_late(on); }
void CudaBackend::set_route_block(bool on) { cuda::set_route_block(on); }
void CudaBackend::set_few_wide(int classes) { cuda::set_few_wide(classes); }
int CudaBackend::few_wide() { return cuda::few_wide(); }
size_t CudaBackend::split_counter_streams() { return cuda::split_counter_streams(); }
void CudaBackend::set_tile_rows(int dense_rows, double group_rows) { cuda::set_tile_rows(dense_rows, group_rows); }
void CudaBackend::set_wg_gemm(bool on, int rows) { cuda::set_wg_gemm(on, rows); }
void CudaBackend::set_f32_tile(bool on) { cuda::set_f32_tile(on); }
void CudaBackend::set_batch_invariant_attention(bool on) { impl_->invariant_attention = on; }
void CudaBackend::force_simple_attention(bool on) { cuda::set_simple_attention(on); }
void CudaBackend::force_mla_mma_sync(bool on) { cuda::set_mla_mma_sync(on); }
void CudaBackend::set_flash_wg(bool on) { cuda::set_flash_wg(on); }
void CudaBackend::set_pdl(bool on) { cuda::set_pdl(on); }
void CudaBackend::set_mla_tma(bool on) { cuda::set_mla_tma(on); }
int64_t CudaBackend::mla_tma_launches() { return cuda::mla_tma_launches(); }
void CudaBackend::set_mla_specialized(int mode) { cuda::set_mla_specialized(mode); }
int64_t CudaBackend::mla_specialized_launches() { return cuda::mla_specialized_launches(); }
void CudaBackend::set_kv_budget(uint64_t bytes) {
  std::lock_guard<std::mutex> g(impl_->mu);
  impl_->kv_budget = bytes;
}
void CudaBackend::synchronize() { CK(cudaStreamSynchronize(impl_->stream)); }

void CudaBackend::prepare_embed(const TensorInfo& t) {
  Impl& m = *impl_;
  if (m.current(Impl::kTensor, &t, t.data)) return;
  KSCOPE_CHECK(t.shape.size() == 2, weights, t.name, "embedding must be 2-D");
  auto* d = static_cast<uint16_t*>(m.dmalloc(t.numel() * 2, t.name));
  if (t.dtype == DType::BF16) m.put_raw(t, reinterpret_cast<uint8_t*>(d));
  else m.put_converted<uint16_t>(t, d);
  m.tensors[&t] = d;
  m.source[{Impl::kTensor, &t}] = t.data;
}

void CudaBackend::prepare_linear(const Linear& l) {
  Impl& m = *impl_;
  if (m.current(Impl::kLinear, &l, l.weight->data)) return;
  DLin d = Impl::describe(l);
  auto it = m.tensors.find(l.weight);  // tied lm_head: the embedding is already there
  if (it != m.tensors.end() && m.current(Impl::kTensor, l.weight, l.weight->data) && l.format == WeightFormat::dense) {
    d.w = static_cast<const uint8_t*>(it->second);
  } else {
    auto* w = static_cast<uint8_t*>(m.dmalloc(Impl::weight_bytes(l), l.name));
    float* s;
    uint16_t* s16;
    m.alloc_scales(l, 1, l.name + " scales", &s, &s16);
    m.put_linear(l, w, s, s16);
    d.w = w;
    d.s = s;
    d.s16 = s16;
    m.tensors[l.weight] = w;
    m.source[{Impl::kTensor, l.weight}] = l.weight->data;
  }
  m.lin[&l] = d;
  m.source[{Impl::kLinear, &l}] = l.weight->data;
}

void CudaBackend::prepare_moe(const MoeWeights& mw) {
  Impl& m = *impl_;
  KSCOPE_CHECK(!mw.experts.empty() && mw.router.weight, weights, mw.router.name, "MoE layer without experts");
  if (m.current(Impl::kMoe, &mw, mw.experts[0].gate.weight->data)) return;
  KSCOPE_CHECK(!mw.experts.empty(), weights, mw.router.name, "MoE layer without experts");
  const int64_t E = static_cast<int64_t>(mw.experts.size());
  // A shared expert of the routed experts' format and shape is stacked after them as expert E, so the expert
  // launches run it too (one more row group; its output added after the routed sum, as the reference adds it).
  // Checkpoints that keep it in another format (INT4 ones leave it bf16) run it through mlp().
  auto same = [](const Linear& a, const Linear& b) {
    return a.format == b.format && a.out == b.out && a.in == b.in && a.block_out == b.block_out &&
           a.block_in == b.block_in && a.group == b.group;
  };
  const MlpWeights& x0 = mw.experts[0];
  const bool fuse = mw.shared && same(mw.shared->gate, x0.gate) && same(mw.shared->up, x0.up) && same(mw.shared->down, x0.down);
  const int64_t S = E + (fuse ? 1 : 0);
  auto stack = [&](auto get) {
    const Linear& l0 = get(mw.experts[0]);
    DLin d = Impl::describe(l0);
    const size_t wb = Impl::weight_bytes(l0), sc = Impl::scale_count(l0);
    auto* w = static_cast<uint8_t*>(m.dmalloc(wb * S, l0.name + " (all experts)"));
    float* s;
    uint16_t* s16;
    m.alloc_scales(l0, S, l0.name + " scales (all experts)", &s, &s16);
    for (int64_t e = 0; e < S; ++e) {
      const Linear& l = get(e < E ? mw.experts[e] : *mw.shared);
      KSCOPE_CHECK(same(l, l0), weights, l.name, "experts of one layer must share format and shape ({} vs {})", format_name(l.format),
                   format_name(l0.format));
      m.put_linear(l, w + e * wb, s ? s + e * sc : nullptr, s16 ? s16 + e * sc : nullptr);
    }
    d.w = w;
    d.s = s;
    d.s16 = s16;
    d.w_stride = static_cast<int64_t>(wb);
    d.s_stride = static_cast<int64_t>(sc);
    return d;
  };
  Impl::DMoe dm;
  dm.gate = stack([](const MlpWeights& x) -> const Linear& { return x.gate; });
  dm.up = stack([](const MlpWeights& x) -> const Linear& { return x.up; });
  dm.down = stack([](const MlpWeights& x) -> const Linear& { return x.down; });
  dm.shared = fuse;
  m.moe[&mw] = dm;
  m.source[{Impl::kMoe, &mw}] = mw.experts[0].gate.weight->data;
  prepare_linear(mw.router);
  m.fp32_input.insert(&mw.router);
  if (!mw.score_bias.empty()) {
    auto* b = static_cast<float*>(m.dmalloc(mw.score_bias.size() * 4, mw.router.name + " bias"));
    CK(cudaMemcpy(b, mw.score_bias.data(), mw.score_bias.size() * 4, cudaMemcpyHostToDevice));
    m.params[mw.score_bias.data()] = b;
  }
  if (mw.shared && !fuse) {
    prepare_linear(mw.shared->gate);
    prepare_linear(mw.shared->up);
    prepare_linear(mw.shared->down);
  }
}

void CudaBackend::prepare_attention(const ModelConfig& cfg, const AttentionWeights& a) {
  Impl& m = *impl_;
  if (m.current(Impl::kAttn, &a, a.kv_b_proj.weight->data)) return;
  for (const Linear* l : {a.q_proj ? &*a.q_proj : nullptr, a.q_a_proj ? &*a.q_a_proj : nullptr,
                          a.q_b_proj ? &*a.q_b_proj : nullptr, &a.kv_a_proj, &a.kv_b_proj, &a.o_proj})
    if (l) prepare_linear(*l);
  for (const std::vector<float>* v : {&a.q_a_norm, &a.kv_a_norm})
    if (!v->empty() && !m.params.count(v->data())) {
      auto* d = static_cast<float*>(m.dmalloc(v->size() * 4, "norm"));
      CK(cudaMemcpy(d, v->data(), v->size() * 4, cudaMemcpyHostToDevice));
      m.params[v->data()] = d;
    }
  // The absorbed decode form needs kv_b_proj split per head and laid out for the two contractions:
  // W_UK [heads, nope, C] and W_UVᵀ [heads, C, v] in bf16 (the same rounding the matmul applies).
  const int64_t nh = cfg.num_attention_heads, dn = cfg.qk_nope_head_dim, dv = cfg.v_head_dim, C = cfg.kv_lora_rank;
  const int64_t dkv = dn + dv;
  std::vector<uint16_t> uk(nh * dn * C), uvt(nh * C * dv);
  ThreadPool::global().parallel_for(nh, 1, [&](int64_t b, int64_t e) {
    std::vector<float> row(C);
    for (int64_t h = b; h < e; ++h) {
      for (int64_t d = 0; d < dn; ++d) {
        a.kv_b_proj.dequant_row(h * dkv + d, row.data());
        for (int64_t c = 0; c < C; ++c) uk[(h * dn + d) * C + c] = f32_to_bf16(row[c]);
      }
      for (int64_t d = 0; d < dv; ++d) {
        a.kv_b_proj.dequant_row(h * dkv + dn + d, row.data());
        for (int64_t c = 0; c < C; ++c) uvt[(h * C + c) * dv + d] = f32_to_bf16(row[c]);
      }
    }
  });
  Impl::DAttn da;
  da.w_uk = static_cast<bf16*>(m.dmalloc(uk.size() * 2, a.kv_b_proj.name + " W_UK"));
  da.w_uvt = static_cast<bf16*>(m.dmalloc(uvt.size() * 2, a.kv_b_proj.name + " W_UV"));
  CK(cudaMemcpy(da.w_uk, uk.data(), uk.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(da.w_uvt, uvt.data(), uvt.size() * 2, cudaMemcpyHostToDevice));
  m.attn[&a] = da;
  m.source[{Impl::kAttn, &a}] = a.kv_b_proj.weight->data;
}

void CudaBackend::prepare(const ModelConfig& cfg, const ModelWeights& w) {
  Impl& m = *impl_;
  const auto t0 = std::chrono::steady_clock::now();
  size_t free0 = 0, total = 0;
  CK(cudaMemGetInfo(&free0, &total));
  // progress denominator: every tensor the model runs
  m.load_total = w.embed->nbytes;
  for (const auto& l : w.layers) {
    auto add_lin = [&](const Linear& x) { m.load_total += x.bytes(); };
    for (const Linear* x : {l.attn.q_proj ? &*l.attn.q_proj : nullptr, l.attn.q_a_proj ? &*l.attn.q_a_proj : nullptr,
                            l.attn.q_b_proj ? &*l.attn.q_b_proj : nullptr, &l.attn.kv_a_proj, &l.attn.kv_b_proj,
                            &l.attn.o_proj})
      if (x) add_lin(*x);
    if (l.mlp) { add_lin(l.mlp->gate); add_lin(l.mlp->up); add_lin(l.mlp->down); }
    if (l.moe) {
      add_lin(l.moe->router);
      for (const auto& e : l.moe->experts) { add_lin(e.gate); add_lin(e.up); add_lin(e.down); }
      if (l.moe->shared) { add_lin(l.moe->shared->gate); add_lin(l.moe->shared->up); add_lin(l.moe->shared->down); }
    }
  }
  if (w.lm_head.weight != w.embed) m.load_total += w.lm_head.bytes();
  m.load_done = 0;
  m.progress = &on_load_progress;
  m.plan.load_bytes = 0;

  prepare_embed(*w.embed);
  auto put_param = [&](const std::vector<float>& v) {
    if (v.empty() || m.params.count(v.data())) return;
    auto* d = static_cast<float*>(m.dmalloc(v.size() * 4, "norm"));
    CK(cudaMemcpy(d, v.data(), v.size() * 4, cudaMemcpyHostToDevice));
    m.params[v.data()] = d;
  };
  for (const auto& l : w.layers) {
    put_param(l.input_norm);
    put_param(l.post_attention_norm);
    prepare_attention(cfg, l.attn);
    if (l.mlp) { prepare_linear(l.mlp->gate); prepare_linear(l.mlp->up); prepare_linear(l.mlp->down); }
    if (l.moe) prepare_moe(*l.moe);
  }
  put_param(w.final_norm);
  prepare_linear(w.lm_head);
  CK(cudaStreamSynchronize(m.stream));
  m.progress = nullptr;
  const auto t1 = std::chrono::steady_clock::now();

  // Memory plan: what is left after the weights is split between a workspace for one forward pass and the KV
  // cache. Workspace per token (bytes) of the largest live set of one layer (the MoE block: gate/up fp32,
  // activations bf16 and the many-row matmul's permuted copy of them, expert outputs fp32 for every routed slot),
  // plus residual buffers.
  size_t free1 = 0;
  CK(cudaMemGetInfo(&free1, &total));
  CudaPlan& p = m.plan;
  p.total_bytes = total;
  p.weight_bytes = free0 > free1 ? free0 - free1 : 0;
  p.free_after_load = free1;
  p.load_seconds = std::chrono::duration<double>(t1 - t0).count();
  // (routed slots per token: top-k, plus the shared expert where it is stacked with the routed ones)
  const int64_t H = cfg.hidden_size, K = std::max<int64_t>(1, cfg.num_experts_per_tok) + std::max<int64_t>(0, cfg.n_shared_experts);
  const int64_t I = std::max(cfg.intermediate_size, cfg.moe_intermediate_size * std::max<int64_t>(1, cfg.n_shared_experts));
  const int64_t nh = cfg.num_attention_heads;
  const uint64_t per_token = 4 * (4 * H + nh * (cfg.qk_head_dim() + cfg.v_head_dim) + cfg.kv_lora_rank * 2 +
                                  std::max<int64_t>(1, cfg.n_routed_experts) + cfg.vocab_size) +
                             K * (2 * 2 * H + 4 * 2 * cfg.moe_intermediate_size + 2 * cfg.moe_intermediate_size + 4 * H) +
                             K * (2 * 4 + 25) +  // the slots' permutation; the row-tile lists (3 x 8 B x 1 + 1/32 tiles per slot)
                             4 * 3 * I + 2 * H;  // (2 H: the norms' bf16 copy of the matmul input)
  p.kv_bytes_per_token = static_cast<uint64_t>(cfg.num_hidden_layers) * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2;
  // CUDA context growth, fragmentation, the two capture snapshot buffers
  const uint64_t reserve = (512ull << 20) + 2 * Impl::kSnapBytes;
  const uint64_t usable = free1 > reserve ? free1 - reserve : 0;
  p.workspace_bytes = std::min<uint64_t>(usable / 4, std::max<uint64_t>(per_token * 16384, 1ull << 30));
  p.workspace_bytes = std::min(p.workspace_bytes, usable);
  p.max_batch_tokens = static_cast<int64_t>(p.workspace_bytes / std::max<uint64_t>(per_token, 1));
  p.kv_budget_bytes = usable - p.workspace_bytes;
  p.kv_capacity_tokens = static_cast<int64_t>(p.kv_budget_bytes / std::max<uint64_t>(p.kv_bytes_per_token, 1));
  m.kv_budget = p.kv_budget_bytes;
}

void* CudaBackend::alloc(size_t bytes) {
  void* p = nullptr;
  const cudaError_t e = cudaMallocAsync(&p, std::max<size_t>(bytes, 16), impl_->stream);
  if (e != cudaSuccess) {
    cudaGetLastError();
    fail(ErrorKind::resource, "cuda", "out of device memory for a {}-byte workspace buffer (batch too large for the "
                                      "memory left after weights and KV cache)", bytes);
  }
  return p;
}
void CudaBackend::release(void* p) { cudaFreeAsync(p, impl_->stream); }
void CudaBackend::upload(void* dst, const void* host, size_t bytes) {
  CK(cudaMemcpyAsync(dst, host, bytes, cudaMemcpyHostToDevice, impl_->stream));
}
void CudaBackend::download(void* host, const void* src, size_t bytes) {
  CK(cudaMemcpyAsync(host, src, bytes, cudaMemcpyDeviceToHost, impl_->stream));
  CK(cudaStreamSynchronize(impl_->stream));
}
void CudaBackend::fill(float* p, float value, int64_t n) { cuda::fill(p, value, n, impl_->stream); }

// ---- KV cache

std::unique_ptr<KvState> CudaBackend::new_kv(const ModelConfig& cfg) {
  auto kv = std::make_unique<CudaKv>();
  kv->owner = impl_;  // a cache keeps the device state it lives in alive
  kv->C = cfg.kv_lora_rank;
  kv->dr = cfg.qk_rope_head_dim;
  kv->lat.assign(cfg.num_hidden_layers, nullptr);
  kv->rope.assign(cfg.num_hidden_layers, nullptr);
  kv->len.assign(cfg.num_hidden_layers, 0);
  kv->cap.assign(cfg.num_hidden_layers, 0);
  return kv;
}

// Grows one layer of a sequence's cache to `cap` tokens within the KV budget.
void CudaBackend::grow_kv(KvState& state, int64_t layer, int64_t cap) {
  auto& kv = static_cast<CudaKv&>(state);
  Impl& m = *impl_;
  const int64_t C = kv.C, dr = kv.dr;
  if (cap <= kv.cap[layer]) return;
  const uint64_t grow = static_cast<uint64_t>(cap - kv.cap[layer]) * (C + dr) * 2;
  {
    std::lock_guard<std::mutex> g(m.mu);
    if (m.kv_bytes + grow > m.kv_budget)
      fail(ErrorKind::resource, "KV cache",
           "full: {} tokens more would exceed the budget of {} bytes ({} tokens across all sequences); "
           "lower the batch or the context",
           cap - kv.cap[layer], m.kv_budget, m.plan.kv_capacity_tokens);
    m.kv_bytes += grow;
  }
  bf16 *nl = nullptr, *nr = nullptr;
  if (cudaMallocAsync(reinterpret_cast<void**>(&nl), cap * C * 2, m.stream) != cudaSuccess ||
      cudaMallocAsync(reinterpret_cast<void**>(&nr), cap * dr * 2, m.stream) != cudaSuccess) {
    cudaGetLastError();
    if (nl) cudaFreeAsync(nl, m.stream);
    std::lock_guard<std::mutex> g(m.mu);
    m.kv_bytes -= grow;
    fail(ErrorKind::resource, "KV cache", "out of device memory growing a sequence to {} tokens", cap);
  }
  if (kv.len[layer] > 0) {
    CK(cudaMemcpyAsync(nl, kv.lat[layer], kv.len[layer] * C * 2, cudaMemcpyDeviceToDevice, m.stream));
    CK(cudaMemcpyAsync(nr, kv.rope[layer], kv.len[layer] * dr * 2, cudaMemcpyDeviceToDevice, m.stream));
  }
  if (kv.lat[layer]) cudaFreeAsync(kv.lat[layer], m.stream);
  if (kv.rope[layer]) cudaFreeAsync(kv.rope[layer], m.stream);
  kv.lat[layer] = nl;
  kv.rope[layer] = nr;
  kv.cap[layer] = cap;
}

int64_t CudaBackend::kv_free_tokens(const ModelConfig& cfg) const {
  const uint64_t per = static_cast<uint64_t>(cfg.num_hidden_layers) * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2;
  std::lock_guard<std::mutex> g(impl_->mu);
  if (impl_->kv_budget == UINT64_MAX) return INT64_MAX;
  return impl_->kv_bytes >= impl_->kv_budget ? 0 : static_cast<int64_t>((impl_->kv_budget - impl_->kv_bytes) / per);
}

void CudaBackend::kv_reserve(KvState& state, int64_t tokens) {
  auto* kv = dynamic_cast<CudaKv*>(&state);
  KSCOPE_CHECK(kv && kv->owner.get() == impl_.get(), input, "cuda", "KV cache from another backend or model");
  for (size_t l = 0; l < kv->cap.size(); ++l) grow_kv(*kv, static_cast<int64_t>(l), tokens);
}

void CudaBackend::kv_append(KvState& state, int64_t layer, const float* latent, const float* ckv, int64_t row0,
                            int64_t n, int64_t C, int64_t dr) {
  auto* kv = dynamic_cast<CudaKv*>(&state);
  KSCOPE_CHECK(kv && kv->owner.get() == impl_.get() && layer < static_cast<int64_t>(kv->lat.size()) && kv->C == C &&
                   kv->dr == dr,
               input, "cuda", "KV cache from another backend or model");
  Impl& m = *impl_;
  if (kv->len[layer] + n > kv->cap[layer])
    grow_kv(*kv, layer, std::max<int64_t>({16, 2 * kv->cap[layer], kv->len[layer] + n}));
  cuda::kv_append(latent, ckv, row0, n, C, dr, kv->lat[layer] + kv->len[layer] * C, kv->rope[layer] + kv->len[layer] * dr,
                  m.stream);
  kv->len[layer] += n;
}

// ---- ops

void CudaBackend::embed(const TensorInfo& table, const int32_t* ids, int64_t n, float* out) {
  auto it = impl_->tensors.find(&table);
  KSCOPE_CHECK(it != impl_->tensors.end() && impl_->current(Impl::kTensor, &table, table.data), internal, "cuda", "embedding '{}' was not prepared", table.name);
  cuda::embed(static_cast<const bf16*>(it->second), table.shape[0], table.shape[1], ids, n, out, impl_->stream);
}

void CudaBackend::rmsnorm(const float* x, const std::vector<float>& w, int64_t n, int64_t d, float eps, float* out,
                          int64_t ld) {
  rmsnorm_bf16(x, w, n, d, eps, out, nullptr, ld);
}

// A norm's weights on the device: the model's registered copy, or (a vector the model did not register: tests) one
// uploaded into tmp for this call.
const float* CudaBackend::norm_weights(const std::vector<float>& w, Buf<float>& tmp) {
  if (const float* dw = impl_->param(w)) return dw;
  tmp = Buf<float>(*this, w);
  return tmp.data();
}

void CudaBackend::rmsnorm_bf16(const float* x, const std::vector<float>& w, int64_t n, int64_t d, float eps, float* out,
                               uint16_t* out_bf16, int64_t ld) {
  if (ld == 0) ld = d;
  Buf<float> tmp;
  const float* dw = norm_weights(w, tmp);
  cuda::rmsnorm(x, ld, dw, n, d, eps, out, reinterpret_cast<bf16*>(out_bf16), impl_->stream);
}

void CudaBackend::add_rmsnorm_bf16(float* h, const float* y, const std::vector<float>& w, int64_t n, int64_t d,
                                   float eps, float* out, uint16_t* out_bf16) {
  KSCOPE_CHECK(out != h, internal, "add_rmsnorm", "the norm's output may not alias the residual it adds into");
  Buf<float> tmp;
  const float* dw = norm_weights(w, tmp);
  cuda::add_rmsnorm(h, y, dw, n, d, eps, out, reinterpret_cast<bf16*>(out_bf16), impl_->stream);
}

// A matmul's bf16 input: the caller's copy (a norm wrote it beside its fp32 output, the same bits as converting),
// else count floats of x converted into hold
static const bf16* bf16_input(Backend& be, const float* x, const uint16_t* x_bf16, int64_t count, Buf<bf16>& hold,
                              cudaStream_t s) {
  if (x_bf16) return reinterpret_cast<const bf16*>(x_bf16);
  hold = Buf<bf16>(be, count);
  cuda::f32_to_bf16(x, hold.data(), count, s);
  return hold.data();
}

void CudaBackend::linear(const Linear& w, const float* x, int64_t n, float* y) { linear_bf16(w, x, nullptr, n, y); }

void CudaBackend::linear_bf16(const Linear& w, const float* x, const uint16_t* x_bf16, int64_t n, float* y) {
  auto it = impl_->lin.find(&w);
  KSCOPE_CHECK(it != impl_->lin.end() && impl_->current(Impl::kLinear, &w, w.weight->data), internal, "cuda", "linear '{}' was not prepared", w.name);
  if (impl_->fp32_input.count(&w)) {
    cuda::gemm_f32(x, static_cast<int>(n), y, it->second, impl_->stream);
    return;
  }
  Buf<bf16> xb;
  const bf16* xin = bf16_input(*this, x, x_bf16, n * w.in, xb, impl_->stream);
  KSCOPE_CHECK(cdiv(n, cuda::kBM) <= 65535, resource, "cuda", "{} rows in one matmul exceed the grid limit", n);
  cuda::gemm(xin, static_cast<int>(n), y, it->second, {}, static_cast<int>(cdiv(n, cuda::kBM)), impl_->stream);
}

void CudaBackend::rope(float* x, int64_t n, int64_t n_heads, int64_t row_stride, int64_t head_stride, int64_t offset,
                       int64_t dim, const int64_t* pos, const std::vector<double>& inv_freq, double attn_factor,
                       bool interleaved) {
  KSCOPE_CHECK(dim % 2 == 0 && dim <= 512 && static_cast<int64_t>(inv_freq.size()) >= dim / 2, input, "rope",
               "rope dimension {} unsupported", dim);
  Impl& m = *impl_;
  std::vector<float> key(inv_freq.begin(), inv_freq.begin() + dim / 2);
  float*& f = m.inv_freqs[key];
  if (!f) {
    f = static_cast<float*>(m.dmalloc(key.size() * 4, "rope frequencies"));
    CK(cudaMemcpy(f, key.data(), key.size() * 4, cudaMemcpyHostToDevice));
  }
  cuda::rope(x, n, n_heads, row_stride, head_stride, offset, dim, pos, f, static_cast<float>(attn_factor), interleaved,
             m.stream);
}

void CudaBackend::mla_attention(const ModelConfig& cfg, const AttentionWeights& w, const float* q,
                                const std::vector<AttnSeq>& seqs, float scale, float* out) {
  Impl& m = *impl_;
  cuda::AttnDims d;
  d.nh = static_cast<int>(cfg.num_attention_heads);
  d.dn = static_cast<int>(cfg.qk_nope_head_dim);
  d.dr = static_cast<int>(cfg.qk_rope_head_dim);
  d.dv = static_cast<int>(cfg.v_head_dim);
  d.C = static_cast<int>(cfg.kv_lora_rank);
  d.scale = scale;
  KSCOPE_CHECK(d.dr <= 128 && d.dn <= 256 && d.dv <= 256 && d.C <= 1024, unsupported, "cuda",
               "MLA dimensions beyond the kernels' limits (rope 128, nope/v 256, kv_lora 1024)");
  auto lit = m.lin.find(&w.kv_b_proj);
  auto ait = m.attn.find(&w);
  KSCOPE_CHECK(lit != m.lin.end() && ait != m.attn.end() && m.current(Impl::kAttn, &w, w.kv_b_proj.weight->data), internal, "cuda", "attention weights were not prepared");
  std::vector<cuda::AttnRow> exp_rows, abs_rows;
  std::vector<Buf<float>> kvx;  // expanded keys/values per sequence, alive until the kernel has run
  for (const AttnSeq& s : seqs) {
    auto* kv = dynamic_cast<CudaKv*>(s.kv);
    KSCOPE_CHECK(kv && kv->owner.get() == impl_.get(), input, "cuda", "KV cache from another backend or model");
    const int64_t T = s.past + s.n_new;
    KSCOPE_CHECK(kv->len[s.layer] == T, internal, "cuda", "KV cache length mismatch");
    const float* kvx_p = nullptr;
    if (!s.absorbed) {
      kvx.emplace_back(*this, T * cfg.num_attention_heads * (d.dn + d.dv));
      cuda::gemm(kv->lat[s.layer], static_cast<int>(T), kvx.back().data(), lit->second, {}, static_cast<int>(cdiv(T, cuda::kBM)),
                 m.stream);
      kvx_p = kvx.back().data();
      if (cuda::flash_wg_ok(d)) cuda::kvx_to_bf16(kvx.back().data(), T * cfg.num_attention_heads, m.stream);
    }
    for (int64_t i = 0; i < s.n_new; ++i) {
      cuda::AttnRow r{kv->lat[s.layer], kv->rope[s.layer], kvx_p, static_cast<int>(s.past + i + 1),
                      static_cast<int>(s.row0 + i)};
      (s.absorbed ? abs_rows : exp_rows).push_back(r);
    }
  }
  const bool invariant = m.invariant_attention && cuda::mla_fast_path(d) && !cuda::simple_attention();
  int row_splits = 1;  // batch-invariant splits: the most any row takes
  if (invariant)
    for (auto& x : abs_rows) {
      x.chunk = cuda::mla_row_chunk(x.len);
      row_splits = std::max(row_splits, static_cast<int>(cdiv(x.len, x.chunk)));
    }
  auto run = [&](std::vector<cuda::AttnRow>& rows, bool absorbed) {
    if (rows.empty()) return;
    // expanded rows on tensor cores: tiles of consecutive rows of one sequence, uploaded after the rows
    std::vector<cuda::AttnTile> tiles;
    if (!absorbed && cuda::flash_expanded_ok(d))
      for (int i = 0, tile_rows = cuda::flash_tile_rows(d); i < static_cast<int>(rows.size()); ++i) {
        if (tiles.empty() || tiles.back().count == tile_rows || rows[i].kvx != rows[i - 1].kvx ||
            rows[i].k_rope != rows[i - 1].k_rope)
          tiles.push_back({i, 0});
        ++tiles.back().count;
      }
    const size_t rbytes = rows.size() * sizeof(cuda::AttnRow), tbytes = tiles.size() * sizeof(cuda::AttnTile);
    // decode attention's tensor maps (two per row), 128-byte aligned after the rows
    struct alignas(128) MapBytes {
      unsigned char b[cuda::kMlaMapBytes];
    };
    std::vector<MapBytes> maps(absorbed ? 2 * rows.size() : 0);
    const bool tma = absorbed && cuda::mla_tma_maps(d, rows.data(), static_cast<int>(rows.size()), maps.data());
    const size_t moff = (rbytes + tbytes + 127) / 128 * 128, mbytes = tma ? maps.size() * sizeof(MapBytes) : 0;
    Buf<uint8_t> dev(*this, static_cast<int64_t>(moff + mbytes));
    {  // one copy on the stream, not three (each is a node the kernels after it wait for)
      std::vector<uint8_t> packed(moff + mbytes);
      std::memcpy(packed.data(), rows.data(), rbytes);
      if (tbytes) std::memcpy(packed.data() + rbytes, tiles.data(), tbytes);
      if (mbytes) std::memcpy(packed.data() + moff, maps.data(), mbytes);
      upload(dev.data(), packed.data(), packed.size());
    }
    const auto* r = reinterpret_cast<const cuda::AttnRow*>(dev.data());
    if (absorbed) {
      const int n = static_cast<int>(rows.size());
      int max_len = 0;
      for (auto& x : rows) max_len = std::max(max_len, x.len);
      Buf<float> qlat(*this, static_cast<int64_t>(n) * d.nh * d.C), olat(*this, static_cast<int64_t>(n) * d.nh * d.C);
      const bool fast = cuda::mla_fast_path(d) && !cuda::simple_attention();
      if (fast && m.sms == 0) cudaDeviceGetAttribute(&m.sms, cudaDevAttrMultiProcessorCount, m.device);
      const int splits = !fast ? 1 : invariant ? row_splits : cuda::mla_splits(d, n, max_len, m.sms);
      Buf<float> part(*this, fast ? static_cast<int64_t>(n) * splits * d.nh * (d.C + cuda::kMlaPartPad) : 0);
      cuda::attention_absorbed(d, q, ait->second.w_uk, ait->second.w_uvt, r, n, max_len, splits, qlat.data(), olat.data(),
                               fast ? part.data() : nullptr, out, m.stream, mbytes ? dev.data() + moff : nullptr, invariant);
    }
    else if (!tiles.empty())
      cuda::attention_expanded_tiles(d, q, r, reinterpret_cast<const cuda::AttnTile*>(dev.data() + rbytes),
                                     static_cast<int>(tiles.size()), out, m.stream);
    else cuda::attention_expanded(d, q, r, static_cast<int>(rows.size()), out, m.stream);
  };
  run(exp_rows, false);
  run(abs_rows, true);
}

void CudaBackend::route(const ModelConfig& cfg, const float* logits, const std::vector<float>& bias, int64_t n,
                        int32_t* idx, float* weight) {
  cuda::RouteArgs a;
  a.E = static_cast<int>(cfg.n_routed_experts);
  a.K = static_cast<int>(cfg.num_experts_per_tok);
  a.G = static_cast<int>(std::max<int64_t>(1, cfg.n_group));
  a.topk_group = static_cast<int>(cfg.topk_group);
  a.sigmoid = cfg.scoring_func == ScoringFunc::sigmoid;
  a.method = cfg.topk_method == TopkMethod::greedy ? 0 : cfg.topk_method == TopkMethod::noaux_tc ? 2 : 1;
  a.norm_topk = cfg.norm_topk_prob;
  a.scaling = static_cast<float>(cfg.routed_scaling_factor);
  KSCOPE_CHECK(a.K <= 64 && a.G <= 64 && a.K <= a.E && a.E <= 4096, unsupported, "cuda", "router with top-{} of {} experts in {} groups unsupported",
               a.K, a.E, a.G);
  const float* b = nullptr;
  Buf<float> tmp;
  if (!bias.empty()) {
    b = impl_->param(bias);
    if (!b) {
      tmp = Buf<float>(*this, bias);
      b = tmp.data();
    }
  }
  cuda::route(a, logits, b, n, idx, weight, impl_->stream);
}

bool CudaBackend::moe_includes_shared(const MoeWeights& w) const {
  auto it = impl_->moe.find(&w);
  return it != impl_->moe.end() && it->second.shared;
}

void CudaBackend::moe_experts(const MoeWeights& w, const float* x, int64_t n, int64_t k, const int32_t* idx,
                              const float* weight, float* out) {
  Impl& m = *impl_;
  auto it = m.moe.find(&w);
  KSCOPE_CHECK(it != m.moe.end() && !w.experts.empty() && m.current(Impl::kMoe, &w, w.experts[0].gate.weight->data), internal, "cuda", "MoE weights '{}' were not prepared", w.router.name);
  const auto& dm = it->second;
  const int64_t H = dm.down.N, I = dm.gate.N;
  KSCOPE_CHECK(k + (dm.shared ? 1 : 0) <= 64, unsupported, "cuda", "top-{} routing unsupported", k);
  if (n == 0) return;
  // each token's slots, then (where the shared expert is stacked as expert E) one for it, weight 1
  const cuda::Slots sl{idx, weight, static_cast<int>(k + (dm.shared ? 1 : 0)), static_cast<int>(k), static_cast<int>(w.experts.size())};
  k = sl.k;
  const int E = static_cast<int>(w.experts.size()) + (dm.shared ? 1 : 0);  // row groups
  const int64_t M = n * k;
  const int tiles = static_cast<int>(cuda::group_row_tiles(M, E));
  KSCOPE_CHECK(tiles <= 65535, resource, "cuda", "{} routed rows in one MoE call exceed the grid limit", M);
  Buf<int> counts(*this, E), row_off(*this, E + 1), tile_off(*this, E + 1), cursor(*this, E), perm(*this, M), slot_pos(*this, M);
  Buf<int> cls_count(*this, 4);
  // the row tiles by size (1-8, 9-16, 17-32 rows), in pieces of at most `piece` rows: at most one piece per 8 rows
  const int piece = cuda::few_piece(n);
  const int cap = piece == cuda::kBM ? tiles : static_cast<int>(cdiv(M, 8) + std::min<int64_t>(E, M));
  Buf<int2> cls_tiles(*this, 3 * static_cast<int64_t>(cap));
  cuda::moe_permute(sl, M, E, counts.data(), row_off.data(), tile_off.data(), cursor.data(), perm.data(), slot_pos.data(),
                    cls_count.data(), cls_tiles.data(), cap, piece, m.stream);
  Buf<bf16> xp(*this, M * H);
  cuda::moe_gather(x, perm.data(), M, static_cast<int>(k), H, xp.data(), m.stream);
  const cuda::Groups g{row_off.data(), tile_off.data(), E, cls_count.data(), cls_tiles.data(), cap, piece};
  const int max_rows = static_cast<int>(std::min<int64_t>(n, cuda::kBM));  // an expert gets at most one row per token
  Buf<float> gt(*this, M * I), up(*this, M * I);
  cuda::gemm(xp.data(), static_cast<int>(M), gt.data(), dm.gate, g, tiles, m.stream, up.data(), &dm.up, max_rows);
  Buf<bf16> act(*this, M * I);
  cuda::silu_mul(gt.data(), up.data(), M * I, act.data(), m.stream);
  Buf<float> dn(*this, M * H);
  cuda::gemm(act.data(), static_cast<int>(M), dn.data(), dm.down, g, tiles, m.stream, nullptr, nullptr, max_rows);
  cuda::moe_combine(dn.data(), slot_pos.data(), sl, n, H, out, m.stream);
}

void CudaBackend::mlp(const MlpWeights& w, const float* x, int64_t n, float* out) { mlp_bf16(w, x, nullptr, n, out); }

void CudaBackend::mlp_bf16(const MlpWeights& w, const float* x, const uint16_t* x_bf16, int64_t n, float* out) {
  Impl& m = *impl_;
  auto gi = m.lin.find(&w.gate), ui = m.lin.find(&w.up), di = m.lin.find(&w.down);
  KSCOPE_CHECK(gi != m.lin.end() && ui != m.lin.end() && di != m.lin.end() && m.current(Impl::kLinear, &w.gate, w.gate.weight->data) &&
                   m.current(Impl::kLinear, &w.up, w.up.weight->data) && m.current(Impl::kLinear, &w.down, w.down.weight->data),
               internal, "cuda", "MLP '{}' was not prepared",
               w.gate.name);
  const int64_t H = w.gate.in, I = w.gate.out;
  if (n == 0) return;
  Buf<bf16> xb;
  const bf16* xin = bf16_input(*this, x, x_bf16, n * H, xb, m.stream);
  const int tiles = static_cast<int>(cdiv(n, cuda::kBM));
  Buf<float> g(*this, n * I), u(*this, n * I);
  cuda::gemm(xin, static_cast<int>(n), g.data(), gi->second, {}, tiles, m.stream, u.data(), &ui->second);
  Buf<bf16> act(*this, n * I);
  cuda::silu_mul(g.data(), u.data(), n * I, act.data(), m.stream);
  cuda::gemm(act.data(), static_cast<int>(n), out, di->second, {}, tiles, m.stream);
}

void CudaBackend::add(float* y, const float* x, int64_t n) { cuda::add(y, x, n, impl_->stream); }

void CudaBackend::gather_rows(const float* src, const int64_t* rows, int64_t n, int64_t width, float* dst) {
  cuda::gather_rows(src, rows, n, width, dst, impl_->stream);
}

void CudaBackend::logits_top(const float* logits, int64_t R, int64_t V, int64_t M, float* max, double* log_sum,
                             float* top_v, int32_t* top_i) {
  M = std::min(M, V);
  if (R == 0) return;
  const int64_t Mk = std::max<int64_t>(M, 1);  // the max is the first of the top entries
  // one device block, one copy back: log-sums [R] (double), maxima [R], top values [R, Mk], top ids [R, Mk]
  const size_t b_ls = R * sizeof(double), b_mx = R * sizeof(float), b_tv = R * Mk * sizeof(float);
  const size_t bytes = b_ls + b_mx + 2 * b_tv;
  Buf<uint8_t> out(*this, static_cast<int64_t>(bytes));
  Buf<uint8_t> scratch(*this, static_cast<int64_t>(cuda::logits_top_scratch(R, V, static_cast<int>(Mk))));
  uint8_t* o = out.data();
  cuda::logits_top(logits, R, V, static_cast<int>(Mk), reinterpret_cast<float*>(o + b_ls), reinterpret_cast<double*>(o),
                   reinterpret_cast<float*>(o + b_ls + b_mx), reinterpret_cast<int32_t*>(o + b_ls + b_mx + b_tv),
                   scratch.data(), impl_->stream);
  std::vector<uint8_t> h(bytes);
  download(h.data(), o, bytes);
  std::memcpy(log_sum, h.data(), b_ls);
  std::memcpy(max, h.data() + b_ls, b_mx);
  if (M > 0)
    for (int64_t r = 0; r < R; ++r) {
      std::memcpy(top_v + r * M, h.data() + b_ls + b_mx + r * Mk * sizeof(float), M * sizeof(float));
      std::memcpy(top_i + r * M, h.data() + b_ls + b_mx + b_tv + r * Mk * sizeof(int32_t), M * sizeof(int32_t));
    }
}

void CudaBackend::apply_row_ops(float* data, int64_t width, const std::vector<RowOp>& ops) {
  if (ops.empty()) return;
  // group by row, keeping each row's ops in their order; distinct vectors uploaded once
  std::vector<size_t> order(ops.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return ops[a].row < ops[b].row; });
  std::vector<int64_t> rows;
  std::vector<int> seg;
  std::vector<cuda::DRowOp> dops;
  std::vector<const float*> vecs;
  for (size_t k = 0; k < order.size(); ++k) {
    const RowOp& op = ops[order[k]];
    if (rows.empty() || rows.back() != op.row) {
      rows.push_back(op.row);
      seg.push_back(static_cast<int>(dops.size()));
    }
    int vi = static_cast<int>(std::find(vecs.begin(), vecs.end(), op.v) - vecs.begin());
    if (vi == static_cast<int>(vecs.size())) vecs.push_back(op.v);
    dops.push_back({op.kind == RowOp::add ? 0 : 1, vi, op.add_coef, op.target, op.vnorm});
  }
  seg.push_back(static_cast<int>(dops.size()));
  auto* vh = static_cast<float*>(stage_host(vecs.size() * width * sizeof(float)));
  for (size_t i = 0; i < vecs.size(); ++i) std::memcpy(vh + i * width, vecs[i], width * sizeof(float));
  Buf<float> vd(*this, static_cast<int64_t>(vecs.size() * width));
  CK(cudaMemcpyAsync(vd.data(), vh, vecs.size() * width * sizeof(float), cudaMemcpyHostToDevice, impl_->stream));
  Buf<int64_t> rd(*this, rows);
  Buf<int> sd(*this, seg);
  Buf<uint8_t> od(*this, static_cast<int64_t>(dops.size() * sizeof(cuda::DRowOp)));
  upload(od.data(), dops.data(), dops.size() * sizeof(cuda::DRowOp));
  cuda::apply_row_ops(data, width, rd.data(), sd.data(), static_cast<int>(rows.size()),
                      reinterpret_cast<const cuda::DRowOp*>(od.data()), vd.data(), impl_->stream);
}

void CudaBackend::sample_rows(const float* logits, int64_t V, const std::vector<int64_t>& rows,
                              const std::vector<RowDraw>& draws, int32_t* tok, float* logit) {
  // whole-vocabulary draws on the device; a top_k between the summary's size and the vocabulary on the host
  std::vector<int64_t> dev_rows, host_rows;
  std::vector<size_t> dev_at, host_at;
  std::vector<cuda::RowDrawD> dd;
  std::vector<RowDraw> hd;
  for (size_t i = 0; i < rows.size(); ++i) {
    if (draws[i].top_k <= 0 || draws[i].top_k >= V) {
      dev_rows.push_back(rows[i]);
      dev_at.push_back(i);
      dd.push_back({draws[i].temperature, draws[i].top_p, draws[i].u});
    } else {
      host_rows.push_back(rows[i]);
      host_at.push_back(i);
      hd.push_back(draws[i]);
    }
  }
  if (!dev_rows.empty()) {
    const int64_t n = static_cast<int64_t>(dev_rows.size());
    Buf<int64_t> rd(*this, dev_rows);
    Buf<uint8_t> dd_dev(*this, static_cast<int64_t>(dd.size() * sizeof(cuda::RowDrawD)));
    upload(dd_dev.data(), dd.data(), dd.size() * sizeof(cuda::RowDrawD));
    Buf<double> scratch(*this, n * V);
    Buf<int32_t> td(*this, n);
    Buf<float> ld(*this, n);
    cuda::sample_rows(logits, V, rd.data(), reinterpret_cast<const cuda::RowDrawD*>(dd_dev.data()), static_cast<int>(n),
                      scratch.data(), td.data(), ld.data(), impl_->stream);
    const auto th = td.host();
    const auto lh = ld.host();
    for (size_t j = 0; j < dev_at.size(); ++j) {
      tok[dev_at[j]] = th[j];
      logit[dev_at[j]] = lh[j];
    }
  }
  if (!host_rows.empty()) {
    std::vector<int32_t> t(host_rows.size());
    std::vector<float> lv(host_rows.size());
    Backend::sample_rows(logits, V, host_rows, hd, t.data(), lv.data());
    for (size_t j = 0; j < host_at.size(); ++j) {
      tok[host_at[j]] = t[j];
      logit[host_at[j]] = lv[j];
    }
  }
}

void* CudaBackend::stage_host(size_t bytes) {
  Impl::StageSet& m = impl_->sets[impl_->cur];
  bytes = (bytes + 255) / 256 * 256;
  while (m.arena_chunk < m.arena.size()) {
    auto& c = m.arena[m.arena_chunk];
    if (m.arena_off + bytes <= c.second) {
      void* p = c.first + m.arena_off;
      m.arena_off += bytes;
      return p;
    }
    ++m.arena_chunk;
    m.arena_off = 0;
  }
  const size_t size = std::max<size_t>(bytes, 64u << 20);
  void* p = nullptr;
  CK(cudaMallocHost(&p, size));
  m.arena.push_back({static_cast<uint8_t*>(p), size});
  m.arena_chunk = m.arena.size() - 1;
  m.arena_off = bytes;
  return p;
}
void CudaBackend::download_async(void* host, const void* src, size_t bytes) {
  Impl& m = *impl_;
  // snapshot the rows on the device (the compute stream goes on and may overwrite them), then copy the snapshot
  // out on the copy stream while the next kernels run; what no longer fits the set's snapshot buffer (large
  // prefill captures) is copied on the compute stream, which waits for it
  Impl::StageSet& set = m.sets[m.cur];
  const size_t need = (bytes + 255) / 256 * 256;
  if (!m.use_copy_stream || set.snap_off + need > Impl::kSnapBytes) {
    CK(cudaMemcpyAsync(host, src, bytes, cudaMemcpyDeviceToHost, m.stream));
    return;
  }
  if (!set.snap) set.snap = static_cast<uint8_t*>(m.dmalloc(Impl::kSnapBytes, "capture snapshots"));  // freed with the backend
  uint8_t* snap = set.snap + set.snap_off;
  set.snap_off += need;
  CK(cudaMemcpyAsync(snap, src, bytes, cudaMemcpyDeviceToDevice, m.stream));
  CK(cudaStreamWaitEvent(m.copy_stream, m.next_event(set.order, set.order_next, m.stream), 0));
  CK(cudaMemcpyAsync(host, snap, bytes, cudaMemcpyDeviceToHost, m.copy_stream));
}
void CudaBackend::wait() {
  CK(cudaStreamSynchronize(impl_->stream));
  if (impl_->copy_stream) CK(cudaStreamSynchronize(impl_->copy_stream));
}
void CudaBackend::set_capture_copy_stream(bool on) {
  Impl& m = *impl_;
  wait();
  m.use_copy_stream = on;
}
void CudaBackend::stage_reset() { impl_->sets[impl_->cur].recycle(); }
void CudaBackend::stage_swap() {
  impl_->cur ^= 1;
  impl_->sets[impl_->cur].recycle();
}
// A mark's id is (set << 32) | index, so a mark of the set left behind by stage_swap() can still be waited for
// (from the delivery thread) while the other set takes new marks.
// With the copy stream, a mark is recorded there after it has waited for the compute stream: reached once both
// the work and the copies issued before it are done.
int64_t CudaBackend::mark() {
  Impl& m = *impl_;
  Impl::StageSet& set = m.sets[m.cur];
  cudaStream_t s = m.stream;
  if (m.use_copy_stream) {
    CK(cudaStreamWaitEvent(m.copy_stream, m.next_event(set.order, set.order_next, m.stream), 0));
    s = m.copy_stream;
  }
  const int64_t id = (static_cast<int64_t>(m.cur) << 32) | static_cast<int64_t>(set.mark_next);
  m.next_event(set.marks, set.mark_next, s);
  return id;
}
void CudaBackend::wait_mark(int64_t id) {
  if (id < 0) return;
  const Impl::StageSet& m = impl_->sets[(id >> 32) & 1];
  const size_t i = static_cast<size_t>(id & 0xffffffff);
  if (i < m.mark_next) CK(cudaEventSynchronize(m.marks[i]));
}

std::shared_ptr<Backend> make_cuda_backend(int device) { return std::make_shared<CudaBackend>(device); }

}  // namespace kscope
