"""Several processes with torch.distributed: `torchrun --nproc-per-node N -m tokenflow.batch ...`.

Each rank edits whole videos (so an inversion stays on the rank that computed it), balanced by frames x prompts,
longest first. The ranks exchange only a few Python objects (rank 0's view of what is already done, a barrier,
the counts for the summary), so the process group is gloo everywhere: it works on the CPU, and on GPUs it keeps
the collectives off the devices the edits use.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

# A rank may finish its videos hours before the slowest one: the closing barrier must outwait it.
BARRIER_TIMEOUT = datetime.timedelta(days=7)


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def device(self, requested: str | None) -> str | None:
        """LOCAL_RANK's GPU when the item asks for the default or plain `cuda`; the CPU stays the CPU."""
        if not self.distributed or not torch.cuda.is_available():
            return requested
        if requested in (None, "cuda"):
            return f"cuda:{self.local_rank}"
        return requested

    def broadcast(self, obj):
        """rank 0's `obj`, on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list | None:
        """Every rank's `obj` on rank 0 (None elsewhere), after all have reached this point."""
        if not self.distributed:
            return [obj]
        torch.distributed.barrier()
        out = [None] * self.world if self.rank == 0 else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def from_env() -> Ranks:
    """The ranks torchrun set up (RANK, WORLD_SIZE, LOCAL_RANK), the process group joined; one rank otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    r = Ranks(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if r.distributed and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    return r


def shard(costs: dict, world: int) -> dict:
    """key -> rank: longest first, each to the least loaded rank (ties: the lowest rank). Deterministic, so every
    rank computes the same assignment from the same plan."""
    load = [0] * world
    out = {}
    for key, cost in sorted(costs.items(), key=lambda kv: (-kv[1], str(kv[0]))):
        r = min(range(world), key=lambda i: (load[i], i))
        out[key] = r
        load[r] += cost
    return out
