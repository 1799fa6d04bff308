// y[M,N] (f32) = x[M,K] @ w[K,N], x and w both bf16 (AtlasBf16Matmul) or both f32 (AtlasF32Matmul), f32
// accumulation, as XLA:CPU custom calls through the XLA FFI, for AVX-512 CPUs (bf16: avx512_bf16). Built and
// registered by atlas_jax/kernels/cpu_matmul.py (which also packs w); the JAX sampler's rollout copy on such a
// CPU uses them for every weight matrix (docs/internals.md).
//
// Build (what cpu_matmul.py runs): g++ -O3 -std=c++17 -shared -fPIC -mavx512f -mavx512bw -mavx512vl -mavx512bf16
//     -I$(python -c "import jax; print(jax.ffi.include_dir())") cpu_matmul.cc -o cpu_matmul.so
// (-DMRB / -DNTB / -DPF override the row block, tiles per block and prefetch distance; the defaults measured best
// on a Zen 5 EPYC: bench/cpu_kernel.py.)
//
// f32: w is packed [P, K, 64] (each 64-column panel contiguous, row k of it = w[k, 64p:64p+64]); one FMA per
// (row, 16-column tile, k) with x[m, k] broadcast.
// bf16: w is packed [P, K2, 64, 2] with P = ceil(N/64), K2 = ceil(K/2), zero padded:
//   wp = pad(w, to [2*K2, 64*P]).reshape(K2, 2, P, 64).transpose(2, 0, 3, 1)
// so each 64-column panel is contiguous and holds, per k-pair q, the pairs (w[2q, n], w[2q+1, n]) lane by lane:
// what VDPBF16PS multiplies with the pair (x[m, 2q], x[m, 2q+1]) broadcast to every lane (16 pairs summed into
// 16 f32 lanes per instruction). On XLA's row-major [K,N] layout every k-row is another page (stride 2N bytes)
// and the same kernel was slower than XLA's dot; packed it was 1.5-3.2x faster at 16 rows.
//
// Work split: 64-column panels, claimed from an atomic counter by the calling thread and by helpers it
// schedules on XLA's intra-op pool. The caller waits only for panels already claimed (claimed ones are being
// computed by a running thread), so it cannot deadlock on a pool whose other threads are busy.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kTile = 16;         // f32 lanes per zmm: output columns per tile
constexpr int kPanelTiles = 4;    // tiles per panel: 64 columns
#ifndef MRB
#define MRB 6
#endif
#ifndef NTB
#define NTB 4
#endif
#ifndef PF
#define PF 16
#endif
constexpr int kRowBlock = MRB;
constexpr int kPanel = kTile * kPanelTiles;

struct Problem {
  const void* x;
  const void* w;
  float* y;
  int64_t m, k, n;
};

// bf16: w packed [P, ceil(K/2), 64, 2], one VDPBF16PS per (row, tile, k-pair).
template <int MR, int NT>
void BlockBf16(const Problem& p, int64_t row0, int64_t col0, int t0, __mmask16 last_mask, __m512 (&acc)[MR][NT]) {
  const int64_t k = p.k;
  const uint16_t* xrow[MR];
  for (int r = 0; r < MR; ++r) xrow[r] = static_cast<const uint16_t*>(p.x) + (row0 + r) * k;
  const int64_t pairs = k / 2;
  const int64_t k2 = (k + 1) / 2;
  const uint16_t* panel = static_cast<const uint16_t*>(p.w) + (col0 / kPanel) * k2 * (2 * kPanel);
  for (int64_t q = 0; q < pairs; ++q) {
    const uint16_t* wq = panel + q * (2 * kPanel);
    __m512i b[NT];
    for (int t = 0; t < NT; ++t) b[t] = _mm512_loadu_si512(wq + (t0 + t) * 2 * kTile);
    if (PF)  // every cache line of this block's row PF pairs ahead (one line per tile)
      for (int t = 0; t < NT; ++t)
        _mm_prefetch(reinterpret_cast<const char*>(wq + PF * 2 * kPanel + (t0 + t) * 2 * kTile), _MM_HINT_T0);
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, xrow[r] + 2 * q, sizeof(pair));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], a, (__m512bh)b[t]);
    }
  }
  if (k % 2) {  // the last pair holds (w[k-1], 0); x[m, k-1] is paired with 0
    const uint16_t* wq = panel + pairs * (2 * kPanel);
    __m512i b[NT];
    for (int t = 0; t < NT; ++t) b[t] = _mm512_loadu_si512(wq + (t0 + t) * 2 * kTile);
    for (int r = 0; r < MR; ++r) {
      const int32_t pair = xrow[r][k - 1];
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], a, (__m512bh)b[t]);
    }
  }
}

// f32: w packed [P, K, 64], one FMA per (row, tile, k).
template <int MR, int NT>
void BlockF32(const Problem& p, int64_t row0, int64_t col0, int t0, __mmask16 last_mask, __m512 (&acc)[MR][NT]) {
  const int64_t k = p.k;
  const float* xrow[MR];
  for (int r = 0; r < MR; ++r) xrow[r] = static_cast<const float*>(p.x) + (row0 + r) * k;
  const float* panel = static_cast<const float*>(p.w) + (col0 / kPanel) * k * kPanel;
  for (int64_t q = 0; q < k; ++q) {
    const float* wq = panel + q * kPanel;
    __m512 b[NT];
    for (int t = 0; t < NT; ++t) b[t] = _mm512_loadu_ps(wq + (t0 + t) * kTile);
    if (PF)
      for (int t = 0; t < NT; ++t)
        _mm_prefetch(reinterpret_cast<const char*>(wq + PF * kPanel + (t0 + t) * kTile), _MM_HINT_T0);
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(xrow[r][q]);
      for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_fmadd_ps(a, b[t], acc[r][t]);
    }
  }
}

template <bool kF32, int MR, int NT>
void Block(const Problem& p, int64_t row0, int64_t col0, int t0, __mmask16 last_mask) {
  __m512 acc[MR][NT];
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_ps();
  if constexpr (kF32)
    BlockF32<MR, NT>(p, row0, col0, t0, last_mask, acc);
  else
    BlockBf16<MR, NT>(p, row0, col0, t0, last_mask, acc);
  for (int r = 0; r < MR; ++r) {
    float* dst = p.y + (row0 + r) * p.n + col0 + t0 * kTile;
    for (int t = 0; t < NT; ++t) {
      if (t == NT - 1 && last_mask != 0xFFFF)
        _mm512_mask_storeu_ps(dst + t * kTile, last_mask, acc[r][t]);
      else
        _mm512_storeu_ps(dst + t * kTile, acc[r][t]);
    }
  }
}

template <bool kF32, int NT>
void Rows(const Problem& p, int64_t col0, int t0, __mmask16 last_mask) {
  int64_t r = 0;
  for (; r + kRowBlock <= p.m; r += kRowBlock) Block<kF32, kRowBlock, NT>(p, r, col0, t0, last_mask);
  switch (p.m - r) {
    case 15: if constexpr (kRowBlock > 15) Block<kF32, 15, NT>(p, r, col0, t0, last_mask); break;
    case 14: if constexpr (kRowBlock > 14) Block<kF32, 14, NT>(p, r, col0, t0, last_mask); break;
    case 13: if constexpr (kRowBlock > 13) Block<kF32, 13, NT>(p, r, col0, t0, last_mask); break;
    case 12: if constexpr (kRowBlock > 12) Block<kF32, 12, NT>(p, r, col0, t0, last_mask); break;
    case 11: if constexpr (kRowBlock > 11) Block<kF32, 11, NT>(p, r, col0, t0, last_mask); break;
    case 10: if constexpr (kRowBlock > 10) Block<kF32, 10, NT>(p, r, col0, t0, last_mask); break;
    case 9: if constexpr (kRowBlock > 9) Block<kF32, 9, NT>(p, r, col0, t0, last_mask); break;
    case 8: if constexpr (kRowBlock > 8) Block<kF32, 8, NT>(p, r, col0, t0, last_mask); break;
    case 7: if constexpr (kRowBlock > 7) Block<kF32, 7, NT>(p, r, col0, t0, last_mask); break;
    case 6: if constexpr (kRowBlock > 6) Block<kF32, 6, NT>(p, r, col0, t0, last_mask); break;
    case 5: Block<kF32, 5, NT>(p, r, col0, t0, last_mask); break;
    case 4: Block<kF32, 4, NT>(p, r, col0, t0, last_mask); break;
    case 3: Block<kF32, 3, NT>(p, r, col0, t0, last_mask); break;
    case 2: Block<kF32, 2, NT>(p, r, col0, t0, last_mask); break;
    case 1: Block<kF32, 1, NT>(p, r, col0, t0, last_mask); break;
    default: break;
  }
}

template <bool kF32>
void Panel(const Problem& p, int64_t panel) {
  const int64_t col0 = panel * kPanel;
  const int64_t cols = std::min<int64_t>(kPanel, p.n - col0);
  const int tiles = static_cast<int>((cols + kTile - 1) / kTile);
  const int rem = static_cast<int>(cols - (tiles - 1) * kTile);
  const __mmask16 last_mask = static_cast<__mmask16>((1u << rem) - 1u);
  int t0 = 0;
  for (; t0 + NTB <= tiles; t0 += NTB) Rows<kF32, NTB>(p, col0, t0, t0 + NTB == tiles ? last_mask : 0xFFFF);
  switch (tiles - t0) {
    case 3: Rows<kF32, 3>(p, col0, t0, last_mask); break;
    case 2: Rows<kF32, 2>(p, col0, t0, last_mask); break;
    case 1: Rows<kF32, 1>(p, col0, t0, last_mask); break;
    default: break;
  }
}

struct Shared {
  Problem p;
  bool f32;
  int64_t panels;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void Drain(Shared& s) {
  int64_t finished = 0;
  for (int64_t i; (i = s.next.fetch_add(1, std::memory_order_relaxed)) < s.panels;) {
    if (s.f32)
      Panel<true>(s.p, i);
    else
      Panel<false>(s.p, i);
    ++finished;
  }
  if (finished) s.done.fetch_add(finished, std::memory_order_release);
}

ffi::Error Run(ffi::ThreadPool& pool, std::shared_ptr<Shared> s) {
  s->panels = (s->p.n + kPanel - 1) / kPanel;
  if (s->p.m == 0 || s->p.n == 0) return ffi::Error::Success();
  if (s->p.k == 0) {
    std::memset(s->p.y, 0, sizeof(float) * s->p.m * s->p.n);
    return ffi::Error::Success();
  }
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), s->panels) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([s] { Drain(*s); });
  Drain(*s);
  while (s->done.load(std::memory_order_acquire) < s->panels) _mm_pause();
  return ffi::Error::Success();
}

ffi::Error Bf16MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                          ffi::ResultBuffer<ffi::F32> y) {
  const int64_t n_cols = y->dimensions()[1];
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 4 || wd[1] != (xd[1] + 1) / 2 || wd[2] != kPanel || wd[3] != 2 ||
      wd[0] * kPanel < n_cols)
    return ffi::Error::InvalidArgument("atlas_cpu_matmul: expected x[M,K] and packed w[P,ceil(K/2),64,2]");
  auto s = std::make_shared<Shared>();
  s->p = Problem{x.typed_data(), w.typed_data(), y->typed_data(), xd[0], xd[1], n_cols};
  s->f32 = false;
  return Run(pool, s);
}

ffi::Error F32MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                         ffi::ResultBuffer<ffi::F32> y) {
  const int64_t n_cols = y->dimensions()[1];
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[1] != xd[1] || wd[2] != kPanel || wd[0] * kPanel < n_cols)
    return ffi::Error::InvalidArgument("atlas_f32_matmul: expected x[M,K] and packed w[P,K,64]");
  auto s = std::make_shared<Shared>();
  s->p = Problem{x.typed_data(), w.typed_data(), y->typed_data(), xd[0], xd[1], n_cols};
  s->f32 = true;
  return Run(pool, s);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AtlasBf16Matmul, Bf16MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(AtlasF32Matmul, F32MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
