// quantize_act: smoothing, per-token per-group 4-bit quantization (INT4 / NVFP4) and the
// low-rank down projection lora_act = x @ lora_down, in one read of x.
//
// CTA: 128 threads, 32 rows of x, K walked in chunks of 128 columns, double-buffered with
// cp.async. Each chunk of x lands in shared memory once and feeds both
//   * the quantizer: a thread takes 8 consecutive elements (one 16-byte vector); the 8 (INT4,
//     G = 64) or 2 (NVFP4, G = 16) lanes of a group reduce the amax with shuffles; the scale and
//     codes come from kernels/quant_math.h, the code the CPU path dcgq_quantize_act_host runs;
//     unsigned INT4 (kUnsigned, act_unsigned = 1) adds the shift before the smoothing division
//     and quantizes to codes 0..15 with amax / 15;
//   * the projection: mma.sync m16n8k16 (bf16 or f16, fp32 accumulate) with x as A (ldmatrix)
//     and the matching 128-row slice of lora_down as B (ldmatrix.trans); warp w owns rows
//     16 * (w % 2) .. + 16 and n-tiles 8 * (w / 2) .. + 8, so rank <= 128.
// Shared-memory rows are padded by 16 bytes (an odd number of 16-byte units per row), which
// makes the 8 row addresses of each ldmatrix phase hit distinct bank groups.
#pragma once

#include "common.cuh"

namespace dcgq {
namespace {

constexpr int kQThreads = 128;
constexpr int kQRows = 32;
constexpr int kQChunk = 128;                 // K columns per stage
constexpr int kQXPitch = kQChunk * 2 + 16;   // bytes per shared row of x
constexpr int kQXStage = kQRows * kQXPitch;  // bytes of x per stage

__device__ __forceinline__ float nan_max(float a, float b) { return (b > a || b != b) ? b : a; }

template <bool kNvfp4, bool kUnsigned>
__global__ void __launch_bounds__(kQThreads, 4)
    quantize_act_kernel(const dcgq_quantize_act_args a, int rp, bool down_vec) {
  using namespace dev;
  static_assert(!(kNvfp4 && kUnsigned), "unsigned codes exist for INT4 only");
  constexpr int G = kNvfp4 ? 16 : 64;
  constexpr int kLanesPerGroup = G / 8;
  extern __shared__ __align__(16) uint8_t smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t m0 = int64_t(blockIdx.x) * kQRows;
  const bool bf16 = a.x_dtype == DCGQ_DTYPE_BFLOAT16;
  const int rank = int(a.rank);
  const int dpitch = rp * 2 + 16;
  const int nchunks = int((a.k + kQChunk - 1) / kQChunk);
  const uint16_t* x = static_cast<const uint16_t*>(a.x);
  const uint16_t* down = static_cast<const uint16_t*>(a.lora_down);
  uint8_t* xsm = smem;
  uint8_t* dsm = smem + 2 * kQXStage;

  auto load_chunk = [&](int c, int stage) {
    uint8_t* xs = xsm + stage * kQXStage;
    for (int i = tid; i < kQRows * 16; i += kQThreads) {
      const int row = i >> 4, ch = i & 15;
      const int64_t gm = m0 + row, gk = int64_t(c) * kQChunk + ch * 8;
      const bool ok = gm < a.m && gk < a.k;
      cp_async16(xs + row * kQXPitch + ch * 16, ok ? x + gm * a.ldx + gk : x, ok ? 16 : 0);
    }
    if (rank > 0) {
      uint8_t* ds = dsm + stage * kQChunk * dpitch;
      if (down_vec) {  // rank % 8 == 0, 16-byte rows: vector copies
        const int per_row = rp / 8;
        for (int i = tid; i < kQChunk * per_row; i += kQThreads) {
          const int row = i / per_row, ch = i - row * per_row;
          const int64_t gk = int64_t(c) * kQChunk + row;
          const bool ok = gk < a.k && ch * 8 < rank;
          cp_async16(ds + row * dpitch + ch * 16, ok ? down + gk * a.ld_lora_down + ch * 8 : down,
                     ok ? 16 : 0);
        }
      } else {  // any rank / stride: element copies, zero beyond rank and K
        for (int i = tid; i < kQChunk * rp; i += kQThreads) {
          const int row = i / rp, col = i - row * rp;
          const int64_t gk = int64_t(c) * kQChunk + row;
          const uint16_t v = (gk < a.k && col < rank) ? __ldg(down + gk * a.ld_lora_down + col) : 0;
          *reinterpret_cast<uint16_t*>(ds + row * dpitch + col * 2) = v;
        }
      }
    }
  };

  float acc[8][4];
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[j][c] = 0.0f;
  const int mt = warp & 1, nt0 = (warp >> 1) * 8, ntiles = rp / 8;

  load_chunk(0, 0);
  cp_async_commit();
  for (int c = 0; c < nchunks; ++c) {
    if (c + 1 < nchunks) load_chunk(c + 1, (c + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const uint8_t* xs = xsm + (c & 1) * kQXStage;

    // ---- quantize: 32 rows x 16 vectors of 8 elements, 4 per thread -------------------------
#pragma unroll 1
    for (int u = tid; u < kQRows * 16; u += kQThreads) {
      const int row = u >> 4, ch = u & 15;
      const int64_t gm = m0 + row, gk = int64_t(c) * kQChunk + ch * 8;
      const bool valid = gm < a.m && gk < a.k;  // the same for all lanes of a group
      const uint4 raw = *reinterpret_cast<const uint4*>(xs + row * kQXPitch + ch * 16);
      const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
      float v[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        v[2 * i] = half_bits_to_f32(uint16_t(w[i] & 0xffffu), bf16);
        v[2 * i + 1] = half_bits_to_f32(uint16_t(w[i] >> 16), bf16);
      }
      if constexpr (kUnsigned) {  // the unshifted x stays in shared memory for lora_act
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = qmath::add_rn(v[i], qmath::kUnsignedActShift);
      }
      if (a.smooth != nullptr && valid) {
        const uint4 sraw =
            __ldg(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(a.smooth) + gk));
        const uint32_t s[4] = {sraw.x, sraw.y, sraw.z, sraw.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          v[2 * i] = qmath::div_rn(v[2 * i], half_bits_to_f32(uint16_t(s[i] & 0xffffu), bf16));
          v[2 * i + 1] = qmath::div_rn(v[2 * i + 1], half_bits_to_f32(uint16_t(s[i] >> 16), bf16));
        }
      }
      float amax = 0.0f;
#pragma unroll
      for (int i = 0; i < 8; ++i) amax = qmath::amax_update(amax, v[i]);
#pragma unroll
      for (int o = 1; o < kLanesPerGroup; o <<= 1) {
        amax = nan_max(amax, __shfl_xor_sync(0xffffffffu, amax, o));
      }
      float divisor;
      uint32_t scale_bits;
      if constexpr (kNvfp4) {
        scale_bits = qmath::nvfp4_act_scale(amax, &divisor);
      } else {
        scale_bits = qmath::int4_scale(amax, kUnsigned ? 15.0f : 7.0f, bf16, &divisor);
      }
      uint32_t packed = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        uint32_t nib;
        if constexpr (kNvfp4) {
          nib = qmath::nvfp4_nibble(v[i], divisor);
        } else if constexpr (kUnsigned) {
          nib = qmath::uint4_nibble(v[i], divisor);
        } else {
          nib = qmath::int4_nibble(v[i], divisor);
        }
        packed |= nib << (4 * i);
      }
      const int s = ch % kLanesPerGroup;  // position of this lane's 8 elements in the group
      uint8_t* qrow = static_cast<uint8_t*>(a.q) + gm * a.ldq;
      if (a.layout == DCGQ_LAYOUT_CANONICAL) {
        if (valid) *reinterpret_cast<uint32_t*>(qrow + gk / 2) = packed;
      } else {
        // split_halves: byte j of the group holds elements j (low) and j + G/2 (high); the lane
        // holding the first half of the group pairs with the lane G/16 further on.
        const uint32_t partner = __shfl_xor_sync(0xffffffffu, packed, kLanesPerGroup / 2);
        if (valid && s < kLanesPerGroup / 2) {
          uint32_t lo = 0, hi = 0;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            lo |= (((packed >> (4 * j)) & 0xfu) | (((partner >> (4 * j)) & 0xfu) << 4)) << (8 * j);
            hi |= (((packed >> (4 * j + 16)) & 0xfu) | (((partner >> (4 * j + 16)) & 0xfu) << 4))
                  << (8 * j);
          }
          const int64_t byte = (gk - 8 * s) / 2 + 8 * s;
          *reinterpret_cast<uint2*>(qrow + byte) = make_uint2(lo, hi);
        }
      }
      if (valid && s == 0) {
        const int64_t grp = gk / G;
        if constexpr (kNvfp4) {
          static_cast<uint8_t*>(a.scales)[gm * a.ld_scales + grp] = uint8_t(scale_bits);
        } else {
          static_cast<uint16_t*>(a.scales)[gm * a.ld_scales + grp] = uint16_t(scale_bits);
        }
      }
    }

    // ---- low-rank projection on the unsmoothed chunk ------------------------------------------
    if (rank > 0) {
      const uint8_t* ds = dsm + (c & 1) * kQChunk * dpitch;
#pragma unroll
      for (int ks = 0; ks < kQChunk / 16; ++ks) {
        uint32_t af[4];
        ldmatrix_x4(af, xs + (16 * mt + (lane & 15)) * kQXPitch + (2 * ks + (lane >> 4)) * 16);
#pragma unroll
        for (int jp = 0; jp < 4; ++jp) {
          const int j = nt0 + 2 * jp;
          if (j < ntiles) {  // uniform per warp; ntiles is even (rp is a multiple of 16)
            uint32_t bf[4];
            const int krow = 16 * ks + (lane & 7) + ((lane >> 3) & 1) * 8;
            ldmatrix_x4_trans(bf, ds + krow * dpitch + (j + (lane >> 4)) * 16);
            mma_16816(acc[2 * jp], af, bf[0], bf[1], bf16);
            mma_16816(acc[2 * jp + 1], af, bf[2], bf[3], bf16);
          }
        }
      }
    }
    __syncthreads();  // the stage is refilled by the next iteration's copies
  }

  if (rank > 0) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int jj = 0; jj < 8; ++jj) {
      const int col = (nt0 + jj) * 8 + 2 * t;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t gm = m0 + 16 * mt + g + 8 * h;
        if (gm >= a.m) continue;
        float* out = a.lora_act + gm * a.ld_lora_act;
        if (col < rank) out[col] = acc[jj][2 * h];
        if (col + 1 < rank) out[col + 1] = acc[jj][2 * h + 1];
      }
    }
  }
}

template <bool kNvfp4, bool kUnsigned>
dcgq_status launch_quantize_act_fmt(const dcgq_quantize_act_args& a, cudaStream_t stream) {
  const int rp = a.rank > 0 ? int((a.rank + 15) / 16 * 16) : 0;
  const bool down_vec = a.rank > 0 && a.rank % 8 == 0 && a.ld_lora_down % 8 == 0 &&
                        reinterpret_cast<uintptr_t>(a.lora_down) % 16 == 0;
  const size_t smem = 2 * size_t(kQXStage) + (rp > 0 ? 2 * size_t(kQChunk) * (rp * 2 + 16) : 0);
  auto kernel = quantize_act_kernel<kNvfp4, kUnsigned>;
  if (smem > 48 * 1024) {
    DCGQ_RETURN_IF_ERROR(cuda_status(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
        "quantize_act: cudaFuncSetAttribute(MaxDynamicSharedMemorySize)"));
  }
  const unsigned grid = unsigned((a.m + kQRows - 1) / kQRows);
  kernel<<<grid, kQThreads, smem, stream>>>(a, rp, down_vec);
  return cuda_status(cudaGetLastError(), "quantize_act kernel launch");
}

dcgq_status launch_quantize_act(const dcgq_quantize_act_args& a, cudaStream_t stream) {
  if (a.fmt == DCGQ_FORMAT_NVFP4) return launch_quantize_act_fmt<true, false>(a, stream);
  return a.act_unsigned ? launch_quantize_act_fmt<false, true>(a, stream)
                        : launch_quantize_act_fmt<false, false>(a, stream);
}

}  // namespace
}  // namespace dcgq
