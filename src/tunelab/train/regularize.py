"""Keeping what a model knew while an update teaches it new data: replayed old rows mixed into training
(`data.replay`), and a pull toward the weights the update started from (`train.regularize`).

Replay: `share` of the training rows are old ones, a seeded sample (stratified by label where the task has one)
of the train split of the old dataset: `data.replay.dir`, or the dataset model.base (a tunelab model dir) was
trained on, found through its `tunelab.json`.

- L2-SP (Li et al. 2018): λ/2 Σ (θ - θ₀)² over the trainable weights the starting model already had.
- EWC (Kirkpatrick et al. 2017): λ/2 Σ F (θ - θ₀)², F the diagonal Fisher information of the starting model on
  the data it was trained on: the mean squared gradient of its loss, one example at a time, over `fisher_rows`
  old train rows. F is normalised to a mean of 1 over all weights, so that λ is the same mean pull as L2-SP and
  EWC only moves it toward the weights that mattered to the old data.

The penalty's gradient λ F (θ - θ₀) is added to each weight's gradient once per optimizer step, after the data's
gradients are accumulated and before clipping: it weighs the same whatever the batch size or accumulation. A new
task head (or the new rows of a grown one) has nothing to remember and is left free.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tunelab.data.dataset import load_meta, load_split
from tunelab.data.split import seeded_subset
from tunelab.errors import UserError
from tunelab.models import META_FILE, read_meta


def old_data_dir(cfg, explicit: str | None, key: str, kind: str) -> Path:
    """The old dataset an update replays or weighs its pull on: `explicit`, else the one model.base was trained
    on; it must hold the same kind of data (`kind`, the new dataset's)."""
    if explicit:
        d = Path(explicit)
    elif (Path(cfg.model.base) / META_FILE).is_file():
        d = Path((read_meta(cfg.model.base).get("data") or {}).get("path") or "")
    else:
        raise UserError(f"{key}: model.base is not a tunelab model dir, so its old data is unknown; set {key}.dir")
    old = load_meta(d)
    if old.get("task") != kind:
        raise UserError(f"{key}: {d} holds a '{old.get('task')}' dataset; the new data is '{kind}'")
    return d


def replay_rows(cfg, kind: str, new_rows: int, stratify: str | None) -> tuple[list[dict], dict]:
    """The old rows mixed into `new_rows` training rows so that they are `data.replay.share` of the mix -> (rows,
    the record of where they came from)."""
    rc = cfg.data.replay
    d = old_data_dir(cfg, rc.dir, "data.replay", kind)
    want = max(1, round(rc.share / (1 - rc.share) * new_rows))
    rows = seeded_subset(load_split(d, "train"), want, seed=cfg.train.seed, stratify=stratify)
    if not rows:
        raise UserError(f"data.replay: the train split of {d} is empty")
    return rows, {"dir": str(d.resolve()), "fingerprint": load_meta(d)["fingerprint"], "rows": len(rows),
                  "share": len(rows) / (len(rows) + new_rows)}


class Anchor:
    """The starting values θ₀ of the weights under the pull, their weights F (None: L2-SP) and λ."""

    def __init__(self, params: dict[str, nn.Parameter], strength: float, fisher: dict[str, torch.Tensor] | None):
        self.params, self.strength, self.fisher = params, strength, fisher
        self.start = {n: p.detach().clone() for n, p in params.items()}

    def add_grad(self) -> float:
        """Add the penalty's gradient to every anchored weight's gradient -> the penalty's value."""
        total = 0.0
        with torch.no_grad():
            for name, p in self.params.items():
                diff = p - self.start[name]
                weighted = diff if self.fisher is None else self.fisher[name] * diff
                grad = self.strength * weighted
                p.grad = grad if p.grad is None else p.grad.add_(grad)
                total += 0.5 * self.strength * float((weighted * diff).sum())
        return total


def anchored(model: nn.Module, new_params: list[str]) -> dict[str, nn.Parameter]:
    """The trainable weights the pull applies to: all but the task head's new ones (names as the model has them,
    through a peft wrapper's prefix)."""
    new = set(new_params)
    return {n: p for n, p in model.named_parameters()
            if p.requires_grad and not any(n == k or n.endswith("." + k) for k in new)}


def build_anchor(rc, model: nn.Module, new_params: list[str], fisher_data=None) -> Anchor:
    """The run's `train.regularize` as an Anchor on `model` as it starts; `fisher_data()` -> (task, encoded old
    rows, device), called for EWC only."""
    params = anchored(model, new_params)
    if not params:
        raise UserError("train.regularize: no trainable weight of the starting model to pull back (only a new head "
                        "trains); drop train.regularize or train more than the head")
    fisher = None
    if rc.kind == "ewc":
        task, enc, device = fisher_data()
        fisher = diagonal_fisher(model, task, enc, params, device)
    return Anchor(params, rc.strength, fisher)


def diagonal_fisher(model: nn.Module, task, enc, params: dict[str, nn.Parameter], device: str
                    ) -> dict[str, torch.Tensor]:
    """Mean over the encoded rows, one at a time, of each weight's squared gradient of the mean loss; normalised
    to a mean of 1 over all weights."""
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    was_training = model.training
    model.eval()  # no dropout: the information of the model as it is
    counted = 0
    for i in range(len(enc)):
        units = task.units(enc, [i])  # before collate: a masked LM draws the masks it counts here
        batch = {k: v.to(device) for k, v in task.collate(enc, [i]).items()}
        if not units:
            continue
        model.zero_grad(set_to_none=True)
        (task.loss_sum(model, batch) / units).backward()
        for n, p in params.items():
            if p.grad is not None:
                sums[n] += p.grad.detach() ** 2
        counted += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if not counted:
        raise UserError("train.regularize ewc: the old rows hold nothing to score")
    total = sum(float(s.sum()) for s in sums.values())
    size = sum(s.numel() for s in sums.values())
    mean = total / (counted * size) if total > 0 else 1.0
    return {n: s / (counted * mean) for n, s in sums.items()}
