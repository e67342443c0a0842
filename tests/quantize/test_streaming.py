"""Streaming quantization (quantize/streaming.py): the checkpoint of ``quantize_model`` +
``save_quantized`` bit for bit, in memory that does not grow with the model's depth; calibration
spilled to disk; resume; the plan's refusals.

Peak host memory is measured as tests/quantize/test_calibration_memory.py does (the peak of live
CPU tensor memory, from torch.profiler's allocation and free records in time order). Measured on
the CPU machine, a tiny FLUX with 8 + 16 blocks in float32 (34 MiB of weights) streams at a peak
of 5.65 MiB, against 4.85 MiB for quantizing its first double block alone (weights, inputs,
reservoirs, the quantizer's working set) and 0.08 MiB of cached calibration inputs.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxTransformer2DModel

import dcgen_quant.quantize.streaming as streaming_module
from dcgen_quant.bench.quantize_scale import write_random_flux
from dcgen_quant.checkpoint import load_quantized, read_metadata, save_quantized
from dcgen_quant.models import family_for, synthetic_calibration
from dcgen_quant.models.tiny import TINY_FLUX_CONFIG, tiny_flux, tiny_sana
from dcgen_quant.quantize import QuantConfig, quantize_model
from dcgen_quant.quantize.block import quantize_block
from dcgen_quant.quantize.calibration import capture_block_inputs
from dcgen_quant.quantize.streaming import StreamOptions, StreamSource, quantize_streaming
from dcgen_quant.quantize.weights import materialize, module_bytes, release

from ..quantized_models import MINIMAL_QUANT  # plumbing, not quality, is tested here
from .helpers import peak_live_bytes

SMALL_FLUX = {"num_attention_heads": 2, "joint_attention_dim": 128, "pooled_projection_dim": 64}


pytestmark = pytest.mark.usefixtures("one_thread")


def assert_same_checkpoint(a_path, b_path):
    """Same tensors bit for bit, same layers, config and model; same report but the timings."""
    a, b = load_quantized(a_path).state_dict(), load_quantized(b_path).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    ma, mb = read_metadata(a_path), read_metadata(b_path)
    for key in ("format_version", "quantization_config", "model", "layers", "checksums"):
        assert ma[key] == mb[key], key

    def untimed(calibration):
        layers = [{k: v for k, v in x.items() if k != "seconds"} for x in calibration["layers"]]
        summary = {k: v for k, v in calibration["summary"].items() if k != "total_seconds"}
        return {**calibration, "layers": layers, "summary": summary}

    assert untimed(ma["calibration"]) == untimed(mb["calibration"])


def stream(source, calib, config, out, state, **options):
    options.setdefault("progress", False)
    options.setdefault("log", lambda line: None)
    opts = StreamOptions(**options)
    quantize_streaming(source, calib, config, out, state, opts)
    return opts.stats


def one_block_peak(source, calib, config) -> int:
    """Peak live bytes of quantizing the first double block alone: its weights, its inputs, the
    reservoirs and the quantizer's working set (what quantizing one block takes)."""
    model = source.meta_model()
    family = family_for(model)
    blocks = family.blocks(model)
    prefixes = tuple(f"{name}." for name, _ in blocks)
    materialize(model, "", source.weights, "cpu", config.dtype, skip=prefixes)
    inputs = capture_block_inputs(model, family, calib)
    name, block = blocks[0]
    plan = family.plan_block(name, block, config)

    def work():
        materialize(block, f"{name}.", source.weights, "cpu", config.dtype)
        quantize_block(model, plan, enumerate(inputs), config)
        release(block)

    return peak_live_bytes(work)


@pytest.mark.slow
def test_streaming_is_the_in_memory_checkpoint_in_bounded_memory(tmp_path):
    config = QuantConfig(**MINIMAL_QUANT, dtype=torch.float32)
    # 8 + 16 blocks, random weights written one shard per block (sharded reading is covered)
    write_random_flux(tmp_path / "flux", {**TINY_FLUX_CONFIG, **SMALL_FLUX, "num_layers": 8,
                                          "num_single_layers": 16})  # fmt: skip
    model = FluxTransformer2DModel.from_pretrained(tmp_path / "flux").eval()
    total = module_bytes(model)
    calib = synthetic_calibration(model, samples=2, steps=2, latent_size=4, text_tokens=4)
    quantize_model(model, calib, config, progress=False)  # the in-memory path
    save_quantized(model, tmp_path / "memory.safetensors")
    del model

    source = StreamSource.from_directory(tmp_path / "flux")
    stats = {}

    def run():
        stats.update(stream(source, calib, config, tmp_path / "stream.safetensors", tmp_path / "s"))

    peak = peak_live_bytes(run)
    assert_same_checkpoint(tmp_path / "memory.safetensors", tmp_path / "stream.safetensors")

    block = one_block_peak(source, calib, config)
    calibration = stats["cache"]["peak_memory_bytes"]
    sizes = {"8+16 streamed": peak, "one block": block, "calibration": calibration, "model": total}
    mib = {k: round(v / 2**20, 2) for k, v in sizes.items()}
    print(mib)
    # within 1.5x what quantizing one block takes, plus the calibration cache ...
    assert peak < 1.5 * block + calibration, mib
    # ... which excludes holding the model, as the in-memory path must
    assert 1.5 * block + calibration < total, mib
    # the plan's estimate covers what was measured
    assert stats["plan"]["host_fixed"] + stats["plan"]["cache_memory"] > peak, mib


def _interrupt_at(monkeypatch, block_index: int):
    calls = {"n": 0}
    real = streaming_module.quantize_block

    def interrupted(*args, **kwargs):
        if calls["n"] == block_index:
            raise KeyboardInterrupt("simulated interruption")
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(streaming_module, "quantize_block", interrupted)
    return real


@pytest.mark.slow
def test_spilled_calibration_and_resume_are_bit_identical(tmp_path, monkeypatch):
    config = QuantConfig(**MINIMAL_QUANT)  # bf16, as the CLI
    model = tiny_flux(dtype=torch.bfloat16, **SMALL_FLUX)
    model.save_pretrained(tmp_path / "flux")
    calib = synthetic_calibration(model, samples=3, steps=1, latent_size=4, text_tokens=4)
    source = StreamSource.from_directory(tmp_path / "flux")
    memory = stream(source, calib, config, tmp_path / "memory.safetensors", tmp_path / "s0",
                    calib_cache="memory")  # fmt: skip
    assert memory["cache"]["on_disk"] == 0

    disk = stream(source, calib, config, tmp_path / "disk", tmp_path / "s1", calib_cache="disk")
    assert disk["cache"]["on_disk"] == 3 and disk["cache"]["peak_memory_bytes"] == 0
    assert_same_checkpoint(tmp_path / "memory.safetensors", tmp_path / "disk")
    assert len(list((tmp_path / "disk").glob("model-*-of-00005.safetensors"))) == 5

    # --max-host-memory below the calibration set: one sample stays in memory, two spill
    plan = memory["plan"]
    budget = plan["host_fixed"] + plan["sample_bytes"] + plan["sample_bytes"] // 2
    auto = stream(source, calib, config, tmp_path / "auto.safetensors", tmp_path / "s2",
                  max_host_memory=budget)  # fmt: skip
    assert auto["cache"]["in_memory"] == 1 and auto["cache"]["on_disk"] == 2
    assert sorted(p.name for p in (tmp_path / "s2" / "calib").glob("static-*")) == [
        "static-000001.pt",
        "static-000002.pt",
    ]
    assert_same_checkpoint(tmp_path / "memory.safetensors", tmp_path / "auto.safetensors")

    # interrupted after 2 blocks, resumed: spilled samples are taken from disk, the one in
    # memory is recomputed through the two finished blocks
    real = _interrupt_at(monkeypatch, 2)
    state = tmp_path / "s3"
    with pytest.raises(KeyboardInterrupt):
        stream(source, calib, config, tmp_path / "resumed.safetensors", state,
               max_host_memory=budget)  # fmt: skip
    progress = json.loads((state / "progress.json").read_text())
    assert progress["next_block"] == 2 and not (tmp_path / "resumed.safetensors").exists()
    assert sorted(p.name for p in (state / "calib").glob("gen-*")) == ["gen-0002"]
    monkeypatch.setattr(streaming_module, "quantize_block", real)

    # a damaged state is refused, naming the file, before anything is used
    block, text = state / "block-0001.safetensors", (state / "progress.json").read_text()
    data = block.read_bytes()
    block.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ValueError, match=r"block-0001\.safetensors does not match its SHA-256"):
        stream(source, calib, config, tmp_path / "resumed.safetensors", state)
    block.write_bytes(data)
    (state / "progress.json").write_text(text.replace('"next_block": 2', '"next_block": 1'))
    with pytest.raises(ValueError, match=r"progress\.json does not match its SHA-256"):
        stream(source, calib, config, tmp_path / "resumed.safetensors", state)
    (state / "progress.json").write_text(text)

    stream(source, calib, config, tmp_path / "resumed.safetensors", state, max_host_memory=budget)
    assert_same_checkpoint(tmp_path / "memory.safetensors", tmp_path / "resumed.safetensors")


def test_tiny_sana_from_memory_matches_quantize_model(tmp_path):
    config = QuantConfig(**MINIMAL_QUANT, format="nvfp4")
    model = tiny_sana(dtype=torch.bfloat16)
    calib = synthetic_calibration(model, samples=2, steps=1, latent_size=4, text_tokens=4)
    source = StreamSource.from_module(model)  # the built-in models stream from memory
    stream(source, calib, config, tmp_path / "stream.safetensors", tmp_path / "state")
    quantize_model(model, calib, config, progress=False)
    save_quantized(model, tmp_path / "memory.safetensors")
    assert_same_checkpoint(tmp_path / "memory.safetensors", tmp_path / "stream.safetensors")


def test_plan_is_printed_and_refuses_what_cannot_fit(tmp_path):
    config = QuantConfig(**MINIMAL_QUANT)
    model = tiny_flux(dtype=torch.bfloat16, **SMALL_FLUX)
    calib = synthetic_calibration(model, samples=2, steps=1, latent_size=4, text_tokens=4)
    source = StreamSource.from_module(model)
    lines: list[str] = []
    plan = stream(source, calib, config, tmp_path / "ok.safetensors", tmp_path / "ok",
                  log=lines.append)["plan"]  # fmt: skip
    assert lines[0].startswith("plan: FluxTransformer2DModel, 2 + 2 blocks on cpu; calibration 2")
    assert any("host memory" in line for line in lines)

    out, state = tmp_path / "q.safetensors", tmp_path / "state"
    with pytest.raises(ValueError, match=r"--max-host-memory \(1\.0 MiB\) cannot hold one block"):
        stream(source, calib, config, out, state, max_host_memory=2**20)
    # room for a block and its batch, not for the calibration kept in memory
    with pytest.raises(ValueError, match=r"--calib-cache memory: the calibration cache needs"):
        stream(source, calib, config, out, state, calib_cache="memory",
               max_host_memory=plan["host_fixed"] + plan["sample_bytes"])  # fmt: skip
    assert not out.exists() and not state.exists()
