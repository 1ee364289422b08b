// Launcher of the few-row packed matrix product (include/larp_rt/matmul_cpu.h): AVX-512 and AVX2+FMA panel
// kernels chosen at run time (the portable one otherwise), a C ABI for ctypes tests and the ONNX Runtime op.
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "larp_rt/larp_sampling.h"
#include "larp_rt/matmul_cpu.h"

namespace {

using larp_rt::mm::Args;
using larp_rt::mm::kPanel;

// Where the next stretch of the panel is fetched from: 16 k-rows (2 KiB) ahead of the one being read.
constexpr int64_t kAhead = 16 * kPanel;

// Stores the first `cols` of 16 lanes (the last panel of an N that is not a multiple of 32).
__attribute__((target("avx512f"))) inline void store16(float* y, __m512 v, int64_t cols) {
  if (cols >= 16)
    _mm512_storeu_ps(y, v);
  else if (cols > 0)
    _mm512_mask_storeu_ps(y, (__mmask16)((1u << cols) - 1u), v);
}

template <int R>
__attribute__((target("avx512f"))) inline void group_avx512(const Args& a, const float* w0, int64_t m0, int64_t c0,
                                                           int64_t cols) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const float* w = w0;
  const float* x = a.x + m0 * a.k;
  for (int64_t k = 0; k < a.k; ++k, w += kPanel) {
    _mm_prefetch(reinterpret_cast<const char*>(w + kAhead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + kAhead + 16), _MM_HINT_T0);
    const __m512 wa = _mm512_loadu_ps(w), wb = _mm512_loadu_ps(w + 16);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * a.k + k]);
      acc[r][0] = _mm512_fmadd_ps(xv, wa, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(xv, wb, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float* y = a.y + (m0 + r) * a.n + c0;
    store16(y, acc[r][0], cols);
    store16(y + 16, acc[r][1], cols - 16);
  }
}

__attribute__((target("avx512f"))) void panel_avx512(const Args& a, int64_t p) {
  const float* w0 = a.p + p * a.k * kPanel;
  const int64_t c0 = p * kPanel, cols = std::min<int64_t>(kPanel, a.n - c0);
  int64_t m = 0;
  for (; m + 8 <= a.m; m += 8) group_avx512<8>(a, w0, m, c0, cols);
  switch (a.m - m) {
    case 7: group_avx512<7>(a, w0, m, c0, cols); break;
    case 6: group_avx512<6>(a, w0, m, c0, cols); break;
    case 5: group_avx512<5>(a, w0, m, c0, cols); break;
    case 4: group_avx512<4>(a, w0, m, c0, cols); break;
    case 3: group_avx512<3>(a, w0, m, c0, cols); break;
    case 2: group_avx512<2>(a, w0, m, c0, cols); break;
    case 1: group_avx512<1>(a, w0, m, c0, cols); break;
    default: break;
  }
}

__attribute__((target("avx2,fma"))) inline void store8(float* y, __m256 v, int64_t cols) {
  if (cols >= 8) {
    _mm256_storeu_ps(y, v);
  } else if (cols > 0) {
    alignas(32) float t[8];
    _mm256_store_ps(t, v);
    for (int64_t c = 0; c < cols; ++c) y[c] = t[c];
  }
}

template <int R>
__attribute__((target("avx2,fma"))) inline void group_avx2(const Args& a, const float* w0, int64_t m0, int64_t c0,
                                                          int64_t cols) {
  __m256 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_ps();
  const float* w = w0;
  const float* x = a.x + m0 * a.k;
  for (int64_t k = 0; k < a.k; ++k, w += kPanel) {
    _mm_prefetch(reinterpret_cast<const char*>(w + kAhead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + kAhead + 16), _MM_HINT_T0);
    const __m256 w_0 = _mm256_loadu_ps(w), w_1 = _mm256_loadu_ps(w + 8), w_2 = _mm256_loadu_ps(w + 16),
                 w_3 = _mm256_loadu_ps(w + 24);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + r * a.k + k);
      acc[r][0] = _mm256_fmadd_ps(xv, w_0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xv, w_1, acc[r][1]);
      acc[r][2] = _mm256_fmadd_ps(xv, w_2, acc[r][2]);
      acc[r][3] = _mm256_fmadd_ps(xv, w_3, acc[r][3]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float* y = a.y + (m0 + r) * a.n + c0;
    for (int j = 0; j < 4; ++j) store8(y + 8 * j, acc[r][j], cols - 8 * j);
  }
}

__attribute__((target("avx2,fma"))) void panel_avx2(const Args& a, int64_t p) {
  const float* w0 = a.p + p * a.k * kPanel;
  const int64_t c0 = p * kPanel, cols = std::min<int64_t>(kPanel, a.n - c0);
  int64_t m = 0;
  for (; m + 3 <= a.m; m += 3) group_avx2<3>(a, w0, m, c0, cols);
  if (a.m - m == 2) group_avx2<2>(a, w0, m, c0, cols);
  if (a.m - m == 1) group_avx2<1>(a, w0, m, c0, cols);
}

enum Isa { kPortable = 0, kAvx2 = 2, kAvx512 = 3 };

int best_isa() {
  static const int isa = [] {
    const char* force = std::getenv("LARP_RT_MATMUL_ISA");  // "portable" / "avx2": tests and comparisons
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = __builtin_cpu_supports("avx512f");
    if (force && std::string(force) == "portable") return (int)kPortable;
    if (force && std::string(force) == "avx2") return avx2 ? (int)kAvx2 : (int)kPortable;
    return avx512 ? (int)kAvx512 : avx2 ? (int)kAvx2 : (int)kPortable;
  }();
  return isa;
}

bool isa_ok(int isa) {
  if (isa == kAvx512) return __builtin_cpu_supports("avx512f");
  if (isa == kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return isa == kPortable;
}

}  // namespace

extern "C" {

// 3 = AVX-512, 2 = AVX2 + FMA, 0 = portable: the path larp_packed_matmul_panels takes with isa = -1.
LARP_API int larp_matmul_isa(void) { return best_isa(); }

// Panels [p0, p1) of y (M, N) = x (M, K) @ W, W packed as P (panels(N), K, 32); isa -1 = the best here.
LARP_API int larp_packed_matmul_panels(const float* x, const float* p, float* y, int64_t m, int64_t k, int64_t n,
                                       int64_t p0, int64_t p1, int32_t isa) {
  if (m < 0 || k < 0 || n < 0 || p0 < 0 || p1 < p0 || p1 > larp_rt::mm::panels(n)) return 1;
  if (m == 0 || p1 == p0) return 0;
  if (!x || !p || !y) return 1;
  if (isa < 0) isa = best_isa();
  if (!isa_ok(isa)) return 2;
  const Args a{x, p, y, m, k, n};
  for (int64_t q = p0; q < p1; ++q) {
    if (isa == kAvx512)
      panel_avx512(a, q);
    else if (isa == kAvx2)
      panel_avx2(a, q);
    else
      larp_rt::mm::panel_portable(a, q);
  }
  return 0;
}

// Every panel over num_threads threads (the ctypes entry point).
LARP_API int larp_packed_matmul_cpu(const float* x, const float* p, float* y, int64_t m, int64_t k, int64_t n,
                                    int32_t isa, int32_t num_threads) {
  const int64_t np = larp_rt::mm::panels(n < 0 ? 0 : n);
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(num_threads, np));
  if (nt == 1) return larp_packed_matmul_panels(x, p, y, m, k, n, 0, np, isa);
  std::vector<std::thread> pool;
  std::vector<int> rc(nt, 0);
  for (int64_t i = 0; i < nt; ++i)
    pool.emplace_back([&, i] { rc[i] = larp_packed_matmul_panels(x, p, y, m, k, n, np * i / nt, np * (i + 1) / nt, isa); });
  for (auto& th : pool) th.join();
  return *std::max_element(rc.begin(), rc.end());
}

}  // extern "C"
