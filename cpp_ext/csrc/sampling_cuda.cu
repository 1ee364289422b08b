// Launcher of the CUDA sampling kernel: host-side argument checks, dtype dispatch, launch on the caller's
// stream. No synchronisation, no allocation: safe inside CUDA-graph capture.
#include <cuda_runtime.h>

#include <cstdio>
#include <string>

#include "larp_rt/larp_sampling.h"
#include "larp_rt/sampling_cuda.cuh"

namespace {

thread_local std::string g_error;

int fail(const std::string& msg) {
  g_error = msg;
  return 1;
}

std::string num(long long v) { return std::to_string(v); }

}  // namespace

extern "C" {

const char* larp_cuda_last_error(void) { return g_error.c_str(); }

int larp_cuda_device_count(void) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  return n;
}

int larp_sample_cuda(const larp_sample_args* args, void* stream) {
  if (!args) return fail("args is NULL");
  const larp_sample_args& a = *args;
  if (a.batch < 0) return fail("batch must be >= 0, got " + num(a.batch));
  if (a.batch > 0x7FFFFFFF) return fail("batch must be < 2^31, got " + num(a.batch));
  if (a.vocab < 1 || a.vocab > 0x7FFFFFFF) return fail("vocab must be in [1, 2^31 - 1], got " + num(a.vocab));
  if (a.dtype < 0 || a.dtype > 2)
    return fail("dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got " + num(a.dtype));
  if (a.batch == 0) return 0;
  if (!a.cond) return fail("cond (logits) is NULL");
  if (a.ld_cond != 0 && a.ld_cond < a.vocab)
    return fail("ld_cond (row stride of cond) must be 0 (one row for all) or >= vocab, got " + num(a.ld_cond));
  if (a.uncond && a.ld_uncond != 0 && a.ld_uncond < a.vocab)
    return fail("ld_uncond (row stride of uncond) must be 0 or >= vocab, got " + num(a.ld_uncond));
  const struct {
    const void* p;
    const char* name;
  } req[] = {{a.cfg_scale, "cfg_scale"}, {a.temperature, "temperature"}, {a.top_k, "top_k"}, {a.top_p, "top_p"},
             {a.seed, "seed"},           {a.stream, "stream"},           {a.tokens, "tokens"}};
  for (const auto& q : req)
    if (!q.p) return fail(std::string(q.name) + " is NULL");
  if (!a.steps && !a.step_ptr && a.step < 0) return fail("step must be >= 0, got " + num(a.step));
  // The per-row parameters (cfg_scale, temperature, top_k, top_p) are in device memory: reading them here would
  // synchronise (and break CUDA-graph capture), so the kernel checks them against the bounds of sample_args.h and
  // marks a row outside them with token LARP_TOKEN_BAD_PARAMS (the CPU kernel's host check refuses the same rows).
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const dim3 grid((unsigned)a.batch), block(larp_rt::cuda::kThreads);
  switch (a.dtype) {
    case larp_rt::kFloat32:
      larp_rt::cuda::sample_kernel<larp_rt::kFloat32><<<grid, block, 0, s>>>(a);
      break;
    case larp_rt::kFloat16:
      larp_rt::cuda::sample_kernel<larp_rt::kFloat16><<<grid, block, 0, s>>>(a);
      break;
    default:
      larp_rt::cuda::sample_kernel<larp_rt::kBFloat16><<<grid, block, 0, s>>>(a);
      break;
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    fail(std::string("CUDA launch failed: ") + cudaGetErrorString(err));
    return 2;
  }
  return 0;
}

}  // extern "C"
