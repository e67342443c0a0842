"""quantize_act kernel (interpreter): bit-exact codes and scales against the pure-torch reference,
lora_act within the accuracy rule, every layout, edge cases of both formats and of unsigned
INT4 (act_unsigned)."""

from __future__ import annotations

import pytest
import torch

from dcgen_quant import kernels, ops
from dcgen_quant.formats import UNSIGNED_ACT_SHIFT, get_format
from dcgen_quant.formats.layouts import CANONICAL, from_layout

from .accuracy import assert_within_reference_error

pytestmark = pytest.mark.interpreter

FMTS = ["int4", "nvfp4"]
LAYOUTS = [CANONICAL, "split_halves"]
# (M, K, r): every M in {1, 3, 97, 256} and K in {64, 128, 3072}; r = 0 means no lora_down
SHAPES = [(1, 64, 32), (3, 128, 0), (97, 3072, 32), (256, 128, 8)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def on(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def assert_bit_exact(x, smooth, down, fmt, layout, what, device="cpu", act_unsigned=False):
    """Run the kernel on ``device``; compare with the reference on CPU. Returns (q, scales)."""
    q, s, la = kernels.quantize_act(*on(device, x, smooth, down), fmt, layout, act_unsigned)
    q, s, la = q.cpu(), s.cpu(), la.cpu()
    q_ref, s_ref, la_ref = ops.quantize_act_reference(x, smooth, down, fmt, CANONICAL, act_unsigned)
    m, k = x.shape
    assert q.shape == (m, k // 2) and q.dtype == torch.uint8
    assert s.dtype == s_ref.dtype and s.shape == s_ref.shape
    canonical = from_layout(q, layout, fmt)
    bad = (canonical != q_ref).sum().item()
    assert bad == 0, f"{what}: {bad} of {q.numel()} code bytes differ from the reference"
    bad = (_bits(s) != _bits(s_ref)).sum().item()
    assert bad == 0, f"{what}: {bad} of {s.numel()} scales differ bitwise from the reference"
    r = 0 if down is None else down.shape[1]
    assert la.shape == (m, r) and la.dtype == torch.float32
    if r:
        truth = x.double() @ down.double()
        assert_within_reference_error(la, la_ref, truth, f"{what} lora_act")
    return q, s


def random_inputs(m, k, r, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * torch.exp(torch.randn(m, 1, generator=g))).to(dtype)
    smooth = (torch.rand(k, generator=g) * 2 + 0.25).to(dtype)
    down = (torch.randn(k, r, generator=g) / k**0.5).to(dtype) if r else None
    return x, smooth, down


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("m,k,r", SHAPES)
def test_quantize_act_bit_exact(m, k, r, fmt, layout, dtype, device):
    x, smooth, down = random_inputs(m, k, r, dtype, seed=m * 7 + k + r)
    if r == 0:
        smooth = None  # also covers the path without smoothing
    what = f"{fmt}/{layout}/{dtype} M={m} K={k} r={r}"
    assert_bit_exact(x, smooth, down, fmt, layout, what, device)


def edge_case_inputs(fmt: str, dtype: torch.dtype) -> torch.Tensor:
    """Rows of groups that hit every special case of the format's rounding contract."""
    group = get_format(fmt).group_size
    g = torch.Generator().manual_seed(3)
    groups = []
    if fmt == "int4":
        # amax 7 -> scale exactly 1: x / s lands on ties k + 0.5 (round half to even)
        ties = torch.tensor([7.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -3.5, 6.5, -7.0])
        groups.append(ties.repeat(group)[:group])
        groups.append(torch.full((group,), 1e-30))  # fp16: amax / 7 -> scale 0 -> codes 0
        groups.append((torch.rand(group, generator=g) * 2 - 1) * 6e4)  # large, finite in fp16
        # tiny scales (below 2**-90: the kernel's exact 2**64 pre-scaling): ties and values
        # one ulp of x.dtype off the ties, where a quotient wrong by one ulp changes the code
        ulp = 2.0**-23 if dtype == torch.float32 else 2.0**-7
        off = torch.randint(-1, 2, (group,), generator=g).float()
        off[0] = 0.0  # keeps amax = 7 * 2**-120, so that the scale is exactly 2**-120
        groups.append(groups[0] * 2.0**-110)
        groups.append(groups[0] * (1 + ulp * off) * 2.0**-120)
        groups.append(groups[0] * (1 + ulp * off.roll(1)) * 2.0**-125)
        groups.append(torch.randn(group, generator=g) * 1e-35)
    else:
        # amax 6 -> block scale exactly 1: the values are the E2M1 rounding boundaries
        ties = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -5.0])
        groups.append(ties.repeat(group)[:group])
        groups.append(torch.randn(group, generator=g) * 0.02)  # E4M3 subnormal scales
        groups.append(torch.randn(group, generator=g) * 1e-4)  # scale rounds to 0: x * 0
        groups.append(torch.randn(group, generator=g) * 5e3)  # amax / 6 > 448: saturation
        groups.append(-torch.rand(group, generator=g) * 1e-3 - 3.0)  # negatives -> 0 get code 8
    groups.append(torch.zeros(group))
    groups.append(torch.full((group,), -0.0))
    groups.append(torch.randn(group, generator=g))
    mixed = torch.randn(group, generator=g)
    mixed[0::4] = -0.0  # -0.0 and tiny values inside a group with a normal scale
    mixed[1::4] = 1e-30 * torch.sign(torch.randn(group // 4, generator=g))
    groups.append(mixed)
    row = torch.cat(groups)
    rows = [row, row.roll(group), -row, row * 0.37]
    return torch.stack(rows).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fmt", FMTS)
def test_quantize_act_edge_cases(fmt, layout, dtype, device):
    x = edge_case_inputs(fmt, dtype)
    assert_bit_exact(x, None, None, fmt, layout, f"{fmt}/{layout}/{dtype} edge cases", device)
    # the same through the smoothing division (smooth = 2 keeps the ties exact)
    smooth = torch.full((x.shape[1],), 2.0, dtype=dtype)
    down = torch.randn(x.shape[1], 3, generator=torch.Generator().manual_seed(0)).to(dtype)
    what = f"{fmt}/{layout}/{dtype} edge cases smoothed"
    assert_bit_exact(x, smooth, down, fmt, layout, what, device)


def gelu_inputs(m, k, r, dtype, seed):
    """GELU outputs (>= -0.16997, the input of a FeedForward's second linear) with a per-row
    scale, plus about 2% of values below -UNSIGNED_ACT_SHIFT (shifted negative: code 0) and a
    few exactly at it (shifted to 0); smooth and lora_down as in :func:`random_inputs`."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(m, k, generator=g) * torch.exp(torch.randn(m, 1, generator=g))
    x = torch.nn.functional.gelu(h, approximate="tanh")
    below = torch.rand(m, k, generator=g) < 0.02
    x = torch.where(below, -UNSIGNED_ACT_SHIFT - torch.rand(m, k, generator=g), x)
    x[:, 5::97] = -UNSIGNED_ACT_SHIFT
    x[:, 7::61] = -UNSIGNED_ACT_SHIFT - 0.5  # at least one below the shift in every row
    smooth = (torch.rand(k, generator=g) * 2 + 0.25).to(dtype)
    down = (torch.randn(k, r, generator=g) / k**0.5).to(dtype) if r else None
    return x.to(dtype), smooth, down


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("m,k,r", SHAPES)
def test_quantize_act_unsigned_bit_exact(m, k, r, layout, dtype, device):
    x, smooth, down = gelu_inputs(m, k, r, dtype, seed=m * 5 + k + r)
    assert (x < -UNSIGNED_ACT_SHIFT).any(dim=1).all()
    if r == 0:
        smooth = None
    what = f"unsigned int4/{layout}/{dtype} M={m} K={k} r={r}"
    q, _ = assert_bit_exact(x, smooth, down, "int4", layout, what, device, act_unsigned=True)
    codes = from_layout(q, layout, "int4")
    assert max((codes & 15).max(), (codes >> 4).max()) == 15  # the unsigned range is used


def unsigned_edge_inputs(dtype: torch.dtype) -> torch.Tensor:
    """Rows of 64-groups that hit the special cases of unsigned INT4 after the shift."""
    g = torch.Generator().manual_seed(5)
    shift = UNSIGNED_ACT_SHIFT
    # u = x + shift with amax 15 -> scale exactly 1: u on the ties k + 0.5 (exact in fp16 / fp32)
    ties = torch.tensor([15.0, 0.5, 1.5, 2.5, 3.5, 6.5, 7.5, 8.5, 13.5, 14.5, 0.25, 15.0])
    groups = [ties.repeat(6)[:64] - shift]
    groups.append(torch.full((64,), -shift))  # u = 0 everywhere: scale 0, codes 0
    groups.append(-shift - torch.rand(64, generator=g) * 3)  # all u < 0: amax = max |u|, codes 0
    mixed = torch.nn.functional.gelu(torch.randn(64, generator=g) * 2)
    mixed[::3] = -shift - torch.rand(22, generator=g) * 4  # |u| of a negative sets the amax
    groups.append(mixed)
    # x just around -shift: tiny u of both signs (fp16 scales go subnormal)
    near = torch.randint(-3, 4, (64,), generator=g).float()
    groups.append(-shift * (1 + near * (2.0**-10 if dtype == torch.bfloat16 else 2.0**-20)))
    groups.append((torch.rand(64, generator=g) - 0.05) * 6e4)  # large, finite in fp16
    groups.append(torch.zeros(64))
    groups.append(torch.full((64,), -0.0))
    groups.append(torch.nn.functional.gelu(torch.randn(64, generator=g)))
    row = torch.cat(groups)
    rows = [row, row.roll(64), row * 0.37, row.flip(0)]
    return torch.stack(rows).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_quantize_act_unsigned_edge_cases(layout, dtype, device):
    x = unsigned_edge_inputs(dtype)
    k = x.shape[1]
    what = f"unsigned {layout}/{dtype} edge cases"
    assert_bit_exact(x, None, None, "int4", layout, what, device, act_unsigned=True)
    # through the smoothing division: 2 keeps the ties exact; a huge power of two gives scales
    # below 2**-90 (the kernel's exact 2**64 pre-scaling; fp16 cannot hold 2**100, so 2**15)
    down = torch.randn(k, 3, generator=torch.Generator().manual_seed(0)).to(dtype)
    huge = 2.0**15 if dtype == torch.float16 else 2.0**100
    for value in (2.0, huge):
        smooth = torch.full((k,), value, dtype=dtype)
        smooth[64 * 3 : 64 * 4] = 0.5  # one group with a different smoothing
        what = f"unsigned {layout}/{dtype} edge cases smoothed by {value}"
        assert_bit_exact(x, smooth, down, "int4", layout, what, device, act_unsigned=True)


def test_quantize_act_strided_input_and_rank_16(device):
    x, smooth, down = random_inputs(33, 256, 16, torch.bfloat16, seed=11)
    wide = torch.zeros(33, 512, dtype=torch.bfloat16, device=device)
    wide[:, ::2] = x.to(device)
    strided = wide[:, ::2]  # stride (512, 2)
    assert not strided.is_contiguous()
    for fmt in FMTS:
        q, s = assert_bit_exact(
            strided, smooth, down, fmt, "split_halves", f"{fmt} strided", device
        )
        q2, s2, _ = kernels.quantize_act(*on(device, x, smooth, down), fmt, "split_halves")
        assert torch.equal(q, q2.cpu())


def test_quantize_act_unsupported_calls_raise(device):
    x, smooth, down = on(device, *random_inputs(4, 64, 4, torch.bfloat16, seed=0))
    with pytest.raises(ops.BackendUnsupported, match="layout 'tiles'"):
        kernels.quantize_act(x, smooth, down, "int4", "tiles")
    big = torch.zeros(64, 300, dtype=torch.bfloat16, device=device)
    with pytest.raises(ops.BackendUnsupported, match="r=300"):
        kernels.quantize_act(x, smooth, big, "int4", CANONICAL)
    with pytest.raises(ValueError, match="unsigned activations exist for int4 only"):
        kernels.quantize_act(x, smooth, down, "nvfp4", CANONICAL, True)
