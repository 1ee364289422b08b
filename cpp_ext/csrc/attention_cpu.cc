// Launcher of the one-token cache attention (include/larp_rt/attention_cpu.h): an AVX2+FMA(+F16C) instantiation
// chosen at run time (the portable one otherwise) for each cache type (float32, float16, int8 + scales), a C ABI
// for ctypes tests and the ONNX Runtime op.
#include <immintrin.h>

#include <algorithm>
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
  static LARP_AVX2 inline v8f load(const T* p) {
    return from_m256(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static LARP_ATTN_INLINE float get(const T* p) { return larp_rt::attn::half_to_float(*p); }
};

struct I8Avx2 {
  typedef int8_t T;
  static constexpr bool scaled = true;
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
