/*
 * dcgen_quant C ABI: 4-bit (INT4 / NVFP4) SVDQuant kernels for CUDA GPUs.
 *
 * Plain C (C99 or later, or C++): raw device pointers, shapes, row strides and a cudaStream_t.
 * Every entry point validates its arguments before touching the GPU and returns a dcgq_status;
 * on failure dcgq_last_error_message() (thread-local) names the argument, its value and what
 * was expected. No entry point aborts, prints or throws.
 *
 * Semantics are those of the pure-torch references in dcgen_quant/ops.py (the ground truth):
 *
 *   quantize_act:  q, scales = quantize(x / smooth) per token and group of G along K
 *                  (act_unsigned: quantize((x + DCGQ_UNSIGNED_ACT_SHIFT) / smooth));
 *                  lora_act = x @ lora_down            (unsmoothed, unshifted x, float32 result)
 *   gemm_w4a4:     y = sum_g sa[m,g] * sw[g,n] * dot_g(a[m], w[n]) * wtscale
 *                      + lora_act @ proj_up^T + bias          (cast to out_dtype)
 *   gemm_w4a16:    y = x @ dequant(W)^T * wtscale + bias      (y in x's dtype)
 *
 * Formats (G = group size along K): INT4, G = 64, signed codes -8..7, 16-bit scales;
 * NVFP4, G = 16, E2M1 codes, FP8 E4M3 block scales, weights also carry one FP32 tensor scale
 * (wtscale, a device pointer to one float). Packed 4-bit tensors hold two codes per byte in the
 * nibble order named by dcgq_layout (canonical: element 2i in the low nibble of byte i).
 *
 * Unsigned INT4 activations (act_unsigned = 1; INT4 only, for layers whose input is a GELU
 * output): quantize_act computes u = (x + DCGQ_UNSIGNED_ACT_SHIFT) / smooth in float32 (the
 * addition first, both correctly rounded), scale = (max |u| / 15) rounded to x_dtype and codes
 * clamp(round_half_even(u / scale), 0, 15) (x below -DCGQ_UNSIGNED_ACT_SHIFT gives code 0);
 * gemm_w4a4 then reads the activation codes as unsigned 0..15 (weights stay signed -8..7). The
 * shift's contribution DCGQ_UNSIGNED_ACT_SHIFT * sum_k w[n, k] is part of gemm_w4a4's result;
 * the layer's bias is expected to hold its negative. act_unsigned = 1 with NVFP4 is rejected
 * with DCGQ_ERROR_INVALID_ARGUMENT.
 *
 * Shapes and strides: every 2-D tensor is row-major with unit stride along its last dimension;
 * its `ld*` field is the row stride in ELEMENTS of that tensor's dtype (bytes for packed uint8
 * tensors). Packed tensors (q, qweight) need 8-byte aligned base pointers and row strides that
 * are multiples of 8 bytes; 16-bit tensors need 16-byte aligned bases and row strides that are
 * multiples of 8 elements when they are read with vector loads (x, noted per field).
 *
 * Architectures (see dcgq_built_architectures()):
 *   sm_80 / sm_86 / sm_89  INT4 W4A4 on the native 4-bit MMA (mma.sync m16n8k64 s4.s4;
 *                          u4.s4 for unsigned activations)
 *   sm_90a                 INT4 W4A4 on INT8 tensor cores (int4 -> int8 in registers, wgmma
 *                          s8.s8 / u8.s8; mma.sync s8.s8 / u8.s8 as the alternative variant)
 *   sm_120a                NVFP4 W4A4 on the block-scaled FP4 MMA (kind::mxf4nvf4), INT4 W4A4
 *                          on mma.sync s8.s8 / u8.s8
 *   all of the above       quantize_act (INT4, NVFP4) and gemm_w4a16 (INT4, NVFP4)
 */
#ifndef DCGEN_QUANT_H_
#define DCGEN_QUANT_H_

#include <cuda_runtime_api.h> /* cudaStream_t */
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define DCGQ_API __declspec(dllexport)
#else
#define DCGQ_API __attribute__((visibility("default")))
#endif

/* Bumped whenever a struct or signature below changes incompatibly.
 * 2: act_unsigned in dcgq_quantize_act_args and dcgq_gemm_w4a4_args. */
#define DCGQ_ABI_VERSION 2

/* Added to x before the smoothing division when act_unsigned = 1 (11/64: exact in every float
 * type, and at least -min GELU = 0.16997, so GELU outputs shift to u >= 0). */
#define DCGQ_UNSIGNED_ACT_SHIFT 0.171875f

typedef enum dcgq_status {
  DCGQ_SUCCESS = 0,
  DCGQ_ERROR_INVALID_ARGUMENT = 1, /* null pointer, bad shape, stride or enum value */
  DCGQ_ERROR_MISALIGNED = 2,       /* pointer or row stride not aligned as documented */
  DCGQ_ERROR_UNSUPPORTED = 3,      /* valid request the library does not implement (e.g. a GPU
                                      architecture or format/rank it has no kernel for) */
  DCGQ_ERROR_NO_DEVICE = 4,        /* no usable CUDA device (driver missing, none visible) */
  DCGQ_ERROR_ARCH_NOT_BUILT = 5,   /* implemented, but this build did not compile the device's
                                      architecture (see DCGEN_QUANT_CUDA_ARCHS) */
  DCGQ_ERROR_CUDA = 6              /* a CUDA runtime call or kernel launch failed */
} dcgq_status;

typedef enum dcgq_dtype {
  DCGQ_DTYPE_FLOAT32 = 0,
  DCGQ_DTYPE_FLOAT16 = 1,
  DCGQ_DTYPE_BFLOAT16 = 2,
  DCGQ_DTYPE_FLOAT8_E4M3 = 3, /* float8_e4m3fn: NVFP4 block scales */
  DCGQ_DTYPE_UINT8 = 4        /* packed 4-bit codes */
} dcgq_dtype;

typedef enum dcgq_format { DCGQ_FORMAT_INT4 = 0, DCGQ_FORMAT_NVFP4 = 1 } dcgq_format;

/* Nibble order of packed tensors (dcgen_quant/formats/layouts.py). */
typedef enum dcgq_layout {
  DCGQ_LAYOUT_CANONICAL = 0,   /* byte i: element 2i (low nibble), 2i+1 (high nibble) */
  DCGQ_LAYOUT_SPLIT_HALVES = 1 /* per group of G: byte j: element j (low), j + G/2 (high) */
} dcgq_layout;

typedef enum dcgq_op {
  DCGQ_OP_QUANTIZE_ACT = 0,
  DCGQ_OP_GEMM_W4A4 = 1,
  DCGQ_OP_GEMM_W4A16 = 2
} dcgq_op;

/* Kernel family for gemm_w4a4 where an architecture has more than one. */
typedef enum dcgq_variant {
  DCGQ_VARIANT_AUTO = 0,     /* the library's choice (wgmma on sm_90a) */
  DCGQ_VARIANT_MMA_SYNC = 1, /* warp-level mma.sync */
  DCGQ_VARIANT_WGMMA = 2     /* warpgroup wgmma (sm_90a only) */
} dcgq_variant;

typedef struct dcgq_quantize_act_args {
  dcgq_format fmt;
  dcgq_layout layout; /* nibble order written to q */
  int64_t m, k;       /* x is [M, K]; K a positive multiple of G; M >= 0 */
  int64_t rank;       /* r, columns of lora_down (0: no low-rank branch); r <= 128 */
  dcgq_dtype x_dtype; /* BFLOAT16 or FLOAT16: x, smooth, lora_down, INT4 scales */
  int act_unsigned;   /* 0: signed codes -8..7; 1 (INT4 only): unsigned codes 0..15 of the
                         shifted x (see "Unsigned INT4 activations" above) */
  const void* x;      /* [M, K] x_dtype; 16-byte aligned, ldx a multiple of 8 */
  int64_t ldx;
  const void* smooth;    /* [K] x_dtype, or NULL (no smoothing) */
  const void* lora_down; /* [K, r] x_dtype; NULL iff rank == 0 */
  int64_t ld_lora_down;
  void* q; /* out: [M, K/2] uint8 */
  int64_t ldq;
  void* scales; /* out: [M, K/G]; x_dtype (INT4) or float8_e4m3fn (NVFP4) */
  int64_t ld_scales;
  float* lora_act; /* out: [M, r] float32; NULL iff rank == 0 */
  int64_t ld_lora_act;
} dcgq_quantize_act_args;

typedef struct dcgq_gemm_w4a4_args {
  dcgq_format fmt;
  dcgq_layout layout; /* nibble order of both q and qweight */
  int act_unsigned;   /* 0: q holds signed codes -8..7; 1 (INT4 only): unsigned codes 0..15 */
  dcgq_variant variant;
  int64_t m, n, k;        /* y is [M, N]; K a positive multiple of G */
  int64_t rank;           /* r (0: no low-rank branch) */
  dcgq_dtype scale_dtype; /* INT4: BFLOAT16 / FLOAT16 (scales and wscales); NVFP4: FLOAT8_E4M3 */
  dcgq_dtype io_dtype;    /* BFLOAT16 / FLOAT16: proj_up and bias */
  dcgq_dtype out_dtype;   /* BFLOAT16 / FLOAT16 / FLOAT32 */
  const void* q;          /* [M, K/2] uint8 activations */
  int64_t ldq;
  const void* scales; /* [M, K/G] */
  int64_t ld_scales;
  const void* qweight; /* [N, K/2] uint8 */
  int64_t ldqw;
  const void* wscales; /* [K/G, N] */
  int64_t ld_wscales;
  const float* lora_act; /* [M, r] float32; NULL iff rank == 0 */
  int64_t ld_lora_act;
  const void* proj_up; /* [N, r] io_dtype; NULL iff rank == 0 */
  int64_t ld_proj_up;
  const void* bias;     /* [N] io_dtype, or NULL */
  const float* wtscale; /* device pointer to one float32 (NVFP4: required; INT4: NULL) */
  void* out;            /* out: [M, N] out_dtype */
  int64_t ldo;
} dcgq_gemm_w4a4_args;

typedef struct dcgq_gemm_w4a16_args {
  dcgq_format fmt;
  dcgq_layout layout; /* nibble order of qweight */
  int64_t m, n, k;
  dcgq_dtype x_dtype; /* BFLOAT16 / FLOAT16: x, out, bias and INT4 wscales */
  const void* x;      /* [M, K] x_dtype; 16-byte aligned, ldx a multiple of 8 */
  int64_t ldx;
  const void* qweight; /* [N, K/2] uint8 */
  int64_t ldqw;
  const void* wscales; /* [K/G, N]: x_dtype (INT4) or float8_e4m3fn (NVFP4) */
  int64_t ld_wscales;
  const void* bias;     /* [N] x_dtype, or NULL */
  const float* wtscale; /* device pointer to one float32 (NVFP4: required; INT4: NULL) */
  void* out;            /* out: [M, N] x_dtype */
  int64_t ldo;
} dcgq_gemm_w4a16_args;

/* ---- kernels (asynchronous on `stream`; arguments are checked first) ---- */
DCGQ_API dcgq_status dcgq_quantize_act(const dcgq_quantize_act_args* args, cudaStream_t stream);
DCGQ_API dcgq_status dcgq_gemm_w4a4(const dcgq_gemm_w4a4_args* args, cudaStream_t stream);
DCGQ_API dcgq_status dcgq_gemm_w4a16(const dcgq_gemm_w4a16_args* args, cudaStream_t stream);

/* quantize_act on the CPU with HOST pointers: the same per-group arithmetic as the kernel (one
 * shared source), so that the bit-exact contract can be checked without a GPU. */
DCGQ_API dcgq_status dcgq_quantize_act_host(const dcgq_quantize_act_args* args);

/* ---- capabilities ---- */
/* SUCCESS if this build has a kernel for `op` / `fmt` on compute capability major.minor, else
 * UNSUPPORTED (not implemented there) or ARCH_NOT_BUILT (implemented, not compiled) with a
 * message naming what is missing. No GPU needed. */
DCGQ_API dcgq_status dcgq_check_compute_capability(dcgq_op op, dcgq_format fmt, int major,
                                                   int minor);
/* The same for CUDA device `device` (NO_DEVICE when the runtime finds none). */
DCGQ_API dcgq_status dcgq_check_device(dcgq_op op, dcgq_format fmt, int device);
/* Name of the kernel that would run (static string), or NULL with the status's message. */
DCGQ_API const char* dcgq_selected_kernel(dcgq_op op, dcgq_format fmt, dcgq_variant variant,
                                          int major, int minor);

/* ---- information ---- */
DCGQ_API const char* dcgq_error_string(dcgq_status status); /* the enum's name */
DCGQ_API const char* dcgq_last_error_message(void);         /* "" after a successful call */
DCGQ_API const char* dcgq_built_architectures(void);        /* e.g. "80;86;89;90a;120a" */
DCGQ_API const char* dcgq_version(void);
DCGQ_API int dcgq_abi_version(void);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* DCGEN_QUANT_H_ */
