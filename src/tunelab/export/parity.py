"""Parity between an exported model and the model it came from, measured in the runtime that will run the export.

Every export computes the same forward on the same rows on both sides and writes `parity.json`; a figure past
its threshold fails the export (nothing is left at `--out`). Rows come from the test split (else validation) of
`--data`, or of the dataset the model was trained on (its `tunelab.json` records where), else from a few fixed
sentences.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import numpy as np
import torch

from tunelab.data.dataset import load_split
from tunelab.errors import UserError
from tunelab.evaluate.leakage import row_text
from tunelab.tasks import task_spec

# Sentences in several scripts for a model whose dataset is gone: parity needs inputs, not labels.
FALLBACK_TEXTS = [
    "The flight was late again and nobody told us why.",
    "Great service, friendly staff, would come back!",
    "这家餐厅的菜很好吃，但是服务太慢了。",
    "Der Zug kam pünktlich an, aber er war sehr voll.",
    "I'm not sure this is what I ordered.",
    "東京は今日も雨です。",
    "Can you tell me where the nearest pharmacy is?",
    "Les résultats du trimestre sont meilleurs que prévu.",
]


def parity_rows(meta: dict, data_dir: str | None, n: int) -> tuple[list[dict], str]:
    """Up to `n` rows to compare on -> (rows, where they came from): the test (else validation) split of
    `data_dir` or of the model's own dataset, else `FALLBACK_TEXTS`."""
    return _dataset_rows(meta, data_dir, n, ("test", "validation"))


def calibration_rows(meta: dict, data_dir: str | None, n: int) -> tuple[list[dict], str]:
    """Up to `n` rows a quantiser may learn from -> (rows, where they came from): the train split (never the rows
    parity measures on) of `data_dir` or of the model's own dataset, else `FALLBACK_TEXTS`."""
    return _dataset_rows(meta, data_dir, n, ("train",))


def _dataset_rows(meta: dict, data_dir: str | None, n: int, splits: tuple[str, ...]) -> tuple[list[dict], str]:
    """The first of `splits` with rows, in `data_dir` or else the model's own dataset -> (up to `n` rows, where
    they came from); the fixed sentences when neither is there."""
    candidates = [data_dir] if data_dir else [(meta.get("data") or {}).get("path")]
    for d in candidates:
        if not d:
            continue
        try:
            for split in splits:
                rows = load_split(d, split)
                if rows:
                    return rows[:n], f"{d} ({split} split)"
        except UserError:
            if data_dir:  # asked for by the user: say what is wrong with it
                raise
    texts = (FALLBACK_TEXTS * (n // len(FALLBACK_TEXTS) + 1))[:n]
    return [{"text": t} for t in texts], "built-in sentences (the model's dataset was not found; --data DIR)"


def texts_of(rows: list[dict]) -> list[str]:
    """What the model reads from each row (see `evaluate.leakage.row_text`), never empty."""
    return [row_text(r) or " " for r in rows]


def compare(reference, exported) -> dict:
    """Per-example output arrays of the two models (each [..., classes] over the example's real positions), as
    two iterables in the same order -> max |Δ|, mean |Δ| and top-1 agreement over every position."""
    worst, total, agree, positions = 0.0, 0.0, 0, 0
    for r, e in zip(reference, exported):
        r = np.asarray(r, dtype=np.float64).reshape(-1, r.shape[-1])
        e = np.asarray(e, dtype=np.float64).reshape(-1, e.shape[-1])
        diff = np.abs(r - e)
        worst, total = max(worst, float(diff.max())), total + float(diff.mean(-1).sum())
        agree, positions = agree + int((r.argmax(-1) == e.argmax(-1)).sum()), positions + r.shape[0]
    return {"positions": positions, "max_abs_diff": worst, "mean_abs_diff": total / max(1, positions),
            "top1_agreement": agree / max(1, positions)}


def check(figures: dict, thresholds: dict[str, tuple[str, float]]) -> list[str]:
    """The figures past their threshold, as sentences -> [] when all pass. `thresholds`: figure name ->
    ("max" or "min", bound)."""
    failed = []
    for name, (side, bound) in thresholds.items():
        value = figures.get(name)
        if value is None:
            continue
        if (side == "max" and value > bound) or (side == "min" and value < bound):
            failed.append(f"{name} {value:.3g} is {'over' if side == 'max' else 'under'} its threshold {bound:g}")
    return failed


def per_example(logits: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    """A batch's outputs -> one array per example: its row of sequence-level logits [classes], or its real
    positions of token-level logits [positions, classes]."""
    if logits.ndim == 2:
        return list(logits)
    return [logits[i][mask[i].astype(bool)] for i in range(len(logits))]


def torch_runner(forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                 ) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """`forward(input_ids, attention_mask) -> outputs` in PyTorch -> the same on numpy arrays (float32 out), the
    shape `batched_outputs` runs."""
    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return forward(torch.from_numpy(ids), torch.from_numpy(mask)).float().numpy()

    return run


def logits_of(model) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A transformers model as `forward(input_ids, attention_mask) -> logits`."""
    return lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits


def batched_outputs(run: Callable[[np.ndarray, np.ndarray], np.ndarray], tokenizer, texts: list[str],
                    max_length: int, batch_size: int = 16) -> list[np.ndarray]:
    """`run(input_ids, attention_mask) -> logits` over `texts` in batches -> `per_example` outputs in order."""
    out: list[np.ndarray] = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="np")
        ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
        out.extend(per_example(run(ids, mask), mask))
    return out


def row_labels(meta: dict, rows: list[dict]) -> list[int] | None:
    """Gold label ids of classification rows (None when the task has none or a row lacks a known label)."""
    labels = meta.get("labels") or []
    if task_spec(meta["task"]).report != "classes" or not all(r.get("label") in labels for r in rows):
        return None
    return [labels.index(r["label"]) for r in rows]


def task_score(meta: dict, rows: list[dict], outputs: list[np.ndarray], tok, max_length: int
               ) -> tuple[str, float] | None:
    """The task metric of per-example outputs (`batched_outputs`) when the rows carry gold labels -> (name, value):
    macro-F1 for classification, entity F1 for NER (over the tags of each row's words); None otherwise."""
    gold = row_labels(meta, rows)
    if gold is not None:
        from sklearn.metrics import f1_score  # sklearn (~1 s): only when a score is computed

        return "macro_f1", float(f1_score(gold, [int(r.argmax()) for r in outputs], average="macro",
                                          zero_division=0))
    if task_spec(meta["task"]).report == "entities" and rows and all(r.get("tags") and r.get("tokens")
                                                                     for r in rows):
        return "entity_f1", float(_entity_f1(meta, rows, outputs, tok, max_length))
    return None


def _entity_f1(meta: dict, rows: list[dict], outputs: list[np.ndarray], tok, max_length: int) -> float:
    """Entity F1 (seqeval, strict spans) of per-position tag logits over rows read as their words joined by spaces
    (`texts_of`): each word takes the tag of its first sub-token, found by character offsets."""
    from tunelab.tasks.token_classification import entity_metrics  # seqeval: for NER scores only

    labels, gold, pred = meta["labels"], [], []
    for row, out in zip(rows, outputs):
        words = [str(w) for w in row["tokens"]]
        starts = np.cumsum([0] + [len(w) + 1 for w in words[:-1]])
        spans = tok(" ".join(words), truncation=True, max_length=max_length,
                    return_offsets_mapping=True)["offset_mapping"]
        tags = ["O"] * len(words)
        tagged = set()
        for position, (a, b) in enumerate(spans):
            word = int(np.searchsorted(starts, a, side="right")) - 1
            if b > a and word not in tagged:  # special tokens have empty spans
                tagged.add(word)
                tags[word] = labels[int(out[position].argmax())]
        gold.append(list(row["tags"]))
        pred.append(tags)
    return entity_metrics(gold, pred)["entity_f1"]


SINGLES, BATCH = 50, 32  # texts timed one by one; the batch whose throughput is timed


def speed(run: Callable[[np.ndarray, np.ndarray], np.ndarray], tok, texts: list[str], max_length: int,
          singles: int = SINGLES, repeats: int = 3) -> dict:
    """`run(input_ids, attention_mask)` timed: p50 over the first `singles` texts at batch 1 (ms), and texts/s at
    batch `BATCH` (the best of `repeats` after a warm-up)."""
    times = []
    for t in texts[:singles]:
        enc = tok([t], truncation=True, max_length=max_length, return_tensors="np")
        ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
        start = time.perf_counter()
        run(ids, mask)
        times.append(time.perf_counter() - start)
    batch = (texts * (BATCH // len(texts) + 1))[:BATCH]
    enc = tok(batch, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    run(ids, mask)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(ids, mask)
        best = min(best, time.perf_counter() - start)
    return {"p50_ms_batch1": statistics.median(times) * 1000, "texts_per_s_batch32": BATCH / best}
