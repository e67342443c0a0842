"""Calibration plumbing: first-block inputs, block-by-block runs, per-layer input collection.

Streaming scheme (peak memory ~ one block's inputs for all calibration samples):

1. :func:`capture_block_inputs` runs the model on every calibration sample only up to its first
   transformer block (a forward pre-hook records the block's arguments and stops the forward);
2. for each block in order, :class:`InputCollector` hooks the block's target linears and keeps a
   uniform random subsample of their input tokens over all samples (:class:`TokenReservoir`);
   the linears are quantized; then :func:`run_block` runs the *quantized* block on the cached
   inputs to produce the next block's inputs, so later blocks calibrate on what they will
   really receive.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .layer import check_finite, seed_for, tokens_of


class _StopForward(Exception):
    """Raised by the first block's pre-hook: the rest of the model need not run."""

    def __init__(self, inputs: dict[str, Any]):
        super().__init__("stopped at the first transformer block")
        self.inputs = inputs


def check_calibration(calib: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Validate calibration samples (dicts of ``model.forward`` keyword arguments).

    Raises ValueError naming the sample and argument that is not a dict or holds NaN/Inf.
    """
    calib = list(calib)
    if not calib:
        raise ValueError("calibration data is empty; need at least one sample")

    def visit(value, where):
        if isinstance(value, torch.Tensor):
            if value.is_floating_point():
                check_finite(value, where)
        elif isinstance(value, Mapping):
            for k, v in value.items():
                visit(v, f"{where}[{k!r}]")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                visit(v, f"{where}[{i}]")

    for i, sample in enumerate(calib):
        if not isinstance(sample, Mapping):
            raise ValueError(
                f"calibration sample {i} must be a dict of model.forward keyword arguments, "
                f"got {type(sample).__name__}"
            )
        for key, value in sample.items():
            visit(value, f"calibration sample {i}, argument {key!r}")
    return calib


def capture_block_inputs(model: nn.Module, family, calib) -> list[dict[str, Any]]:
    """Keyword inputs of the model's first transformer block, one dict per calibration sample."""
    blocks = family.blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no transformer blocks to quantize")
    first = blocks[0][1]

    def hook(module, args, kwargs):
        raise _StopForward(family.bind_inputs(module, args, kwargs))

    inputs = []
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for i, sample in enumerate(calib):
                try:
                    model(**sample)
                except _StopForward as stop:
                    inputs.append(stop.inputs)
                else:
                    raise RuntimeError(
                        f"calibration sample {i}: the model's forward never reached its first "
                        "transformer block"
                    )
    finally:
        handle.remove()
    return inputs


def run_block(family, block: nn.Module, inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The next block's inputs: ``block`` applied to every cached sample."""
    with torch.no_grad():
        return [family.next_inputs(kw, block(**kw)) for kw in inputs]


class TokenReservoir:
    """A uniform random subsample (without replacement) of a stream of tokens.

    Every token gets a random key; the ``capacity`` tokens with the smallest (key, stream
    position) are kept, in stream order. The keys of calibration sample ``i`` come from a
    generator seeded with ``(seed, i)`` (:meth:`begin_sample`), so they do not depend on which
    other samples this process saw: reservoirs filled by several processes on disjoint runs of
    samples and concatenated in sample order (:meth:`merge`) hold exactly what one process that
    saw every sample holds. Equal keys (float32 keys collide once the stream has millions of
    tokens) are ordered by stream position, never by the sort's whim. O(capacity) memory,
    whatever the number of samples and timesteps, and independent of how they are batched.
    """

    def __init__(self, capacity: int, seed: int, device: torch.device | str = "cpu"):
        self.capacity = capacity
        self.seed = seed
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed_for(seed, "sample 0"))
        self.keys: torch.Tensor | None = None
        self.data: torch.Tensor | None = None
        self.seen = 0

    def begin_sample(self, index: int) -> None:
        """The tokens added next belong to calibration sample ``index`` (global numbering)."""
        self.generator.manual_seed(seed_for(self.seed, f"sample {index}"))

    def add(self, tokens: torch.Tensor) -> None:
        """tokens : Tensor [T, K] (kept in their dtype)."""
        keys = torch.rand(tokens.shape[0], generator=self.generator, device=self.generator.device)
        self.seen += tokens.shape[0]
        self._keep([self.keys, keys.to(tokens.device)], [self.data, tokens])

    def _keep(self, keys: list, data: list) -> None:
        keys = [k for k in keys if k is not None]
        data = [d for d in data if d is not None]
        keys = torch.cat(keys) if len(keys) > 1 else keys[0]
        data = torch.cat(data) if len(data) > 1 else data[0]
        if keys.shape[0] > self.capacity:
            order = torch.sort(keys, stable=True).indices[: self.capacity]
            keep = order.sort().values
            keys, data = keys[keep], data[keep]
        self.keys, self.data = keys, data.detach().clone()

    def state(self) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
        """(keys [n], tokens [n, K], tokens seen): what :meth:`merge` combines."""
        return self.keys, self.data, self.seen

    @classmethod
    def merge(cls, capacity: int, seed: int, parts, device=None) -> TokenReservoir:
        """One reservoir from the :meth:`state` of reservoirs that saw consecutive runs of the
        sample stream, given in stream order: equal to a reservoir that saw the whole stream."""
        merged = cls(capacity, seed)
        parts = [p for p in parts if p[1] is not None]
        merged.seen = sum(p[2] for p in parts)
        move = (lambda t: t.to(device)) if device is not None else (lambda t: t)
        if len(parts) == 1:  # one process: nothing to merge (and no copy)
            merged.keys, merged.data = move(parts[0][0]), move(parts[0][1])
        elif parts:
            merged._keep([move(p[0]) for p in parts], [move(p[1]) for p in parts])
        return merged

    def tokens(self) -> torch.Tensor:
        if self.data is None:
            raise RuntimeError("no tokens were collected")
        return self.data


class InputCollector:
    """Forward pre-hooks that fill one :class:`TokenReservoir` per group of target linears.

    Parameters
    ----------
    groups : list of (names, modules, reservoir): the members of a group share one input; the
        first member's input is collected, and on the first call the others are checked to see
        the same tensor (a wrong fused-group definition would otherwise go unnoticed).
    """

    def __init__(self, groups):
        self.groups = groups
        self.handles = []
        self.first_inputs: dict[str, torch.Tensor] = {}
        self.checking = True

    def _collect(self, name, module, reservoir):
        conv = isinstance(module, nn.Conv2d)
        k = module.in_channels if conv else module.in_features

        def hook(_module, args):
            x = args[0]
            tokens = tokens_of(x, k, conv, name)
            if tokens.is_floating_point():
                check_finite(tokens, f"layer {name}: calibration inputs")
            reservoir.add(tokens)
            if self.checking:
                self.first_inputs.setdefault(name, x)

        return hook

    def _watch(self, name):
        def hook(_module, args):
            if self.checking:
                self.first_inputs.setdefault(name, args[0])

        return hook

    def __enter__(self):
        for names, modules, reservoir in self.groups:
            self.handles.append(
                modules[0].register_forward_pre_hook(self._collect(names[0], modules[0], reservoir))
            )
            for name, module in zip(names[1:], modules[1:]):
                self.handles.append(module.register_forward_pre_hook(self._watch(name)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def check_shared_inputs(self) -> None:
        """After the first sample: every fused member must have seen its group's input."""
        for names, _, _ in self.groups:
            first = self.first_inputs.get(names[0])
            for name in names[1:]:
                other = self.first_inputs.get(name)
                if first is None or other is None:
                    continue
                if other is not first and not (
                    other.shape == first.shape and torch.equal(other, first)
                ):
                    raise RuntimeError(
                        f"fused group {'+'.join(names)}: {name} does not read the same input as "
                        f"{names[0]}; the model family's fused groups do not fit this model"
                    )
        self.first_inputs.clear()
        self.checking = False
