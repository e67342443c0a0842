// quantize_act on the CPU with the kernels' own scalar arithmetic (kernels/quant_math.h).
//
// Exists so that the bit-exact contract of the quantizer can be tested on machines without a
// GPU: the group amax, scale rounding, code rounding and nibble placement below call the same
// functions as csrc/kernels/quantize_act.cuh. lora_act is a plain float32 dot product in
// ascending k order (the kernel sums in tensor-core order; neither is bit-exact with torch).
#include <vector>

#include "../kernels/quant_math.h"
#include "internal.h"

namespace dcgq {

static_assert(qmath::kUnsignedActShift == DCGQ_UNSIGNED_ACT_SHIFT,
              "quant_math.h and the C header disagree on the unsigned activation shift");

dcgq_status quantize_act_host(const dcgq_quantize_act_args& a) {
  using namespace qmath;
  const bool bf16 = a.x_dtype == DCGQ_DTYPE_BFLOAT16;
  const bool nvfp4 = a.fmt == DCGQ_FORMAT_NVFP4;
  const bool uns = a.act_unsigned != 0;  // INT4 only (validated)
  const int g = nvfp4 ? 16 : 64;
  const int64_t k = a.k;
  auto to_f32 = [bf16](uint16_t h) { return bf16 ? bf16_to_f32(h) : f16_to_f32(h); };
  const uint16_t* x = static_cast<const uint16_t*>(a.x);
  const uint16_t* smooth = static_cast<const uint16_t*>(a.smooth);
  const uint16_t* down = static_cast<const uint16_t*>(a.lora_down);
  uint8_t* q = static_cast<uint8_t*>(a.q);
  std::vector<float> xf(static_cast<size_t>(k)), xs(static_cast<size_t>(g));

  for (int64_t m = 0; m < a.m; ++m) {
    for (int64_t i = 0; i < k; ++i) xf[size_t(i)] = to_f32(x[m * a.ldx + i]);
    uint8_t* qrow = q + m * a.ldq;
    for (int64_t i = 0; i < k / 2; ++i) qrow[i] = 0;
    for (int64_t grp = 0; grp < k / g; ++grp) {
      float amax = 0.0f;
      for (int j = 0; j < g; ++j) {
        const int64_t e = grp * g + j;
        const float xe = uns ? add_rn(xf[size_t(e)], kUnsignedActShift) : xf[size_t(e)];
        const float v = smooth ? div_rn(xe, to_f32(smooth[e])) : xe;
        xs[size_t(j)] = v;
        amax = amax_update(amax, v);
      }
      float divisor;
      if (nvfp4) {
        static_cast<uint8_t*>(a.scales)[m * a.ld_scales + grp] = nvfp4_act_scale(amax, &divisor);
      } else {
        static_cast<uint16_t*>(a.scales)[m * a.ld_scales + grp] =
            int4_scale(amax, uns ? 15.0f : 7.0f, bf16, &divisor);
      }
      for (int j = 0; j < g; ++j) {
        const float v = xs[size_t(j)];
        const uint32_t nib = nvfp4 ? nvfp4_nibble(v, divisor)
                                   : (uns ? uint4_nibble(v, divisor) : int4_nibble(v, divisor));
        int64_t byte;
        bool high;
        packed_position(int(a.layout), g, grp * g + j, &byte, &high);
        qrow[byte] = uint8_t(qrow[byte] | (high ? nib << 4 : nib));
      }
    }
    for (int64_t c = 0; c < a.rank; ++c) {
      float acc = 0.0f;
      for (int64_t i = 0; i < k; ++i) acc += xf[size_t(i)] * to_f32(down[i * a.ld_lora_down + c]);
      a.lora_act[m * a.ld_lora_act + c] = acc;
    }
  }
  return DCGQ_SUCCESS;
}

}  // namespace dcgq
