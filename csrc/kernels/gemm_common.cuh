// Pieces shared by the W4A4 GEMM kernels (mma.sync and wgmma): the packed-tile loader and the
// epilogue.
//
// Epilogue: scale, low-rank branch,
// bias, cast and store, on float32 accumulators in the m16n8 C-fragment layout
// (acc[i][j][0..1] at row 16i + g, columns 8j + 2t, 8j + 2t + 1; acc[i][j][2..3] at row + 8).
// wgmma's accumulator fragments have the same layout per warp and 8-column slice.
//
// Low-rank branch on tensor cores: y += lora_act @ proj_up^T with mma.sync m16n8k16 bf16 and
// fp32 accumulation into the GEMM accumulators. lora_act is float32, so it is split into bf16
// terms hi + mid (+ lo for float32 outputs); proj_up in bf16 is exact, in fp16 it splits exactly
// into hi + lo (11 significant bits = 8 + 3). Every product of bf16 terms is exact in fp32; the
// dropped cross terms are below 2^-16 relative (16-bit outputs, which round at 2^-9) or 2^-24
// (float32 outputs).
#pragma once

#include "common.cuh"

namespace dcgq {
namespace {

constexpr int kPackedTileRows = 128;  // rows of a packed operand tile (BM = BN = 128)
constexpr int kPackedRowBytes = 64;   // packed bytes per row per stage (128 codes)
constexpr int kPackedPitch = 80;      // shared row pitch: 5 x 16 bytes, ldmatrix conflict-free

// Copy rows [r0, r0 + 128) x bytes [byte0, byte0 + 64) of a packed matrix into a shared tile
// (pitch 80), zero-filling rows >= rows and bytes >= row_bytes; 256 threads, cp.async (the
// caller commits). vec16: 16-byte copies (16-byte aligned base and row stride), else 8-byte.
__device__ __forceinline__ void load_packed_tile(uint8_t* tile, const uint8_t* src, int64_t ld,
                                                 int64_t r0, int64_t rows, int64_t byte0,
                                                 int64_t row_bytes, bool vec16) {
  for (int i = threadIdx.x; i < kPackedTileRows * 4; i += 256) {
    const int row = i >> 2, ch = i & 3;
    const int64_t gr = r0 + row, gb = byte0 + ch * 16;
    int64_t avail = gr < rows ? row_bytes - gb : 0;
    avail = avail < 0 ? 0 : (avail > 16 ? 16 : avail);  // 0, 8 or 16 (row_bytes % 8 == 0)
    const uint8_t* p = avail > 0 ? src + gr * ld + gb : src;
    uint8_t* d = tile + row * kPackedPitch + ch * 16;
    if (vec16) {
      dev::cp_async16(d, p, int(avail));
    } else {
      dev::cp_async8(d, p, avail >= 8 ? 8 : 0);
      dev::cp_async8(d + 8, avail >= 16 ? p + 8 : src, avail >= 16 ? 8 : 0);
    }
  }
}

// v = hi + mid + lo with bf16 parts (each the bf16 rounding of what is left; the float32
// residuals are exact): |v - hi - mid| <= 2^-17 |v|, |v - hi - mid - lo| <= 2^-25 |v|.
__device__ __forceinline__ void split_bf16x3(float v0, float v1, uint32_t* hi, uint32_t* mid,
                                             uint32_t* lo) {
  const float h0 = __bfloat162float(__float2bfloat16_rn(v0));
  const float h1 = __bfloat162float(__float2bfloat16_rn(v1));
  const float m0 = __bfloat162float(__float2bfloat16_rn(v0 - h0));
  const float m1 = __bfloat162float(__float2bfloat16_rn(v1 - h1));
  *hi = dev::pack_bf16x2(h0, h1);
  *mid = dev::pack_bf16x2(m0, m1);
  *lo = dev::pack_bf16x2(v0 - h0 - m0, v1 - h1 - m1);
}

__device__ __forceinline__ void store_out(void* out, int64_t idx, float v, dcgq_dtype dt) {
  if (dt == DCGQ_DTYPE_FLOAT32) {
    static_cast<float*>(out)[idx] = v;
  } else if (dt == DCGQ_DTYPE_BFLOAT16) {
    static_cast<__nv_bfloat16*>(out)[idx] = __float2bfloat16_rn(v);
  } else {
    static_cast<__half*>(out)[idx] = __float2half_rn(v);
  }
}

__device__ __forceinline__ void store_out2(void* out, int64_t idx, float v0, float v1,
                                           dcgq_dtype dt) {
  if (dt == DCGQ_DTYPE_FLOAT32) {
    *reinterpret_cast<float2*>(static_cast<float*>(out) + idx) = make_float2(v0, v1);
  } else if (dt == DCGQ_DTYPE_BFLOAT16) {
    *reinterpret_cast<uint32_t*>(static_cast<__nv_bfloat16*>(out) + idx) = dev::pack_bf16x2(v0, v1);
  } else {
    *reinterpret_cast<uint32_t*>(static_cast<__half*>(out) + idx) = dev::pack_f16x2(v0, v1);
  }
}

// row0 / col0: the first output row / column of this warp's fragments.
template <int MT, int NT>
__device__ __forceinline__ void w4a4_epilogue(float (&acc)[MT][NT][4], int64_t row0, int64_t col0,
                                              float scale, const dcgq_gemm_w4a4_args& a) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  if (a.wtscale != nullptr) scale *= __ldg(a.wtscale);
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] *= scale;

  const int rank = int(a.rank);
  if (rank > 0) {
    const bool p_bf16 = a.io_dtype == DCGQ_DTYPE_BFLOAT16;
    // float32 outputs get a third bf16 term of lora_act (24 bits in all, float32 accuracy);
    // 16-bit outputs round far above the two-term error (2^-17)
    const bool precise = a.out_dtype == DCGQ_DTYPE_FLOAT32;
    const float* la = a.lora_act;
#pragma unroll 1
    for (int r0 = 0; r0 < rank; r0 += 16) {
      uint32_t ahi[MT][4], amid[MT][4], alo[MT][4];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
#pragma unroll
        for (int q = 0; q < 4;
             ++q) {  // a0: (g, k), a1: (g + 8, k), a2: (g, k + 8), a3: (g + 8, k + 8)
          const int64_t row = row0 + 16 * i + g + 8 * (q & 1);
          const int col = r0 + 2 * t + 8 * (q >> 1);
          const bool rok = row < a.m;
          const float v0 = (rok && col < rank) ? __ldg(la + row * a.ld_lora_act + col) : 0.0f;
          const float v1 =
              (rok && col + 1 < rank) ? __ldg(la + row * a.ld_lora_act + col + 1) : 0.0f;
          split_bf16x3(v0, v1, &ahi[i][q], &amid[i][q], &alo[i][q]);
        }
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int64_t n = col0 + 8 * j + g;
        uint32_t bhi[2], blo[2], unused[2];
#pragma unroll
        for (int q = 0; q < 2; ++q) {  // b0: k 2t, 2t + 1; b1: k 2t + 8, 2t + 9 (column n)
          const int col = r0 + 2 * t + 8 * q;
          const bool nok = n < a.n;
          const float p0 = (nok && col < rank)
                               ? dev::load_half(a.proj_up, n * a.ld_proj_up + col, p_bf16)
                               : 0.0f;
          const float p1 = (nok && col + 1 < rank)
                               ? dev::load_half(a.proj_up, n * a.ld_proj_up + col + 1, p_bf16)
                               : 0.0f;
          split_bf16x3(p0, p1, &bhi[q], &blo[q], &unused[q]);  // exact: 11 bits = 8 + 3
        }
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          dev::mma_16816(acc[i][j], ahi[i], bhi[0], bhi[1], true);
          dev::mma_16816(acc[i][j], amid[i], bhi[0], bhi[1], true);
          if (!p_bf16) dev::mma_16816(acc[i][j], ahi[i], blo[0], blo[1], true);
          if (precise) {
            dev::mma_16816(acc[i][j], alo[i], bhi[0], bhi[1], true);
            if (!p_bf16) dev::mma_16816(acc[i][j], amid[i], blo[0], blo[1], true);
          }
        }
      }
    }
  }

  const dcgq_dtype dt = a.out_dtype;
  const int esize = dt == DCGQ_DTYPE_FLOAT32 ? 4 : 2;
  const bool pairs = a.ldo % 2 == 0 && reinterpret_cast<uintptr_t>(a.out) % (2 * esize) == 0;
  const bool b_bf16 = a.io_dtype == DCGQ_DTYPE_BFLOAT16;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int64_t col = col0 + 8 * j + 2 * t;
    float b0 = 0.0f, b1 = 0.0f;
    if (a.bias != nullptr) {
      if (col < a.n) b0 = dev::load_half(a.bias, col, b_bf16);
      if (col + 1 < a.n) b1 = dev::load_half(a.bias, col + 1, b_bf16);
    }
#pragma unroll
    for (int i = 0; i < MT; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = row0 + 16 * i + g + 8 * h;
        if (row >= a.m) continue;
        const float v0 = acc[i][j][2 * h] + b0, v1 = acc[i][j][2 * h + 1] + b1;
        const int64_t idx = row * a.ldo + col;
        if (pairs && col + 1 < a.n) {
          store_out2(a.out, idx, v0, v1, dt);
        } else {
          if (col < a.n) store_out(a.out, idx, v0, dt);
          if (col + 1 < a.n) store_out(a.out, idx + 1, v1, dt);
        }
      }
    }
  }
}

}  // namespace
}  // namespace dcgq
