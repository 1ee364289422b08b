// larp_rt sampling kernels: definitions shared by the CPU and CUDA kernels (torch-free, header-only).
//
// Semantics: larp_rt/sampling.py (the numpy reference) is the oracle; see cpp_ext/README.md.
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define LARP_HD __host__ __device__ __forceinline__
#else
#define LARP_HD inline
#endif

namespace larp_rt {

// dtype codes of the logits (the C ABI's `dtype` field)
enum Dtype : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Philox4x32-10 (Salmon et al. 2011), the generator of larp_rt.sampling.philox4x32.
struct Philox4 {
  uint32_t v[4];
};

LARP_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += W0;
      k1 += W1;
    }
    const uint64_t p0 = (uint64_t)M0 * c0, p1 = (uint64_t)M1 * c2;
    const uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0, n1 = (uint32_t)p1;
    const uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1, n3 = (uint32_t)p0;
    c0 = n0;
    c1 = n1;
    c2 = n2;
    c3 = n3;
  }
  Philox4 out = {{c0, c1, c2, c3}};
  return out;
}

// One float64 uniform in [0, 1) with 53 random bits: key = seed, counter = (step lo, step hi, stream lo, stream hi).
LARP_HD double uniform53(uint64_t seed, uint64_t stream, uint64_t step) {
  const Philox4 x = philox4x32_10((uint32_t)step, (uint32_t)(step >> 32), (uint32_t)stream, (uint32_t)(stream >> 32),
                                  (uint32_t)seed, (uint32_t)(seed >> 32));
  // (x0 >> 5) * 2^26 + (x1 >> 6) < 2^53 is exact in float64, and so is the division by 2^53
  return ((double)(x.v[0] >> 5) * 67108864.0 + (double)(x.v[1] >> 6)) / 9007199254740992.0;
}

// Order-preserving map float32 -> uint32 (larger float <=> larger key); -0.0 and +0.0 share one key, as they
// compare equal in the reference's argsort.
LARP_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  memcpy(&b, &f, 4);
  return b;
#endif
}

LARP_HD float bits_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  memcpy(&f, &b, 4);
  return f;
#endif
}

LARP_HD uint32_t float_key(float f) {
  if (f == 0.0f) f = 0.0f;
  const uint32_t b = float_bits(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

LARP_HD float key_float(uint32_t k) {
  return bits_float((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
}

// Exact conversions to float32 (what numpy's astype(float32) does for float16, and torch's .float() for bfloat16).
LARP_HD float half_bits_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, bits;
  if (exp == 0x1Fu) {
    bits = sign | 0x7F800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;  // +-0
  } else {  // subnormal half: normalise
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while ((man & 0x400u) == 0);
    bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3FFu) << 13);
  }
  return bits_float(bits);
}

LARP_HD float bf16_bits_to_float(uint16_t h) {
  return bits_float((uint32_t)h << 16);
}

LARP_HD float load_logit(const void* base, int32_t dtype, int64_t i) {
  if (dtype == kFloat32) return static_cast<const float*>(base)[i];
  const uint16_t h = static_cast<const uint16_t*>(base)[i];
  return dtype == kFloat16 ? half_bits_to_float(h) : bf16_bits_to_float(h);
}

}  // namespace larp_rt
