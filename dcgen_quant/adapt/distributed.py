"""Data-parallel training over processes started by ``torchrun`` (one code path for 1 and N).

``python -m dcgen_quant adapt`` runs in one process, or in N started by
``torchrun --nproc-per-node N [--nnodes M --rdzv-endpoint HOST:PORT] -m dcgen_quant adapt ...``
(torchrun's environment: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``; multi-node goes through its
rendezvous). :class:`Dist` is what the training code asks about the world; with one process
every collective is the identity, so the loop in :mod:`dcgen_quant.adapt.train` is the same
code for 1 and N processes.

Sharding (:meth:`Dist.prepare`): every transformer block is wrapped with FSDP2
(``torch.distributed.fsdp.fully_shard``): its frozen weights and its LoRA parameters are sharded
over the N processes and gathered block by block for forward and backward. The rest of the model
(patch embedder, head, text / time embedders, final norm: ~1% of FLUX's parameters) is
replicated; the gradients of its trainable parameters (embedder and head) are all-reduced by
:meth:`Dist.sync_grads`. FSDP2 runs on CPU with the gloo backend in torch 2.13 (checked when this
was written), so the CPU tests exercise the same sharded path that GPUs run with NCCL.

Global-batch semantics: a step's global batch of B rows is drawn from the step's generator on
every rank (see :mod:`dcgen_quant.adapt.train`); rank r computes the rows
``arange(B).tensor_split(N)[r]``, in ``grad_accum`` micro-batches. Each micro-batch's mean loss
is weighted by rows / B, so the gradient summed over the ranks and micro-batches is the gradient
of the global batch's mean loss: the same optimization with 1 or N processes, up to float
reduction order. FSDP averages gradients over the ranks; the loop multiplies each rank's loss
by N so that the average is that sum (exact for N a power of two; a custom divide factor would
need NCCL's PreMulSum, which gloo lacks).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

# FSDP2 warns that a wrapped FLUX single block returns a view (its output is split into the text
# and image parts); an in-place op on that view would skip the pre-backward hook. diffusers does
# no in-place op there, and the 1-vs-N gradient test (tests/adapt/test_distributed.py) checks the
# gradients, so the warning is silenced here.
_VIEW_WARNING = r"FSDP2-wrapped module .* returned a view tensor"

try:  # public since torch 2.5
    from torch.distributed.tensor import DTensor as _DTENSOR
except ImportError:  # pragma: no cover - older torch, or torch built without distributed
    try:
        from torch.distributed._tensor import DTensor as _DTENSOR
    except ImportError:
        _DTENSOR = None


def env_world_size() -> int:
    """WORLD_SIZE from torchrun's environment (1 when not started by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as exc:
        raise ValueError(f"WORLD_SIZE: got {os.environ['WORLD_SIZE']!r}; expected an int") from exc


@dataclass
class Dist:
    """The process's place in the world.

    Attributes
    ----------
    rank, world : this process's rank and the number of processes
    local_rank : rank within the node (selects the GPU)
    device : where this process trains (``cuda:<local_rank>`` for a CUDA run)
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _mesh: object = None

    @property
    def main(self) -> bool:
        """Whether this process writes files and prints (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    # ------------------------------------------------------------- collectives

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def sum(self, value: float) -> float:
        """``value`` summed over the ranks (a float64 all-reduce; every rank gets the sum)."""
        if not self.distributed:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self._comm_device())
        torch.distributed.all_reduce(t)
        return float(t.item())

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (any picklable object)."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, device=self._comm_device())
        return box[0]

    def all_ok(self, ok: bool) -> bool:
        """True when ``ok`` is true on every rank (so every rank takes the same branch)."""
        return self.sum(0.0 if ok else 1.0) == 0.0

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    # ------------------------------------------------------------- batches

    def rows(self, batch: int) -> torch.Tensor:
        """This rank's rows of a global batch of ``batch``: int64 [batch / world]."""
        if batch % self.world:
            raise ValueError(
                f"batch_size: got {batch}; it must be a multiple of the {self.world} processes"
            )
        return torch.arange(batch).tensor_split(self.world)[self.rank]

    # ------------------------------------------------------------- model

    def prepare(self, model: nn.Module, blocks: list[nn.Module], dtype: torch.dtype) -> nn.Module:
        """Put ``model`` on this rank's device, FSDP2-sharding ``blocks`` when distributed.

        Parameters
        ----------
        model : the model to train (its trainable parameters already have requires_grad)
        blocks : its transformer blocks (each becomes one FSDP unit)
        dtype : the compute dtype of the blocks' parameters (bf16 gathers bf16 copies of the
            float32 trainable parameters, as autocast would compute them)

        With one process this is ``model.to(device)``.
        """
        if not self.distributed:
            return model.to(self.device)
        try:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        except ImportError:  # torch < 2.6 keeps FSDP2 under its private name
            from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard

        warnings.filterwarnings("ignore", message=_VIEW_WARNING)
        policy = MixedPrecisionPolicy(
            param_dtype=dtype if dtype != torch.float32 else None,
            reduce_dtype=torch.float32,
        )
        for block in blocks:
            fully_shard(block, mesh=self._mesh, mp_policy=policy)
        # everything outside the blocks is replicated: moved whole to this rank's device
        return model.to(self.device)

    @staticmethod
    def is_sharded(tensor: torch.Tensor) -> bool:
        return _DTENSOR is not None and isinstance(tensor, _DTENSOR)

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of a sharded tensor (a view), or the tensor itself."""
        return tensor.to_local() if self.is_sharded(tensor) else tensor

    def sync_grads(self, params: list[nn.Parameter]) -> None:
        """Average the gradients of replicated (not sharded) parameters over the ranks (one
        all-reduce of their concatenation)."""
        if not self.distributed:
            return
        grads = [p.grad for p in params if p.grad is not None and not self.is_sharded(p)]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat.div_(self.world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def full(self, tensor: torch.Tensor) -> torch.Tensor:
        """The whole tensor on the CPU (gathers a sharded one; a collective on every rank)."""
        if self.is_sharded(tensor):
            tensor = tensor.full_tensor()
        return tensor.detach().cpu()

    def shutdown(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init(device: str | torch.device = "cpu") -> Dist:
    """The world of this process: a :class:`Dist` (initializing torch.distributed under torchrun).

    Parameters
    ----------
    device : ``"cpu"`` or ``"cuda"`` (``"cuda:K"`` is taken as ``cuda``: under torchrun each
        process uses ``cuda:LOCAL_RANK``). CUDA processes talk over NCCL, CPU ones over gloo.
    """
    device = torch.device(device)
    world = env_world_size()
    if world <= 1:
        return Dist(device=device)
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device: cuda was asked for but torch sees no CUDA device")
        if local >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK: got {local}; this node has {torch.cuda.device_count()} CUDA devices"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"device: got {device}; distributed training runs on cpu or cuda")
    if not torch.distributed.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        torch.distributed.init_process_group(backend, **kwargs)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world,))
    return Dist(rank=rank, world=world, local_rank=local, device=device, _mesh=mesh)
