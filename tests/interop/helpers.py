"""Known tensors of a tiny FLUX in DeepCompressor's raw layout, and Nunchaku files made from them
by DeepCompressor's own converter (the test oracle, ``pip install --no-deps
deepcompressor-toolkit==0.1.0``).

Every quantized layer gets random codes and scales, a smoothing vector, a low-rank branch and a
bias; ``model.pt`` holds the fake-quantized weights ``codes * scales`` as DeepCompressor saves
them. ``exact_smooth=True`` makes every smoothing value a power of two, so that inputs can be
built whose activation quantization is exact (the import-semantics test).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dcgen_quant.models.tiny import tiny_flux

SHIFT = 0.171875
E2M1 = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0] + [-0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
)

DOUBLE_LINEARS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
    "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
    "ff_context.net.0.proj", "ff_context.net.2",
)  # fmt: skip
SINGLE_LINEARS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
# smoothing / branch owners (DeepCompressor's representative module names)
DOUBLE_SMOOTH = ("attn.to_q", "attn.add_k_proj", "attn.to_out.0", "ff.net.0.proj",
                 "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")  # fmt: skip
DOUBLE_BRANCH = ("attn.to_q", "attn.add_k_proj", "attn.to_out.0", "attn.to_add_out",
                 "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                 "ff_context.net.2")  # fmt: skip


def _positive(shape, g, lo=-7.0, hi=-3.0, pow2=False):
    e = torch.rand(shape, generator=g) * (hi - lo) + lo
    return torch.exp2(torch.floor(e) if pow2 else e)


class Known:
    """The known tensors of one tiny FLUX, as DeepCompressor dicts."""

    def __init__(self, fmt="int4", rank=16, seed=0, exact_smooth=False, fuse_proj=False,
                 dtype=torch.bfloat16, shift=True, **config):  # fmt: skip
        self.fmt, self.rank, self.dtype = fmt, rank, dtype
        g = torch.Generator().manual_seed(seed)
        self.g = g
        base = tiny_flux(seed=seed, dtype=dtype, **config)
        self.config = {k: v for k, v in dict(base.config).items() if not k.startswith("_")}
        self.model, self.scale, self.smooth, self.branch = {}, {}, {}, {}
        self.smooth["proj.fuse_when_possible"] = fuse_proj
        self.smooth["attn.fuse_when_possible"] = False
        self.codes: dict[str, torch.Tensor] = {}
        for key, t in base.state_dict().items():
            if "transformer_blocks" not in key:
                self.model[key] = t.clone()
        for i, block in enumerate(base.transformer_blocks):
            p = f"transformer_blocks.{i}"
            self._norms(p, block, ("norm_q", "norm_k", "norm_added_q", "norm_added_k"))
            for name in DOUBLE_LINEARS:
                lin = block.get_submodule(name)
                dc = (
                    f"{p}.{name}.linear"
                    if name.endswith("net.2") and shift and fmt == "int4"
                    else f"{p}.{name}"
                )
                self._w4a4(dc, lin.out_features, lin.in_features)
                if dc.endswith(".linear"):
                    self.model[f"{p}.{name}.shift"] = torch.tensor(SHIFT, dtype=dtype)
            for name in ("norm1.linear", "norm1_context.linear"):
                lin = block.get_submodule(name)
                self._awq(f"{p}.{name}", lin.out_features, lin.in_features)
            k = block.attn.to_q.in_features
            for s in DOUBLE_SMOOTH:
                owner = (
                    f"{p}.{s}.linear"
                    if s.endswith("net.2") and shift and fmt == "int4"
                    else f"{p}.{s}"
                )
                self.smooth[owner] = self._smooth(block.get_submodule(s).in_features, exact_smooth)
            for b in DOUBLE_BRANCH:
                owner = (
                    f"{p}.{b}.linear"
                    if b.endswith("net.2") and shift and fmt == "int4"
                    else f"{p}.{b}"
                )
                lin = block.get_submodule(b)
                n = lin.out_features * (3 if b in ("attn.to_q", "attn.add_k_proj") else 1)
                self.branch[owner] = self._branch(n, lin.in_features)
            del k
        for i, block in enumerate(base.single_transformer_blocks):
            p = f"single_transformer_blocks.{i}"
            self._norms(p, block, ("norm_q", "norm_k"))
            for name in SINGLE_LINEARS:
                lin = block.get_submodule(name)
                self._w4a4(f"{p}.{name}", lin.out_features, lin.in_features)
            dim, mlp = block.attn.to_q.in_features, block.proj_mlp.out_features
            self._w4a4(f"{p}.proj_out.linears.0", dim, dim, bias=False)
            fc2 = (
                f"{p}.proj_out.linears.1.linear"
                if shift and fmt == "int4"
                else f"{p}.proj_out.linears.1"
            )
            self._w4a4(fc2, dim, mlp)
            if fc2.endswith(".linear"):
                self.model[f"{p}.proj_out.linears.1.shift"] = torch.tensor(SHIFT, dtype=dtype)
            self._awq(f"{p}.norm.linear", block.norm.linear.out_features, dim)
            self.smooth[f"{p}.attn.to_q"] = self._smooth(dim, exact_smooth)
            self.smooth[f"{p}.proj_out.linears.0"] = self._smooth(dim, exact_smooth)
            self.smooth[fc2] = self._smooth(mlp, exact_smooth)
            self.branch[f"{p}.attn.to_q"] = self._branch(3 * dim, dim)
            self.branch[f"{p}.proj_mlp"] = self._branch(mlp, dim)
            self.branch[f"{p}.proj_out.linears.0"] = self._branch(dim, dim)
            self.branch[fc2] = self._branch(dim, mlp)

    # ------------------------------------------------------------ pieces

    def _norms(self, p, block, names):
        for n in names:
            w = block.attn.get_submodule(n).weight.detach()
            self.model[f"{p}.attn.{n}.weight"] = (
                1 + 0.1 * torch.randn(w.shape, generator=self.g)
            ).to(self.dtype)

    def _smooth(self, k, exact):
        return _positive(k, self.g, -2.0, 2.0, pow2=exact).to(self.dtype)

    def _branch(self, n, k):
        a = (torch.randn(self.rank, k, generator=self.g) * 0.05).to(self.dtype)
        b = (torch.randn(n, self.rank, generator=self.g) * 0.05).to(self.dtype)
        return {"a.weight": a, "b.weight": b}

    def _w4a4(self, m, n, k, bias=True):
        g = self.g
        if self.fmt == "int4":
            codes = torch.randint(-8, 8, (n, k), generator=g)
            s = _positive((n, 1, k // 64, 1), g).to(self.dtype)
            w = (codes.float().reshape(n, k // 64, 64) * s.float().reshape(n, k // 64, 1)).reshape(
                n, k
            )
            self.scale[f"{m}.weight.scale.0"] = s
        else:
            codes = torch.randint(0, 16, (n, k), generator=g)
            st = _positive((1,), g, -6, -2).to(self.dtype)
            sb = torch.exp2(torch.randint(-3, 5, (n, 1, k // 16, 1), generator=g).float())
            sb = (
                sb
                * torch.tensor([1.0, 1.25, 1.5, 1.75])[torch.randint(0, 4, sb.shape, generator=g)]
            ).to(self.dtype)
            v = E2M1[codes].reshape(n, k // 16, 16) * sb.float().reshape(n, k // 16, 1)
            w = (v * st.float()).reshape(n, k)
            self.scale[f"{m}.weight.scale.0"] = st
            self.scale[f"{m}.weight.scale.1"] = sb
        self.codes[m] = codes
        self.model[f"{m}.weight"] = w.to(self.dtype)
        if bias:
            self.model[f"{m}.bias"] = (torch.randn(n, generator=g) * 0.1).to(self.dtype)

    def _awq(self, m, o, i):
        g = self.g
        codes = torch.randint(-7, 8, (o, i), generator=g)
        s = _positive((o, 1, i // 64, 1), g).to(self.dtype)
        w = (codes.float().reshape(o, i // 64, 64) * s.float().reshape(o, i // 64, 1)).reshape(o, i)
        self.codes[m] = codes
        self.scale[f"{m}.weight.scale.0"] = s
        self.model[f"{m}.weight"] = w.to(self.dtype)
        self.model[f"{m}.bias"] = (torch.randn(o, generator=g) * 0.1).to(self.dtype)

    # ------------------------------------------------------------ outputs

    def save_deepcompressor(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        for name, d in (("model", self.model), ("scale", self.scale), ("smooth", self.smooth),
                        ("branch", self.branch)):  # fmt: skip
            torch.save(d, folder / f"{name}.pt")
        return folder

    def oracle(self) -> tuple[dict, dict]:
        """DeepCompressor's converter on these dicts: (block tensors, top-level tensors)."""
        import contextlib
        import io

        from deepcompressor.backend.nunchaku.convert import convert_to_nunchaku_flux_state_dicts

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return convert_to_nunchaku_flux_state_dicts(
                {k: v.clone() for k, v in self.model.items()},
                {k: v.clone() for k, v in self.scale.items()},
                dict(self.smooth),
                {k: dict(v) for k, v in self.branch.items()},
                float_point=self.fmt == "nvfp4",
            )

    def save_nunchaku(self, path: Path, with_config: bool = True) -> Path:
        """A v1.0 single file: the oracle's tensors, merged, with the loaders' metadata."""
        blocks, other = self.oracle()
        meta = {"model_class": "NunchakuFluxTransformer2dModel"}
        if with_config:
            meta["config"] = json.dumps({"_class_name": "FluxTransformer2DModel", **self.config})
        wd = "int4" if self.fmt == "int4" else "fp4_e2m1_all"
        meta["quantization_config"] = json.dumps(
            {
                "method": "svdquant",
                "weight": {"dtype": wd, "group_size": 64 if self.fmt == "int4" else 16},
                "rank": self.rank,
            }  # fmt: skip
        )
        save_file(
            {**{k: v.contiguous() for k, v in blocks.items()}, **other}, str(path), metadata=meta
        )
        return path

    def save_legacy(self, folder: Path, with_config: bool = True) -> Path:
        blocks, other = self.oracle()
        folder.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in blocks.items()},
            str(folder / "transformer_blocks.safetensors"),
        )
        save_file(other, str(folder / "unquantized_layers.safetensors"))
        if with_config:
            (folder / "config.json").write_text(
                json.dumps({"_class_name": "FluxTransformer2DModel", **self.config})
            )
        return folder


# --------------------------------------------------------------------------------------------
# shared across test modules (one build per process; conftest-free so that the interop test
# files of both engineers stay independent)

_TMP: Path | None = None


def _tmpdir() -> Path:
    global _TMP
    if _TMP is None:
        import atexit
        import shutil
        import tempfile

        _TMP = Path(tempfile.mkdtemp(prefix="dcgq-interop-"))
        atexit.register(shutil.rmtree, _TMP, True)
    return _TMP


@functools.cache
def small_known(fmt: str) -> Known:
    """One double + one single block, rank 16, power-of-two smoothing, fused out_proj smoothing
    (``proj.fuse_when_possible``) so that both smoothing conventions occur."""
    torch.set_num_threads(1)
    return Known(fmt=fmt, rank=16, seed=3, exact_smooth=True, fuse_proj=True,
                 num_layers=1, num_single_layers=1)  # fmt: skip


@functools.cache
def small_nunchaku_file(fmt: str) -> Path:
    """The oracle's v1.0 single file of :func:`small_known` (do not modify it)."""
    return small_known(fmt).save_nunchaku(_tmpdir() / f"oracle-{fmt}.safetensors")
