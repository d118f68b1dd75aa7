"""Drift of a classifier's traffic against the data it was trained on.

A model dir carries a reference profile (`drift_profile.npz`): per-text features of up to `PROFILE_ROWS` held-out
rows (the validation split: on rows it was trained on, a model is over-confident, and every live window would look
drifted). A window of live texts gets the same features, and each statistic is a two-sample test of the window
against the profile:

- embedding_mmd: the maximum mean discrepancy between the texts' mean-pooled last hidden states (unit vectors,
  Gaussian kernel with the profile's median-distance bandwidth), p-value from a permutation test (below its
  resolution, 1/(permutations+1), the normal tail of the permutation distribution extends it);
- confidence_ks: Kolmogorov-Smirnov on the top-label probability;
- label_chi2: chi-squared on the predicted-label counts (window against profile);
- length_ks: Kolmogorov-Smirnov on the length in characters;
- unk_rate: a two-proportion z-test on the share of texts holding an unknown token (never, for byte-level
  tokenizers);
- fragmentation_ks: Kolmogorov-Smirnov on tokenizer pieces per word (typos, other scripts and code-switching cut
  words into more pieces; texts cut at the model's max_length are left out).

A window drifts when its smallest p-value is under alpha / (statistics tested) (Bonferroni).
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
from scipy import stats

from tunelab.errors import UserError

PROFILE_FILE = "drift_profile.npz"
PROFILE_ROWS = 1000
STATISTICS = ("embedding_mmd", "confidence_ks", "label_chi2", "length_ks", "unk_rate", "fragmentation_ks")
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
WORD = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")  # a CJK character is a word; elsewhere a run of word characters


@dataclass
class Features:
    """Per-text features of n texts (arrays of length n; `embedding` [n, d] unit vectors, None without hidden
    states, e.g. an ONNX export)."""

    confidence: np.ndarray
    label: np.ndarray
    length: np.ndarray
    unk: np.ndarray
    fragmentation: np.ndarray
    embedding: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.label)

    def take(self, idx) -> "Features":
        """The features of the texts at `idx`."""
        return Features(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[idx]
                           for f in fields(self)})

    @staticmethod
    def concat(parts: list["Features"]) -> "Features":
        def join(name: str):
            arrays = [getattr(p, name) for p in parts]
            return None if any(a is None for a in arrays) else np.concatenate(arrays)
        return Features(**{f.name: join(f.name) for f in fields(Features)})


def text_features(tokenizer, texts: list[str], ids: list[list[int]], max_length: int) -> dict[str, np.ndarray]:
    """length, unk and fragmentation of `texts` from their token ids (as the model saw them, special tokens
    included)."""
    special = set(tokenizer.all_special_ids)
    unk_id = tokenizer.unk_token_id
    length = np.array([len(t) for t in texts], dtype=np.float32)
    unk = np.array([unk_id is not None and unk_id in x for x in ids], dtype=np.float32)
    frag = np.full(len(texts), np.nan, dtype=np.float32)
    for i, (t, x) in enumerate(zip(texts, ids)):
        words = len(WORD.findall(t))
        if words and len(x) < max_length:
            frag[i] = sum(1 for j in x if j not in special) / words
    return {"length": length, "unk": unk, "fragmentation": frag}


def classifier_outputs(model, enc, embed: bool):
    """A classification model's forward on a padded batch -> (probabilities [b, labels], unit-length mean-pooled
    last hidden states [b, d] or None), as tensors."""
    import torch  # torch: only where a model runs (the statistics need numpy and scipy alone)

    from tunelab.models import sentence_embeddings  # brings torch and transformers: as above

    if not embed:
        return torch.softmax(model(**enc).logits.float(), -1), None
    out = model(**enc, output_hidden_states=True)
    return (torch.softmax(out.logits.float(), -1),
            sentence_embeddings(out.hidden_states[-1].float(), enc["attention_mask"]))


def model_features(model, tokenizer, texts: list[str], max_length: int, device: str = "cpu",
                   batch_size: int = 32, embed: bool = True) -> Features:
    """Every feature of `texts` through a classification model (batches sorted by length)."""
    import torch  # as above

    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    order = np.argsort([len(x) for x in ids], kind="stable")
    probs, vecs = [None] * len(texts), [None] * len(texts)
    model.eval()
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            part = order[start:start + batch_size].tolist()
            enc = tokenizer.pad({"input_ids": [ids[i] for i in part]}, return_tensors="pt").to(device)
            p, v = classifier_outputs(model, enc, embed)
            for k, i in enumerate(part):
                probs[i] = p[k].cpu().numpy()
                vecs[i] = None if v is None else v[k].cpu().numpy()
    return outputs_features(tokenizer, texts, ids, max_length, np.stack(probs) if texts else np.zeros((0, 2)),
                            np.stack(vecs) if embed and texts else None)


def outputs_features(tokenizer, texts, ids, max_length: int, probs: np.ndarray, embedding) -> Features:
    """Features from a model's outputs on `texts` (probabilities [n, labels], embeddings [n, d] or None)."""
    return Features(confidence=probs.max(-1).astype(np.float32) if len(probs) else np.zeros(0, np.float32),
                    label=probs.argmax(-1).astype(np.int64) if len(probs) else np.zeros(0, np.int64),
                    embedding=None if embedding is None else np.asarray(embedding, dtype=np.float32),
                    **text_features(tokenizer, texts, ids, max_length))


# ---- the profile ----------------------------------------------------------------------------------

@dataclass
class Profile:
    """A model's reference: features of held-out rows, its labels, the MMD bandwidth and where the rows came
    from."""

    features: Features
    labels: list[str]
    bandwidth: float
    source: str = "validation"
    info: dict = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        f = self.features
        arrays = {"confidence": f.confidence, "label": f.label, "length": f.length, "unk": f.unk,
                  "fragmentation": f.fragmentation}
        if f.embedding is not None:
            arrays["embedding"] = f.embedding.astype(np.float16)  # half the bytes; the kernel does not notice
        meta = {"labels": self.labels, "bandwidth": self.bandwidth, "source": self.source, "rows": len(f),
                **self.info}
        buf = io.BytesIO()
        np.savez_compressed(buf, meta=np.array(json.dumps(meta)), **arrays)
        return buf.getvalue()

    def summary(self) -> dict:
        """What `tunelab.json` records of it."""
        f = self.features
        return {"file": PROFILE_FILE, "rows": len(f), "source": self.source, "embedding": f.embedding is not None,
                "label_shares": label_shares(f.label, len(self.labels)),
                "mean_confidence": round(float(f.confidence.mean()), 4) if len(f) else None}


def build_profile(features: Features, labels: list[str], source: str, seed: int = 0, **info) -> Profile:
    """A profile from reference features (sampled down to `PROFILE_ROWS`, seeded)."""
    if len(features) > PROFILE_ROWS:
        idx = np.sort(np.random.default_rng(seed).choice(len(features), PROFILE_ROWS, replace=False))
        features = features.take(idx)
    bw = median_bandwidth(features.embedding) if features.embedding is not None else 1.0
    return Profile(features, list(labels), bw, source, info)


def reference_profile(model, tokenizer, texts: list[str], labels: list[str], max_length: int, device: str,
                      source: str, seed: int = 0) -> Profile:
    """The profile of up to `PROFILE_ROWS` of `texts` (a seeded sample, in their order) through a classification
    model: what training writes from its validation split."""
    if len(texts) > PROFILE_ROWS:
        texts = [texts[i] for i in np.sort(np.random.default_rng(seed).choice(len(texts), PROFILE_ROWS,
                                                                               replace=False))]
    return build_profile(model_features(model, tokenizer, texts, max_length, device), labels, source, seed)


def load_profile(model_dir: str | Path) -> Profile | None:
    """The profile of a model dir (or export dir), None when it has none; a corrupt file is a `UserError`."""
    path = Path(model_dir) / PROFILE_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {k: z[k] for k in z.files if k != "meta"}
        emb = arrays.pop("embedding", None)
        f = Features(embedding=None if emb is None else emb.astype(np.float32), **arrays)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path} is corrupt ({err}); retrain, or delete it to serve without drift checks") from None
    return Profile(f, list(meta["labels"]), float(meta["bandwidth"]), meta.get("source", "?"),
                   {k: v for k, v in meta.items() if k not in ("labels", "bandwidth", "source", "rows")})


def label_shares(label: np.ndarray, n_labels: int) -> list[float]:
    counts = np.bincount(np.asarray(label, dtype=np.int64), minlength=n_labels)[:n_labels]
    return [round(float(c) / max(1, len(label)), 4) for c in counts]


# ---- the statistics -------------------------------------------------------------------------------

def median_bandwidth(x: np.ndarray, max_rows: int = 1000) -> float:
    """The median pairwise Euclidean distance between rows of `x` (the Gaussian kernel's width)."""
    x = np.asarray(x[:max_rows], dtype=np.float64)
    sq = (x * x).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0)
    iu = np.triu_indices(len(x), 1)
    med = float(np.sqrt(np.median(d2[iu]))) if len(iu[0]) else 1.0
    return med if med > 0 else 1.0


def mmd_test(ref: np.ndarray, cur: np.ndarray, bandwidth: float, permutations: int = 200,
             seed: int = 0) -> tuple[float, float]:
    """(MMD², p-value) of `cur` against `ref` with a Gaussian kernel: the biased estimate, its p-value from
    `permutations` random splits of the pooled rows; when none of them reaches the observed value, the normal tail
    of the permutation distribution (the permutation p-value cannot resolve below 1/(permutations+1))."""
    z = np.concatenate([ref, cur]).astype(np.float32)
    n, m = len(ref), len(cur)
    sq = (z * z).sum(1)
    k = np.exp(-np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0) / (2 * bandwidth ** 2))
    rng = np.random.default_rng(seed)
    weights = np.empty((n + m, permutations + 1), dtype=np.float32)
    base = np.concatenate([np.full(n, 1 / n), np.full(m, -1 / m)]).astype(np.float32)
    weights[:, 0] = base
    for j in range(1, permutations + 1):
        weights[:, j] = base[rng.permutation(n + m)]
    values = np.einsum("ij,ij->j", weights, k @ weights)
    observed, null = float(values[0]), values[1:]
    exceed = int((null >= observed).sum())
    p = (1 + exceed) / (1 + permutations)
    if exceed == 0 and null.std() > 0:
        p = min(p, float(stats.norm.sf((observed - null.mean()) / null.std())))
    return observed, p


def _ks(a: np.ndarray, b: np.ndarray) -> tuple[float, float] | None:
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) < 5 or len(b) < 5:
        return None
    r = stats.ks_2samp(a, b)
    return float(r.statistic), float(r.pvalue)


def _chi2(ref: np.ndarray, cur: np.ndarray, n_labels: int) -> tuple[float, float] | None:
    table = np.stack([np.bincount(ref, minlength=n_labels)[:n_labels], np.bincount(cur, minlength=n_labels)[:n_labels]])
    table = table[:, table.sum(0) > 0]
    if table.shape[1] < 2:
        return None
    r = stats.chi2_contingency(table, correction=False)
    return float(r.statistic), float(r.pvalue)


def _proportions(ref: np.ndarray, cur: np.ndarray) -> tuple[float, float] | None:
    """(difference of shares, two-sided p) of two 0/1 samples, pooled z-test; None when neither has a 1."""
    n1, n2, x1, x2 = len(ref), len(cur), float(ref.sum()), float(cur.sum())
    pooled = (x1 + x2) / (n1 + n2)
    if pooled in (0.0, 1.0):
        return None
    se = np.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    diff = x2 / n2 - x1 / n1
    return diff, float(2 * stats.norm.sf(abs(diff) / se))


def compare(profile: Profile, window: Features, alpha: float = 0.01, permutations: int = 200,
            seed: int = 0) -> dict:
    """Every statistic of `window` against `profile` -> {"statistics": {name: {"statistic", "p_value"}}, "tested",
    "p_min", "threshold", "drift", "window": n, and what the window looks like}."""
    ref, n_labels = profile.features, len(profile.labels)
    out: dict[str, tuple[float, float] | None] = {}
    if ref.embedding is not None and window.embedding is not None and len(window) >= 5:
        out["embedding_mmd"] = mmd_test(ref.embedding, window.embedding, profile.bandwidth, permutations, seed)
    out["confidence_ks"] = _ks(ref.confidence, window.confidence)
    out["label_chi2"] = _chi2(ref.label, window.label, n_labels) if len(window) else None
    out["length_ks"] = _ks(ref.length, window.length)
    out["unk_rate"] = _proportions(ref.unk, window.unk) if len(window) else None
    out["fragmentation_ks"] = _ks(ref.fragmentation, window.fragmentation)
    tested = {k: {"statistic": v[0], "p_value": v[1]} for k, v in out.items() if v is not None}
    p_min = min((v["p_value"] for v in tested.values()), default=1.0)
    threshold = alpha / max(1, len(tested))
    return {"window": len(window), "statistics": tested, "tested": len(tested), "p_min": p_min,
            "threshold": threshold, "drift": bool(tested) and p_min < threshold,
            "drifted": sorted(k for k, v in tested.items() if v["p_value"] < threshold),
            "summary": {"reference": describe(ref, n_labels), "window": describe(window, n_labels)}}


def describe(f: Features, n_labels: int) -> dict:
    """A window's shape in a few numbers (the report's table)."""
    if not len(f):
        return {"rows": 0}
    frag = f.fragmentation[np.isfinite(f.fragmentation)]
    return {"rows": len(f), "mean_confidence": round(float(f.confidence.mean()), 4),
            "label_shares": label_shares(f.label, n_labels), "median_length": float(np.median(f.length)),
            "unk_share": round(float(f.unk.mean()), 4),
            "pieces_per_word": round(float(frag.mean()), 4) if len(frag) else None}
