"""What the quantizer needs to know about a model family, and the per-block plan it derives.

A :class:`ModelFamily` names the transformer block lists (in execution order), the outputs of a
block (so that one block's outputs become the next one's inputs), the fused groups (linears that
read the same input), the AdaLayerNorm modulation linears (4-bit weights, 16-bit activations)
and the layers kept in 16 bits, each with its reason. :meth:`ModelFamily.plan_block` turns that
into the concrete work for one block of one model under one :class:`QuantConfig`.
"""

from __future__ import annotations

import fnmatch
import inspect
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..formats import get_format


@dataclass
class PlannedGroup:
    """Linears of one block quantized together: W4A4 sharing their input, or one W4A16."""

    kind: str  # "w4a4" | "w4a16"
    names: list[str]  # qualified module names, in the order the group stacks them
    act_unsigned: bool = False  # INT4 W4A4 on a GELU output: unsigned activation codes
    split_at: int | None = None  # one linear whose input columns [split_at:] are a GELU output


@dataclass
class BlockPlan:
    name: str
    groups: list[PlannedGroup] = field(default_factory=list)
    skipped: list[tuple[str, nn.Module, str]] = field(default_factory=list)  # name, module, why


def _is_candidate(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d))


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


@dataclass(frozen=True)
class ModelFamily:
    """Per-family knowledge. Names inside a block are relative to the block."""

    name: str
    class_name: str  # the diffusers class, e.g. "FluxTransformer2DModel"
    block_lists: tuple[str, ...]  # attributes holding nn.ModuleLists of blocks, execution order
    block_outputs: tuple[str, ...]  # names of a block's outputs (its tuple, or one tensor)
    fused: tuple[tuple[str, ...], ...] = ()  # linears reading the same input
    weight_only: tuple[str, ...] = ()  # fnmatch patterns: AdaLayerNorm modulation linears
    gelu_inputs: tuple[str, ...] = ()  # fnmatch patterns: linears whose input is a GELU output
    # (linear, producer): the linear's last producer.out_features input columns are GELU outputs
    # of the producer linear (FLUX single blocks: proj_out reads cat([attention, GELU(proj_mlp)]))
    gelu_tails: tuple[tuple[str, str], ...] = ()
    block_skips: tuple[tuple[str, str], ...] = ()  # (pattern, reason) inside blocks
    outside_reasons: tuple[tuple[str, str], ...] = ()  # (top-level prefix, reason)

    # ---------------------------------------------------------------- blocks and their inputs

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """(qualified name, block) for every transformer block, in execution order."""
        out = []
        for attr in self.block_lists:
            blocks = getattr(model, attr, None)
            if blocks is None:
                continue
            out += [(f"{attr}.{i}", block) for i, block in enumerate(blocks)]
        return out

    def bind_inputs(self, block: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
        """A block call's positional + keyword arguments as one keyword dict."""
        bound = inspect.signature(block.forward).bind(*args, **kwargs)
        return dict(bound.arguments)

    def next_inputs(self, inputs: dict[str, Any], output: Any) -> dict[str, Any]:
        """The next block's keyword inputs, given this block's inputs and its output."""
        values = output if isinstance(output, tuple) else (output,)
        if len(values) != len(self.block_outputs):
            raise RuntimeError(
                f"{self.name} block returned {len(values)} values, expected "
                f"{len(self.block_outputs)} ({', '.join(self.block_outputs)})"
            )
        return {**inputs, **dict(zip(self.block_outputs, values))}

    # ---------------------------------------------------------------- what to quantize

    def outside_reason(self, name: str) -> str:
        for prefix, reason in self.outside_reasons:
            if name == prefix or name.startswith(prefix + "."):
                return reason
        return "outside the transformer blocks (kept in 16 bits)"

    def outside_layers(self, model: nn.Module) -> list[tuple[str, nn.Module, str]]:
        """Linears / convs that are not in any block: always kept in 16 bits, with the reason."""
        inside = {id(m) for _, block in self.blocks(model) for m in block.modules()}
        return [
            (name, module, self.outside_reason(name))
            for name, module in model.named_modules()
            if _is_candidate(module) and id(module) not in inside
        ]

    def plan_block(self, block_name: str, block: nn.Module, config) -> BlockPlan:
        """Which linears of ``block`` become W4A4 groups, W4A16 layers, or stay 16-bit."""
        from ..quantize.layer import unsupported_reason

        group = get_format(config.format).group_size
        plan = BlockPlan(block_name)
        eligible: dict[str, str] = {}  # relative name -> "w4a4" | "w4a16", in module order
        for rel, module in block.named_modules():
            if not _is_candidate(module):
                continue
            full = f"{block_name}.{rel}"
            reason = None
            if _matches(full, config.skip):
                reason = "skipped by QuantConfig.skip"
            elif fam := next((r for p, r in self.block_skips if fnmatch.fnmatchcase(rel, p)), None):
                reason = fam
            elif why := unsupported_reason(module):
                reason = why
            else:
                k = module.in_features if isinstance(module, nn.Linear) else module.in_channels
                if k % group:
                    problem = (
                        f"in_features={k} is not a multiple of the {config.format} group size "
                        f"{group}"
                    )
                    if not config.skip_incompatible:
                        raise ValueError(
                            f"layer {full}: {problem}; set QuantConfig(skip_incompatible=True) "
                            "(CLI: --skip-incompatible) to keep such layers in 16 bits"
                        )
                    reason = f"{problem}; kept in 16 bits"
            if reason is not None:
                plan.skipped.append((full, module, reason))
                continue
            adanorm = _matches(rel, self.weight_only)
            eligible[rel] = "w4a16" if adanorm and config.weight_only_adanorm else "w4a4"

        grouped: set[str] = set()
        for rel in eligible:
            if rel in grouped:
                continue
            members = [rel]
            if eligible[rel] == "w4a4":
                fused = next((g for g in self.fused if rel in g), None)
                if fused is not None:
                    members = [m for m in fused if eligible.get(m) == "w4a4"]
            grouped.update(members)
            unsigned_ok = (
                eligible[rel] == "w4a4"
                and config.unsigned_gelu
                and get_format(config.format).name == "int4"
            )
            unsigned = unsigned_ok and all(_matches(m, self.gelu_inputs) for m in members)
            split_at = self._gelu_split(block, members, group) if unsigned_ok else None
            names = [f"{block_name}.{m}" for m in members]
            plan.groups.append(PlannedGroup(eligible[rel], names, unsigned, split_at))
        return plan

    def _gelu_split(self, block: nn.Module, members: list[str], group: int) -> int | None:
        """Where a lone linear's GELU-output input columns start (``gelu_tails``), or None."""
        if len(members) != 1:
            return None
        for pattern, producer in self.gelu_tails:
            if not fnmatch.fnmatchcase(members[0], pattern):
                continue
            linear, source = block.get_submodule(members[0]), block.get_submodule(producer)
            if not isinstance(linear, nn.Linear) or not isinstance(source, nn.Linear):
                return None
            split_at = linear.in_features - source.out_features
            return split_at if split_at > 0 and split_at % group == 0 else None
        return None


_REGISTRY: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    _REGISTRY[family.class_name] = family
    return family


def supported_classes() -> list[str]:
    from . import flux, sana  # noqa: F401  (registration)

    return sorted(_REGISTRY)


def family_for(model: nn.Module) -> ModelFamily:
    """The family of ``model`` (by class name); ValueError listing the supported classes."""
    supported = supported_classes()
    for cls in type(model).__mro__:
        if cls.__name__ in _REGISTRY:
            return _REGISTRY[cls.__name__]
    raise ValueError(
        f"unsupported model class {type(model).__name__}; supported: {', '.join(supported)}"
    )
