"""What a server keeps of its traffic: a sliding window of each classifier's features, checked against the model's
reference profile (`tunelab.evaluate.drift`) and exported on /metrics, and an opt-in request log.

The request log (`--request-log DIR`) holds a sampled share of the texts (`--request-log-sample`), each redacted
of PII (e-mail addresses, phone and card numbers, IPs, secrets) and cut to `LOG_TEXT_CHARS`, with the label and
confidence the model gave; its files rotate, and the oldest go once the folder would pass `--request-log-max-mb`.
`tunelab monitor drift MODEL --current DIR` reads it.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from tunelab.data.pii import PiiRedactor
from tunelab.evaluate import drift

log = logging.getLogger("tunelab.serve")

LOG_TEXT_CHARS = 2000
LOG_FILES = 8  # the size bound is split over this many files: rotation drops at most an eighth of the log


class RequestLog:
    """Appends records to `requests-<n>.jsonl` in `folder`, sampled, redacted and bounded (thread-safe)."""

    def __init__(self, folder: Path, sample: float, max_bytes: int, seed: int | None = None):
        self.folder, self.sample, self.max_bytes = Path(folder), sample, max_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.redactor = PiiRedactor()
        self.rng = random.Random(seed)
        numbers = [int(p.stem.split("-")[1]) for p in self.folder.glob("requests-*.jsonl")
                   if p.stem.split("-")[1].isdigit()]
        self.number = max(numbers, default=0)
        self.written = 0

    def chosen(self, n: int) -> list[int]:
        """Which of `n` texts are logged (each with probability `sample`)."""
        with self.lock:
            return [i for i in range(n) if self.rng.random() < self.sample]

    def write(self, records: list[dict]) -> None:
        """Redact each record's text, append them, rotate and drop the oldest files past the size bound."""
        if not records:
            return
        lines = []
        for r in records:
            text = self.redactor.redact_prefix(r["text"], LOG_TEXT_CHARS)
            lines.append(json.dumps({**r, "text": text}, ensure_ascii=False) + "\n")
        data = "".join(lines).encode()
        with self.lock:
            path = self._current(len(data))
            with path.open("ab") as f:
                f.write(data)
            self.written += len(records)

    def _current(self, incoming: int) -> Path:
        path = self.folder / f"requests-{self.number:06d}.jsonl"
        size = path.stat().st_size if path.exists() else 0
        if self.number == 0 or size + incoming > self.max_bytes / LOG_FILES:
            self.number += 1
            path = self.folder / f"requests-{self.number:06d}.jsonl"
            files = sorted(self.folder.glob("requests-*.jsonl"))
            total = sum(p.stat().st_size for p in files)
            while files and total + incoming > self.max_bytes - self.max_bytes / LOG_FILES:
                total -= files[0].stat().st_size
                files.pop(0).unlink(missing_ok=True)
        return path


class DriftTracker:
    """One served classifier's window of the last `window` texts' features; every `every` new texts (once the
    window holds `min_window`) a check runs on its own thread and sets the drift gauges. `embeddings`: whether the
    engine gives hidden states (the embedding test needs them)."""

    def __init__(self, model_id: str, profile: drift.Profile, settings, metrics, version: str | None = None,
                 embeddings: bool = True):
        self.model_id, self.profile, self.metrics, self.version = model_id, profile, metrics, version
        self.size, self.every = settings.drift_window, settings.drift_every
        self.min_window, self.alpha = min(settings.drift_min_window, self.size), settings.drift_alpha
        self.permutations = settings.drift_permutations
        ref = profile.features
        self.columns = {"confidence": np.zeros(self.size, np.float32), "label": np.zeros(self.size, np.int64),
                        "length": np.zeros(self.size, np.float32), "unk": np.zeros(self.size, np.float32),
                        "fragmentation": np.zeros(self.size, np.float32)}
        if ref.embedding is not None and embeddings:  # an ONNX export gives no hidden states: no MMD then
            self.columns["embedding"] = np.zeros((self.size, ref.embedding.shape[1]), np.float32)
        self.lock = threading.Lock()
        self.count, self.since_check, self.checking = 0, 0, False
        self.last: dict | None = None
        self.checks = 0

    @property
    def wants_embeddings(self) -> bool:
        return "embedding" in self.columns

    def add(self, feats: drift.Features) -> None:
        """Put the features of a batch's texts into the window; start a check when one is due."""
        n = len(feats)
        with self.lock:
            slots = (self.count + np.arange(n)) % self.size  # a ring: the oldest texts are overwritten
            for name, column in self.columns.items():
                column[slots] = getattr(feats, name)
            self.count += n
            self.since_check += n
            due = (not self.checking and self.since_check >= self.every and self.filled >= self.min_window)
            if due:
                self.checking, self.since_check = True, 0
                window = self._snapshot()
        self.metrics.drift_window.labels(self.model_id).set(self.filled)
        self.metrics.drift_observed.labels(self.model_id).inc(n)
        if due:
            threading.Thread(target=self._check, args=(window,), name=f"drift-{self.model_id}", daemon=True).start()

    @property
    def filled(self) -> int:
        return min(self.count, self.size)

    def _snapshot(self) -> drift.Features:
        n = self.filled
        cols = {name: column[:n].copy() for name, column in self.columns.items()}
        return drift.Features(embedding=cols.pop("embedding", None), **cols)

    def _check(self, window: drift.Features) -> None:
        try:
            t0 = time.perf_counter()
            result = drift.compare(self.profile, window, self.alpha, self.permutations, seed=self.checks)
            result["seconds"] = round(time.perf_counter() - t0, 4)
            self._publish(result)
        except Exception:  # noqa: BLE001 - a bug here must not take the server down; it is logged whole
            log.exception("the drift check of %s failed", self.model_id)
        finally:
            with self.lock:
                self.checking = False

    def _publish(self, result: dict) -> None:
        m, mid = self.metrics, self.model_id
        for name in drift.STATISTICS:
            s = result["statistics"].get(name)
            m.drift_p.labels(mid, name).set(float("nan") if s is None else s["p_value"])
            m.drift_stat.labels(mid, name).set(float("nan") if s is None else s["statistic"])
        m.drift_detected.labels(mid).set(1 if result["drift"] else 0)
        m.drift_checks.labels(mid).inc()
        self.checks += 1
        self.last = result
        if result["drift"]:
            log.warning("drift: %s%s: %s over the last %d texts (p=%.2g)", mid,
                        f" ({self.version})" if self.version else "", ", ".join(result["drifted"]),
                        result["window"], result["p_min"])


class Observer:
    """What a classifier's micro-batch hands over after its forward: features into the drift window, sampled
    texts into the request log."""

    def __init__(self, model_id: str, tokenizer, max_length: int, labels: list[str], tracker: DriftTracker | None,
                 request_log: RequestLog | None, version: str | None = None):
        self.model_id, self.tokenizer, self.max_length, self.labels = model_id, tokenizer, max_length, labels
        self.tracker, self.request_log, self.version = tracker, request_log, version

    @property
    def wants_embeddings(self) -> bool:
        return self.tracker is not None and self.tracker.wants_embeddings

    def observe(self, texts: list[str], ids: list[list[int]], probs: np.ndarray, embeddings) -> None:
        if self.tracker is not None:
            self.tracker.add(drift.outputs_features(self.tokenizer, texts, ids, self.max_length, probs, embeddings))
        if self.request_log is not None:
            now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
            self.request_log.write([
                {"time": now, "model": self.model_id, "version": self.version, "text": texts[i],
                 "label": self.labels[int(probs[i].argmax())], "confidence": round(float(probs[i].max()), 6)}
                for i in self.request_log.chosen(len(texts))])
