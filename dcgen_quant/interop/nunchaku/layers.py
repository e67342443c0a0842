"""Nunchaku layers in logical form, and how they become our layers' tensors, exactly.

Both readers (the Nunchaku file and DeepCompressor's raw folder) produce these records, unpacked
and unpadded but with Nunchaku's meaning (NUNCHAKU_FORMAT.md sections 1.2, 1.3, 2.8, 3); the
builders here turn them into the buffers of :class:`~dcgen_quant.nn.SVDQLinear` and
:class:`~dcgen_quant.nn.W4A16Linear` without changing a value:

* W4A4: ``qweight`` = the codes in our canonical nibble order, ``wscales`` = the transposed
  scales, ``smooth_factor`` = ``smooth`` (never ``smooth_orig``), ``proj_down`` = ``lora_downᵀ``
  (both act on the raw input: Nunchaku's convention is ours), ``proj_up`` = ``lora_up``, ``bias``
  as stored (for INT4 GELU-input layers it already absorbs the +0.171875 shift, as our
  ``act_unsigned`` bias does). NVFP4's per-tensor ``wtscale`` and per-channel ``wcscales``
  become our float32 ``wtscale``, one per output range that has a constant ``wcscales`` (the
  members of a fused q/k/v), ``wtscale · wcscales`` in float32 (exact: both are 16-bit).
* AWQ W4A16 (adaLN): the stored unsigned code ``q`` with zero point ``zp`` (``wzeros`` is
  ``-zp·s`` rounded to 16 bits) is our signed code ``q - zp``; the rows are de-interleaved, and
  the ``+1`` folded into the scale chunks' bias is taken out again (diffusers adds it back).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...formats.packing import pack_nibbles
from ..safetensors_io import ForeignFormatError


@dataclass
class W4A4:
    """One Nunchaku W4A4 linear, unpacked and unpadded (N outputs, K inputs, R rank).

    qweight : [N, K/2] uint8, the codes in our canonical nibble order (INT4 two's complement,
        or NVFP4 E2M1 codes)
    wscales : [N, K/G]; 16-bit (INT4, G=64) or float8_e4m3fn (NVFP4, G=16)
    wtscale : [] float32 or None (NVFP4 per-tensor scale, the stored 16-bit value)
    wcscales : [N] 16-bit or None (per-output-channel scale)
    bias, smooth : [N], [K] 16-bit
    lora_down : [R, K]; lora_up : [N, R]   16-bit
    act_unsigned : INT4 layer whose input Nunchaku quantizes as unsigned codes of x + 0.171875
    """

    name: str
    fmt: str
    qweight: Tensor | None  # None in a "light" record (low-rank, bias and scales only)
    wscales: Tensor | None
    wtscale: Tensor | None
    wcscales: Tensor | None
    bias: Tensor
    smooth: Tensor
    lora_down: Tensor
    lora_up: Tensor
    act_unsigned: bool

    @property
    def rank(self) -> int:
        """The rank without trailing all-zero columns (Nunchaku pads the rank to 16)."""
        r = self.lora_down.shape[0]
        while r > 0 and not (
            bool(self.lora_down[r - 1].any()) or bool(self.lora_up[:, r - 1].any())
        ):
            r -= 1
        return r

    def member_wtscales(self, sizes: list[int]) -> list[Tensor | None]:
        """Our float32 ``wtscale`` for each output range of ``sizes`` (None for INT4).

        ``wcscales`` must be constant within each range (DeepCompressor writes one value per
        q/k/v member); otherwise no scalar tensor scale holds it exactly and ForeignFormatError
        names the key.
        """
        if self.fmt != "nvfp4":
            return [None] * len(sizes)
        base = self.wtscale.float() if self.wtscale is not None else torch.ones(())
        if self.wcscales is None:
            return [base.clone() for _ in sizes]
        out, start = [], 0
        for n in sizes:
            chunk = self.wcscales[start : start + n]
            if not bool((chunk == chunk[0]).all()):
                raise ForeignFormatError(
                    f"tensor {self.name + '.wcscales'!r} varies within output rows "
                    f"{start}..{start + n - 1}: a "
                    "per-channel weight scale that is not constant per q/k/v member cannot be "
                    "imported exactly (not supported yet)"
                )
            out.append((base * chunk[0].float()).reshape(()))
            start += n
        return out


@dataclass
class AWQ:
    """One Nunchaku AWQ W4A16 (adaLN) linear, in diffusers' row order.

    codes : [O, I] int8, signed (stored code minus the zero point), in -8..7
    wscales : [O, I/64] 16-bit
    bias : [O] 16-bit, our bias: the stored one de-interleaved, the folded +1 taken out of the
        scale chunks (``packing.unfold_adanorm_bias``)
    """

    name: str
    codes: Tensor
    wscales: Tensor
    bias: Tensor


# --------------------------------------------------------------------------------------------
# logical -> our buffers


def svdq_tensors(
    layer: W4A4, start: int, stop: int, rank: int, wtscale: Tensor | None
) -> dict[str, Tensor]:
    """Buffers of the SVDQLinear holding output rows ``start:stop`` of ``layer``.

    ``rank`` keeps the first ``rank`` low-rank columns (the rest are zero padding).
    """
    out = {
        "qweight": layer.qweight[start:stop].contiguous(),
        "wscales": layer.wscales[start:stop].t().contiguous(),
        "bias": layer.bias[start:stop].clone(),
        "smooth_factor": layer.smooth.clone(),
        "proj_down": layer.lora_down[:rank].t().contiguous(),
        "proj_up": layer.lora_up[start:stop, :rank].contiguous(),
    }
    if wtscale is not None:
        out["wtscale"] = wtscale.to(torch.float32).reshape(())
    return out


def merged_svdq_tensors(parts: list[W4A4], rank: int, wtscale: Tensor | None) -> dict[str, Tensor]:
    """One SVDQLinear over the concatenated inputs of ``parts`` (see :func:`mergeable`)."""
    nonzero = [p for p in parts if bool((p.bias != 0).any())]
    bias = nonzero[0].bias if nonzero else parts[0].bias
    out = {
        "qweight": torch.cat([p.qweight for p in parts], dim=1),
        "wscales": torch.cat([p.wscales for p in parts], dim=1).t().contiguous(),
        "bias": bias.clone(),
        "smooth_factor": torch.cat([p.smooth for p in parts]),
        "proj_down": torch.cat([p.lora_down[:rank] for p in parts], dim=1).t().contiguous(),
        "proj_up": parts[0].lora_up[:, :rank].contiguous(),
    }
    if wtscale is not None:
        out["wtscale"] = wtscale.to(torch.float32).reshape(())
    return out


def mergeable(parts: list[W4A4], wtscales: list[Tensor | None]) -> bool:
    """Whether column parts (a FLUX single block's out_proj + mlp_fc2) are one layer exactly.

    True when they are one signed layer cut at a group boundary, as our exporter writes an
    unsplit NVFP4 ``proj_out``: same format, signed, one low-rank up projection, one tensor
    scale, at most one nonzero bias (the other all zeros). Then the sum of the parts is that
    layer's output, term by term.
    """
    first = parts[0]
    if any(p.act_unsigned or p.fmt != first.fmt for p in parts):
        return False
    if any(not torch.equal(p.lora_up, first.lora_up) for p in parts[1:]):
        return False
    if any(
        (a is None) != (b is None) or (a is not None and not torch.equal(a, b))
        for a, b in zip(wtscales[1:], wtscales)
    ):
        return False
    return sum(bool((p.bias != 0).any()) for p in parts) <= 1


def w4a16_tensors(layer: AWQ) -> dict[str, Tensor]:
    """Buffers of the W4A16Linear for an adaLN layer (the +1 unfolded)."""
    return {
        "qweight": pack_nibbles(layer.codes),
        "wscales": layer.wscales.t().contiguous(),
        "bias": layer.bias.clone(),
    }
