"""`ranker`: two stages, as production recommenders do. A first-stage recommender (item-kNN by default, or any
model, a hybrid included) retrieves each user's top `candidates`; a language model fine-tuned through the
training loop as a classifier reads "#RANK candidate item text || recently: the user's last titles" (RANK: the
candidate's place in the first stage's list) and says how likely the user is to pick the candidate next: its
probability of `yes` is the interest score.

The classifier's data comes from the train split only: each user's train history is replayed at its last
`positions` steps; where the first stage, reading the history before that step, lists the item the user picked
next, that item is a positive, and `negatives` other items of the same list are the negatives (hard ones: what the
first stage would have shown). Its validation rows come from the validation split the same way. The ranker's base
is MiniLM cut to its first `layers` layers (fast enough to re-rank per request on a CPU), or any classifier base.

The final order: the candidates first, by `blend` × standardised interest + (1 − `blend`) × standardised
first-stage score (`blend` chosen on validation; 0 is the first stage alone, and then the classifier is not
called), then every other item by its first-stage score.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from tunelab.artifacts import TMP_TAG
from tunelab.config import PrepareOptions, RunConfig
from tunelab.data.dataset import write_jsonl
from tunelab.data.prepare import prepare as prepare_dataset
from tunelab.errors import UserError
from tunelab.recommend.data import Interactions
from tunelab.recommend.hybrid import standardise
from tunelab.recommend.metrics import candidates, rank_metrics, top_k
from tunelab.recommend.models import Catalogue, Recommender
from tunelab.terminal import make_console

DEFAULTS = {"stage1": "itemknn", "candidates": 20, "negatives": 4, "positions": 10, "history": 5,
            "base": "builtin:minilm-l6", "layers": 2, "max_length": 80, "epochs": 2.0, "batch_size": 32,
            "lr": 1e-4, "seed": 0}
BLENDS = (0.0, 0.25, 0.5, 0.75, 1.0)
LABELS = ("no", "yes")


def render(candidate: str, recent: list[str], rank: int) -> str:
    """The classifier's input: the candidate's place in the first stage's list, the candidate, then the recent
    history, latest first (truncation cuts the oldest history, never the candidate)."""
    return f"#{rank} {candidate} || recently: " + ("; ".join(recent) if recent else "nothing yet")


class TwoStage(Recommender):
    name = "ranker"

    def __init__(self, stage1: Recommender, params: dict, folder: Path | None = None):
        self.stage1, self.params = stage1, {**DEFAULTS, **params, "stage1": {"name": stage1.name,
                                                                             "params": stage1.params}}
        self.folder = folder
        self._classifier = None
        self._lock = threading.Lock()  # request threads share the classifier and its tokenizer

    def fit(self, histories, catalogue):
        self.stage1.fit(histories, catalogue)
        self.catalogue = catalogue

    def classifier(self):
        if self.folder is None or not (Path(self.folder) / "ranker").is_dir():
            raise UserError(f"the ranker's classifier is missing ({self.folder}/ranker); train it again")
        if self._classifier is None:
            from tunelab.models import load_model_dir  # imported inside: loads torch and transformers
            from tunelab.tasks.classification import ClassificationTask  # imported inside: loads torch

            model, tok, meta = load_model_dir(self.folder / "ranker", tasks=("classification",))
            self._classifier = (model, ClassificationTask(tok, meta["labels"], meta.get("max_length", 128)))
        return self._classifier

    def interest(self, texts: list[str]) -> np.ndarray:
        """p(yes) per rendered text; bf16 autocast where the CPU computes bf16 natively (as the server's encoders)."""
        from tunelab.tasks.classification import softmax  # imported inside: loads torch
        from tunelab.train.precision import autocast, resolve_precision  # imported inside: loads torch

        with self._lock:
            model, task = self.classifier()
            enc = task.encode([{"text": t} for t in texts], labelled=False)
            with autocast(resolve_precision("auto", "cpu"), "cpu"):
                logits = task.logits(model, enc, batch_size=64)
        return softmax(logits)[:, task.labels.index("yes")]

    def warm(self) -> None:
        """Load the classifier now (a server loads before it is ready, not on the first request)."""
        with self._lock:
            self.classifier()

    def score(self, histories, users, allowed=None):
        first = self.stage1.score(histories, users, allowed)
        ok = np.ones_like(first, bool) if allowed is None else allowed
        out = standardise(first, ok)
        w = float(self.params.get("blend", 1.0))
        if w == 0:  # validation chose the first stage alone: no classifier call
            return out
        cands = top_k(first, ok, int(self.params["candidates"]))
        texts, where = [], []
        titles, full = self.catalogue.titles, self.catalogue.texts
        n_hist = int(self.params["history"])
        for row, (h, cs) in enumerate(zip(histories, cands)):
            recent = [titles[i] for i in h[::-1][:n_hist]]
            for rank, c in enumerate(cs[cs >= 0], 1):
                texts.append(render(full[c], recent, rank))
                where.append((row, c))
        if not texts:
            return out
        p = self.interest(texts)
        rows, cols = np.array(where).T
        interest = np.full(first.shape, np.nan, np.float32)
        interest[rows, cols] = p
        mask = ~np.isnan(interest)
        blend = w * standardise(np.nan_to_num(interest), mask) + (1 - w) * standardise(first, mask)
        # the candidates above everything else: shifted past the row's best non-candidate
        top_rest = np.where(mask, -np.inf, out).max(1)
        low_cand = np.where(mask, blend, np.inf).min(1)
        shift = np.where(np.isfinite(top_rest) & np.isfinite(low_cand), top_rest - low_cand + 1.0, 0.0)
        return np.where(mask, blend + shift[:, None], out).astype(np.float32)

    def arrays(self):
        return self.stage1.arrays()

    def load_arrays(self, arrays, catalogue):
        self.stage1.load_arrays(arrays, catalogue)
        self.catalogue = catalogue


def _examples(data: Interactions, stage1: Recommender, early: Recommender, opts: dict,
              rng: np.random.Generator) -> dict[str, list]:
    """Classifier rows {text, label, split}. Train rows: each user's last `positions` train picks replayed through
    `early` (the first stage fitted without those picks, so they and what follows are unknown to it, as the
    validation pick is to `stage1`), the history before each pick read as a new history. Validation / test rows
    (alternate users): the validation pick through `stage1` (fitted on train) with the user's learnt state, as
    scoring does. A later pick of the user is never a negative."""
    catalogue = Catalogue.of(data.items)
    titles, texts = catalogue.titles, catalogue.texts
    train, targets = data.histories("train"), data.targets("validation")
    rows = {"train": [], "validation": [], "test": []}
    n_hist, n_neg, n_cand = int(opts["history"]), int(opts["negatives"]), int(opts["candidates"])

    def add(split: str, history: np.ndarray, chosen: np.ndarray, cands: np.ndarray, picks: set):
        recent = [titles[i] for i in history[::-1][:n_hist]]
        place = {int(c): r for r, c in enumerate(cands.tolist(), 1) if c >= 0}
        chosen = [i for i in chosen.tolist() if i in place]  # what the ranker will see: the first stage's list
        for i in chosen:
            rows[split].append({"text": render(texts[i], recent, place[i]), "label": "yes", "split": split})
        pool = [c for c in place if c not in picks]
        for c in rng.permutation(pool)[:n_neg * len(chosen)].tolist():
            rows[split].append({"text": render(texts[c], recent, place[c]), "label": "no", "split": split})

    last = int(opts["positions"])
    cases = [(early, h[:s], h[s:s + 1], "train", -1, h) for h in train for s in range(max(1, len(h) - last), len(h))]
    users = sorted(targets)
    cases += [(stage1, train[u], targets[u], "validation" if k % 2 == 0 else "test", u,
               np.concatenate([train[u], targets[u]])) for k, u in enumerate(users)]
    for model in (early, stage1):
        mine = [c for c in cases if c[0] is model]
        for start in range(0, len(mine), 256):
            chunk = mine[start:start + 256]
            allowed = candidates(~data.cold, [c[1] for c in chunk])  # the history so far; later picks stay in
            scores = model.score([c[1] for c in chunk], np.array([c[4] for c in chunk]), allowed)
            for (_, history, chosen, split, _, picks), cands in zip(chunk, top_k(scores, allowed, n_cand)):
                add(split, history, chosen, cands, set(picks.tolist()))
    return rows


def _truncated_base(ref: str, layers: int, out: Path) -> str:
    """A copy of encoder `ref` with only its first `layers` transformer layers (BERT family); `ref` when 0."""
    if not layers:
        return ref
    from transformers import AutoModel  # imported inside: loads torch and transformers

    from tunelab.models import load_pretrained, load_tokenizer, resolve_base  # imported inside: loads torch

    base = resolve_base(ref)
    model = load_pretrained(AutoModel, base)
    blocks = getattr(getattr(model, "encoder", None), "layer", None)
    if blocks is None:
        raise UserError(f"ranker.layers needs a BERT-family encoder; {ref} has no encoder.layer (set layers 0)")
    if layers < len(blocks):
        model.encoder.layer = blocks[:layers]
        model.config.num_hidden_layers = layers
    model.save_pretrained(out)
    load_tokenizer(base).save_pretrained(out)
    return str(out)


def fit_ranker(data: Interactions, opts: dict, make_stage1: Callable[[], Recommender], seed: int, log=print):
    """The classifier's data from the first stage (`make_stage1()`: unfitted, its settings chosen), its training
    through the loop, the blend.
    Returns (model, record, extra, work): `extra(tmp)` copies the classifier's model dir into the recommender dir;
    `work` is the scratch folder, which the caller removes."""
    from tunelab.train.loop import train as train_loop  # imported inside: loads torch and transformers

    opts = {**DEFAULTS, **{k: v for k, v in opts.items() if v is not None}}
    catalogue = Catalogue.of(data.items)
    train = data.histories("train")
    stage1, early = make_stage1(), make_stage1()
    stage1.fit(train, catalogue)
    early.fit([h[:max(1, len(h) - int(opts["positions"]))] for h in train], catalogue)
    work = Path(tempfile.mkdtemp(prefix=f"{TMP_TAG}ranker-"))
    try:
        rows = _examples(data, stage1, early, opts, np.random.default_rng(seed))
        log(f"  ranker rows: train {len(rows['train'])}, validation {len(rows['validation'])}, "
            f"test {len(rows['test'])}")
        source = work / "rows.jsonl"
        write_jsonl(source, [r for split in rows.values() for r in split])
        prep = PrepareOptions(split_column="split", max_drop_rate=1.0, seed=seed,
                              pii={"enabled": False}, dedup={"exact": True, "near": False})
        prepare_dataset(str(source), work / "data", prep)
        base = _truncated_base(str(opts["base"]), int(opts["layers"]), work / "base")
        cfg = RunConfig.model_validate({
            "task": "classification", "model": {"base": base, "max_length": int(opts["max_length"])},
            "data": {"dir": str(work / "data")},
            "train": {"epochs": float(opts["epochs"]), "batch_size": int(opts["batch_size"]), "lr": float(opts["lr"]),
                      "seed": seed, "evals_per_epoch": 1},
            "eval": {"baselines": []}})
        train_loop(cfg, work / "run", console=make_console(stderr=True))
        params = {k: v for k, v in opts.items() if k != "stage1"}
        model = TwoStage(stage1, params, work)
        shutil.copytree(work / "run" / "model", work / "ranker")
        model.catalogue = catalogue
        blend, scores = _choose_blend(model, data)
        model.params["blend"] = blend
        log(f"  ranker blend {blend}: validation NDCG@10 {scores}")
        record = {"validation_ndcg@10": scores[blend],
                  "blend_search": {str(b): s for b, s in scores.items()}}

        def extra(tmp: Path):
            shutil.copytree(work / "ranker", tmp / "ranker")

        return model, record, extra, work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _choose_blend(model: TwoStage, data: Interactions) -> tuple[float, dict[float, float]]:
    """The blend weight with the best validation NDCG@10 (the classifier scored once) on the validation users
    whose rows the training loop did not select its checkpoint on (the odd ones, see `_examples`)."""
    train, targets = data.histories("train"), data.targets("validation")
    users = np.array(sorted(targets), dtype=np.int64)[1::2]
    allowed = candidates(~data.cold, [train[u] for u in users])
    relevant = [targets[u] for u in users]
    interest = model.interest
    cache: dict[str, float] = {}

    def cached(texts):
        missing = [t for t in texts if t not in cache]
        if missing:
            cache.update(zip(missing, interest(missing).tolist()))
        return np.array([cache[t] for t in texts], np.float32)

    model.interest = cached
    try:
        scores = {}
        for b in BLENDS:
            model.params["blend"] = b
            s = model.score([train[u] for u in users], users, allowed)
            scores[b] = float(rank_metrics(s, allowed, relevant, 10)["ndcg"].mean())
    finally:
        del model.interest
    return max(scores, key=lambda b: (scores[b], -b)), scores
