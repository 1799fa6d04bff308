// One decode step of attention over a float32 KV cache, for XLA:CPU on AVX-512 CPUs, as an XLA FFI custom call
// (registered by atlas_jax/kernels/cpu_attention.py; used by attention.cached_attention for one query token).
//
// For each batch row b and kv head k, with the G query heads of that kv head as rows:
//   logits[g, s] = scale · Σ_h q[b,k,g,h] · keys[b,k,h,s]        (keys stored [B,K,H,S], as the cache keeps them)
//   p[g, :]      = softmax over s of logits, with logits[g, s] = neg_inf where allowed[b, s] is false
//   out[b,k,g,:] = Σ_s p[g, s] · values[b,k,s,:]                   (values stored [B,K,S,H])
// all in float32; exp is a degree-6 polynomial of 2^f on f in [-0.5, 0.5] scaled by 2^n (relative error
// ~2e-7). One pass reads each (b, k) block of the cache once; XLA:CPU ran the same as two batched matmuls of
// G rows each plus a softmax, 10 ms of a 26 ms peer-model decode step (2026-12-04, Xeon with AMX).
//
// Work: (b, k) pairs claimed from an atomic counter by the caller and helpers on XLA's intra-op pool (the caller
// waits only for claimed pairs, so a busy pool cannot deadlock it). Needs H % 16 == 0 (cpu_attention.py checks).
//
// Build: g++ -O3 -std=c++17 -shared -fPIC -mavx512f -mavx512bw -mavx512vl -mfma -I$(jax ffi include dir) cpu_attention.cc -o x.so
#include <immintrin.h>

#include <algorithm>
#include <atomic>
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

// One (b, k) pair; logits is scratch of G x S_pad floats.
void Pair(const Problem& p, int64_t pair, float* logits, int64_t s_pad) {
  const int64_t b = pair / p.k;
  const float* q = p.q + pair * p.g * p.h;
  const float* keys = p.keys + pair * p.h * p.s;
  const float* values = p.values + pair * p.s * p.h;
  const bool* allowed = p.allowed + b * p.s;
  float* out = p.out + pair * p.g * p.h;
  for (int64_t g0 = 0; g0 < p.g; g0 += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, p.g - g0));
    for (int64_t s0 = 0; s0 < p.s; s0 += kLanes) {
      __m512 acc[kRows][4];
      for (int r = 0; r < kRows; ++r)
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
      const int64_t left = p.s - s0;
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
    for (int64_t s0 = 0; s0 < p.s; s0 += 16) {
      const __mmask16 m = static_cast<__mmask16>((1u << std::min<int64_t>(16, p.s - s0)) - 1u);
      mx = _mm512_mask_max_ps(mx, m, mx, _mm512_maskz_loadu_ps(m, row + s0));
    }
    const __m512 vmax = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t s0 = 0; s0 < p.s; s0 += 16) {
      const __mmask16 m = static_cast<__mmask16>((1u << std::min<int64_t>(16, p.s - s0)) - 1u);
      const __m512 e = _mm512_maskz_mov_ps(m, Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + s0), vmax)));
      sum = _mm512_add_ps(sum, e);
      _mm512_mask_storeu_ps(row + s0, m, e);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
    for (int64_t s0 = 0; s0 < p.s; s0 += 16) {
      const __mmask16 m = static_cast<__mmask16>((1u << std::min<int64_t>(16, p.s - s0)) - 1u);
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
      for (int64_t ss = 0; ss < p.s; ++ss) {
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
