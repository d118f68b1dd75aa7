"""Token log-probabilities on the wire: each token's text and exact bytes (byte-level BPE splits Chinese
characters), character offsets, the alternatives' shape, and the floor for -inf."""

from __future__ import annotations

import pytest

from tunelab.serve.engine import TokenLogprob
from tunelab.serve.logprobs import LOGPROB_FLOOR, TokenTexts, chat_logprobs, text_logprobs

TEXT = "The café 今天天气很好 — naïve 🙂 words"


@pytest.fixture(scope="module")
def tok():
    from tunelab.models import load_tokenizer

    return load_tokenizer("builtin:smollm2-135m-instruct")


def test_token_bytes_rebuild_the_text_and_offsets_point_into_it(tok):
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    texts = TokenTexts(tok)
    raw = b"".join(bytes(texts(t)[1]) for t in ids)
    assert raw.decode() == TEXT == tok.decode(ids)
    partial = [texts(t)[0] for t in ids if texts(t)[0].startswith("bytes:")]
    assert partial, "the check is vacuous: no token holds part of a character"
    assert all(p.startswith("bytes:\\x") for p in partial)
    out = text_logprobs([None] + [TokenLogprob(t, -1.0) for t in ids[1:]], ids, texts)
    assert out.text_offset == sorted(out.text_offset) and out.text_offset[0] == 0
    for i, (token, at) in enumerate(zip(ids, out.text_offset)):
        text, _ = texts(token)
        if not text.startswith("bytes:"):  # a whole-character token sits at its offset
            assert TEXT[at:at + len(text)] == text
        before = tok.decode(ids[:i])
        if "\ufffd" not in before:  # the tokens before end on a character boundary: the offset is their length
            assert at == len(before)


def test_text_logprobs_shape_and_floor(tok):
    ids = tok(" hello world", add_special_tokens=False)["input_ids"]
    entries = [None, TokenLogprob(ids[1], float("-inf"), ((ids[0], -0.5), (ids[1], float("-inf"))))]
    out = text_logprobs(entries, ids, TokenTexts(tok))
    assert out.token_logprobs == [None, LOGPROB_FLOOR]
    assert out.top_logprobs[0] is None
    assert out.top_logprobs[1] == {TokenTexts(tok)(ids[0])[0]: -0.5, TokenTexts(tok)(ids[1])[0]: LOGPROB_FLOOR}
    assert '"token_logprobs":[null,-9999.0]' in out.model_dump_json()  # valid JSON: no -Infinity


def test_chat_logprobs_hold_bytes_and_alternatives(tok):
    ids = tok("你好", add_special_tokens=False)["input_ids"]
    texts = TokenTexts(tok)
    out = chat_logprobs([TokenLogprob(t, -0.25, ((t, -0.25), (ids[0], -3.0))) for t in ids], texts)
    assert bytes(b for e in out.content for b in e.bytes).decode() == "你好"
    assert [len(e.top_logprobs) for e in out.content] == [2] * len(ids)
    assert out.content[0].top_logprobs[1].bytes == texts(ids[0])[1]
