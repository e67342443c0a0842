// dcgen_quant._C: a thin pybind11 layer over the C ABI (no torch headers).
//
// Each kernel entry point takes the fields of its C argument struct as keyword arguments
// (pointers as integers, e.g. tensor.data_ptr(); enums as their integer values, exported as
// module constants) plus the CUDA stream as an integer, and returns the dcgq_status as an int;
// last_error_message() then explains a failure. dcgen_quant/cuda_backend.py is the only caller.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "dcgen_quant/dcgen_quant.h"

namespace py = pybind11;

namespace {

// Fill `out` from kwargs[name] if present; records the key as consumed.
template <typename T>
void take(py::dict& kw, const char* name, T* out) {
  if (!kw.contains(name)) return;
  py::object v = kw[name];
  kw.attr("pop")(name);
  if (v.is_none()) return;
  if constexpr (std::is_pointer_v<T>) {
    *out = reinterpret_cast<T>(static_cast<uintptr_t>(v.cast<uint64_t>()));
  } else {
    *out = static_cast<T>(v.cast<int64_t>());
  }
}

void reject_unknown(const py::dict& kw, const char* fn) {
  if (kw.size() == 0) return;
  std::string names;
  for (auto item : kw)
    names += (names.empty() ? "" : ", ") + py::str(item.first).cast<std::string>();
  throw py::value_error(std::string(fn) + ": unknown argument(s) " + names);
}

dcgq_quantize_act_args quantize_args(py::kwargs kwargs) {
  py::dict kw(kwargs);
  dcgq_quantize_act_args a{};
  take(kw, "fmt", &a.fmt), take(kw, "layout", &a.layout), take(kw, "m", &a.m);
  take(kw, "act_unsigned", &a.act_unsigned);
  take(kw, "k", &a.k), take(kw, "rank", &a.rank), take(kw, "x_dtype", &a.x_dtype);
  take(kw, "x", &a.x), take(kw, "ldx", &a.ldx), take(kw, "smooth", &a.smooth);
  take(kw, "lora_down", &a.lora_down), take(kw, "ld_lora_down", &a.ld_lora_down);
  take(kw, "q", &a.q), take(kw, "ldq", &a.ldq), take(kw, "scales", &a.scales);
  take(kw, "ld_scales", &a.ld_scales), take(kw, "lora_act", &a.lora_act);
  take(kw, "ld_lora_act", &a.ld_lora_act);
  reject_unknown(kw, "quantize_act");
  return a;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dcgen_quant CUDA library (C ABI in csrc/include/dcgen_quant/dcgen_quant.h)";

  m.def(
      "quantize_act",
      [](uint64_t stream, py::kwargs kw) {
        const dcgq_quantize_act_args a = quantize_args(kw);
        py::gil_scoped_release nogil;
        return int(dcgq_quantize_act(&a, reinterpret_cast<cudaStream_t>(stream)));
      },
      py::arg("stream"));
  m.def("quantize_act_host", [](py::kwargs kw) {
    const dcgq_quantize_act_args a = quantize_args(kw);
    py::gil_scoped_release nogil;
    return int(dcgq_quantize_act_host(&a));
  });
  m.def(
      "gemm_w4a4",
      [](uint64_t stream, py::kwargs kwargs) {
        py::dict kw(kwargs);
        dcgq_gemm_w4a4_args a{};
        take(kw, "fmt", &a.fmt), take(kw, "layout", &a.layout), take(kw, "variant", &a.variant);
        take(kw, "act_unsigned", &a.act_unsigned);
        take(kw, "m", &a.m), take(kw, "n", &a.n), take(kw, "k", &a.k), take(kw, "rank", &a.rank);
        take(kw, "scale_dtype", &a.scale_dtype), take(kw, "io_dtype", &a.io_dtype);
        take(kw, "out_dtype", &a.out_dtype), take(kw, "q", &a.q), take(kw, "ldq", &a.ldq);
        take(kw, "scales", &a.scales), take(kw, "ld_scales", &a.ld_scales);
        take(kw, "qweight", &a.qweight), take(kw, "ldqw", &a.ldqw);
        take(kw, "wscales", &a.wscales), take(kw, "ld_wscales", &a.ld_wscales);
        take(kw, "lora_act", &a.lora_act), take(kw, "ld_lora_act", &a.ld_lora_act);
        take(kw, "proj_up", &a.proj_up), take(kw, "ld_proj_up", &a.ld_proj_up);
        take(kw, "bias", &a.bias), take(kw, "wtscale", &a.wtscale), take(kw, "out", &a.out);
        take(kw, "ldo", &a.ldo);
        reject_unknown(kw, "gemm_w4a4");
        py::gil_scoped_release nogil;
        return int(dcgq_gemm_w4a4(&a, reinterpret_cast<cudaStream_t>(stream)));
      },
      py::arg("stream"));
  m.def(
      "gemm_w4a16",
      [](uint64_t stream, py::kwargs kwargs) {
        py::dict kw(kwargs);
        dcgq_gemm_w4a16_args a{};
        take(kw, "fmt", &a.fmt), take(kw, "layout", &a.layout), take(kw, "m", &a.m);
        take(kw, "n", &a.n), take(kw, "k", &a.k), take(kw, "x_dtype", &a.x_dtype);
        take(kw, "x", &a.x), take(kw, "ldx", &a.ldx), take(kw, "qweight", &a.qweight);
        take(kw, "ldqw", &a.ldqw), take(kw, "wscales", &a.wscales);
        take(kw, "ld_wscales", &a.ld_wscales), take(kw, "bias", &a.bias);
        take(kw, "wtscale", &a.wtscale), take(kw, "out", &a.out), take(kw, "ldo", &a.ldo);
        reject_unknown(kw, "gemm_w4a16");
        py::gil_scoped_release nogil;
        return int(dcgq_gemm_w4a16(&a, reinterpret_cast<cudaStream_t>(stream)));
      },
      py::arg("stream"));

  m.def("check_compute_capability", [](int op, int fmt, int major, int minor) {
    return int(dcgq_check_compute_capability(static_cast<dcgq_op>(op),
                                             static_cast<dcgq_format>(fmt), major, minor));
  });
  m.def("selected_kernel", [](int op, int fmt, int variant, int major, int minor) -> py::object {
    const char* name = dcgq_selected_kernel(static_cast<dcgq_op>(op), static_cast<dcgq_format>(fmt),
                                            static_cast<dcgq_variant>(variant), major, minor);
    return name ? py::object(py::str(name)) : py::object(py::none());
  });
  m.def("last_error_message", [] { return std::string(dcgq_last_error_message()); });
  m.def("error_string", [](int s) { return std::string(dcgq_error_string(dcgq_status(s))); });
  m.def("built_architectures", [] { return std::string(dcgq_built_architectures()); });
  m.def("version", [] { return std::string(dcgq_version()); });
  m.def("abi_version", [] { return dcgq_abi_version(); });

#define DCGQ_EXPORT(name) m.attr(#name) = int(DCGQ_##name)
  DCGQ_EXPORT(SUCCESS);
  DCGQ_EXPORT(ERROR_INVALID_ARGUMENT);
  DCGQ_EXPORT(ERROR_MISALIGNED);
  DCGQ_EXPORT(ERROR_UNSUPPORTED);
  DCGQ_EXPORT(ERROR_NO_DEVICE);
  DCGQ_EXPORT(ERROR_ARCH_NOT_BUILT);
  DCGQ_EXPORT(ERROR_CUDA);
  DCGQ_EXPORT(DTYPE_FLOAT32);
  DCGQ_EXPORT(DTYPE_FLOAT16);
  DCGQ_EXPORT(DTYPE_BFLOAT16);
  DCGQ_EXPORT(DTYPE_FLOAT8_E4M3);
  DCGQ_EXPORT(DTYPE_UINT8);
  DCGQ_EXPORT(FORMAT_INT4);
  DCGQ_EXPORT(FORMAT_NVFP4);
  DCGQ_EXPORT(LAYOUT_CANONICAL);
  DCGQ_EXPORT(LAYOUT_SPLIT_HALVES);
  DCGQ_EXPORT(OP_QUANTIZE_ACT);
  DCGQ_EXPORT(OP_GEMM_W4A4);
  DCGQ_EXPORT(OP_GEMM_W4A16);
  DCGQ_EXPORT(VARIANT_AUTO);
  DCGQ_EXPORT(VARIANT_MMA_SYNC);
  DCGQ_EXPORT(VARIANT_WGMMA);
#undef DCGQ_EXPORT
}
