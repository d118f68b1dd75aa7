"""Causal LM and SFT tasks: packing, boundaries, loss masking, chunked loss (tiny-llama)."""

import pytest
import torch

from tunelab.models import load_causal_lm
from tunelab.tasks.causal_lm import (IGNORE, CausalLMTask, full_logits_loss_sum, one_per_row, pack_bins,
                                     pack_stream, shift_targets)
from tunelab.tasks.sft import SFTTask, encode_conversation

DOCS = ["the crew was friendly and the flight left on time", "my bag is lost",
        "a long document " * 12, "ok", "delays again at the gate in boston today"]


@pytest.fixture(scope="module")
def tiny_lm():
    model, tok, _, _ = load_causal_lm("tiny-llama")
    return model.eval(), tok


def _segments(n_docs=5):
    return [(list(range(i * 100, i * 100 + n)), shift_targets(list(range(i * 100, i * 100 + n))))
            for i, n in enumerate([7, 3, 12, 1, 5][:n_docs])]


def test_pack_stream_fills_blocks_and_resets_positions():
    enc = pack_stream(_segments(), block=8)
    assert enc.lengths == [8, 8, 8, 4]
    flat = [t for row in enc.input_ids for t in row]
    assert flat == [t for ids, _ in _segments() for t in ids]  # nothing lost, order kept
    assert enc.positions[0] == [0, 1, 2, 3, 4, 5, 6, 0]  # doc 2 starts at position 0
    # a segment's last target before a row boundary is dropped (3 docs are split); document ends predict nothing
    assert enc.targets[0][6] == IGNORE and enc.targets[0][7] == IGNORE
    assert sum(t != IGNORE for row in enc.targets for t in row) == sum(n - 1 for n in [7, 3, 12, 1, 5]) - 3


def test_pack_bins_keeps_examples_whole():
    enc = pack_bins(_segments(), block=12)
    assert max(enc.lengths) <= 12 and sum(enc.lengths) == 7 + 3 + 12 + 1 + 5
    for row, pos in zip(enc.input_ids, enc.positions):
        starts = [i for i, p in enumerate(pos) if p == 0]
        pieces = [row[a:b] for a, b in zip(starts, starts[1:] + [len(row)])]
        assert all(p == list(range(p[0], p[0] + len(p))) for p in pieces)  # each piece one whole doc


def test_packed_loss_equals_unpacked_loss(tiny_lm):
    """Block-diagonal attention from position resets: packing changes no loss term."""
    model, tok = tiny_lm
    task = CausalLMTask(tok, block=64)
    segs = task.segments([{"text": d} for d in DOCS])
    packed, single = pack_bins(segs, 64), one_per_row(segs, 64)
    assert len(packed) < len(single)
    with torch.no_grad():
        a = task.loss_sum(model, task.collate(packed, list(range(len(packed)))))
        task.packing = False
        b = task.loss_sum(model, task.collate(single, list(range(len(single)))))
    assert task.units(packed, range(len(packed))) == task.units(single, range(len(single)))
    assert torch.allclose(a, b, rtol=1e-4), (a, b)


def test_chunked_loss_equals_full_logits_loss(tiny_lm):
    model, tok = tiny_lm
    task = CausalLMTask(tok, block=32, packing=False)
    enc = task.encode([{"text": d} for d in DOCS])
    batch = task.collate(enc, list(range(len(enc))))
    with torch.no_grad():
        assert torch.allclose(task.loss_sum(model, batch), full_logits_loss_sum(model, batch), rtol=1e-5)
    # and the gradients agree (the chunks run under activation checkpointing)
    grads = []
    for fn in (task.loss_sum, full_logits_loss_sum):
        model.zero_grad()
        fn(model, batch).backward()
        grads.append(model.model.layers[0].mlp.up_proj.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


CONV = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "what time is it"}, {"role": "assistant", "content": "Time to fly."}]


def test_sft_targets_are_the_assistant_turns_only(tiny_lm):
    _, tok = tiny_lm
    ids, labels = encode_conversation(tok, CONV)
    learned = tok.decode([t for t in labels if t != IGNORE])
    assert "Hi! How can I help?" in learned and "Time to fly." in learned
    assert "hello" not in learned and "what time" not in learned and "user" not in learned
    assert learned.count("<|im_end|>") == 2  # the model learns to end its turns


def test_sft_changing_a_user_turn_changes_no_loss_term(tiny_lm):
    _, tok = tiny_lm
    other = [dict(m) for m in CONV]
    other[2]["content"] = "what day is it"  # same token count, different tokens
    ids_a, lab_a = encode_conversation(tok, CONV)
    ids_b, lab_b = encode_conversation(tok, other)
    assert len(ids_a) == len(ids_b) and ids_a != ids_b
    assert lab_a == lab_b  # the same targets at the same positions
    changed = [i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y]
    assert all(lab_a[i] == IGNORE for i in changed)


def test_sft_packing_matches_unpacked(tiny_lm):
    model, tok = tiny_lm
    rows = [{"messages": CONV}, {"messages": CONV[:2]}, {"messages": CONV[2:]}]
    task = SFTTask(tok, block=512)
    packed = task.encode(rows)
    task_u = SFTTask(tok, block=512, packing=False)
    single = task_u.encode(rows)
    assert len(packed) == 1 and len(single) == 3
    with torch.no_grad():
        a = task.loss_sum(model, task.collate(packed, [0]))
        b = task_u.loss_sum(model, task_u.collate(single, [0, 1, 2]))
    assert torch.allclose(a, b, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients():
    model, tok, _, _ = load_causal_lm("tiny-llama")
    task = CausalLMTask(tok, block=64)
    enc = task.encode([{"text": d} for d in DOCS])
    batch = task.collate(enc, list(range(len(enc))))
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model.zero_grad()
        task.loss_sum(model, batch).backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    assert model.is_gradient_checkpointing
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-8)
