"""Data-parallel calibration with torch.distributed (torchrun; NCCL on GPUs, gloo on CPU).

Each rank holds a shard of the calibration windows (rank r takes windows r, r+K, r+2K, ...),
runs every layer on its shard and accumulates partial (importance-weighted) Hessians. Each
module's Hessian is reduced to an owner rank (modules are dealt round-robin), the owners solve in
parallel, and the quantized tensors are broadcast so every rank writes the same weights back and
propagates its shard. Importance is per sequence, so it shards with the windows.

A rank that dies makes the others' collectives fail (gloo/NCCL report the closed peer, or the
process-group timeout fires); the error names the fix (``--resume``), and rank 0's per-layer state
lets the run continue.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rsq.errors import RSQError

log = logging.getLogger(__name__)


class DistributedError(RSQError):
    """A peer rank failed or the process group could not be formed."""


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = "none"

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owner(self, index: int) -> int:
        """The rank that solves module number ``index`` of a layer."""
        return index % self.world

    def shard(self, n: int) -> list[int]:
        return list(range(self.rank, n, self.world))

    # collectives: gloo has no reduce on CUDA tensors, so it works on host copies
    def _host(self, t: torch.Tensor) -> bool:
        return self.backend == "gloo" and t.device.type != "cpu"

    def all_reduce_sum(self, t: torch.Tensor) -> None:
        if not self.enabled:
            return
        work = t.cpu() if self._host(t) else t
        _guard(lambda: dist.all_reduce(work, op=dist.ReduceOp.SUM))
        if work is not t:
            t.copy_(work)

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        if not self.enabled:
            return t
        work = t.cpu().contiguous() if self._host(t) else t.contiguous()
        _guard(lambda: dist.broadcast(work, src=src))
        return work.to(t.device)

    def broadcast_object(self, obj, src: int):
        if not self.enabled:
            return obj
        box = [obj]
        _guard(lambda: dist.broadcast_object_list(box, src=src))
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            _guard(dist.barrier)


def _guard(fn):
    try:
        return fn()
    except (RuntimeError, dist.DistBackendError) as exc:  # a dead peer surfaces as one of these
        raise DistributedError(
            f"a peer rank failed during a collective ({str(exc).splitlines()[0][:160]}); the finished layers "
            "are saved: rerun the same command with --resume"
        ) from exc


def choose_backend(device_type: str, local_world: int, gpus: int, override: str | None = None) -> str:
    """The process-group backend, the same on every rank (a mismatch hangs the rendezvous).

    NCCL when each local rank has a GPU of its own; gloo on CPU and when several ranks share a GPU
    (NCCL refuses duplicate devices). Decided from the local world size, never from the rank.
    """
    if override:
        return override
    return "nccl" if device_type == "cuda" and gpus >= local_world else "gloo"


def init_from_env(device_type: str, timeout_s: float = 1800.0) -> DistContext:
    """Join the process group torchrun describes (WORLD_SIZE > 1); else a one-rank context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    gpus = torch.cuda.device_count() if device_type == "cuda" else 0
    backend = choose_backend(device_type, local_world, gpus, os.environ.get("RSQ_DIST_BACKEND"))
    timeout_s = float(os.environ.get("RSQ_DIST_TIMEOUT_S", timeout_s))
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as exc:
            raise DistributedError(f"could not form the process group ({exc}); check MASTER_ADDR/MASTER_PORT") from exc
    return DistContext(rank=rank, world=world, local_rank=local, backend=backend)


def rank_device(ctx: DistContext, requested: str) -> str:
    """Each rank's device: cuda:<local_rank mod #GPUs> for cuda, else as requested."""
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{ctx.local_rank % torch.cuda.device_count()}"
    return requested


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
