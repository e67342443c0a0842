// W4A4 GEMM on warp-level mma.sync, three instruction kinds on one tile structure:
//   kS4   INT4 on the native 4-bit MMA, mma.sync m16n8k64 s4.s4 (sm_80 / 86 / 89);
//   kS8   INT4 on 8-bit MMAs: int4 -> int8 in registers, two mma.sync m16n8k32 s8.s8 per k64
//         (sm_90a alternative to wgmma; sm_120a, whose 4-bit integer MMA is emulated anyway);
//   kFp4  NVFP4 on mma.sync m16n8k64 kind::mxf4nvf4.block_scale.scale_vec::4X (sm_120a).
// kS4 and kS8 have an unsigned-activation instantiation (kUnsigned, act_unsigned = 1: codes
// 0..15 in q, weights still -8..7): the MMA's A type becomes u4 (m16n8k64 .u4.s4) or u8
// (m16n8k32 .u8.s8); fragments, widening and rescale are the same code.
//
// CTA 128 x 128 output tile, 8 warps as 2 (M) x 4 (N), warp tile 64 x 32 (4 m16 x 4 n8 MMA
// tiles). K advances 128 codes (64 bytes per row) per stage through a 3-stage cp.async
// pipeline; shared rows are padded to 80 bytes (5 x 16: ldmatrix conflict-free).
//
// Fragments come from ldmatrix on the canonical packed bytes: an 8x8 b16 ldmatrix tile is 8 rows
// x 16 bytes = 8 rows x 32 codes, and lane (g, t) receives bytes 4t..4t+3 of row g = codes
// 8t..8t+7 with code i in nibble i: exactly the 4-bit A/B fragment of m16n8k64. Any nibble order
// that permutes codes inside a group the same way in q and qweight (the split_halves layout)
// leaves each group's dot product unchanged, so the kernel serves it as is.
//
// INT4 accumulation is two-level: per group of 64 an integer MMA result, then
// acc += dot * sa[m, g] * sw[g, n] in float32. The integer accumulator starts at
// 0x4B400000 (the bits of 1.5 * 2^23) instead of 0, so its bits read as the float
// 1.5 * 2^23 + dot, exactly (|dot| < 2^22); fma(f, sa, -1.5 * 2^23 * sa) = round(dot * sa) in
// one instruction, and a second fma adds it times sw. No int->float conversion instruction.
// kS8 operands are 16 * code (nibble in the high half of each byte), the MMA sums 256 * dot,
// and the epilogue divides by 256 (exact). Bounds on the integer sum per group of 64:
//   signed   kS4 |dot| <= 64 * 8 * 8 = 4096;         kS8 |256 dot| <= 64 * 128 * 128 = 2^20;
//   unsigned kS4 |dot| <= 64 * 15 * 8 = 7680;        kS8 |256 dot| <= 64 * 240 * 128 = 1966080;
// all below 2^22 (the magic-number limit). NVFP4 needs none of this: the MMA applies the E4M3
// block scales itself and accumulates in float32.
#pragma once

#include "gemm_common.cuh"

namespace dcgq {
namespace {

enum class MmaKind { kS4, kS8, kFp4 };

constexpr int kGThreads = 256;
constexpr int kGBM = 128, kGBN = 128;
constexpr int kGRowBytes = kPackedRowBytes;
constexpr int kGPitch = kPackedPitch;
constexpr int kGStages = 3;
constexpr int kGTile = kGBM * kGPitch;  // bytes of one operand tile per stage
constexpr int kGSmem = kGStages * 2 * kGTile;
constexpr int kMagicBits = 0x4B400000;  // 1.5 * 2^23 as float32 bits
constexpr float kMagic = 12582912.0f;

template <MmaKind kKind, bool kUnsigned>
__global__ void __launch_bounds__(kGThreads, 1)
    gemm_w4a4_mma_kernel(const dcgq_gemm_w4a4_args a, bool vec16) {
  using namespace dev;
  static_assert(!(kUnsigned && kKind == MmaKind::kFp4), "unsigned activations are INT4 only");
  constexpr int MT = 4, NT = 4;
  extern __shared__ __align__(16) uint8_t smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 2, wn = warp & 3, g = lane >> 2, t = lane & 3;
  const int64_t m0 = int64_t(blockIdx.x) * kGBM, n0 = int64_t(blockIdx.y) * kGBN;
  const int64_t kbytes = a.k / 2;
  const int ktiles = int((kbytes + kGRowBytes - 1) / kGRowBytes);
  const int ksteps = int((a.k + 63) / 64);  // k64 steps (INT4: one per group)
  const uint8_t* qa = static_cast<const uint8_t*>(a.q);
  const uint8_t* qw = static_cast<const uint8_t*>(a.qweight);
  const bool s_bf16 = a.scale_dtype == DCGQ_DTYPE_BFLOAT16;

  auto load_stage = [&](int kt, int stage) {
    uint8_t* at = smem + stage * 2 * kGTile;
    load_packed_tile(at, qa, a.ldq, m0, a.m, int64_t(kt) * kGRowBytes, kbytes, vec16);
    load_packed_tile(at + kGTile, qw, a.ldqw, n0, a.n, int64_t(kt) * kGRowBytes, kbytes, vec16);
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.0f;
  const int magic[4] = {kMagicBits, kMagicBits, kMagicBits, kMagicBits};

#pragma unroll
  for (int s = 0; s < kGStages - 1; ++s) {
    if (s < ktiles) load_stage(s, s);
    cp_async_commit();
  }

#pragma unroll 1
  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kGStages - 2>();
    __syncthreads();
    if (kt + kGStages - 1 < ktiles) load_stage(kt + kGStages - 1, (kt + kGStages - 1) % kGStages);
    cp_async_commit();
    const uint8_t* at = smem + (kt % kGStages) * 2 * kGTile;
    const uint8_t* bt = at + kGTile;

#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      const int ks = kt * 2 + kk;  // global k64 step
      if (ks >= ksteps) break;

      // ---- per-step scales (issued first: their latency hides behind ldmatrix and the MMAs)
      float sa[MT][2], sw[NT][2];
      uint32_t sfa[MT / 2] = {}, sfb = 0;
      if constexpr (kKind == MmaKind::kFp4) {
        const int kblocks = int(a.k / 16);
#pragma unroll
        for (int p = 0; p < MT / 2; ++p) {
          const int64_t row = m0 + wm * 64 + (2 * p + ((lane & 3) >> 1)) * 16 + g + 8 * (lane & 1);
#pragma unroll
          for (int b = 0; b < 4; ++b) {
            const int kb = 4 * ks + b;
            const uint32_t v =
                (row < a.m && kb < kblocks)
                    ? __ldg(static_cast<const uint8_t*>(a.scales) + row * a.ld_scales + kb)
                    : 0u;
            sfa[p] |= v << (8 * b);
          }
        }
        const int64_t col = n0 + wn * 32 + (lane & 3) * 8 + g;
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const int kb = 4 * ks + b;
          const uint32_t v =
              (col < a.n && kb < kblocks)
                  ? __ldg(static_cast<const uint8_t*>(a.wscales) + kb * a.ld_wscales + col)
                  : 0u;
          sfb |= v << (8 * b);
        }
      } else {
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int64_t row = m0 + wm * 64 + 16 * i + g + 8 * h;
            sa[i][h] = row < a.m ? load_half(a.scales, row * a.ld_scales + ks, s_bf16) : 0.0f;
          }
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int64_t col = n0 + wn * 32 + 8 * j + 2 * t + h;
            sw[j][h] = col < a.n ? load_half(a.wscales, ks * a.ld_wscales + col, s_bf16) : 0.0f;
          }
      }

      // ---- fragments
      uint32_t af[MT][4], bfr[NT][2];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const int row = wm * 64 + 16 * i + (lane & 15);
        ldmatrix_x4(af[i], at + row * kGPitch + (2 * kk + (lane >> 4)) * 16);
      }
#pragma unroll
      for (int jp = 0; jp < NT / 2; ++jp) {
        uint32_t r[4];
        const int row = wn * 32 + (2 * jp + (lane >> 4)) * 8 + (lane & 7);
        ldmatrix_x4(r, bt + row * kGPitch + (2 * kk + ((lane >> 3) & 1)) * 16);
        bfr[2 * jp][0] = r[0];
        bfr[2 * jp][1] = r[1];
        bfr[2 * jp + 1][0] = r[2];
        bfr[2 * jp + 1][1] = r[3];
      }

      if constexpr (kKind == MmaKind::kFp4) {
#pragma unroll
        for (int i = 0; i < MT; ++i) {
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            // thread selectors must be immediates: expand the (i % 2, j) combinations
            const uint32_t sa_reg = sfa[i / 2];
            if (i % 2 == 0) {
              if (j == 0) mma_fp4<0, 0>(acc[i][j], af[i], bfr[j][0], bfr[j][1], sa_reg, sfb);
              if (j == 1) mma_fp4<0, 1>(acc[i][j], af[i], bfr[j][0], bfr[j][1], sa_reg, sfb);
              if (j == 2) mma_fp4<0, 2>(acc[i][j], af[i], bfr[j][0], bfr[j][1], sa_reg, sfb);
              if (j == 3) mma_fp4<0, 3>(acc[i][j], af[i], bfr[j][0], bfr[j][1], sa_reg, sfb);
            } else {
              if (j == 0) mma_fp4<1, 0>(acc[i][j], af[i], bfr[j][0], bfr[j][1], sa_reg, sfb);
              if (j == 1) mma_fp4<1, 1>(acc[i][j], af[i], bfr[j][0], bfr[j][1], sa_reg, sfb);
              if (j == 2) mma_fp4<1, 2>(acc[i][j], af[i], bfr[j][0], bfr[j][1], sa_reg, sfb);
              if (j == 3) mma_fp4<1, 3>(acc[i][j], af[i], bfr[j][0], bfr[j][1], sa_reg, sfb);
            }
          }
        }
      } else {
        // Rescale factors: fma(f, sa, -magic * sa) is exact only while -magic * sa is finite
        // (sa < 2^103); scales that large (or inf / NaN) take the plain path for the warp.
        float nsa[MT][2];
        bool fast = true;
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            nsa[i][h] = -kMagic * sa[i][h];
            fast = fast && fabsf(nsa[i][h]) <= 3.4028234663852886e38f;
          }
        fast = __all_sync(0xffffffffu, fast);
        int d[MT][NT][4];
#pragma unroll
        for (int i = 0; i < MT; ++i) {
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            if constexpr (kKind == MmaKind::kS4) {
              mma_s4<kUnsigned>(d[i][j], af[i], bfr[j][0], bfr[j][1], magic);
            } else {
              // Codes 8t..8t+7 of the k32 half: even ones form the 8-bit k 4t..4t+3, odd ones
              // k 16+4t..16+4t+3 - the same permutation of k for A and B, so the dot is kept.
              mma_s8<kUnsigned>(d[i][j], int4_even_x16(af[i][0]), int4_even_x16(af[i][1]),
                                int4_odd_x16(af[i][0]), int4_odd_x16(af[i][1]),
                                int4_even_x16(bfr[j][0]), int4_odd_x16(bfr[j][0]), magic);
              mma_s8<kUnsigned>(d[i][j], int4_even_x16(af[i][2]), int4_even_x16(af[i][3]),
                                int4_odd_x16(af[i][2]), int4_odd_x16(af[i][3]),
                                int4_even_x16(bfr[j][1]), int4_odd_x16(bfr[j][1]), d[i][j]);
            }
          }
        }
        if (fast) {  // warp-uniform
#pragma unroll
          for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
              for (int c = 0; c < 4; ++c) {
                const float u = fmaf(__int_as_float(d[i][j][c]), sa[i][c >> 1], nsa[i][c >> 1]);
                acc[i][j][c] = fmaf(u, sw[j][c & 1], acc[i][j][c]);
              }
        } else {  // scales >= 2^103, inf or NaN
#pragma unroll
          for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
              for (int c = 0; c < 4; ++c) {
                const float u = float(d[i][j][c] - kMagicBits) * sa[i][c >> 1];
                acc[i][j][c] = fmaf(u, sw[j][c & 1], acc[i][j][c]);
              }
        }
      }
    }
  }
  cp_async_wait<0>();

  const float scale = kKind == MmaKind::kS8 ? 1.0f / 256.0f : 1.0f;
  w4a4_epilogue<MT, NT>(acc, m0 + wm * 64, n0 + wn * 32, scale, a);
}

template <MmaKind kKind, bool kUnsigned>
dcgq_status launch_gemm_w4a4_mma_typed(const dcgq_gemm_w4a4_args& a, cudaStream_t stream) {
  auto kernel = gemm_w4a4_mma_kernel<kKind, kUnsigned>;
  DCGQ_RETURN_IF_ERROR(
      cuda_status(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kGSmem),
                  "gemm_w4a4: cudaFuncSetAttribute(MaxDynamicSharedMemorySize)"));
  const bool vec16 = a.ldq % 16 == 0 && a.ldqw % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(a.q) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(a.qweight) % 16 == 0;
  const dim3 grid(unsigned((a.m + kGBM - 1) / kGBM), unsigned((a.n + kGBN - 1) / kGBN));
  if (grid.y > 65535u) {
    return fail(DCGQ_ERROR_UNSUPPORTED, "dcgq_gemm_w4a4: n = %lld exceeds %u output tiles",
                (long long)a.n, 65535u * kGBN);
  }
  kernel<<<grid, kGThreads, kGSmem, stream>>>(a, vec16);
  return cuda_status(cudaGetLastError(), "gemm_w4a4 kernel launch");
}

// The registered launcher: picks the signed or unsigned-activation kernel (act_unsigned is
// validated: 0 / 1, and 0 for NVFP4).
template <MmaKind kKind>
dcgq_status launch_gemm_w4a4_mma(const dcgq_gemm_w4a4_args& a, cudaStream_t stream) {
  if constexpr (kKind != MmaKind::kFp4) {
    if (a.act_unsigned) return launch_gemm_w4a4_mma_typed<kKind, true>(a, stream);
  }
  return launch_gemm_w4a4_mma_typed<kKind, false>(a, stream);
}

}  // namespace
}  // namespace dcgq
