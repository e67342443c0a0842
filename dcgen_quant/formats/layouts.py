"""Kernel layouts of packed 4-bit tensors, and the conversions to and from the canonical one.

Checkpoints and the references use the *canonical* layout (packing.py: element 2i in the low
nibble of byte i). A kernel may prefer another order of the nibbles inside each row, e.g. so
that it unpacks without shuffles; it registers that order here as a named layout, as two pure
torch functions, and the ops take a ``layout`` argument naming the order of *both* the packed
activations and the packed weight. Conversions happen once, at load time, for weights
(:meth:`dcgen_quant.nn.SVDQLinear.set_layout`); activations are written directly in the layout
by the backend's ``quantize_act``.

A layout is a bijection on ``[rows, K/2]`` uint8 tensors that keeps each row's bytes in that row
(so that it serves activations with any number of rows M) and may depend on the format's group
size. docs/KERNELS.md documents each registered layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import get_format

CANONICAL = "canonical"

Converter = Callable[[torch.Tensor, int], torch.Tensor]  # (packed [rows, K/2], group) -> same


@dataclass(frozen=True)
class Layout:
    """A named nibble order: ``to_layout`` from canonical, ``from_layout`` back."""

    name: str
    to_layout: Converter
    from_layout: Converter
    description: str


_LAYOUTS: dict[str, Layout] = {}


def register_layout(layout: Layout) -> None:
    """Add a layout (kernel modules call this at import; names must be unique)."""
    if layout.name in _LAYOUTS and _LAYOUTS[layout.name] != layout:
        raise ValueError(f"layout {layout.name!r} is already registered")
    _LAYOUTS[layout.name] = layout


def get_layout(name: str) -> Layout:
    try:
        return _LAYOUTS[name]
    except KeyError:
        raise ValueError(
            f"unknown layout {name!r}; registered: {', '.join(sorted(_LAYOUTS))}"
        ) from None


def layout_names() -> list[str]:
    return sorted(_LAYOUTS)


def _check_packed(packed: torch.Tensor, group: int, name: str) -> None:
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(
            f"{name}: packed codes must be 2-D uint8, got {packed.dtype} {tuple(packed.shape)}"
        )
    if (packed.shape[1] * 2) % group:
        raise ValueError(f"{name}: K={packed.shape[1] * 2} is not a multiple of the group {group}")


def to_layout(packed: torch.Tensor, layout: str, fmt: str) -> torch.Tensor:
    """Canonical ``[rows, K/2]`` uint8 -> ``layout``."""
    if layout == CANONICAL:
        return packed
    group = get_format(fmt).group_size
    _check_packed(packed, group, f"to_layout({layout!r})")
    return get_layout(layout).to_layout(packed, group)


def from_layout(packed: torch.Tensor, layout: str, fmt: str) -> torch.Tensor:
    """``layout`` ``[rows, K/2]`` uint8 -> canonical."""
    if layout == CANONICAL:
        return packed
    group = get_format(fmt).group_size
    _check_packed(packed, group, f"from_layout({layout!r})")
    return get_layout(layout).from_layout(packed, group)


register_layout(
    Layout(CANONICAL, lambda p, g: p, lambda p, g: p, "element 2i low nibble, 2i+1 high nibble")
)


# ---------------------------------------------------------------------------------------------
# Kernel layouts. Each is a permutation of the K codes of a row within every group, expressed
# as an index vector `perm` of length G: position j of the laid-out group holds canonical
# element perm[j]; the bytes are then packed canonically (2j low, 2j+1 high).


def _permute_groups(packed: torch.Tensor, group: int, perm: torch.Tensor) -> torch.Tensor:
    from .packing import pack_nibbles, unpack_nibbles

    rows, half_k = packed.shape
    codes = unpack_nibbles(packed).reshape(rows, (2 * half_k) // group, group)
    return pack_nibbles(codes[:, :, perm.to(codes.device)].reshape(rows, 2 * half_k))


def permutation_layout(
    name: str, perm_for_group: Callable[[int], torch.Tensor], description: str
) -> Layout:
    """A layout that reorders the codes inside each group by ``perm_for_group(G)``."""

    def forward(p: torch.Tensor, g: int) -> torch.Tensor:
        return _permute_groups(p, g, perm_for_group(g))

    def inverse(p: torch.Tensor, g: int) -> torch.Tensor:
        return _permute_groups(p, g, torch.argsort(perm_for_group(g)))

    return Layout(name, forward, inverse, description)


def _split_halves(group: int) -> torch.Tensor:
    # byte j of a group holds elements j (low nibble) and j + G/2 (high nibble)
    half = group // 2
    return torch.stack((torch.arange(half), torch.arange(half) + half), dim=1).flatten()


register_layout(
    permutation_layout(
        "split_halves",
        _split_halves,
        "within each group of G codes, byte j holds element j (low) and j + G/2 (high): "
        "unpacking the low nibbles of G/2 bytes gives the first half of the group, the high "
        "nibbles the second half, with no interleave",
    )
)
