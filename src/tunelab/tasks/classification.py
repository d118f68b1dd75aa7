"""Sequence classification: rows {"text", "label"} -> token ids -> logits over the label set."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tunelab import models
from tunelab.errors import UserError
from tunelab.evaluate import drift
from tunelab.evaluate.metrics import classification_metrics
from tunelab.tasks.batch import pad_batch


@dataclass
class Encoded:
    """Token ids per example (unpadded), their lengths, and label ids (-1 when unlabelled)."""

    input_ids: list[list[int]]
    labels: list[int]

    @property
    def lengths(self) -> list[int]:
        """Tokens per example; evaluation sorts examples by it so that a batch pads little."""
        return [len(x) for x in self.input_ids]

    def __len__(self) -> int:
        return len(self.input_ids)


class ClassificationTask:
    """Rows {"text", "label"} -> one label per text; metric: validation macro-F1 (higher is better)."""

    name = "classification"
    metric = "macro_f1"
    greater_is_better = True
    packing = False
    label_smoothing = 0.0  # training's targets (`train.label_smoothing`); evaluation scores the plain loss

    def __init__(self, tokenizer, labels: list[str], max_length: int):
        """`labels`: the label set, two or more (one label is a `UserError`: nothing to learn or predict)."""
        if len(labels) < 2:
            raise UserError(f"classification needs at least two labels, and the only label is "
                            f"{', '.join(map(repr, labels)) or 'none'}: a model could only ever answer that; add "
                            "rows of the other labels (or check the label column) and prepare the data again")
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.label2id = {label: i for i, label in enumerate(self.labels)}
        self.max_length = max_length
        self.pad_id = tokenizer.pad_token_id

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, special tokens included, truncated to `max_length`; unpadded."""
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)
        return enc["input_ids"]

    def encode(self, rows: list[dict], labelled: bool = True) -> Encoded:
        """Tokenise rows; an unknown label is a `UserError` naming it and the known labels."""
        labels = []
        if labelled:
            unknown = sorted({r["label"] for r in rows} - set(self.label2id))
            if unknown:
                raise UserError(f"labels {unknown} are unknown to this model; it knows {self.labels}")
            labels = [self.label2id[r["label"]] for r in rows]
        else:
            labels = [-1] * len(rows)
        return Encoded(self.encode_texts([r["text"] for r in rows]), labels)

    def collate(self, enc: Encoded, idx: list[int]) -> dict[str, torch.Tensor]:
        """Dynamic padding: pad to the longest example of this batch only."""
        ids, mask = pad_batch([enc.input_ids[i] for i in idx], self.pad_id)
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.tensor([enc.labels[i] for i in idx], dtype=torch.long)}

    @staticmethod
    def units(enc: Encoded, idx: list[int]) -> int:
        """Loss terms in these examples: one per example."""
        return len(idx)

    def loss_sum(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum (not mean) of per-example cross-entropy (against smoothed targets when `label_smoothing`), so
        accumulation can normalise by the true count."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum", label_smoothing=self.label_smoothing)

    @torch.no_grad()
    def logits(self, model, enc: Encoded, batch_size: int = 128) -> np.ndarray:
        """Logits [n, n_labels] in the original order; batches are formed by length to cut padding."""
        model.eval()
        device = next(model.parameters()).device
        order = np.argsort(enc.lengths, kind="stable")
        out = np.zeros((len(enc), len(self.labels)), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size].tolist()
            batch = {k: v.to(device) for k, v in self.collate(enc, idx).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            out[idx] = logits.float().cpu().numpy()
        return out

    def drift_profile(self, model, rows: list[dict], seed: int) -> drift.Profile:
        """The reference profile (`tunelab.evaluate.drift`) of up to `drift.PROFILE_ROWS` held-out `rows`, seeded:
        what a server compares its traffic with."""
        return drift.reference_profile(model, self.tokenizer, [r["text"] for r in rows], self.labels,
                                       self.max_length, str(next(model.parameters()).device), "validation", seed)

    def through_model_forward(self) -> None:
        """Nothing to change: the loss is the model's forward already."""

    def evaluate(self, model, enc: Encoded, batch_size: int) -> dict:
        """Accuracy, macro-F1/recall/precision, per class, confusion matrix, ECE and the mean loss."""
        logits = self.logits(model, enc, batch_size)
        probs = softmax(logits)
        y = np.asarray(enc.labels)
        metrics = classification_metrics(y, logits.argmax(-1), self.labels, probs)
        metrics["loss"] = float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())
        return metrics


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the last axis, same shape as `logits`; the row max is subtracted so exp cannot overflow."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def build(cfg, meta: dict, train_rows: list[dict]):
    """The run's model with a sequence-classification head over the dataset's labels, its tokenizer, base,
    new parameter names, and the task (see `tunelab.tasks.TaskSpec.build`)."""
    mc = cfg.model
    model, tok, base, new = models.load_classifier(mc.base, meta["labels"], mc.trust_remote_code,
                                                   models.dropout_of(mc))
    return model, tok, base, new, ClassificationTask(tok, models.labels_of(model), mc.max_length)
