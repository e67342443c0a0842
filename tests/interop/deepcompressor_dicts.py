"""Arrange the tensors of a dcgen_quant FLUX checkpoint as DeepCompressor's raw output
(model.pt, scale.pt, smooth.pt, branch.pt; NUNCHAKU_FORMAT.md section 5.2), so that its
``convert_to_nunchaku_flux_state_dicts`` can serve as the oracle of our exporter.

The arrangement inverts what that converter computes, so that its output should equal ours:

* weights: the dequantized residual in smoothed coordinates, bf16 (the converter recovers the
  codes as ``round(w / scale)``, exact here: |code| <= 8 and bf16's relative error is 2^-9);
* ``branch a``: our ``proj_down^T * smooth`` in float64 (the converter divides by ``smooth`` in
  float64 and rounds to bf16, giving back our ``proj_down`` bit for bit); ``b``: ``proj_up``;
* GELU-input layers of INT4 models as DeepCompressor's ``ShiftedLinear`` (``.linear`` plus a
  ``shift`` buffer of 0.171875), whose float64 bias is our bias minus the low-rank part of the
  shift, which the converter adds back;
* single blocks' ``proj_out`` as its ``ConcatLinear`` ``linears.0`` / ``linears.1``; where our
  INT4 ``proj_out`` keeps the layer's bias in its attention part, ``linears.0`` gets that bias
  (DeepCompressor's own ``linears.0`` has none: it folds the whole bias into the MLP part).
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from dcgen_quant.checkpoint import read_metadata
from dcgen_quant.formats import UNSIGNED_ACT_SHIFT, QuantizedWeight, dequantize_weight

DOUBLE = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
          "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
          "ff_context.net.0.proj", "ff_context.net.2")  # fmt: skip
SINGLE = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")


class _Dicts:
    def __init__(self, path):
        self.t = load_file(str(path))
        meta = read_metadata(path)
        self.layers, self.config = meta["layers"], meta["model"]["config"]
        self.model, self.scale, self.smooth, self.branch = (
            {},
            {},
            {"proj.fuse_when_possible": False},
            {},
        )
        self.used: set[str] = set()

    def get(self, key):
        self.used.add(key)
        return self.t[key]

    def residual(self, name, cols=None):
        info = self.layers[name]
        qw = QuantizedWeight(self.get(f"{name}.qweight"), self.get(f"{name}.wscales"),
                             self.t.get(f"{name}.wtscale"), info["fmt"])  # fmt: skip
        if qw.wtscale is not None:
            self.used.add(f"{name}.wtscale")
        w = dequantize_weight(qw)
        s = qw.wscales.t()  # [N, G]
        if cols is not None:
            g = 64 if info["fmt"] == "int4" else 16
            w, s = w[:, cols[0] : cols[1]], s[:, cols[0] // g : cols[1] // g]
        return w, s, qw.wtscale, info["fmt"]

    def put_linear(self, dc_name, name, cols=None, bias=True):
        """One W4A4 member: weight, bias, scale.0 (+ scale.1 for NVFP4)."""
        w, s, wtscale, fmt = self.residual(name, cols)
        n = w.shape[0]
        self.model[f"{dc_name}.weight"] = w.to(torch.bfloat16)
        if bias and f"{name}.bias" in self.t:
            self.model[f"{dc_name}.bias"] = self.get(f"{name}.bias")
        if fmt == "int4":
            self.scale[f"{dc_name}.weight.scale.0"] = s.reshape(n, 1, -1, 1)
        else:
            self.scale[f"{dc_name}.weight.scale.0"] = wtscale.reshape(1)
            self.scale[f"{dc_name}.weight.scale.1"] = s.to(torch.bfloat16).reshape(n, 1, -1, 1)

    def smooth_and_branch(self, key, name, members, cols=None):
        """smooth.pt / branch.pt entry ``key`` from layer ``name`` (input side) and the
        concatenated proj_up of ``members``."""
        smooth = self.get(f"{name}.smooth_factor")
        down = self.get(f"{name}.proj_down")
        if cols is not None:
            smooth, down = smooth[cols[0] : cols[1]], down[cols[0] : cols[1]]
        self.smooth[key] = smooth
        up = torch.cat([self.get(f"{m}.proj_up") for m in members])
        self.branch[key] = {"a.weight": down.t().double() * smooth.double(), "b.weight": up}

    def same_input(self, names):
        """Fused members share smooth_factor and proj_down: check, and count them as used."""
        for suffix in ("smooth_factor", "proj_down"):
            first = self.get(f"{names[0]}.{suffix}")
            for n in names[1:]:
                assert torch.equal(self.get(f"{n}.{suffix}"), first), (n, suffix)

    def shift_linear(self, dc_name, name, smooth_key, cols=None, bias=True):
        """A GELU-input layer: ShiftedLinear if our layer runs unsigned, else plain."""
        info = self.layers[name]
        if not info.get("act_unsigned"):
            self.put_linear(dc_name, name, cols, bias)
            return dc_name
        lin = f"{dc_name}.linear"
        self.put_linear(lin, name, cols, bias)
        self.model[f"{dc_name}.shift"] = torch.tensor(UNSIGNED_ACT_SHIFT)
        br = self.branch.pop(smooth_key)
        self.branch[smooth_key.replace(dc_name, lin)] = br
        self.smooth[smooth_key.replace(dc_name, lin)] = self.smooth.pop(smooth_key)
        # the converter adds U V_unsmoothed (shift * 1); subtract it here in float64
        v = br["a.weight"] / self.smooth[smooth_key.replace(dc_name, lin)].double()
        extra = br["b.weight"].double() @ v @ torch.full((v.shape[1], 1), UNSIGNED_ACT_SHIFT,
                                                          dtype=torch.float64)  # fmt: skip
        self.model[f"{lin}.bias"] = self.get(f"{name}.bias").double() - extra.reshape(-1)
        return lin

    def awq(self, dc_name, name):
        w, s, _, _ = self.residual(name)
        self.model[f"{dc_name}.weight"] = w.to(torch.bfloat16)
        self.model[f"{dc_name}.bias"] = self.get(f"{name}.bias")
        self.scale[f"{dc_name}.weight.scale.0"] = s.reshape(s.shape[0], 1, -1, 1)


def deepcompressor_dicts(path):
    """(model, scale, smooth, branch) dicts of the dcgen_quant FLUX checkpoint ``path``."""
    d = _Dicts(path)
    cfg = d.config
    for i in range(cfg["num_layers"]):
        b = f"transformer_blocks.{i}"
        for rel in DOUBLE:
            if rel.endswith("net.2"):
                continue
            d.put_linear(f"{b}.{rel}", f"{b}.{rel}")
        d.same_input([f"{b}.attn.to_{x}" for x in "qkv"])
        d.same_input([f"{b}.attn.add_{x}_proj" for x in "qkv"])
        d.smooth_and_branch(f"{b}.attn.to_q", f"{b}.attn.to_q",
                            [f"{b}.attn.to_{x}" for x in "qkv"])  # fmt: skip
        d.smooth_and_branch(f"{b}.attn.add_k_proj", f"{b}.attn.add_k_proj",
                            [f"{b}.attn.add_{x}_proj" for x in "qkv"])  # fmt: skip
        d.smooth_and_branch(f"{b}.attn.to_out.0", f"{b}.attn.to_out.0", [f"{b}.attn.to_out.0"])
        d.smooth_and_branch(f"{b}.attn.to_add_out", f"{b}.attn.to_add_out",
                            [f"{b}.attn.to_add_out"])  # fmt: skip
        for ff in ("ff", "ff_context"):
            d.smooth_and_branch(f"{b}.{ff}.net.0.proj", f"{b}.{ff}.net.0.proj",
                                [f"{b}.{ff}.net.0.proj"])  # fmt: skip
            d.smooth_and_branch(f"{b}.{ff}.net.2", f"{b}.{ff}.net.2", [f"{b}.{ff}.net.2"])
            d.shift_linear(f"{b}.{ff}.net.2", f"{b}.{ff}.net.2", f"{b}.{ff}.net.2")
        for rel in ("norm1.linear", "norm1_context.linear"):
            d.awq(f"{b}.{rel}", f"{b}.{rel}")
        for rel in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            d.model[f"{b}.attn.{rel}.weight"] = d.get(f"{b}.attn.{rel}.weight")
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    for i in range(cfg["num_single_layers"]):
        b = f"single_transformer_blocks.{i}"
        for rel in SINGLE:
            d.put_linear(f"{b}.{rel}", f"{b}.{rel}")
        d.same_input([f"{b}.{rel}" for rel in SINGLE])
        d.smooth_and_branch(f"{b}.attn.to_q", f"{b}.attn.to_q", [f"{b}.attn.to_{x}" for x in "qkv"])
        # mlp_fc1's branch: the group's shared down projection with proj_mlp's rows of up
        d.branch[f"{b}.proj_mlp"] = {  # a copy: the converter divides float64 inputs in place
            "a.weight": d.branch[f"{b}.attn.to_q"]["a.weight"].clone(),
            "b.weight": d.get(f"{b}.proj_mlp.proj_up"),
        }
        d.awq(f"{b}.norm.linear", f"{b}.norm.linear")
        for rel in ("norm_q", "norm_k"):
            d.model[f"{b}.attn.{rel}.weight"] = d.get(f"{b}.attn.{rel}.weight")
        po = f"{b}.proj_out"
        if d.layers[po]["kind"] == "svdq_split":
            parts = [(f"{po}.parts.0", None), (f"{po}.parts.1", None)]
        else:
            k = d.layers[po]["in_features"]
            parts = [(po, (0, inner)), (po, (inner, k))]
        (n0, c0), (n1, c1) = parts
        d.put_linear(f"{po}.linears.0", n0, c0, bias=c0 is None)
        d.smooth_and_branch(f"{po}.linears.0", n0, [n0], c0)
        d.smooth_and_branch(f"{po}.linears.1", n1, [n1], c1)
        d.shift_linear(f"{po}.linears.1", n1, f"{po}.linears.1", c1)
    for key, t in d.t.items():  # the unquantized rest
        if not key.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            d.model[key] = t
            d.used.add(key)
    unused = sorted(k for k in d.t if k not in d.used)
    assert not unused, f"tensors not arranged: {unused[:5]}"
    return d.model, d.scale, d.smooth, d.branch
