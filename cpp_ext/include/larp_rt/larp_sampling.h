/* larp_rt sampling kernels: the C ABI of the launchers (liblarp_sampling.so, liblarp_sampling_cuda.so).
 * Loaded with ctypes by larp_rt/kernels/ (the PyTorch op and the numpy entry point), linked into the ONNX
 * Runtime custom-op library, and callable from cuda-python for the TensorRT path. */
#ifndef LARP_RT_LARP_SAMPLING_H_
#define LARP_RT_LARP_SAMPLING_H_

#include <stdint.h>

#include "larp_rt/sample_args.h"

#ifdef __cplusplus
extern "C" {
#endif

#define LARP_SAMPLING_ABI_VERSION 2  /* 2: per-row steps (larp_sample_args.steps), per-row attention pos */

#if defined(_WIN32)
#define LARP_API __declspec(dllexport)
#else
#define LARP_API __attribute__((visibility("default")))
#endif

/* All functions return 0 on success; otherwise 1 for a bad argument (larp_last_error(), thread-local, says
 * which argument and how to fix it) or 2 for a CUDA runtime error (larp_cuda_last_error()). */
LARP_API int larp_sampling_abi_version(void);
LARP_API const char* larp_last_error(void);
/* The parameter bounds of sample_args.h into out[4]: LARP_MAX_CFG_SCALE, LARP_MIN_TEMPERATURE, LARP_MAX_TEMPERATURE,
 * LARP_MIN_TOP_P (what the kernels were built with; the tests compare them with larp_rt.sampling's). */
LARP_API int larp_sample_bounds(float* out);

/* ---- CPU (liblarp_sampling.so) ---- */
/* Checks every argument (including the per-row parameters and the logits' finiteness), then samples. */
LARP_API int larp_sample_cpu(const larp_sample_args* args);
/* The float64 exp of the weights. impl 0: libm exp (default; what numpy uses without AVX-512).
 * impl 1: `fn` is an 8-lane AVX-512 vector function __m512d(__m512d) applied lane-wise, e.g. numpy's own
 * __svml_exp8_ha, so that the kernel reproduces numpy's np.exp bit for bit on machines where numpy uses it. */
LARP_API int larp_set_exp_impl(int impl, void* fn);
LARP_API int larp_get_exp_impl(void);
/* exp over n values with the current implementation (lets the caller check it against numpy). */
LARP_API int larp_exp_batch(const double* in, double* out, int64_t n);

/* ---- one-token cache attention (include/larp_rt/attention_cpu.h; in liblarp_sampling.so and the ORT library) ---- */
/* q, k, v, y (B, H, 1, hd); past_k, past_v (B, H, S, hd); float32 contiguous; pos [B] int64: row b attends to
 * its n = clamp(pos[b], 0, S) written slots (each row at its own position). past_k/past_v may be NULL when every
 * n is 0. _tasks runs the (row, head) pairs [t0, t1) of B*H on the calling thread; _cpu runs all of them on
 * num_threads threads. Return 0, or 1 for a bad argument. larp_attention_isa: 2 = the AVX2+FMA code runs,
 * 0 = portable. */
LARP_API int larp_decode_attention_tasks(const float* q, const float* k, const float* v, const float* past_k,
                                         const float* past_v, float* y, int64_t heads, int64_t slots,
                                         int64_t head_dim, const int64_t* pos, int64_t t0, int64_t t1);
LARP_API int larp_decode_attention_cpu(const float* q, const float* k, const float* v, const float* past_k,
                                       const float* past_v, float* y, int64_t batch, int64_t heads, int64_t slots,
                                       int64_t head_dim, const int64_t* pos, int32_t num_threads);
LARP_API int larp_attention_isa(void);
/* The same over a narrow cache: kv_dtype 0 = float32, 1 = float16 (past_k/past_v uint16 bit patterns), 2 = int8
 * with k_scale, v_scale [B, H, S] float32 (slot j of (row, head) holds scale_j * int8 row; see attention_cpu.h). */
LARP_API int larp_decode_attention_kv_tasks(const float* q, const float* k, const float* v, const void* past_k,
                                            const void* past_v, const float* k_scale, const float* v_scale, float* y,
                                            int64_t heads, int64_t slots, int64_t head_dim, const int64_t* pos,
                                            int32_t kv_dtype, int64_t t0, int64_t t1);
LARP_API int larp_decode_attention_kv_cpu(const float* q, const float* k, const float* v, const void* past_k,
                                          const void* past_v, const float* k_scale, const float* v_scale, float* y,
                                          int64_t batch, int64_t heads, int64_t slots, int64_t head_dim,
                                          const int64_t* pos, int32_t kv_dtype, int32_t num_threads);

/* y (M, N) = x (M, K) @ W for few rows M, W packed as P (ceil(N / 32), K, 32) float32 (see matmul_cpu.h); every
 * pointer float32 contiguous. _panels computes the 32-column panels [p0, p1) of every row on the calling thread;
 * _cpu every panel on num_threads threads. isa: -1 = the best here, 3 = AVX-512, 2 = AVX2 + FMA, 0 = portable
 * (the AVX paths agree bit for bit). Return 0, 1 for a bad argument, 2 for an isa this CPU lacks.
 * larp_matmul_isa: the path isa -1 takes (LARP_RT_MATMUL_ISA=portable|avx2 forces a narrower one). */
LARP_API int larp_packed_matmul_panels(const float* x, const float* p, float* y, int64_t m, int64_t k, int64_t n,
                                       int64_t p0, int64_t p1, int32_t isa);
LARP_API int larp_packed_matmul_cpu(const float* x, const float* p, float* y, int64_t m, int64_t k, int64_t n,
                                    int32_t isa, int32_t num_threads);
LARP_API int larp_matmul_isa(void);

/* ---- CUDA (liblarp_sampling_cuda.so, which also holds the CPU functions above; also inside the ORT custom-op library when built with CUDA) ---- */
/* Host-side checks only (pointers, shapes, dtype, the step): the per-row parameters live in device memory, where
 * the host cannot read them without a synchronisation, so the kernel checks them against the bounds of
 * sample_args.h: a row outside them gets token LARP_TOKEN_BAD_PARAMS (-2) and logprob NaN; rows with non-finite
 * logits get LARP_TOKEN_NON_FINITE (-1) and logprob NaN. Enqueues on `stream` (cudaStream_t; NULL = legacy default stream); never
 * synchronises, so it can be captured in a CUDA graph (use step_ptr, or steps per row, for the step). */
LARP_API int larp_sample_cuda(const larp_sample_args* args, void* stream);
/* The number of CUDA devices this library can use (0 without a driver or device). */
LARP_API int larp_cuda_device_count(void);
/* The message of the last failed larp_sample_cuda call on this thread. */
LARP_API const char* larp_cuda_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* LARP_RT_LARP_SAMPLING_H_ */
