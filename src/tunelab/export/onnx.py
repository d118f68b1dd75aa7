"""`--format onnx`: an encoder model dir (classification, NER) or a base encoder (embeddings: `builtin:minilm-l6`,
an HF dir) as `model.onnx` for ONNX Runtime.

Exported by `torch.onnx.export` (the torch.export-based exporter) with dynamic batch and sequence axes; inputs
`input_ids`, `attention_mask` (int64), output `logits` (a model dir) or `embeddings` (a base encoder: the mean of
the last hidden states over real tokens, L2-normalised, pooled inside the graph as `tunelab serve` pools them).
`--quantize int8`: ONNX Runtime's dynamic quantisation (int8 weights of every MatMul, one scale per output
channel; activations quantised per call). Parity runs the file in ONNX Runtime with the same thread count as
PyTorch: max |Δ| of the outputs, top-1 agreement (classes, tags) or cosines and nearest neighbours
(embeddings), the task metric on both sides when the rows have labels (macro-F1, entity F1), file
sizes, latency p50 at batch 1 and throughput at batch 32.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import torch

from tunelab.errors import UserError
from tunelab.merge import check_mergeable, merged
from tunelab.export.parity import (batched_outputs, compare, logits_of, speed, task_score, texts_of,
                                   torch_runner)
from tunelab.generate import base_kind
from tunelab.model_files import sha256_file
from tunelab.models import (load_model_dir, load_pretrained, load_tokenizer, max_length_of, resolve_base,
                            sentence_embeddings)
from tunelab.tasks import task_spec

FILE = "model.onnx"
QUANTIZE = ("int8",)
EMBEDDINGS = "embeddings"  # the task of a base encoder exported for sentence embeddings
NEIGHBOURS = 5  # embeddings: the nearest texts a search returns


def default_thresholds(quantize: str | None, rows: int, task: str = "") -> dict:
    """fp32: the outputs themselves (max |Δ| ≤ 1e-4, the same class everywhere). int8 moves them by design, so it
    is judged by what a user sees: the class (≥ 90% the same) and the score (≤ 1 point of the task metric lost,
    or two rows' worth on a sample too small to resolve one point); for embeddings the direction of the vectors
    (mean cosine ≥ 0.98; the lowest is reported, it only falls as rows are added) and whether a search still finds
    each row's nearest neighbour among its 5 nearest (≥ 99% fp32, ≥ 90% int8; among hundreds of short texts the
    very nearest is often a near tie, so that one is reported, not held)."""
    if task == EMBEDDINGS:
        recall = f"neighbour_recall_at_{NEIGHBOURS}"
        if quantize is None:
            return {"max_abs_diff": ("max", 1e-4), recall: ("min", 0.99)}
        return {"mean_cosine": ("min", 0.98), recall: ("min", 0.9)}
    if quantize is None:
        return {"max_abs_diff": ("max", 1e-4), "top1_agreement": ("min", 1.0)}
    return {"top1_agreement": ("min", 0.9), "metric_drop": ("max", max(0.01, 2 / rows))}


class _Logits(torch.nn.Module):
    """The model as (input_ids, attention_mask) -> logits: the graph ONNX gets (and PyTorch runs for parity)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return logits_of(self.model)(input_ids, attention_mask)


class _Embeddings(_Logits):
    """A base encoder as (input_ids, attention_mask) -> one unit vector per text (`models.sentence_embeddings`)."""

    def forward(self, input_ids, attention_mask):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return sentence_embeddings(hidden, attention_mask)


def write_onnx(d: Path, meta: dict, out: Path, rows: list[dict], quantize: str | None = None,
               thresholds: dict | None = None, data_dir: str | None = None) -> dict:
    """Write `model.onnx` (and the tokenizer) for the encoder in model dir `d` (or the base encoder `meta` names,
    task "embeddings") into `out` -> the parity record."""
    if quantize not in (None, *QUANTIZE):
        raise UserError(f"unknown --quantize '{quantize}' for onnx; choose {', '.join(QUANTIZE)}")
    embeddings = meta["task"] == EMBEDDINGS
    if embeddings:
        graph, tok, output = _base_encoder(meta["base"]["ref"]), load_tokenizer(meta["base"]["ref"]), EMBEDDINGS
        method = "full"
    else:
        spec = task_spec(meta["task"])
        if spec.generates:
            raise UserError(f"{d} holds a '{spec.name}' model; --format onnx exports encoders (classification, "
                            "NER, embeddings). Export a decoder with --format gguf or hf")
        if spec.served_as == "embed":  # its graph would need the pooling and its parity rows are pairs: not yet
            raise UserError(f"{d} holds a '{spec.name}' encoder, which --format onnx does not export yet; export it "
                            "with --format hf (a plain encoder folder), or use the model dir itself")
        method = check_mergeable(meta, d)
        model, tok, meta = load_model_dir(d)
        graph, output = _Logits(merged(model).eval()).eval(), "logits"
    fp32 = out / ("model.fp32.onnx" if quantize else FILE)
    _export(graph, tok, fp32, output)
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic  # its loaders: only with --quantize

        with _quiet():  # per channel: one scale per output row keeps small rows from rounding to zero
            quantize_dynamic(str(fp32), str(out / FILE), weight_type=QuantType.QInt8, per_channel=True)
        size_fp32 = fp32.stat().st_size
        fp32.unlink()
    tok.save_pretrained(out)
    texts, max_length = texts_of(rows), max_length_of(meta)
    ort_run = ort_runner(session(out / FILE), output)
    torch_run = torch_runner(graph)
    reference = batched_outputs(torch_run, tok, texts, max_length)
    exported = batched_outputs(ort_run, tok, texts, max_length)
    figures = compare(reference, exported)
    if embeddings:
        figures.pop("top1_agreement")  # the largest coordinate of a vector means nothing
        figures.update(_vector_figures(np.stack(reference), np.stack(exported)))
    else:
        figures.update(_task_metric(meta, rows, reference, exported, tok, max_length))
    figures["size_mb"] = (out / FILE).stat().st_size / 2**20
    if quantize:
        figures["fp32_size_mb"] = size_fp32 / 2**20
    figures.update(_speed(torch_run, ort_run, tok, texts, max_length))
    if thresholds is None:
        thresholds = default_thresholds(quantize, len(rows), meta["task"])
    return {"method": method, "figures": figures, "thresholds": thresholds,
            "threads": torch.get_num_threads(),
            "files": {FILE: {"size": (out / FILE).stat().st_size, "sha256": sha256_file(out / FILE)}}}


def _base_encoder(ref: str) -> _Embeddings:
    """The sentence-embedding graph of a base encoder (builtin:NAME, an HF dir); a decoder is refused."""
    from transformers import AutoModel  # the bare encoder class: only for a base exported for embeddings

    if base_kind(ref) != "embed":
        raise UserError(f"{ref} is a decoder; --format onnx exports encoders (a model dir trained for "
                        "classification or NER, or a base encoder for embeddings). Export a decoder with "
                        "--format gguf")
    model = load_pretrained(AutoModel, resolve_base(ref), dtype=torch.float32)
    return _Embeddings(model.eval()).eval()


def _vector_figures(reference: np.ndarray, exported: np.ndarray) -> dict:
    """Unit vectors of the same texts from both sides -> the lowest and mean cosine, the share of texts whose
    nearest other text (by cosine) is the same on both sides, and the share whose nearest text by the reference is
    among the export's `NEIGHBOURS` nearest (what a search over these vectors would still find)."""
    cosine = (reference * exported).sum(-1) / np.maximum(
        np.linalg.norm(reference, axis=-1) * np.linalg.norm(exported, axis=-1), 1e-12)
    figures = {"min_cosine": float(cosine.min()), "mean_cosine": float(cosine.mean())}
    if len(reference) > NEIGHBOURS:
        ranked = []
        for vectors in (reference, exported):
            sim = vectors @ vectors.T
            np.fill_diagonal(sim, -np.inf)
            ranked.append(np.argsort(-sim, axis=-1, kind="stable")[:, :NEIGHBOURS])
        figures["neighbour_agreement"] = float((ranked[0][:, 0] == ranked[1][:, 0]).mean())
        figures[f"neighbour_recall_at_{NEIGHBOURS}"] = float(
            np.mean([ranked[0][i, 0] in ranked[1][i] for i in range(len(reference))]))
    return figures


def _task_metric(meta: dict, rows: list[dict], reference: list, exported: list, tok, max_length: int) -> dict:
    """The task's score on both sides when the rows carry gold labels (`parity.task_score`) -> {metric,
    metric_pytorch, metric_onnx, metric_drop} or {}."""
    ref = task_score(meta, rows, reference, tok, max_length)
    if ref is None:
        return {}
    name, before = ref
    after = task_score(meta, rows, exported, tok, max_length)[1]
    return {"metric": name, "metric_pytorch": before, "metric_onnx": after, "metric_drop": before - after}


def _export(graph: torch.nn.Module, tok, path: Path, output: str) -> None:
    """torch.onnx.export with dynamic batch and sequence axes, traced on two padded texts (so the attention mask
    stays an input, not a constant)."""
    enc = tok(["an example to trace the graph with", "a shorter one"], padding=True, return_tensors="pt")
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with _quiet():
        torch.onnx.export(graph, (enc["input_ids"], enc["attention_mask"]), str(path), dynamo=True,
                          input_names=["input_ids", "attention_mask"], output_names=[output],
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


def session(path: Path, spin: bool = True):
    """An ONNX Runtime session on the CPU with PyTorch's thread count (a fair comparison). `spin`: its threads
    busy-wait between jobs (the lowest latency when nothing else runs); a server turns it off, so that they yield
    the cores to the HTTP side between batches."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same threads as PyTorch: a fair comparison
    options.inter_op_num_threads = 1
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxEncoder(torch.nn.Module):
    """An ONNX export run by ONNX Runtime behind a transformers-like call — `model(input_ids=…, attention_mask=…)`
    -> an output with `.logits` or `.embeddings` (float32 CPU tensors) — so the code that serves and evaluates a
    PyTorch encoder runs the export unchanged (nothing in it trains: its one parameter is empty and names the
    device, the CPU)."""

    def __init__(self, path: Path):
        super().__init__()
        self.session = session(path, spin=False)
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.device_anchor = torch.nn.Parameter(torch.zeros(0), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_):
        feed = {"input_ids": input_ids.cpu().numpy().astype(np.int64),
                "attention_mask": attention_mask.cpu().numpy().astype(np.int64)}
        values = self.session.run(self.outputs, {k: v for k, v in feed.items() if k in self.inputs})
        return SimpleNamespace(**{name: torch.from_numpy(np.asarray(v, dtype=np.float32))
                                  for name, v in zip(self.outputs, values)})


def ort_runner(session, output: str):
    """`run(input_ids, attention_mask) -> the output named `output`` through an ONNX Runtime session."""
    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return session.run([output], {"input_ids": ids, "attention_mask": mask})[0]

    return run


def _speed(torch_run, ort_run, tok, texts: list[str], max_length: int) -> dict:
    """Latency p50 at batch 1 (ms, 20 texts) and throughput at batch 32 (texts/s), PyTorch and ONNX Runtime in
    turn on the same texts (`parity.speed`)."""
    out = {}
    for name, run in (("pytorch", torch_run), ("onnx", ort_run)):
        out.update({f"{name}_{k}": v for k, v in speed(run, tok, texts, max_length, singles=20, repeats=1).items()})
    return out
