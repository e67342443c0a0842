// Device helpers shared by the kernel templates: async copies, ldmatrix, the MMA instructions
// (each wrapper names the PTX it emits), and 16-bit conversions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "../src/internal.h"
#include "quant_math.h"

namespace dcgq {
namespace dev {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// cp.async with zero fill: copies `src_bytes` (0 or the full size) and zeroes the rest, so
// out-of-range tiles read as zeros without a branch around the copy.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async8(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ldmatrix: four 8x8 tiles of 16-bit elements; lanes 8i..8i+7 give the row addresses of tile i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

// ---- MMA (warp-level, D = A * B + C) ----------------------------------------------------------
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k*"), g = lane / 4, t = lane % 4:
// C/D (m16n8): c0, c1 at row g, columns 2t, 2t+1; c2, c3 at row g + 8.
// A m16n8k64 4-bit: a0 row g, k 8t..8t+7 (element i in nibble i); a1 row g+8; a2, a3 the same
//   rows at k + 32. B k64 4-bit: b0 column g, k 8t..8t+7; b1 k + 32.
// A m16n8k32 8-bit: a0 row g, k 4t..4t+3; a1 row g+8; a2, a3 at k + 16. B: b0 k 4t..4t+3, b1 +16.
// A m16n8k16 16-bit: a0 row g, k 2t, 2t+1; a1 row g+8; a2, a3 at k + 8. B: b0 k 2t, 2t+1; b1 +8.

// One integer mma.sync m16n8 (4 A, 2 B and 4 C/D 32-bit registers); SHAPE_TYPES, a string
// literal, names its shape and operand types after "mma.sync.aligned.".
#define DCGQ_MMA_I32(SHAPE_TYPES, d, a0, a1, a2, a3, b0, b1, c)                              \
  asm volatile("mma.sync.aligned." SHAPE_TYPES                                               \
               " {%0, %1, %2, %3}, {%4, %5, %6, %7}, "                                       \
               "{%8, %9}, {%10, %11, %12, %13};\n"                                           \
               : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])                              \
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "r"(c[0]), "r"(c[1]), \
                 "r"(c[2]), "r"(c[3]))

// mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 (IMMA.16864.S4.S4 on sm_80..89); with
// kUnsignedA the A operand (activations) is unsigned: .u4.s4 (IMMA.16864.U4.S4).
template <bool kUnsignedA>
__device__ __forceinline__ void mma_s4(int (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                       uint32_t b1, const int (&c)[4]) {
  if constexpr (kUnsignedA) {
    DCGQ_MMA_I32("m16n8k64.row.col.s32.u4.s4.s32", d, a[0], a[1], a[2], a[3], b0, b1, c);
  } else {
    DCGQ_MMA_I32("m16n8k64.row.col.s32.s4.s4.s32", d, a[0], a[1], a[2], a[3], b0, b1, c);
  }
}

// mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 (IMMA.16832.S8.S8); with kUnsignedA the A
// operand is unsigned: .u8.s8 (IMMA.16832.U8.S8).
template <bool kUnsignedA>
__device__ __forceinline__ void mma_s8(int (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                       uint32_t a3, uint32_t b0, uint32_t b1, const int (&c)[4]) {
  if constexpr (kUnsignedA) {
    DCGQ_MMA_I32("m16n8k32.row.col.s32.u8.s8.s32", d, a0, a1, a2, a3, b0, b1, c);
  } else {
    DCGQ_MMA_I32("m16n8k32.row.col.s32.s8.s8.s32", d, a0, a1, a2, a3, b0, b1, c);
  }
}
#undef DCGQ_MMA_I32

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 (HMMA.16816.F32[.BF16])
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1, bool bf16) {
  if (bf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// mma.sync.aligned.m16n8k64.row.col.kind::mxf4nvf4.block_scale.scale_vec::4X.f32.e2m1.e2m1.f32
// .ue4m3 (OMMA.SF.16864 on sm_120a). A and B use the 4-bit m16n8k64 fragments above. Scales:
// one 32-bit register per lane holds the four ue4m3 block scales (byte b: k 16b..16b+15) of one
// row of A or one column of B. A: lane 4r + 2*TA holds row r, lane 4r + 2*TA + 1 row r + 8, so
// one register serves two m16 tiles (TA = 0, 1). B: lane 4n + TB holds column n, so one register
// serves four n8 tiles (TB = 0..3).
template <int TA, int TB>
__device__ __forceinline__ void mma_fp4(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                        uint32_t b1, uint32_t sfa, uint32_t sfb) {
#if defined(__CUDA_ARCH_FEAT_SM120_ALL) || defined(__CUDA_ARCH_FEAT_SM121_ALL)
  asm volatile(
      "mma.sync.aligned.m16n8k64.row.col.kind::mxf4nvf4.block_scale.scale_vec::4X.f32.e2m1.e2m1"
      ".f32.ue4m3 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3}, {%10}, "
      "{%11, %12}, {%13}, {%14, %15};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(sfa), "n"(0), "n"(TA),
        "r"(sfb), "n"(0), "n"(TB));
#else
  __trap();  // only instantiated in sm_120a translation units
#endif
}

// ---- int4 -> int8 in registers ----------------------------------------------------------------
// From a 32-bit word holding 8 nibbles (element i in nibble i) make two words of 4 int8 values,
// each value 16 * the signed 4-bit code (the nibble in the high half of its byte, low half 0):
// even elements (0, 2, 4, 6) and odd elements (1, 3, 5, 7). An 8-bit MMA on such operands gives
// 256 * the 4-bit dot product, exactly; the kernels divide by 256 at the end. Two LOPs and a
// shift, no sign extension. The same bytes read as u8 are 16 * the unsigned code (0..240), so
// unsigned activations widen identically and only the MMA's A type changes (.u8).
__device__ __forceinline__ uint32_t int4_even_x16(uint32_t w) { return (w << 4) & 0xf0f0f0f0u; }
__device__ __forceinline__ uint32_t int4_odd_x16(uint32_t w) { return w & 0xf0f0f0f0u; }

// ---- 16-bit values ----------------------------------------------------------------------------

__device__ __forceinline__ float half_bits_to_f32(uint16_t h, bool bf16) {
  return bf16 ? __uint_as_float(uint32_t(h) << 16)
              : __half2float(__ushort_as_half(static_cast<unsigned short>(h)));
}

__device__ __forceinline__ float load_half(const void* base, int64_t idx, bool bf16) {
  const uint16_t h = __ldg(static_cast<const unsigned short*>(base) + idx);
  return half_bits_to_f32(h, bf16);
}

// Round to nearest even into bf16 (2 values packed low/high).
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
__device__ __forceinline__ uint32_t pack_f16x2(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

}  // namespace dev
}  // namespace dcgq
