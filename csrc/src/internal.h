// Internal plumbing shared by the ABI entry points (api.cpp) and the per-architecture
// instantiation files: error messages, CHECK macros and the kernel registry.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "dcgen_quant/dcgen_quant.h"

namespace dcgq {

// ---- errors ----------------------------------------------------------------------------------

// Store a printf-style message for dcgq_last_error_message() (thread-local) and return status.
dcgq_status fail(dcgq_status status, const char* fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
void clear_error();

// Wrap a CUDA runtime result: DCGQ_ERROR_CUDA with cudaGetErrorString, or SUCCESS.
dcgq_status cuda_status(int cuda_error, const char* what);

}  // namespace dcgq

// Return `status` with a message unless `cond` holds. The message names the function, the
// argument, its value and what was expected (STYLE.md: errors name the argument).
#define DCGQ_CHECK(cond, status, ...)                      \
  do {                                                     \
    if (!(cond)) return ::dcgq::fail(status, __VA_ARGS__); \
  } while (0)

#define DCGQ_CHECK_ARG(cond, ...) DCGQ_CHECK(cond, DCGQ_ERROR_INVALID_ARGUMENT, __VA_ARGS__)

#define DCGQ_CHECK_NOT_NULL(fn, name, ptr) \
  DCGQ_CHECK_ARG((ptr) != nullptr, "%s: argument '%s' is NULL; expected a pointer", fn, name)

#define DCGQ_CHECK_ALIGNED(fn, name, ptr, bytes)                                            \
  DCGQ_CHECK((reinterpret_cast<uintptr_t>(ptr) % (bytes)) == 0, DCGQ_ERROR_MISALIGNED,      \
             "%s: argument '%s' = %p is not %d-byte aligned", fn, name, (const void*)(ptr), \
             (int)(bytes))

#define DCGQ_RETURN_IF_ERROR(expr)               \
  do {                                           \
    const dcgq_status dcgq_s_ = (expr);          \
    if (dcgq_s_ != DCGQ_SUCCESS) return dcgq_s_; \
  } while (0)

namespace dcgq {

// ---- kernel registry -------------------------------------------------------------------------
//
// Each instantiation file (csrc/instantiations/*.cu, compiled for exactly one architecture)
// registers its launchers at load time. The dispatcher picks, for a device of compute capability
// major.minor, the entry with the highest architecture it can run: an arch-specific entry
// ("a" targets: sm_90a, sm_120a) only on that exact major.minor; a plain one on any device of
// the same major version with an equal or higher minor.

using QuantizeLaunch = dcgq_status (*)(const dcgq_quantize_act_args&, cudaStream_t);
using GemmW4A4Launch = dcgq_status (*)(const dcgq_gemm_w4a4_args&, cudaStream_t);
using GemmW4A16Launch = dcgq_status (*)(const dcgq_gemm_w4a16_args&, cudaStream_t);

struct KernelEntry {
  dcgq_op op;
  unsigned fmt_mask;     // bit (1 << dcgq_format) for each format served
  dcgq_variant variant;  // MMA_SYNC or WGMMA for gemm_w4a4, AUTO for the others
  int sm;                // 80, 86, 89, 90, 120
  bool arch_specific;    // built for sm_XXa
  int priority;          // higher wins among entries of the same architecture (AUTO variant)
  const char* name;
  void* launch;  // one of the *Launch types above, by op
};

bool register_kernel(const KernelEntry& entry);

// The entry to run, or nullptr with the error status in *status and a message set.
const KernelEntry* find_kernel(dcgq_op op, dcgq_format fmt, dcgq_variant variant, int major,
                               int minor, dcgq_status* status);

// The architectures that registered at least one kernel, as "80;86;89;90a;120a".
const char* built_architectures();

}  // namespace dcgq

#define DCGQ_CONCAT_INNER(a, b) a##b
#define DCGQ_CONCAT(a, b) DCGQ_CONCAT_INNER(a, b)

// Register a launcher from an instantiation file (one line per kernel).
#define DCGQ_REGISTER_KERNEL(OP, FMT_MASK, VARIANT, SM, ARCH_SPECIFIC, PRIORITY, NAME, FN)  \
  static const bool DCGQ_CONCAT(dcgq_registered_, __LINE__) =                               \
      ::dcgq::register_kernel(::dcgq::KernelEntry{OP, FMT_MASK, VARIANT, SM, ARCH_SPECIFIC, \
                                                  PRIORITY, NAME, reinterpret_cast<void*>(FN)})
