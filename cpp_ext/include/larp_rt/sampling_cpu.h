// larp_rt sampling kernel for the CPU (torch-free, header-only).
//
// Bit-exact with larp_rt.sampling.sample (the numpy reference) given the same float64 exp as numpy uses (the
// exp is a parameter: libm's by default; the C ABI can switch to numpy's own vector exp, see sampling_cpu.cc).
// Per row: a pass for CFG + finiteness (skipped when the input row is read in place), a pass for the max
// (+ greedy argmax) that also feeds the top-k selection: for small k a filter keeping a buffer of candidates above
// the k-th best key so far (cut back with nth_element when full), for larger k a histogram of the keys' top 11
// bits followed by a radix select on the shrinking bucket, both with the lower-index tie rule. Top-p sorts (stable
// LSD radix) only the candidates whose weight can change a float64 sum that starts at 1 (w >= 2^-53), so the
// cumulative sums in (z desc, index asc) order are the reference's sums bit for bit; the draw scans the kept
// tokens in index order with the same sequential float64 accumulation as the reference's cumsum.
#pragma once

#include <math.h>

#include <algorithm>
#include <cstdio>
#include <limits>
#include <vector>

#include "larp_rt/common.h"
#include "larp_rt/sample_args.h"

namespace larp_rt {
namespace cpu {

// exp over n float64 values (elementwise; any implementation that numpy's exp agrees with bit for bit)
typedef void (*ExpBatchFn)(const double* in, double* out, int64_t n);

inline void exp_batch_libm(const double* in, double* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = ::exp(in[i]);
}

struct Workspace {
  std::vector<float> l;
  std::vector<int32_t> cand, tmp, tmp2;
  std::vector<uint64_t> buf;
  uint32_t hist4[4 * 2048];
  std::vector<double> d, w;
  struct Item {
    uint32_t inv_key;  // ~key: ascending inv_key = descending z
    int32_t index;
    double w;
  };
  std::vector<Item> items, items_tmp;
};

// Stable LSD radix sort by inv_key (3 passes of 11 bits; a pass whose digit is the same everywhere is skipped):
// items in index order come out in (z desc, index asc) order, the reference's stable argsort of -z.
inline void radix_sort_items(std::vector<Workspace::Item>& items, std::vector<Workspace::Item>& tmp) {
  const size_t n = items.size();
  tmp.resize(n);
  static const int kShift[3] = {0, 11, 22};
  for (int pass = 0; pass < 3; ++pass) {
    const int shift = kShift[pass];
    uint32_t count[2048] = {0};
    for (size_t i = 0; i < n; ++i) count[(items[i].inv_key >> shift) & 2047u]++;
    if (n == 0 || count[(items[0].inv_key >> shift) & 2047u] == n) continue;
    uint32_t sum = 0;
    for (int b = 0; b < 2048; ++b) {
      const uint32_t c = count[b];
      count[b] = sum;
      sum += c;
    }
    for (size_t i = 0; i < n; ++i) tmp[count[(items[i].inv_key >> shift) & 2047u]++] = items[i];
    items.swap(tmp);
  }
}

inline uint64_t composite(uint32_t key, int64_t i) { return ((uint64_t)key << 32) | (uint64_t)(0xFFFFFFFFu - (uint32_t)i); }

// The top-k set of l[0:V] by (key desc, index asc), in index order, into ws.cand. hist0 is the histogram of
// the top 11 bits (filled by the caller's key pass). One more pass over V collects every token whose top digit
// is at least the k-th largest one's (a superset of the answer, usually little more than k tokens); the next
// digits (11, 10 bits) are resolved on the shrinking bucket; the last kept tie is the lowest-index one.
inline void topk_select(const float* l, int64_t V, int64_t k, const uint32_t* hist0, Workspace& ws) {
  int64_t need = k, acc = 0;
  int b = 2047;
  for (; b > 0; --b) {
    if (acc + (int64_t)hist0[b] >= need) break;
    acc += hist0[b];
  }
  need -= acc;
  uint32_t prefix = (uint32_t)b << 21;
  std::vector<int32_t>& super = ws.tmp;  // digit >= b, index order
  std::vector<int32_t>& bucket = ws.cand;  // the tokens whose key shares the resolved prefix
  super.clear();
  bucket.clear();
  for (int64_t i = 0; i < V; ++i) {
    const uint32_t d = float_key(l[i]) >> 21;
    if (d >= (uint32_t)b) {
      super.push_back((int32_t)i);
      if (d == (uint32_t)b) bucket.push_back((int32_t)i);
    }
  }
  static const int kShift[2] = {10, 0};
  static const uint32_t kMask[2] = {2047u, 1023u};
  uint32_t hist[2048];
  std::vector<int32_t>& next = ws.tmp2;
  for (int pass = 0; pass < 2 && (int64_t)bucket.size() > need; ++pass) {
    const int shift = kShift[pass];
    const uint32_t dmask = kMask[pass];
    std::fill(hist, hist + dmask + 1, 0u);
    for (int32_t i : bucket) hist[(float_key(l[i]) >> shift) & dmask]++;
    int64_t acc2 = 0;
    int c = (int)dmask;
    for (; c > 0; --c) {
      if (acc2 + (int64_t)hist[c] >= need) break;
      acc2 += hist[c];
    }
    need -= acc2;
    prefix |= (uint32_t)c << shift;
    next.clear();
    for (int32_t i : bucket)
      if (((float_key(l[i]) >> shift) & dmask) == (uint32_t)c) next.push_back(i);
    bucket.swap(next);
  }
  // Keep the tokens of `super` whose resolved key bits exceed the prefix (for a token outside the bucket that
  // is key > prefix), and the bucket's first `need` tokens: all of it when the digits ran out with the bucket
  // holding exactly `need`, else the bucket is one full key whose ties go to the lower index.
  const int32_t cut = bucket[(size_t)(need - 1)];
  std::vector<int32_t>& out = next;
  out.clear();
  size_t j = 0;
  for (int32_t i : super) {
    const bool in_bucket = j < bucket.size() && bucket[j] == i;
    if (in_bucket) ++j;
    if (in_bucket ? i <= cut : float_key(l[i]) > prefix) out.push_back(i);
  }
  ws.cand.swap(out);
}

// Small k: one pass keeps a buffer of candidates, discarding every token whose key is not above the k-th best
// key seen so far (ties go to the earlier, lower index, so a later tie can never enter); when the buffer fills
// it is cut back to its k best (nth_element). Writes the top-k in index order into ws.cand and returns the max
// (as a value: -0 reads as +0, which gives the same z); *finite tells whether every l was finite.
inline float topk_filter(const float* l, int64_t V, int64_t k, Workspace& ws, bool* finite) {
  std::vector<uint64_t>& buf = ws.buf;
  buf.clear();
  const size_t cap = (size_t)std::max<int64_t>(4 * k, 256);
  buf.reserve(cap + 1);
  auto cut_to_k = [&]() {
    std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end(), [](uint64_t x, uint64_t y) { return x > y; });
    buf.resize((size_t)k);
  };
  uint32_t tau = 0;
  bool have_tau = false;
  float acc = 0.0f;
  for (int64_t i = 0; i < V; ++i) {
    const float x = l[i];
    acc += x - x;
    const uint32_t key = float_key(x);
    if (key > tau || !have_tau) {
      buf.push_back(composite(key, i));
      if (buf.size() >= cap) {
        cut_to_k();
        tau = (uint32_t)(buf[(size_t)(k - 1)] >> 32);
        have_tau = true;
      }
    }
  }
  *finite = acc == 0.0f;
  if ((int64_t)buf.size() > k) cut_to_k();
  uint64_t top = 0;
  std::vector<int32_t>& cand = ws.cand;
  cand.clear();
  for (uint64_t c : buf) {
    top = std::max(top, c);
    cand.push_back((int32_t)(0xFFFFFFFFu - (uint32_t)c));
  }
  std::sort(cand.begin(), cand.end());
  return key_float((uint32_t)(top >> 32));
}

// l[i] = guided logit of token i; returns false when an input is NaN/Inf (the whole null row is checked too,
// as the reference checks every input) or the mix overflowed float32. Branch-free bodies so that the compiler vectorises them.
inline bool check_row(const float* c, const float* u, int64_t V) {
  float acc = 0.0f;  // x - x is 0 for finite x and NaN otherwise
  for (int64_t i = 0; i < V; ++i) acc += c[i] - c[i];
  if (u)
    for (int64_t i = 0; i < V; ++i) acc += u[i] - u[i];
  return acc == 0.0f;
}

inline bool guided_row(const float* c, const float* u, bool mix, float s, int64_t V, float* l) {
  float acc = 0.0f;  // x - x is 0 for finite x and NaN otherwise
  if (!u) {
    for (int64_t i = 0; i < V; ++i) {
      l[i] = c[i];
      acc += c[i] - c[i];
    }
  } else if (!mix) {
    for (int64_t i = 0; i < V; ++i) {
      l[i] = c[i];
      acc += (c[i] - c[i]) + (u[i] - u[i]);
    }
  } else {  // a non-finite c or u makes l non-finite (s is finite): checking l also catches a float32 overflow
    for (int64_t i = 0; i < V; ++i) {
      l[i] = u[i] + (c[i] - u[i]) * s;
      acc += l[i] - l[i];
    }
  }
  return acc == 0.0f;
}

template <bool kHalf>
inline bool guided_row_16(const uint16_t* c, const uint16_t* u, bool mix, float s, int64_t V, float* l) {
  auto cvt = [](uint16_t h) { return kHalf ? half_bits_to_float(h) : bf16_bits_to_float(h); };
  float acc = 0.0f;
  for (int64_t i = 0; i < V; ++i) {
    const float x = cvt(c[i]);
    float y = x;
    acc += x - x;
    if (u) {
      const float v = cvt(u[i]);
      acc += v - v;
      if (mix) y = v + (x - v) * s;
    }
    acc += y - y;  // the mix's own overflow
    l[i] = y;
  }
  return acc == 0.0f;
}

// Samples row r at Philox step `step` (the row's steps[r], or the shared step). Returns 0, or 1 with a message in
// err (non-finite logits).
inline int sample_row(const larp_sample_args& a, int64_t r, uint64_t step, ExpBatchFn exp_batch, Workspace& ws,
                      char* err, size_t errlen) {
  const int64_t V = a.vocab;
  const size_t esize = a.dtype == kFloat32 ? 4 : 2;
  const void* crow = static_cast<const char*>(a.cond) + (size_t)(r * a.ld_cond) * esize;
  const void* urow = a.uncond ? static_cast<const char*>(a.uncond) + (size_t)(r * a.ld_uncond) * esize : nullptr;
  const float s = a.cfg_scale[r];
  const bool mix = urow != nullptr && s != 1.0f;
  const float T = a.temperature[r];

  // pass 1: guided logits l = u + (c - u) * s in float32 (no FMA: built with -ffp-contract=off)
  const int64_t k = a.top_k[r];
  const float p = a.top_p[r];
  const bool use_k = T != 0.0f && k > 0 && k < V;
  const bool use_p = p < 1.0f;
  const int64_t V4 = V & ~(int64_t)3;
  const float* l;
  bool finite = true, checked = true;
  if (a.dtype == kFloat32 && !mix) {  // l is the input row itself (checked below, in the pass that reads it)
    l = static_cast<const float*>(crow);
    checked = false;
  } else if (a.dtype == kFloat32) {
    ws.l.resize((size_t)V);
    finite = guided_row(static_cast<const float*>(crow), static_cast<const float*>(urow), mix, s, V, ws.l.data());
    l = ws.l.data();
  } else {
    ws.l.resize((size_t)V);
    l = ws.l.data();
    const uint16_t* c16 = static_cast<const uint16_t*>(crow);
    const uint16_t* u16 = static_cast<const uint16_t*>(urow);
    finite = a.dtype == kFloat16 ? guided_row_16<true>(c16, u16, mix, s, V, ws.l.data())
                                 : guided_row_16<false>(c16, u16, mix, s, V, ws.l.data());
  }

  // pass 2: the max (four independent accumulators: no loop-carried compare chain); with top-k in the same
  // pass the histogram of the keys' top 11 bits (four sub-histograms so that runs of equal digits do not
  // serialise on one counter) and the max as the max key; the finiteness check of an input row read in place
  float best;
  uint32_t hist0[2048];
  const bool small_k = use_k && k <= V / 16;  // measured crossover with the radix path
  if (small_k) {
    bool ok;
    best = topk_filter(l, V, k, ws, &ok);
    if (!checked) finite = ok && (!urow || check_row(static_cast<const float*>(urow), nullptr, V));
  } else if (use_k) {
    uint32_t* h4 = ws.hist4;
    std::fill(h4, h4 + 4 * 2048, 0u);
    uint32_t mk[4] = {0, 0, 0, 0};
    float acc = 0.0f;
    for (int64_t i = 0; i < V4; i += 4) {
      for (int j = 0; j < 4; ++j) {
        const float x = l[i + j];
        const uint32_t key = float_key(x);
        acc += x - x;
        mk[j] = key > mk[j] ? key : mk[j];
        h4[j * 2048 + (key >> 21)]++;
      }
    }
    for (int64_t i = V4; i < V; ++i) {
      const uint32_t key = float_key(l[i]);
      acc += l[i] - l[i];
      mk[0] = key > mk[0] ? key : mk[0];
      h4[key >> 21]++;
    }
    for (int b = 0; b < 2048; ++b) hist0[b] = h4[b] + h4[2048 + b] + h4[4096 + b] + h4[6144 + b];
    best = key_float(std::max(std::max(mk[0], mk[1]), std::max(mk[2], mk[3])));  // -0 reads as +0: same z
    if (!checked) finite = acc == 0.0f && (!urow || check_row(static_cast<const float*>(urow), nullptr, V));
  } else {
    if (!checked) finite = check_row(l, static_cast<const float*>(urow), V);
    float m4[4] = {l[0], l[0], l[0], l[0]};
    for (int64_t i = 0; i < V4; i += 4)
      for (int j = 0; j < 4; ++j) m4[j] = l[i + j] > m4[j] ? l[i + j] : m4[j];
    for (int64_t i = V4; i < V; ++i) m4[0] = l[i] > m4[0] ? l[i] : m4[0];
    best = std::max(std::max(m4[0], m4[1]), std::max(m4[2], m4[3]));
  }
  if (!finite) {  // name the first non-finite input like the reference (cond checked first at each token)
    for (int64_t i = 0; i < V; ++i) {
      const bool bad_c = !isfinite(load_logit(crow, a.dtype, i));
      if (bad_c || (urow && !isfinite(load_logit(urow, a.dtype, i)))) {
        snprintf(err, errlen,
                 "%s_logits contain NaN/Inf (first at row %lld, token %lld): the model produced non-finite values; "
                 "check the weights and the precision (fp16 overflow?)",
                 bad_c ? "cond" : "uncond", (long long)r, (long long)i);
        return 1;
      }
    }
    for (int64_t i = 0; i < V; ++i) {  // finite inputs: the float32 mix overflowed
      if (!isfinite(l[i])) {
        snprintf(err, errlen,
                 "guided logits contain NaN/Inf (first at row %lld, token %lld): cond and uncond are finite but "
                 "uncond + (cond - uncond) * cfg_scale overflows float32; check the logits' scale or lower cfg_scale",
                 (long long)r, (long long)i);
        return 1;
      }
    }
  }
  if (T == 0.0f) {  // greedy: argmax = the first token equal to the max (np.argmax: lowest index on ties)
    int64_t arg = 0;
    while (!(l[arg] == best)) ++arg;
    a.tokens[r] = arg;
    if (a.logprobs) a.logprobs[r] = 0.0;
    return 0;
  }

  const double Td = (double)T;
  const double zmax = (double)best / Td;

  // candidates (ascending index): the top-k set, or everything
  const int32_t* kept = nullptr;
  int64_t n = V;
  if (use_k) {
    if (!small_k) topk_select(l, V, k, hist0, ws);
    const std::vector<int32_t>& cand = ws.cand;
    kept = cand.data();
    n = (int64_t)cand.size();
  }

  // weights of the candidates: w = exp(z - zmax), z = float64(l) / T (the reference's operations)
  ws.d.resize((size_t)n);
  ws.w.resize((size_t)n);
  double* d = ws.d.data();
  double* w = ws.w.data();
  if (kept) {
    for (int64_t j = 0; j < n; ++j) d[j] = (double)l[kept[j]] / Td - zmax;
  } else {
    for (int64_t j = 0; j < n; ++j) d[j] = (double)l[j] / Td - zmax;
  }
  exp_batch(d, w, n);

  if (use_p) {
    // Cumulative mass in (z desc, index asc) order, summed sequentially from the max (w = 1) like np.cumsum:
    // once the running sum is >= 1, a term w < 2^-53 rounds away, so only the candidates with w >= 2^-53 need
    // to be ordered; the cut can never fall among the others (their running sum equals the total already).
    std::vector<Workspace::Item>& items = ws.items;
    items.clear();
    for (int64_t j = 0; j < n; ++j) {
      if (w[j] >= 0x1p-53) {
        const int64_t i = kept ? kept[j] : j;
        items.push_back({~float_key(l[i]), (int32_t)i, w[j]});
      }
    }
    radix_sort_items(items, ws.items_tmp);
    double total = 0.0;
    for (const Workspace::Item& it : items) total += it.w;
    const double thr = (double)p * total;
    double cum = 0.0;
    size_t cut = items.size() - 1;
    for (size_t t = 0; t < items.size(); ++t) {
      cum += items[t].w;
      if (cum >= thr) {
        cut = t;
        break;
      }
    }
    const uint64_t cut_comp = composite(~items[cut].inv_key, items[cut].index);
    // keep the candidates at or before the cut in sorted order; compact (index order is preserved)
    std::vector<int32_t>& out = ws.tmp;
    out.clear();
    int64_t m = 0;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t i = kept ? kept[j] : j;
      if (composite(float_key(l[i]), i) >= cut_comp) {
        out.push_back((int32_t)i);
        w[m++] = w[j];
      }
    }
    kept = out.data();
    n = m;
  }

  // the draw: one uniform, running float64 sum over the kept tokens in index order
  double total = 0.0;
  for (int64_t j = 0; j < n; ++j) total += w[j];
  const double u = uniform53(a.seed[r], a.stream[r], step);
  const double target = u * total;
  double run = 0.0;
  int64_t sel = n - 1;
  for (int64_t j = 0; j < n; ++j) {
    run += w[j];
    if (run > target) {
      sel = j;
      break;
    }
  }
  const int64_t t = kept ? kept[sel] : sel;
  a.tokens[r] = t;
  if (a.logprobs) a.logprobs[r] = ((double)l[t] / Td - zmax) - ::log(total);
  return 0;
}

}  // namespace cpu
}  // namespace larp_rt
