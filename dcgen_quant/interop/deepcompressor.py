"""Read DeepCompressor's raw SVDQuant output folder (FLUX): ``model.pt``, ``scale.pt``,
``smooth.pt``, ``branch.pt`` (NUNCHAKU_FORMAT.md section 5.2).

The folder is what DeepCompressor's quantizer saves before its Nunchaku converter runs. This
reader takes every layer to the same logical records (:mod:`.nunchaku.layers`) that the
converter's output would unpack to, with the converter's arithmetic: codes ``round(w / scale)``
(NVFP4: the nearest E2M1 value, the first in code order on a tie), the low-rank down projection
divided by ``smooth`` in float64 (unless the smoothing was fused into the previous layer), the
GELU-shift bias correction ``bias + U V (0.171875 * 1)`` in float64, per-tensor scales of a
fused q/k/v turned into per-channel ``wcscales``, adaLN codes ``round((w + 7 s) / s)`` with the
folded ``+1``. So importing the folder gives, tensor for tensor, the model that importing the
converter's Nunchaku file gives (tested against the converter itself).

The ``.pt`` files are opened with ``torch.load(weights_only=True, mmap=True)``: no code runs
from them, and ``model.pt`` (the full-size fake-quantized weights) is paged in as layers are
read rather than loaded whole.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..formats import UNSIGNED_ACT_SHIFT
from ..formats.packing import pack_nibbles
from .nunchaku import flux, packing
from .nunchaku.layers import AWQ, W4A4
from .safetensors_io import ForeignFormatError, TensorInfo, finite

FILES = ("model.pt", "scale.pt", "smooth.pt", "branch.pt")
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

# Per Nunchaku layer: (DeepCompressor modules it stacks, module naming its smoothing vector,
# module naming its low-rank branch); "fc2"/"ctx_fc2" stand for the GELU-input layer, which
# DeepCompressor stores as "<name>.linear" when it shifted the activations
_DOUBLE = {
    "qkv_proj": (("attn.to_q", "attn.to_k", "attn.to_v"), "attn.to_q", "attn.to_q"),
    "qkv_proj_context": (
        ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
        "attn.add_k_proj",
        "attn.add_k_proj",
    ),
    "out_proj": (("attn.to_out.0",), "attn.to_out.0", "attn.to_out.0"),
    "out_proj_context": (("attn.to_add_out",), "attn.to_out.0", "attn.to_add_out"),
    "mlp_fc1": (("ff.net.0.proj",), "ff.net.0.proj", "ff.net.0.proj"),
    "mlp_fc2": (("fc2",), "fc2", "fc2"),
    "mlp_context_fc1": (("ff_context.net.0.proj",),) + ("ff_context.net.0.proj",) * 2,
    "mlp_context_fc2": (("ctx_fc2",), "ctx_fc2", "ctx_fc2"),
}
_SINGLE = {
    "qkv_proj": (("attn.to_q", "attn.to_k", "attn.to_v"), "attn.to_q", "attn.to_q"),
    "mlp_fc1": (("proj_mlp",), "attn.to_q", "proj_mlp"),
    "out_proj": (("proj_out.linears.0",), "proj_out.linears.0", "proj_out.linears.0"),
    "mlp_fc2": (("fc2",), "fc2", "fc2"),
}
_FC2 = {flux.DOUBLE: {"fc2": "ff.net.2", "ctx_fc2": "ff_context.net.2"},
        flux.SINGLE: {"fc2": "proj_out.linears.1"}}  # fmt: skip


def is_deepcompressor_dir(path: Path) -> bool:
    return path.is_dir() and (path / "model.pt").is_file() and (path / "scale.pt").is_file()


def _load(path: Path, required: bool) -> dict:
    if not path.is_file():
        if required:
            raise ForeignFormatError(f"DeepCompressor folder lacks {path.name}")
        return {}
    try:
        # mmap pages model.pt in as layers are read; files in torch's pre-1.6 (non-zip)
        # format cannot be mapped and are loaded whole
        zipped = zipfile.is_zipfile(path)
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipped)
    except (
        RuntimeError,
        OSError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        EOFError,
        ValueError,
    ) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "Weights only load failed" in message:
            message = "not plain tensors and dicts (not unpickled: that could run code)"
        raise ForeignFormatError(
            f"{path} cannot be read (truncated or not a torch file): {message[:160]}"
        ) from None
    if not isinstance(obj, dict):
        raise ForeignFormatError(f"{path} does not hold a dict")
    return obj


class DeepCompressorSource:
    """A DeepCompressor output folder opened for reading (same interface as NunchakuSource)."""

    kind = "deepcompressor"

    def __init__(self, path: str | Path, config: Any = None):
        self.path = Path(path)
        self.model = _load(self.path / "model.pt", True)
        self.scales = _load(self.path / "scale.pt", True)
        self.smooths = _load(self.path / "smooth.pt", False)
        self.branches = _load(self.path / "branch.pt", False)
        self.used: set[str] = set()
        self.index = {
            k: TensorInfo("", tuple(v.shape), 0, 0)
            for k, v in self.model.items()
            if isinstance(v, Tensor)
        }
        if not any(k.startswith((flux.DOUBLE + ".", flux.SINGLE + ".")) for k in self.model):
            raise ForeignFormatError(f"{self.path}/model.pt has no FLUX transformer blocks")
        self.dtype = self._dtype()
        self.fmt = self._precision()
        if config is not None:
            self.config = flux.parse_config(config, "given config")
        else:
            names = [k for k in self.model if k.startswith((flux.DOUBLE, flux.SINGLE))]
            self.config = flux.infer_config({k: i.shape for k, i in self.index.items()}, names)

    def _dtype(self) -> torch.dtype:
        key = next(k for k in self.model if k.endswith("attn.to_q.weight"))
        dtype = self.model[key].dtype
        if dtype not in (torch.bfloat16, torch.float16):
            raise ForeignFormatError(f"{key!r} is {dtype}; DeepCompressor FLUX weights are 16-bit")
        return dtype

    def _precision(self) -> str:
        key = next(k for k in self.model if k.endswith("attn.to_q.weight"))[: -len(".weight")]
        s0 = self.scales.get(f"{key}.weight.scale.0")
        s1 = self.scales.get(f"{key}.weight.scale.1")
        if s0 is None:
            raise ForeignFormatError(f"scale.pt lacks {key + '.weight.scale.0'!r}")
        k = self.model[f"{key}.weight"].shape[1]
        if s1 is None and s0.numel() == s0.shape[0] * k // 64:
            return "int4"
        if s1 is not None and s1.numel() == s1.shape[0] * k // 16:
            return "nvfp4"
        raise ForeignFormatError(
            f"scale.pt {key!r}: scales {list(s0.shape)} / "
            f"{None if s1 is None else list(s1.shape)} are neither INT4 (group 64) nor NVFP4 "
            "(tensor scale + group-16 scales)"
        )

    # ---------------------------------------------------------------- helpers

    def _t(self, d: dict, key: str, what: str, file: str) -> Tensor:
        t = d.get(key)
        if not isinstance(t, Tensor):
            raise ForeignFormatError(f"{self.path}/{file}: tensor {key!r} ({what}) is missing")
        if not finite(t):
            raise ForeignFormatError(f"{self.path}/{file}: tensor {key!r} holds NaN or Inf values")
        if d is self.model:
            self.used.add(key)
        return t

    def _module(self, block: str, name: str) -> str:
        """The DeepCompressor module name of ``name`` in ``block`` (fc2 with or without shift)."""
        fc2 = _FC2[block.split(".")[0]].get(name)
        if fc2 is None:
            return f"{block}.{name}"
        shifted = f"{block}.{fc2}.linear"
        return shifted if f"{shifted}.weight" in self.model else f"{block}.{fc2}"

    # ---------------------------------------------------------------- layers

    def w4a4(self, block: str, spec: flux.W4A4Spec, n: int, k: int, light: bool = False) -> W4A4:
        table = _DOUBLE if block.startswith(flux.DOUBLE + ".") else _SINGLE
        members, smooth_name, branch_name = table[spec.name]
        names = [self._module(block, m) for m in members]
        p = f"{block}.{spec.name}"
        weights = [self._t(self.model, f"{m}.weight", "weight", "model.pt") for m in names]
        if sum(w.shape[0] for w in weights) != n or any(w.shape[1] != k for w in weights):
            raise ForeignFormatError(
                f"model.pt {names[0]!r}: weights {[list(w.shape) for w in weights]} do not "
                f"make the [{n}, {k}] layer the config implies"
            )
        biases = [self.model.get(f"{m}.bias") for m in names]
        for m, b in zip(names, biases):
            if b is not None:
                self.used.add(f"{m}.bias")
        if any(b is None for b in biases) and not all(b is None for b in biases):
            raise ForeignFormatError(f"model.pt: {names[biases.index(None)]!r} lacks a bias")
        s0 = [self._t(self.scales, f"{m}.weight.scale.0", "scale", "scale.pt") for m in names]
        s1 = [self.scales.get(f"{m}.weight.scale.1") for m in names]
        shifts = [
            self.model.get(f"{m[:-7]}.shift") if m.endswith(".linear") else None for m in names
        ]
        for m, s in zip(names, shifts):
            if s is not None:
                self.used.add(f"{m[:-7]}.shift")
        smooth = self.smooths.get(f"{block}.{self._module(block, smooth_name)[len(block) + 1 :]}")
        branch = self.branches.get(f"{block}.{self._module(block, branch_name)[len(block) + 1 :]}")
        fused = "out_proj" in spec.name and bool(self.smooths.get("proj.fuse_when_possible", True))
        dtype = weights[0].dtype
        bias = None if biases[0] is None else torch.cat([b for b in biases])
        shift = shifts[0]
        if shift is not None and (not spec.gelu_input or self.fmt != "int4"):
            raise ForeignFormatError(
                f"model.pt {names[0]!r} has a shift: Nunchaku shifts only INT4 GELU inputs"
            )
        if shift is not None and not bool((shift == UNSIGNED_ACT_SHIFT).all()):
            raise ForeignFormatError(
                f"model.pt {names[0][:-7] + '.shift'!r} is not {UNSIGNED_ACT_SHIFT} (the shift "
                "Nunchaku's kernels apply)"
            )
        if spec.gelu_input and self.fmt == "int4" and shift is None:
            raise ForeignFormatError(
                f"model.pt {names[0]!r}: an INT4 GELU-input layer without shift; Nunchaku runs "
                "it on shifted unsigned activations, which this model was not quantized for"
            )

        # low-rank branch and bias, as the converter computes them
        if branch is not None:
            a, u = branch.get("a.weight"), branch.get("b.weight")
            if not isinstance(a, Tensor) or not isinstance(u, Tensor):
                raise ForeignFormatError(f"branch.pt {p!r}: needs 'a.weight' and 'b.weight'")
            if a.shape[1] != k or u.shape[0] != n or a.shape[0] != u.shape[1]:
                raise ForeignFormatError(
                    f"branch.pt entry of {p!r}: a {list(a.shape)}, b {list(u.shape)} do not fit "
                    f"[{n}, {k}]"
                )
            if u.dtype != dtype:
                raise ForeignFormatError(
                    f"branch.pt entry of {p!r}: b.weight is {u.dtype}, not {dtype}"
                )
            if smooth is not None or shift is not None:
                down = a.to(torch.float64)
                if smooth is not None and not fused:
                    down = down / smooth.to(torch.float64).unsqueeze(0)
                if shift is not None:
                    b64 = torch.zeros(n, dtype=torch.float64) if bias is None else bias.double()
                    sh = shift.reshape(-1, 1).to(torch.float64)
                    if sh.numel() == 1:
                        sh = sh.expand(k, 1)
                    bias = (b64 + (u.to(torch.float64) @ down @ sh).reshape(-1)).to(dtype)
                down = down.to(dtype)
            else:
                down = a
            rank = a.shape[0]
        else:
            down, u, rank = torch.zeros(0, k, dtype=dtype), torch.zeros(n, 0, dtype=dtype), 0
        rp = packing.padded(rank, packing.RANK_TILE)
        down = torch.cat([down, down.new_zeros(rp - rank, k)])  # as Nunchaku stores the rank
        u = torch.cat([u, u.new_zeros(n, rp - rank)], dim=1)
        bias = torch.zeros(n, dtype=dtype) if bias is None else bias.to(dtype)
        smooth16 = torch.ones(k, dtype=dtype) if smooth is None else smooth.to(dtype)

        # scales: per-tensor (one member) -> wtscale; per-tensor of several members or
        # per-channel -> wcscales; per-group -> wscales
        wtscale = wcscales = wscales = qweight = None
        if self.fmt == "int4":
            scale = torch.cat([s.reshape(s.shape[0], -1) for s in s0])
            if scale.shape != (n, k // 64):
                raise ForeignFormatError(
                    f"scale.pt {names[0] + '.weight.scale.0'!r} is not [N, K/64]"
                )
            div = [scale]
        else:
            if any(s is None for s in s1):
                raise ForeignFormatError(
                    f"scale.pt lacks {names[s1.index(None)] + '.weight.scale.1'!r}"
                )
            if len(names) > 1 or s0[0].numel() > 1:
                first = torch.cat(
                    [s.reshape(-1).expand(w.shape[0]) if s.numel() == 1 else s.reshape(-1)
                     for s, w in zip(s0, weights)]
                )  # fmt: skip
                wcscales = first.to(dtype)
                first = first.reshape(n, 1)
            else:
                first = s0[0].reshape(1, 1)
                wtscale = s0[0].reshape(()).to(dtype).float()
            sub = torch.cat([s.reshape(s.shape[0], -1) for s in s1])
            if sub.shape != (n, k // 16):
                raise ForeignFormatError(
                    f"scale.pt {names[0] + '.weight.scale.1'!r} is not [N, K/16]"
                )
            wscales = sub.to(dtype).to(torch.float8_e4m3fn)
            if not torch.equal(wscales.to(dtype), sub.to(dtype)):
                raise ForeignFormatError(
                    f"scale.pt {names[0] + '.weight.scale.1'!r} holds values E4M3 cannot represent"
                )
            div = [first, sub]
        if not light:
            qweight = self._codes(torch.cat(weights), div, p)
            if self.fmt == "int4":
                wscales = div[0].to(dtype)
        return W4A4(
            name=p,
            fmt=self.fmt,
            qweight=qweight,
            wscales=wscales,
            wtscale=wtscale,
            wcscales=wcscales,
            bias=bias,
            smooth=torch.ones(k, dtype=dtype) if fused else smooth16,
            lora_down=down,
            lora_up=u,
            act_unsigned=spec.gelu_input and self.fmt == "int4",
        )

    def _codes(self, weight: Tensor, divisors: list[Tensor], name: str) -> Tensor:
        """Canonical packed codes of a fake-quantized weight [N, K] (the converter's rule)."""
        n, k = weight.shape
        w = weight.to(torch.float32)
        for d in divisors:  # [N or 1, groups]: divide each group of K/groups inputs
            rows, groups = d.shape
            w = w.reshape(n, groups, k // groups) / d.to(torch.float32).reshape(rows, groups, 1)
            w = w.reshape(n, k)
        if self.fmt == "int4":
            codes = torch.round(w)
            if int(codes.min()) < -8 or int(codes.max()) > 7:
                raise ForeignFormatError(
                    f"{name}: weight / scale rounds to {int(codes.min())}..{int(codes.max())}, "
                    "outside INT4 -8..7 (model.pt and scale.pt do not match)"
                )
            return pack_nibbles(codes.to(torch.int8))
        table = torch.tensor(_E2M1, dtype=torch.float32)
        out = torch.empty(n, k, dtype=torch.uint8)
        for i in range(0, n, 256):  # argmin over the 16 values, first index on ties, in chunks
            chunk = (w[i : i + 256].unsqueeze(-1) - table).abs()
            out[i : i + 256] = chunk.argmin(dim=-1).to(torch.uint8)
        return pack_nibbles(out)

    def awq(self, block: str, spec: flux.AWQSpec, o: int, i: int) -> AWQ:
        m = f"{block}.{spec.name}"
        w = self._t(self.model, f"{m}.weight", "weight", "model.pt")
        if tuple(w.shape) != (o, i):
            raise ForeignFormatError(
                f"model.pt {m + '.weight'!r} is {list(w.shape)}, expected {[o, i]}"
            )
        b = self.model.get(f"{m}.bias")
        if b is not None:
            self.used.add(f"{m}.bias")
        bias = torch.zeros(o, dtype=w.dtype) if b is None else b
        s = self._t(self.scales, f"{m}.weight.scale.0", "scale", "scale.pt").reshape(o, -1)
        if s.shape[1] * packing.AWQ_GROUP != i:
            raise ForeignFormatError(f"scale.pt {m + '.weight.scale.0'!r} is not [O, I/64]")
        sf = s.to(torch.float32)
        q = ((w.to(torch.float32).reshape(o, -1, packing.AWQ_GROUP) + (7 * sf)[..., None])
             / sf[..., None]).round().reshape(o, i)  # fmt: skip
        if int(q.min()) < 0 or int(q.max()) > 14:
            raise ForeignFormatError(
                f"model.pt {m + '.weight'!r}: codes round((w + 7 s) / s) span "
                f"{int(q.min())}..{int(q.max())}; our signed INT4 holds 0..14 (code - 7 in -7..7)"
            )
        return AWQ(
            name=f"{block}.{spec.name}",
            codes=(q - packing.AWQ_ZERO_POINT).to(torch.int8),
            wscales=s.to(w.dtype),
            bias=packing.unfold_adanorm_bias(
                packing.fold_adanorm_bias(bias, spec.chunks), spec.chunks
            ),
        )

    def norm(self, block: str, name: str, size: int) -> Tensor:
        key = f"{block}.attn.{name}.weight"
        t = self._t(self.model, key, "RMSNorm weight", "model.pt")
        if tuple(t.shape) != (size,):
            raise ForeignFormatError(f"model.pt {key!r} is {list(t.shape)}, expected [{size}]")
        return t

    def top_level(self) -> dict[str, Tensor]:
        out = {}
        for k, v in self.model.items():
            if isinstance(v, Tensor) and not k.startswith((flux.DOUBLE + ".", flux.SINGLE + ".")):
                out[k] = v
                self.used.add(k)
        return out

    def top_level_info(self) -> dict[str, TensorInfo]:
        return {
            k: i
            for k, i in self.index.items()
            if not k.startswith((flux.DOUBLE + ".", flux.SINGLE + "."))
        }

    def unused_block_keys(self) -> list[str]:
        """model.pt block tensors no layer read (after a full import)."""
        return [
            k for k in self.index
            if k.startswith((flux.DOUBLE + ".", flux.SINGLE + ".")) and k not in self.used
        ]  # fmt: skip
