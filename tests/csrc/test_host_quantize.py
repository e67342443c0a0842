"""The CUDA quantizer's arithmetic is bit-exact with the pure-torch contract (formats/).

dcgq_quantize_act_host runs, on the CPU, the very scalar code the quantize_act kernel runs per
element and group (csrc/kernels/quant_math.h: divisions, amax, RNE casts to bf16 / fp16 / e4m3,
E2M1 and INT4 rounding, nibble placement per layout). Besides random inputs, the amax of a group
sweeps every finite positive bf16 / fp16 value, which walks the scale conversions through all
their rounding cases (ties, subnormals, saturation at 448, fp16 overflow to inf). Unsigned INT4
activations (act_unsigned: (x + 0.171875) / smooth, codes 0..15) are checked on GELU outputs with
values below -0.171875 mixed in (they clamp to code 0).
"""

import pytest
import torch

from dcgen_quant import ops
from dcgen_quant.formats import UNSIGNED_ACT_SHIFT, get_format

pytestmark = pytest.mark.nvcc

FMTS = ["int4", "nvfp4"]
LAYOUTS = ["canonical", "split_halves"]
DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def backend():
    from ._build import build_info

    build_info()
    from dcgen_quant import cuda_backend

    return cuda_backend


def _bits(t):
    return t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int16)


def assert_same(got, want):
    q, s, la = got
    rq, rs, rla = want
    assert torch.equal(q, rq), f"codes differ at {(q != rq).nonzero()[:5].tolist()}"
    assert s.dtype == rs.dtype and torch.equal(_bits(s), _bits(rs)), "scales differ"
    assert la.shape == rla.shape
    if la.numel():
        torch.testing.assert_close(la, rla, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,r", [(1, 64, 0), (7, 192, 4), (33, 320, 32), (5, 1088, 13)])
def test_random_inputs_bit_exact(backend, fmt, layout, dtype, m, k, r):
    g = torch.Generator().manual_seed(m * 1000 + k + r)
    x = (torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 8).to(dtype)
    smooth = (torch.rand(k, generator=g) * 2 + 0.05).to(dtype)
    down = (torch.randn(k, r, generator=g) / k**0.5).to(dtype) if r else None
    for s in (smooth, None):
        got = backend.quantize_act_host(x, s, down, fmt, layout)
        assert_same(got, ops.quantize_act_reference(x, s, down, fmt, layout))


@pytest.mark.parametrize("fmt,act_unsigned", [("int4", False), ("int4", True), ("nvfp4", False)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_group_amax_bit_exact(backend, fmt, act_unsigned, dtype):
    """One group per finite positive value v of the dtype: the group holds v, -v/2, v/3 and
    a spread of fractions of v (exercises the scale rounding of every amax, and the code
    rounding near each boundary). Unsigned: the same groups, shifted by the kernel (amax
    v + 0.171875, negative fractions clamping to 0)."""
    group = get_format(fmt).group_size
    bits = torch.arange(1, 0x7F80 if dtype == torch.bfloat16 else 0x7C00, dtype=torch.int32)
    v = bits.to(torch.int16).view(dtype).float()
    fractions = torch.linspace(-1, 1, group)
    fractions[0], fractions[1], fractions[2] = 1.0, -0.5, 1 / 3
    x = (v[:, None] * fractions[None, :]).to(dtype)
    got = backend.quantize_act_host(x, None, None, fmt, "canonical", act_unsigned)
    assert_same(got, ops.quantize_act_reference(x, None, None, fmt, "canonical", act_unsigned))


def _gelu_like(m, k, dtype, g):
    """GELU outputs (>= -0.16997, so x + 0.171875 > 0) with about 3% of the entries replaced by
    values below -0.171875 (which clamp to code 0) and one row of only such values."""
    x = torch.nn.functional.gelu(torch.randn(m, k, generator=g) * 3 * torch.rand(m, 1, generator=g))
    low = torch.rand(m, k, generator=g) < 0.03
    x = torch.where(low, -UNSIGNED_ACT_SHIFT - torch.rand(m, k, generator=g) * 2, x)
    if m > 2:
        x[m // 2] = -UNSIGNED_ACT_SHIFT - 0.25 - torch.rand(k, generator=g)
    return x.to(dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,r", [(1, 64, 0), (7, 192, 4), (33, 320, 32), (5, 1088, 13)])
def test_unsigned_int4_bit_exact(backend, layout, dtype, m, k, r):
    g = torch.Generator().manual_seed(m * 1000 + k + r + 7)
    x = _gelu_like(m, k, dtype, g)
    assert (x.float() < -UNSIGNED_ACT_SHIFT).any() or m == 1
    smooth = (torch.rand(k, generator=g) * 2 + 0.05).to(dtype)
    down = (torch.randn(k, r, generator=g) / k**0.5).to(dtype) if r else None
    for s in (smooth, None):
        got = backend.quantize_act_host(x, s, down, "int4", layout, True)
        want = ops.quantize_act_reference(x, s, down, "int4", layout, True)
        assert_same(got, want)
        if m > 2:  # the row below the shift: codes 0, positive scales
            assert (got[0][m // 2] == 0).all() and (got[1][m // 2].float() > 0).all()
    # lora_act is computed on the unshifted x: the same as with signed codes
    signed = backend.quantize_act_host(x, smooth, down, "int4", layout, False)
    assert torch.equal(got[2], signed[2])


def test_unsigned_int4_ties_zero_groups_and_clamping(backend):
    """float16 rows whose shifted values are exact: amax 15 makes the scale exactly 1 and
    u = k + 0.5 are ties (to the even code); a group of -0.171875 shifts to all zeros (scale 0,
    codes 0); a group entirely below the shift has a positive scale and codes 0; -0.0 and
    values just above -0.171875 give code 0 or 1 as the reference says."""
    shift = UNSIGNED_ACT_SHIFT
    ties = [k + 0.5 - shift for k in range(14)]
    rows = [
        [15 - shift, *ties, *([-shift] * 49)],
        [-shift] * 64,
        [-shift - 1 - i / 64 for i in range(64)],
        [-0.0, 0.0, -0.17, -0.1718, 1.0, -1.0, 0.5, 2.0] * 8,
    ]
    x = torch.tensor(rows, dtype=torch.float64).to(torch.float16)
    assert x.double().tolist()[0][:15] == [15 - shift, *ties]  # exact in float16
    for layout in LAYOUTS:
        got = backend.quantize_act_host(x, None, None, "int4", layout, True)
        assert_same(got, ops.quantize_act_reference(x, None, None, "int4", layout, True))
    q, s, _ = backend.quantize_act_host(x, None, None, "int4", "canonical", True)
    assert s[0].item() == 1.0 and s[1].item() == 0.0 and s[2].item() > 0
    codes = torch.stack([q & 0xF, q >> 4], -1).reshape(4, 64)
    assert codes[0, :15].tolist() == [15, 0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14]
    assert (codes[1] == 0).all() and (codes[2] == 0).all()


def test_nvfp4_ties_signs_and_zero_groups(backend):
    """amax 6 makes the block scale exactly 1: the E2M1 rounding boundaries 0.25 .. 5 are hit
    exactly (ties to the even code), -0.0 and small negatives keep the sign bit (code 8), an
    all-zero group gets scale 0, and groups past the saturation (amax > 2688) clamp at 448."""
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    row = [6.0, *ties, *[-t for t in ties], -0.0]
    rows = [
        row,
        [-0.0] * 16,
        [0.0] * 15 + [-0.0],
        [-0.1, 0.1, -0.2, 0.2] * 4,  # divided by scale 0.2/6: ties again, with signs
        [3000.0, -2999.0, 1.0, -1.0] * 4,
        [2.0**-20, -(2.0**-21), 2.0**-30, 0.0] * 4,  # e4m3 subnormal / zero scales
    ]
    for dtype in DTYPES:
        x = torch.tensor(rows, dtype=torch.float32).to(dtype)
        got = backend.quantize_act_host(x, None, None, "nvfp4", "split_halves")
        want = ops.quantize_act_reference(x, None, None, "nvfp4", "split_halves")
        assert_same(got, want)
        assert got[1][1].view(torch.uint8).tolist() == [0]  # all -0.0: scale 0, codes 8
        assert (got[0][1] == 0x88).all()


def test_int4_zero_groups_and_fp16_scale_overflow(backend):
    """A zero group has scale 0 and codes 0 (divisor 1); with smoothing, a float16 group whose
    amax / 7 exceeds 65504 gets an infinite scale and zero codes, as in the reference."""
    x = torch.zeros(3, 128, dtype=torch.float16)
    x[1] = torch.linspace(-60000, 60000, 128)
    x[2, :64] = -0.0
    smooth = torch.full((128,), 0.0625, dtype=torch.float16)  # xs up to 960000
    got = backend.quantize_act_host(x, smooth, None, "int4", "canonical")
    want = ops.quantize_act_reference(x, smooth, None, "int4", "canonical")
    assert_same(got, want)
    assert torch.isinf(got[1][1].float()).all() and (got[0][1] == 0).all()


def test_host_quantizer_rejects_bad_arguments(backend):
    from dcgen_quant import _C

    status = _C.quantize_act_host(fmt=_C.FORMAT_INT4, m=2, k=96, x_dtype=_C.DTYPE_BFLOAT16)
    assert status == _C.ERROR_INVALID_ARGUMENT
    assert "k = 96; expected a positive multiple of the int4 group size 64" in (
        _C.last_error_message()
    )
    status = _C.quantize_act_host(fmt=_C.FORMAT_INT4, m=2, k=64, x_dtype=_C.DTYPE_FLOAT32)
    assert status == _C.ERROR_INVALID_ARGUMENT and "x_dtype = 0" in _C.last_error_message()
    status = _C.quantize_act_host(fmt=_C.FORMAT_INT4, m=-1, k=64, x_dtype=_C.DTYPE_BFLOAT16)
    assert status == _C.ERROR_INVALID_ARGUMENT
    assert "m = -1; expected 0 <= m < 2^31" in _C.last_error_message()
    with pytest.raises(ValueError, match="unknown argument"):
        _C.quantize_act_host(fmt=0, m=1, k=64, not_a_field=1)
    status = _C.quantize_act_host(
        fmt=_C.FORMAT_INT4, act_unsigned=2, m=2, k=64, x_dtype=_C.DTYPE_BFLOAT16
    )
    assert status == _C.ERROR_INVALID_ARGUMENT
    assert "act_unsigned = 2; expected 0 or 1" in _C.last_error_message()
    status = _C.quantize_act_host(
        fmt=_C.FORMAT_NVFP4, act_unsigned=1, m=2, k=64, x_dtype=_C.DTYPE_BFLOAT16
    )
    assert status == _C.ERROR_INVALID_ARGUMENT
    assert "act_unsigned = 1 with fmt = 1 (nvfp4)" in _C.last_error_message()


def test_unsigned_nvfp4_is_a_value_error(backend):
    x = torch.randn(2, 64).to(torch.bfloat16)
    with pytest.raises(ValueError, match="unsigned activations exist for DCGQ_FORMAT_INT4"):
        backend.quantize_act_host(x, None, None, "nvfp4", "canonical", True)
