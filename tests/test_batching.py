import torch

from tunelab.tasks.batch import pad_batch
from tunelab.train.batching import length_grouped_batches


def _padding(batches, lengths):
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_every_index_once_and_seeded():
    lengths = [(i * 37) % 61 + 1 for i in range(1000)]
    a = length_grouped_batches(lengths, 32, seed=1)
    b = length_grouped_batches(lengths, 32, seed=1)
    c = length_grouped_batches(lengths, 32, seed=2)
    assert a == b and a != c
    flat = sorted(i for batch in a for i in batch)
    assert flat == list(range(1000))
    assert all(len(batch) <= 32 for batch in a)


def test_grouping_cuts_padding():
    lengths = [(i * 37) % 61 + 1 for i in range(2000)]
    grouped = length_grouped_batches(lengths, 32, seed=0)
    plain = length_grouped_batches(lengths, 32, seed=0, group_by_length=False)
    assert _padding(grouped, lengths) < 0.2 * _padding(plain, lengths)


def test_pad_batch():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == torch.long
