// Launcher of the one-token cache attention (include/larp_rt/attention_cpu.h): an AVX2+FMA(+F16C) instantiation
// chosen at run time (the portable one otherwise) for each cache type (float32, float16, int8 + scales), a C ABI
// for ctypes tests and the ONNX Runtime op.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "larp_rt/attention_cpu.h"
#include "larp_rt/larp_sampling.h"

namespace {

using larp_rt::attn::Args;
using larp_rt::attn::attention_tasks;
using larp_rt::attn::v8f;

#define LARP_AVX2 __attribute__((target("avx2,fma,f16c")))

LARP_AVX2 inline v8f from_m256(__m256 r) {
  v8f v;
  std::memcpy(&v, &r, sizeof v);
  return v;
}

// float16 elements widened by F16C (vcvtph2ps: exact), int8 sign-extended and converted (vpmovsxbd + vcvtdq2ps)
struct F16Avx2 {
  typedef uint16_t T;
  static constexpr bool scaled = false;
  static constexpr bool int_keys = false;
  static LARP_AVX2 inline v8f load(const T* p) {
    return from_m256(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static LARP_ATTN_INLINE float get(const T* p) { return larp_rt::attn::half_to_float(*p); }
};

struct I8Avx2 {
  typedef int8_t T;
  static constexpr bool scaled = true;
  static constexpr bool int_keys = true;

  // s[j] = qscale * sum_d qi[d] kq[j, d] for the n slots at kp (rows of hd int8), qi = round(q / qscale) int16,
  // qscale = max|q| / 32767; exact int32 sums (|qi kq| <= 32767 * 127, hd <= 256 terms). False (nothing written)
  // when hd is not a multiple of 16 or above 256: the float path scores those.
  static LARP_AVX2 inline bool score_keys(const T* kp, const float* q, int64_t n, int64_t hd, float* s) {
    if (hd % 16 != 0 || hd > 256) return false;
    float amax = 0.0f;
    for (int64_t i = 0; i < hd; ++i) amax = std::max(amax, std::fabs(q[i]));
    alignas(32) int16_t qi[256];
    const float qscale = amax > 0.0f ? amax / 32767.0f : 1.0f;
    const __m256 inv = _mm256_set1_ps(1.0f / qscale);
    for (int64_t i = 0; i < hd; i += 8) {  // round half to even, then saturating pack (|x| <= 32767 + rounding)
      const __m256i w = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(q + i), inv));
      const __m128i p = _mm_packs_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
      _mm_store_si128(reinterpret_cast<__m128i*>(qi + i), p);
    }
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {  // four slots per pass, one horizontal reduction of the four
      const T* r = kp + j * hd;
      __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t i = 0; i < hd; i += 16) {
        const __m256i qv = _mm256_load_si256(reinterpret_cast<const __m256i*>(qi + i));
        a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(row16(r + i), qv));
        a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(row16(r + hd + i), qv));
        a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(row16(r + 2 * hd + i), qv));
        a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(row16(r + 3 * hd + i), qv));
      }
      const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
      const __m128i t = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));  // slots j..j+3
      _mm_storeu_ps(s + j, _mm_mul_ps(_mm_cvtepi32_ps(t), _mm_set1_ps(qscale)));
    }
    for (; j < n; ++j) {
      const T* r = kp + j * hd;
      __m256i a = _mm256_setzero_si256();
      for (int64_t i = 0; i < hd; i += 16)
        a = _mm256_add_epi32(a, _mm256_madd_epi16(row16(r + i),
                                                  _mm256_load_si256(reinterpret_cast<const __m256i*>(qi + i))));
      const __m128i t = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
      const __m128i u = _mm_hadd_epi32(_mm_hadd_epi32(t, t), _mm_hadd_epi32(t, t));
      s[j] = (float)_mm_cvtsi128_si32(u) * qscale;
    }
    return true;
  }
  static LARP_AVX2 inline __m256i row16(const T* r) {  // 16 int8 -> 16 int16
    return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r)));
  }
  static LARP_AVX2 inline v8f load(const T* p) {
    return from_m256(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
  }
  static LARP_ATTN_INLINE float get(const T* p) { return (float)*p; }
};

// flatten: the policies' F16C / AVX2 loads (not always_inline: the generic template bodies have no target) are
// inlined here, where the target allows them
__attribute__((target("avx2,fma,f16c"), flatten)) void run_avx2(const Args& a, int kv, int64_t t0, int64_t t1) {
  if (kv == 0)
    attention_tasks<larp_rt::attn::F32>(a, t0, t1);
  else if (kv == 1)
    attention_tasks<F16Avx2>(a, t0, t1);
  else
    attention_tasks<I8Avx2>(a, t0, t1);
}

void run_portable(const Args& a, int kv, int64_t t0, int64_t t1) {
  if (kv == 0)
    attention_tasks<larp_rt::attn::F32>(a, t0, t1);
  else if (kv == 1)
    attention_tasks<larp_rt::attn::F16Scalar>(a, t0, t1);
  else
    attention_tasks<larp_rt::attn::I8Scalar>(a, t0, t1);
}

bool use_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c") && !std::getenv("LARP_RT_ATTENTION_PORTABLE");
  return yes;
}

}  // namespace

extern "C" {

LARP_API int larp_attention_isa(void) { return use_avx2() ? 2 : 0; }

LARP_API int larp_decode_attention_kv_tasks(const float* q, const float* k, const float* v, const void* past_k,
                                            const void* past_v, const float* k_scale, const float* v_scale, float* y,
                                            int64_t heads, int64_t slots, int64_t head_dim, const int64_t* pos,
                                            int32_t kv_dtype, int64_t t0, int64_t t1) {
  if (!q || !k || !v || !y || heads < 1 || head_dim < 1 || slots < 0 || t0 < 0 || t1 < t0 || (!pos && t1 > t0) ||
      kv_dtype < 0 || kv_dtype > 2)
    return 1;
  Args a{q, k, v, past_k, past_v, y, pos, heads, slots, head_dim};
  a.k_scale = k_scale;
  a.v_scale = v_scale;
  if (!past_k || !past_v || (kv_dtype == 2 && (!k_scale || !v_scale))) {  // no cache: fine if no row reads a slot
    for (int64_t t = t0; t < t1; t += heads - t % heads)
      if (larp_rt::attn::valid_slots(a, t) > 0) return 1;
  }
  if (use_avx2())
    run_avx2(a, kv_dtype, t0, t1);
  else
    run_portable(a, kv_dtype, t0, t1);
  return 0;
}

LARP_API int larp_decode_attention_tasks(const float* q, const float* k, const float* v, const float* past_k,
                                         const float* past_v, float* y, int64_t heads, int64_t slots,
                                         int64_t head_dim, const int64_t* pos, int64_t t0, int64_t t1) {
  return larp_decode_attention_kv_tasks(q, k, v, past_k, past_v, nullptr, nullptr, y, heads, slots, head_dim, pos, 0,
                                        t0, t1);
}

// All B*H tasks over num_threads threads (the ctypes entry point).
LARP_API int larp_decode_attention_kv_cpu(const float* q, const float* k, const float* v, const void* past_k,
                                          const void* past_v, const float* k_scale, const float* v_scale, float* y,
                                          int64_t batch, int64_t heads, int64_t slots, int64_t head_dim,
                                          const int64_t* pos, int32_t kv_dtype, int32_t num_threads) {
  if (batch < 0) return 1;
  const int64_t tasks = batch * heads;
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(num_threads, tasks));
  auto run = [&](int64_t t0, int64_t t1) {
    return larp_decode_attention_kv_tasks(q, k, v, past_k, past_v, k_scale, v_scale, y, heads, slots, head_dim, pos,
                                          kv_dtype, t0, t1);
  };
  if (nt == 1) return run(0, tasks);
  std::vector<std::thread> pool;
  std::vector<int> rc(nt, 0);
  const int64_t pairs = (tasks + 1) / 2;  // split on pair boundaries (attention_tasks reads two at once)
  for (int64_t i = 0; i < nt; ++i) {
    const int64_t t0 = 2 * (pairs * i / nt), t1 = std::min(tasks, 2 * (pairs * (i + 1) / nt));
    pool.emplace_back([&, i, t0, t1] { rc[i] = run(t0, t1); });
  }
  for (auto& th : pool) th.join();
  return *std::max_element(rc.begin(), rc.end());
}

LARP_API int larp_decode_attention_cpu(const float* q, const float* k, const float* v, const float* past_k,
                                       const float* past_v, float* y, int64_t batch, int64_t heads, int64_t slots,
                                       int64_t head_dim, const int64_t* pos, int32_t num_threads) {
  return larp_decode_attention_kv_cpu(q, k, v, past_k, past_v, nullptr, nullptr, y, batch, heads, slots, head_dim,
                                      pos, 0, num_threads);
}

}  // extern "C"
