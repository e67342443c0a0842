"""Import semantics: a Nunchaku file made by DeepCompressor's converter (the oracle) from known
tensors loads into our model, whose reference forward, layer by layer, matches an independent
float64 reconstruction (NUNCHAKU_FORMAT.md 2.8/2.9: dense W, bias, GELU shift; 1.4: adaLN
interleave and folded +1) within 2x of the reference's own rounding error. The DeepCompressor
folder itself imports to the same tensors, bit for bit."""

from __future__ import annotations

import pytest
import torch

from dcgen_quant.interop.nunchaku.importer import load_foreign

from .helpers import SHIFT, small_known, small_nunchaku_file
from .semantics import check_close, dense, exact_inputs

pytest.importorskip("deepcompressor.backend.nunchaku.convert")
pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")

TOKENS = 6


def _double_layers(p: str, int4_shift: bool, fuse_proj: bool):
    fc2 = f"{p}.ff.net.2.linear" if int4_shift else f"{p}.ff.net.2"
    cfc2 = f"{p}.ff_context.net.2.linear" if int4_shift else f"{p}.ff_context.net.2"
    a = f"{p}.attn"
    return [  # (members, smooth owner, branch owner, fused smoothing, unsigned, our modules)
        ([f"{a}.to_q", f"{a}.to_k", f"{a}.to_v"], f"{a}.to_q", f"{a}.to_q", False, False,
         ["attn.to_q", "attn.to_k", "attn.to_v"]),
        ([f"{a}.add_q_proj", f"{a}.add_k_proj", f"{a}.add_v_proj"], f"{a}.add_k_proj",
         f"{a}.add_k_proj", False, False,
         ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]),
        ([f"{a}.to_out.0"], f"{a}.to_out.0", f"{a}.to_out.0", fuse_proj, False,
         ["attn.to_out.0"]),
        ([f"{a}.to_add_out"], f"{a}.to_out.0", f"{a}.to_add_out", fuse_proj, False,
         ["attn.to_add_out"]),
        ([f"{p}.ff.net.0.proj"], f"{p}.ff.net.0.proj", f"{p}.ff.net.0.proj", False, False,
         ["ff.net.0.proj"]),
        ([fc2], fc2, fc2, False, int4_shift, ["ff.net.2"]),
        ([f"{p}.ff_context.net.0.proj"], f"{p}.ff_context.net.0.proj",
         f"{p}.ff_context.net.0.proj", False, False, ["ff_context.net.0.proj"]),
        ([cfc2], cfc2, cfc2, False, int4_shift, ["ff_context.net.2"]),
    ]  # fmt: skip


def _single_layers(p: str, int4_shift: bool, fuse_proj: bool):
    fc2 = f"{p}.proj_out.linears.1.linear" if int4_shift else f"{p}.proj_out.linears.1"
    a = f"{p}.attn"
    return [
        ([f"{a}.to_q", f"{a}.to_k", f"{a}.to_v"], f"{a}.to_q", f"{a}.to_q", False, False,
         ["attn.to_q", "attn.to_k", "attn.to_v"]),
        ([f"{p}.proj_mlp"], f"{a}.to_q", f"{p}.proj_mlp", False, False, ["proj_mlp"]),
        ([f"{p}.proj_out.linears.0"], f"{p}.proj_out.linears.0", f"{p}.proj_out.linears.0",
         fuse_proj, False, ["proj_out.parts.0"]),  # "out_proj" in the name: fused smoothing
        ([fc2], fc2, fc2, False, int4_shift, ["proj_out.parts.1"]),
    ]  # fmt: skip


@pytest.fixture(scope="module", params=["int4", "nvfp4"])
def imported(request):
    torch.set_num_threads(1)
    kn = small_known(request.param)
    return kn, load_foreign(small_nunchaku_file(request.param))


def test_w4a4_layers_match_float64_reconstruction(imported):
    kn, model = imported
    g = torch.Generator().manual_seed(0)
    shift = kn.fmt == "int4"
    checked = 0
    double, single = "transformer_blocks.0", "single_transformer_blocks.0"
    for p, layers in ((double, _double_layers(double, shift, True)),
                      (single, _single_layers(single, shift, True))):  # fmt: skip
        block = model.get_submodule(p)
        for members, smooth_key, branch_key, fused, unsigned, ours in layers:
            w64, b64, smooth = dense(kn, members, fused, unsigned, smooth_key, branch_key)
            x = exact_inputs(kn, smooth, TOKENS, unsigned, g)
            y64 = x.double() @ w64.t() + b64
            with torch.no_grad():
                y = torch.cat([block.get_submodule(m)(x) for m in ours], dim=-1)
            check_close(y, y64, kn.dtype, f"{members[0]} -> {ours}")
            checked += 1
    assert checked == 12


def test_adaln_layers_match_float64_reconstruction(imported):
    """AWQ codes with zero point 7 -> w = (q - 7) s; the stored bias carries +1 on the scale
    chunks (rounded to 16 bits), which our layer leaves to diffusers' ``1 + scale``."""
    kn, model = imported
    g = torch.Generator().manual_seed(1)
    for m, chunks in (("transformer_blocks.0.norm1.linear", 6),
                      ("transformer_blocks.0.norm1_context.linear", 6),
                      ("single_transformer_blocks.0.norm.linear", 3)):  # fmt: skip
        codes, s = kn.codes[m].double(), kn.scale[f"{m}.weight.scale.0"].double()
        o, i = codes.shape
        w = (codes.reshape(o, i // 64, 64) * s.reshape(o, i // 64, 1)).reshape(o, i)
        b = kn.model[f"{m}.bias"].reshape(chunks, o // chunks).clone()
        for j in sorted({1, chunks - 2}):  # Nunchaku's stored b + 1, then the 1 taken out
            b[j] = (b[j].double() + 1).to(kn.dtype)
        b64 = b.double().reshape(chunks, -1)
        for j in sorted({1, chunks - 2}):
            b64[j] -= 1
        x = torch.randn(TOKENS, i, generator=g).to(kn.dtype)
        y64 = x.double() @ w.t() + b64.reshape(-1)
        with torch.no_grad():
            y = model.get_submodule(m)(x)
        check_close(y, y64, kn.dtype, m)


def test_deepcompressor_folder_and_legacy_folder_import_identically(imported, tmp_path):
    kn, model = imported
    ours = model.state_dict()
    for path, config in ((kn.save_deepcompressor(tmp_path / "dc"), kn.config),
                         (kn.save_legacy(tmp_path / "legacy"), None)):  # fmt: skip
        other = load_foreign(path, config=config).state_dict()
        assert other.keys() == ours.keys()
        for key, t in ours.items():
            a = t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
            b = other[key].view(torch.uint8) if t.dtype == torch.float8_e4m3fn else other[key]
            assert torch.equal(a, b), f"{path.name}: {key} differs"


def test_unsigned_gelu_layers_and_shift(imported):
    kn, model = imported
    fc2 = model.get_submodule("transformer_blocks.0.ff.net.2")
    part = model.get_submodule("single_transformer_blocks.0.proj_out.parts.1")
    assert fc2.act_unsigned == part.act_unsigned == (kn.fmt == "int4")
    assert not model.get_submodule("single_transformer_blocks.0.proj_out.parts.0").act_unsigned
    assert SHIFT == 0.171875
