"""Adversarial training on the word embeddings (`train.adversarial`): FGM and PGD.

The loss of a micro-batch becomes its clean loss plus its loss under a perturbation `r` of the word-embedding
output, the one of L2 norm ε (over the whole micro-batch) that raises the loss most to first order:

- FGM (Miyato et al., 2017): r = ε · g / ‖g‖, with g the gradient of the clean loss with respect to the embeddings
  (one more forward and backward than plain training);
- PGD (Madry et al., 2018): starting from the FGM direction with step α, `steps` ascent steps
  r ← Π_ε(r + α · g_r / ‖g_r‖), each projected back onto the ε-ball; the inner steps take gradients with respect
  to r only, the parameters get the clean and the final adversarial gradients.

The norm is taken over the micro-batch, as in the common BERT recipes that perturb the embedding matrix by its
gradient (ε = 1 there): the examples the model gets most wrong take most of the perturbation, the ones it already
gets right with confidence hardly any. (A per-example ball of the same radius perturbs every example alike and,
on the tweets, costs several points of macro-F1.) The perturbation is added by a forward hook on the model's
input-embedding module (`get_input_embeddings`), so it works for every architecture and method (frozen
embeddings under LoRA included: the hook makes their output take a gradient). Padding positions get no gradient
and so no perturbation. Every pass runs under the same autocast as the clean one.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch

from tunelab.config import AdversarialConfig


def _unit(g: torch.Tensor) -> torch.Tensor:
    """`g` scaled to an L2 norm of 1 over the micro-batch (a zero gradient stays zero)."""
    return g / g.norm().clamp_min(1e-12)


def _project(r: torch.Tensor, eps: float) -> torch.Tensor:
    """`r` with its L2 norm capped at `eps`."""
    return r * (eps / r.norm().clamp_min(1e-12)).clamp(max=1.0)


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
        r = _project(step * _unit(grad.detach().float()), cfg.epsilon)
        for _ in range(cfg.steps - 1 if cfg.method == "pgd" else 0):
            delta = r.clone().requires_grad_()
            with _embedding_hook(model, perturbation=delta):
                adv = compute()
            (g,) = torch.autograd.grad(adv, delta)  # the parameters' gradients are left alone
            r = _project(r + cfg.alpha * _unit(g.float()), cfg.epsilon)
        with _embedding_hook(model, perturbation=r):
            adv = compute()
        (adv * loss_scale).backward()
        return loss
