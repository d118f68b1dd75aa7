"""Token log-probabilities on the wire: each token's text and exact bytes (byte-level BPE splits Chinese
characters), character offsets, the alternatives' shape, and the floor for -inf."""

from __future__ import annotations

import pytest

from tunelab.serve.engine import TokenLogprob
from tunelab.serve.logprobs import LOGPROB_FLOOR, TextOffsets, TokenTexts, chat_logprobs, joined, text_logprobs

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


@pytest.fixture(scope="module")
def sentencepiece_tok():
    """A Llama-2-style tokenizer: word starts marked '▁' (dropped where a decoded text starts), byte fallback."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"] +
                                  [f"<0x{b:02X}>" for b in range(256)],
                                  initial_alphabet=list("▁abcdefghijklmnopqrstuvwxyzHTW"))
    tk.train_from_iterator(["Hello world the cat sat on the mat", "The world is wide and the sea is deep"] * 50,
                           trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_offsets_follow_the_decoded_text(sentencepiece_tok):
    tok = sentencepiece_tok
    texts = TokenTexts(tok)
    prompt = tok("Hello world 你好 the cat", add_special_tokens=False)["input_ids"]
    answer = tok("sat on the mat", add_special_tokens=False)["input_ids"]
    assert any(texts(t)[0].startswith("bytes:") for t in prompt)  # byte-fallback pieces are exercised
    # an echo: the prompt and the answer are each decoded on their own, then joined
    text = tok.decode(prompt) + tok.decode(answer)
    offsets = TextOffsets()
    out = joined([text_logprobs([None] * len(prompt), prompt, texts, offsets)])
    offsets.segment()
    out = joined([out, text_logprobs([TokenLogprob(t, -1.0) for t in answer], answer, texts, offsets)])
    for i, (token, at) in enumerate(zip(prompt + answer, out.text_offset)):
        shown = texts(token)[0]
        if shown.startswith("bytes:"):
            continue
        if i in (0, len(prompt)):  # where a decoded text starts, its word-start space is not there
            shown = shown.removeprefix(" ")
        assert text[at:at + len(shown)] == shown, (i, shown, at)
    assert out.text_offset[len(prompt)] == len(tok.decode(prompt))
