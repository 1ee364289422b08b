// Test-only library: the CUDA sampling kernel (sampling_cuda.cuh, unchanged) run on the CPU through
// cuda_emulation.h. Built by tests/test_kernels_cuda_emulation.py; never part of the installed package.
#include "cuda_emulation.h"

#include "larp_rt/sampling_cuda.cuh"

float __half2float(EmuHalf h) { return larp_rt::half_bits_to_float(h.h); }
float __bfloat162float(EmuBf16 h) { return larp_rt::bf16_bits_to_float(h.h); }

extern "C" __attribute__((visibility("default"))) int larp_sample_cuda_emulated(const larp_sample_args* args) {
  const larp_sample_args a = *args;
  for (int64_t r = 0; r < a.batch; ++r) {
    switch (a.dtype) {
      case larp_rt::kFloat32:
        larp_emu::run_block((unsigned)r, larp_rt::cuda::kThreads, [&] { larp_rt::cuda::sample_kernel<0>(a); });
        break;
      case larp_rt::kFloat16:
        larp_emu::run_block((unsigned)r, larp_rt::cuda::kThreads, [&] { larp_rt::cuda::sample_kernel<1>(a); });
        break;
      default:
        larp_emu::run_block((unsigned)r, larp_rt::cuda::kThreads, [&] { larp_rt::cuda::sample_kernel<2>(a); });
        break;
    }
  }
  return 0;
}
