"""Adversarial training on the word embeddings (`train.adversarial`): FGM and PGD.

The loss of a micro-batch becomes its clean loss plus its loss under a perturbation `r` of the word-embedding
output, the one in an L2 ball of radius ε per example that raises the loss most to first order:

- FGM (Miyato et al., 2017): r = ε · g / ‖g‖, with g the gradient of the clean loss with respect to the embeddings
  (one more forward and backward than plain training);
- PGD (Madry et al., 2018; as used for text by Zhu et al.'s FreeLB and the "FGM/PGD" recipes): starting from the
  FGM direction with step α, `steps` ascent steps r ← Π_ε(r + α · g_r / ‖g_r‖), each projected back onto the ball;
  the inner steps take gradients with respect to r only, the parameters get the clean and the final adversarial
  gradients.

The perturbation is added by a forward hook on the model's input-embedding module (`get_input_embeddings`), so it
works for every architecture and method (frozen embeddings under LoRA included: the hook makes their output
require a gradient). Norms are taken per example over all its positions; padding positions get no gradient and so
no perturbation. Both passes run under the same autocast as the clean one.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch

from tunelab.config import AdversarialConfig


def _per_example_unit(g: torch.Tensor) -> torch.Tensor:
    """`g` [B, …] scaled to an L2 norm of 1 per example (a zero gradient stays zero)."""
    norm = g.flatten(1).norm(dim=1).clamp_min(1e-12)
    return g / norm.view(-1, *([1] * (g.ndim - 1)))


def _project(r: torch.Tensor, eps: float) -> torch.Tensor:
    """`r` with each example's L2 norm capped at `eps`."""
    norm = r.flatten(1).norm(dim=1)
    scale = (eps / norm.clamp_min(1e-12)).clamp(max=1.0)
    return r * scale.view(-1, *([1] * (r.ndim - 1)))


@contextmanager
def _embedding_hook(model, perturbation: torch.Tensor | None = None, capture: dict | None = None):
    """While open, the output of the model's input embeddings gets `perturbation` added and/or is kept in
    `capture["out"]`, whose `.grad` the next backward fills."""
    def hook(module, inputs, output):
        if perturbation is not None:
            output = output + perturbation.to(output.dtype)
        if capture is not None:
            if output.requires_grad:
                output.retain_grad()
            else:  # frozen embeddings (LoRA, adapters): a leaf that takes a gradient
                output.requires_grad_()
            capture["out"] = output
        return output

    handle = model.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class Adversary:
    """`backward(model, compute, loss_scale)` replaces the plain `(compute() * loss_scale).backward()` of one
    micro-batch: the clean and the adversarial gradients are accumulated into the parameters; -> the clean loss."""

    def __init__(self, cfg: AdversarialConfig):
        self.cfg = cfg

    def backward(self, model, compute: Callable[[], torch.Tensor], loss_scale: float = 1.0) -> torch.Tensor:
        cfg = self.cfg
        seen: dict = {}
        with _embedding_hook(model, capture=seen):
            loss = compute()
        (loss * loss_scale).backward()  # the clean gradient: into the parameters, and the first ascent direction
        grad = seen["out"].grad
        step = cfg.epsilon if cfg.method == "fgm" else cfg.alpha
        r = _project(step * _per_example_unit(grad.detach().float()), cfg.epsilon)
        for _ in range(cfg.steps - 1 if cfg.method == "pgd" else 0):
            delta = r.clone().requires_grad_()
            with _embedding_hook(model, perturbation=delta):
                adv = compute()
            (g,) = torch.autograd.grad(adv, delta)  # the parameters' gradients are left alone
            r = _project(r + cfg.alpha * _per_example_unit(g.float()), cfg.epsilon)
        with _embedding_hook(model, perturbation=r):
            adv = compute()
        (adv * loss_scale).backward()
        return loss
