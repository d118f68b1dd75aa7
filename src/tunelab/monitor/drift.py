"""`tunelab monitor drift MODEL --current LOG`: an offline drift report of any window of texts against the model's
reference profile (`tunelab.evaluate.drift`).

LOG is a server's request log folder (`tunelab serve --request-log DIR`), or JSONL/CSV files (or folders of them)
with a `text` column; `time` (ISO 8601 or Unix seconds) and `model` columns are used when present. The texts run
through the model once; the report compares the whole selection with the profile and, with `--window N`, each run
of N texts in time order. Out: a report folder with `drift.json`, `drift.png` (the features, reference against
current) and `drift-series.png` (p-values per window).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tunelab.artifacts import write_folder
from tunelab.data.read import read_rows
from tunelab.errors import UserError
from tunelab.evaluate import drift
from tunelab.evaluate.plots import drift_png, series_png
from tunelab.monitor.documents import Rejected, parse_timestamp

MIN_TEXTS = 20
READABLE = ("*.jsonl", "*.csv", "*.tsv")


@dataclass
class Selection:
    """The texts a report covers, oldest first, and what was left out by reason."""

    texts: list[str] = field(default_factory=list)
    times: list[float | None] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def log_files(paths: list[Path]) -> list[Path]:
    """The files of `paths` (a folder: its JSONL/CSV/TSV files, sorted by name: a request log's rotation order)."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted({f for pattern in READABLE for f in p.glob(pattern)})
            if not found:
                raise UserError(f"{p} holds no .jsonl, .csv or .tsv files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"no such file or folder: {p}")
    return files


def select(paths: list[Path], model_id: str | None = None, since: str | None = None, until: str | None = None,
           last: int | None = None, text_column: str = "text") -> Selection:
    """The texts of `paths` (column `text_column`; for `model_id` when records name their model, in [since, until)
    when they have a time), in time order, the `last` N of them."""
    lo = _bound(since, "--since")
    hi = _bound(until, "--until")
    sel, rows = Selection(), []
    for f in log_files(paths):
        sel.files.append(str(f))
        columns, it = read_rows(f)
        if text_column not in columns:
            raise UserError(f"{f} has no `{text_column}` column (columns: {', '.join(map(str, columns[:10]))}); "
                            "name it with --text-column")
        for n, row in enumerate(it):
            if row.error:
                sel.skip(row.error)
                continue
            rec = row.fields
            text = rec.get(text_column)
            if not isinstance(text, str) or not text.strip():
                sel.skip("no_text")
                continue
            if model_id is not None and rec.get("model") not in (None, "", model_id):
                sel.skip("other_model")
                continue
            when = None
            if rec.get("time") not in (None, ""):
                try:
                    when = parse_timestamp(rec["time"])
                except Rejected:
                    sel.skip("bad_time")
                    continue
            if (lo is not None or hi is not None) and when is None:
                sel.skip("no_time")
                continue
            if (lo is not None and when < lo) or (hi is not None and when >= hi):
                sel.skip("outside_window")
                continue
            rows.append((when if when is not None else float("-inf"), len(rows), text))
    rows.sort()
    if last is not None:
        rows = rows[-last:]
    sel.texts = [t for _, _, t in rows]
    sel.times = [None if w == float("-inf") else w for w, _, _ in rows]
    return sel


def _bound(value: str | None, flag: str) -> float | None:
    if value is None:
        return None
    try:
        return parse_timestamp(value)
    except Rejected:
        raise UserError(f"{flag} {value!r}: give an ISO 8601 time (2026-11-30T09:00:00Z) or Unix seconds") from None


def drift_report(model: str | Path, current: list[Path], out: str | Path, model_id: str | None = None,
                 since: str | None = None, until: str | None = None, last: int | None = None,
                 window: int | None = None, alpha: float = 0.01, permutations: int = 500,
                 overwrite: bool = False, text_column: str = "text", reference: Path | None = None) -> dict:
    """Compare the selected texts with the model dir's profile (or, with `reference`, a profile of that dataset
    dir's validation split: for a model dir written before profiles were); write the report folder -> the
    report."""
    import torch  # torch and the model: only once the arguments are known to be good

    from tunelab.models import load_model_dir, max_length_of  # brings torch and transformers: as above

    profile = drift.load_profile(model) if reference is None else None
    if profile is None and reference is None:
        raise UserError(f"{model} has no drift profile ({drift.PROFILE_FILE}; a classifier trained by this "
                        "tunelab version has one): give --reference DATASET_DIR, the dataset it was trained on")
    sel = select(current, model_id, since, until, last, text_column)
    if len(sel.texts) < MIN_TEXTS:
        raise UserError(f"{len(sel.texts)} texts selected ({_skipped(sel)}); a drift report needs at least "
                        f"{MIN_TEXTS}")
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net, tok, meta = load_model_dir(model, device, tasks=("classification",))
    if profile is None:
        profile = _dataset_profile(reference, net, tok, meta, device)
    feats = drift.model_features(net, tok, sel.texts, max_length_of(meta), device,
                                 embed=profile.features.embedding is not None)
    seconds = time.perf_counter() - t0
    overall = drift.compare(profile, feats, alpha, permutations)
    series = []
    if window:
        for start in range(0, len(feats) - window + 1, window):
            part = drift.compare(profile, feats.take(slice(start, start + window)), alpha, permutations, seed=start)
            series.append({"first": _iso(sel.times[start]), "last": _iso(sel.times[start + window - 1]),
                           "texts": window, **{k: part[k] for k in ("drift", "drifted", "p_min", "threshold")},
                           "p_values": {k: v["p_value"] for k, v in part["statistics"].items()}})
    report = {"model": str(Path(model).resolve()), "labels": profile.labels,
              "reference": {"rows": len(profile.features), "source": profile.source},
              "current": {"files": sel.files, "texts": len(sel.texts), "skipped": sel.skipped,
                          "first": _iso(next((t for t in sel.times if t is not None), None)),
                          "last": _iso(next((t for t in reversed(sel.times) if t is not None), None))},
              "alpha": alpha, **overall, "windows": series, "model_seconds": round(seconds, 2)}
    with write_folder(out, "drift-report", overwrite) as tmp:
        (tmp / "tunelab.json").write_text(json.dumps({"kind": "drift-report", "model": report["model"]}))
        (tmp / "drift.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
        name = Path(model).resolve()
        name = name.parent.name if name.name == "model" else name.name  # runs/NAME/model: NAME
        drift_png(profile.features, feats, profile.labels, tmp / "drift.png",
                  f"{name}: reference ({len(profile.features)} {profile.source} rows) against "
                  f"{len(feats)} current texts")
        if series:
            names = sorted({k for s in series for k in s["p_values"]})
            series_png([s["first"] or f"#{i}" for i, s in enumerate(series)],
                       {k: [s["p_values"].get(k, 1.0) for s in series] for k in names},
                       overall["threshold"], tmp / "drift-series.png", f"drift per window of {window} texts")
    return report


def _dataset_profile(data_dir: Path, net, tok, meta: dict, device: str) -> drift.Profile:
    """A profile of a dataset dir's validation split through the model, as training would have written it."""
    from tunelab.data.dataset import load_split  # the dataset contract: only with --reference
    from tunelab.models import max_length_of  # brings torch and transformers: only once a model runs

    texts = [r["text"] for r in load_split(data_dir, "validation") if isinstance(r.get("text"), str)]
    if len(texts) < MIN_TEXTS:
        raise UserError(f"{data_dir}: {len(texts)} validation rows with a text; a profile needs at least {MIN_TEXTS}")
    return drift.reference_profile(net, tok, texts, list(meta["labels"]), max_length_of(meta), device,
                                   f"validation split of {data_dir}")


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _skipped(sel: Selection) -> str:
    if not sel.skipped:
        return "none skipped"
    return "skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(sel.skipped.items()))
