"""Read a Nunchaku FLUX checkpoint (v1.0 single file or legacy folder) strictly, layer by layer.

Every tensor the schema (NUNCHAKU_FORMAT.md section 1) requires must be present with its exact
shape and dtype, and no other tensor may be: Nunchaku's C++ loader silently skips missing keys;
this reader names the first bad key in a one-line :class:`ForeignFormatError`. Tensors are read
lazily (``safe_open``), so a block at a time is in memory. The unpacking itself is
:mod:`.packing`'s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..safetensors_io import DTYPES, ForeignFormatError, Header, TensorInfo, finite, read_header
from . import flux, packing
from .layers import AWQ, W4A4

LEGACY_BLOCKS = "transformer_blocks.safetensors"
LEGACY_OTHER = "unquantized_layers.safetensors"
SIXTEEN = ("BF16", "F16")
_BLOCK_PREFIXES = (flux.DOUBLE + ".", flux.SINGLE + ".")
_SANA_MARKERS = (".inverted_conv.", ".point_conv.", ".cross_attn.", ".depth_conv.")


def is_block_key(key: str) -> bool:
    return key.startswith(_BLOCK_PREFIXES)


class NunchakuSource:
    """A Nunchaku FLUX checkpoint opened for reading.

    Parameters
    ----------
    path : ``*.safetensors`` (v1.0 single file) or a folder with ``transformer_blocks.safetensors``
        and ``unquantized_layers.safetensors`` (legacy)
    config : the diffusers transformer config (dict, JSON string or file), overriding the file's
        own (``config`` metadata, or the legacy folder's ``config.json``); inferred from the
        tensor shapes when neither exists

    Attributes
    ----------
    kind : "nunchaku" or "nunchaku-legacy"; fmt : "int4" | "nvfp4"; dtype : the 16-bit dtype;
    config : dict; metadata : the single file's safetensors metadata ({} for a folder)
    """

    def __init__(self, path: str | Path, config: Any = None):
        self.path = Path(path)
        if self.path.is_dir():
            self.kind = "nunchaku-legacy"
            files = [self.path / LEGACY_BLOCKS, self.path / LEGACY_OTHER]
            for f in files:
                if not f.is_file():
                    raise ForeignFormatError(f"{self.path}: legacy Nunchaku folder lacks {f.name}")
        else:
            self.kind = "nunchaku"
            files = [self.path]
        self.headers: list[Header] = [read_header(f) for f in files]
        self.index: dict[str, tuple[int, TensorInfo]] = {}
        for i, header in enumerate(self.headers):
            for key, info in header.tensors.items():
                if key in self.index:
                    raise ForeignFormatError(f"{self.path}: tensor {key!r} appears twice")
                self.index[key] = (i, info)
        self.metadata = self.headers[0].metadata if self.kind == "nunchaku" else {}
        self._handles: dict[int, Any] = {}
        self.used: set[str] = set()
        self._check_family()
        self.fmt = self._precision()
        self.dtype = self._dtype()
        self.config = self._config(config)

    # ---------------------------------------------------------------- what the file is

    def _check_family(self) -> None:
        if not any(is_block_key(k) for k in self.index):
            raise ForeignFormatError(
                f"{self.path}: no transformer block tensors (not a Nunchaku FLUX file)"
            )
        sana = next((k for k in self.index if any(m in k for m in _SANA_MARKERS)), None)
        if sana is not None or "Sana" in self.metadata.get("model_class", ""):
            raise ForeignFormatError(
                f"{self.path}: a Nunchaku SANA checkpoint (e.g. {sana!r}); importing SANA is not "
                "supported yet (its layout is not verified, docs/INTEROP.md)"
            )

    def _precision(self) -> str:
        """int4 / nvfp4 from the W4A4 ``wscales`` dtypes, cross-checked with the metadata."""
        awq = tuple(f".{a.name}.wscales" for s in flux.SPECS.values() for a in s.awq)
        kinds = {}
        for key, (_, info) in self.index.items():
            if key.endswith(".wscales") and is_block_key(key) and not key.endswith(awq):
                kinds.setdefault(info.dtype, key)
        if "U8" in kinds or self._quant_config_says_mx():
            key = kinds.get("U8", next(iter(kinds.values()), "wscales"))
            raise ForeignFormatError(
                f"{self.path}: MXFP4 checkpoint (UE8M0 uint8 scales, group 32, e.g. {key!r}; "
                "auto-round's svdquant_nunchaku export): not supported (upstream Nunchaku has no "
                "MXFP4 either)"
            )
        fmts = {"F8_E4M3": "nvfp4", "BF16": "int4", "F16": "int4"}
        for dtype, key in kinds.items():
            if dtype not in fmts:
                raise ForeignFormatError(
                    f"tensor {key!r} has dtype {dtype}: W4A4 wscales are 16-bit (INT4) or "
                    "F8_E4M3 (NVFP4)"
                )
        found = {fmts[d] for d in kinds}
        if len(found) != 1:
            raise ForeignFormatError(
                f"{self.path}: mixes INT4 and NVFP4 layers ({', '.join(kinds.values())})"
            )
        fmt = found.pop()
        declared = self._declared_fmt()
        if declared is not None and declared != fmt:
            raise ForeignFormatError(
                f"{self.path}: metadata quantization_config says {declared}, the tensors are {fmt}"
            )
        return fmt

    def _quant_config(self) -> dict:
        raw = self.metadata.get("quantization_config")
        if raw is None:
            return {}
        try:
            q = json.loads(raw)
        except json.JSONDecodeError:
            raise ForeignFormatError(
                f"{self.path}: metadata 'quantization_config' is not valid JSON"
            ) from None
        return q if isinstance(q, dict) else {}

    def _quant_config_says_mx(self) -> bool:
        w = self._quant_config().get("weight") or {}
        return w.get("scale_dtype") == "ue8m0" or w.get("group_size") == 32

    def _declared_fmt(self) -> str | None:
        w = self._quant_config().get("weight") or {}
        return {"int4": "int4", "fp4_e2m1_all": "nvfp4"}.get(w.get("dtype"))

    def _dtype(self) -> torch.dtype:
        found = {}
        for key, (_, info) in self.index.items():
            if is_block_key(key) and key.endswith(".bias") and info.dtype in SIXTEEN:
                found.setdefault(info.dtype, key)
        if len(found) != 1:
            raise ForeignFormatError(
                f"{self.path}: block biases must all be bf16 or all fp16, found "
                f"{sorted(found) or 'none'}"
            )
        return DTYPES[next(iter(found))]

    def _config(self, given: Any) -> dict:
        if given is not None:
            return flux.parse_config(given, "given config")
        if self.kind == "nunchaku" and "config" in self.metadata:
            return flux.parse_config(self.metadata["config"], f"{self.path} metadata 'config'")
        if self.kind == "nunchaku-legacy" and (self.path / "config.json").is_file():
            return flux.parse_config(self.path / "config.json", str(self.path / "config.json"))
        shapes = {k: info.shape for k, (_, info) in self.index.items()}
        return flux.infer_config(shapes, [k for k in self.index if is_block_key(k)])

    # ---------------------------------------------------------------- tensors

    def info(self, key: str) -> TensorInfo | None:
        hit = self.index.get(key)
        return hit[1] if hit else None

    def tensor(self, key: str) -> Tensor:
        """The tensor ``key``, read with plain file reads (aligned, not memory-mapped)."""
        if key not in self.index:
            raise ForeignFormatError(f"{self.path}: tensor {key!r} is missing")
        i, _ = self.index[key]
        if i not in self._handles:
            self._handles[i] = open(self.headers[i].path, "rb")  # noqa: SIM115 (kept open)
        self.used.add(key)
        return self.headers[i].read(self._handles[i], key)

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()

    def _get(self, key: str, shape: tuple[int, ...], dtypes: tuple[str, ...], what: str) -> Tensor:
        info = self.info(key)
        if info is None:
            raise ForeignFormatError(f"{self.path}: tensor {key!r} ({what}) is missing")
        if info.shape != tuple(shape) or info.dtype not in dtypes:
            raise ForeignFormatError(
                f"tensor {key!r} is {info.dtype} {list(info.shape)}, expected "
                f"{'/'.join(dtypes)} {list(shape)} ({what})"
            )
        t = self.tensor(key)
        if not finite(t):
            raise ForeignFormatError(f"tensor {key!r} holds NaN or Inf values")
        return t

    def _rank(self, prefix: str) -> int:
        """The stored rank (columns of lora_down and lora_up; a multiple of 16)."""
        shapes = {}
        for part in ("lora_down", "lora_up"):
            key, info = f"{prefix}.{part}", self.info(f"{prefix}.{part}")
            if info is None:
                raise ForeignFormatError(
                    f"{self.path}: tensor {key!r} (low-rank branch) is missing"
                )
            if len(info.shape) != 2:
                raise ForeignFormatError(f"tensor {key!r} must be 2-D, got {list(info.shape)}")
            shapes[key] = info.shape[1]
        (down, r), (up, r_up) = shapes.items()
        if r % packing.RANK_TILE:
            raise ForeignFormatError(
                f"tensor {down!r} has rank {r}, not a multiple of {packing.RANK_TILE}"
            )
        if r_up != r:
            raise ForeignFormatError(f"tensor {up!r} has rank {r_up}, {down!r} has {r}")
        return r

    def w4a4(self, block: str, spec: flux.W4A4Spec, n: int, k: int, light: bool = False) -> W4A4:
        """The W4A4 layer ``{block}.{spec.name}`` [n, k], checked and unpacked (``light``: the
        low-rank branch, bias and tensor scales only)."""
        p = f"{block}.{spec.name}"
        np_, kp = packing.padded(n, packing.TILE_N), packing.padded(k, packing.TILE_K)
        dt = (packing_name(self.dtype),)
        r = self._rank(p)
        qweight = wscales = wtscale = wcscales = None
        if not light:
            q = self._get(f"{p}.qweight", (np_, kp // 2), ("I8", "U8"), "packed 4-bit weight")
            qweight = packing.unpack_qweight_nibbles(q, n, k)
            if self.fmt == "int4":
                ws = self._get(f"{p}.wscales", (kp // 64, np_), dt, "INT4 group scales")
                wscales = packing.unpack_wscales(ws, n, k // 64)
            else:
                ws = self._get(f"{p}.wscales", (kp // 16, np_), ("F8_E4M3",), "NVFP4 micro-scales")
                wscales = packing.unpack_fp8_wscales(ws, n, k // 16)
        if self.fmt == "nvfp4":
            if self.info(f"{p}.wtscale") is not None:
                wtscale = self._get(f"{p}.wtscale", (1,), (*dt, "F32"), "tensor scale").float()[0]
            if self.info(f"{p}.wcscales") is not None:
                wc = self._get(f"{p}.wcscales", (np_,), dt, "per-channel scale")
                wcscales = packing.unpack_vector(wc, n)
        bias = packing.unpack_vector(self._get(f"{p}.bias", (np_,), dt, "bias"), n)
        smooth = packing.unpack_vector(self._get(f"{p}.smooth", (kp,), dt, "smoothing"), k)
        self._get(f"{p}.smooth_orig", (kp,), dt, "original smoothing (unused)")
        if bool((smooth == 0).any()):
            raise ForeignFormatError(
                f"tensor {p + '.smooth'!r} has zeros (inputs are divided by it)"
            )
        down = self._get(f"{p}.lora_down", (kp, r), dt, "low-rank down projection")
        up = self._get(f"{p}.lora_up", (np_, r), dt, "low-rank up projection")
        return W4A4(
            name=p,
            fmt=self.fmt,
            qweight=qweight,
            wscales=wscales,
            wtscale=wtscale,
            wcscales=wcscales,
            bias=bias,
            smooth=smooth,
            lora_down=packing.unpack_lowrank_down(down, r, k),
            lora_up=packing.unpack_lowrank_up(up, n, r),
            act_unsigned=spec.gelu_input and self.fmt == "int4",
        )

    def w4a4_keys(self, block: str, spec: flux.W4A4Spec) -> list[str]:
        p = f"{block}.{spec.name}"
        keys = [f"{p}.{s}" for s in ("qweight", "wscales", "bias", "smooth", "smooth_orig")]
        keys += [f"{p}.lora_down", f"{p}.lora_up"]
        if self.fmt == "nvfp4":
            keys += [f"{p}.{s}" for s in ("wtscale", "wcscales") if f"{p}.{s}" in self.index]
        return keys

    def awq(self, block: str, spec: flux.AWQSpec, o: int, i: int) -> AWQ:
        """The adaLN layer ``{block}.{spec.name}`` [o, i], checked, unpacked, de-interleaved."""
        p = f"{block}.{spec.name}"
        dt = (packing_name(self.dtype),)
        groups, rows = i // packing.AWQ_GROUP, packing.awq_groups(i)
        q = self._get(f"{p}.qweight", (o // 4, i // 2), ("I32",), "AWQ packed weight")
        s = packing.unpack_awq_scales(
            self._get(f"{p}.wscales", (rows, o), dt, "AWQ scales"), groups
        )
        z = packing.unpack_awq_zeros(self._get(f"{p}.wzeros", (rows, o), dt, "AWQ zeros"), groups)
        zp = packing.awq_zero_points(z, s)
        if not torch.equal((-(zp * s.float())).to(s.dtype), z):
            bad = int(torch.nonzero((-(zp * s.float())).to(s.dtype) != z)[0][0])
            raise ForeignFormatError(
                f"tensor {p + '.wzeros'!r} (output row {bad}) is not an integer zero point times "
                "the scale: asymmetric AWQ weights are not supported yet"
            )
        stored = packing.unpack_awq_qweight(q)  # [O, I] uint8, 0..15
        lo, hi = int(stored.min()), int(stored.max())
        if bool((zp == zp.flatten()[0]).all()):  # one zero point (7 in every known file)
            z = int(zp.flatten()[0])
            codes = stored.view(torch.int8) - z  # exact: 0..15 fits int8
            bad = hi - z if hi - z > 7 else (lo - z if lo - z < -8 else None)
        else:
            codes = stored.to(torch.int16) - zp.to(torch.int16).repeat_interleave(
                packing.AWQ_GROUP, dim=1
            )
            cmin, cmax = int(codes.min()), int(codes.max())
            bad = cmax if cmax > 7 else (cmin if cmin < -8 else None)
            codes = codes.to(torch.int8)
        if bad is not None:
            raise ForeignFormatError(
                f"tensor {p + '.qweight'!r} holds code {bad} (stored code minus zero point), "
                "outside the signed INT4 range -8..7 our W4A16 layers hold"
            )
        bias = self._get(f"{p}.bias", (o,), dt, "bias (folded +1, interleaved)")
        return AWQ(
            name=p,
            codes=packing.deinterleave_adanorm(codes, spec.chunks).contiguous(),
            wscales=packing.deinterleave_adanorm(s, spec.chunks).contiguous(),
            bias=packing.unfold_adanorm_bias(bias, spec.chunks),
        )

    def awq_keys(self, block: str, spec: flux.AWQSpec) -> list[str]:
        return [f"{block}.{spec.name}.{s}" for s in ("qweight", "wscales", "wzeros", "bias")]

    def norm(self, block: str, name: str, size: int) -> Tensor:
        dt = (packing_name(self.dtype),)
        return self._get(f"{block}.{name}.weight", (size,), dt, "RMSNorm weight")

    def top_level(self) -> dict[str, Tensor]:
        """The 16-bit tensors outside the blocks, diffusers names, as stored."""
        return {k: self.tensor(k) for k in self.index if not is_block_key(k)}

    def top_level_info(self) -> dict[str, TensorInfo]:
        return {k: info for k, (_, info) in self.index.items() if not is_block_key(k)}


def packing_name(dtype: torch.dtype) -> str:
    """safetensors' dtype name of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    return {v: k for k, v in DTYPES.items()}[dtype]
