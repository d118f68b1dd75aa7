"""`tunelab ensemble`: several classifiers (or NER models) of one label set answering as one model.

An ensemble dir (kind `ensemble` in its `tunelab.json`) holds a copy of each member model dir under
`members/N/` (so it moves and is served on its own, like a model dir) and says how they are combined:

- `mean`: the weighted mean of the members' probabilities (soft voting);
- `vote`: each member's most probable label counts its weight (hard voting); the probabilities reported are the
  vote shares, ties are broken by the mean probability.

Members may differ in base, tokenizer, method and label order: each runs on its own tokens and its columns are
put in the ensemble's label order before combining. NER members are combined per word (the first sub-token of
each word, as a single model predicts it), so tokenizers need not agree either; a word one member lost to
truncation is decided by the others. `tunelab predict`, `tunelab eval` and `tunelab serve` take an ensemble dir
where they take a model dir.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from tunelab.artifacts import META_FILE, kind_of, write_folder
from tunelab.data.words import split_words
from tunelab.errors import UserError, read_json_file
from tunelab.evaluate.metrics import classification_metrics
from tunelab.models import library_versions, load_model_dir, read_meta
from tunelab.tasks import refuse_stage, task_spec, tasks_where
from tunelab.tasks.classification import ClassificationTask, softmax
from tunelab.tasks.token_classification import TokenClassificationTask, entity_metrics, text_spans, word_rows

COMBINE = ("mean", "vote")


def is_ensemble(path: str | Path) -> bool:
    """Whether `path` is an ensemble dir."""
    return kind_of(Path(path)) == "ensemble"


def build_ensemble(members: list[str | Path], out: str | Path, combine: str = "mean",
                   weights: list[float] | None = None, overwrite: bool = False) -> dict:
    """Write the ensemble dir `out` of the model dirs `members` (two or more, one labelled task, one label set);
    -> its `tunelab.json`. `weights`: one positive number per member (normalised; default equal)."""
    if len(members) < 2:
        raise UserError("an ensemble needs two or more model dirs")
    if combine not in COMBINE:
        raise UserError(f"unknown combination '{combine}'; choose {' or '.join(COMBINE)}")
    weights = [1.0] * len(members) if weights is None else [float(w) for w in weights]
    if len(weights) != len(members) or not all(w > 0 for w in weights):
        raise UserError(f"weights (--weight): one positive number per model dir ({len(members)}), got {weights}")
    metas = [_member_meta(Path(m)) for m in members]
    first = metas[0]
    for m, meta in zip(members[1:], metas[1:]):
        if meta["task"] != first["task"]:
            raise UserError(f"{m} is a {meta['task']} model and {members[0]} a {first['task']} model; an "
                            "ensemble's members share one task")
        if set(meta["labels"]) != set(first["labels"]):
            raise UserError(f"{m} knows the labels {sorted(meta['labels'])} and {members[0]} "
                            f"{sorted(first['labels'])}; an ensemble's members share one label set")
    total = sum(weights)
    record = {
        "kind": "ensemble", "task": first["task"], "labels": list(first["labels"]), "combine": combine,
        "weights": [w / total for w in weights],
        "members": [{"dir": f"members/{i}", "source": str(Path(m).resolve()), "base": meta["base"]["ref"],
                     "method": meta["method"]["name"], "seed": meta.get("seed"),
                     "data_fingerprint": meta["data"]["fingerprint"],
                     "validation": (meta.get("metrics") or {}).get("validation", {})}
                    for i, (m, meta) in enumerate(zip(members, metas))],
        # what `tunelab eval` defaults to and reports: the first member's data and eval settings
        "base": {"ref": f"ensemble of {len(members)}: " + ", ".join(sorted({meta['base']['ref'] for meta in metas}))},
        "method": {"name": f"ensemble ({combine})"}, "data": first["data"], "eval": first.get("eval", {}),
        "max_length": max(meta.get("max_length", 512) for meta in metas),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": library_versions(),
    }
    with write_folder(out, "ensemble", overwrite) as tmp:
        for i, m in enumerate(members):
            shutil.copytree(m, tmp / "members" / str(i), ignore=shutil.ignore_patterns(".tunelab-*"))
        (tmp / META_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False))
    return record


def _member_meta(d: Path) -> dict:
    """A member's `tunelab.json`: a model dir of a labelled task (not an ensemble, not a stage)."""
    if is_ensemble(d):
        raise UserError(f"{d} is an ensemble; give its members' model dirs instead (ensembles do not nest)")
    meta = read_meta(d)
    spec = refuse_stage(meta.get("task"), str(d), "ensemble")
    if not spec.labelled:
        raise UserError(f"{d} is a {spec.name} model; ensembles combine classifiers or NER models "
                        f"({' and '.join(tasks_where(labelled=True))})")
    return meta


def read_ensemble(d: str | Path) -> dict:
    """The `tunelab.json` of ensemble dir `d`."""
    d = Path(d)
    meta = read_json_file(d / META_FILE, f"{d} is not a tunelab ensemble dir (no {META_FILE})")
    if not isinstance(meta, dict) or meta.get("kind") != "ensemble":
        raise UserError(f"{d} is not a tunelab ensemble dir")
    return meta


class Ensemble:
    """A loaded ensemble dir: its members (model, tokenizer, meta), combined as its `combine` says."""

    def __init__(self, d: str | Path, device: str = "cpu", tasks: tuple[str, ...] | None = None):
        self.dir = Path(d)
        self.meta = meta = read_ensemble(d)
        self.spec = task_spec(meta.get("task"), str(d))
        if tasks is not None and self.spec.name not in tasks:
            raise UserError(f"{d} is an ensemble of '{self.spec.name}' models; this command needs a "
                            f"{' or '.join(tasks)} model")
        self.labels = list(meta["labels"])
        self.weights = np.asarray(meta["weights"], dtype=np.float64)
        self.members = [load_model_dir(self.dir / m["dir"], device, tasks=(self.spec.name,)) for m in meta["members"]]
        self.tokenizer = self.members[0][1]  # counts tokens for the report's base fit and the server's usage

    @property
    def member_metas(self) -> list[dict]:
        return [meta for _, _, meta in self.members]

    def _columns(self, meta: dict) -> list[int]:
        """A member's column of each ensemble label."""
        return [meta["labels"].index(label) for label in self.labels]

    def _combine(self, dists: np.ndarray) -> np.ndarray:
        """[members, …, labels] probabilities (NaN where a member has no say) -> the ensemble's [..., labels]
        (NaN where no member has one)."""
        w = self.weights.reshape(-1, *([1] * (dists.ndim - 1)))
        has = ~np.isnan(dists).any(-1, keepdims=True)
        weight = (w * has).sum(0)
        mean = (w * np.nan_to_num(dists)).sum(0) / np.where(weight > 0, weight, np.nan)
        if self.meta["combine"] == "mean":
            return mean
        votes = np.eye(dists.shape[-1])[np.nan_to_num(dists, nan=-1.0).argmax(-1)] * has
        shares = (w * votes).sum(0) / np.where(weight > 0, weight, np.nan)
        return shares * (1 - 1e-6) + mean * 1e-6  # the vote decides; the mean breaks a tie

    # ---- classification ---------------------------------------------------------------------------
    def class_probs(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """[n, labels] combined probabilities, the ensemble's label order."""
        out = []
        for model, tok, meta in self.members:
            task = ClassificationTask(tok, meta["labels"], meta.get("max_length", 512))
            enc = task.encode([{"text": t} for t in texts], labelled=False)
            out.append(softmax(task.logits(model, enc, batch_size))[:, self._columns(meta)])
        return self._combine(np.stack(out)).astype(np.float32)

    # ---- token classification -----------------------------------------------------------------------
    def word_dists(self, rows: list[dict], batch_size: int = 64) -> list[np.ndarray]:
        """Rows with "tokens" -> per row [words, labels] combined probabilities (NaN: no member saw the word)."""
        per_member = []
        for model, tok, meta in self.members:
            task = TokenClassificationTask(tok, meta["labels"], meta.get("max_length", 512))
            dists = task.word_distributions(model, task.encode(rows, labelled=False), batch_size)[0]
            per_member.append([d[:, self._columns(meta)] for d in dists])
        return [self._combine(np.stack(parts)) for parts in zip(*per_member)]

    def _decoder(self) -> TokenClassificationTask:
        """Decodes the combined distributions (the ensemble's labels); its tokens are the first member's."""
        return TokenClassificationTask(self.tokenizer, self.labels, self.members[0][2].get("max_length", 512))

    def text_entities(self, texts: list[str], batch_size: int = 64) -> list[dict]:
        """As `TokenClassificationTask.text_entities`, decided by the ensemble."""
        words = [split_words(t) for t in texts]
        rows, decoder = word_rows(words), self._decoder()
        tags, probs = decoder.decode(self.word_dists(rows, batch_size))
        return text_spans(texts, words, tags, probs, decoder.encode(rows, labelled=False).lengths)

    # ---- what the commands call ---------------------------------------------------------------------
    def evaluate(self, rows: list[dict], batch_size: int = 64, predictions: bool = False) -> dict:
        """The metrics a single model's evaluation reports on labelled `rows` (an unknown label or tag is a
        `UserError`); with `predictions`, each row's label id or tags under `predictions`."""
        if self.spec.served_as == "classify":
            unknown = sorted({r["label"] for r in rows} - set(self.labels))
            if unknown:
                raise UserError(f"labels {unknown} are unknown to this ensemble; it knows {self.labels}")
            y = [self.labels.index(r["label"]) for r in rows]
            probs = self.class_probs([r["text"] for r in rows], batch_size)
            metrics = classification_metrics(y, probs.argmax(-1), self.labels, probs)
            if predictions:
                metrics["predictions"] = probs.argmax(-1).tolist()
            return metrics
        decoder = self._decoder()
        decoder.encode(rows)  # refuses unknown tags, naming them
        dists = self.word_dists(rows, batch_size)
        pred, _ = decoder.decode(dists)
        metrics = entity_metrics([r["tags"] for r in rows], pred)
        gold = [(d[k, self.labels.index(t)]) for d, r in zip(dists, rows) for k, t in enumerate(r["tags"])
                if not np.isnan(d[k]).any()]
        metrics["loss"] = float(-np.log(np.clip(gold, 1e-12, None)).mean()) if gold else 0.0
        if predictions:
            metrics["predictions"] = pred
        return metrics

    def predict(self, texts: list[str], batch_size: int = 64) -> list[dict]:
        """`tunelab predict`'s rows (see `tunelab.predict.predict_texts`)."""
        if self.spec.served_as == "entities":
            return [{"text": t, "entities": f["entities"]} for t, f in zip(texts, self.text_entities(texts,
                                                                                                      batch_size))]
        probs = self.class_probs(texts, batch_size)
        return [{"text": t, "prediction": self.labels[int(p.argmax())],
                 "probs": {lab: round(float(x), 6) for lab, x in zip(self.labels, p)}} for t, p in zip(texts, probs)]

    def serve(self, texts: list[str], batch_size: int = 64) -> list[dict]:
        """The server's results: /v1/classify {"label", "probabilities", "tokens"}, /v1/entities {"entities",
        "tokens"} (tokens: the first member's count)."""
        if self.spec.served_as == "entities":
            return self.text_entities(texts, batch_size)
        n_tokens = [len(ids) for ids in self.tokenizer(list(texts), truncation=True,
                                                       max_length=self.meta["max_length"])["input_ids"]]
        return [{"label": r["prediction"], "probabilities": r["probs"], "tokens": n}
                for r, n in zip(self.predict(texts, batch_size), n_tokens)]
