// The C ABI entry points: argument validation (no GPU needed), device and kernel selection,
// and the launch through the registry.
#include <cuda_runtime_api.h>

#include "internal.h"

#define DCGQ_VERSION_STRING "0.1.0"

namespace dcgq {

// defined in host_quantize.cpp
dcgq_status quantize_act_host(const dcgq_quantize_act_args& a);

namespace {

int group_size(dcgq_format fmt) { return fmt == DCGQ_FORMAT_NVFP4 ? 16 : 64; }
const char* fmt_name(dcgq_format fmt) { return fmt == DCGQ_FORMAT_NVFP4 ? "nvfp4" : "int4"; }

bool is_16bit(dcgq_dtype d) { return d == DCGQ_DTYPE_BFLOAT16 || d == DCGQ_DTYPE_FLOAT16; }

dcgq_status check_enums(const char* fn, dcgq_format fmt, dcgq_layout layout) {
  DCGQ_CHECK_ARG(fmt == DCGQ_FORMAT_INT4 || fmt == DCGQ_FORMAT_NVFP4,
                 "%s: fmt = %d; expected DCGQ_FORMAT_INT4 (0) or DCGQ_FORMAT_NVFP4 (1)", fn,
                 int(fmt));
  DCGQ_CHECK_ARG(layout == DCGQ_LAYOUT_CANONICAL || layout == DCGQ_LAYOUT_SPLIT_HALVES,
                 "%s: layout = %d; expected DCGQ_LAYOUT_CANONICAL (0) or "
                 "DCGQ_LAYOUT_SPLIT_HALVES (1)",
                 fn, int(layout));
  return DCGQ_SUCCESS;
}

// act_unsigned: 0 or 1, and 1 only for INT4 (NVFP4 has no unsigned variant).
dcgq_status check_act_unsigned(const char* fn, dcgq_format fmt, int act_unsigned) {
  DCGQ_CHECK_ARG(act_unsigned == 0 || act_unsigned == 1, "%s: act_unsigned = %d; expected 0 or 1",
                 fn, act_unsigned);
  DCGQ_CHECK_ARG(act_unsigned == 0 || fmt == DCGQ_FORMAT_INT4,
                 "%s: act_unsigned = 1 with fmt = %d (%s); unsigned activations exist for "
                 "DCGQ_FORMAT_INT4 (0) only",
                 fn, int(fmt), fmt_name(fmt));
  return DCGQ_SUCCESS;
}

dcgq_status check_k(const char* fn, dcgq_format fmt, int64_t k) {
  const int g = group_size(fmt);
  DCGQ_CHECK_ARG(k > 0 && k % g == 0 && k <= (int64_t(1) << 30),
                 "%s: k = %lld; expected a positive multiple of the %s group size %d", fn,
                 (long long)k, fmt_name(fmt), g);
  return DCGQ_SUCCESS;
}

// A size that the kernels index with 32-bit ints: 0 <= value < 2^31.
dcgq_status check_dim(const char* fn, const char* name, int64_t value) {
  DCGQ_CHECK_ARG(value >= 0 && value < (int64_t(1) << 31), "%s: %s = %lld; expected 0 <= %s < 2^31",
                 fn, name, (long long)value, name);
  return DCGQ_SUCCESS;
}

dcgq_status check_16bit(const char* fn, const char* name, dcgq_dtype dtype) {
  DCGQ_CHECK_ARG(is_16bit(dtype),
                 "%s: %s = %d; expected DCGQ_DTYPE_BFLOAT16 (2) or DCGQ_DTYPE_FLOAT16 (1)", fn,
                 name, int(dtype));
  return DCGQ_SUCCESS;
}

// Row stride `ld` of a tensor with `cols` columns: at least cols, and a multiple of `multiple`.
dcgq_status check_ld(const char* fn, const char* name, int64_t ld, int64_t cols, int multiple) {
  DCGQ_CHECK_ARG(ld >= cols, "%s: %s = %lld is smaller than the row length %lld", fn, name,
                 (long long)ld, (long long)cols);
  DCGQ_CHECK(ld % multiple == 0, DCGQ_ERROR_MISALIGNED, "%s: %s = %lld must be a multiple of %d",
             fn, name, (long long)ld, multiple);
  return DCGQ_SUCCESS;
}

dcgq_status current_capability(const char* fn, int* major, int* minor) {
  int device = -1;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(minor, cudaDevAttrComputeCapabilityMinor, device);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the (non-sticky) error so later calls start clean
    return fail(DCGQ_ERROR_NO_DEVICE, "%s: no usable CUDA device: %s (%s)", fn,
                cudaGetErrorName(err), cudaGetErrorString(err));
  }
  return DCGQ_SUCCESS;
}

dcgq_status validate_quantize_act(const char* fn, const dcgq_quantize_act_args* a, bool device) {
  DCGQ_CHECK_ARG(a != nullptr, "%s: argument 'args' is NULL", fn);
  DCGQ_RETURN_IF_ERROR(check_enums(fn, a->fmt, a->layout));
  DCGQ_RETURN_IF_ERROR(check_act_unsigned(fn, a->fmt, a->act_unsigned));
  DCGQ_RETURN_IF_ERROR(check_16bit(fn, "x_dtype", a->x_dtype));
  DCGQ_RETURN_IF_ERROR(check_dim(fn, "m", a->m));
  DCGQ_RETURN_IF_ERROR(check_k(fn, a->fmt, a->k));
  DCGQ_CHECK_ARG(a->rank >= 0 && a->rank <= 128, "%s: rank = %lld; expected 0 <= rank <= 128", fn,
                 (long long)a->rank);
  if (a->m == 0) return DCGQ_SUCCESS;
  const int g = group_size(a->fmt);
  DCGQ_CHECK_NOT_NULL(fn, "x", a->x);
  DCGQ_CHECK_NOT_NULL(fn, "q", a->q);
  DCGQ_CHECK_NOT_NULL(fn, "scales", a->scales);
  DCGQ_RETURN_IF_ERROR(check_ld(fn, "ldx", a->ldx, a->k, device ? 8 : 1));
  DCGQ_RETURN_IF_ERROR(check_ld(fn, "ldq", a->ldq, a->k / 2, device ? 8 : 1));
  DCGQ_RETURN_IF_ERROR(check_ld(fn, "ld_scales", a->ld_scales, a->k / g, 1));
  if (a->rank > 0) {
    DCGQ_CHECK_NOT_NULL(fn, "lora_down", a->lora_down);
    DCGQ_CHECK_NOT_NULL(fn, "lora_act", a->lora_act);
    DCGQ_RETURN_IF_ERROR(check_ld(fn, "ld_lora_down", a->ld_lora_down, a->rank, 1));
    DCGQ_RETURN_IF_ERROR(check_ld(fn, "ld_lora_act", a->ld_lora_act, a->rank, 1));
  }
  if (device) {
    DCGQ_CHECK_ALIGNED(fn, "x", a->x, 16);
    DCGQ_CHECK_ALIGNED(fn, "q", a->q, 8);
    DCGQ_CHECK_ALIGNED(fn, "scales", a->scales, a->fmt == DCGQ_FORMAT_INT4 ? 2 : 1);
    if (a->smooth != nullptr) DCGQ_CHECK_ALIGNED(fn, "smooth", a->smooth, 16);
    if (a->rank > 0) {
      DCGQ_CHECK_ALIGNED(fn, "lora_down", a->lora_down, 2);
      DCGQ_CHECK_ALIGNED(fn, "lora_act", a->lora_act, 4);
    }
  }
  return DCGQ_SUCCESS;
}

dcgq_status validate_gemm_w4a4(const char* fn, const dcgq_gemm_w4a4_args* a) {
  DCGQ_CHECK_ARG(a != nullptr, "%s: argument 'args' is NULL", fn);
  DCGQ_RETURN_IF_ERROR(check_enums(fn, a->fmt, a->layout));
  DCGQ_RETURN_IF_ERROR(check_act_unsigned(fn, a->fmt, a->act_unsigned));
  DCGQ_CHECK_ARG(a->variant >= DCGQ_VARIANT_AUTO && a->variant <= DCGQ_VARIANT_WGMMA,
                 "%s: variant = %d; expected 0 (auto), 1 (mma.sync) or 2 (wgmma)", fn,
                 int(a->variant));
  if (a->fmt == DCGQ_FORMAT_INT4) {
    DCGQ_CHECK_ARG(is_16bit(a->scale_dtype),
                   "%s: scale_dtype = %d; INT4 scales must be DCGQ_DTYPE_BFLOAT16 (2) or "
                   "DCGQ_DTYPE_FLOAT16 (1)",
                   fn, int(a->scale_dtype));
  } else {
    DCGQ_CHECK_ARG(a->scale_dtype == DCGQ_DTYPE_FLOAT8_E4M3,
                   "%s: scale_dtype = %d; NVFP4 scales must be DCGQ_DTYPE_FLOAT8_E4M3 (3)", fn,
                   int(a->scale_dtype));
  }
  DCGQ_RETURN_IF_ERROR(check_16bit(fn, "io_dtype", a->io_dtype));
  DCGQ_CHECK_ARG(is_16bit(a->out_dtype) || a->out_dtype == DCGQ_DTYPE_FLOAT32,
                 "%s: out_dtype = %d; expected DCGQ_DTYPE_BFLOAT16 (2), DCGQ_DTYPE_FLOAT16 (1) "
                 "or DCGQ_DTYPE_FLOAT32 (0)",
                 fn, int(a->out_dtype));
  DCGQ_RETURN_IF_ERROR(check_dim(fn, "m", a->m));
  DCGQ_RETURN_IF_ERROR(check_dim(fn, "n", a->n));
  DCGQ_RETURN_IF_ERROR(check_k(fn, a->fmt, a->k));
  DCGQ_CHECK_ARG(a->rank >= 0 && a->rank <= 4096, "%s: rank = %lld; expected 0 <= rank <= 4096", fn,
                 (long long)a->rank);
  if (a->fmt == DCGQ_FORMAT_NVFP4) DCGQ_CHECK_NOT_NULL(fn, "wtscale", a->wtscale);
  if (a->m == 0 || a->n == 0) return DCGQ_SUCCESS;
  const int g = group_size(a->fmt);
  DCGQ_CHECK_NOT_NULL(fn, "q", a->q);
  DCGQ_CHECK_NOT_NULL(fn, "scales", a->scales);
  DCGQ_CHECK_NOT_NULL(fn, "qweight", a->qweight);
  DCGQ_CHECK_NOT_NULL(fn, "wscales", a->wscales);
  DCGQ_CHECK_NOT_NULL(fn, "out", a->out);
  DCGQ_RETURN_IF_ERROR(check_ld(fn, "ldq", a->ldq, a->k / 2, 8));
  DCGQ_RETURN_IF_ERROR(check_ld(fn, "ldqw", a->ldqw, a->k / 2, 8));
  DCGQ_RETURN_IF_ERROR(check_ld(fn, "ld_scales", a->ld_scales, a->k / g, 1));
  DCGQ_RETURN_IF_ERROR(check_ld(fn, "ld_wscales", a->ld_wscales, a->n, 1));
  DCGQ_RETURN_IF_ERROR(check_ld(fn, "ldo", a->ldo, a->n, 1));
  if (a->rank > 0) {
    DCGQ_CHECK_NOT_NULL(fn, "lora_act", a->lora_act);
    DCGQ_CHECK_NOT_NULL(fn, "proj_up", a->proj_up);
    DCGQ_RETURN_IF_ERROR(check_ld(fn, "ld_lora_act", a->ld_lora_act, a->rank, 1));
    DCGQ_RETURN_IF_ERROR(check_ld(fn, "ld_proj_up", a->ld_proj_up, a->rank, 1));
    DCGQ_CHECK_ALIGNED(fn, "lora_act", a->lora_act, 4);
    DCGQ_CHECK_ALIGNED(fn, "proj_up", a->proj_up, 2);
  }
  DCGQ_CHECK_ALIGNED(fn, "q", a->q, 8);
  DCGQ_CHECK_ALIGNED(fn, "qweight", a->qweight, 8);
  DCGQ_CHECK_ALIGNED(fn, "scales", a->scales, a->fmt == DCGQ_FORMAT_INT4 ? 2 : 1);
  DCGQ_CHECK_ALIGNED(fn, "wscales", a->wscales, a->fmt == DCGQ_FORMAT_INT4 ? 2 : 1);
  DCGQ_CHECK_ALIGNED(fn, "out", a->out, a->out_dtype == DCGQ_DTYPE_FLOAT32 ? 4 : 2);
  if (a->bias != nullptr) DCGQ_CHECK_ALIGNED(fn, "bias", a->bias, 2);
  if (a->wtscale != nullptr) DCGQ_CHECK_ALIGNED(fn, "wtscale", a->wtscale, 4);
  return DCGQ_SUCCESS;
}

dcgq_status validate_gemm_w4a16(const char* fn, const dcgq_gemm_w4a16_args* a) {
  DCGQ_CHECK_ARG(a != nullptr, "%s: argument 'args' is NULL", fn);
  DCGQ_RETURN_IF_ERROR(check_enums(fn, a->fmt, a->layout));
  DCGQ_RETURN_IF_ERROR(check_16bit(fn, "x_dtype", a->x_dtype));
  DCGQ_RETURN_IF_ERROR(check_dim(fn, "m", a->m));
  DCGQ_RETURN_IF_ERROR(check_dim(fn, "n", a->n));
  DCGQ_RETURN_IF_ERROR(check_k(fn, a->fmt, a->k));
  if (a->fmt == DCGQ_FORMAT_NVFP4) DCGQ_CHECK_NOT_NULL(fn, "wtscale", a->wtscale);
  if (a->m == 0 || a->n == 0) return DCGQ_SUCCESS;
  const int g = group_size(a->fmt);
  DCGQ_CHECK_NOT_NULL(fn, "x", a->x);
  DCGQ_CHECK_NOT_NULL(fn, "qweight", a->qweight);
  DCGQ_CHECK_NOT_NULL(fn, "wscales", a->wscales);
  DCGQ_CHECK_NOT_NULL(fn, "out", a->out);
  DCGQ_RETURN_IF_ERROR(check_ld(fn, "ldx", a->ldx, a->k, 8));
  DCGQ_RETURN_IF_ERROR(check_ld(fn, "ldqw", a->ldqw, a->k / 2, 8));
  DCGQ_RETURN_IF_ERROR(check_ld(fn, "ld_wscales", a->ld_wscales, a->n, 1));
  DCGQ_RETURN_IF_ERROR(check_ld(fn, "ldo", a->ldo, a->n, 1));
  (void)g;
  DCGQ_CHECK_ALIGNED(fn, "x", a->x, 16);
  DCGQ_CHECK_ALIGNED(fn, "qweight", a->qweight, 8);
  DCGQ_CHECK_ALIGNED(fn, "wscales", a->wscales, a->fmt == DCGQ_FORMAT_INT4 ? 2 : 1);
  DCGQ_CHECK_ALIGNED(fn, "out", a->out, 2);
  if (a->bias != nullptr) DCGQ_CHECK_ALIGNED(fn, "bias", a->bias, 2);
  if (a->wtscale != nullptr) DCGQ_CHECK_ALIGNED(fn, "wtscale", a->wtscale, 4);
  return DCGQ_SUCCESS;
}

// Resolve the current device and the kernel for it.
const KernelEntry* select_kernel(const char* fn, dcgq_op op, dcgq_format fmt, dcgq_variant variant,
                                 dcgq_status* status) {
  int major = 0, minor = 0;
  *status = current_capability(fn, &major, &minor);
  if (*status != DCGQ_SUCCESS) return nullptr;
  return find_kernel(op, fmt, variant, major, minor, status);
}

}  // namespace
}  // namespace dcgq

using namespace dcgq;

extern "C" {

dcgq_status dcgq_quantize_act(const dcgq_quantize_act_args* args, cudaStream_t stream) {
  const char* fn = "dcgq_quantize_act";
  clear_error();
  DCGQ_RETURN_IF_ERROR(validate_quantize_act(fn, args, /*device=*/true));
  if (args->m == 0) return DCGQ_SUCCESS;
  dcgq_status status;
  const KernelEntry* e =
      select_kernel(fn, DCGQ_OP_QUANTIZE_ACT, args->fmt, DCGQ_VARIANT_AUTO, &status);
  if (e == nullptr) return status;
  return reinterpret_cast<QuantizeLaunch>(e->launch)(*args, stream);
}

dcgq_status dcgq_quantize_act_host(const dcgq_quantize_act_args* args) {
  clear_error();
  DCGQ_RETURN_IF_ERROR(validate_quantize_act("dcgq_quantize_act_host", args, /*device=*/false));
  if (args->m == 0) return DCGQ_SUCCESS;
  return quantize_act_host(*args);
}

dcgq_status dcgq_gemm_w4a4(const dcgq_gemm_w4a4_args* args, cudaStream_t stream) {
  const char* fn = "dcgq_gemm_w4a4";
  clear_error();
  DCGQ_RETURN_IF_ERROR(validate_gemm_w4a4(fn, args));
  if (args->m == 0 || args->n == 0) return DCGQ_SUCCESS;
  dcgq_status status;
  const KernelEntry* e = select_kernel(fn, DCGQ_OP_GEMM_W4A4, args->fmt, args->variant, &status);
  if (e == nullptr) return status;
  return reinterpret_cast<GemmW4A4Launch>(e->launch)(*args, stream);
}

dcgq_status dcgq_gemm_w4a16(const dcgq_gemm_w4a16_args* args, cudaStream_t stream) {
  const char* fn = "dcgq_gemm_w4a16";
  clear_error();
  DCGQ_RETURN_IF_ERROR(validate_gemm_w4a16(fn, args));
  if (args->m == 0 || args->n == 0) return DCGQ_SUCCESS;
  dcgq_status status;
  const KernelEntry* e =
      select_kernel(fn, DCGQ_OP_GEMM_W4A16, args->fmt, DCGQ_VARIANT_AUTO, &status);
  if (e == nullptr) return status;
  return reinterpret_cast<GemmW4A16Launch>(e->launch)(*args, stream);
}

dcgq_status dcgq_check_compute_capability(dcgq_op op, dcgq_format fmt, int major, int minor) {
  clear_error();
  DCGQ_CHECK_ARG(op >= DCGQ_OP_QUANTIZE_ACT && op <= DCGQ_OP_GEMM_W4A16,
                 "dcgq_check_compute_capability: op = %d; expected 0, 1 or 2", int(op));
  DCGQ_RETURN_IF_ERROR(check_enums("dcgq_check_compute_capability", fmt, DCGQ_LAYOUT_CANONICAL));
  dcgq_status status;
  find_kernel(op, fmt, DCGQ_VARIANT_AUTO, major, minor, &status);
  return status;
}

dcgq_status dcgq_check_device(dcgq_op op, dcgq_format fmt, int device) {
  clear_error();
  int major = 0, minor = 0;
  cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return fail(DCGQ_ERROR_NO_DEVICE, "dcgq_check_device: CUDA device %d is not usable: %s (%s)",
                device, cudaGetErrorName(err), cudaGetErrorString(err));
  }
  return dcgq_check_compute_capability(op, fmt, major, minor);
}

const char* dcgq_selected_kernel(dcgq_op op, dcgq_format fmt, dcgq_variant variant, int major,
                                 int minor) {
  clear_error();
  if (check_enums("dcgq_selected_kernel", fmt, DCGQ_LAYOUT_CANONICAL) != DCGQ_SUCCESS) {
    return nullptr;
  }
  dcgq_status status;
  const KernelEntry* e = find_kernel(op, fmt, variant, major, minor, &status);
  return e ? e->name : nullptr;
}

const char* dcgq_error_string(dcgq_status status) {
  switch (status) {
    case DCGQ_SUCCESS:
      return "DCGQ_SUCCESS";
    case DCGQ_ERROR_INVALID_ARGUMENT:
      return "DCGQ_ERROR_INVALID_ARGUMENT";
    case DCGQ_ERROR_MISALIGNED:
      return "DCGQ_ERROR_MISALIGNED";
    case DCGQ_ERROR_UNSUPPORTED:
      return "DCGQ_ERROR_UNSUPPORTED";
    case DCGQ_ERROR_NO_DEVICE:
      return "DCGQ_ERROR_NO_DEVICE";
    case DCGQ_ERROR_ARCH_NOT_BUILT:
      return "DCGQ_ERROR_ARCH_NOT_BUILT";
    case DCGQ_ERROR_CUDA:
      return "DCGQ_ERROR_CUDA";
  }
  return "DCGQ_ERROR_UNKNOWN";
}

const char* dcgq_built_architectures(void) { return built_architectures(); }

const char* dcgq_version(void) { return DCGQ_VERSION_STRING; }

int dcgq_abi_version(void) { return DCGQ_ABI_VERSION; }

}  // extern "C"
