"""`tunelab export`: a model dir as the file its user deploys, proven against the original in the runtime that
will run it.

Formats: `hf` (a plain Hugging Face folder, adapters merged: `merge.py`), `onnx` (encoders through
`torch.onnx.export`, optionally int8 through ONNX Runtime: `onnx.py`), `gguf` (Llama-family decoders for
llama.cpp: `gguf.py`, its Q8_0 / Q4_0 blocks from `quants.py`). Every export is an artifact folder of
kind "export" (`tunelab.json`: format, task, labels, lineage — the source model dir, its base, method and weight
hashes) with `parity.json` beside the files; a parity figure past its threshold fails the export and leaves
nothing at `--out` (`parity.py`).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

from tunelab import __version__
from tunelab.artifacts import kind_of, write_folder
from tunelab.errors import UserError
from tunelab.evaluate.drift import PROFILE_FILE
from tunelab.export.parity import check, parity_rows
from tunelab.models import META_FILE, read_meta
from tunelab.tasks import refuse_stage

FORMATS = ("hf", "onnx", "gguf")
PARITY_FILE = "parity.json"


def export_model(model_dir: str | Path, out: str | Path, fmt: str, quantize: str | None = None,
                 rows: int = 64, data_dir: str | None = None, overwrite: bool = False,
                 thresholds: dict | None = None) -> dict:
    """Export the model dir `model_dir` as `fmt` into the folder `out` -> the parity record (also in
    `out/parity.json`). `rows`: how many rows parity runs on; `data_dir`: where they come from when the model's
    own dataset has moved; `thresholds`: figure -> ("max"|"min", bound), replacing the format's defaults ({}: none).
    A model that cannot be exported this way, or an export that misses a threshold, is a `UserError` (and
    nothing is written)."""
    d = Path(model_dir)
    if kind_of(d) == "run":
        raise UserError(f"{d} is a run dir; export its model: {d / 'model'}")
    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}")
    meta = _source_meta(str(model_dir), fmt)
    if rows < 1:
        raise UserError("--parity-rows must be at least 1")
    sample, source = parity_rows(meta, data_dir, rows)
    writer = _writer(fmt)
    with write_folder(out, "export", overwrite) as tmp:
        record = writer(d, meta, tmp, sample, quantize=quantize, thresholds=thresholds, data_dir=data_dir)
        record = {"format": fmt, "quantize": quantize, "rows": len(sample), "rows_from": source, **record}
        failed = check(record["figures"], record["thresholds"])
        if failed:
            raise UserError(f"the {fmt} export of {d} fails its parity check: " + "; ".join(failed)
                            + " (nothing was written)")
        (tmp / PARITY_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False))
        if fmt != "gguf" and (d / PROFILE_FILE).is_file():  # a served export checks its traffic's drift too
            shutil.copyfile(d / PROFILE_FILE, tmp / PROFILE_FILE)
        export_meta = {"kind": "export", "format": fmt, "quantize": quantize, "task": meta["task"],
                       "labels": meta.get("labels") or [], "max_length": meta.get("max_length"),
                       "files": record.pop("files", []),
                       "source": {"model_dir": str(d.resolve()) if d.is_dir() else str(model_dir),
                                  "base": meta.get("base"),
                                  "method": meta.get("method"), "weights": meta.get("files"),
                                  "data": meta.get("data")},
                       "parity": PARITY_FILE, "tunelab_version": __version__, "created": int(time.time())}
        (tmp / "tunelab.json").write_text(json.dumps(export_meta, indent=2, ensure_ascii=False))
    return record


def _source_meta(ref: str, fmt: str) -> dict:
    """The source's `tunelab.json`; a base model (builtin:NAME, an HF dir) is exported as it is, with nothing
    trained on it: for gguf a decoder (a causal LM), for onnx an encoder (sentence embeddings)."""
    if fmt in ("gguf", "onnx") and not (Path(ref) / META_FILE).is_file():
        task = "causal_lm" if fmt == "gguf" else "embeddings"
        return {"task": task, "base": {"ref": ref}, "method": {"name": "full"}, "max_length": 512}
    meta = read_meta(ref)
    refuse_stage(meta.get("task"), ref, "export")
    return meta


def _writer(fmt: str) -> Callable:
    """The format's `write_<format>(model_dir, meta, out, rows, quantize, thresholds, data_dir) -> parity record`
    (`data_dir`: the dataset the user named, for a quantiser that calibrates on its train split)."""
    if fmt == "hf":
        from tunelab.export.hf import write_hf  # transformers and peft (~3 s) only for this format

        return write_hf
    if fmt == "gguf":
        from tunelab.export.gguf import write_gguf  # transformers' GGUF reader and the quantisers, this format only

        return write_gguf
    from tunelab.export.onnx import write_onnx  # onnx, onnxruntime and the exporter (~2 s) only for this format

    return write_onnx
