"""Several quantizing processes through torch.distributed (launched by ``torchrun``).

``torchrun --nproc-per-node N -m dcgen_quant quantize ...`` starts N copies of the command; each
finds ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` in its environment (torchrun's rendezvous sets
them, on one node or several) and joins the default process group: NCCL when quantizing on
CUDA, gloo on the CPU. How the work is split:

* calibration samples: each rank holds a consecutive run of them (:meth:`Dist.chunk`), rank 0
  the first, and runs the blocks' forwards on those only (data parallel);
* a block's layer groups: each belongs to one rank (:meth:`Dist.owners`, a deterministic greedy
  balance of their sizes), which receives every rank's partial token reservoir for the group
  (:meth:`Dist.gather_to_owners`) and quantizes it; the quantized modules go to every rank
  (:meth:`Dist.all_gather`);
* rank 0 writes the checkpoint and the resume state.

:data:`SOLO` is the one-process group: the same interface, no torch.distributed.
"""

from __future__ import annotations

import datetime as _dt
import os
from typing import Any

import torch


class Dist:
    """The processes of one run. ``rank`` in ``range(world)``; rank 0 writes."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0):
        self.rank, self.world, self.local_rank = rank, world, local_rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def chunk(self, n: int) -> range:
        """The consecutive sample indices of this rank among ``n`` (the first ranks get one
        more when ``n`` does not divide evenly; a rank may get none)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    def owners(self, costs: list[float]) -> list[int]:
        """The rank that quantizes each item: largest first onto the least loaded rank (ties:
        the lower index / rank). Depends only on ``costs`` and the world size."""
        load = [0.0] * self.world
        owner = [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            r = min(range(self.world), key=lambda r: (load[r], r))
            owner[i] = r
            load[r] += costs[i]
        return owner

    # collectives: the one-process versions; :class:`TorchDist` overrides them

    def gather_to_owners(self, parts: dict[int, Any], owners: list[int]) -> dict[int, list]:
        """Item ``i``'s part from every rank, in rank order, for the items this rank owns."""
        return {i: [p] for i, p in parts.items() if owners[i] == self.rank}

    def all_gather(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj

    def barrier(self) -> None:
        return None

    def agree(self, value: Any) -> Any:
        """Rank 0's value on every rank (a decision that every rank must share)."""
        return self.broadcast(value)


SOLO = Dist()


class TorchDist(Dist):
    """Collectives over the default torch.distributed process group (CPU tensors inside
    Python objects; with NCCL, torch moves the pickled bytes through the current GPU)."""

    def gather_to_owners(self, parts: dict[int, Any], owners: list[int]) -> dict[int, list]:
        import torch.distributed as dist

        mine: dict[int, list] = {}
        for dst in range(self.world):
            outgoing = {i: _cpu(p) for i, p in parts.items() if owners[i] == dst}
            received = [None] * self.world if self.rank == dst else None
            dist.gather_object(outgoing, received, dst=dst)
            if self.rank == dst:
                for contribution in received:
                    for i, p in contribution.items():
                        mine.setdefault(i, []).append(p)
        return mine

    def all_gather(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()


def _cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    return value


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def init_from_env(device: str, timeout_s: float = 7200.0) -> Dist:
    """Join torchrun's process group (or :data:`SOLO` when not launched by it).

    ``device`` "cuda" (or "cuda:N") -> NCCL on ``cuda:LOCAL_RANK``; anything else -> gloo. The
    timeout bounds how long a rank waits for the others at a collective (a block's groups on a
    slow CPU can take long; a rank that died makes torchrun stop the others anyway).
    """
    if not launched_by_torchrun():
        return SOLO
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            timeout=_dt.timedelta(seconds=timeout_s),
            **({"device_id": torch.device("cuda", local_rank)} if cuda else {}),
        )
    return TorchDist(rank, world, local_rank)


def rank_device(device: str, dist: Dist) -> str:
    """The device of this rank: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    if dist.world > 1 and device == "cuda":
        return f"cuda:{dist.local_rank}"
    return device


def shutdown(dist: Dist) -> None:
    if isinstance(dist, TorchDist):
        import torch.distributed as tdist

        if tdist.is_initialized():
            tdist.destroy_process_group()
