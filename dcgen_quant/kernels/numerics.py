"""Exact rounding and 4-bit decoding helpers shared by the Triton kernels (``@triton.jit``).

Why these exist instead of ``x.to(dtype)``:

* The quantizers must match the pure-torch reference bit for bit (formats/int4.py,
  formats/nvfp4.py). Scale rounding to bfloat16 and to float8 E4M3 is done here with integer and
  power-of-two arithmetic that is exact on every target, so the same code gives the same bits on
  a GPU and in the interpreter. The interpreter's own float32 -> bfloat16 / float8 casts
  truncate instead of rounding to nearest even (measured with triton 3.9; REFERENCE.md section 5
  lists its dot bugs), so a plain ``.to()`` would be wrong there.
* ``libdevice`` calls do not exist in the interpreter; :func:`rint` uses the float32
  magic-number rounding there and ``libdevice.rint`` (``cvt.rni``) on a GPU.
* The interpreter also widens bfloat16 subnormals to wrong float32 values; :func:`to_f32` goes
  through the bits there.

Every helper works on float32 tensors and returns float32 tensors whose values are exactly
representable in the target format, so the final ``.to(target)`` is exact on every backend.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

from dcgen_quant.capabilities import triton_interpret

# Scale dtype codes passed to kernels as a constexpr.
SCALE_BF16 = 0
SCALE_FP16 = 1
SCALE_FP32 = 2

INTERPRETED = triton_interpret()  # how this module's kernels were built (jit vs interpreter)


@triton.jit
def rint(x, INTERPRET: tl.constexpr):
    """Round float32 ``x`` to the nearest integer, ties to even (valid for |x| < 2**22)."""
    if INTERPRET:
        # 1.5 * 2**23: adding it pushes the fraction bits out under round-to-nearest-even.
        return (x + 12582912.0) - 12582912.0
    else:
        return libdevice.rint(x)


@triton.jit
def to_f32(x, INTERPRET: tl.constexpr):
    """Widen to float32. In the interpreter a bfloat16 is widened through its bits (its own
    conversion turns bfloat16 subnormals into wrong values; measured with triton 3.9)."""
    if INTERPRET and x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def round_to_bf16(x):
    """float32 -> float32 holding the bfloat16 value nearest to ``x`` (ties to even).

    Works on the bits: add 0x7FFF plus the lowest kept bit, then clear the 16 dropped bits. Exact
    for every finite input, subnormals included; overflow goes to infinity like a real cast.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + (0x7FFF + ((bits >> 16) & 1))
    bits = (bits >> 16) << 16
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def round_to_e4m3(x, INTERPRET: tl.constexpr):
    """float32 in [0, 448] -> float32 holding the nearest float8 E4M3 value (ties to even).

    E4M3 has 3 mantissa bits and a minimum normal exponent of -6 (biased float32 exponent 121);
    below that the grid is the subnormal step 2**-9. With ``e`` the float32 biased exponent
    clamped to >= 121, the grid step is ``q = 2**(e - 127 - 3)``: scale by 1/q (exact, a power of
    two), round to an integer, scale back.
    """
    bits = x.to(tl.int32, bitcast=True)
    e = tl.maximum(bits >> 23, 121)
    inv_q = ((257 - e) << 23).to(tl.float32, bitcast=True)
    q = ((e - 3) << 23).to(tl.float32, bitcast=True)
    return rint(x * inv_q, INTERPRET) * q


@triton.jit
def round_to_scale_dtype(x, SCALE_KIND: tl.constexpr):
    """float32 -> float32 holding ``x`` rounded (to nearest even) to the INT4 scale dtype."""
    if SCALE_KIND == 0:
        return round_to_bf16(x)
    elif SCALE_KIND == 1:
        # float32 -> float16 is a correct RNE cast both on GPUs and in the interpreter (numpy).
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def cast_to(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """float32 -> ``DTYPE``, rounding to nearest even (for stores into 16-bit outputs).

    On a GPU the cast itself rounds correctly. The interpreter truncates float32 -> bfloat16
    and mishandles bfloat16 subnormals, so there the value is rounded with
    :func:`round_to_bf16` and its top 16 bits are reinterpreted as the bfloat16.
    """
    if INTERPRET and tl.bfloat16 == DTYPE:
        bits = round_to_bf16(x).to(tl.uint32, bitcast=True) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def div_by_reciprocal(x, d, r):
    """``x / d`` correctly rounded, given ``r = RN(1 / d)``: Markstein's FMA correction.

    ``q0 = RN(x r)``; the residual ``e = x - q0 d`` is exact with an FMA; ``RN(q0 + e r)`` is the
    correctly rounded quotient when d, 1/d, x and the residual are normal numbers (0 mismatches
    against IEEE division in 16.8M random normal-range samples, triton 3.9 interpreter, which
    implements a true FMA). Outside that range it can differ (|x| below ~2**-100; the sign of a
    zero quotient), so callers use it only where that cannot change their result. Three
    arithmetic instructions per element instead of a full-range IEEE division.
    """
    q0 = x * r
    e = tl.fma(-q0, d, x)
    return tl.fma(e, r, q0)


@triton.jit
def e2m1_code(a, sign_of):
    """Magnitudes ``a`` (>= 0, already divided by their block scale) and the tensor whose sign
    bits to take -> E2M1 codes 0..15 (int32).

    Bit 3 is the sign bit of ``sign_of`` (so -0.0 gives code 8); bits 0-2 are ``a`` rounded to
    the grid 0, 0.5, 1, 1.5, 2, 3, 4, 6 with ties to the even code, saturating at 6. The
    boundaries above an even code use ``>`` (a tie stays on the even code), those above an odd
    code use ``>=`` (a tie moves up to the even code), as in formats/nvfp4.py.
    """
    mag = (a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
    mag += (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32)
    mag += (a > 5.0).to(tl.int32)
    sign = (sign_of.to(tl.uint32, bitcast=True) >> 31).to(tl.int32)
    return mag | (sign << 3)


@triton.jit
def e2m1_value(nibble):
    """E2M1 codes (int32 0..15) -> float32 values, built from bits (no table lookup).

    Code bits ``s e1 e0 m``: exponent field ``e = (code >> 1) & 3``, mantissa bit ``m``. For
    ``e > 0`` the value is ``(1 + m/2) * 2**(e-1)``: float32 exponent ``e + 126``, top mantissa bit
    ``m``. For ``e == 0`` it is ``m * 0.5`` (0x3F000000 is 0.5).
    """
    e = (nibble >> 1) & 3
    m = nibble & 1
    bits = tl.where(e > 0, ((e + 126) << 23) | (m << 22), m * 0x3F000000)
    bits = bits | ((nibble & 8) << 28)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def int_to_float(v):
    """int32 with |v| < 2**22 -> float32, exactly, on the FP32/INT32 pipes instead of the
    (quarter-rate) conversion unit: ``v + 0x4B400000`` is the bit pattern of ``1.5 * 2**23 + v``."""
    return (v + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def int4_low(b):
    """Packed bytes (uint8) -> signed INT4 of the low nibbles, int8 (shift up, shift down)."""
    return (b.to(tl.int8, bitcast=True) << 4) >> 4


@triton.jit
def int4_high(b):
    """Packed bytes (uint8) -> signed INT4 of the high nibbles as int8 (arithmetic shift)."""
    return b.to(tl.int8, bitcast=True) >> 4


@triton.jit
def uint4_low(b):
    """Packed bytes (uint8) -> unsigned INT4 (0..15) of the low nibbles, as int8 (exact: 0..15
    are valid int8 values, so the int8 tensor-core dots read them unchanged)."""
    return (b & 0xF).to(tl.int8, bitcast=True)


@triton.jit
def uint4_high(b):
    """Packed bytes (uint8) -> unsigned INT4 (0..15) of the high nibbles, as int8 (logical
    shift of the uint8)."""
    return (b >> 4).to(tl.int8, bitcast=True)
