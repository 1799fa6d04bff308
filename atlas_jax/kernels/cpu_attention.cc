// Attention kernels for XLA:CPU on AVX-512 CPUs as XLA FFI custom calls (registered by
// atlas_jax/kernels/cpu_attention.py): AtlasDecodeAttention, one decode step over a float32 KV cache (used by
// attention.cached_attention for one query token), and AtlasSelfAttentionFwd/Bwd, training self-attention and
// its backward (used by attention.self_attention under impl "auto"; described at its section below).
//
// Decode:
// For each batch row b and kv head k, with the G query heads of that kv head as rows:
//   logits[g, s] = scale · Σ_h q[b,k,g,h] · keys[b,k,h,s]        (keys stored [B,K,H,S], as the cache keeps them)
//   p[g, :]      = softmax over s of logits, with logits[g, s] = neg_inf where allowed[b, s] is false
//   out[b,k,g,:] = Σ_s p[g, s] · values[b,k,s,:]                   (values stored [B,K,S,H])
// all in float32; exp is a degree-6 polynomial of 2^f on f in [-0.5, 0.5] scaled by 2^n (relative error
// ~2e-7). One pass reads each (b, k) block of the cache once, up to the row's last allowed slot (a cache filled
// from the front: on average about half of a rollout's buffer); XLA:CPU ran the same as two batched matmuls of
// G rows each plus a softmax, 10 ms of a 26 ms peer-model decode step (2026-12-04, Xeon with AMX).
//
// Work: (b, k) pairs claimed from an atomic counter by the caller and helpers on XLA's intra-op pool (the caller
// waits only for claimed pairs, so a busy pool cannot deadlock it). Needs H % 16 == 0 (cpu_attention.py checks).
//
// Build: g++ -O3 -std=c++17 -shared -fPIC -mavx512f -mavx512bw -mavx512vl -mfma -I$(jax ffi include dir) cpu_attention.cc -o x.so
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline __m512 Exp(__m512 x) {
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  x = _mm512_max_ps(x, _mm512_set1_ps(-100.0f));  // exp(-100) ~ 4e-44: 0 after normalisation
  const __m512 t = _mm512_mul_ps(x, log2e);
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);  // 2^t = 2^n · 2^f, f in [-0.5, 0.5]
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

struct Problem {
  const float* q;        // [B, K, G, H]
  const float* keys;     // [B, K, H, S]
  const float* values;   // [B, K, S, H]
  const bool* allowed;   // [B, S]
  float* out;            // [B, K, G, H]
  int64_t b, k, g, h, s;
  float scale, neg_inf;
};

constexpr int kRows = 4;     // query rows per register block
constexpr int kLanes = 64;   // slots per register block (4 zmm)

// 1 + the last allowed slot of a row (the slots after it add nothing: a cache filled from the front is read
// only up to its fill mark); all S when none is allowed (the row's output is then what it always was).
int64_t UsedSlots(const bool* allowed, int64_t s) {
  for (int64_t i = s; i > 0; --i)
    if (allowed[i - 1]) return i;
  return s;
}

// One (b, k) pair; logits is scratch of G x S_pad floats.
void Pair(const Problem& p, int64_t pair, float* logits, int64_t s_pad) {
  const int64_t b = pair / p.k;
  const float* q = p.q + pair * p.g * p.h;
  const float* keys = p.keys + pair * p.h * p.s;
  const float* values = p.values + pair * p.s * p.h;
  const bool* allowed = p.allowed + b * p.s;
  float* out = p.out + pair * p.g * p.h;
  const int64_t sn = UsedSlots(allowed, p.s);
  for (int64_t g0 = 0; g0 < p.g; g0 += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, p.g - g0));
    for (int64_t s0 = 0; s0 < sn; s0 += kLanes) {
      __m512 acc[kRows][4];
      for (int r = 0; r < kRows; ++r)
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
      const int64_t left = sn - s0;
      __mmask16 m[4];
      for (int c = 0; c < 4; ++c) {
        const int64_t n = std::clamp<int64_t>(left - 16 * c, 0, 16);
        m[c] = static_cast<__mmask16>((1u << n) - 1u);
      }
      for (int64_t hh = 0; hh < p.h; ++hh) {
        const float* krow = keys + hh * p.s + s0;
        __m512 kv[4];
        for (int c = 0; c < 4; ++c) kv[c] = _mm512_maskz_loadu_ps(m[c], krow + 16 * c);
        for (int r = 0; r < rows; ++r) {
          const __m512 qv = _mm512_set1_ps(q[(g0 + r) * p.h + hh]);
          for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_fmadd_ps(qv, kv[c], acc[r][c]);
        }
      }
      for (int c = 0; c < 4; ++c) {
        if (!m[c]) continue;
        const __m128i ok8 = _mm_maskz_loadu_epi8(m[c], allowed + s0 + 16 * c);
        const __mmask16 ok = _mm_test_epi8_mask(ok8, ok8) & m[c];
        for (int r = 0; r < rows; ++r) {
          const __m512 v = _mm512_mask_blend_ps(ok, _mm512_set1_ps(p.neg_inf),
                                                _mm512_mul_ps(acc[r][c], _mm512_set1_ps(p.scale)));
          _mm512_storeu_ps(logits + (g0 + r) * s_pad + s0 + 16 * c, v);
        }
      }
    }
  }
  for (int64_t gg = 0; gg < p.g; ++gg) {  // softmax of each row, over the S valid slots
    float* row = logits + gg * s_pad;
    __m512 mx = _mm512_set1_ps(-3.4e38f);
    for (int64_t s0 = 0; s0 < sn; s0 += 16) {
      const __mmask16 m = static_cast<__mmask16>((1u << std::min<int64_t>(16, sn - s0)) - 1u);
      mx = _mm512_mask_max_ps(mx, m, mx, _mm512_maskz_loadu_ps(m, row + s0));
    }
    const __m512 vmax = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t s0 = 0; s0 < sn; s0 += 16) {
      const __mmask16 m = static_cast<__mmask16>((1u << std::min<int64_t>(16, sn - s0)) - 1u);
      const __m512 e = _mm512_maskz_mov_ps(m, Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + s0), vmax)));
      sum = _mm512_add_ps(sum, e);
      _mm512_mask_storeu_ps(row + s0, m, e);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
    for (int64_t s0 = 0; s0 < sn; s0 += 16) {
      const __mmask16 m = static_cast<__mmask16>((1u << std::min<int64_t>(16, sn - s0)) - 1u);
      _mm512_mask_storeu_ps(row + s0, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + s0), inv));
    }
  }
  for (int64_t g0 = 0; g0 < p.g; g0 += kRows) {  // out[g, :] = Σ_s p[g, s] · values[s, :], 64 columns a block
    const int rows = static_cast<int>(std::min<int64_t>(kRows, p.g - g0));
    for (int64_t h0 = 0; h0 < p.h; h0 += 64) {
      const int cols = static_cast<int>(std::min<int64_t>(4, (p.h - h0) / 16));
      __m512 acc[kRows][4];
      for (int r = 0; r < kRows; ++r)
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
      for (int64_t ss = 0; ss < sn; ++ss) {
        const float* vrow = values + ss * p.h + h0;
        __m512 vv[4];
        for (int c = 0; c < cols; ++c) vv[c] = _mm512_loadu_ps(vrow + 16 * c);
        for (int r = 0; r < rows; ++r) {
          const __m512 pv = _mm512_set1_ps(logits[(g0 + r) * s_pad + ss]);
          for (int c = 0; c < cols; ++c) acc[r][c] = _mm512_fmadd_ps(pv, vv[c], acc[r][c]);
        }
      }
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c) _mm512_storeu_ps(out + (g0 + r) * p.h + h0 + 16 * c, acc[r][c]);
    }
  }
}

struct Shared {
  Problem p;
  int64_t pairs = 0;
  std::atomic<int64_t> next{0}, done{0};
};

void Drain(Shared& s) {
  thread_local std::vector<float> logits;
  const int64_t s_pad = (s.p.s + kLanes - 1) / kLanes * kLanes;
  if (logits.size() < static_cast<size_t>(s.p.g * s_pad)) logits.resize(s.p.g * s_pad);
  int64_t finished = 0;
  for (int64_t i; (i = s.next.fetch_add(1, std::memory_order_relaxed)) < s.pairs;) {
    Pair(s.p, i, logits.data(), s_pad);
    ++finished;
  }
  if (finished) s.done.fetch_add(finished, std::memory_order_release);
}

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> keys,
                               ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::PRED> allowed,
                               ffi::ResultBuffer<ffi::F32> out, float scale, float neg_inf) {
  auto qd = q.dimensions();
  auto kd = keys.dimensions();
  auto vd = values.dimensions();
  auto ad = allowed.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || ad.size() != 2 || kd[0] != qd[0] ||
      kd[1] != qd[1] || kd[2] != qd[3] || vd[0] != qd[0] || vd[1] != qd[1] || vd[2] != kd[3] ||
      vd[3] != qd[3] || ad[0] != qd[0] || ad[1] != kd[3] || qd[3] % 16)
    return ffi::Error::InvalidArgument(
        "atlas_decode_attention: expected q[B,K,G,H], keys[B,K,H,S], values[B,K,S,H], allowed[B,S], H % 16 == 0");
  auto s = std::make_shared<Shared>();
  s->p = Problem{q.typed_data(), keys.typed_data(), values.typed_data(), allowed.typed_data(),
                 out->typed_data(), qd[0], qd[1], qd[2], qd[3], kd[3], scale, neg_inf};
  s->pairs = qd[0] * qd[1];
  if (s->pairs == 0 || s->p.g == 0) return ffi::Error::Success();
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), s->pairs) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([s] { Drain(*s); });
  Drain(*s);
  while (s->done.load(std::memory_order_acquire) < s->pairs) _mm_pause();
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------------------------------------------
// Training self-attention, forward and backward (AtlasSelfAttentionFwd / AtlasSelfAttentionBwd): T queries over
// the same T keys, causal and within equal segment ids, q [B,T,N,H], k/v [B,T,K,H] in bf16 or f32 (all
// operands and outputs of one call in one dtype), segments int32 [B,T], G = N / K query heads per kv head.
// With q' = scale · q and allowed(t, s) = s <= t and seg[t] == seg[s]:
//   forward   l[t,s] = q'_t · k_s,  lse_t = log Σ_{s allowed} exp l[t,s],  p[t,s] = exp(l[t,s] - lse_t) (0 where
//             not allowed),  out_t = Σ_s p[t,s] v_s;  lse is returned ([B,N,T] f32) for the backward.
//   backward  dp[t,s] = do_t · v_s,  D_t = Σ_s p[t,s] dp[t,s],  ds[t,s] = p[t,s] (dp[t,s] - D_t),
//             dq_t = scale · Σ_s ds[t,s] k_s,  dk_s = Σ_t ds[t,s] q'_t,  dv_s = Σ_t p[t,s] do_t
//   (dk, dv summed over the G query heads of their kv head). Everything accumulates in f32; bf16 outputs are
//   rounded to nearest even. p is recomputed in the backward from lse (nothing T x T is stored), and only the
//   s <= t half of each score matrix is computed.
// Work: one task per (b, kv head) (all G heads and T queries of it), claimed as in the decode kernel; the
// kv head's k and v are converted once per task into f32 rows and transposed copies held by the thread.

struct SelfProblem {
  const void* q;
  const void* k;
  const void* v;
  const int32_t* seg;  // [B, T]
  const void* dout;    // backward: [B, T, N, H]
  const float* lse;    // backward: [B, N, T]
  void* out;           // forward: [B, T, N, H]
  float* lse_out;      // forward: [B, N, T]
  void* dq;            // backward: [B, T, N, H]
  void* dk;            // backward: [B, T, K, H]
  void* dv;
  int64_t b, t, n, kh, h;
  bool bf16;
  float scale;
};

// dst[i] = mul · src[offset + i] for i < count (count % 16 == 0), src bf16 or f32.
inline void LoadRow(const void* src, int64_t offset, int64_t count, bool bf16, float mul, float* dst) {
  const __m512 m = _mm512_set1_ps(mul);
  for (int64_t i = 0; i < count; i += 16) {
    __m512 x;
    if (bf16) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
          static_cast<const uint16_t*>(src) + offset + i));
      x = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    } else {
      x = _mm512_loadu_ps(static_cast<const float*>(src) + offset + i);
    }
    _mm512_storeu_ps(dst + i, _mm512_mul_ps(x, m));
  }
}

// dst[offset + i] = mul · src[i] for i < count (count % 16 == 0), dst bf16 (round to nearest even) or f32.
inline void StoreRow(const float* src, int64_t count, float mul, bool bf16, void* dst, int64_t offset) {
  const __m512 m = _mm512_set1_ps(mul);
  for (int64_t i = 0; i < count; i += 16) {
    const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(src + i), m);
    if (bf16) {
      const __m512i bits = _mm512_castps_si512(x);
      const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
      const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(dst) + offset + i),
                          _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
    } else {
      _mm512_storeu_ps(static_cast<float*>(dst) + offset + i, x);
    }
  }
}

// Lanes s0..s0+15 that query t may see: s <= t and seg[s] == seg[t].
inline __mmask16 Allowed(const int32_t* seg, int64_t s0, int64_t t) {
  const int64_t n = std::clamp<int64_t>(t + 1 - s0, 0, 16);
  const __mmask16 causal = static_cast<__mmask16>((1u << n) - 1u);
  const __m512i s = _mm512_maskz_loadu_epi32(causal, seg + s0);
  return _mm512_mask_cmpeq_epi32_mask(causal, s, _mm512_set1_epi32(seg[t]));
}

// The register-blocked loops below are templates on the row count (and column blocks) so the accumulators
// stay in registers; `Dispatch` picks the instance.
template <template <int, int> class F, typename... Args>
void Dispatch(int rows, int cols, Args... args) {
#define ATLAS_CASE(R, C) \
  if (rows == R && cols == C) return F<R, C>::Run(args...);
  ATLAS_CASE(1, 1) ATLAS_CASE(1, 2) ATLAS_CASE(1, 3) ATLAS_CASE(1, 4)
  ATLAS_CASE(2, 1) ATLAS_CASE(2, 2) ATLAS_CASE(2, 3) ATLAS_CASE(2, 4)
  ATLAS_CASE(3, 1) ATLAS_CASE(3, 2) ATLAS_CASE(3, 3) ATLAS_CASE(3, 4)
  ATLAS_CASE(4, 1) ATLAS_CASE(4, 2) ATLAS_CASE(4, 3) ATLAS_CASE(4, 4)
#undef ATLAS_CASE
}

// out[r * out_rs + 16c + j] = Σ_{i < n} a[r * a_rs + i] · b[i * b_rs + 16c + j]: R rows of scalars against n
// rows of C x 16 columns, the R x C accumulators in registers (both products below are this block).
template <int R, int C>
struct RowBlock {
  static void Run(const float* a, int64_t a_rs, const float* b, int64_t b_rs, int64_t n, float* out, int64_t out_rs) {
    __m512 acc[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; ++i) {
      const float* brow = b + i * b_rs;
      __m512 bv[C];
      for (int c = 0; c < C; ++c) bv[c] = _mm512_loadu_ps(brow + 16 * c);
      for (int r = 0; r < R; ++r) {
        const __m512 av = _mm512_set1_ps(a[r * a_rs + i]);
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(av, bv[c], acc[r][c]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + r * out_rs + 16 * c, acc[r][c]);
  }
};

// out[r][s] = Σ_h a[r][h] · bt[h][s] for r < rows, s < ceil16(len): rows of a (stride h) against a transposed
// [H][tp] operand, in blocks of up to 4 x 64.
void RowsTimesT(const float* a, int rows, const float* bt, int64_t tp, int64_t h, int64_t len, float* out) {
  for (int64_t s0 = 0; s0 < len; s0 += kLanes) {
    const int nb = static_cast<int>(std::min<int64_t>(4, (len - s0 + 15) / 16));
    Dispatch<RowBlock>(rows, nb, a, h, bt + s0, tp, h, out + s0, tp);
  }
}

// out[r][:] = Σ_{s < len} w[r][s] · rows[s][:] for r < nrows (w stride tp, rows and out stride h).
void WeightsTimesRows(const float* w, int nrows, int64_t tp, const float* rows, int64_t h, int64_t len,
                      float* out) {
  for (int64_t h0 = 0; h0 < h; h0 += 64) {
    const int cols = static_cast<int>(std::min<int64_t>(4, (h - h0) / 16));
    Dispatch<RowBlock>(nrows, cols, w, tp, rows + h0, h, len, out + h0, h);
  }
}

// acc[s][h0 : h0 + 16C] += Σ_r w[r][s] · a[r][h0 : h0 + 16C] for s < len, a's block held in registers.
template <int R, int C>
struct AccumulateOuterBlock {
  static void Run(const float* w, int64_t tp, const float* a, int64_t h, int64_t len, int64_t h0, float* acc) {
    __m512 av[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) av[r][c] = _mm512_loadu_ps(a + r * h + h0 + 16 * c);
    for (int64_t s = 0; s < len; ++s) {
      float* dst = acc + s * h + h0;
      __m512 x[C];
      for (int c = 0; c < C; ++c) x[c] = _mm512_loadu_ps(dst + 16 * c);
      for (int r = 0; r < R; ++r) {
        const __m512 wv = _mm512_set1_ps(w[r * tp + s]);
        for (int c = 0; c < C; ++c) x[c] = _mm512_fmadd_ps(wv, av[r][c], x[c]);
      }
      for (int c = 0; c < C; ++c) _mm512_storeu_ps(dst + 16 * c, x[c]);
    }
  }
};

// acc[s][:] += Σ_r w[r][s] · a[r][:] for s < len (the rank-`rows` update of dk or dv).
void AccumulateOuter(const float* w, int rows, int64_t tp, const float* a, int64_t h, int64_t len, float* acc) {
  for (int64_t h0 = 0; h0 < h; h0 += 64) {
    const int cols = static_cast<int>(std::min<int64_t>(4, (h - h0) / 16));
    Dispatch<AccumulateOuterBlock>(rows, cols, w, tp, a, h, len, h0, acc);
  }
}

// Per-thread f32 scratch of one task.
struct SelfScratch {
  std::vector<float> k, kt, v, vt, dk, dv, q, dout, p, dp, o;
  void Resize(int64_t t, int64_t tp, int64_t h) {
    for (auto* x : {&k, &v, &dk, &dv}) x->assign(t * h, 0.0f);
    for (auto* x : {&kt, &vt}) x->assign(h * tp, 0.0f);
    for (auto* x : {&q, &dout, &o}) x->assign(kRows * h, 0.0f);
    for (auto* x : {&p, &dp}) x->assign(kRows * tp, 0.0f);
  }
};

// k or v of (b, kv) as f32 rows [T][H] and, when `transposed`, as [H][tp] (zero beyond T).
void LoadKv(const SelfProblem& p, const void* src, int64_t b, int64_t kv, float* rows, float* transposed,
            int64_t tp) {
  for (int64_t s = 0; s < p.t; ++s) LoadRow(src, ((b * p.t + s) * p.kh + kv) * p.h, p.h, p.bf16, 1.0f, rows + s * p.h);
  if (!transposed) return;
  for (int64_t s = 0; s < p.t; ++s)
    for (int64_t hh = 0; hh < p.h; ++hh) transposed[hh * tp + s] = rows[s * p.h + hh];
}

// Scores of `rows` query heads (q' in sc.q) at query t over keys s <= t -> probabilities in sc.p (0 where not
// allowed). Forward (lse == nullptr): normalised with this row's own log-sum-exp, written to lse_out[r];
// backward: exp(l - lse[r]).
void Probabilities(const SelfProblem& p, SelfScratch& sc, const int32_t* seg, int64_t t, int rows, int64_t tp,
                   const float* lse, float* lse_out) {
  const int64_t len = t + 1;
  RowsTimesT(sc.q.data(), rows, sc.kt.data(), tp, p.h, len, sc.p.data());
  for (int r = 0; r < rows; ++r) {
    float* row = sc.p.data() + r * tp;
    float shift;
    if (lse) {
      shift = lse[r];
    } else {
      __m512 mx = _mm512_set1_ps(-3.4e38f);
      for (int64_t s0 = 0; s0 < len; s0 += 16)
        mx = _mm512_mask_max_ps(mx, Allowed(seg, s0, t), mx, _mm512_loadu_ps(row + s0));
      shift = _mm512_reduce_max_ps(mx);
    }
    const __m512 vshift = _mm512_set1_ps(shift);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t s0 = 0; s0 < len; s0 += 16) {
      const __m512 e = _mm512_maskz_mov_ps(Allowed(seg, s0, t), Exp(_mm512_sub_ps(_mm512_loadu_ps(row + s0), vshift)));
      sum = _mm512_add_ps(sum, e);
      _mm512_storeu_ps(row + s0, e);
    }
    if (lse) continue;
    const float total = _mm512_reduce_add_ps(sum);
    const __m512 inv = _mm512_set1_ps(1.0f / total);
    for (int64_t s0 = 0; s0 < len; s0 += 16) _mm512_storeu_ps(row + s0, _mm512_mul_ps(_mm512_loadu_ps(row + s0), inv));
    lse_out[r] = shift + std::log(total);
  }
}

void SelfForwardTask(const SelfProblem& p, int64_t task, SelfScratch& sc, int64_t tp) {
  const int64_t b = task / p.kh, kv = task % p.kh, g = p.n / p.kh;
  const int32_t* seg = p.seg + b * p.t;
  LoadKv(p, p.k, b, kv, sc.k.data(), sc.kt.data(), tp);
  LoadKv(p, p.v, b, kv, sc.v.data(), nullptr, tp);
  float lse[kRows];
  for (int64_t t = 0; t < p.t; ++t)
    for (int64_t g0 = 0; g0 < g; g0 += kRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kRows, g - g0));
      const int64_t head0 = kv * g + g0, qoff = ((b * p.t + t) * p.n + head0) * p.h;
      LoadRow(p.q, qoff, rows * p.h, p.bf16, p.scale, sc.q.data());
      Probabilities(p, sc, seg, t, rows, tp, nullptr, lse);
      WeightsTimesRows(sc.p.data(), rows, tp, sc.v.data(), p.h, t + 1, sc.o.data());
      StoreRow(sc.o.data(), rows * p.h, 1.0f, p.bf16, p.out, qoff);
      for (int r = 0; r < rows; ++r) p.lse_out[(b * p.n + head0 + r) * p.t + t] = lse[r];
    }
}

void SelfBackwardTask(const SelfProblem& p, int64_t task, SelfScratch& sc, int64_t tp) {
  const int64_t b = task / p.kh, kv = task % p.kh, g = p.n / p.kh;
  const int32_t* seg = p.seg + b * p.t;
  LoadKv(p, p.k, b, kv, sc.k.data(), sc.kt.data(), tp);
  LoadKv(p, p.v, b, kv, sc.v.data(), sc.vt.data(), tp);
  std::fill(sc.dk.begin(), sc.dk.end(), 0.0f);
  std::fill(sc.dv.begin(), sc.dv.end(), 0.0f);
  float lse[kRows];
  for (int64_t t = 0; t < p.t; ++t)
    for (int64_t g0 = 0; g0 < g; g0 += kRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kRows, g - g0));
      const int64_t head0 = kv * g + g0, qoff = ((b * p.t + t) * p.n + head0) * p.h, len = t + 1;
      LoadRow(p.q, qoff, rows * p.h, p.bf16, p.scale, sc.q.data());
      LoadRow(p.dout, qoff, rows * p.h, p.bf16, 1.0f, sc.dout.data());
      for (int r = 0; r < rows; ++r) lse[r] = p.lse[(b * p.n + head0 + r) * p.t + t];
      Probabilities(p, sc, seg, t, rows, tp, lse, nullptr);
      RowsTimesT(sc.dout.data(), rows, sc.vt.data(), tp, p.h, len, sc.dp.data());
      for (int r = 0; r < rows; ++r) {  // dp -> ds = p (dp - D), D = Σ p dp
        const float* pr = sc.p.data() + r * tp;
        float* dr = sc.dp.data() + r * tp;
        __m512 d = _mm512_setzero_ps();
        for (int64_t s0 = 0; s0 < len; s0 += 16) {  // p is 0 on lanes s > t
          d = _mm512_fmadd_ps(_mm512_loadu_ps(pr + s0), _mm512_loadu_ps(dr + s0), d);
        }
        const __m512 vd = _mm512_set1_ps(_mm512_reduce_add_ps(d));
        for (int64_t s0 = 0; s0 < len; s0 += 16)
          _mm512_storeu_ps(dr + s0, _mm512_mul_ps(_mm512_loadu_ps(pr + s0), _mm512_sub_ps(_mm512_loadu_ps(dr + s0), vd)));
      }
      WeightsTimesRows(sc.dp.data(), rows, tp, sc.k.data(), p.h, len, sc.o.data());
      StoreRow(sc.o.data(), rows * p.h, p.scale, p.bf16, p.dq, qoff);
      AccumulateOuter(sc.dp.data(), rows, tp, sc.q.data(), p.h, len, sc.dk.data());
      AccumulateOuter(sc.p.data(), rows, tp, sc.dout.data(), p.h, len, sc.dv.data());
    }
  for (int64_t s = 0; s < p.t; ++s) {
    const int64_t off = ((b * p.t + s) * p.kh + kv) * p.h;
    StoreRow(sc.dk.data() + s * p.h, p.h, 1.0f, p.bf16, p.dk, off);
    StoreRow(sc.dv.data() + s * p.h, p.h, 1.0f, p.bf16, p.dv, off);
  }
}

struct SelfShared {
  SelfProblem p;
  bool backward = false;
  int64_t tasks = 0;
  std::atomic<int64_t> next{0}, done{0};
};

void SelfDrain(SelfShared& s) {
  thread_local SelfScratch sc;
  const int64_t tp = (s.p.t + 15) / 16 * 16;
  int64_t finished = 0;
  bool sized = false;
  for (int64_t i; (i = s.next.fetch_add(1, std::memory_order_relaxed)) < s.tasks;) {
    if (!sized) {
      sc.Resize(s.p.t, tp, s.p.h);
      sized = true;
    }
    if (s.backward)
      SelfBackwardTask(s.p, i, sc, tp);
    else
      SelfForwardTask(s.p, i, sc, tp);
    ++finished;
  }
  if (finished) s.done.fetch_add(finished, std::memory_order_release);
}

ffi::Error SelfRun(ffi::ThreadPool& pool, std::shared_ptr<SelfShared> s) {
  s->tasks = s->p.b * s->p.kh;
  if (s->tasks == 0 || s->p.t == 0) return ffi::Error::Success();
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), s->tasks) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([s] { SelfDrain(*s); });
  SelfDrain(*s);
  while (s->done.load(std::memory_order_acquire) < s->tasks) _mm_pause();
  return ffi::Error::Success();
}

// Checks q [B,T,N,H], k and v [B,T,K,H], seg [B,T], one dtype (bf16 or f32), N % K == 0, H % 16 == 0.
ffi::Error SelfCheck(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k, const ffi::AnyBuffer& v,
                     const ffi::Buffer<ffi::S32>& seg, SelfProblem& p) {
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  auto vd = v.dimensions();
  auto sd = seg.dimensions();
  const auto dt = q.element_type();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || sd.size() != 2 ||
      (dt != ffi::DataType::BF16 && dt != ffi::DataType::F32) || k.element_type() != dt ||
      v.element_type() != dt || kd[0] != qd[0] || kd[1] != qd[1] || kd[3] != qd[3] || kd[2] == 0 ||
      qd[2] % kd[2] || qd[3] % 16 || vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[2] || vd[3] != kd[3] ||
      sd[0] != qd[0] || sd[1] != qd[1])
    return ffi::Error::InvalidArgument(
        "atlas_self_attention: expected q[B,T,N,H], k/v[B,T,K,H] (one dtype, bf16 or f32), seg[B,T] int32, "
        "N % K == 0, H % 16 == 0");
  p.b = qd[0];
  p.t = qd[1];
  p.n = qd[2];
  p.kh = kd[2];
  p.h = qd[3];
  p.bf16 = dt == ffi::DataType::BF16;
  p.q = q.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.seg = seg.typed_data();
  return ffi::Error::Success();
}

ffi::Error SelfForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                           ffi::Buffer<ffi::S32> seg, ffi::Result<ffi::AnyBuffer> out,
                           ffi::ResultBuffer<ffi::F32> lse, float scale) {
  auto s = std::make_shared<SelfShared>();
  if (auto err = SelfCheck(q, k, v, seg, s->p); err.failure()) return err;
  if (out->element_type() != q.element_type() || out->element_count() != q.element_count() ||
      lse->element_count() != s->p.b * s->p.n * s->p.t)
    return ffi::Error::InvalidArgument("atlas_self_attention: out must match q, lse must be [B,N,T] f32");
  s->p.out = out->untyped_data();
  s->p.lse_out = lse->typed_data();
  s->p.scale = scale;
  return SelfRun(pool, s);
}

ffi::Error SelfBackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                            ffi::Buffer<ffi::S32> seg, ffi::AnyBuffer dout, ffi::Buffer<ffi::F32> lse,
                            ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                            ffi::Result<ffi::AnyBuffer> dv, float scale) {
  auto s = std::make_shared<SelfShared>();
  if (auto err = SelfCheck(q, k, v, seg, s->p); err.failure()) return err;
  const auto dt = q.element_type();
  if (dout.element_type() != dt || dout.element_count() != q.element_count() ||
      lse.element_count() != s->p.b * s->p.n * s->p.t || dq->element_type() != dt ||
      dq->element_count() != q.element_count() || dk->element_type() != dt ||
      dk->element_count() != k.element_count() || dv->element_type() != dt ||
      dv->element_count() != v.element_count())
    return ffi::Error::InvalidArgument(
        "atlas_self_attention_bwd: dout/dq must match q, dk/dv match k/v, lse [B,N,T] f32");
  s->p.dout = dout.untyped_data();
  s->p.lse = lse.typed_data();
  s->p.dq = dq->untyped_data();
  s->p.dk = dk->untyped_data();
  s->p.dv = dv->untyped_data();
  s->p.scale = scale;
  s->backward = true;
  return SelfRun(pool, s);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AtlasDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<float>("neg_inf"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AtlasSelfAttentionFwd, SelfForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AtlasSelfAttentionBwd, SelfBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("scale"));
