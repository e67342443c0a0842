"""Activation checkpointing (same gradients, less memory) and the memory plan (vs measured)."""

import copy

import pytest
import torch

from dcgen_quant.adapt import family as fam
from dcgen_quant.adapt import memory_plan as MP
from dcgen_quant.adapt.data import HashedText
from dcgen_quant.adapt.flow import FlowObjective, flow_loss
from dcgen_quant.models.tiny import tiny_flux

from .helpers import chain_args, run_cli

# Many blocks so that activations dominate; hidden 128 (2 heads of 64).
DEEP = {"num_attention_heads": 2, "num_layers": 3, "num_single_layers": 6}
LATENT = (32, 8, 8)  # 64 image tokens at patch 1
TEXT = (16, 256)


def lora_model(deep=DEEP, rank=8):
    from dcgen_quant.adapt.runner import trainable_names
    from dcgen_quant.adapt.stages import add_lora
    from dcgen_quant.adapt.surgery import surgery

    base = tiny_flux(seed=3, **deep)
    model = surgery(base, LATENT[0], 1, head_init="default", seed=1)
    add_lora(model, rank, float(rank), seed=2)
    g = torch.Generator().manual_seed(5)
    names = set(trainable_names(model, "lora"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B" in n:  # B = 0 would give A no gradient
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            p.requires_grad_(n in names)
    return model


def step_grads(model, checkpoint: bool, batch=4):
    if checkpoint:
        model.enable_gradient_checkpointing()
    g = torch.Generator().manual_seed(0)
    z = torch.randn((batch, *LATENT), generator=g)
    text = HashedText(TEXT[1], 128, TEXT[0]).encode(["a cat", "a dog", "", "the moon"][:batch])
    empty = HashedText(TEXT[1], 128, TEXT[0]).encode([""])
    obj = FlowObjective(guidance="distilled", text_drop=0.1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    tracker = MP.LiveBytes("cpu")
    tracker.external([*model.parameters(), *model.buffers(), z, text.embeds, text.pooled])
    tracker.external([empty.embeds, empty.pooled])
    tracker.watch_grads(trainable)
    with tracker:
        loss = flow_loss(model, z, text, empty, g, obj, 1)
        loss.backward()
        del loss
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, tracker.peak_less_grads


@pytest.mark.slow
def test_checkpointing_gives_the_same_gradients_less_memory_and_the_planned_memory():
    torch.set_num_threads(1)
    model = lora_model()
    plain, mem_plain = step_grads(copy.deepcopy(model), checkpoint=False)
    ckpt, mem_ckpt = step_grads(copy.deepcopy(model), checkpoint=True)
    assert plain.keys() == ckpt.keys() and len(plain) > 100
    for n in plain:
        # the recomputed forward runs the same ops on the same inputs: same float32 results
        # (the tolerance is the 1-vs-N one of test_distributed.py; measured: bit-identical)
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-6, msg=n)
        assert plain[n].abs().sum() > 0, n
    # measured live-tensor peak of the step (activations and temporaries, not the gradients)
    print(f"9-block tiny FLUX, batch 4: peak {mem_plain / 2**20:.1f} MiB without, "
          f"{mem_ckpt / 2**20:.1f} MiB with checkpointing")  # fmt: skip
    assert mem_ckpt < 0.5 * mem_plain
    # the plan simulates the same step on the meta device (float32: no autocast either way)
    for flag, measured in ((False, mem_plain), (True, mem_ckpt)):
        meta = copy.deepcopy(model).to("meta")
        est, _ = MP.simulate_step(
            meta, "lora", 4, LATENT, TEXT, pooled=128, guided=True, grad_checkpoint=flag
        )
        assert est == pytest.approx(measured, rel=0.1), (flag, est, measured)


@pytest.mark.slow
def test_plan_extrapolated_from_shallow_models_equals_the_full_simulation():
    base = tiny_flux(seed=3, num_attention_heads=2, num_layers=3, num_single_layers=3).to("meta")
    kw = {"new_channels": LATENT[0], "patch": 1, "rank": 8, "alpha": 8.0, "dtype": "bfloat16"}
    model = MP.meta_stage_model(base, "lora", **kw)
    args = {"batch": 4, "latent": LATENT, "text": TEXT, "pooled": 128, "grad_checkpoint": True}

    def shallow(overrides):
        return MP.meta_stage_model(MP.meta_copy(base, **overrides), "lora", **kw)

    full = MP.plan(model, "lora", **args)
    short = MP.plan(model, "lora", **args, shallow=shallow)
    assert short.activations_plain == full.activations_plain
    assert short.activations_ckpt == full.activations_ckpt
    assert full.activations_ckpt < full.activations_plain
    assert full.total() == short.total() and full.total(False) > full.total(True)
    # sharding: frozen block weights and block LoRA split over 4 processes, 4x fewer rows each
    four = MP.plan(model, "lora", **args, processes=4)
    blocks = [p for _, b in fam.blocks(model) for p in b.parameters()]
    frozen = sum(p.numel() * 2 for p in blocks if not p.requires_grad)  # bf16
    lora = sum(p.numel() * 4 for p in blocks if p.requires_grad)
    assert full.weights - four.weights == pytest.approx(frozen * 3 / 4, abs=8)
    assert full.trainable - four.trainable == pytest.approx(lora * 3 / 4, abs=8)
    assert four.micro_batch == 1 and four.gather > 0
    assert four.activations_plain < full.activations_plain


def test_a_plan_that_does_not_fit_is_refused_before_training(flux_inputs, tmp_path, capsys):
    out = tmp_path / "small"
    limit = str(MP.HEADROOM_GIB + 0.001)  # 1 MiB: less than the tiny model's weights
    argv = chain_args(flux_inputs, out, "--stage", "head", "--steps", "2", "--memory-limit", limit)
    code, _, err = run_cli(argv, capsys)
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: memory: stage head needs about") and "--grad-checkpoint" in line
    assert "memory plan per device" in err  # the plan was printed first
    assert not (out / "head").exists()  # nothing trained


def test_scale_flag_errors_are_one_line(flux_inputs, tmp_path, capsys):
    cases = [
        (["--grad-accum", "0"], "--grad-accum: got 0"),
        (["--memory-limit", "-2"], "--memory-limit: got -2.0"),
    ]
    for extra, message in cases:
        code, _, err = run_cli(chain_args(flux_inputs, tmp_path / "o", *extra), capsys)
        assert code == 2 and err.startswith("error: ") and message in err, err
        assert len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["adapt", "--demo", "--no-report", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--no-report" in err
