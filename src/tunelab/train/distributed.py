"""Data-parallel training across processes started by `torchrun` (gloo on CPU, NCCL on GPU).

Every rank sees the same seeded order of accumulation windows; each micro-batch is dealt round-robin
over the ranks (rank r takes examples r, r + W, …). The loss of each rank is normalised by the loss terms
of the *whole* window (all ranks), and the gradients are summed across ranks with one all-reduce over a
flat buffer per step — so the update equals the single-process update for the same global batch (up to
float summation order). Rank 0 alone logs and writes checkpoints and the model; every rank evaluates the
whole validation split, so all ranks take the same keep-best / early-stopping decisions. A worker that
dies makes `torchrun` stop the job; collectives also time out (`train.dist_timeout_s`) instead of hanging.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, idx: list[int]) -> list[int]:
        """This rank's share of a micro-batch."""
        return idx[self.rank::self.world] if self.enabled else idx

    def all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients over ranks (a missing gradient counts as zero)."""
        if not self.enabled:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def sum(self, value: float, device: str) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item())

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def from_env(timeout_s: int = 600) -> Dist:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return Dist(rank, world, local_rank)
