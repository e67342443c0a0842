"""Write the legacy checkpoint fixtures of tests/test_checkpoint_compat.py (run once, committed).

The files in this folder were written by dcgen_quant at commit dd83c74 (format versions 1 and 2,
before the header checksum existed) with::

    PYTHONPATH=. python tests/data/make_legacy_fixtures.py

Each ``legacy_v<N>_<fmt>.safetensors`` is a really quantized (quantize_model, fast settings)
FLUX transformer small enough to commit (hidden 64, one double and one single block);
``legacy_v<N>_<fmt>.outputs.safetensors`` holds the forward inputs and the outputs that the
writing code computed from the loaded checkpoint, which a later reader must reproduce exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
# hidden 64 = 1 head x 64; rope axes sum to the head dim; one block of each kind
SMALL_FLUX = {
    "num_attention_heads": 1,
    "attention_head_dim": 64,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 64,
    "num_layers": 1,
    "num_single_layers": 1,
}
FAST = {"smooth_grid": 2, "lowrank_iters": 1, "calib_tokens": 256, "search_tokens": 128}


def inputs(model, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c = model.config
    side = 4
    img_ids = torch.stack(
        torch.meshgrid(
            torch.zeros(1), torch.arange(float(side)), torch.arange(float(side)), indexing="ij"
        ),
        -1,
    ).reshape(-1, 3)
    return {
        "hidden_states": torch.randn(1, side * side, c.in_channels, generator=g).bfloat16(),
        "encoder_hidden_states": torch.randn(1, 8, c.joint_attention_dim, generator=g).bfloat16(),
        "pooled_projections": torch.randn(1, c.pooled_projection_dim, generator=g).bfloat16(),
        "timestep": torch.tensor([0.7]),
        "img_ids": img_ids.float(),
        "txt_ids": torch.zeros(8, 3),
        "guidance": torch.tensor([3.5]),
    }


def main() -> None:
    from dcgen_quant.checkpoint import load_quantized, read_metadata, save_quantized
    from dcgen_quant.models import synthetic_calibration
    from dcgen_quant.models.tiny import tiny_flux
    from dcgen_quant.quantize import QuantConfig, quantize_model

    torch.set_num_threads(1)
    # int4 with unsigned GELU inputs and split proj_out: version 2; nvfp4: version 1
    for fmt, version in (("nvfp4", 1), ("int4", 2)):
        model = tiny_flux(seed=0, dtype=torch.bfloat16, **SMALL_FLUX)
        calib = synthetic_calibration(model, samples=1, steps=1, seed=0)
        quantize_model(model, calib, QuantConfig(format=fmt, rank=4, **FAST), progress=False)
        path = save_quantized(model, HERE / f"legacy_v{version}_{fmt}.safetensors")
        assert read_metadata(path)["format_version"] == version
        loaded = load_quantized(path)
        x = inputs(loaded)
        with torch.no_grad():
            y = loaded(**x).sample
        tensors = {f"input.{k}": v for k, v in x.items()}
        outputs = HERE / f"legacy_v{version}_{fmt}.outputs.safetensors"
        save_file({**tensors, "output": y}, str(outputs))
        print(path, path.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
