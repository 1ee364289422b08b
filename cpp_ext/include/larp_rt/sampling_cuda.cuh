// larp_rt sampling kernel for CUDA GPUs (torch-free, header-only).
//
// One thread block per row, no sort, no host synchronisation, deterministic (every float64 sum is reduced in
// a fixed order; only integer atomics are used), so a (seed, stream, step) gives the same token on every run.
//   pass 1        guided logits l = u + (c - u) * s in float32 (explicit _rn intrinsics: no FMA contraction),
//                 max / argmax (composite key, lowest index on ties), finiteness; greedy rows stop here.
//   top-k         radix select of the k-th largest l: 4 passes of 8-bit digits with shared-memory count
//                 histograms, then the index of the last kept tie (ties to the lower index).
//   top-p         radix search of the cut in (l desc, index asc) order: 8 passes of 4-bit digits whose
//                 per-digit float64 masses are reduced deterministically; the ties at the cut key all weigh
//                 the same, so how many of them to keep is a division; then the index of the last kept tie.
//   draw          each thread sums the kept weights of a contiguous segment, an exclusive block scan gives
//                 every segment its running start in index order, and the (first) segment whose
//                 [start, next start) holds u * total rescans itself sequentially (the reference's "first
//                 running sum > u * total").
// Differences from the numpy reference: only the order of float64 additions and CUDA's exp/log (both within
// an ulp), i.e. a token differs only when u * total falls within rounding of a cumulative boundary.
#pragma once

#if !defined(LARP_CUDA_EMULATION)  // cpp_ext/tests/cuda_emulation.h runs this file on the CPU for the tests
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif
#include <math.h>

#include "larp_rt/common.h"
#include "larp_rt/sample_args.h"

namespace larp_rt {
namespace cuda {

#ifndef LARP_CUDA_THREADS
#define LARP_CUDA_THREADS 512
#endif
constexpr int kThreads = LARP_CUDA_THREADS;  // a multiple of 32
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xFFFFFFFFu;

template <int DT>
__device__ __forceinline__ float load(const void* p, int64_t i) {
  if (DT == kFloat32) return __ldg(static_cast<const float*>(p) + i);
  const unsigned short h = __ldg(static_cast<const unsigned short*>(p) + i);
  if (DT == kFloat16) return __half2float(__ushort_as_half(h));
  return __bfloat162float(__ushort_as_bfloat16(h));
}

struct Row {
  const void* c;
  const void* u;  // null-class row or nullptr
  float s;
  bool mix;
};

template <int DT>
__device__ __forceinline__ float guided(const Row& row, int64_t i) {
  const float c = load<DT>(row.c, i);
  if (!row.mix) return c;
  const float u = load<DT>(row.u, i);
  return __fadd_rn(u, __fmul_rn(__fsub_rn(c, u), row.s));  // numpy: uncond + (cond - uncond) * s
}

struct Shared {
  unsigned long long red_u64[kWarps];
  double red_f64[kWarps];
  long long red_i64[kWarps];
  unsigned int hist[256];
  double mass16[kWarps][16];
  int count16[kWarps][16];
  int pick;
  long long need;
  double need_mass;
  int count_sel;
  long long idx;
  int winner;
  int last_nonzero;
  double start[kThreads];
};

__device__ __forceinline__ unsigned long long composite(uint32_t key, int i) {
  return ((unsigned long long)key << 32) | (unsigned long long)(0xFFFFFFFFu - (uint32_t)i);
}

// Block-wide reductions in a fixed order (deterministic); every thread gets the result.
__device__ __forceinline__ unsigned long long block_max_u64(unsigned long long v, Shared& sh) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(kFull, v, o));
  __syncthreads();
  if ((threadIdx.x & 31) == 0) sh.red_u64[threadIdx.x >> 5] = v;
  __syncthreads();
  unsigned long long r = sh.red_u64[0];
  for (int w = 1; w < kWarps; ++w) r = max(r, sh.red_u64[w]);
  return r;
}

__device__ __forceinline__ long long block_sum_i64(long long v, Shared& sh) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) sh.red_i64[threadIdx.x >> 5] = v;
  __syncthreads();
  long long r = sh.red_i64[0];
  for (int w = 1; w < kWarps; ++w) r += sh.red_i64[w];
  return r;
}

__device__ __forceinline__ double block_sum_f64(double v, Shared& sh) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) sh.red_f64[threadIdx.x >> 5] = v;
  __syncthreads();
  double r = sh.red_f64[0];
  for (int w = 1; w < kWarps; ++w) r += sh.red_f64[w];
  return r;
}

// Exclusive prefix over threads (thread order = segment order), fixed association (deterministic). Returns the
// exclusive value; *total the block sum.
template <class T>
__device__ __forceinline__ T block_exclusive_scan(T v, T* warp_sums, T* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  T x = v;
  for (int o = 1; o < 32; o <<= 1) {
    const T y = __shfl_up_sync(kFull, x, o);
    if (lane >= o) x += y;
  }
  T ex = __shfl_up_sync(kFull, x, 1);
  __syncthreads();
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  T pre = 0, tot = 0;
  for (int w = 0; w < kWarps; ++w) {
    if (w == warp) pre = tot;
    tot += warp_sums[w];
  }
  *total = tot;
  return lane == 0 ? pre : pre + ex;
}

// Index of the n-th (1-based) i in [0, V) with pred(i), in index order (contiguous segment per thread).
template <class Pred>
__device__ __forceinline__ int find_nth(int V, long long n, Pred pred, Shared& sh) {
  const int seg = (V + kThreads - 1) / kThreads;
  const int lo = min(V, (int)threadIdx.x * seg), hi = min(V, lo + seg);
  long long cnt = 0;
  for (int i = lo; i < hi; ++i) cnt += pred(i) ? 1 : 0;
  long long total;
  const long long ex = block_exclusive_scan<long long>(cnt, sh.red_i64, &total);
  if (threadIdx.x == 0) sh.idx = -1;
  __syncthreads();
  if (ex < n && n <= ex + cnt) {
    long long c = ex;
    for (int i = lo; i < hi; ++i)
      if (pred(i) && ++c == n) {
        sh.idx = i;
        break;
      }
  }
  __syncthreads();
  const long long r = sh.idx;
  __syncthreads();
  return (int)r;
}

template <int DT>
__global__ void __launch_bounds__(kThreads) sample_kernel(larp_sample_args a) {
  __shared__ Shared sh;
  const int r = blockIdx.x;
  const int V = (int)a.vocab;
  const int tid = threadIdx.x;
  const size_t esize = DT == kFloat32 ? 4 : 2;
  Row row;
  row.c = static_cast<const char*>(a.cond) + (size_t)r * (size_t)a.ld_cond * esize;
  row.u = a.uncond ? static_cast<const char*>(a.uncond) + (size_t)r * (size_t)a.ld_uncond * esize : nullptr;
  row.s = a.cfg_scale[r];
  row.mix = row.u != nullptr && row.s != 1.0f;
  const float T = a.temperature[r];

  // ---- the row's parameters against the bounds of sample_args.h (the host cannot read device memory without a
  // synchronisation, so the check is here; the CPU kernel's host check refuses the same rows): mark the row
  {
    const float p = a.top_p[r];
    const long long k = (long long)a.top_k[r];
    const bool ok = row.s >= 0.0f && row.s <= LARP_MAX_CFG_SCALE &&
                    (T == 0.0f || (T >= LARP_MIN_TEMPERATURE && T <= LARP_MAX_TEMPERATURE)) && k >= 0 &&
                    k <= (long long)V && p >= LARP_MIN_TOP_P && p <= 1.0f;  // NaN fails every comparison
    if (!ok) {  // the same for every thread of the block: it leaves before any barrier
      if (tid == 0) {
        a.tokens[r] = LARP_TOKEN_BAD_PARAMS;
        if (a.logprobs) a.logprobs[r] = __longlong_as_double(0x7FF8000000000000LL);
      }
      return;
    }
  }

  // ---- pass 1: max / argmax / finiteness
  unsigned long long best = 0;
  long long bad = 0;
  for (int i = tid; i < V; i += kThreads) {
    const float c = load<DT>(row.c, i);
    if (!isfinite(c)) bad = 1;
    if (row.u && !isfinite(load<DT>(row.u, i))) bad = 1;
    const float g = guided<DT>(row, i);
    if (!isfinite(g)) bad = 1;  // the float32 mix overflowed (finite inputs)
    best = max(best, composite(float_key(g), i));
  }
  best = block_max_u64(best, sh);
  bad = block_sum_i64(bad, sh);
  if (bad) {  // the reference raises; a kernel cannot: mark the row
    if (tid == 0) {
      a.tokens[r] = LARP_TOKEN_NON_FINITE;
      if (a.logprobs) a.logprobs[r] = __longlong_as_double(0x7FF8000000000000LL);
    }
    return;
  }
  if (T == 0.0f) {  // greedy (temperature 0; other values below the bound were refused above)
    if (tid == 0) {
      a.tokens[r] = (int64_t)(0xFFFFFFFFu - (uint32_t)best);
      if (a.logprobs) a.logprobs[r] = 0.0;
    }
    return;
  }
  const double Td = (double)T;
  const double zmax = (double)key_float((uint32_t)(best >> 32)) / Td;
  const long long k = min((long long)a.top_k[r], (long long)V);
  const float p = a.top_p[r];
  const bool use_k = k > 0 && k < V;
  const bool use_p = p < 1.0f;  // p >= LARP_MIN_TOP_P (checked above)
  auto weight = [&](float x) { return exp((double)x / Td - zmax); };

  // ---- top-k threshold: {key > Kk} U {key == Kk, i <= cutK}
  uint32_t Kk = 0;
  int cutK = V - 1;
  if (use_k) {
    uint32_t prefix = 0;
    long long need = k;
    for (int pass = 0; pass < 4; ++pass) {
      const int shift = 24 - 8 * pass;
      const uint32_t hi_mask = pass == 0 ? 0u : (0xFFFFFFFFu << (shift + 8));
      for (int b = tid; b < 256; b += kThreads) sh.hist[b] = 0;
      __syncthreads();
      for (int i = tid; i < V; i += kThreads) {
        const uint32_t key = float_key(guided<DT>(row, i));
        if ((key & hi_mask) == prefix) atomicAdd(&sh.hist[(key >> shift) & 255u], 1u);
      }
      __syncthreads();
      if (tid == 0) {
        long long acc = 0;
        int b = 255;
        for (; b > 0; --b) {
          if (acc + (long long)sh.hist[b] >= need) break;
          acc += sh.hist[b];
        }
        sh.pick = b;
        sh.need = need - acc;
      }
      __syncthreads();
      prefix |= (uint32_t)sh.pick << shift;
      need = sh.need;
      __syncthreads();
    }
    Kk = prefix;
    const uint32_t K = Kk;
    cutK = find_nth(V, need, [&](int i) { return float_key(guided<DT>(row, i)) == K; }, sh);
  }
  auto cand = [&](int i, uint32_t key) { return !use_k || key > Kk || (key == Kk && i <= cutK); };

  // ---- top-p cut: {key > Kp} U {key == Kp, i <= cutP} among the candidates
  uint32_t Kp = 0;
  int cutP = V - 1;
  if (use_p) {
    double part = 0.0;
    for (int i = tid; i < V; i += kThreads) {
      const float x = guided<DT>(row, i);
      if (cand(i, float_key(x))) part += weight(x);
    }
    const double total = block_sum_f64(part, sh);
    double need = (double)p * total;
    uint32_t prefix = 0;
    int count_sel = 0;
    for (int pass = 0; pass < 8; ++pass) {
      const int shift = 28 - 4 * pass;
      const uint32_t hi_mask = pass == 0 ? 0u : (0xFFFFFFFFu << (shift + 4));
      double m[16];
      int c[16];
#pragma unroll
      for (int b = 0; b < 16; ++b) {
        m[b] = 0.0;
        c[b] = 0;
      }
      for (int i = tid; i < V; i += kThreads) {
        const float x = guided<DT>(row, i);
        const uint32_t key = float_key(x);
        if ((key & hi_mask) == prefix && cand(i, key)) {
          const uint32_t d = (key >> shift) & 15u;
          const double w = weight(x);
#pragma unroll
          for (int b = 0; b < 16; ++b) {
            m[b] += (d == (uint32_t)b) ? w : 0.0;
            c[b] += (d == (uint32_t)b) ? 1 : 0;
          }
        }
      }
#pragma unroll
      for (int b = 0; b < 16; ++b) {
        for (int o = 16; o > 0; o >>= 1) {
          m[b] += __shfl_xor_sync(kFull, m[b], o);
          c[b] += __shfl_xor_sync(kFull, c[b], o);
        }
      }
      __syncthreads();
      if ((tid & 31) == 0) {
#pragma unroll
        for (int b = 0; b < 16; ++b) {
          sh.mass16[tid >> 5][b] = m[b];
          sh.count16[tid >> 5][b] = c[b];
        }
      }
      __syncthreads();
      if (tid == 0) {
        double acc = 0.0, acc_before_low = 0.0;
        int pick = -1, low = -1, cnt_low = 0, cnt_pick = 0;
        for (int b = 15; b >= 0; --b) {
          double mb = 0.0;
          int cb = 0;
          for (int w = 0; w < kWarps; ++w) {
            mb += sh.mass16[w][b];
            cb += sh.count16[w][b];
          }
          if (cb == 0) continue;
          low = b;
          cnt_low = cb;
          acc_before_low = acc;
          if (acc + mb >= need) {
            pick = b;
            cnt_pick = cb;
            break;
          }
          acc += mb;
        }
        if (pick < 0) {  // rounding left the threshold just above the last candidates: take the lowest bin
          pick = low;
          cnt_pick = cnt_low;
        }
        sh.pick = pick;
        sh.need_mass = need - acc_before_low;
        sh.count_sel = cnt_pick;
      }
      __syncthreads();
      prefix |= (uint32_t)sh.pick << shift;
      need = sh.need_mass;
      count_sel = sh.count_sel;
      __syncthreads();
    }
    Kp = prefix;
    // the count_sel candidates with key == Kp weigh wK each: keep the fewest that reach the remaining mass
    const double wK = weight(key_float(Kp));
    long long keep = count_sel;
    if (wK > 0.0) {
      const double q = ceil(need / wK);
      keep = q < 1.0 ? 1 : (q > (double)count_sel ? count_sel : (long long)q);
    }
    const uint32_t K = Kp;
    cutP = find_nth(V, keep, [&](int i) {
      const uint32_t key = float_key(guided<DT>(row, i));
      return key == K && cand(i, key);
    }, sh);
  }
  auto kept = [&](int i, uint32_t key) { return cand(i, key) && (!use_p || key > Kp || (key == Kp && i <= cutP)); };

  // ---- the draw: segments in index order, running float64 sums
  const int seg = (V + kThreads - 1) / kThreads;
  const int lo = min(V, tid * seg), hi = min(V, lo + seg);
  double part = 0.0;
  for (int i = lo; i < hi; ++i) {
    const float x = guided<DT>(row, i);
    if (kept(i, float_key(x))) part += weight(x);
  }
  double total;
  const double start = block_exclusive_scan<double>(part, sh.red_f64, &total);
  sh.start[tid] = start;
  if (tid == 0) {
    sh.winner = kThreads;
    sh.last_nonzero = -1;
  }
  __syncthreads();
  const double next = tid + 1 < kThreads ? sh.start[tid + 1] : total;
  const uint64_t step = (uint64_t)(a.steps ? a.steps[r] : a.step_ptr ? *a.step_ptr : a.step);  // per row / shared
  const double u = uniform53(a.seed[r], a.stream[r], step);
  const double target = u * total;
  // the segment whose [start, next) holds the target (the first one, should rounding make two)
  if (part > 0.0) {
    atomicMax(&sh.last_nonzero, tid);
    if (start <= target && target < next) atomicMin(&sh.winner, tid);
  }
  __syncthreads();
  const int winner = sh.winner < kThreads ? sh.winner : sh.last_nonzero;  // the max token (w = 1) is kept
  if (tid == winner) {
    double run = start;
    int sel = -1, last = -1;
    float xsel = 0.0f, xlast = 0.0f;
    for (int i = lo; i < hi; ++i) {
      const float x = guided<DT>(row, i);
      if (!kept(i, float_key(x))) continue;
      last = i;
      xlast = x;
      run += weight(x);
      if (run > target) {
        sel = i;
        xsel = x;
        break;
      }
    }
    if (sel < 0) {
      sel = last;
      xsel = xlast;
    }
    a.tokens[r] = sel;
    if (a.logprobs) a.logprobs[r] = ((double)xsel / Td - zmax) - log(total);
  }
}

}  // namespace cuda
}  // namespace larp_rt
