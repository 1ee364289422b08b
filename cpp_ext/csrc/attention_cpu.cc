// Launcher of the one-token cache attention (include/larp_rt/attention_cpu.h): an AVX2+FMA instantiation chosen
// at run time (the portable one otherwise), a C ABI for ctypes tests and the ONNX Runtime op.
#include <algorithm>
#include <thread>
#include <vector>

#include "larp_rt/attention_cpu.h"
#include "larp_rt/larp_sampling.h"

namespace {

using larp_rt::attn::Args;
using larp_rt::attn::attention_tasks;

__attribute__((target("avx2,fma"))) void run_avx2(const Args& a, int64_t t0, int64_t t1) {
  attention_tasks(a, t0, t1);
}

void run_portable(const Args& a, int64_t t0, int64_t t1) { attention_tasks(a, t0, t1); }

bool use_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

}  // namespace

extern "C" {

LARP_API int larp_attention_isa(void) { return use_avx2() ? 2 : 0; }

// Tasks [t0, t1) of the B*H (row, head) tasks, in pairs; pos [B] the rows' positions (each clamped to [0, S]);
// shapes in the header. Returns 0, or 1 for bad arguments.
LARP_API int larp_decode_attention_tasks(const float* q, const float* k, const float* v, const float* past_k,
                                         const float* past_v, float* y, int64_t heads, int64_t slots,
                                         int64_t head_dim, const int64_t* pos, int64_t t0, int64_t t1) {
  if (!q || !k || !v || !y || heads < 1 || head_dim < 1 || slots < 0 || t0 < 0 || t1 < t0 || (!pos && t1 > t0))
    return 1;
  const Args a{q, k, v, past_k, past_v, y, pos, heads, slots, head_dim};
  if (!past_k || !past_v) {  // no cache: fine as long as no row reads a slot
    for (int64_t t = t0; t < t1; t += heads - t % heads)
      if (larp_rt::attn::valid_slots(a, t) > 0) return 1;
  }
  if (use_avx2())
    run_avx2(a, t0, t1);
  else
    run_portable(a, t0, t1);
  return 0;
}

// All B*H tasks over num_threads threads (the ctypes entry point).
LARP_API int larp_decode_attention_cpu(const float* q, const float* k, const float* v, const float* past_k,
                                       const float* past_v, float* y, int64_t batch, int64_t heads, int64_t slots,
                                       int64_t head_dim, const int64_t* pos, int32_t num_threads) {
  const int64_t tasks = batch * heads;
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(num_threads, tasks));
  if (batch < 0) return 1;
  if (nt == 1) return larp_decode_attention_tasks(q, k, v, past_k, past_v, y, heads, slots, head_dim, pos, 0, tasks);
  std::vector<std::thread> pool;
  std::vector<int> rc(nt, 0);
  const int64_t pairs = (tasks + 1) / 2;  // split on pair boundaries (attention_tasks reads two at once)
  for (int64_t i = 0; i < nt; ++i) {
    const int64_t t0 = 2 * (pairs * i / nt), t1 = std::min(tasks, 2 * (pairs * (i + 1) / nt));
    pool.emplace_back([&, i, t0, t1] {
      rc[i] = larp_decode_attention_tasks(q, k, v, past_k, past_v, y, heads, slots, head_dim, pos, t0, t1);
    });
  }
  for (auto& th : pool) th.join();
  return *std::max_element(rc.begin(), rc.end());
}

}  // extern "C"
