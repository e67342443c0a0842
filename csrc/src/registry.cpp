// Error messages (thread-local) and the kernel registry.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "internal.h"

namespace dcgq {

namespace {
thread_local char g_message[1024] = "";

// Filled by the static initializers of the instantiation files while the library loads (one
// thread, before any entry point can run); read-only afterwards.
std::vector<KernelEntry>& registry() {
  static std::vector<KernelEntry> entries;
  return entries;
}

const char* op_name(dcgq_op op) {
  switch (op) {
    case DCGQ_OP_QUANTIZE_ACT:
      return "quantize_act";
    case DCGQ_OP_GEMM_W4A4:
      return "gemm_w4a4";
    case DCGQ_OP_GEMM_W4A16:
      return "gemm_w4a16";
  }
  return "unknown op";
}

const char* fmt_name(dcgq_format fmt) { return fmt == DCGQ_FORMAT_NVFP4 ? "nvfp4" : "int4"; }

std::string arch_name(const KernelEntry& e) {
  return std::to_string(e.sm) + (e.arch_specific ? "a" : "");
}

// What the library's sources implement (independent of what this build compiled).
const char* supported_archs(dcgq_op op, dcgq_format fmt) {
  if (op != DCGQ_OP_GEMM_W4A4) return "sm_80, sm_86, sm_89, sm_90a, sm_120a";
  if (fmt == DCGQ_FORMAT_NVFP4) return "sm_120a (block-scaled FP4 MMA)";
  return "sm_80, sm_86, sm_89 (4-bit MMA), sm_90a (INT8 wgmma / mma.sync), sm_120a (mma.sync s8)";
}

bool supports(dcgq_op op, dcgq_format fmt, int major, int minor) {
  const int cc = major * 10 + minor;
  if (op == DCGQ_OP_GEMM_W4A4 && fmt == DCGQ_FORMAT_NVFP4) return cc == 120;
  return major == 8 || cc == 90 || cc == 120;
}

bool runs_on(const KernelEntry& e, int major, int minor) {
  const int cc = major * 10 + minor;
  if (e.arch_specific) return e.sm == cc;
  return e.sm / 10 == major && e.sm <= cc;
}
}  // namespace

dcgq_status fail(dcgq_status status, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(g_message, sizeof(g_message), fmt, ap);
  va_end(ap);
  return status;
}

void clear_error() { g_message[0] = '\0'; }

dcgq_status cuda_status(int cuda_error, const char* what) {
  if (cuda_error == 0) return DCGQ_SUCCESS;
  const cudaError_t err = static_cast<cudaError_t>(cuda_error);
  return fail(DCGQ_ERROR_CUDA, "%s failed: %s (%s)", what, cudaGetErrorName(err),
              cudaGetErrorString(err));
}

bool register_kernel(const KernelEntry& entry) {
  registry().push_back(entry);
  return true;
}

const KernelEntry* find_kernel(dcgq_op op, dcgq_format fmt, dcgq_variant variant, int major,
                               int minor, dcgq_status* status) {
  const KernelEntry* best = nullptr;
  bool op_fmt_built = false;  // some architecture has this op and format
  bool arch_matches = false;  // some entry for this op runs on this device
  std::vector<std::string> archs_with_op;
  for (const KernelEntry& e : registry()) {
    if (e.op != op || !(e.fmt_mask & (1u << fmt))) continue;
    op_fmt_built = true;
    const std::string name = "sm_" + arch_name(e);
    if (std::find(archs_with_op.begin(), archs_with_op.end(), name) == archs_with_op.end()) {
      archs_with_op.push_back(name);
    }
    if (!runs_on(e, major, minor)) continue;
    arch_matches = true;
    if (variant != DCGQ_VARIANT_AUTO && e.variant != variant) continue;
    if (best == nullptr || e.sm > best->sm ||
        (e.sm == best->sm &&
         (e.arch_specific > best->arch_specific ||
          (e.arch_specific == best->arch_specific && e.priority > best->priority)))) {
      best = &e;
    }
  }
  if (best != nullptr) {
    *status = DCGQ_SUCCESS;
    return best;
  }
  std::string list;
  for (const std::string& a : archs_with_op) list += (list.empty() ? "" : ", ") + a;
  if (!supports(op, fmt, major, minor)) {
    *status = fail(DCGQ_ERROR_UNSUPPORTED,
                   "%s for format %s is not implemented for compute capability %d.%d (the "
                   "library implements it for %s); use the triton or reference backend on this "
                   "GPU",
                   op_name(op), fmt_name(fmt), major, minor, supported_archs(op, fmt));
  } else if (!arch_matches) {
    *status = fail(DCGQ_ERROR_ARCH_NOT_BUILT,
                   "%s for format %s has no kernel for compute capability %d.%d in this build "
                   "(built for: %s); rebuild with this architecture in DCGEN_QUANT_CUDA_ARCHS "
                   "(supported: %s), or use the triton backend",
                   op_name(op), fmt_name(fmt), major, minor, op_fmt_built ? list.c_str() : "none",
                   supported_archs(op, fmt));
  } else {
    *status = fail(DCGQ_ERROR_UNSUPPORTED,
                   "%s for format %s: variant %d is not available on compute capability %d.%d "
                   "(1 = mma.sync, 2 = wgmma, sm_90a only)",
                   op_name(op), fmt_name(fmt), int(variant), major, minor);
  }
  return nullptr;
}

const char* built_architectures() {
  static std::string archs = [] {
    const int order[][2] = {{75, 0}, {80, 0},  {86, 0},  {87, 0},  {89, 0},  {90, 0},
                            {90, 1}, {100, 0}, {100, 1}, {120, 0}, {120, 1}, {121, 1}};
    std::string out;
    for (const auto& o : order) {
      for (const KernelEntry& e : registry()) {
        if (e.sm == o[0] && int(e.arch_specific) == o[1]) {
          out += (out.empty() ? "" : ";") + arch_name(e);
          break;
        }
      }
    }
    return out;
  }();
  return archs.c_str();
}

}  // namespace dcgq

extern "C" {

const char* dcgq_last_error_message(void) { return dcgq::g_message; }

}  // extern "C"
