"""`tunelab compress MODEL_DIR --report [--with DIR …]`: one table of what each compression of a model costs and
buys, every row measured the same way on the same test rows and threads.

A row is a model dir run by PyTorch (the original, its int8 twin, a pruned or distilled student) or an ONNX export
dir run by ONNX Runtime (fp32 or int8): weight size, latency p50 at batch 1, throughput at batch 32, the task
metric (macro-F1, or entity F1 for NER) and its change against the first row. With `bf16`, the first model runs a
second time with its weights in bf16 — on a CPU without native bf16 (no AVX512-BF16 / AMX) that row says so: its
quality is what bf16 serving would give, its speed is emulation's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tunelab.artifacts import kind_of
from tunelab.data.dataset import load_split
from tunelab.errors import UserError, read_json_file
from tunelab.export.parity import BATCH, batched_outputs, logits_of, speed, task_score, texts_of, torch_runner
from tunelab.models import META_FILE, load_model_dir, max_length_of, read_meta
from tunelab.tasks import refuse_stage
from tunelab.train.precision import bf16_supported


def _runner(d: Path, bf16: bool = False):
    """-> (run, tokenizer, meta, runtime, weight files) for a model dir or an ONNX export dir; `bf16`: the model
    dir's weights cast to bf16."""
    if kind_of(d) == "export":
        from transformers import AutoTokenizer  # an export row's tokenizer

        from tunelab.export.onnx import ort_runner, session  # ONNX Runtime: only for an export row

        meta = read_json_file(d / META_FILE, f"{d} has no {META_FILE}")
        if meta.get("format") != "onnx" or not (d / "model.onnx").is_file():
            raise UserError(f"{d} is a {meta.get('format')} export; the report runs ONNX exports")
        onnx = session(d / "model.onnx")
        if "logits" not in {o.name for o in onnx.get_outputs()}:
            raise UserError(f"{d} exports embeddings; the report compares classification and NER models")
        return ort_runner(onnx, "logits"), AutoTokenizer.from_pretrained(d), meta, "onnxruntime", list(d.glob("*.onnx"))
    refuse_stage(read_meta(d).get("task"), str(d), "compress")
    model, tok, meta = load_model_dir(d)
    if bf16:
        model = model.to(torch.bfloat16)
    return torch_runner(logits_of(model)), tok, meta, "pytorch", list(d.glob("*.safetensors"))


def _precision(meta: dict, bf16: bool) -> str:
    if bf16:
        return "bf16" if bf16_supported("cpu") else "bf16 (emulated)"
    int8 = (meta.get("compression") or {}).get("int8") or meta.get("quantize") == "int8"
    return "int8" if int8 else "fp32"


def compression_report(items: list[str | Path], data_dir: str | None = None, rows: int = 0,
                       bf16: bool = False) -> dict:
    """Measure each of `items` (model dirs, ONNX export dirs; the first is the reference) on the test split of
    `data_dir` (default: the first model's dataset), its first `rows` rows (0: all) -> {rows, threads, native_bf16,
    models}. `bf16`: a second row for the first model (a PyTorch fp32 model dir) with its weights in bf16."""
    if not items:
        raise UserError("the report needs at least one model dir")
    runs = [(Path(item), False) for item in items]
    if bf16:
        d = runs[0][0]
        if d.is_dir() and (kind_of(d) == "export" or (read_meta(d).get("compression") or {}).get("int8")):
            raise UserError(f"--bf16 casts the fp32 weights of a PyTorch model dir; {d} is not one")
        runs.insert(1, (d, True))
    measured, test, first = [], None, None
    for d, as_bf16 in runs:
        if not d.is_dir():
            raise UserError(f"model dir not found: {d}")
        run, tok, meta, runtime, files = _runner(d, as_bf16)
        if test is None:
            source = data_dir or (meta.get("data") or {}).get("path")
            if not source:
                raise UserError(f"{d} does not say where its dataset is; give --data DIR")
            test = load_split(source, "test")
            test = test[:rows] if rows else test
            if not test:
                raise UserError(f"{source} has no test rows to measure on")
        max_length = max_length_of(meta)
        texts = texts_of(test)
        score = task_score(meta, test, batched_outputs(run, tok, texts, max_length, batch_size=BATCH), tok,
                           max_length)
        size = sum(p.stat().st_size for p in files) / 2**20
        row = {"model": str(d), "runtime": runtime, "precision": _precision(meta, as_bf16),
               "compression": sorted((meta.get("compression") or {})), "quantize": meta.get("quantize"),
               "size_mb": size / 2 if as_bf16 else size,  # the same tensors at 2 bytes instead of 4
               **speed(run, tok, texts, max_length),
               "metric": score[0] if score else None, "value": score[1] if score else None}
        first = first or row
        if row["value"] is not None and first["value"] is not None:
            row["delta"] = row["value"] - first["value"]
        row["speedup_batch1"] = first["p50_ms_batch1"] / row["p50_ms_batch1"]
        row["speedup_batch32"] = row["texts_per_s_batch32"] / first["texts_per_s_batch32"]
        measured.append(row)
    return {"rows": len(test), "threads": torch.get_num_threads(), "native_bf16": bf16_supported("cpu"),
            "models": measured}
