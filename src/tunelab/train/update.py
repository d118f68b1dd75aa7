"""`tunelab update MODEL --data NEW --out RUN`: teach a model dir new data without losing what it knew, and say
whether the result may replace it.

The update is an ordinary run (`train`) that starts from MODEL (`model.base: MODEL`, see `models.resolve_base`)
with the settings of the run that made it (its run dir's `config.yaml` when MODEL sits in one, else the
defaults), on the new dataset, with optionally:

- `--replay S`: S of the training rows are a seeded sample of the old train split (`data.replay`);
- `--regularize ewc|l2sp --strength λ`: a pull toward MODEL's weights (`train.regularize`);
- `--method NAME` and dotted overrides (`train.epochs=1`).

Before and after, both models are scored on the old dataset's test split and the new one's, with the task's
headline metric (`TaskSpec.score`), and for generative models the forgetting probe too. The gate: the update
passes when the new-data metric gains at least `min_gain` and the old-data metric loses at most `max_drop`
(points of a higher-is-better score such as macro-F1; relative for perplexity: 0.01 is 1%). The record (settings,
before, after, gate with its reason) goes into the new model dir's `tunelab.json` under `update`, so that the
registry can refuse to promote an update whose gate failed, and into `RUN/update.json`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml
from rich.table import Table

from tunelab.config import EvalConfig, apply_overrides, validate
from tunelab.data.dataset import load_meta, load_split
from tunelab.errors import UserError
from tunelab.evaluate.metrics import classification_metrics
from tunelab.evaluate.report import evaluate
from tunelab.models import META_FILE, load_model_dir, max_length_of, read_meta
from tunelab.predict import predict_texts
from tunelab.tasks import task_spec
from tunelab.tasks.token_classification import TokenClassificationTask, entity_metrics
from tunelab.train.loop import check_run_dir, train

MIN_GAIN, MAX_DROP = 0.01, 0.01  # the gate's defaults: +1 point on the new data, at most -1 point on the old


def update(model_dir: str | Path, data_dir: str | Path, out: str | Path, replay: float | None = None,
           regularize: str | None = None, strength: float | None = None, method: str | None = None,
           overrides: list[str] | None = None, min_gain: float = MIN_GAIN, max_drop: float = MAX_DROP,
           overwrite: bool = False, console=None, show_progress: bool = False) -> dict:
    """Train RUN `out` from model dir `model_dir` on dataset `data_dir`, score both models before and after on the
    old and the new test split, apply the gate -> the update record (also in the new model dir)."""
    model_dir, data_dir, out = Path(model_dir), Path(data_dir), Path(out)
    parent = read_meta(model_dir)
    old_dir = Path((parent.get("data") or {}).get("path") or "")
    if not (old_dir / "dataset.json").is_file():
        raise UserError(f"{model_dir} was trained on {old_dir or 'an unrecorded dataset'}, which is not here; the "
                        "update scores the old test split, so the old dataset dir must exist")
    if (regularize is None) != (strength is None):
        raise UserError("--regularize and --strength go together (e.g. --regularize ewc --strength 1)")
    old_kind, new_kind = load_meta(old_dir)["task"], load_meta(data_dir)["task"]
    if new_kind != old_kind:
        raise UserError(f"{data_dir} is a {new_kind} dataset, but {model_dir} was trained on a {old_kind} one "
                        f"({old_dir}); an update learns new data of the same kind")
    check_run_dir(out, None, overwrite, resumable=False)  # a RUN that cannot be written is refused before the scoring
    cfg = validate(apply_overrides(_config(model_dir, parent, data_dir, replay, regularize, strength, method),
                                   overrides or [], paths_from=Path.cwd()))
    spec = task_spec(parent["task"])
    before = {"old": scores(model_dir, old_dir), "new": scores(model_dir, data_dir)}
    summary = train(cfg, out, overwrite=overwrite, console=console, show_progress=show_progress)
    new_dir = Path(summary["model_dir"])
    after = {"old": scores(new_dir, old_dir), "new": scores(new_dir, data_dir)}
    record = {"parent": {"model_dir": str(model_dir.resolve()), "files": {n: f.get("sha256") for n, f in
                                                                           (parent.get("files") or {}).items()}},
              "data": {"old": str(old_dir.resolve()), "new": str(data_dir.resolve())},
              "replay": replay, "regularize": {"kind": regularize, "strength": strength} if regularize else None,
              "method": cfg.method.name, "metric": spec.score[0], "before": before, "after": after,
              "training": {k: summary[k] for k in ("steps", "examples_seen", "train_s") if k in summary},
              **({"labels_added": [x for x in read_meta(new_dir)["labels"] if x not in parent["labels"]]}
                 if parent.get("labels") else {}),
              "gate": gate(before, after, spec.score[2], min_gain, max_drop)}
    _annotate(new_dir, {"update": record})
    (out / "update.json").write_text(json.dumps(record, indent=2, ensure_ascii=False))
    return record


def _config(model_dir: Path, parent: dict, data_dir: Path, replay: float | None, regularize: str | None,
            strength: float | None, method: str | None) -> dict:
    """The update's run config: the parent run's (its config.yaml beside the model dir), else the defaults, with
    the base, data, replay, pull and method of the update."""
    saved = model_dir.parent / "config.yaml"
    raw = yaml.safe_load(saved.read_text(encoding="utf-8")) if saved.is_file() else {}
    raw = raw if isinstance(raw, dict) else {}
    raw["task"] = parent["task"]
    raw["name"] = None
    raw["model"] = {**(raw.get("model") or {}), "base": str(model_dir.resolve())}
    raw["model"].setdefault("max_length", parent.get("max_length") or 128)
    raw["data"] = {"dir": str(data_dir.resolve()), **({"replay": {"share": replay}} if replay else {})}
    raw["method"] = {"name": method} if method else raw.get("method") or {"name": "full"}
    train_cfg = {k: v for k, v in (raw.get("train") or {}).items() if k not in ("distill", "regularize")}
    if regularize:
        train_cfg["regularize"] = {"kind": regularize, "strength": strength}
    raw["train"] = train_cfg
    return raw


def scores(model_dir: Path, data_dir: Path) -> dict:
    """The headline metric of `model_dir` on the test split of `data_dir` (no baselines), and the forgetting
    probe's figures for a generative model. A classifier is scored over the classes of the split and of its
    predictions, and a tagger on the entity types of both, so that the model before the update, which may not
    know a new class or type (it is never right on it), and the model after are scored alike."""
    report = task_spec(read_meta(model_dir)["task"]).report
    if report == "classes":
        rows = load_split(data_dir, "test")
        predicted = [p["prediction"] for p in predict_texts(model_dir, [r["text"] for r in rows])]
        labels = sorted({r["label"] for r in rows} | set(predicted))
        m = classification_metrics([labels.index(r["label"]) for r in rows],
                                   [labels.index(p) for p in predicted], labels)
        return {"macro_f1": m["macro_f1"], "accuracy": m["accuracy"]}
    if report == "entities":  # the words' tags are predicted unlabelled: a new entity type is simply missed
        rows = load_split(data_dir, "test")
        model, tok, meta = load_model_dir(model_dir)
        task = TokenClassificationTask(tok, meta["labels"], max_length_of(meta))
        m = entity_metrics([r["tags"] for r in rows], task.tags(model, task.encode(rows, labelled=False),
                                                                EvalConfig().batch_size))
        return {"entity_f1": m["entity_f1"], "entity_precision": m["entity_precision"],
                "entity_recall": m["entity_recall"]}
    report = evaluate(model_dir, data_dir, "test", eval_cfg=EvalConfig(baselines=[], generation_samples=0))
    key = task_spec(report["task"]).score[0]
    value = report["after"][key] if isinstance(report.get("after"), dict) else report[key]
    return {key: value, **({"forgetting": report["forgetting"]} if report.get("forgetting") else {})}


def gate(before: dict, after: dict, higher_is_better: bool, min_gain: float, max_drop: float) -> dict:
    """Pass when the new-data metric gains at least `min_gain` and the old-data one loses at most `max_drop`
    (absolute for a higher-is-better score, relative for a lower-is-better one) -> {passed, gain, drop, reason}."""
    key = next(k for k in before["new"] if k != "forgetting")

    def change(which: str) -> float:  # > 0: better after than before
        b, a = before[which][key], after[which][key]
        return a - b if higher_is_better else (b - a) / b

    gain, drop = change("new"), 0.0 - change("old")  # 0.0 -: no "-0.0000" in the reason
    failed = [f"the new data gained {gain:+.4f}, less than {min_gain}" if gain < min_gain else None,
              f"the old data lost {drop:.4f}, more than {max_drop}" if drop > max_drop else None]
    failed = [f for f in failed if f]
    return {"passed": not failed, "gain": gain, "drop": drop, "min_gain": min_gain, "max_drop": max_drop,
            "relative": not higher_is_better,
            "reason": "; ".join(failed) or f"the new data gained {gain:+.4f}, the old data lost {drop:.4f}"}


def _annotate(model_dir: Path, fields: dict) -> None:
    """Add `fields` to a model dir's tunelab.json, replaced whole (a reader never sees half a file)."""
    path = model_dir / META_FILE
    meta = {**json.loads(path.read_text(encoding="utf-8")), **fields}
    tmp = path.with_name(f".{META_FILE}.tmp")
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def print_update(record: dict, console) -> None:
    """The before → after table of an update, and its gate."""
    key = record["metric"]
    t = Table(title=f"update of {record['parent']['model_dir']} ({key})")
    for col in ("test split", "before", "after", "change"):
        t.add_column(col, justify="left" if col == "test split" else "right")
    for which, name in (("old", f"old: {record['data']['old']}"), ("new", f"new: {record['data']['new']}")):
        b, a = record["before"][which][key], record["after"][which][key]
        t.add_row(name, f"{b:.4f}", f"{a:.4f}", f"{a - b:+.4f}")
    f_b, f_a = record["before"]["new"].get("forgetting"), record["after"]["new"].get("forgetting")
    if f_b and f_a:  # each model's own perplexity on general text
        b, a = f_b["perplexity_after"], f_a["perplexity_after"]
        t.add_row(f"forgetting probe: perplexity on {f_a['general_text']}", f"{b:.2f}", f"{a:.2f}", f"{a - b:+.2f}")
    console.print(t)
    g = record["gate"]
    verdict = "[bold green]gate passed[/]" if g["passed"] else "[bold red]gate failed[/]"
    console.print(f"{verdict}: {g['reason']} (needs a gain ≥ {g['min_gain']} and a loss ≤ {g['max_drop']}"
                  f"{', relative' if g['relative'] else ''})", highlight=False, soft_wrap=True)
