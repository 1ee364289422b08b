// Launcher of the CPU sampling kernel: argument checks, the exp implementation switch, threads over rows.
// Build with -ffp-contract=off (no FMA contraction: the CFG mix must round like numpy's float32 ops).
#include <math.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "larp_rt/larp_sampling.h"
#include "larp_rt/sampling_cpu.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define LARP_HAVE_VEC8 1
#endif

namespace {

thread_local std::string g_error;

int fail(const std::string& msg) {
  g_error = msg;
  return 1;
}

#ifdef LARP_HAVE_VEC8
typedef __m512d (*Vec8Fn)(__m512d);
std::atomic<void*> g_vec8{nullptr};  // a Vec8Fn

__attribute__((target("avx512f"))) void exp_batch_vec8(const double* in, double* out, int64_t n) {
  const Vec8Fn f = reinterpret_cast<Vec8Fn>(g_vec8.load(std::memory_order_relaxed));
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm512_storeu_pd(out + i, f(_mm512_loadu_pd(in + i)));
  if (i < n) {  // the tail lanes are zero-filled, as numpy's masked loads do (lanes are independent anyway)
    const __mmask8 m = (__mmask8)((1u << (unsigned)(n - i)) - 1u);
    _mm512_mask_storeu_pd(out + i, m, f(_mm512_maskz_loadu_pd(m, in + i)));
  }
}
#endif

std::atomic<int> g_exp_impl{0};

larp_rt::cpu::ExpBatchFn current_exp() {
#ifdef LARP_HAVE_VEC8
  if (g_exp_impl.load() == 1) return exp_batch_vec8;
#endif
  return larp_rt::cpu::exp_batch_libm;
}

std::string fmt(const char* f, double a, double b = 0, double c = 0, double d = 0) {
  char buf[512];
  snprintf(buf, sizeof buf, f, a, b, c, d);
  return buf;
}

// The shortest "%g" text (6 to 9 significant digits) that reads back as x: what numpy prints for a float32.
std::string f32(float x) {
  if (isnan(x)) return "nan";
  char buf[64];
  for (int prec = 6; prec <= 9; ++prec) {
    snprintf(buf, sizeof buf, "%.*g", prec, (double)x);
    if (strtof(buf, nullptr) == x) break;
  }
  return buf;
}

int check_args(const larp_sample_args* a) {
  if (!a) return fail("args is NULL");
  if (a->batch < 0) return fail(fmt("batch must be >= 0, got %.0f", (double)a->batch));
  if (a->vocab < 1 || a->vocab > 0x7FFFFFFF)
    return fail(fmt("vocab must be in [1, 2^31 - 1], got %.0f", (double)a->vocab));
  if (a->dtype < 0 || a->dtype > 2)
    return fail(fmt("dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got %.0f", a->dtype));
  if (a->batch == 0) return 0;
  if (!a->cond) return fail("cond (logits) is NULL");
  if (a->ld_cond != 0 && a->ld_cond < a->vocab)
    return fail(fmt("ld_cond (row stride of cond) must be 0 (one row for all) or >= vocab %.0f, got %.0f", (double)a->vocab, (double)a->ld_cond));
  if (a->uncond && a->ld_uncond != 0 && a->ld_uncond < a->vocab)
    return fail(fmt("ld_uncond (row stride of uncond) must be 0 or >= vocab %.0f, got %.0f", (double)a->vocab,
                    (double)a->ld_uncond));
  const struct {
    const void* p;
    const char* name;
  } req[] = {{a->cfg_scale, "cfg_scale"}, {a->temperature, "temperature"}, {a->top_k, "top_k"}, {a->top_p, "top_p"},
             {a->seed, "seed"},           {a->stream, "stream"},           {a->tokens, "tokens"}};
  for (const auto& q : req)
    if (!q.p) return fail(std::string(q.name) + " is NULL");
  if (a->steps) {
    for (int64_t r = 0; r < a->batch; ++r)
      if (a->steps[r] < 0) {
        char buf[128];
        snprintf(buf, sizeof buf, "steps[%lld] = %lld: must be >= 0 (row %lld's Philox step)", (long long)r,
                 (long long)a->steps[r], (long long)r);
        return fail(buf);
      }
  } else {
    const int64_t step = a->step_ptr ? *a->step_ptr : a->step;
    if (step < 0) return fail(fmt("step must be >= 0, got %.0f", (double)step));
  }
  // the bounds of sample_args.h on the float32 values (NaN fails every comparison); the same rules and wording as
  // larp_rt.sampling.check_row_params and SamplingParams.validate
  for (int64_t r = 0; r < a->batch; ++r) {
    const float s = a->cfg_scale[r], t = a->temperature[r], p = a->top_p[r];
    const int64_t k = a->top_k[r];
    const std::string row = "[" + std::to_string(r) + "] = ";
    if (!(s >= 0.0f && s <= LARP_MAX_CFG_SCALE))
      return fail("cfg_scale" + row + f32(s) + ": must be a finite number in [0, " + f32(LARP_MAX_CFG_SCALE) +
                  "] (1.0 = no guidance)");
    if (!(t == 0.0f || (t >= LARP_MIN_TEMPERATURE && t <= LARP_MAX_TEMPERATURE)))
      return fail("temperature" + row + f32(t) + ": must be a finite number: 0 (greedy) or in [" +
                  f32(LARP_MIN_TEMPERATURE) + ", " + f32(LARP_MAX_TEMPERATURE) + "]");
    if (k < 0 || k > a->vocab)
      return fail("top_k" + row + std::to_string(k) + ": must be in [0, vocab = " + std::to_string(a->vocab) +
                  "] (0 = off)");
    if (!(p >= LARP_MIN_TOP_P && p <= 1.0f))
      return fail("top_p" + row + f32(p) + ": must be in (0, 1], at least " + f32(LARP_MIN_TOP_P) +
                  " (the smallest normal float32; 1.0 = off)");
  }
  return 0;
}

}  // namespace

extern "C" {

int larp_sampling_abi_version(void) { return LARP_SAMPLING_ABI_VERSION; }

int larp_sample_bounds(float* out) {
  if (!out) return fail("larp_sample_bounds: out is NULL");
  out[0] = LARP_MAX_CFG_SCALE;
  out[1] = LARP_MIN_TEMPERATURE;
  out[2] = LARP_MAX_TEMPERATURE;
  out[3] = LARP_MIN_TOP_P;
  return 0;
}

const char* larp_last_error(void) { return g_error.c_str(); }

int larp_set_exp_impl(int impl, void* fn) {
  if (impl == 0) {
    g_exp_impl.store(0);
    return 0;
  }
#ifdef LARP_HAVE_VEC8
  if (impl == 1) {
    if (!fn) return fail("larp_set_exp_impl: impl 1 needs a vector function pointer");
    if (!__builtin_cpu_supports("avx512f")) return fail("larp_set_exp_impl: impl 1 needs a CPU with AVX-512F");
    g_vec8.store(fn);
    g_exp_impl.store(1);
    return 0;
  }
#endif
  return fail(fmt("larp_set_exp_impl: unknown or unsupported impl %.0f", impl));
}

int larp_get_exp_impl(void) { return g_exp_impl.load(); }

int larp_exp_batch(const double* in, double* out, int64_t n) {
  if (n < 0 || (n > 0 && (!in || !out))) return fail("larp_exp_batch: bad arguments");
  current_exp()(in, out, n);
  return 0;
}

int larp_sample_cpu(const larp_sample_args* args) {
  if (int rc = check_args(args)) return rc;
  const larp_sample_args a = *args;
  if (a.batch == 0) return 0;
  const uint64_t step = a.steps ? 0 : (uint64_t)(a.step_ptr ? *a.step_ptr : a.step);  // shared, unless per row
  const larp_rt::cpu::ExpBatchFn exp_fn = current_exp();
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(a.num_threads, a.batch));

  std::mutex mu;
  int64_t err_row = -1;
  std::string err_msg;
  auto work = [&](int64_t tid) {
    thread_local larp_rt::cpu::Workspace ws;
    char err[512];
    for (int64_t r = tid; r < a.batch; r += nt) {
      if (larp_rt::cpu::sample_row(a, r, a.steps ? (uint64_t)a.steps[r] : step, exp_fn, ws, err, sizeof err)) {
        std::lock_guard<std::mutex> lock(mu);
        if (err_row < 0 || r < err_row) {
          err_row = r;
          err_msg = err;
        }
        return;
      }
    }
  };
  if (nt == 1) {
    work(0);
  } else {
    std::vector<std::thread> pool;
    for (int64_t t = 1; t < nt; ++t) pool.emplace_back(work, t);
    work(0);
    for (std::thread& th : pool) th.join();
  }
  if (err_row >= 0) return fail(err_msg);
  return 0;
}

}  // extern "C"
