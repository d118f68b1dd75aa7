"""Near-duplicate detection: MinHash signatures + LSH banding, vectorised with NumPy, verified exactly.

Shingles are the word unigrams and word n-grams (default n=2) of the case-folded text, so case and
punctuation changes do not matter and a one-word edit changes few shingles. Each word is hashed by its
content (blake2b, 64 bits), so a document's shingles do not depend on the other documents: batches of
documents can be shingled apart, in worker processes, and agree with the whole corpus shingled at once.
Shingle ids are mixed to 32 bits, and `num_perm` multiply-add hash functions give the MinHash signature.
LSH with `bands` x `rows` proposes candidate pairs; each is kept only if the *exact* Jaccard similarity of the
two shingle sets reaches the threshold, so precision does not rest on the estimate. Connected components of
the kept pairs are the near-duplicate groups.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

_WORD = re.compile(r"\w+")
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_EMPTY = np.uint32(0xFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, uint64 -> well-spread uint32."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return (x >> np.uint64(32)).astype(np.uint32)


def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")


def shingles(texts: list[str], ngram: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """-> (shingle hashes uint32, offsets int64 of length len(texts)+1); doc d owns h[off[d]:off[d+1]].
    A document's shingles depend on its own text only."""
    vocab: dict[str, int] = {}  # word -> its content hash, computed once per call
    ids: list[int] = []
    counts = np.zeros(len(texts), dtype=np.int64)
    for d, t in enumerate(texts):
        words = _WORD.findall(t.casefold())
        for w in words:
            v = vocab.get(w)
            if v is None:
                v = vocab[w] = _word_hash(w)
            ids.append(v)
        counts[d] = len(words)
    word_ids = np.asarray(ids, dtype=np.uint64)
    doc_of_word = np.repeat(np.arange(len(texts)), counts)
    parts, owners = [_mix(word_ids * np.uint64(0x9E3779B1) + np.uint64(1))], [doc_of_word]
    for k in range(1, ngram):  # n-grams: consecutive words of the same document
        same = doc_of_word[k:] == doc_of_word[:-k] if len(doc_of_word) > k else np.zeros(0, bool)
        key = np.full(int(same.sum()), np.uint64(k), dtype=np.uint64)
        for j in range(k + 1):
            key = key * np.uint64(1000003) + word_ids[j:len(word_ids) - k + j][same]
        parts.append(_mix(key))
        owners.append(doc_of_word[:-k][same] if len(doc_of_word) > k else np.zeros(0, np.int64))
    h = np.concatenate(parts)
    owner = np.concatenate(owners)
    order = np.argsort(owner, kind="stable")
    h, owner = h[order], owner[order]
    offsets = np.searchsorted(owner, np.arange(len(texts) + 1))
    return h, offsets


def minhash(h: np.ndarray, offsets: np.ndarray, num_perm: int = 64, seed: int = 1) -> np.ndarray:
    """Signatures [n_docs, num_perm] uint32; documents without shingles get all-0xFFFFFFFF rows."""
    n = len(offsets) - 1
    sig = np.full((n, num_perm), _EMPTY, dtype=np.uint32)
    nonempty = offsets[1:] > offsets[:-1]
    if not nonempty.any():
        return sig
    rng = np.random.default_rng(seed)
    a = (rng.integers(0, 2**32, size=num_perm, dtype=np.uint64) | np.uint64(1)).astype(np.uint32)
    b = rng.integers(0, 2**32, size=num_perm, dtype=np.uint64).astype(np.uint32)
    starts = offsets[:-1][nonempty]
    for k in range(num_perm):
        v = h * a[k]
        v += b[k]
        sig[nonempty, k] = np.minimum.reduceat(v, starts)
    return sig


def lsh_params(threshold: float, num_perm: int, recall_at_threshold: float = 0.98) -> tuple[int, int]:
    """(bands, rows), bands * rows == num_perm: the most rows per band (fewest dissimilar candidates)
    for which a pair exactly at the threshold still becomes a candidate with the given probability,
    P = 1 - (1 - threshold^rows)^bands. Candidates are verified exactly, so extra candidates only
    cost time, while a missed one loses a duplicate."""
    for rows in sorted((r for r in range(1, num_perm + 1) if num_perm % r == 0), reverse=True):
        bands = num_perm // rows
        if 1 - (1 - threshold ** rows) ** bands >= recall_at_threshold:
            return bands, rows
    return num_perm, 1


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """The LSH bucket key of each document in each band -> [n_docs, bands] uint64; a document's keys depend on its
    own signature only."""
    keys = np.zeros((sig.shape[0], bands), dtype=np.uint64)
    for band in range(bands):
        cols = sig[:, band * rows:(band + 1) * rows].astype(np.uint64)
        key = keys[:, band]
        for c in range(rows):
            key = _mix(key * np.uint64(0x100000001B3) + cols[:, c]).astype(np.uint64) | (key << np.uint64(32))
        keys[:, band] = key
    return keys


def band_pairs(key: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Pairs [m, 2] of valid documents sharing a bucket key in one band: each bucket's other members paired with
    its smallest index (star pairs)."""
    idx = np.flatnonzero(valid)
    if not len(idx):
        return np.zeros((0, 2), dtype=np.int64)
    order = idx[np.argsort(key[idx])]
    k = key[order]
    new_run = np.concatenate([[True], k[1:] != k[:-1]])
    first = np.minimum.reduceat(order, np.flatnonzero(new_run))[np.cumsum(new_run) - 1]
    member = order != first
    return np.stack([first[member], order[member]], axis=1)


def pair_codes(pairs: np.ndarray, n: int) -> np.ndarray:
    """Pairs (i < j < n, n < 2**31) as one int64 each, ordered as the pairs are (by i, then j)."""
    return pairs[:, 0].astype(np.int64) * np.int64(n) + pairs[:, 1]


def code_pairs(codes: np.ndarray, n: int) -> np.ndarray:
    return np.stack([codes // np.int64(n), codes % np.int64(n)], axis=1)


def unique_pairs(parts: list[np.ndarray], n: int) -> np.ndarray:
    """Star pairs of every band (i < j < n) -> the distinct pairs, sorted."""
    codes = [pair_codes(p, n) for p in parts]
    return code_pairs(np.unique(np.concatenate(codes)) if codes else np.zeros(0, np.int64), n)


def has_shingles(sig: np.ndarray) -> np.ndarray:
    """Which documents have shingles (an empty one's signature is all 0xFFFFFFFF; LSH leaves it out)."""
    return (sig != _EMPTY).any(axis=1)


def candidate_pairs(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """Pairs [m, 2] (i < j) of documents sharing at least one LSH bucket (star pairs per bucket)."""
    valid = has_shingles(sig)
    keys = band_keys(sig, bands, rows)
    return unique_pairs([band_pairs(keys[:, band], valid) for band in range(bands)], len(sig))


def bbit(sig: np.ndarray) -> np.ndarray:
    """The low 8 bits of each MinHash value (b-bit minwise hashing, Li & König 2010): a quarter of the memory, enough
    to estimate a similarity; two unrelated values agree 1 time in 256, which `estimated_jaccard` corrects for."""
    return sig.astype(np.uint8)


def estimated_jaccard(sig8: np.ndarray, pairs: np.ndarray, chunk: int = 200_000) -> np.ndarray:
    """The Jaccard similarity of each pair estimated from 8-bit signatures (`bbit`): the share of equal slots, less
    the share that agrees by chance."""
    out = np.empty(len(pairs))
    for start in range(0, len(pairs), chunk):
        p = pairs[start:start + chunk]
        out[start:start + chunk] = (sig8[p[:, 0]] == sig8[p[:, 1]]).mean(axis=1)
    return (out - 1 / 256) / (1 - 1 / 256)


def exact_jaccard(h: np.ndarray, offsets: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    sims = np.empty(len(pairs))
    cache: dict[int, set] = {}

    def shingle_set(d: int) -> set:
        s = cache.get(d)
        if s is None:
            s = cache[d] = set(h[offsets[d]:offsets[d + 1]].tolist())
        return s

    for k, (i, j) in enumerate(pairs.tolist()):
        a, b = shingle_set(i), shingle_set(j)
        sims[k] = len(a & b) / len(a | b) if (a or b) else 1.0
    return sims


@dataclass
class NearDupResult:
    group: np.ndarray  # group id per document (the smallest member index); singletons are their own group
    pairs: np.ndarray  # verified pairs [m, 2]
    candidates: int  # LSH candidate pairs before verification


def near_duplicates(texts: list[str], threshold: float = 0.7, ngram: int = 2, num_perm: int = 64,
                    seed: int = 1) -> NearDupResult:
    """Group documents whose shingle sets have Jaccard similarity >= threshold (transitively)."""
    h, offsets = shingles(texts, ngram)
    sig = minhash(h, offsets, num_perm, seed)
    cand = candidate_pairs(sig, *lsh_params(threshold, num_perm))
    plausible = cand[plausible_mask(bbit(sig), cand, threshold, num_perm)]
    sims = exact_jaccard(h, offsets, plausible) if len(plausible) else np.zeros(0)
    kept = plausible[sims >= threshold]
    return NearDupResult(group=groups_of(len(texts), kept), pairs=kept, candidates=len(cand))


def plausible_mask(sig8: np.ndarray, pairs: np.ndarray, threshold: float, num_perm: int) -> np.ndarray:
    """The candidate pairs worth an exact check. The estimate from 8-bit signatures (std <= 0.51/sqrt(num_perm))
    rules out pairs far below the threshold cheaply; the exact Jaccard decides the rest."""
    return estimated_jaccard(sig8, pairs) >= threshold - max(0.15, 2.5 / np.sqrt(num_perm))


def groups_of(n: int, pairs: np.ndarray) -> np.ndarray:
    """The connected components of `n` documents joined by `pairs`, each named by its smallest member."""
    # scipy: ~0.3 s to import, paid only when near-duplicate groups are computed
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    first = np.full(comp.max() + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(first, comp, np.arange(n))
    return first[comp]
