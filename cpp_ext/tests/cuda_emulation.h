// A small CPU emulation of the CUDA features that sampling_cuda.cuh uses, so that the CUDA kernel's logic
// (radix passes, tie handling, block scans, the segmented draw) can be tested on machines without a GPU.
//
// Each CUDA thread of a block is a ucontext fiber; __syncthreads() yields to a round-robin scheduler, so a
// round runs every fiber from one barrier to the next (a real barrier: the kernel calls it uniformly).
// Warp shuffles are barriers around a shared slot array (the kernel calls them uniformly too). Atomics are
// plain operations (fibers are not preemptive). Float16/bfloat16 loads use the exact bit conversions of
// common.h; exp/log are libm's. Blocks run one after another. Test-only: never built into the package.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <ucontext.h>

#include <algorithm>
#include <vector>

#define LARP_CUDA_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static

namespace larp_emu {

struct Dim {
  unsigned x;
};

struct State {
  int nthreads = 0;
  int cur = 0;
  unsigned block = 0;
  ucontext_t main_ctx;
  std::vector<ucontext_t> ctx;
  std::vector<std::vector<char>> stacks;
  std::vector<char> done;
  std::vector<uint64_t> slots;
};

inline State& st() {
  static State s;
  return s;
}

inline Dim thread_idx() { return Dim{(unsigned)st().cur}; }
inline Dim block_idx() { return Dim{st().block}; }

inline void sync() {
  State& s = st();
  swapcontext(&s.ctx[(size_t)s.cur], &s.main_ctx);
}

template <class T>
inline T shfl(T v, int src_lane_or_minus1) {
  State& s = st();
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof(T));
  s.slots[(size_t)s.cur] = bits;
  sync();
  T r = v;
  if (src_lane_or_minus1 >= 0) {
    const int src = (s.cur & ~31) + src_lane_or_minus1;
    memcpy(&r, &s.slots[(size_t)src], sizeof(T));
  }
  sync();
  return r;
}

template <class F>
struct Trampoline {
  static F* fn;
  static void run() {
    (*fn)();
    State& s = st();
    s.done[(size_t)s.cur] = 1;
  }  // returning resumes uc_link = main_ctx
};
template <class F>
F* Trampoline<F>::fn = nullptr;

// Runs fn() as `nthreads` threads of block `block` (fn reads threadIdx / blockIdx).
template <class F>
inline void run_block(unsigned block, int nthreads, F fn) {
  State& s = st();
  s.nthreads = nthreads;
  s.block = block;
  s.ctx.assign((size_t)nthreads, ucontext_t{});
  s.stacks.resize((size_t)nthreads);
  s.done.assign((size_t)nthreads, 0);
  s.slots.assign((size_t)nthreads, 0);
  Trampoline<F>::fn = &fn;
  for (int t = 0; t < nthreads; ++t) {
    s.stacks[(size_t)t].resize(256 * 1024);
    getcontext(&s.ctx[(size_t)t]);
    s.ctx[(size_t)t].uc_stack.ss_sp = s.stacks[(size_t)t].data();
    s.ctx[(size_t)t].uc_stack.ss_size = s.stacks[(size_t)t].size();
    s.ctx[(size_t)t].uc_link = &s.main_ctx;
    makecontext(&s.ctx[(size_t)t], (void (*)())Trampoline<F>::run, 0);
  }
  for (;;) {
    bool any = false;
    for (int t = 0; t < nthreads; ++t) {
      if (s.done[(size_t)t]) continue;
      any = true;
      s.cur = t;
      swapcontext(&s.main_ctx, &s.ctx[(size_t)t]);
    }
    if (!any) break;
  }
}

}  // namespace larp_emu

#define threadIdx (larp_emu::thread_idx())
#define blockIdx (larp_emu::block_idx())

inline void __syncthreads() { larp_emu::sync(); }

template <class T>
inline T __shfl_xor_sync(unsigned, T v, int o) {
  return larp_emu::shfl(v, (larp_emu::st().cur & 31) ^ o);
}
template <class T>
inline T __shfl_up_sync(unsigned, T v, int o) {
  const int lane = larp_emu::st().cur & 31;
  return larp_emu::shfl(v, lane >= o ? lane - o : -1);
}

template <class T>
inline T __ldg(const T* p) {
  return *p;
}
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __longlong_as_double(long long v) {
  double d;
  memcpy(&d, &v, 8);
  return d;
}
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p += v;
  return old;
}
inline int atomicMin(int* p, int v) {
  const int old = *p;
  *p = std::min(old, v);
  return old;
}
inline int atomicMax(int* p, int v) {
  const int old = *p;
  *p = std::max(old, v);
  return old;
}
using std::max;
using std::min;

// float16 / bfloat16 loads: the kernel calls __half2float(__ushort_as_half(h)) and the bfloat16 twin
struct EmuHalf {
  unsigned short h;
};
struct EmuBf16 {
  unsigned short h;
};
inline EmuHalf __ushort_as_half(unsigned short h) { return EmuHalf{h}; }
inline EmuBf16 __ushort_as_bfloat16(unsigned short h) { return EmuBf16{h}; }
float __half2float(EmuHalf h);
float __bfloat162float(EmuBf16 h);
