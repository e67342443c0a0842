"""Pipeline calibration with the text encoders run once and the transformer streamed block by block
(quantize/pipeline_capture.py) records what the plain pipeline records."""

from __future__ import annotations

import pytest
import torch

from dcgen_quant.models import capture_pipeline_calibration
from dcgen_quant.models.tiny_pipeline import tiny_flux_pipeline, tiny_sana_pipeline
from dcgen_quant.quantize.pipeline_capture import capture_streamed
from dcgen_quant.quantize.streaming import StreamSource

PROMPTS = ["a red fox in snow", "a lighthouse at dusk", "a bowl of ramen"]


pytestmark = pytest.mark.usefixtures("one_thread")


def assert_equal(a, b, where="record"):
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.slow
def test_streamed_flux_capture_is_the_pipelines(tmp_path):
    pipe = tiny_flux_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    call = {"height": 32, "width": 32, "max_sequence_length": 16}
    want = capture_pipeline_calibration(pipe, PROMPTS, 2, seed=3, **call)
    source = StreamSource.from_directory(tmp_path / "pipe" / "transformer")
    got = capture_streamed(tmp_path / "pipe", source, PROMPTS, 2, seed=3, dtype=torch.float32,
                           resident=False, state_dir=tmp_path / "state", **call)  # fmt: skip
    assert len(got) == len(PROMPTS) * 2
    assert_equal(want, got)
    # kept for --resume, and answered from there without running the pipeline
    again = capture_streamed(tmp_path / "nowhere", source, PROMPTS, 2, seed=3,
                             dtype=torch.float32, state_dir=tmp_path / "state", **call)  # fmt: skip
    assert_equal(want, again)

    # two prompts per call: per-prompt records of the same shapes (the batched forward may round
    # differently, so only shapes and the non-computed inputs are compared)
    batched = capture_streamed(tmp_path / "pipe", source, PROMPTS, 2, seed=3, batch=2,
                               dtype=torch.float32, **call)  # fmt: skip
    assert len(batched) == len(got)
    for a, b in zip(got, batched):
        assert a.keys() == b.keys()
        assert a["hidden_states"].shape == b["hidden_states"].shape
        assert torch.equal(a["timestep"], b["timestep"])


@pytest.mark.slow
def test_streamed_sana_capture_with_guidance_batches(tmp_path):
    pipe = tiny_sana_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    call = {"height": 32, "width": 32, "max_sequence_length": 16,
            "complex_human_instruction": None, "use_resolution_binning": False}  # fmt: skip
    want = capture_pipeline_calibration(pipe, PROMPTS[:2], 2, seed=0, **call)
    source = StreamSource.from_directory(tmp_path / "pipe" / "transformer")
    got = capture_streamed(tmp_path / "pipe", source, PROMPTS[:2], 2, dtype=torch.float32,
                           resident=False, **call)  # fmt: skip
    assert_equal(want, got)
    assert got[0]["hidden_states"].shape[0] == 2  # unconditional + conditional rows
    batched = capture_streamed(tmp_path / "pipe", source, PROMPTS[:2], 2, batch=2,
                               dtype=torch.float32, **call)  # fmt: skip
    # a call on 2 prompts with guidance has 4 rows: each prompt gets its (uncond, cond) pair
    assert [r["hidden_states"].shape[0] for r in batched] == [2] * 4
    for a, b in zip(got, batched):
        assert torch.equal(a["encoder_attention_mask"], b["encoder_attention_mask"])
