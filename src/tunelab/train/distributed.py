"""Data-parallel training across processes started by `torchrun` (gloo on CPU, NCCL on GPU):
`train.distributed: ddp` (replicated weights) or `fsdp` (FSDP2 `fully_shard`: each transformer layer and
the root sharded across ranks, for models that don't fit one device).

Every rank sees the same seeded order of accumulation windows; each micro-batch is dealt round-robin
over the ranks (rank r takes examples r, r + W, …). The loss of each rank is normalised by the loss terms
of the *whole* window (all ranks), and the gradients are summed across ranks with one all-reduce over a
flat buffer per step — so the update equals the single-process update for the same global batch (up to
float summation order). Rank 0 alone logs and writes checkpoints and the model; every rank evaluates the
whole validation split, so all ranks take the same keep-best / early-stopping decisions. Under FSDP2 the
sharded gradients are reduce-scattered (averaged) by FSDP itself, the loss scaled by the world size to make
that the sum; checkpoints hold the
gathered full weights (safetensors) and the full optimizer state keyed by parameter name, so a run can be
resumed on any number of ranks. A worker that
dies makes `torchrun` stop the job; collectives also time out (`train.dist_timeout_s`) instead of hanging.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from tunelab.models import is_dtensor

# torch.distributed.fsdp, torch.distributed.tensor and torch.distributed.checkpoint (~0.6 s together) are imported
# inside the functions that use them: only FSDP runs pay for them.


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    fsdp: bool = False

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
        """Sum the gradients over ranks (a missing gradient counts as zero); FSDP reduces its own."""
        if not self.enabled or self.fsdp:
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


_LAYER = re.compile(r"\.(?:layers|layer|h|blocks)\.\d+$")


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: shard every transformer layer, then the rest (embeddings, head) at the root. FSDP averages
    the gradients over ranks (gloo has no pre-multiplied sum), so the loop scales each rank's loss by the
    world size to get the sum."""
    from torch.distributed.fsdp import fully_shard

    layers = [m for name, m in model.named_modules() if _LAYER.search(name)]
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def optimizer_state(model, optimizer, fsdp: bool) -> dict:
    """A state dict that can be saved: the optimizer's own, or under FSDP the full (gathered) state of
    each parameter keyed by its name — a collective, every rank calls it in the same order."""
    if not fsdp:
        return optimizer.state_dict()
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            by_name[names[id(p)]] = {k: (v.full_tensor() if is_dtensor(v) else v).detach().cpu()
                                     for k, v in optimizer.state.get(p, {}).items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]  # lr etc.
    return {"by_name": by_name, "groups": groups}


def load_optimizer_state(model, optimizer, state: dict, fsdp: bool) -> None:
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.tensor import distribute_tensor

    for group, saved in zip(optimizer.param_groups, state["groups"]):
        group.update(saved)
    params = dict(model.named_parameters())
    for name, st in state["by_name"].items():
        p = params[name]
        optimizer.state[p] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
                              if is_dtensor(p) and v.shape == p.shape else v for k, v in st.items()}


def full_model_state(model) -> dict:
    """The whole model's weights gathered on every rank, on CPU (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def from_env(timeout_s: int = 600, mode: str = "ddp") -> Dist:
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
    return Dist(rank, world, local_rank, fsdp=mode == "fsdp")
