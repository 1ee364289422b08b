// One-token attention against a static KV cache, on the CPU (torch-free, header-only).
//
// For every (row b, head h): scores s_j = <past_k[b, h, j], q> for the n = clamp(pos[b], 0, S) written slots of that
// row (every row sits at its own position: continuous batching) and
// s_self = <k, q> (q is pre-scaled by the export), softmax over [s_0 .. s_{n-1}, s_self] in float32, and
//     y = (sum_j e_j past_v[b, h, j] + e_self v) / (sum_j e_j + e_self).
// The cache is read once (keys, then values); nothing is copied or allocated besides a per-thread score buffer.
// Shapes: q, k, v, y (B, H, 1, hd); past_k, past_v (B, H, S, hd); all float32, contiguous. The caller splits the
// B*H (row, head) tasks over threads: attention_task does one, attention_group<G> G at once. One core streaming
// one task's keys then values reads ~15-17 GB/s here (AMD EPYC, Zen 4); two tasks read side by side, as two
// concurrent streams, ~20-21 GB/s (more misses in flight). A group's arithmetic is attention_task's, bit for bit;
// a group whose tasks see different n (rows at different positions) runs them one by one instead.
//
// Narrow caches (the bundle's kv_dtype): the same kernel over a cache of float16 (F16: each element widened to
// float32 as it is read) or int8 with one float32 scale per (row, head, slot) for keys and for values (I8: a slot's
// key row is x_j = k_scale_j * kq_j, its value row v_scale_j * vq_j). The int8 scales never touch the elements: a
// score is k_scale_j * <kq_j, q> and a value row enters with weight e_j * v_scale_j, so the cache is read once at
// 1 (int8) or 2 (float16) bytes per element. The token's own k, v stay float32 (they are this step's values; the
// cache holds their narrow copies for the next steps). Cache element types are policies (F32, F16Avx2/F16Scalar,
// I8Avx2/I8Scalar): the AVX2 launcher instantiates the ones with F16C / AVX2 conversions. I8Avx2 scores the
// keys in integers (its score_keys): q rounded to int16 with one scale per task (relative error <= 2^-16 of
// max|q|), int8 x int16 products summed exactly in int32 (vpmaddwd: 16 elements per instruction, twice the float
// path's rate; hd a multiple of 16 up to 256, so no sum can overflow), then one float multiply per slot.
//
// Arithmetic: float32 throughout, dot products and sums in 8-lane partial sums (GCC vector extensions: AVX2 + FMA
// contraction in the target("avx2,fma") instantiation, SSE pairs otherwise), exp by a degree-6 polynomial of 2^f (relative
// error ~1e-7 on [-87, 0]). The result differs from the standard-ops graph only by float32 rounding.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#define LARP_ATTN_INLINE __attribute__((always_inline)) inline  // so that the AVX2 caller's target applies

namespace larp_rt {
namespace attn {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

LARP_ATTN_INLINE v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
LARP_ATTN_INLINE void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }
LARP_ATTN_INLINE v8f splat(float x) { return v8f{x, x, x, x, x, x, x, x}; }
LARP_ATTN_INLINE float hsum(v8f v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }
LARP_ATTN_INLINE float hmax(v8f v) {
  float m = v[0];
  for (int i = 1; i < 8; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
LARP_ATTN_INLINE v8f vmax(v8f a, v8f b) { return a > b ? a : b; }

// e^x for x <= 0 (inputs below -87 give ~0): 2^(x log2 e) = 2^i * 2^f, f in [0, 1)
LARP_ATTN_INLINE v8f exp8(v8f x) {
  x = vmax(x, splat(-87.0f));
  const v8f t = x * splat(1.44269504088896341f);
  v8i i = __builtin_convertvector(t, v8i);  // truncation toward zero
  v8f fi = __builtin_convertvector(i, v8f);
  const v8i neg = fi > t;  // -1 where truncation rounded up (t < 0, not an integer)
  i += neg;
  fi = __builtin_convertvector(i, v8f);
  const v8f f = t - fi;
  // 2^f, f in [0, 1): degree-6 fit on Chebyshev nodes, relative error 2e-9 (8e-8 evaluated in float32)
  v8f p = splat(2.16138083e-04f);
  p = p * f + splat(1.24673764e-03f);
  p = p * f + splat(9.67553263e-03f);
  p = p * f + splat(5.54852202e-02f);
  p = p * f + splat(2.40229325e-01f);
  p = p * f + splat(6.93147042e-01f);
  p = p * f + splat(1.0f);
  const v8i bits = (i + 127) << 23;
  v8f scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

LARP_ATTN_INLINE float exp1(float x) {
  v8f v = exp8(splat(x));
  return v[0];
}

LARP_ATTN_INLINE float dot(const float* a, const float* b, int64_t d) {
  v8f acc = splat(0.0f);
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) acc += load8(a + i) * load8(b + i);
  float s = hsum(acc);
  for (; i < d; ++i) s += a[i] * b[i];
  return s;
}

struct Args {
  const float* q;
  const float* k;
  const float* v;
  const void* past_k;  // [B, H, S, hd] of the policy's element type
  const void* past_v;
  float* y;
  const int64_t* pos;  // [B]: row b's position (its written slots, before clamping to [0, S])
  int64_t heads, slots, head_dim;  // H, S, hd
  const float* k_scale = nullptr;  // I8 only: [B, H, S] per-slot scales of keys and values
  const float* v_scale = nullptr;
};

// Cache element policies: T, load(p) = 8 elements widened to float32, get(p) = one, scaled = has per-slot scales.
struct F32 {
  typedef float T;
  static constexpr bool scaled = false;
  static constexpr bool int_keys = false;  // true: C::score_keys(kp, q, n, hd, s) scores the keys in integers
  static LARP_ATTN_INLINE v8f load(const T* p) { return load8(p); }
  static LARP_ATTN_INLINE float get(const T* p) { return *p; }
};

LARP_ATTN_INLINE float half_to_float(uint16_t h) {  // IEEE binary16 -> float32, exact (subnormals, inf, nan)
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: man * 2^-24
    float f = (float)man * 5.9604644775390625e-8f;
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

struct F16Scalar {
  typedef uint16_t T;
  static constexpr bool scaled = false;
  static constexpr bool int_keys = false;  // true: C::score_keys(kp, q, n, hd, s) scores the keys in integers
  static LARP_ATTN_INLINE v8f load(const T* p) {
    v8f v;
    for (int i = 0; i < 8; ++i) v[i] = half_to_float(p[i]);
    return v;
  }
  static LARP_ATTN_INLINE float get(const T* p) { return half_to_float(*p); }
};

struct I8Scalar {
  typedef int8_t T;
  static constexpr bool scaled = true;
  static constexpr bool int_keys = false;
  static LARP_ATTN_INLINE v8f load(const T* p) {
    v8f v;
    for (int i = 0; i < 8; ++i) v[i] = (float)p[i];
    return v;
  }
  static LARP_ATTN_INLINE float get(const T* p) { return (float)*p; }
};

// n of task = b * H + h: the written slots of row b, clamp(pos[b], 0, S)
LARP_ATTN_INLINE int64_t valid_slots(const Args& a, int64_t task) {
  const int64_t p = a.pos[task / a.heads];
  return p < 0 ? 0 : (p > a.slots ? a.slots : p);
}

template <class C>
LARP_ATTN_INLINE const typename C::T* cache_k(const Args& a) { return static_cast<const typename C::T*>(a.past_k); }
template <class C>
LARP_ATTN_INLINE const typename C::T* cache_v(const Args& a) { return static_cast<const typename C::T*>(a.past_v); }

// <q, row> over hd elements of a cache row
template <class C>
LARP_ATTN_INLINE float dot_row(const typename C::T* row, const float* q, int64_t d) {
  v8f acc = splat(0.0f);
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) acc += C::load(row + i) * load8(q + i);
  float s = hsum(acc);
  for (; i < d; ++i) s += C::get(row + i) * q[i];
  return s;
}

// I8: scores times the keys' scales (s_j = k_scale_j <kq_j, q>); a no-op for the float caches
template <class C>
LARP_ATTN_INLINE void scale_scores(const Args& a, int64_t task, float* s, int64_t n) {
  if constexpr (C::scaled) {
    const float* ks = a.k_scale + task * a.slots;
    for (int64_t j = 0; j < n; ++j) s[j] *= ks[j];
  }
}

// I8: softmax weights times the values' scales (the value rows enter as e_j v_scale_j vq_j); the normaliser 1/sum
// was taken before, over the unscaled e_j
template <class C>
LARP_ATTN_INLINE void scale_weights(const Args& a, int64_t task, float* w, int64_t n) {
  if constexpr (C::scaled) {
    const float* vs = a.v_scale + task * a.slots;
    for (int64_t j = 0; j < n; ++j) w[j] *= vs[j];
  }
}

// y[d, d + 8K) = (sum_r w_r v_r + e_self v) * inv: K 8-lane accumulators, one pass over the value rows.
template <class C, int K>
LARP_ATTN_INLINE void weighted_values(const Args& a, int64_t task, const float* w, int64_t n, float e_self,
                                      float inv, int64_t d) {
  const int64_t hd = a.head_dim;
  const typename C::T* vp = cache_v<C>(a) + task * a.slots * hd + d;
  v8f acc[K];
  for (int i = 0; i < K; ++i) acc[i] = splat(0.0f);
  for (int64_t r = 0; r < n; ++r) {
    const typename C::T* row = vp + r * hd;
    const v8f wr = splat(w[r]);
    for (int i = 0; i < K; ++i) acc[i] += wr * C::load(row + 8 * i);
  }
  const float* vs = a.v + task * hd + d;
  float* y = a.y + task * hd + d;
  const v8f ws = splat(e_self), iv = splat(inv);
  for (int i = 0; i < K; ++i) store8(y + 8 * i, (acc[i] + ws * load8(vs + 8 * i)) * iv);
}

// Scores s[0, n) -> their exponentials e_j = exp(s_j - m), m = max(s, s_self), in place; returns e_self and sets
// inv = 1 / (sum_j e_j + e_self).
LARP_ATTN_INLINE float softmax_in_place(float* s, int64_t n, float s_self, float* inv) {
  v8f mv = splat(s_self);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) mv = vmax(mv, load8(s + j));
  float m = hmax(mv);
  for (; j < n; ++j) m = s[j] > m ? s[j] : m;
  v8f sv = splat(0.0f);
  j = 0;
  for (; j + 8 <= n; j += 8) {
    const v8f e = exp8(load8(s + j) - splat(m));
    store8(s + j, e);
    sv += e;
  }
  float sum = hsum(sv);
  for (; j < n; ++j) {
    s[j] = exp1(s[j] - m);
    sum += s[j];
  }
  const float e_self = exp1(s_self - m);
  *inv = 1.0f / (sum + e_self);
  return e_self;
}

// y[d] for the columns weighted_values<K> leaves (hd not a multiple of 32), one at a time.
template <class C>
LARP_ATTN_INLINE void weighted_values_tail(const Args& a, int64_t task, const float* w, int64_t n, float e_self,
                                           float inv, int64_t d) {
  const int64_t hd = a.head_dim;
  const typename C::T* vp = cache_v<C>(a) + task * a.slots * hd;
  for (; d < hd; ++d) {
    float acc = 0.0f;
    for (int64_t r = 0; r < n; ++r) acc += w[r] * C::get(vp + r * hd + d);
    a.y[task * hd + d] = (acc + e_self * a.v[task * hd + d]) * inv;
  }
}

LARP_ATTN_INLINE float* score_buffer(int64_t floats) {
  thread_local std::vector<float> score;
  if ((int64_t)score.size() < floats) score.resize(floats);
  return score.data();
}

// One (row, head) task: task = b * H + h.
template <class C>
LARP_ATTN_INLINE void attention_task(const Args& a, int64_t task) {
  const int64_t hd = a.head_dim, n = valid_slots(a, task);
  const float* q = a.q + task * hd;
  const typename C::T* kp = cache_k<C>(a) + task * a.slots * hd;
  float* s = score_buffer(n + 8);
  bool scored = false;
  if constexpr (C::int_keys) scored = C::score_keys(kp, q, n, hd, s);  // false: this hd takes the float path
  if (scored) {
  } else if (hd % 8 == 0) {  // four slots per pass: four independent accumulators, one combined reduction
    int64_t j4 = 0;
    for (; j4 + 4 <= n; j4 += 4) {
      const typename C::T* r0 = kp + j4 * hd;
      v8f a0 = splat(0.0f), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t i = 0; i < hd; i += 8) {
        const v8f qv = load8(q + i);
        a0 += C::load(r0 + i) * qv;
        a1 += C::load(r0 + hd + i) * qv;
        a2 += C::load(r0 + 2 * hd + i) * qv;
        a3 += C::load(r0 + 3 * hd + i) * qv;
      }
      s[j4] = hsum(a0);
      s[j4 + 1] = hsum(a1);
      s[j4 + 2] = hsum(a2);
      s[j4 + 3] = hsum(a3);
    }
    for (; j4 < n; ++j4) s[j4] = dot_row<C>(kp + j4 * hd, q, hd);
  } else {
    for (int64_t j = 0; j < n; ++j) s[j] = dot_row<C>(kp + j * hd, q, hd);
  }
  scale_scores<C>(a, task, s, n);
  float inv;
  const float e_self = softmax_in_place(s, n, dot(a.k + task * hd, q, hd), &inv);
  scale_weights<C>(a, task, s, n);
  // weighted values: y = (sum_j e_j v_j + e_self v) / sum
  int64_t d = 0;
  for (; d + 64 <= hd; d += 64) weighted_values<C, 8>(a, task, s, n, e_self, inv, d);  // one pass over 64 columns
  for (; d + 32 <= hd; d += 32) weighted_values<C, 4>(a, task, s, n, e_self, inv, d);
  weighted_values_tail<C>(a, task, s, n, e_self, inv, d);
}

// weighted_values<K> for tasks [t, t + G) in one pass: their value rows as G concurrent streams.
template <class C, int G, int K>
LARP_ATTN_INLINE void weighted_values_group(const Args& a, int64_t t, float* const* w, int64_t n,
                                            const float* e_self, const float* inv, int64_t d) {
  const int64_t hd = a.head_dim;
  const typename C::T* vp[G];
  v8f acc[G][K];
  for (int g = 0; g < G; ++g) {
    vp[g] = cache_v<C>(a) + (t + g) * a.slots * hd + d;
    for (int i = 0; i < K; ++i) acc[g][i] = splat(0.0f);
  }
  for (int64_t r = 0; r < n; ++r) {
    for (int g = 0; g < G; ++g) {
      const v8f x = splat(w[g][r]);
      for (int i = 0; i < K; ++i) acc[g][i] += x * C::load(vp[g] + r * hd + 8 * i);
    }
  }
  for (int g = 0; g < G; ++g) {
    const float* vs = a.v + (t + g) * hd + d;
    float* y = a.y + (t + g) * hd + d;
    const v8f ws = splat(e_self[g]), iv = splat(inv[g]);
    for (int i = 0; i < K; ++i) store8(y + 8 * i, (acc[g][i] + ws * load8(vs + 8 * i)) * iv);
  }
}

// Tasks [t, t + G) at once (hd a multiple of 8, one n for all): same results as attention_task on each, bit for
// bit. Otherwise (tasks of rows at different positions, e.g. a pair across two rows) one task at a time.
template <class C, int G>
LARP_ATTN_INLINE void attention_group(const Args& a, int64_t t) {
  const int64_t hd = a.head_dim, n = valid_slots(a, t);
  bool same = hd % 8 == 0;
  for (int g = 1; g < G; ++g) same = same && valid_slots(a, t + g) == n;
  if (!same) {
    for (int g = 0; g < G; ++g) attention_task<C>(a, t + g);
    return;
  }
  const float* q[G];
  const typename C::T* kp[G];
  float* s[G];
  float* buf = score_buffer(G * (n + 8));
  for (int g = 0; g < G; ++g) {
    q[g] = a.q + (t + g) * hd;
    kp[g] = cache_k<C>(a) + (t + g) * a.slots * hd;
    s[g] = buf + g * (n + 8);
  }
  bool scored = false;
  if constexpr (C::int_keys) {
    scored = true;
    for (int g = 0; g < G; ++g) scored = C::score_keys(kp[g], q[g], n, hd, s[g]) && scored;
  }
  for (int64_t j = 0; j < n && !scored; ++j) {  // slot j of every task per pass: G key streams side by side
    v8f acc[G];
    for (int g = 0; g < G; ++g) acc[g] = splat(0.0f);
    for (int64_t i = 0; i < hd; i += 8)
      for (int g = 0; g < G; ++g) acc[g] += C::load(kp[g] + j * hd + i) * load8(q[g] + i);
    for (int g = 0; g < G; ++g) s[g][j] = hsum(acc[g]);
  }
  float inv[G], e_self[G];
  for (int g = 0; g < G; ++g) {
    scale_scores<C>(a, t + g, s[g], n);
    e_self[g] = softmax_in_place(s[g], n, dot(a.k + (t + g) * hd, q[g], hd), &inv[g]);
    scale_weights<C>(a, t + g, s[g], n);
  }
  int64_t d = 0;
  for (; d + 64 <= hd; d += 64) weighted_values_group<C, G, 8>(a, t, s, n, e_self, inv, d);
  for (; d + 32 <= hd; d += 32) weighted_values_group<C, G, 4>(a, t, s, n, e_self, inv, d);
  for (int g = 0; g < G; ++g) weighted_values_tail<C>(a, t + g, s[g], n, e_self[g], inv[g], d);
}

// Tasks [t0, t1): in pairs, the odd one out alone. (Groups of 4 read no faster than pairs here: ~20 GB/s on one
// core either way, against ~15 for one task at a time; 8 spill registers and are slower.)
template <class C>
LARP_ATTN_INLINE void attention_tasks(const Args& a, int64_t t0, int64_t t1) {
  int64_t t = t0;
  for (; t + 2 <= t1; t += 2) attention_group<C, 2>(a, t);
  if (t < t1) attention_task<C>(a, t);
}

}  // namespace attn
}  // namespace larp_rt
