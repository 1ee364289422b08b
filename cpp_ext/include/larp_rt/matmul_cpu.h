// Few-row matrix products against pre-packed float32 weights, on the CPU (torch-free, header-only part).
//
// A decode step multiplies 1-16 rows (a request's cond + null rows, a serving batch) by every weight matrix of the
// model once: y (M, N) = x (M, K) @ W (K, N). With M this small the step is a stream of the weights; what matters
// is reading them at the memory's speed. W is stored packed in column panels of kPanel = 32 columns,
//     P[p][k][c] = W[k][32 p + c]   (zero past N),  P: (ceil(N / 32), K, 32) float32,
// so that one panel is one contiguous stream of K * 128 bytes (the export packs W in numpy:
// larp_rt.kernels.pack_matmul_weights). A panel is a unit of work: the caller splits the
// panels over threads (ONNX Runtime's ParallelFor in the custom op); within a panel the rows are taken in groups
// (8 rows x 2 zmm on AVX-512, 3 rows x 4 ymm on AVX2, 1 row portable), each group streaming the panel once (the
// first group from memory, the next ones from L2).
//
// Arithmetic, the same on every path with FMA: y[m][n] = fma(x[m][K-1], W[K-1][n], ... fma(x[m][0], W[0][n], 0)),
// one fused multiply-add chain per output over k in increasing order. So a row's result never depends on which
// other rows share the call (bit for bit: batch invariance) nor on the thread split, and the AVX-512 and AVX2
// paths agree bit for bit. The portable path uses std::fma where the compiler has a fast one (__FP_FAST_FMAF),
// else multiply-then-add: it differs from the others only by float32 rounding.
#pragma once

#include <cmath>
#include <cstdint>

namespace larp_rt {
namespace mm {

constexpr int64_t kPanel = 32;

inline int64_t panels(int64_t n) { return (n + kPanel - 1) / kPanel; }

struct Args {
  const float* x;  // (M, K), row stride K
  const float* p;  // (panels(N), K, 32)
  float* y;        // (M, N), row stride N
  int64_t m, k, n;
};

inline float fmadd(float a, float b, float c) {
#ifdef __FP_FAST_FMAF
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// Panel p of every row, one row at a time (the portable path).
inline void panel_portable(const Args& a, int64_t p) {
  const float* w0 = a.p + p * a.k * kPanel;
  const int64_t c0 = p * kPanel, cols = (a.n - c0) < kPanel ? (a.n - c0) : kPanel;
  for (int64_t m = 0; m < a.m; ++m) {
    float acc[kPanel] = {};
    const float* xr = a.x + m * a.k;
    const float* w = w0;
    for (int64_t k = 0; k < a.k; ++k, w += kPanel) {
      const float xv = xr[k];
      for (int64_t c = 0; c < kPanel; ++c) acc[c] = fmadd(xv, w[c], acc[c]);
    }
    float* yr = a.y + m * a.n + c0;
    for (int64_t c = 0; c < cols; ++c) yr[c] = acc[c];
  }
}

}  // namespace mm
}  // namespace larp_rt
