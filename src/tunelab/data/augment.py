"""Training-set augmentation (opt-in): EDA-style edits and paraphrasing, with a label-preservation filter.

Operations (each yields one new text from an original):
- `swap`: swap two random words, `round(p * n)` times (at least once);
- `delete`: drop each word with probability p (never all);
- `synonym`: replace up to `round(p * n)` words by a neighbour in the input-embedding space of a built-in
  encoder (whole-word WordPiece tokens, cosine top-5) — "synonym-like", not a thesaurus;
- `paraphrase`: an instruction-tuned decoder rewrites the text (greedy, chat template).
The filter keeps a new text only if a TF-IDF + logistic-regression classifier trained on the original
rows gives it the original's label. Originals are always kept; new rows are marked `augmented: OP`.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from functools import lru_cache

import numpy as np

# torch, transformers, safetensors and tunelab.models (which loads torch, ~1.2 s) are imported inside the synonym
# finder and the paraphraser, sklearn (~1.3 s) inside the label filter: each operation loads only what it uses.

_WORD = re.compile(r"^[A-Za-z]{3,}$")
PARAPHRASE_PROMPT = ("Rewrite the following text in different words, keeping its meaning and tone. "
                     "Reply with the rewritten text only.\n\nText: {text}")


def swap_words(words: list[str], p: float, rng: random.Random) -> list[str]:
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(max(1, round(p * len(out)))):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def delete_words(words: list[str], p: float, rng: random.Random) -> list[str]:
    if len(words) < 2:
        return list(words)
    kept = [w for w in words if rng.random() >= p]
    if len(kept) == len(words):
        del kept[rng.randrange(len(kept))]
    return kept or [rng.choice(words)]


class EmbeddingNeighbours:
    """Nearest whole-word tokens in an encoder's input-embedding matrix (cosine)."""

    def __init__(self, model_ref: str = "builtin:minilm-l6", k: int = 5):
        from safetensors import safe_open

        from tunelab.models import load_tokenizer, resolve_base

        base = resolve_base(model_ref)
        tok = load_tokenizer(base)
        with safe_open(str(base.path / "model.safetensors"), "pt") as f:
            name = next(n for n in f.keys() if n.endswith("word_embeddings.weight"))
            emb = f.get_tensor(name).float().numpy()
        vocab = tok.get_vocab()
        words = sorted((w, i) for w, i in vocab.items() if _WORD.match(w) and i < len(emb))
        self.words = [w for w, _ in words]
        self.index = {w: n for n, w in enumerate(self.words)}
        m = emb[[i for _, i in words]]
        self.matrix = m / np.linalg.norm(m, axis=1, keepdims=True).clip(1e-8)
        self.k = k
        self._cache: dict[str, list[str]] = {}

    def of(self, word: str) -> list[str]:
        key = word.lower()
        if key not in self._cache:
            n = self.index.get(key)
            if n is None:
                self._cache[key] = []
            else:
                sims = self.matrix @ self.matrix[n]
                top = np.argsort(-sims)[: self.k + 1]
                self._cache[key] = [self.words[t] for t in top if self.words[t] != key][: self.k]
        return self._cache[key]


def synonym_words(words: list[str], p: float, rng: random.Random, nb: EmbeddingNeighbours) -> list[str]:
    out = list(words)
    slots = [i for i, w in enumerate(out) if _WORD.match(w) and nb.of(w)]
    rng.shuffle(slots)
    for i in slots[: max(1, round(p * len(out)))]:
        choice = rng.choice(nb.of(out[i]))
        out[i] = choice.capitalize() if out[i][0].isupper() else choice
    return out


class Paraphraser:
    def __init__(self, model_ref: str = "builtin:smollm2-135m-instruct", batch_size: int = 16):
        import torch
        from transformers import AutoModelForCausalLM

        from tunelab.models import load_pretrained, load_tokenizer, resolve_base

        base = resolve_base(model_ref)
        self.tok = load_tokenizer(base)
        self.tok.padding_side = "left"  # generation continues every row from its last real token
        self.model = load_pretrained(AutoModelForCausalLM, base, dtype=torch.float32).eval()
        self.batch_size = batch_size

    def __call__(self, texts: list[str]) -> list[str]:
        import torch

        out = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start:start + self.batch_size]
            prompts = [self.tok.apply_chat_template([{"role": "user", "content": PARAPHRASE_PROMPT.format(text=t)}],
                                                    tokenize=False, add_generation_prompt=True) for t in chunk]
            enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            longest = max(len(self.tok(t, add_special_tokens=False)["input_ids"]) for t in chunk)
            with torch.no_grad():
                gen = self.model.generate(**enc, max_new_tokens=int(longest * 1.5) + 8, do_sample=False,
                                          pad_token_id=self.tok.pad_token_id)
            for row in gen[:, enc["input_ids"].shape[1]:]:
                out.append(self.tok.decode(row, skip_special_tokens=True).strip().strip('"'))
        return out


def label_filter(originals: list[dict], folds: int = 5, seed: int = 0):
    """-> keep(texts, labels, sources) -> bool mask: a TF-IDF + LR classifier agrees with the label.

    Cross-fitted: a new text made from original `sources[i]` is judged by a classifier that never saw
    that original (fit on the other folds), so the filter cannot pass a text just because it
    remembers its source. Too few rows for folds -> one classifier fit on all originals."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    texts = [r["text"] for r in originals]
    labels = np.asarray([r["label"] for r in originals])
    fold_of = np.random.default_rng(seed).permutation(len(originals)) % folds
    if len(originals) < 10 * folds:
        fold_of[:] = -1  # every original judged by the classifier fit on all of them

    def fit(mask: np.ndarray):
        vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
        x = vec.fit_transform([t for t, m in zip(texts, mask) if m])
        return vec, LogisticRegression(max_iter=2000, C=4.0).fit(x, labels[mask])

    models = {f: fit(fold_of != f) for f in np.unique(fold_of)}

    def keep(new_texts: list[str], new_labels: list[str], sources: list[int]) -> np.ndarray:
        out = np.zeros(len(new_texts), bool)
        src_fold = fold_of[np.asarray(sources, int)]
        for f, (vec, clf) in models.items():
            idx = np.flatnonzero(src_fold == f)
            if len(idx):
                pred = clf.predict(vec.transform([new_texts[i] for i in idx]))
                out[idx] = pred == np.asarray(new_labels)[idx]
        return out

    return keep


@lru_cache(maxsize=2)
def _neighbours(model_ref: str) -> EmbeddingNeighbours:
    return EmbeddingNeighbours(model_ref)


def augment(rows: list[dict], cfg, seed: int = 0) -> tuple[list[dict], dict]:
    """rows {"text", "label"} -> (new rows only, report). `cfg` is an `AugmentConfig`."""
    rng = random.Random(seed)
    pick = list(range(len(rows)))
    if cfg.max_examples is not None and cfg.max_examples < len(rows):
        pick = rng.sample(pick, cfg.max_examples)
    candidates: list[dict] = []
    for op in cfg.ops:
        if op == "paraphrase":
            texts = Paraphraser(cfg.paraphrase_model)([rows[i]["text"] for i in pick])
            candidates += [{"text": t, "label": rows[i]["label"], "augmented": op, "_src": i}
                           for t, i in zip(texts, pick)]
            continue
        nb = _neighbours(cfg.synonym_model) if op == "synonym" else None
        for i in pick:
            words = rows[i]["text"].split()
            for _ in range(cfg.per_example):
                if op == "swap":
                    new = swap_words(words, cfg.p, rng)
                elif op == "delete":
                    new = delete_words(words, cfg.p, rng)
                else:
                    new = synonym_words(words, cfg.p, rng, nb)
                candidates.append({"text": " ".join(new), "label": rows[i]["label"], "augmented": op, "_src": i})
    originals = {r["text"] for r in rows}
    seen: set[str] = set()
    fresh = []
    for c in candidates:  # drop empty texts, copies of an original and repeats
        if c["text"] and c["text"] not in originals and c["text"] not in seen:
            seen.add(c["text"])
            fresh.append(c)
    keep = np.ones(len(fresh), bool)
    if cfg.filter == "classifier" and fresh and len({r["label"] for r in rows}) > 1:
        judge = label_filter(rows, seed=seed)
        keep = judge([c["text"] for c in fresh], [c["label"] for c in fresh], [c["_src"] for c in fresh])
    kept = [{k: v for k, v in c.items() if k != "_src"} for c, k in zip(fresh, keep) if k]
    report = {"originals": len(pick), "generated": dict(Counter(c["augmented"] for c in candidates)),
              "duplicates_or_empty": len(candidates) - len(fresh),
              "rejected_by_label_filter": int((~keep).sum()) if len(fresh) else 0,
              "added": dict(Counter(c["augmented"] for c in kept)), "filter": cfg.filter}
    return kept, report
