// W4A16: y = x @ dequant(W)^T (* wtscale) + bias for weight-only layers (AdaLayerNorm linears,
// where M is the batch, often 1), as a GEMV on CUDA cores.
//
// CTA 256 threads = 8 warps; a warp owns 4 output columns (weight rows) and the CTA's 4 rows of
// x. Lanes stride along K in 8-byte steps (16 codes) so that a warp reads 256 contiguous bytes of
// each weight row per step; every 8-byte chunk lies inside one scale group (16 divides both group
// sizes). code * scale is the exactly dequantized weight (an INT4 code times a 16-bit scale, or
// an E2M1 value times an E4M3 scale, fits in float32), so the only roundings are the float32
// sums, as in the reference. The warp then reduces across lanes.
// Layouts: canonical (byte j: codes 2j, 2j+1) and split_halves (byte j of a group: codes j and
// j + G/2) differ only in which x elements pair with the low and high nibbles.
// Large M re-reads the weights once per 4 rows of x (from L2): correct but slow (docs/KERNELS.md).
#pragma once

#include "common.cuh"

namespace dcgq {
namespace {

constexpr int kVThreads = 256;
constexpr int kVColsPerWarp = 4;
constexpr int kVCols = 8 * kVColsPerWarp;  // output columns per CTA

// Code -> value with integer ops only (an int->float conversion instruction runs at a quarter
// of the FMA rate, slower than the weights stream in).
__device__ __forceinline__ float e2m1_value(uint32_t nib) {
  const uint32_t e = (nib >> 1) & 3u, m = nib & 1u;
  // codes 0..7: 0, 0.5, 1, 1.5, 2, 3, 4, 6 = (1 + m / 2) * 2^(e - 1) for e > 0, m / 2 for e = 0
  const uint32_t mag = e ? (((e + 126u) << 23) | (m << 22)) : (m ? 0x3f000000u : 0u);
  return __uint_as_float(mag | ((nib & 8u) << 28));
}

template <bool kNvfp4>
__device__ __forceinline__ float code_value(uint32_t nib) {
  if constexpr (kNvfp4) {
    return e2m1_value(nib);
  } else {  // 2^23 + (nib ^ 8) exactly, minus 2^23 + 8: the signed code -8..7
    return __uint_as_float(0x4b000000u | (nib ^ 8u)) - 8388616.0f;
  }
}

// kRows rows of x per CTA: 1 (M == 1, the common AdaLayerNorm case; small enough for three CTAs
// per SM) or 4. kSplit: split_halves layout, else canonical.
template <bool kNvfp4, int kRows, bool kSplit>
__global__ void __launch_bounds__(kVThreads, kRows == 1 ? 3 : 1)
    gemm_w4a16_gemv_kernel(const dcgq_gemm_w4a16_args a) {
  constexpr int kVRows = kRows;
  constexpr bool split = kSplit;
  constexpr int G = kNvfp4 ? 16 : 64;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t n0 = int64_t(blockIdx.x) * kVCols + warp * kVColsPerWarp;
  const int64_t m0 = int64_t(blockIdx.y) * kVRows;
  const bool bf16 = a.x_dtype == DCGQ_DTYPE_BFLOAT16;
  const int64_t kbytes = a.k / 2;
  const uint16_t* x = static_cast<const uint16_t*>(a.x);
  const uint8_t* qw = static_cast<const uint8_t*>(a.qweight);

  float acc[kVRows][kVColsPerWarp];
#pragma unroll
  for (int r = 0; r < kVRows; ++r)
#pragma unroll
    for (int c = 0; c < kVColsPerWarp; ++c) acc[r][c] = 0.0f;

#pragma unroll 1
  for (int64_t b = int64_t(lane) * 8; b < kbytes; b += 32 * 8) {
    const int64_t grp = (2 * b) / G;
    // x elements paired with the low / high nibbles of bytes b..b+7 (canonical: interleaved)
    int64_t xlo = 2 * b, xhi = 2 * b + 8;
    if constexpr (split) {
      xlo = grp * G + (b % (G / 2));
      xhi = xlo + G / 2;
    }
    uint2 wv[kVColsPerWarp];
    float scale[kVColsPerWarp];
#pragma unroll
    for (int c = 0; c < kVColsPerWarp; ++c) {
      const int64_t n = n0 + c;
      if (n < a.n) {
        wv[c] = __ldg(reinterpret_cast<const uint2*>(qw + n * a.ldqw + b));
        if constexpr (kNvfp4) {
          scale[c] = qmath::e4m3_to_f32(
              __ldg(static_cast<const uint8_t*>(a.wscales) + grp * a.ld_wscales + n));
        } else {
          scale[c] = dev::load_half(a.wscales, grp * a.ld_wscales + n, bf16);
        }
      } else {
        wv[c] = make_uint2(0u, 0u);
        scale[c] = 0.0f;
      }
    }
    // 16 x values per row as packed 16-bit pairs (converted where used, to keep registers low)
    uint32_t xp[kVRows][8];
#pragma unroll
    for (int r = 0; r < kVRows; ++r) {
      const int64_t m = m0 + r < a.m ? m0 + r : m0;  // rows past M repeat row m0, not stored
      const uint4 p0 = __ldg(reinterpret_cast<const uint4*>(x + m * a.ldx + xlo));
      const uint4 p1 = __ldg(reinterpret_cast<const uint4*>(x + m * a.ldx + xhi));
      xp[r][0] = p0.x, xp[r][1] = p0.y, xp[r][2] = p0.z, xp[r][3] = p0.w;
      xp[r][4] = p1.x, xp[r][5] = p1.y, xp[r][6] = p1.z, xp[r][7] = p1.w;
    }
#pragma unroll
    for (int c = 0; c < kVColsPerWarp; ++c) {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const uint32_t byte = ((j < 4 ? wv[c].x : wv[c].y) >> (8 * (j & 3))) & 0xffu;
        // code * scale is exact in float32 (<= 11 significant bits): the exactly dequantized
        // weight, as in the reference
        const float wl = code_value<kNvfp4>(byte & 0xfu) * scale[c];
        const float wh = code_value<kNvfp4>(byte >> 4) * scale[c];
#pragma unroll
        for (int r = 0; r < kVRows; ++r) {
          // the x elements pairing with byte j's low / high nibble: canonical, elements 2j and
          // 2j + 1 of the 16; split_halves, element j of each 8
          uint32_t hl, hh;
          if constexpr (split) {
            hl = (j & 1) ? xp[r][j >> 1] >> 16 : xp[r][j >> 1] & 0xffffu;
            hh = (j & 1) ? xp[r][4 + (j >> 1)] >> 16 : xp[r][4 + (j >> 1)] & 0xffffu;
          } else {
            hl = xp[r][j] & 0xffffu;
            hh = xp[r][j] >> 16;
          }
          acc[r][c] = fmaf(wl, dev::half_bits_to_f32(uint16_t(hl), bf16), acc[r][c]);
          acc[r][c] = fmaf(wh, dev::half_bits_to_f32(uint16_t(hh), bf16), acc[r][c]);
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kVRows; ++r)
#pragma unroll
    for (int c = 0; c < kVColsPerWarp; ++c)
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc[r][c] += __shfl_xor_sync(0xffffffffu, acc[r][c], o);

  // lane r * 4 + c writes output (m0 + r, n0 + c)
  float v = 0.0f;
#pragma unroll
  for (int r = 0; r < kVRows; ++r)
#pragma unroll
    for (int c = 0; c < kVColsPerWarp; ++c)
      if (lane == r * kVColsPerWarp + c) v = acc[r][c];
  const int64_t m = m0 + lane / kVColsPerWarp, n = n0 + lane % kVColsPerWarp;
  if (lane < kVRows * kVColsPerWarp && m < a.m && n < a.n) {
    if (a.wtscale != nullptr) v *= __ldg(a.wtscale);
    if (a.bias != nullptr) v += dev::load_half(a.bias, n, bf16);
    if (bf16) {
      static_cast<__nv_bfloat16*>(a.out)[m * a.ldo + n] = __float2bfloat16_rn(v);
    } else {
      static_cast<__half*>(a.out)[m * a.ldo + n] = __float2half_rn(v);
    }
  }
}

template <bool kNvfp4, int kRows>
void launch_w4a16_rows(const dcgq_gemm_w4a16_args& a, dim3 grid, cudaStream_t stream) {
  if (a.layout == DCGQ_LAYOUT_SPLIT_HALVES) {
    gemm_w4a16_gemv_kernel<kNvfp4, kRows, true><<<grid, kVThreads, 0, stream>>>(a);
  } else {
    gemm_w4a16_gemv_kernel<kNvfp4, kRows, false><<<grid, kVThreads, 0, stream>>>(a);
  }
}

dcgq_status launch_gemm_w4a16(const dcgq_gemm_w4a16_args& a, cudaStream_t stream) {
  const int rows = a.m == 1 ? 1 : 4;
  const int64_t mblocks = (a.m + rows - 1) / rows;
  if (mblocks > 65535) {
    return fail(DCGQ_ERROR_UNSUPPORTED,
                "dcgq_gemm_w4a16: m = %lld exceeds the GEMV kernel's %d rows", (long long)a.m,
                65535 * 4);
  }
  const dim3 grid(unsigned((a.n + kVCols - 1) / kVCols), unsigned(mblocks));
  if (a.fmt == DCGQ_FORMAT_NVFP4) {
    rows == 1 ? launch_w4a16_rows<true, 1>(a, grid, stream)
              : launch_w4a16_rows<true, 4>(a, grid, stream);
  } else {
    rows == 1 ? launch_w4a16_rows<false, 1>(a, grid, stream)
              : launch_w4a16_rows<false, 4>(a, grid, stream);
  }
  return cuda_status(cudaGetLastError(), "gemm_w4a16 kernel launch");
}

}  // namespace
}  // namespace dcgq
