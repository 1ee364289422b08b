/* larp_rt sampling kernels: the argument block shared by the CPU kernel, the CUDA kernel and every binding.
 * Plain C so that ctypes / cuda-python / ONNX Runtime / TensorRT code can fill it. Torch-free. */
#ifndef LARP_RT_SAMPLE_ARGS_H_
#define LARP_RT_SAMPLE_ARGS_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The bounds of the per-row parameters, as float32 (mirrored from larp_rt/sampling.py MAX_CFG_SCALE, MIN_TEMPERATURE,
 * MAX_TEMPERATURE, MIN_TOP_P; tests/test_kernels.py checks that they agree through larp_sample_bounds()). Inside
 * them the samplers' arithmetic stays finite and normal (see sampling.py); the CPU kernel refuses a row outside
 * them (larp_last_error names it), the CUDA kernel marks it (token LARP_TOKEN_BAD_PARAMS, logprob NaN):
 *   cfg_scale in [0, LARP_MAX_CFG_SCALE]; temperature 0 (greedy) or in [LARP_MIN_TEMPERATURE, LARP_MAX_TEMPERATURE];
 *   top_p in [LARP_MIN_TOP_P, 1] (LARP_MIN_TOP_P = FLT_MIN, the smallest normal float32); top_k in [0, vocab]. */
#define LARP_MAX_CFG_SCALE 1e4f
#define LARP_MIN_TEMPERATURE 1e-4f
#define LARP_MAX_TEMPERATURE 1e4f
#define LARP_MIN_TOP_P 1.17549435e-38f
/* the tokens a device kernel writes for a row it cannot sample (a host kernel raises instead) */
#define LARP_TOKEN_NON_FINITE (-1) /* NaN/Inf logits */
#define LARP_TOKEN_BAD_PARAMS (-2) /* a parameter outside the bounds above */

/* One call samples one token for each of `batch` rows.
 *
 * cond:   [batch, >= vocab] logits (row stride ld_cond elements; 0 = one row shared by all) of the
 *         conditional rows.
 * uncond: [batch, >= vocab] logits of the paired null-class rows (row stride ld_uncond), or NULL.
 *         For the usual [2B, V] CFG layout (cond rows first): uncond = cond + B * V, ld = V.
 * dtype:  0 float32, 1 float16, 2 bfloat16 (both inputs), upcast exactly to float32.
 * Per-row parameter arrays (length batch, same memory space as the logits):
 *   cfg_scale (float32), temperature (float32, 0 = greedy), top_k (int64, 0 = off, <= vocab),
 *   top_p (float32, 1 = off), each within the bounds above, seed and stream (uint64; int64 bit patterns are fine).
 * step:   the Philox counter's high half; read from *step_ptr when step_ptr != NULL (device memory for the
 *         CUDA kernel, so a captured CUDA graph picks up the current step), else the `step` field.
 * steps:  [batch] int64 per-row steps (rows at different steps: continuous batching; same memory space as the
 *         logits), or NULL for the shared step above. When set, row r draws at step steps[r] and step/step_ptr
 *         are ignored. The CPU kernel rejects negative entries; the CUDA kernel reads them as uint64.
 * tokens: [batch] int64 output. logprobs: [batch] float64 output (log-probability of the token under the
 *         filtered, renormalised distribution; 0 for greedy rows) or NULL.
 * num_threads: CPU kernel only: worker threads over rows (<= 1: the calling thread). */
typedef struct larp_sample_args {
  const void* cond;
  const void* uncond;
  int64_t ld_cond;
  int64_t ld_uncond;
  int32_t dtype;
  int32_t num_threads;
  int64_t batch;
  int64_t vocab;
  const float* cfg_scale;
  const float* temperature;
  const int64_t* top_k;
  const float* top_p;
  const uint64_t* seed;
  const uint64_t* stream;
  const int64_t* step_ptr;
  int64_t step;
  int64_t* tokens;
  double* logprobs;
  const int64_t* steps; /* added last (ABI 2): the older fields keep their offsets */
} larp_sample_args;

#ifdef __cplusplus
}
#endif

#endif /* LARP_RT_SAMPLE_ARGS_H_ */
