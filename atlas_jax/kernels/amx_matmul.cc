// c[M,N] = a[M,K] @ b[K,N], a and b bf16, f32 accumulation, c f32 or bf16 (rounded to nearest even), with Intel
// AMX (TDPBF16PS), as XLA:CPU custom calls through the XLA FFI. Built and registered by
// atlas_jax/kernels/amx_matmul.py, which pads the operands to M % 32 == 0, K % 32 == 0, N % 64 == 0 (checked
// here) and maps einsums onto it.
//   AtlasAmxMatmul / AtlasAmxMatmulBf16 (attrs a_t, b_t): a stored [M,K] or, a_t, [K,M]; b stored [K,N] or, b_t,
//     [N,K] -- the products of a backward pass (x^T.dy, dy.W^T) read their operands as they lie.
//   AtlasAmxPackedMatmul: b already as the VNNI panels below, [N/64][K/2][64][2] (the sampler's rollout copy).
//
// Build (what amx_matmul.py runs): g++ -O3 -std=c++17 -shared -fPIC -mamx-tile -mamx-bf16 -mavx512f
//     -mavx512bw -mavx512bf16 -I$(python -c "import jax; print(jax.ffi.include_dir())") amx_matmul.cc -o x.so
//
// Tiles (palette 1, all 16 rows x 64 bytes): C00 C01 C10 C11 = tmm0-3 (16 x 16 f32 each), A0 A1 = tmm4-5
// (16 rows x 32 bf16 of a, row stride 2K bytes), B0 B1 = tmm6-7 (16 k-pairs x 16 columns x 2, the VNNI layout
// TDPBF16PS wants). One k-step of 32 is four TDPBF16PS on a 32 x 32 block of c.
//
// Work, in two phases over tasks claimed from atomic counters by the calling thread and helpers it schedules on
// XLA's intra-op pool (the caller waits only for tasks already claimed, so a busy pool cannot deadlock it):
//   1. b re-laid as VNNI panels [N/64][K/2][64][2] (one task per 64-column panel; skipped when prepacked) and,
//      for a_t, a transposed to [M][K] (one task per 32 rows), into scratch owned by the calling thread;
//   2. tasks of up to kRowsPerTask rows x 64 columns, 32 x 32 blocks each.
//
// AMX needs the kernel's permission (Linux arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA) once per process:
// AtlasAmxInit() asks for it and returns 0 when AMX may be used (amx_matmul.py calls it before registering).
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kPanel = 64;          // columns of b per task
constexpr int kRowsPerTask = 256;   // rows of a per task (the packed panel is reused across them)
constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

struct TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

void ConfigureTiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

struct Problem {
  const uint16_t* a;  // [M, K] (a_t = false) or [K, M] (a_t = true)
  const uint16_t* b;  // [K, N] (b_t = false) or [N, K] (b_t = true)
  void* c;            // [M, N], f32 or bf16
  int64_t m, k, n;
  bool a_t, b_t, bf16_out;
};

// r[j] lane i <- r[i] lane j for 16 x 16 32-bit words (unpack 32/64, then two 128-bit lane shuffles).
inline void Transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 16; i += 8)
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
  }
}

// Phase 1 work, per 64-column panel p: b[:, 64p:64p+64] as [K/2][64][2] at packed + p * K * 64, pair q of
// column j = (b[2q, 64p+j], b[2q+1, 64p+j]).
void PackPanel(const Problem& p, int64_t panel, uint16_t* packed) {
  const int64_t col0 = panel * kPanel;
  uint16_t* out = packed + panel * p.k * kPanel;
  if (p.b_t) {  // b stored [N, K]: pair (b[2q, j], b[2q+1, j]) is word q of row j; 16 x 16 word transposes
    uint32_t* dst = reinterpret_cast<uint32_t*>(out);
    for (int j0 = 0; j0 < kPanel; j0 += 16)
      for (int64_t q0 = 0; q0 < p.k / 2; q0 += 16) {
        __m512i r[16];
        for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(p.b + (col0 + j0 + i) * p.k + 2 * q0);
        Transpose16x16(r);  // r[q] lane i = word q0 + q of row j0 + i
        for (int q = 0; q < 16; ++q) _mm512_storeu_si512(dst + (q0 + q) * kPanel + j0, r[q]);
      }
    return;
  }
  const __m512i lo_idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7,
                                          38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi_idx = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24, 55,
                                          23, 54, 22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
  for (int64_t q = 0; q < p.k / 2; ++q) {
    const uint16_t* r0 = p.b + (2 * q) * p.n + col0;
    const uint16_t* r1 = r0 + p.n;
    uint16_t* dst = out + q * (2 * kPanel);
    for (int h = 0; h < kPanel; h += 32) {  // interleave 32 columns of the two rows, 16 pairs per store
      const __m512i x0 = _mm512_loadu_si512(r0 + h);
      const __m512i x1 = _mm512_loadu_si512(r1 + h);
      _mm512_storeu_si512(dst + 2 * h, _mm512_permutex2var_epi16(x0, lo_idx, x1));
      _mm512_storeu_si512(dst + 2 * h + 32, _mm512_permutex2var_epi16(x0, hi_idx, x1));
    }
  }
}

// Phase 1 work for a stored [K, M], per 32-row block r: rows r*32.. of a as [32][K] at at + r * 32 * K. Blocks of
// 16 k x 32 m: the (m, m+1) pairs as 32-bit words, a 16 x 16 word transpose, then each word row split into its
// even (row m) and odd (row m+1) halves.
void TransposeRows(const Problem& p, int64_t block, uint16_t* at) {
  const int64_t m0 = block * 32;
  const __m512i split = _mm512_set_epi16(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1, 30, 28, 26, 24,
                                         22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  for (int64_t k0 = 0; k0 < p.k; k0 += 16) {
    __m512i r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(p.a + (k0 + i) * p.m + m0);
    Transpose16x16(r);  // r[j] lane i = (a[k0+i, m0+2j], a[k0+i, m0+2j+1])
    for (int j = 0; j < 16; ++j) {
      const __m512i rows = _mm512_permutexvar_epi16(split, r[j]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(at + (m0 + 2 * j) * p.k + k0), _mm512_castsi512_si256(rows));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(at + (m0 + 2 * j + 1) * p.k + k0),
                          _mm512_extracti64x4_epi64(rows, 1));
    }
  }
}

inline void StoreBf16(float* tile, uint16_t* dst, size_t stride_elems) {
  for (int r = 0; r < 16; ++r) {
    const __m512 v = _mm512_loadu_ps(tile + 16 * r);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + r * stride_elems), (__m256i)_mm512_cvtneps_pbh(v));
  }
}

// c[row0:row0+32, col0+c0 : col0+c0+32] from rows of a (k contiguous, row stride a_stride elements) and the
// packed panel (its columns c0..c0+31).
void Block32x32(const Problem& p, const uint16_t* a, int64_t a_stride, const uint16_t* panel, int64_t row0,
                int64_t col0, int c0) {
  const int64_t k = p.k;
  const size_t a_bytes = static_cast<size_t>(a_stride) * 2;
  const size_t b_bytes = 2 * kPanel * 2;  // bytes per k-pair row of the panel
  const uint16_t* a0 = a + row0 * a_stride;
  const uint16_t* a1 = a0 + 16 * a_stride;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t kk = 0; kk < k; kk += 32) {
    const uint16_t* bq = panel + (kk / 2) * (2 * kPanel) + 2 * c0;
    _tile_loadd(4, a0 + kk, a_bytes);
    _tile_loadd(5, a1 + kk, a_bytes);
    _tile_loadd(6, bq, b_bytes);
    _tile_loadd(7, bq + 32, b_bytes);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  if (!p.bf16_out) {
    float* c = static_cast<float*>(p.c) + row0 * p.n + col0 + c0;
    const size_t c_stride = static_cast<size_t>(p.n) * 4;
    _tile_stored(0, c, c_stride);
    _tile_stored(1, c + 16, c_stride);
    _tile_stored(2, c + 16 * p.n, c_stride);
    _tile_stored(3, c + 16 * p.n + 16, c_stride);
    return;
  }
  alignas(64) float tile[4][256];
  _tile_stored(0, tile[0], 64);
  _tile_stored(1, tile[1], 64);
  _tile_stored(2, tile[2], 64);
  _tile_stored(3, tile[3], 64);
  uint16_t* c = static_cast<uint16_t*>(p.c) + row0 * p.n + col0 + c0;
  StoreBf16(tile[0], c, p.n);
  StoreBf16(tile[1], c + 16, p.n);
  StoreBf16(tile[2], c + 16 * p.n, p.n);
  StoreBf16(tile[3], c + 16 * p.n + 16, p.n);
}

struct Shared {
  Problem p;
  uint16_t* packed = nullptr;      // b as VNNI panels, [N/64][K/2][64][2]
  uint16_t* at = nullptr;          // a as [M][K] when stored [K, M]
  int64_t pack_panels = 0, pack_tasks = 0, row_tasks = 0, tasks = 0;
  std::atomic<int64_t> next_pack{0}, packed_done{0};
  std::atomic<int64_t> next{0}, done{0};
};

void Drain(Shared& s) {
  const Problem& p = s.p;
  int64_t finished = 0;
  for (int64_t i; (i = s.next_pack.fetch_add(1, std::memory_order_relaxed)) < s.pack_tasks;) {
    if (i < s.pack_panels)
      PackPanel(p, i, s.packed);
    else
      TransposeRows(p, i - s.pack_panels, s.at);
    ++finished;
  }
  if (finished) s.packed_done.fetch_add(finished, std::memory_order_acq_rel);
  // Phase 2 needs all of phase 1; every unfinished phase-1 task is held by a running thread.
  while (s.packed_done.load(std::memory_order_acquire) < s.pack_tasks) _mm_pause();
  const uint16_t* a = p.a_t ? s.at : p.a;
  finished = 0;
  bool configured = false;
  for (int64_t i; (i = s.next.fetch_add(1, std::memory_order_relaxed)) < s.tasks;) {
    if (!configured) {
      ConfigureTiles();
      configured = true;
    }
    const int64_t panel = i / s.row_tasks;
    const int64_t r_begin = (i % s.row_tasks) * kRowsPerTask;
    const int64_t r_end = std::min<int64_t>(r_begin + kRowsPerTask, p.m);
    const uint16_t* packed = s.packed + panel * p.k * kPanel;
    for (int64_t r = r_begin; r < r_end; r += 32) {
      Block32x32(p, a, p.k, packed, r, panel * kPanel, 0);
      Block32x32(p, a, p.k, packed, r, panel * kPanel, 32);
    }
    ++finished;
  }
  if (configured) _tile_release();
  if (finished) s.done.fetch_add(finished, std::memory_order_release);
}

// Scratch that outlives one call, one per calling thread (concurrent calls come from different threads).
uint16_t* Scratch(std::vector<uint16_t>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

ffi::Error Run(ffi::ThreadPool& pool, ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> b, void* c_data,
               bool bf16_out, bool a_t, bool b_t, bool prepacked = false) {
  auto ad = a.dimensions();
  auto bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != (prepacked ? 4 : 2))
    return ffi::Error::InvalidArgument("atlas_amx_matmul: expected a matrix and a matrix or packed panels");
  const int64_t m = a_t ? ad[1] : ad[0], k = a_t ? ad[0] : ad[1];
  int64_t n = b_t ? bd[0] : bd[1], kb = b_t ? bd[1] : bd[0];
  if (prepacked) {  // b already as panels [N/64][K/2][64][2]
    if (bd[2] != kPanel || bd[3] != 2)
      return ffi::Error::InvalidArgument("atlas_amx_packed_matmul: expected packed b[P, K/2, 64, 2]");
    n = bd[0] * kPanel;
    kb = bd[1] * 2;
  }
  if (k != kb || m % 32 || k % 32 || n % kPanel)
    return ffi::Error::InvalidArgument(
        "atlas_amx_matmul: expected a[M,K] and b[K,N] (either stored transposed) with M % 32 == 0, "
        "K % 32 == 0, N % 64 == 0");
  auto s = std::make_shared<Shared>();
  s->p = Problem{reinterpret_cast<const uint16_t*>(a.typed_data()),
                 reinterpret_cast<const uint16_t*>(b.typed_data()),
                 c_data, m, k, n, a_t, b_t, bf16_out};
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::memset(s->p.c, 0, (s->p.bf16_out ? 2 : 4) * m * n);
    return ffi::Error::Success();
  }
  thread_local std::vector<uint16_t> packed_buf, at_buf;
  s->packed = prepacked ? const_cast<uint16_t*>(s->p.b) : Scratch(packed_buf, static_cast<size_t>(k) * n);
  if (a_t) s->at = Scratch(at_buf, static_cast<size_t>(m) * k);
  s->pack_panels = prepacked ? 0 : n / kPanel;
  s->pack_tasks = s->pack_panels + (a_t ? m / 32 : 0);
  s->row_tasks = (m + kRowsPerTask - 1) / kRowsPerTask;
  s->tasks = s->row_tasks * (n / kPanel);
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), std::max(s->tasks, s->pack_tasks)) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([s] { Drain(*s); });
  Drain(*s);
  while (s->done.load(std::memory_order_acquire) < s->tasks) _mm_pause();
  return ffi::Error::Success();
}

ffi::Error F32Out(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> b,
                  ffi::ResultBuffer<ffi::F32> c, bool a_t, bool b_t) {
  return Run(pool, a, b, c->untyped_data(), false, a_t, b_t);
}

ffi::Error Bf16Out(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> b,
                   ffi::ResultBuffer<ffi::BF16> c, bool a_t, bool b_t) {
  return Run(pool, a, b, c->untyped_data(), true, a_t, b_t);
}

ffi::Error PackedF32Out(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> wp,
                        ffi::ResultBuffer<ffi::F32> c) {
  return Run(pool, a, wp, c->untyped_data(), false, false, false, true);
}

}  // namespace

// 0 when this process may use AMX tiles (asks the kernel once), else the errno of the refusal.
extern "C" int AtlasAmxInit() {
  static const int status = [] {
    if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0) return 0;
    return errno ? errno : -1;
  }();
  return status;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(AtlasAmxMatmul, F32Out,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("a_t")
                                  .Attr<bool>("b_t"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AtlasAmxPackedMatmul, PackedF32Out,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(AtlasAmxMatmulBf16, Bf16Out,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Attr<bool>("a_t")
                                  .Attr<bool>("b_t"));
