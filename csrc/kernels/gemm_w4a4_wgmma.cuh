// INT4 W4A4 GEMM for Hopper (sm_90a) on the INT8 tensor cores with wgmma (SASS IGMMA).
//
// Hopper has no 4-bit MMA, so both operands are widened to int8 in shared memory and fed to
// wgmma.mma_async m64n128k32 s32.s8.s8, per group of 64 into an integer accumulator that is
// rescaled into float32 (acc += dot * sa * sw), as in gemm_w4a4_mma.cuh.
//
// CTA 128 x 128, two consumer warpgroups (WG w: rows 64w..64w+63, all 128 columns), K by stages
// of 128 codes (two groups):
//   packed stage (cp.async, 3 slots, issued 3 stages ahead)  --unpack-->  int8 stage (2 buffers)
// The unpack reads 16 packed bytes (32 codes) and writes two 16-byte chunks of int8 values
// 16 * code: the even codes of each 8-code word to k 4t..4t+3 and the odd ones to k 16+4t..,
// the same permutation of k for A and B, so every group's dot product is unchanged; wgmma then
// sums 256 * dot exactly and the epilogue divides by 256.
// int8 tiles use the canonical K-major 128-byte-swizzle layout of wgmma: row r (an M or N index)
// at r * 128, its 16-byte chunk c stored at chunk c ^ (r % 8), 8-row atoms 1024 bytes apart
// (descriptor SBO = 1024, LBO unused); a k32 step advances the descriptor start by 32 bytes.
//
// Per stage s, after one CTA barrier: issue group 2s into D0; refill a packed slot and unpack
// stage s+1 into the other int8 buffer while it runs; issue group 2s+1 into D1; wait for D0 and
// rescale it while D1 runs; wait for D1 and rescale it. (Rescaling D1 under the next stage's D0
// would overlap more, but ptxas then inserts a wait, warning C7517, for the loop-carried D1.)
// The rescale (an integer add and two FMAs per element and group) costs about as many issue
// slots as the MMA takes cycles, so this kernel is bounded by the ALUs, not the tensor cores.
//
// Unsigned activations (kUnsigned, act_unsigned = 1: codes 0..15 in q): the widening is the
// same bit operation, whose bytes read as u8 are 16 * code = 0..240, and the MMA becomes
// wgmma ... s32.u8.s8 (A unsigned, B signed). The rescale's magic-number conversion needs
// |256 * dot| < 2^22 per group of 64: signed |256 dot| <= 64 * 128 * 128 = 2^20, unsigned
// |256 dot| <= 64 * 240 * 128 = 1966080 < 2^21.
#pragma once

#include "gemm_common.cuh"

namespace dcgq {
namespace {

constexpr int kHThreads = 256;
constexpr int kHBM = 128, kHBN = 128;
constexpr int kHRowBytes = kPackedRowBytes;
constexpr int kHPitch = kPackedPitch;
constexpr int kHPackedSlot = 2 * kHBM * kHPitch;  // A + B packed tiles
constexpr int kHSlots = 3;
constexpr int kHInt8Tile = kHBM * 128;         // 128 rows x 128 int8 (swizzled)
constexpr int kHInt8Buf = 2 * kHInt8Tile;      // A + B
constexpr int kHScaleFloats = 4 * 128;         // sa[2][128], sw[2][128] per stage
constexpr int kHScaleBuf = kHScaleFloats * 4;  // bytes
constexpr int kHSmem =
    1024 /*alignment slack*/ + 2 * kHInt8Buf + kHSlots * kHPackedSlot + 2 * kHScaleBuf;
constexpr int kHMagicBits = 0x4B400000;
constexpr float kHMagic = 12582912.0f;

__device__ __forceinline__ uint64_t wgmma_desc_sw128(uint32_t smem_addr) {
  uint64_t d = uint64_t((smem_addr & 0x3ffffu) >> 4);  // start address, 16-byte units
  d |= uint64_t(1) << 16;                              // LBO: unused for swizzled K-major
  d |= uint64_t(1024 >> 4) << 32;                      // SBO: 8-row atoms 1024 bytes apart
  d |= uint64_t(1) << 62;                              // 128-byte swizzle
  return d;
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Keeps the compiler from moving reads of the accumulators above a wgmma wait.
__device__ __forceinline__ void fence_operands(int (&d)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+r"(d[i])::"memory");
}

#define DCGQ_D8(i)                                                                            \
  "+r"(d[i]), "+r"(d[i + 1]), "+r"(d[i + 2]), "+r"(d[i + 3]), "+r"(d[i + 4]), "+r"(d[i + 5]), \
      "+r"(d[i + 6]), "+r"(d[i + 7])

// The operand list of an m64n128 wgmma with a predicate p (set from %66): 64 accumulator
// registers, the two descriptors.
#define DCGQ_WGMMA_N128_OPERANDS                                                               \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "     \
  "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, " \
  "%37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, " \
  "%55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p;\n"
#define DCGQ_WGMMA_N128_OUTPUTS                                                            \
  DCGQ_D8(0), DCGQ_D8(8), DCGQ_D8(16), DCGQ_D8(24), DCGQ_D8(32), DCGQ_D8(40), DCGQ_D8(48), \
      DCGQ_D8(56)

// wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 (kUnsignedA: .s32.u8.s8, A unsigned):
// d (+)= A(desc) * B(desc).
template <bool kUnsignedA>
__device__ __forceinline__ void wgmma_8bit_m64n128k32(int (&d)[64], uint64_t da, uint64_t db,
                                                      int accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  if constexpr (kUnsignedA) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.s32.u8.s8 " DCGQ_WGMMA_N128_OPERANDS "}\n"
        : DCGQ_WGMMA_N128_OUTPUTS
        : "l"(da), "l"(db), "r"(accumulate));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 " DCGQ_WGMMA_N128_OPERANDS "}\n"
        : DCGQ_WGMMA_N128_OUTPUTS
        : "l"(da), "l"(db), "r"(accumulate));
  }
#else
  __trap();  // only instantiated in sm_90a translation units
#endif
}
#undef DCGQ_WGMMA_N128_OUTPUTS
#undef DCGQ_WGMMA_N128_OPERANDS
#undef DCGQ_D8

// Unpack one packed stage (A and B: 128 rows x 64 bytes each) into int8 swizzled tiles.
__device__ __forceinline__ void unpack_stage(const uint8_t* packed, uint8_t* int8buf) {
#pragma unroll
  for (int it = 0; it < 4; ++it) {
    const int u = threadIdx.x + it * kHThreads;  // 0..1023
    const int op = u >> 9, row = u & 127, kb = (u >> 7) & 3;
    const uint4 w =
        *reinterpret_cast<const uint4*>(packed + op * kHBM * kHPitch + row * kHPitch + kb * 16);
    const uint4 ev = make_uint4(dev::int4_even_x16(w.x), dev::int4_even_x16(w.y),
                                dev::int4_even_x16(w.z), dev::int4_even_x16(w.w));
    const uint4 od = make_uint4(dev::int4_odd_x16(w.x), dev::int4_odd_x16(w.y),
                                dev::int4_odd_x16(w.z), dev::int4_odd_x16(w.w));
    uint8_t* dst = int8buf + op * kHInt8Tile + row * 128;
    *reinterpret_cast<uint4*>(dst + (((2 * kb) ^ (row & 7)) << 4)) = ev;
    *reinterpret_cast<uint4*>(dst + (((2 * kb + 1) ^ (row & 7)) << 4)) = od;
  }
}

template <bool kUnsigned>
__global__ void __launch_bounds__(kHThreads, 1)
    gemm_w4a4_wgmma_kernel(const dcgq_gemm_w4a4_args a, bool vec16) {
  using namespace dev;
  extern __shared__ __align__(16) uint8_t smem_raw[];
  uint8_t* smem =
      reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint8_t* int8buf = smem;                 // 2 x (A, B), 1024-aligned
  uint8_t* packed = smem + 2 * kHInt8Buf;  // 3 slots x (A, B)
  float* scalebuf = reinterpret_cast<float*>(packed + kHSlots * kHPackedSlot);  // 2 buffers

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2, w4 = warp & 3, g = lane >> 2, t = lane & 3;
  const int64_t m0 = int64_t(blockIdx.x) * kHBM, n0 = int64_t(blockIdx.y) * kHBN;
  const int64_t kbytes = a.k / 2;
  const int stages = int((kbytes + kHRowBytes - 1) / kHRowBytes);
  const int ngroups = int(a.k / 64);
  const uint8_t* qa = static_cast<const uint8_t*>(a.q);
  const uint8_t* qw = static_cast<const uint8_t*>(a.qweight);
  const bool s_bf16 = a.scale_dtype == DCGQ_DTYPE_BFLOAT16;

  auto load_packed = [&](int s) {  // always commits a group (possibly empty)
    if (s < stages) {
      uint8_t* slot = packed + (s % kHSlots) * kHPackedSlot;
      load_packed_tile(slot, qa, a.ldq, m0, a.m, int64_t(s) * kHRowBytes, kbytes, vec16);
      load_packed_tile(slot + kHBM * kHPitch, qw, a.ldqw, n0, a.n, int64_t(s) * kHRowBytes, kbytes,
                       vec16);
    }
    cp_async_commit();
  };
  // Scales of stage s as floats: sa[h][row] at [h * 128 + row], sw[h][col] at [256 + h * 128
  // + col] (h: group 2s + h). One value per thread and half.
  auto load_scales = [&](int s, float* buf) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int grp = 2 * s + h;
      const int64_t row = m0 + (tid & 127), col = n0 + (tid & 127);
      if (tid < 128) {
        buf[h * 128 + tid] = (grp < ngroups && row < a.m)
                                 ? load_half(a.scales, row * a.ld_scales + grp, s_bf16)
                                 : 0.0f;
      } else {
        buf[256 + h * 128 + (tid - 128)] =
            (grp < ngroups && col < a.n) ? load_half(a.wscales, grp * a.ld_wscales + col, s_bf16)
                                         : 0.0f;
      }
    }
  };

  int d0[64], d1[64];  // every group starts with scale-d = 0; zeroed so no read is undefined
#pragma unroll
  for (int i = 0; i < 64; ++i) d0[i] = d1[i] = 0;
  float acc[1][16][4];
#pragma unroll
  for (int j = 0; j < 16; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[0][j][c] = 0.0f;

  // acc += dot * sa * sw for one group; d holds 256 * dot.
  auto rescale = [&](int (&d)[64], const float* sbuf, int h) {
    const float sa0 = sbuf[h * 128 + 64 * wg + 16 * w4 + g];
    const float sa1 = sbuf[h * 128 + 64 * wg + 16 * w4 + g + 8];
    const float n0a = -kHMagic * sa0, n1a = -kHMagic * sa1;
    const bool fast = __all_sync(
        0xffffffffu, fabsf(n0a) <= 3.4028234663852886e38f && fabsf(n1a) <= 3.4028234663852886e38f);
    const float* swp = sbuf + 256 + h * 128;
    if (fast) {  // warp-uniform
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        const float2 sw = *reinterpret_cast<const float2*>(swp + 8 * j + 2 * t);
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const float u = fmaf(__int_as_float(d[4 * j + c] + kHMagicBits), c < 2 ? sa0 : sa1,
                               c < 2 ? n0a : n1a);
          acc[0][j][c] = fmaf(u, (c & 1) ? sw.y : sw.x, acc[0][j][c]);
        }
      }
    } else {  // scales >= 2^103, inf or NaN
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        const float2 sw = *reinterpret_cast<const float2*>(swp + 8 * j + 2 * t);
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const float u = float(d[4 * j + c]) * (c < 2 ? sa0 : sa1);
          acc[0][j][c] = fmaf(u, (c & 1) ? sw.y : sw.x, acc[0][j][c]);
        }
      }
    }
  };

  // ---- prologue: packed stages 0..2 in flight, stage 0 unpacked into buffer 0
  load_packed(0);
  load_packed(1);
  load_packed(2);
  load_scales(0, scalebuf);
  cp_async_wait<2>();
  __syncthreads();
  unpack_stage(packed, int8buf);
  fence_proxy_async();

#pragma unroll 1
  for (int s = 0; s < stages; ++s) {
    const int buf = s & 1;
    cp_async_wait<1>();  // packed stage s + 1 has landed
    // int8 buffer `buf` and the scales of stage s are visible, and both warpgroups have waited
    // for all of stage s - 1's MMAs: buffer buf ^ 1 and the packed slot of stage s are free.
    __syncthreads();
    const uint32_t abase = smem_u32(int8buf + buf * kHInt8Buf) + wg * 64 * 128;
    const uint32_t bbase = smem_u32(int8buf + buf * kHInt8Buf + kHInt8Tile);
    const float* sbuf = scalebuf + buf * kHScaleFloats;

    wgmma_fence();
    wgmma_8bit_m64n128k32<kUnsigned>(d0, wgmma_desc_sw128(abase), wgmma_desc_sw128(bbase), 0);
    wgmma_8bit_m64n128k32<kUnsigned>(d0, wgmma_desc_sw128(abase + 32), wgmma_desc_sw128(bbase + 32),
                                     1);
    wgmma_commit();

    // while group 2s runs: prefetch, and widen stage s + 1 into the other buffer
    load_packed(s + 3);
    if (s + 1 < stages) {
      load_scales(s + 1, scalebuf + (buf ^ 1) * kHScaleFloats);
      unpack_stage(packed + ((s + 1) % kHSlots) * kHPackedSlot, int8buf + (buf ^ 1) * kHInt8Buf);
      fence_proxy_async();
    }

    wgmma_fence();
    wgmma_8bit_m64n128k32<kUnsigned>(d1, wgmma_desc_sw128(abase + 64), wgmma_desc_sw128(bbase + 64),
                                     0);
    wgmma_8bit_m64n128k32<kUnsigned>(d1, wgmma_desc_sw128(abase + 96), wgmma_desc_sw128(bbase + 96),
                                     1);
    wgmma_commit();

    wgmma_wait<1>();  // group 2s done; 2s + 1 runs while it is rescaled
    fence_operands(d0);
    rescale(d0, sbuf, 0);
    wgmma_wait<0>();
    fence_operands(d1);
    if (2 * s + 1 < ngroups) rescale(d1, sbuf, 1);
  }
  cp_async_wait<0>();

  w4a4_epilogue<1, 16>(acc, m0 + 64 * wg + 16 * w4, n0, 1.0f / 256.0f, a);
}

template <bool kUnsigned>
dcgq_status launch_gemm_w4a4_wgmma_typed(const dcgq_gemm_w4a4_args& a, cudaStream_t stream) {
  auto kernel = gemm_w4a4_wgmma_kernel<kUnsigned>;
  DCGQ_RETURN_IF_ERROR(
      cuda_status(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kHSmem),
                  "gemm_w4a4 (wgmma): cudaFuncSetAttribute(MaxDynamicSharedMemorySize)"));
  const bool vec16 = a.ldq % 16 == 0 && a.ldqw % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(a.q) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(a.qweight) % 16 == 0;
  const dim3 grid(unsigned((a.m + kHBM - 1) / kHBM), unsigned((a.n + kHBN - 1) / kHBN));
  if (grid.y > 65535u) {
    return fail(DCGQ_ERROR_UNSUPPORTED, "dcgq_gemm_w4a4: n = %lld exceeds %u output tiles",
                (long long)a.n, 65535u * kHBN);
  }
  kernel<<<grid, kHThreads, kHSmem, stream>>>(a, vec16);
  return cuda_status(cudaGetLastError(), "gemm_w4a4 (wgmma) kernel launch");
}

// The registered launcher: signed or unsigned activations (act_unsigned validated 0 / 1).
dcgq_status launch_gemm_w4a4_wgmma(const dcgq_gemm_w4a4_args& a, cudaStream_t stream) {
  return a.act_unsigned ? launch_gemm_w4a4_wgmma_typed<true>(a, stream)
                        : launch_gemm_w4a4_wgmma_typed<false>(a, stream);
}

}  // namespace
}  // namespace dcgq
