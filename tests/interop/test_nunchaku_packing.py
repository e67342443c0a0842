"""Nunchaku tile layouts (dcgen_quant/interop/nunchaku/packing.py): round trips on padded odd
shapes, and byte-for-byte goldens against DeepCompressor's ``NunchakuWeightPacker``."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from dcgen_quant.interop.nunchaku import packing as P

from .oracle import INSTALL_HINT, deepcompressor

# DeepCompressor's pad() indexes with a list (a torch deprecation warning, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")

# (N, K): padding in N and K (K % 128 == 64 and == 0), a 1-tile and a multi-tile case
SHAPES = [(200, 320), (130, 192), (256, 384), (72, 128)]
RANKS = [16, 32, 24]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _int4_codes(n, k, g):
    return torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)


def _e2m1_codes(n, k, g):
    return torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)


def _scales16(n, groups, g, dtype=torch.bfloat16):
    return (torch.rand(n, groups, generator=g) * 0.05 + 0.001).to(dtype)


def _fp8_scales(n, groups, g):
    # distinct e4m3 values, none of them 1.0 so that padding is visible
    return (torch.rand(n, groups, generator=g) * 300 + 2).to(torch.float8_e4m3fn)


def test_oracle_is_installed():
    assert importlib.util.find_spec("deepcompressor") is not None, INSTALL_HINT


# --------------------------------------------------------------------------------------------
# round trips (no oracle)


@pytest.mark.parametrize("n,k", SHAPES)
def test_qweight_round_trip(n, k):
    g = _gen(n + k)
    codes = _int4_codes(n, k, g)
    packed = P.pack_qweight(codes)
    assert packed.dtype == torch.int8 and packed.shape == (P.padded(n, 128), P.padded(k, 128) // 2)
    assert torch.equal(P.unpack_qweight(packed, n, k), codes)
    e2m1 = _e2m1_codes(n, k, g)
    assert torch.equal(P.unpack_qweight(P.pack_qweight(e2m1), n, k, signed=False), e2m1)
    # the canonical-nibble entry points are the same map
    nib = codes.view(torch.uint8) & 15
    canonical = nib[:, 0::2] | (nib[:, 1::2] << 4)
    assert torch.equal(P.pack_qweight_nibbles(canonical), packed)
    assert torch.equal(P.unpack_qweight_nibbles(packed, n, k), canonical)


@pytest.mark.parametrize("n,k", SHAPES)
def test_scales_and_vectors_round_trip(n, k):
    g = _gen(n * k)
    s = _scales16(n, k // 64, g)
    ws = P.pack_wscales(s)
    assert ws.shape == (P.padded(k, 128) // 64, P.padded(n, 128))
    assert torch.equal(P.unpack_wscales(ws, n, k // 64), s)
    v = torch.randn(n, generator=g).to(torch.float16)
    pv = P.pack_vector(v)
    assert pv.shape == (P.padded(n, 128),)
    assert torch.equal(P.unpack_vector(pv, n), v)
    # padding is 1, never 0 (smooth divides the activations)
    assert (pv.float() == 1).sum() >= P.padded(n, 128) - n
    f8 = _fp8_scales(n, k // 16, g)
    pf = P.pack_fp8_wscales(f8)
    assert pf.dtype == torch.float8_e4m3fn
    assert pf.shape == (P.padded(k, 128) // 16, P.padded(n, 128))
    assert torch.equal(P.unpack_fp8_wscales(pf, n, k // 16).view(torch.uint8), f8.view(torch.uint8))


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("r", RANKS)
def test_lowrank_round_trip(n, k, r):
    g = _gen(r)
    v = torch.randn(r, k, generator=g).to(torch.bfloat16)
    u = torch.randn(n, r, generator=g).to(torch.bfloat16)
    pd, pu = P.pack_lowrank_down(v), P.pack_lowrank_up(u)
    assert pd.shape == (P.padded(k, 128), P.padded(r, 16))
    assert pu.shape == (P.padded(n, 128), P.padded(r, 16))
    assert torch.equal(P.unpack_lowrank_down(pd, r, k), v)
    assert torch.equal(P.unpack_lowrank_up(pu, n, r), u)


@pytest.mark.parametrize("o,i,chunks", [(288, 320, 6), (96, 192, 3), (100, 64, 1)])
def test_awq_round_trip(o, i, chunks):
    g = _gen(o)
    q = torch.randint(0, 16, (o, i), generator=g, dtype=torch.uint8)
    packed = P.pack_awq_qweight(q)
    assert packed.dtype == torch.int32 and packed.shape == (o // 4, i // 2)
    assert torch.equal(P.unpack_awq_qweight(packed), q)
    s = _scales16(o, i // 64, g)
    ws, wz = P.pack_awq_scales(s), P.pack_awq_zeros(s)
    assert ws.shape == wz.shape == (P.padded(i // 64, 16), o)
    assert torch.equal(P.unpack_awq_scales(ws, i // 64), s)
    zp = P.awq_zero_points(P.unpack_awq_zeros(wz, i // 64), s)
    assert torch.equal(zp, torch.full_like(zp, 7.0))
    b = torch.randn(o, generator=g).to(torch.bfloat16)
    assert torch.equal(P.deinterleave_adanorm(P.interleave_adanorm(b, chunks), chunks), b)
    rows = torch.arange(o)
    stored = P.interleave_adanorm(rows, chunks)
    c, j = divmod(5, chunks)  # stored row c*S + j is logical row j*(O/S) + c
    assert int(stored[5]) == j * (o // chunks) + c
    if chunks == 1:
        with pytest.raises(ValueError, match="chunks"):
            P.fold_adanorm_bias(b, chunks)
        return
    # +1 folded on the scale chunks only, undone exactly where b + 1 is exact in 16 bits
    exact = torch.full((o,), 0.5, dtype=torch.bfloat16)
    folded = P.fold_adanorm_bias(exact, chunks)
    logical = P.deinterleave_adanorm(folded, chunks).float().reshape(chunks, -1)
    scale_rows = [1, 4] if chunks == 6 else [1]
    for j in range(chunks):
        assert torch.all(logical[j] == (1.5 if j in scale_rows else 0.5))
    assert torch.equal(P.unfold_adanorm_bias(folded, chunks), exact)


def test_bad_arguments():
    with pytest.raises(ValueError, match="shape"):
        P.unpack_qweight(torch.zeros(128, 64, dtype=torch.int8), 100, 300)
    with pytest.raises(ValueError, match="0..15"):
        P.pack_awq_qweight(torch.full((4, 64), 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="representable"):
        P.pack_fp8_wscales(torch.full((4, 4), 0.3, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="dtype"):
        P.pack_qweight(torch.zeros(4, 4, dtype=torch.int32))


# --------------------------------------------------------------------------------------------
# goldens against DeepCompressor's NunchakuWeightPacker


def _packer():
    utils, _, _ = deepcompressor()
    return utils.NunchakuWeightPacker(bits=4)


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_golden_qweight(n, k, fmt):
    packer, g = _packer(), _gen(7)
    codes = _int4_codes(n, k, g) if fmt == "int4" else _e2m1_codes(n, k, g)
    theirs = packer.pack_weight(packer.pad_weight(codes.to(torch.int32)))
    ours = P.pack_qweight(codes)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    assert torch.equal(P.unpack_qweight(theirs, n, k, signed=fmt == "int4"), codes)


@pytest.mark.parametrize("n,k", SHAPES)
def test_golden_int4_scales_and_vectors(n, k):
    packer, g = _packer(), _gen(8)
    s = _scales16(n, k // 64, g)
    theirs = packer.pack_scale(packer.pad_scale(s.reshape(n, 1, -1, 1), 64), 64)
    assert torch.equal(P.pack_wscales(s), theirs)
    assert torch.equal(P.unpack_wscales(theirs, n, k // 64), s)
    for dtype in (torch.bfloat16, torch.float16):
        v = torch.randn(n, generator=g).to(dtype)
        tv = packer.pack_scale(packer.pad_scale(v.reshape(-1, 1), -1), -1).reshape(-1)
        assert torch.equal(P.pack_vector(v), tv)
        assert torch.equal(P.unpack_vector(tv, n), v)


@pytest.mark.parametrize("n,k", SHAPES)
def test_golden_fp8_micro_scales(n, k):
    packer, g = _packer(), _gen(9)
    f8 = _fp8_scales(n, k // 16, g)
    groups_kernel = P.padded(k, 128) // 16
    # DeepCompressor pads the groups to a multiple of 4 only; the C++ GEMM_W4A4 allocates
    # Kp/16 rows. Feeding it scales already padded (with its own fill value, 1) to the kernel's
    # group count gives the kernel layout, which ours must equal byte for byte.
    padded_in = torch.ones(n, groups_kernel, dtype=torch.bfloat16)
    padded_in[:, : k // 16] = f8.to(torch.bfloat16)
    theirs = packer.pack_scale(packer.pad_scale(padded_in.reshape(n, 1, -1, 1), 16), 16)
    ours = P.pack_fp8_wscales(f8)
    assert torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8))
    assert torch.equal(P.unpack_fp8_wscales(theirs, n, k // 16).view(torch.uint8),
                       f8.view(torch.uint8))  # fmt: skip
    # ... and where K % 128 == 0 its own padding agrees, where K % 128 == 64 it does not
    own = packer.pack_scale(packer.pad_scale(f8.to(torch.bfloat16).reshape(n, 1, -1, 1), 16), 16)
    if k % 128 == 0:
        assert torch.equal(own.view(torch.uint8), ours.view(torch.uint8))
    else:
        assert own.shape[0] < groups_kernel


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("r", RANKS)
def test_golden_lowrank(n, k, r):
    packer, g = _packer(), _gen(10)
    v = torch.randn(r, k, generator=g).to(torch.bfloat16)
    u = torch.randn(n, r, generator=g).to(torch.float16)
    td = packer.pack_lowrank_weight(packer.pad_lowrank_weight(v, down=True), down=True)
    tu = packer.pack_lowrank_weight(packer.pad_lowrank_weight(u, down=False), down=False)
    assert torch.equal(P.pack_lowrank_down(v), td)
    assert torch.equal(P.pack_lowrank_up(u), tu)
    assert torch.equal(P.unpack_lowrank_down(td, r, k), v)
    assert torch.equal(P.unpack_lowrank_up(tu, n, r), u)
    # their unpacker agrees with ours on the padded logical tensors
    assert torch.equal(packer.unpack_lowrank_weight(td, down=True)[:r, :k], v)
    assert torch.equal(packer.unpack_lowrank_weight(tu, down=False)[:n, :r], u)


@pytest.mark.parametrize("o,i,chunks", [(288, 320, 6), (96, 192, 3), (100, 64, 1), (72, 1088, 6)])
def test_golden_awq(o, i, chunks):
    utils, _, _ = deepcompressor()
    g = _gen(11)
    c = torch.randint(-7, 9, (o, i), generator=g)  # q = c + 7 in 0..15
    s = _scales16(o, i // 64, g)
    w = (c.float().reshape(o, -1, 64) * s.float().unsqueeze(-1)).reshape(o, i).to(torch.bfloat16)
    b = torch.randn(o, generator=g).to(torch.bfloat16)
    tq, ts, tz, tb = utils.convert_to_nunchaku_w4x16_linear_weight(
        w, s.reshape(o, 1, -1, 1), bias=b.clone(), adanorm_splits=chunks
    )
    q = P.interleave_adanorm((c + 7).to(torch.uint8), chunks)
    assert torch.equal(P.pack_awq_qweight(q), tq)
    si = P.interleave_adanorm(s, chunks)
    assert torch.equal(P.pack_awq_scales(si), ts)
    assert torch.equal(P.pack_awq_zeros(si), tz)
    expect_bias = P.fold_adanorm_bias(b, chunks) if chunks > 1 else b
    assert torch.equal(expect_bias, tb)
    # unpack inverts theirs
    groups = i // 64
    assert torch.equal(P.deinterleave_adanorm(P.unpack_awq_qweight(tq), chunks).long(), c + 7)
    assert torch.equal(P.deinterleave_adanorm(P.unpack_awq_scales(ts, groups), chunks), s)
    zp = P.awq_zero_points(P.unpack_awq_zeros(tz, groups), P.unpack_awq_scales(ts, groups))
    assert torch.equal(zp, torch.full_like(zp, 7.0))
