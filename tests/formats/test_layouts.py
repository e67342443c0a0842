"""Kernel layouts: every registered layout is a within-row bijection that round-trips."""

import pytest
import torch

from dcgen_quant.formats import pack_int4
from dcgen_quant.formats.layouts import from_layout, layout_names, to_layout
from dcgen_quant.formats.packing import unpack_nibbles


@pytest.mark.parametrize("layout", layout_names())
@pytest.mark.parametrize("fmt,k", [("int4", 64), ("int4", 192), ("nvfp4", 16), ("nvfp4", 208)])
def test_round_trip_and_rows_stay_put(layout, fmt, k):
    g = torch.Generator().manual_seed(k)
    packed = torch.randint(0, 256, (7, k // 2), generator=g, dtype=torch.uint8)
    laid = to_layout(packed, layout, fmt)
    assert laid.shape == packed.shape and laid.dtype == torch.uint8
    assert torch.equal(from_layout(laid, layout, fmt), packed)
    for row in range(7):  # a permutation inside each row: the multiset of nibbles is kept
        a = unpack_nibbles(laid[row]).sort().values
        b = unpack_nibbles(packed[row]).sort().values
        assert torch.equal(a, b)


def test_split_halves_puts_element_j_and_j_plus_half_in_byte_j():
    codes = torch.arange(64, dtype=torch.int64).remainder(16).to(torch.int8)[None]  # 0..15 x4
    laid = to_layout(pack_int4(codes), "split_halves", "int4")
    low, high = laid[0] & 0xF, laid[0] >> 4
    assert low.tolist() == [j % 16 for j in range(32)]
    assert high.tolist() == [(j + 32) % 16 for j in range(32)]


def test_unknown_layout_and_bad_k():
    p = torch.zeros(2, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="unknown layout 'tiles'"):
        to_layout(p, "tiles", "int4")
    with pytest.raises(ValueError, match="not a multiple of the group 64"):
        to_layout(torch.zeros(2, 16, dtype=torch.uint8), "split_halves", "int4")
