"""AdamW with decoupled weight decay groups, and the linear warmup / decay schedule."""

from __future__ import annotations

import torch
from torch import nn

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight", "ln_")


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, head_lr: float | None = None,
                    head_names: tuple[str, ...] = ()) -> torch.optim.AdamW:
    """Trainable parameters in up to four groups: (decay / no decay) x (body / head lr)."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and not any(k in name for k in NO_DECAY)
        is_head = head_lr is not None and any(f".{h}." in f".{name}" for h in head_names)
        groups.setdefault((decay, is_head), []).append(p)
    param_groups = [{"params": ps, "weight_decay": weight_decay if decay else 0.0,
                     "lr": head_lr if is_head else lr}
                    for (decay, is_head), ps in sorted(groups.items())]
    try:  # one fused kernel per step instead of a dozen passes over the parameters
        return torch.optim.AdamW(param_groups, betas=(0.9, 0.999), eps=1e-8, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(param_groups, betas=(0.9, 0.999), eps=1e-8)


def linear_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    """LR multiplier: 0 -> 1 over `warmup_steps`, then linearly to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
