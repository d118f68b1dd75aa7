"""Batch formation: length-grouped shuffled batches (padding is `tunelab.tasks.batch.pad_batch`)."""

from __future__ import annotations

import numpy as np


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, group_by_length: bool = True,
                           mega: int = 50) -> list[list[int]]:
    """Shuffle, cut into mega-batches of `mega * batch_size`, sort each by length, cut into batches,
    and shuffle the batch order. Similar lengths share a batch (little padding) while the order stays
    random. The result depends only on (lengths, batch_size, seed, group_by_length).
    """
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(lengths))
    if not group_by_length:
        return [perm[i:i + batch_size].tolist() for i in range(0, len(perm), batch_size)]
    lens = np.asarray(lengths)
    batches = []
    step = mega * batch_size
    for start in range(0, len(perm), step):
        chunk = perm[start:start + step]
        chunk = chunk[np.argsort(-lens[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size].tolist() for i in range(0, len(chunk), batch_size)]
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]
