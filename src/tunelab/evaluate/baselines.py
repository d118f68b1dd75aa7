"""The cheap baselines every report compares against, on the same split:

- TF-IDF + logistic regression, trained on the dataset's train split: word 1-2-grams, character n-grams or
  both, and the regularisation C, chosen on the validation split by macro-F1 (see `tfidf_logreg`);
- zero-shot prompting of an instruction-tuned decoder: the prompt lists the labels, and each label
  is scored by the probability of its word as the next token after the assistant turn starts;
- few-shot prompting (opt-in, cached): the same, after k train rows asked and answered in the same words,
  chosen by embedding similarity or at random (see `few_shot`).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.sparse import hstack
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

from tunelab.assets import cache_dir, cached
from tunelab.data.split import sample_rows
from tunelab.evaluate.metrics import classification_metrics
from tunelab.models import load_pretrained, load_tokenizer, resolve_base, sentence_embeddings

ZERO_SHOT_PROMPT = ("Classify the text into exactly one of these categories: {labels}.\n\n"
                    "Text: {text}\n\nAnswer with the category name only.")

# Bump whenever the features, the grid or the solver change: cached choices made by another version are ignored.
TFIDF_VERSION = "tfidf-2"
FEW_SHOT_VERSION = "fewshot-2"  # likewise for the few-shot prompts, example choice and scoring
SHOT_CHARS = 600  # an example's text is cut to this many characters in a few-shot prompt
FEATURE_SETS = ("word", "char", "word+char")
C_GRID = (0.5, 2.0, 8.0)
HOLDOUT_SHARE = 0.1  # of train, to tune on when the dataset has no validation rows
# Below this share of spaces among characters, text is written without spaces between words (Chinese, Japanese,
# Thai): word tokens are then whole clauses, and character 1-3-grams carry the signal. English is ~0.17.
SPACED_TEXT = 0.05


@dataclass
class _TfidfModel:
    """Fitted vectorizers (word and/or char, stacked in that order) and the classifier on top."""
    vectorizers: list
    clf: object

    def probs(self, texts: list[str], n_labels: int) -> np.ndarray:
        x = hstack([v.transform(texts) for v in self.vectorizers]).tocsr()
        probs = np.zeros((len(texts), n_labels))
        probs[:, self.clf.classes_] = self.clf.predict_proba(x)
        return probs


def tfidf_logreg(train_rows: list[dict], test_rows: list[dict], labels: list[str], seed: int = 0,
                 validation_rows: list[dict] | None = None, cache: bool = True, predictions: bool = False) -> dict:
    """TF-IDF n-grams + logistic regression, tuned on validation rows, scored on `test_rows`.

    The grid FEATURE_SETS x C_GRID (class-balanced logistic regression, saga, seeded) is fit on `train_rows`
    and scored by macro-F1 on `validation_rows`; the first best config is scored on `test_rows`, which never
    take part in the choice. No validation rows: the grid is tuned on a seeded stratified HOLDOUT_SHARE of
    train, and the winner is refit on all of train. "char" n-grams are `char_wb` 2-4 for spaced text and
    `char` 1-3 for text mostly without spaces (SPACED_TEXT).
    `cache`: the choice is kept under the tunelab cache dir, keyed by the train and validation contents,
    `labels`, `seed` and TFIDF_VERSION, so a later call on the same data fits once instead of the grid.
    Returns `classification_metrics` on `test_rows` plus `name`, `train_examples`, `features`, `C`,
    `validation_macro_f1`, `grid` (every config's validation macro-F1), `tuned_on`, `validation_examples`,
    `tuned_on_evaluated_rows` and `cache_hit` (and with `predictions`, each test row's predicted label id under
    `predictions`). A row whose label is not in `labels` raises KeyError."""
    label2id = {label: i for i, label in enumerate(labels)}

    def targets(rows: list[dict]) -> np.ndarray:
        return np.array([label2id[r["label"]] for r in rows])

    if validation_rows:
        fit_rows, val_rows, tuned_on = train_rows, validation_rows, "validation"
    else:
        n_val = max(1, round(HOLDOUT_SHARE * len(train_rows)))
        val_rows, fit_rows = sample_rows(train_rows, n_val, "label", seed)
        tuned_on = f"a seeded {HOLDOUT_SHARE:.0%} hold-out of train (no validation rows)"
    spaced = _is_spaced([r["text"] for r in train_rows])
    fitted: dict[str, _TfidfModel] = {}

    def search() -> dict:
        grid, best = _grid_search(fit_rows, targets(fit_rows), val_rows, targets(val_rows), spaced, seed)
        model = best.pop("model")
        if fit_rows is train_rows:  # the winner was fit on all of train: no refit needed
            fitted["model"] = model
        return {"version": TFIDF_VERSION, **best, "grid": grid}

    cache_hit = False
    if cache:
        key = _cache_key(train_rows, validation_rows or [], labels, seed)
        choice, cache_hit = _cached_json(f"tfidf-{key}", "choice.json", search, _valid_choice)
    else:
        choice = search()
    model = fitted.get("model") or _fit(train_rows, targets(train_rows), choice["features"], choice["C"], spaced,
                                         seed)
    probs = model.probs([r["text"] for r in test_rows], len(labels))
    out = classification_metrics(targets(test_rows), probs.argmax(1), labels, probs)
    out.update(name=f"TF-IDF {choice['features']} + LR", train_examples=len(train_rows),
               features=choice["features"], feature_spec=_feature_spec(choice["features"], spaced), C=choice["C"],
               validation_macro_f1=choice["validation_macro_f1"], grid=choice["grid"], tuned_on=tuned_on,
               validation_examples=len(val_rows), tuned_on_evaluated_rows=_rows_hash(val_rows) == _rows_hash(test_rows),
               cache_hit=cache_hit)
    if predictions:
        out["predictions"] = probs.argmax(1).tolist()
    return out


def _is_spaced(texts: list[str]) -> bool:
    chars = sum(len(t) for t in texts)
    return chars == 0 or sum(t.count(" ") for t in texts) / chars >= SPACED_TEXT


def _vectorizer(kind: str, spaced: bool):
    if kind == "word":
        return TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    if spaced:
        return TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True)
    return TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True)


def _feature_spec(features: str, spaced: bool) -> str:
    parts = {"word": "word 1-2-grams", "char": "char_wb 2-4-grams" if spaced else "char 1-3-grams"}
    return " + ".join(parts[k] for k in features.split("+"))


def _fit_clf(x, y: np.ndarray, C: float, seed: int):
    """One logistic regression; class-balanced because the report ranks by macro-F1. saga on these
    L2-normalised rows converges in a few dozen epochs, far faster than lbfgs at this tolerance."""
    return LogisticRegression(C=C, solver="saga", tol=1e-3, max_iter=1000, class_weight="balanced",
                              random_state=seed).fit(x, y)


def _fit(rows: list[dict], y: np.ndarray, features: str, C: float, spaced: bool, seed: int) -> _TfidfModel:
    texts = [r["text"] for r in rows]
    vecs = [_vectorizer(kind, spaced) for kind in features.split("+")]
    x = hstack([v.fit_transform(texts) for v in vecs]).tocsr()
    return _TfidfModel(vecs, _fit_clf(x, y, C, seed))


def _grid_search(fit_rows, y_fit, val_rows, y_val, spaced: bool, seed: int) -> tuple[list[dict], dict]:
    """Every (features, C) of the grid fit on `fit_rows` and scored on `val_rows` -> (grid, best), where best
    holds the first highest-scoring config and its fitted `model`. Each vectorizer is fit once: a model
    here is the very model `_fit` would build for the same config."""
    fit_texts, val_texts = [r["text"] for r in fit_rows], [r["text"] for r in val_rows]
    vecs = {kind: _vectorizer(kind, spaced) for kind in ("word", "char")}
    x_fit = {kind: v.fit_transform(fit_texts) for kind, v in vecs.items()}
    x_val = {kind: v.transform(val_texts) for kind, v in vecs.items()}
    grid, best = [], None
    for features in FEATURE_SETS:
        kinds = features.split("+")
        xf = hstack([x_fit[k] for k in kinds]).tocsr()
        xv = hstack([x_val[k] for k in kinds]).tocsr()
        for C in C_GRID:
            clf = _fit_clf(xf, y_fit, C, seed)
            score = float(f1_score(y_val, clf.predict(xv), average="macro", labels=np.unique(np.concatenate(
                [y_fit, y_val])), zero_division=0))
            grid.append({"features": features, "C": C, "validation_macro_f1": round(score, 6)})
            if best is None or score > best["validation_macro_f1"]:
                best = {"features": features, "C": C, "validation_macro_f1": score,
                        "model": _TfidfModel([vecs[k] for k in kinds], clf)}
    best["validation_macro_f1"] = round(best["validation_macro_f1"], 6)
    return grid, best


def _rows_hash(rows: list[dict]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r["text"], r["label"]], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def _cache_key(train_rows: list[dict], validation_rows: list[dict], labels: list[str], seed: int) -> str:
    """What the choice depends on: the rows it is fit and tuned on, the label order, the seed, the recipe."""
    parts = [TFIDF_VERSION, _rows_hash(train_rows), _rows_hash(validation_rows), labels, seed,
             list(FEATURE_SETS), list(C_GRID), HOLDOUT_SHARE, SPACED_TEXT]
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()[:20]


def _valid_choice(choice: dict) -> bool:
    return choice.get("version") == TFIDF_VERSION and choice.get("features") in FEATURE_SETS and \
        isinstance(choice.get("C"), (int, float)) and isinstance(choice.get("grid"), list)


def _read_entry(path: Path, valid) -> dict | None:
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return entry if isinstance(entry, dict) and valid(entry) else None


def _read_choice(folder: Path) -> dict | None:
    """A cached TF-IDF choice, or None when it is missing, damaged or made by another TFIDF_VERSION."""
    return _read_entry(folder / "choice.json", _valid_choice)


def _cached_json(name: str, file: str, compute, valid=lambda entry: True) -> tuple[dict, bool]:
    """(the JSON `file` of the baselines cache entry `name`, whether it came from the cache): `compute()` runs only
    when no entry that `valid` accepts exists; the entry is written into a fresh folder swapped in whole
    (`assets.cached`), so readers never see half of it."""
    built: list[dict] = []

    def build(tmp: Path) -> None:
        built.append(compute())
        (tmp / file).write_text(json.dumps(built[0], indent=2), encoding="utf-8")

    folder = cached(cache_dir() / "baselines" / name, build, lambda d: _read_entry(d / file, valid) is not None)
    return (built[0], False) if built else (_read_entry(folder / file, valid), True)


def _label_token_ids(tokenizer, label: str) -> set[int]:
    """First-token ids of the label's likely spellings as an answer ("positive", "Positive", " positive")."""
    ids = set()
    for variant in {label, label.lower(), label.capitalize(), " " + label, " " + label.capitalize()}:
        toks = tokenizer(variant, add_special_tokens=False)["input_ids"]
        if toks:
            ids.add(toks[0])
    return ids


def _sample(test_rows: list[dict], samples: int | None, seed: int) -> tuple[list[dict], np.ndarray | None]:
    """The rows a prompted baseline scores: a seeded sample of `samples` rows (their positions), or all (None)."""
    if samples is None or samples >= len(test_rows):
        return test_rows, None
    pick = np.sort(np.random.default_rng(seed).choice(len(test_rows), size=samples, replace=False))
    return [test_rows[i] for i in pick], pick


def _prompted_result(name: str, scores: np.ndarray, rows: list[dict], pick, test_rows: list[dict],
                     labels: list[str], predictions: bool, **info) -> dict:
    """`classification_metrics` of label scores (log-probabilities) on `rows`, with the sample's size."""
    probs = np.exp(scores - scores.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    label2id = {label: i for i, label in enumerate(labels)}
    y = np.array([label2id[r["label"]] for r in rows])
    out = classification_metrics(y, scores.argmax(1), labels, probs)
    out.update(name=name, sample_size=len(rows), population=len(test_rows), **info)
    if predictions:
        out.update(predictions=scores.argmax(1).tolist(), scored_rows=None if pick is None else pick.tolist())
    return out


@torch.no_grad()
def _label_scores(model_ref: str, conversations: list[list[dict]], labels: list[str], batch_size: int) -> np.ndarray:
    """Per conversation, each label's log-probability as the first token of the assistant's answer (the first
    tokens of its likely spellings, pooled; a first token two labels share is not used)."""
    from transformers import AutoModelForCausalLM  # ~1 s over torch; only the prompted baselines load a decoder

    base = resolve_base(model_ref)
    tok = load_tokenizer(base)
    model = load_pretrained(AutoModelForCausalLM, base, dtype=torch.float32).eval()
    label_ids = [_label_token_ids(tok, label) for label in labels]
    counts = Counter(t for ids in label_ids for t in ids)
    label_ids = [sorted(t for t in ids if counts[t] == 1) or sorted(ids) for ids in label_ids]
    prompts = [_render(tok, c) for c in conversations]
    scores = np.zeros((len(prompts), len(labels)))
    order = np.argsort([len(p) for p in prompts])
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        hidden = model.base_model(**enc).last_hidden_state
        last = enc["attention_mask"].sum(1) - 1  # right padding: the last real token
        # Project only the last position onto the vocabulary (the other positions are not needed).
        logits = model.get_output_embeddings()(hidden[torch.arange(len(idx)), last])
        logp = torch.log_softmax(logits.float(), dim=-1)
        for j, ids in enumerate(label_ids):
            scores[idx, j] = torch.logsumexp(logp[:, ids], dim=-1).numpy()
    return scores


def zero_shot(model_ref: str, test_rows: list[dict], labels: list[str], samples: int | None = 300,
              seed: int = 0, batch_size: int = 16, predictions: bool = False) -> dict:
    """Zero-shot classification by next-token label scores; `samples` caps the rows (seeded sample). With
    `predictions`: each scored row's label id under `predictions`, and under `scored_rows` the positions in
    `test_rows` of the rows scored (None: all of them, in order)."""
    rows, pick = _sample(test_rows, samples, seed)
    scores = _label_scores(model_ref, [[_ask(r["text"], labels)] for r in rows], labels, batch_size)
    return _prompted_result(f"zero-shot {model_ref.removeprefix('builtin:')}", scores, rows, pick, test_rows, labels,
                            predictions, prompt=ZERO_SHOT_PROMPT)


def few_shot(model_ref: str, train_rows: list[dict], test_rows: list[dict], labels: list[str], k: int = 4,
             selection: str = "similar", samples: int | None = 300, seed: int = 0, pool: int = 2000,
             embedder: str = "builtin:minilm-l6", batch_size: int = 8, predictions: bool = False,
             cache: bool = True) -> dict:
    """k-shot in-context classification: before each scored row, `k` train rows asked and answered in the same
    words as the zero-shot prompt (as earlier chat turns), then the row's label scored as zero-shot does.

    The examples come from a seeded, label-stratified `pool` of train rows: `similar` takes the `k` most similar by
    `embedder`'s sentence embeddings (cosine; the most similar last, nearest the question), `random` a seeded draw
    per row that covers as many labels as `k` allows. The scored rows are the zero-shot baseline's sample (the same
    `samples` and `seed`), so the two compare on the same rows. `cache`: the result is kept under the tunelab cache
    dir, keyed by the pool, the scored rows, the labels and every setting, so a report on the same data is fast."""
    rows, pick = _sample(test_rows, samples, seed)
    examples = sample_rows(train_rows, pool, "label", seed)[0] if pool < len(train_rows) else train_rows
    settings = [FEW_SHOT_VERSION, model_ref, embedder if selection == "similar" else None, k, selection, seed,
                batch_size, labels]
    key = hashlib.sha256(json.dumps([settings, _rows_hash(examples), _rows_hash(rows)],
                                    ensure_ascii=False).encode()).hexdigest()[:20]

    def compute() -> dict:
        shots = _similar_shots(embedder, examples, rows, k) if selection == "similar" else \
            _random_shots(examples, len(rows), k, seed)
        conversations = []
        for r, chosen in zip(rows, shots):
            turns = []
            for i in chosen:  # a long example is cut: k of them must fit the decoder's context with the row
                turns += [_ask(examples[i]["text"][:SHOT_CHARS], labels),
                          {"role": "assistant", "content": examples[i]["label"]}]
            conversations.append(turns + [_ask(r["text"], labels)])
        scores = _label_scores(model_ref, conversations, labels, batch_size)
        return _prompted_result(f"{k}-shot {model_ref.removeprefix('builtin:')} ({selection})", scores,
                                rows, pick, test_rows, labels, True, prompt=ZERO_SHOT_PROMPT, k=k,
                                selection=selection, pool=len(examples), train_examples=len(examples))

    if not cache:
        out = compute()
    else:
        out, hit = _cached_json(f"fewshot-{key}", "result.json", compute)
        # where the rows sit in this split is this call's own (the entry is keyed by the rows, not their places)
        out.update(cache_hit=hit, population=len(test_rows), scored_rows=None if pick is None else pick.tolist())
    if not predictions:
        out.pop("predictions", None)
        out.pop("scored_rows", None)
    return out


def _random_shots(examples: list[dict], n: int, k: int, seed: int) -> list[list[int]]:
    """Per scored row, `k` example positions: one per label first (labels in random order) while k allows, then
    at random from the rest; in random order."""
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for i, r in enumerate(examples):
        by_label.setdefault(r["label"], []).append(i)
    out = []
    for _ in range(n):
        chosen = [int(rng.choice(by_label[label])) for label in rng.permutation(sorted(by_label))[:k]]
        rest = np.setdiff1d(np.arange(len(examples)), chosen)
        chosen += rng.choice(rest, size=min(k - len(chosen), len(rest)), replace=False).tolist()
        out.append([chosen[j] for j in rng.permutation(len(chosen))])
    return out


@torch.no_grad()
def _similar_shots(embedder: str, examples: list[dict], rows: list[dict], k: int) -> list[list[int]]:
    """Per scored row, the `k` examples nearest by cosine similarity of sentence embeddings, nearest last."""
    from transformers import AutoModel  # as above: only this baseline loads an encoder

    base = resolve_base(embedder)
    tok = load_tokenizer(base)
    model = load_pretrained(AutoModel, base, dtype=torch.float32).eval()

    def embed(texts: list[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), 64):
            enc = tok(texts[start:start + 64], return_tensors="pt", padding=True, truncation=True, max_length=256)
            out.append(sentence_embeddings(model(**enc).last_hidden_state.float(), enc["attention_mask"]))
        return torch.cat(out)

    sims = embed([r["text"] for r in rows]) @ embed([r["text"] for r in examples]).T
    top = sims.topk(min(k, len(examples)), dim=1).indices  # most similar first
    return [list(reversed(t)) for t in top.tolist()]


def _ask(text: str, labels: list[str]) -> dict:
    return {"role": "user", "content": ZERO_SHOT_PROMPT.format(labels=", ".join(labels), text=text)}


def _render(tokenizer, conversation: list[dict]) -> str:
    """A conversation ending in a user turn -> the prompt text up to where the assistant's answer starts."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    turns = [m["content"] + ("\nAnswer:" if m["role"] == "user" else "\n\n") for m in conversation]
    return "".join(t if m["role"] == "user" else " " + t for m, t in zip(conversation, turns))
