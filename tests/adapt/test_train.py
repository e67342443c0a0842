"""The training loop: determinism, checkpoint/resume after an interrupt, EMA, errors."""

import json

import pytest
import torch

from dcgen_quant.adapt import train as T
from dcgen_quant.adapt.train import TrainConfig, train


class Interrupt(Exception):
    pass


def problem(seed=0):
    """A small regression whose batches come only from the step generator."""
    model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model:
            if isinstance(m, torch.nn.Linear):
                m.reset_parameters()
    target = torch.randn(7, 3, generator=torch.Generator().manual_seed(99))

    def loss_fn(step, gen):
        x = torch.randn(5, 7, generator=gen)
        return torch.mean((model(x) - x @ target) ** 2)

    return model, dict(model.named_parameters()), loss_fn


def saved_step(ckpt):
    return json.loads((ckpt / "meta.json").read_text())["step"]


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture
def hooks():
    yield T.STEP_HOOKS
    T.STEP_HOOKS.clear()


def raise_at(k):
    def hook(name, done):
        if done == k:
            raise Interrupt(f"injected at step {k}")

    return hook


CFG = dict(steps=23, lr=1e-2, ema=0.9, grad_clip=1.0, ckpt_every=5, seed=4)


def test_same_seed_same_weights_and_loss_goes_down(tmp_path):
    m1, p1, f1 = problem()
    r1 = train("t", p1, f1, TrainConfig(**CFG), progress=False)
    m2, p2, f2 = problem()
    train("t", p2, f2, TrainConfig(**CFG), ckpt_path=tmp_path / "ckpt", progress=False)
    for n, w in weights(m1).items():
        assert torch.equal(w, weights(m2)[n])
    assert len(r1.losses) == 23 and r1.losses[-1] < r1.losses[0]


@pytest.mark.parametrize("k", [3, 5, 17])
def test_interrupt_then_resume_equals_uninterrupted(tmp_path, hooks, k):
    ref_model, ref_params, ref_fn = problem()
    ref = train("t", ref_params, ref_fn, TrainConfig(**CFG), progress=False)

    model, params, fn = problem()
    hooks.append(raise_at(k))
    with pytest.raises(Interrupt):
        train("t", params, fn, TrainConfig(**CFG), ckpt_path=tmp_path / "ckpt", progress=False)
    hooks.clear()
    assert saved_step(tmp_path / "ckpt") == k  # the interrupt saved the last completed step
    model2, params2, fn2 = problem(seed=1)  # different init: everything must come from the file
    res = train(
        "t",
        params2,
        fn2,
        TrainConfig(**CFG),
        ckpt_path=tmp_path / "ckpt",
        resume=True,
        progress=False,
    )
    assert res.resumed_from == k
    assert res.losses == pytest.approx(ref.losses, rel=0, abs=0)
    for n, w in weights(ref_model).items():
        torch.testing.assert_close(weights(model2)[n], w, rtol=1e-6, atol=1e-7)


def test_interrupt_inside_an_update_falls_back_to_the_periodic_checkpoint(tmp_path, monkeypatch):
    ref_model, ref_params, ref_fn = problem()
    train("t", ref_params, ref_fn, TrainConfig(**CFG), progress=False)

    model, params, fn = problem()
    calls = {"n": 0}
    real_clip = T.clip_grad_norm

    def clip(*args, **kwargs):  # clip runs inside the update, after backward
        calls["n"] += 1
        if calls["n"] == 13:
            raise Interrupt("inside the update of step 13")
        return real_clip(*args, **kwargs)

    monkeypatch.setattr(T, "clip_grad_norm", clip)
    with pytest.raises(Interrupt):
        train("t", params, fn, TrainConfig(**CFG), ckpt_path=tmp_path / "ckpt", progress=False)
    monkeypatch.undo()
    assert saved_step(tmp_path / "ckpt") == 10  # not 12
    model2, params2, fn2 = problem(seed=1)
    train(
        "t",
        params2,
        fn2,
        TrainConfig(**CFG),
        ckpt_path=tmp_path / "ckpt",
        resume=True,
        progress=False,
    )
    for n, w in weights(ref_model).items():
        torch.testing.assert_close(weights(model2)[n], w, rtol=1e-6, atol=1e-7)


def test_ema_weights_are_the_result(hooks):
    model, params, fn = problem()
    ema = weights(model)
    snapshots = []
    hooks.append(lambda name, done: snapshots.append(weights(model)))
    train("t", params, fn, TrainConfig(steps=4, lr=0.1, ema=0.2, seed=0), progress=False)
    assert len(snapshots) == 4
    for t, raw in enumerate(snapshots):
        decay = min(0.2, (1 + t) / (10 + t))  # diffusers EMAModel's warm-up
        ema = {n: decay * ema[n] + (1 - decay) * raw[n] for n in ema}
    for n, w in weights(model).items():
        torch.testing.assert_close(w, ema[n], rtol=1e-6, atol=1e-7)
        assert not torch.allclose(w, snapshots[-1][n])


def test_checkpoint_errors(tmp_path):
    model, params, fn = problem()

    def run(name="t", steps=4, lr=1e-3, resume=True):
        cfg = TrainConfig(steps=steps, lr=lr)
        train(name, params, fn, cfg, ckpt_path=tmp_path / "ckpt", resume=resume, progress=False)

    run(steps=2, resume=False)
    with pytest.raises(FileExistsError, match="resume=True"):
        run(resume=False)
    with pytest.raises(ValueError, match="'lr': \\(0.001, 0.01\\)"):
        run(lr=1e-2)
    with pytest.raises(ValueError, match="expected 'u'"):
        run(name="u")
    with pytest.raises(ValueError, match="already done 2 steps"):
        run(steps=1)


def test_non_finite_loss_is_an_error():
    model, params, fn = problem()
    with pytest.raises(FloatingPointError, match="loss is nan at step 0"):
        train(
            "t", params, lambda s, g: fn(s, g) * float("nan"), TrainConfig(steps=2), progress=False
        )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"steps": -1}, "steps: got -1"),
        ({"steps": 1, "lr": 0}, "lr: got 0"),
        ({"steps": 1, "ema": 1.0}, "ema: got 1.0"),
        ({"steps": 1, "batch_size": 0}, "batch_size: got 0"),
        ({"steps": 1, "grad_clip": -1.0}, "grad_clip: got -1.0"),
        ({"steps": 1, "ckpt_every": 0}, "ckpt_every: got 0"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_foreign_damaged_or_legacy_checkpoints_are_one_line_errors(tmp_path):
    model, params, fn = problem()
    cfg = TrainConfig(steps=2, lr=1e-3)
    ckpt = tmp_path / "ckpt"
    (tmp_path / "ckpt.pt").write_bytes(b"an old single-file checkpoint")
    with pytest.raises(ValueError, match="ckpt.pt is a checkpoint of an earlier version"):
        train("t", params, fn, cfg, ckpt_path=ckpt, resume=True, progress=False)
    (tmp_path / "ckpt.pt").unlink()
    ckpt.mkdir()
    (ckpt / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="is not a stage checkpoint"):
        train("t", params, fn, cfg, ckpt_path=ckpt, resume=True, progress=False)
    import shutil

    shutil.rmtree(ckpt)
    train("t", params, fn, cfg, ckpt_path=ckpt, progress=False)
    # the same stage name and hyperparameters, another model: the tensors do not fit
    other = torch.nn.Linear(7, 3)
    with pytest.raises(ValueError, match="cannot be loaded into this stage"):
        train(
            "t",
            dict(other.named_parameters()),
            lambda s, g: other(torch.randn(2, 7, generator=g)).sum(),
            TrainConfig(steps=3, lr=1e-3),
            ckpt_path=ckpt,
            resume=True,
            progress=False,
        )
    (ckpt / "meta.json").write_text("{")
    with pytest.raises(ValueError, match="meta.json is unreadable"):
        train("t", params, fn, TrainConfig(steps=3, lr=1e-3), ckpt_path=ckpt, resume=True)


def test_grad_accum_splits_the_batch_without_changing_the_steps(tmp_path):
    def run(accum):
        model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for m in model:
                if isinstance(m, torch.nn.Linear):
                    m.reset_parameters()
        seen = []

        def loss_fn(step, gen, rows):
            x = torch.randn(6, 7, generator=gen)[rows]  # the whole batch drawn, rows kept
            seen.append(len(rows))
            return torch.mean(torch.tanh(model(x)) ** 2)

        cfg = TrainConfig(steps=5, lr=1e-2, batch_size=6, grad_clip=0.5, grad_accum=accum)
        res = train("t", dict(model.named_parameters()), loss_fn, cfg, split_batch=True)
        return weights(model), res.losses, seen

    w1, l1, seen1 = run(1)
    w3, l3, seen3 = run(4)
    assert seen1 == [6] * 5 and seen3 == [2, 2, 1, 1] * 5
    assert l3 == pytest.approx(l1, rel=1e-6)
    for n in w1:
        torch.testing.assert_close(w3[n], w1[n], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="grad_accum: got 7"):
        run(7)
