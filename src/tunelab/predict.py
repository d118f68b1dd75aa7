"""`tunelab predict`: labels and per-class probabilities for texts or a JSONL/CSV file, batched."""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.artifacts import check_file_target, write_file
from tunelab.data.read import read_rows
from tunelab.errors import UserError
from tunelab.models import load_model_dir
from tunelab.tasks.classification import ClassificationTask, softmax


def predict_texts(model_dir: str | Path, texts: list[str], batch_size: int = 64) -> list[dict]:
    """-> [{"text", "label", "probs": {label: p}}] in input order."""
    model, tok, meta = load_model_dir(model_dir, tasks=("classification",))
    task = ClassificationTask(tok, meta["labels"], meta.get("max_length", 512))
    enc = task.encode([{"text": t} for t in texts], labelled=False)
    probs = softmax(task.logits(model, enc, batch_size))
    labels = meta["labels"]
    return [{"text": t, "label": labels[int(p.argmax())], "probs": {lab: round(float(x), 6)
                                                                   for lab, x in zip(labels, p)}}
            for t, p in zip(texts, probs)]


def predict_file(model_dir: str | Path, input_path: str | Path, out_path: str | Path,
                 text_column: str = "text", batch_size: int = 64, overwrite: bool = False) -> dict:
    """Predict every row of a JSONL/CSV/… file; rows keep their other fields; returns counts. `out_path`
    follows the output-file rule (an existing predictions file is replaced only with `overwrite`; any other
    file there is refused)."""
    check_file_target(Path(out_path), "predictions", overwrite)
    columns, rows = read_rows(input_path)
    if columns and text_column not in columns:
        raise UserError(f"{input_path}: no text column '{text_column}'; columns are: {', '.join(columns)} "
                        "(choose with --text-column)")
    keep, skipped = [], []
    for row in rows:
        text = None if row.error else row.fields.get(text_column)
        if isinstance(text, str) and text.strip():
            keep.append(row.fields)
        else:
            skipped.append({"line": row.line, "reason": row.error or "empty_or_missing_text"})
    results = predict_texts(model_dir, [r[text_column] for r in keep], batch_size) if keep else []
    lines = "".join(json.dumps({**fields, "prediction": res["label"], "probs": res["probs"]}, ensure_ascii=False)
                    + "\n" for fields, res in zip(keep, results))
    write_file(out_path, lines, "predictions", checked=True)
    return {"predicted": len(results), "skipped": skipped, "out": str(out_path)}
