// Scalar arithmetic of the 4-bit formats, shared by the CUDA kernels and the host (CPU) path.
//
// One source for both sides, so that the CPU tests of dcgq_quantize_act_host check the exact
// code the GPU runs. Every function reproduces dcgen_quant/formats (int4.py, nvfp4.py) bit for
// bit on finite inputs:
//   * divisions are correctly rounded float32 (__fdiv_rn on the device, IEEE '/' on the host;
//     the library is never built with fast-math);
//   * float32 -> bfloat16 / float16 / float8_e4m3fn conversions round to nearest even, in
//     integer arithmetic, the way torch's c10 converters do (NaN -> 0x7FC0 / 0x7E00 / 0x7F);
//   * e4m3 saturates at 448 ("satfinite", the semantics of cvt.rn.satfinite.e4m3x2.f32), which
//     equals the reference's clamp(max=448) followed by the cast;
//   * the E2M1 code is the sign bit of v (so -0.0 and negatives rounding to zero give code 8)
//     plus the magnitude rounded to nearest, ties to the even code, saturating at 6;
//   * unsigned INT4 activations: u = (x + 0.171875) / smooth, both steps correctly rounded
//     float32 in that order (an addition cannot fuse with a division), amax = max |u| (so
//     negative u, from x below -0.171875, still count), scale = amax / 15, codes 0..15.
#pragma once

#include <stdint.h>

#include <cmath>
#include <cstring>

#if defined(__CUDACC__)
#define DCGQ_HD __host__ __device__ __forceinline__
#else
#define DCGQ_HD inline
#endif

namespace dcgq {
namespace qmath {

DCGQ_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

DCGQ_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

DCGQ_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

DCGQ_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);  // never contracted into an FMA
#else
  return a + b;
#endif
}

DCGQ_HD float round_half_even(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);
#else
  return std::nearbyint(v);  // default rounding mode: to nearest, ties to even
#endif
}

// NaN-propagating running maximum of magnitudes (torch.amax propagates NaN).
DCGQ_HD float amax_update(float m, float v) {
  const float a = bits_f32(f32_bits(v) & 0x7fffffffu);
  return (a > m || a != a) ? a : m;
}

// ---- 16-bit floats ---------------------------------------------------------------------------

DCGQ_HD float bf16_to_f32(uint16_t h) { return bits_f32(uint32_t(h) << 16); }

DCGQ_HD float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu;
  const uint32_t m = h & 0x3ffu;
  if (e == 0) {  // zero or subnormal: m * 2^-24, exact in float32
    const float v = float(m) * 5.9604644775390625e-08f;
    return bits_f32(f32_bits(v) | sign);
  }
  if (e == 31) return bits_f32(sign | 0x7f800000u | (m << 13));
  return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}

DCGQ_HD uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

DCGQ_HD uint16_t f32_to_f16(float f) {
  const uint32_t u = f32_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);   // NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to infinity
  if (a >= 0x38800000u) {                                 // >= 2^-14: a normal half
    a += (uint32_t(15 - 127) << 23) + 0xfffu + ((a >> 13) & 1u);
    return uint16_t(sign | (a >> 13));
  }
  // Subnormal half (units of 2^-24): adding 0.5 aligns the value to that unit, and the float
  // addition rounds to nearest even.
  const float shifted = bits_f32(a) + 0.5f;
  return uint16_t(sign | (f32_bits(shifted) - 0x3f000000u));
}

// ---- float8_e4m3fn ---------------------------------------------------------------------------

DCGQ_HD float e4m3_to_f32(uint8_t b) {
  const uint32_t sign = uint32_t(b & 0x80u) << 24;
  const uint32_t e = (b >> 3) & 0xfu;
  const uint32_t m = b & 7u;
  if (e == 15 && m == 7) return bits_f32(sign | 0x7fc00000u);  // the only NaN encoding
  if (e == 0) {                                                // subnormal: m * 2^-9
    const float v = float(m) * 0.001953125f;
    return bits_f32(f32_bits(v) | sign);
  }
  return bits_f32(sign | ((e + 120u) << 23) | (m << 20));
}

// Round to nearest even into float8_e4m3fn, saturating finite values at +-448.
DCGQ_HD uint8_t f32_to_e4m3_satfinite(float f) {
  const uint32_t u = f32_bits(f);
  const uint8_t sign = uint8_t((u >> 24) & 0x80u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint8_t(sign | 0x7fu);   // NaN
  if (a >= 0x43e00000u) return uint8_t(sign | 0x7eu);  // >= 448 (and inf): 448
  if (a < (121u << 23)) {
    // below 2^-6, the smallest normal: subnormal units of 2^-9; adding 2^14 aligns the value
    // to that unit (2^14 * 2^-23) with a round-to-nearest-even float addition.
    const float shifted = bits_f32(a) + 16384.0f;
    return uint8_t(sign | (f32_bits(shifted) - (141u << 23)));
  }
  a += (uint32_t(7 - 127) << 23) + 0x7ffffu + ((a >> 20) & 1u);
  return uint8_t(sign | (a >> 20));
}

// ---- INT4 ------------------------------------------------------------------------------------

// The shift of unsigned INT4 activations (formats/int4.py UNSIGNED_ACT_SHIFT; the C header's
// DCGQ_UNSIGNED_ACT_SHIFT): 11/64, exact in every float type, >= -min GELU (0.16997).
constexpr float kUnsignedActShift = 0.171875f;

// Scale of an INT4 group from its amax: (amax / qmax) rounded to the 16-bit scale dtype, qmax 7
// (signed codes) or 15 (unsigned). Returns the scale's bits; *divisor is the float32 value codes
// are computed with (1 for a zero scale).
DCGQ_HD uint16_t int4_scale(float amax, float qmax, bool bf16, float* divisor) {
  const float s = div_rn(amax, qmax);
  const uint16_t bits = bf16 ? f32_to_bf16(s) : f32_to_f16(s);
  const float d = bf16 ? bf16_to_f32(bits) : f16_to_f32(bits);
  *divisor = (d == 0.0f) ? 1.0f : d;
  return bits;
}

// INT4 code of xs (already smoothed) as a raw nibble 0..15 (two's complement of -8..7).
DCGQ_HD uint32_t int4_nibble(float xs, float divisor) {
  float q = round_half_even(div_rn(xs, divisor));
  q = q < -8.0f ? -8.0f : (q > 7.0f ? 7.0f : q);
  return uint32_t(int(q)) & 0xfu;
}

// Unsigned INT4 code 0..15 of u (already shifted and smoothed); negative u clamps to 0.
DCGQ_HD uint32_t uint4_nibble(float u, float divisor) {
  float q = round_half_even(div_rn(u, divisor));
  q = q < 0.0f ? 0.0f : (q > 15.0f ? 15.0f : q);
  return uint32_t(int(q));
}

// ---- NVFP4 (activations: block scales only) ---------------------------------------------------

// E4M3 block scale of an activation group from its amax; *divisor is its float32 value.
DCGQ_HD uint8_t nvfp4_act_scale(float amax, float* divisor) {
  const uint8_t bits = f32_to_e4m3_satfinite(div_rn(amax, 6.0f));
  *divisor = e4m3_to_f32(bits);
  return bits;
}

// E2M1 code (0..15) of xs divided by its block scale; "x * 0" where the divisor is not > 0.
DCGQ_HD uint32_t nvfp4_nibble(float xs, float divisor) {
  const float v = divisor > 0.0f ? div_rn(xs, divisor) : xs * 0.0f;
  const uint32_t vb = f32_bits(v);
  const float a = bits_f32(vb & 0x7fffffffu);
  // magnitude boundaries between codes; ">" where the lower code is even, ">=" where it is odd,
  // so that ties go to the even code (formats/nvfp4.py)
  const uint32_t mag = uint32_t(a > 0.25f) + uint32_t(a >= 0.75f) + uint32_t(a > 1.25f) +
                       uint32_t(a >= 1.75f) + uint32_t(a > 2.5f) + uint32_t(a >= 3.5f) +
                       uint32_t(a > 5.0f);
  return ((vb >> 31) << 3) | mag;
}

}  // namespace qmath
}  // namespace dcgq

namespace dcgq {
namespace qmath {

// Where element e (0 <= e < K) of a row lives in a packed row of the given layout: byte index
// and whether it is the high nibble. layout 0 = canonical, 1 = split_halves (group `g`).
DCGQ_HD void packed_position(int layout, int g, int64_t e, int64_t* byte, bool* high) {
  if (layout == 0) {
    *byte = e >> 1;
    *high = (e & 1) != 0;
  } else {
    const int64_t group = e / g;
    const int j = int(e - group * g);
    const int half = g >> 1;
    *byte = group * half + (j % half);
    *high = j >= half;
  }
}

}  // namespace qmath
}  // namespace dcgq
