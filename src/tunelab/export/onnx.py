"""`--format onnx`: an encoder model dir (classification, NER) as `model.onnx` for ONNX Runtime.

Exported by `torch.onnx.export` (the torch.export-based exporter) with dynamic batch and sequence axes; inputs
`input_ids`, `attention_mask` (int64), output `logits`. `--quantize int8`: ONNX Runtime's dynamic quantisation
(int8 weights of every MatMul, one scale per output channel; activations quantised per call). Parity runs the
file in ONNX Runtime with the same thread count as PyTorch: max |Δlogit|, top-1 agreement, the task metric on
both sides when the rows have labels, file sizes, latency p50 at batch 1 and throughput at batch 32.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from sklearn.metrics import f1_score

from tunelab.errors import UserError
from tunelab.export.merge import check_mergeable, merged
from tunelab.export.parity import batched_outputs, compare, row_labels, texts_of, torch_runner
from tunelab.model_files import sha256_file
from tunelab.models import load_model_dir
from tunelab.tasks import task_spec

FILE = "model.onnx"
QUANTIZE = ("int8",)


def default_thresholds(quantize: str | None, rows: int) -> dict:
    """fp32: the logits themselves (max |Δ| ≤ 1e-4, the same class everywhere). int8 moves logits by design, so
    it is judged by what a user sees: the class (≥ 90% the same) and the score (≤ 1 point of macro-F1 lost, or
    two rows' worth on a sample too small to resolve one point)."""
    if quantize is None:
        return {"max_abs_diff": ("max", 1e-4), "top1_agreement": ("min", 1.0)}
    return {"top1_agreement": ("min", 0.9), "metric_drop": ("max", max(0.01, 2 / rows))}


class _Logits(torch.nn.Module):
    """The model as (input_ids, attention_mask) -> logits: the graph ONNX gets."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def write_onnx(d: Path, meta: dict, out: Path, rows: list[dict], quantize: str | None = None,
               thresholds: dict | None = None) -> dict:
    """Write `model.onnx` (and the tokenizer) for the encoder in model dir `d` into `out` -> the parity record."""
    spec = task_spec(meta["task"])
    if spec.generates:
        raise UserError(f"{d} holds a '{spec.name}' model; --format onnx exports encoders (classification, NER). "
                        "Export a decoder with --format gguf or hf")
    if quantize not in (None, *QUANTIZE):
        raise UserError(f"unknown --quantize '{quantize}' for onnx; choose {', '.join(QUANTIZE)}")
    method = check_mergeable(meta, d)
    model, tok, meta = load_model_dir(d)
    model = merged(model).eval()
    graph = _Logits(model).eval()
    fp32 = out / ("model.fp32.onnx" if quantize else FILE)
    _export(graph, tok, fp32)
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic  # its loaders: only with --quantize

        with _quiet():  # per channel: one scale per output row keeps small rows from rounding to zero
            quantize_dynamic(str(fp32), str(out / FILE), weight_type=QuantType.QInt8, per_channel=True)
        size_fp32 = fp32.stat().st_size
        fp32.unlink()
    tok.save_pretrained(out)
    texts, max_length = texts_of(rows), int(meta.get("max_length") or 512)
    session = _session(out / FILE)
    ort_run = _ort_runner(session)
    torch_run = torch_runner(model)
    reference = batched_outputs(torch_run, tok, texts, max_length)
    exported = batched_outputs(ort_run, tok, texts, max_length)
    figures = compare(reference, exported)
    gold = row_labels(meta, rows)
    if gold is not None:
        ref_f1 = f1_score(gold, [int(r.argmax()) for r in reference], average="macro", zero_division=0)
        exp_f1 = f1_score(gold, [int(r.argmax()) for r in exported], average="macro", zero_division=0)
        figures.update(metric="macro_f1", metric_pytorch=float(ref_f1), metric_onnx=float(exp_f1),
                       metric_drop=float(ref_f1 - exp_f1))
    figures["size_mb"] = (out / FILE).stat().st_size / 2**20
    if quantize:
        figures["fp32_size_mb"] = size_fp32 / 2**20
    figures.update(_speed(torch_run, ort_run, tok, texts, max_length))
    return {"method": method, "figures": figures, "thresholds": thresholds or default_thresholds(quantize, len(rows)),
            "threads": torch.get_num_threads(),
            "files": {FILE: {"size": (out / FILE).stat().st_size, "sha256": sha256_file(out / FILE)}}}


def _export(graph: torch.nn.Module, tok, path: Path) -> None:
    """torch.onnx.export with dynamic batch and sequence axes, traced on two padded texts (so the attention mask
    stays an input, not a constant)."""
    enc = tok(["an example to trace the graph with", "a shorter one"], padding=True, return_tensors="pt")
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with _quiet():
        torch.onnx.export(graph, (enc["input_ids"], enc["attention_mask"]), str(path), dynamo=True,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}), external_data=False,
                          verbose=False)


@contextlib.contextmanager
def _quiet():
    """Silence the exporter and the quantiser, which print progress and log warnings about things that do not
    concern the user (torchvision ops, pre-processing advice); errors still raise."""
    with warnings.catch_warnings(), open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def _session(path: Path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same threads as PyTorch: a fair comparison
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ort_runner(session):
    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]

    return run


def _speed(torch_run, ort_run, tok, texts: list[str], max_length: int) -> dict:
    """Latency p50 at batch 1 (ms) and throughput at batch 32 (texts/s), PyTorch and ONNX Runtime in turn on the
    same texts."""
    singles = texts[:20]
    batch = (texts * (32 // len(texts) + 1))[:32]
    out = {}
    for name, run in (("pytorch", torch_run), ("onnx", ort_run)):
        times = []
        for t in singles:
            enc = tok([t], truncation=True, max_length=max_length, return_tensors="np")
            ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
            start = time.perf_counter()
            run(ids, mask)
            times.append(time.perf_counter() - start)
        enc = tok(batch, padding=True, truncation=True, max_length=max_length, return_tensors="np")
        ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
        run(ids, mask)  # warm-up
        start = time.perf_counter()
        run(ids, mask)
        out[f"{name}_p50_ms_batch1"] = statistics.median(times) * 1000
        out[f"{name}_texts_per_s_batch32"] = len(batch) / (time.perf_counter() - start)
    return out
