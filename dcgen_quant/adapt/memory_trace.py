"""Counting the memory of one training step: live tensors, emulated autocast, flash attention.

:func:`simulate_step` runs a stage's real loss forward and backward and counts, with
:class:`LiveBytes`, every tensor the step creates while it is alive. On the ``meta`` device
(no memory, no compute) this is how :mod:`dcgen_quant.adapt.memory_plan` sizes the activations
of a model that does not fit here; on the CPU the same count measures a real step. A meta tensor
is seen by no autocast and by no fused attention kernel, so :class:`AutocastEmulation` applies
autocast's casts above autograd and counts attention as a flash kernel stores it.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import family as fam


class LiveBytes(TorchDispatchMode):
    """Count the bytes of every tensor storage created inside the mode while it is alive.

    Only storages on ``device`` (a device type, e.g. ``"meta"`` or ``"cpu"``) count, each once.
    Storages that existed before (parameters, inputs: :meth:`external`) are not counted, nor
    views of them. ``peak`` is the maximum of ``live``; ``grad_bytes`` counts the bytes that
    became ``.grad`` of the parameters given to :meth:`watch_grads` (they stay in ``live``);
    ``peak_less_grads`` is the peak of the live bytes other than those gradients.
    """

    def __init__(self, device: str):
        super().__init__()
        self.device = device
        self.live = 0
        self.peak = 0
        self.grad_bytes = 0
        self.peak_less_grads = 0
        self._seen: set[int] = set()
        self._external: set[int] = set()
        self._handles = []

    def external(self, tensors) -> None:
        """Storages made before the mode (parameters, inputs): their views are not new memory."""
        for t in tensors:
            self._external.add(t.untyped_storage()._cdata)

    def _add(self, t: torch.Tensor) -> None:
        if t.device.type != self.device:
            return
        st = t.untyped_storage()
        key = st._cdata
        if key in self._seen or key in self._external:
            return
        n = st.nbytes()
        self._seen.add(key)
        self.live += n
        self.peak = max(self.peak, self.live)
        self.peak_less_grads = max(self.peak_less_grads, self.live - self.grad_bytes)
        weakref.finalize(st, self._free, key, n)

    def _free(self, key: int, n: int) -> None:
        self._seen.discard(key)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self._add(out)
        else:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._add(t)
        return out

    def watch_grads(self, params: list[nn.Parameter]) -> None:
        def hook(p):
            self.grad_bytes += p.grad.untyped_storage().nbytes()

        for p in params:
            self._handles.append(p.register_post_accumulate_grad_hook(hook))

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        return super().__exit__(*exc)


class _FlashContract(torch.autograd.Function):
    """Attention as a flash kernel stores it: saves q, k, v, out and float32 lse [B, H, Lq]."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_LOW = {
    F.linear,
    torch.matmul,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.mm,
    torch.bmm,
    torch.baddbmm,
    torch.addmm,
    F.conv1d,
    F.conv2d,
    F.scaled_dot_product_attention,
}
_FP32 = {
    F.layer_norm,
    F.group_norm,
    F.softmax,
    torch.softmax,
    torch.Tensor.softmax,
    torch.pow,
    torch.Tensor.pow,
    torch.rsqrt,
    torch.Tensor.rsqrt,
    torch.exp,
    torch.Tensor.exp,
    F.mse_loss,
}


class AutocastEmulation(TorchFunctionMode):
    """Autocast for tensors no autocast sees (meta), and the flash attention contract.

    ``dtype`` None: no casting (a float32 run). ``policy`` "cuda": CUDA autocast's rules for the
    ops listed above; "cpu": CPU autocast's (matmuls in ``dtype``, of the float32 list only
    mse; checked against torch 2.13), for comparing a plan with a step measured on a CPU. The
    casts happen above autograd, so the tensors autograd saves are the cast ones, as under real
    autocast.
    """

    def __init__(self, dtype: torch.dtype | None, policy: str = "cuda"):
        super().__init__()
        if policy not in ("cuda", "cpu"):
            raise ValueError(f"policy: got {policy!r}; expected 'cuda' or 'cpu'")
        self.dtype = dtype
        self.fp32 = _FP32 if policy == "cuda" else {F.mse_loss}

    @staticmethod
    def _cast(args, kwargs, dtype):
        def c(a):
            if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != dtype:
                return a.to(dtype)
            return a

        return [c(a) for a in args], {k: c(v) for k, v in (kwargs or {}).items()}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.dtype is not None and func in _LOW:
            args, kwargs = self._cast(args, kwargs, self.dtype)
        elif self.dtype is not None and func in self.fp32:
            args, kwargs = self._cast(args, kwargs, torch.float32)
        if func is F.scaled_dot_product_attention:
            qkv = list(args[:3]) + [kwargs[k] for k in ("query", "key", "value")[len(args) :]]
            return _FlashContract.apply(*qkv)
        return func(*args, **kwargs)


def _fields(tb: fam.TextBatch) -> list[torch.Tensor]:
    return [t for t in (tb.embeds, tb.pooled, tb.mask) if t is not None]


def simulate_step(
    model: nn.Module,
    stage: str,
    batch: int,
    latent: tuple[int, int, int],
    text: tuple[int, int],
    *,
    pooled: int | None = None,
    mask: bool = False,
    guided: bool = False,
    teacher: tuple[nn.Module, tuple[int, int, int], int] | None = None,
    grad_checkpoint: bool = False,
    autocast: torch.dtype | None = None,
    device: str = "meta",
    patch: int = 1,
    emulate: bool = True,
    policy: str = "cuda",
) -> tuple[int, int]:
    """Run one forward + backward of stage ``stage``'s loss on ``model`` and count its memory.

    Parameters
    ----------
    model : the stage's model, on ``device``; trainable parameters have requires_grad
    batch : rows of the micro-batch
    latent : (C, H, W) of the new latents; text : (T, D) of the text embeddings
    pooled : FLUX pooled text width; mask : SANA's text mask
    guided : the guidance-distilled objective (one extra no-grad pass)
    teacher : stage 1 only: (base model, its latent (C, H, W), its patch size)
    autocast : the compute dtype (None: float32, no casting); on ``device="cpu"`` real CPU
        autocast runs instead of the emulation
    emulate : emulate autocast and flash attention (meta runs); ``policy``: whose autocast
        rules, "cuda" or "cpu" (see :class:`AutocastEmulation`)

    Returns
    -------
    (peak bytes of everything the step created, less the trainable gradients; the trainable
    gradients' bytes)
    """
    from .flow import FlowObjective, flow_loss

    dev = torch.device(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    z = torch.randn((batch, *latent), generator=g).to(dev)
    tb = fam.TextBatch(
        torch.randn((batch, *text), generator=g).to(dev),
        torch.randn((batch, pooled), generator=g).to(dev) if pooled else None,
        torch.ones((batch, text[0])).to(dev) if mask else None,
    )
    empty = tb.select(slice(0, 1))
    if grad_checkpoint and stage != "align":
        fn = None
        if emulate:  # checkpointing recomputes outside any function mode: re-enter ours

            def fn(module, *args):
                from torch.utils.checkpoint import checkpoint

                def ctx():
                    return contextlib.nullcontext(), AutocastEmulation(autocast, policy)

                return checkpoint(module.__call__, *args, use_reentrant=False, context_fn=ctx)

        model.enable_gradient_checkpointing(fn)
    elif getattr(model, "gradient_checkpointing", False):
        model.disable_gradient_checkpointing()
    if emulate:
        cast = AutocastEmulation(autocast, policy)
    elif autocast is not None:
        cast = torch.autocast(dev.type, dtype=autocast)
    else:
        cast = contextlib.nullcontext()
    tracker = LiveBytes(dev.type)
    tracker.external([*model.parameters(), *model.buffers(), z, *_fields(tb)])
    if teacher is not None:
        tracker.external([*teacher[0].parameters(), *teacher[0].buffers()])
    tracker.watch_grads(trainable)
    with tracker:
        with cast:
            if stage == "align":
                base, base_latent, base_p = teacher
                zb = torch.randn((batch, *base_latent), generator=g).to(dev)
                with torch.no_grad():
                    t = fam.embed_tokens(base, fam.embedder(base), zb, base_p)
                s = fam.embed_tokens(model, fam.embedder(model), z, patch)
                from .stages import reconcile

                gb = fam.token_grid(base_latent[1:], base_p)
                gn = fam.token_grid(latent[1:], patch)
                s, t = reconcile(s, gn, t, gb, "pool")
                loss = F.mse_loss(s.float(), t.float())
            else:
                obj = FlowObjective(guidance="distilled" if guided else "fixed", text_drop=0.1)
                loss = flow_loss(model, z, tb, empty, g, obj, patch)
        # the emulation must also see checkpointing's recomputation (real autocast is restored
        # by torch.utils.checkpoint itself, and backward runs outside it as usual)
        with cast if emulate else contextlib.nullcontext():
            loss.backward()
        del loss
    grads = tracker.grad_bytes
    for p in trainable:
        p.grad = None
    return tracker.peak_less_grads, grads
