"""Optimizers (AdamW, fused where available; Adafactor) with weight-decay groups, and LR schedules
(linear warmup, then linear decay, cosine decay or constant)."""

from __future__ import annotations

import math

import torch
from torch import nn

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight", "ln_")


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, head_lr: float | None = None,
                    head_names: tuple[str, ...] = (), kind: str = "adamw", fused: bool = True
                    ) -> torch.optim.Optimizer:
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
    if kind == "adafactor":  # factored second moments: O(rows + cols) optimizer memory per matrix
        return torch.optim.Adafactor(param_groups, lr=lr)
    try:  # one fused kernel per step instead of a dozen passes over the parameters
        if not fused:
            raise TypeError("fused kernels not wanted")
        return torch.optim.AdamW(param_groups, betas=(0.9, 0.999), eps=1e-8, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(param_groups, betas=(0.9, 0.999), eps=1e-8)


def build_schedule(optimizer: torch.optim.Optimizer, name: str, total_steps: int, warmup_steps: int):
    """LR multiplier: 0 -> 1 over `warmup_steps`, then `linear` to 0, `cosine` to 0, or `constant`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if name == "constant":
            return 1.0
        return max(0.0, 1.0 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
