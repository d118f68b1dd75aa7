"""`tunelab predict`: apply a model dir to texts or a JSONL/CSV file, batched.

One schema everywhere (table, `--json`, a predictions file or stdout): a classifier adds `prediction` and
`probs` to each row; an NER model adds `entities`. A row's other fields are kept (a gold `label` column stays
`label`).

Classification: a label and per-class probabilities per text. Token classification (NER): the entities
found in each raw text, as character spans (`TokenClassificationTask.text_entities`: the text is split into
words by the same rule text + span NER data is prepared with). Only raw text is read; pre-tokenised rows
(`tokens` lists) are not.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import BinaryIO, TextIO

from tunelab.artifacts import check_file_target, write_file
from tunelab.data.read import Row, parse_json_line, read_rows
from tunelab.ensemble import Ensemble, is_ensemble
from tunelab.errors import UserError
from tunelab.models import load_model_dir, read_meta
from tunelab.tasks import refuse_stage, task_spec, tasks_where
from tunelab.tasks.classification import ClassificationTask, softmax
from tunelab.tasks.token_classification import TokenClassificationTask



def predict_texts(model_dir: str | Path, texts: list[str], batch_size: int = 64) -> list[dict]:
    """-> in input order, for a classifier [{"text", "prediction", "probs": {label: p}}]; for an NER model
    [{"text", "entities": [{"type", "text", "start", "end", "score"}]}] with `text[start:end]` the entity's text
    and `score` the mean probability of its words' tags. Another task is a `UserError`. An ensemble dir answers
    the same way (`tunelab.ensemble`)."""
    if is_ensemble(model_dir):
        return Ensemble(model_dir).predict([valid_text(t) for t in texts], batch_size)
    refuse_stage(read_meta(model_dir).get("task"), str(model_dir), "predict with")
    model, tok, meta = load_model_dir(model_dir, tasks=tasks_where(labelled=True))
    texts = [valid_text(t) for t in texts]
    max_length = meta.get("max_length", 512)
    if task_spec(meta["task"]).served_as == "entities":
        task = TokenClassificationTask(tok, meta["labels"], max_length)
        found = task.text_entities(model, texts, batch_size)
        return [{"text": t, "entities": f["entities"]} for t, f in zip(texts, found)]
    task = ClassificationTask(tok, meta["labels"], max_length)
    enc = task.encode([{"text": t} for t in texts], labelled=False)
    probs = softmax(task.logits(model, enc, batch_size))
    labels = meta["labels"]
    return [{"text": t, "prediction": labels[int(p.argmax())], "probs": {lab: round(float(x), 6)
                                                                        for lab, x in zip(labels, p)}}
            for t, p in zip(texts, probs)]


SURROGATE = re.compile("[\ud800-\udfff]")


def valid_text(text: str) -> str:
    """`text` as valid Unicode: lone surrogates (bytes that were not UTF-8, as Python keeps them from the command
    line, or JSON escapes such as \\ud800) become U+FFFD, as invalid bytes in files do."""
    return SURROGATE.sub("\ufffd", text)


def _output_row(fields: dict, res: dict) -> dict:
    return {**fields, **{k: v for k, v in res.items() if k != "text"}}


def read_stdin_rows(stream: BinaryIO, text_column: str) -> tuple[list[str], list[Row]]:
    """Rows from standard input (bytes: invalid UTF-8 is replaced, as in files): JSON lines when the first
    non-empty line is a JSON object, else one text per non-empty line (in `text_column`)."""
    text = stream.read().decode("utf-8-sig", errors="replace")
    lines = [(n, line.rstrip("\r")) for n, line in enumerate(text.split("\n"), start=1) if line.strip()]
    if not lines:
        raise UserError("standard input is empty (no texts)")
    try:
        as_json = isinstance(json.loads(lines[0][1]), dict)
    except json.JSONDecodeError:
        as_json = False
    if not as_json:
        return [text_column], [Row(line=n, fields={text_column: text}) for n, text in lines]
    rows = [parse_json_line(n, text) for n, text in lines]
    return list(rows[0].fields), rows


def predict_file(model_dir: str | Path, input_path: str | Path, out_path: str | Path | None,
                 text_column: str = "text", batch_size: int = 64, overwrite: bool = False,
                 stdin: BinaryIO | None = None, stdout: TextIO | None = None) -> dict:
    """Predict every row of a JSONL/CSV/… file (`-`: standard input); rows keep their other fields and gain
    `prediction` + `probs` (classifier) or `entities` (NER, offsets into the row's text); returns counts.
    `out_path` follows the output-file rule (an existing predictions file is replaced only with `overwrite`;
    any other file there is refused); None writes the JSON lines to standard output."""
    if out_path is not None:
        check_file_target(Path(out_path), "predictions", overwrite)
    if str(input_path) == "-":
        columns, rows = read_stdin_rows(stdin or sys.stdin.buffer, text_column)
    else:
        columns, rows = read_rows(input_path)
    if columns and text_column not in columns:
        hint = " (pre-tokenised rows are not read: give raw text)" if "tokens" in columns else ""
        raise UserError(f"{input_path}: no text column '{text_column}'; columns are: {', '.join(columns)} "
                        f"(choose with --text-column){hint}")
    keep, skipped = [], []
    for row in rows:
        text = None if row.error else row.fields.get(text_column)
        if isinstance(text, str) and text.strip():
            keep.append(row.fields)
        else:
            skipped.append({"line": row.line, "reason": row.error or "empty_or_missing_text"})
    results = predict_texts(model_dir, [r[text_column] for r in keep], batch_size) if keep else []
    lines = "".join(valid_text(json.dumps(_output_row(fields, res), ensure_ascii=False)) + "\n"
                    for fields, res in zip(keep, results))
    if out_path is None:
        (stdout or sys.stdout).write(lines)
    else:
        write_file(out_path, lines, "predictions", checked=True)
    return {"predicted": len(results), "skipped": skipped, "out": None if out_path is None else str(out_path)}
