"""Token log-probabilities as the wire shows them: chat's `logprobs.content` and the completions' legacy
`tokens` / `token_logprobs` / `top_logprobs` / `text_offset`.

A token's text is what it adds to the decoded text (SentencePiece's word-start marker becomes a space, which
the tokenizer drops where a decoded text starts: character offsets account for that). A
token holding part of a UTF-8 character (byte-level BPE splits many Chinese characters in two or three) has
no text of its own: its `bytes` are exact, and its text is written `bytes:\\xe4\\xbd` as OpenAI does. Its
log-probabilities are floored at -9999 (JSON has no -inf).
"""

from __future__ import annotations

import codecs
import re
import threading
from collections.abc import Iterable

from tunelab.serve.engine import TokenLogprob
from tunelab.serve.protocol import ChatLogprobs, TextLogprobs, TokenLogprobOut, TopLogprob

LOGPROB_FLOOR = -9999.0
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte fallback


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins (GPT-2's scheme) -> the bytes they stand for: printable Latin-1
    characters stand for themselves, every other byte for chr(256 + its rank among them)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet, extra = {chr(b): b for b in kept}, 0
    for b in range(256):
        if b not in kept:
            alphabet[chr(256 + extra)] = b
            extra += 1
    return alphabet


BYTE_LEVEL = _byte_level_alphabet()


class TokenTexts:
    """Texts and bytes of a tokenizer's tokens, computed once per token id (thread-safe)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int], bool]] = {}
        self._lock = threading.Lock()

    def __call__(self, token: int) -> tuple[str, list[int]]:
        """(text, UTF-8 bytes) of one token id."""
        return self._get(token)[:2]

    def starts_word(self, token: int) -> bool:
        """Whether the token's text begins with a SentencePiece word-start space (dropped at a text's start)."""
        return self._get(token)[2]

    def _get(self, token: int) -> tuple[str, list[int], bool]:
        got = self._cache.get(token)
        if got is None:
            got = self._compute(token)
            with self._lock:
                self._cache[token] = got
        return got

    def _compute(self, token: int) -> tuple[str, list[int], bool]:
        tok = self.tokenizer
        text = tok.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        piece = tok.convert_ids_to_tokens(token) or ""
        if "\ufffd" not in text:
            word_start = piece.startswith("▁") and not text.startswith(" ")  # decoded alone, the space is dropped
            if word_start:
                text = " " + text
            return text, list(text.encode()), word_start
        if m := _BYTE_TOKEN.fullmatch(piece):
            raw = bytes([int(m.group(1), 16)])
        elif piece and all(c in BYTE_LEVEL for c in piece):
            raw = bytes(BYTE_LEVEL[c] for c in piece)
        else:  # a token that really decodes to U+FFFD
            raw = text.encode()
        try:
            return raw.decode(), list(raw), False
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw), False


def _floor(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


def chat_logprobs(entries: Iterable[TokenLogprob], texts: TokenTexts) -> ChatLogprobs:
    """Chat's `logprobs` of generated tokens: each token, its log-probability and bytes, and its alternatives."""

    def top(token: int, logprob: float) -> TopLogprob:
        text, raw = texts(token)
        return TopLogprob(token=text, logprob=_floor(logprob), bytes=raw)

    return ChatLogprobs(content=[TokenLogprobOut(**top(e.token, e.logprob).model_dump(),
                                                 top_logprobs=[top(t, lp) for t, lp in e.top])
                                 for e in entries])


class TextOffsets:
    """Character offsets of successive tokens in the text they decode to: the characters completed by the bytes
    of the tokens before (a token inside a character starts where that character does). A decoded text begins
    at the start and again where `segment()` says (an echoed prompt, then the answer, each decoded on its own):
    a word-start space there is not in the text."""

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.position = 0
        self._at_start = True

    def segment(self) -> None:
        """The next token begins a separately decoded text."""
        self._at_start = True

    def advance(self, raw: list[int], starts_word: bool = False) -> int:
        """The offset of a token with these bytes; then moves past it."""
        at = self.position
        chars = len(self._decoder.decode(bytes(raw)))
        if self._at_start and starts_word:
            chars -= 1
        self._at_start = False
        self.position += max(chars, 0)
        return at


def text_logprobs(entries: Iterable[TokenLogprob | None], tokens: Iterable[int], texts: TokenTexts,
                  offsets: TextOffsets | None = None) -> TextLogprobs:
    """The completions' `logprobs` of `tokens` (prompt tokens first when echoed; an entry is None for the first
    prompt token). `offsets`: where the text so far ends (a stream's earlier chunks), from 0 when not given. The
    alternatives include the token itself, as OpenAI's do."""
    offsets = offsets or TextOffsets()
    out = TextLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for token, e in zip(tokens, entries):
        text, raw = texts(token)
        out.tokens.append(text)
        out.text_offset.append(offsets.advance(raw, texts.starts_word(token)))
        if e is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(_floor(e.logprob))
        alternatives: dict[str, float] = {}
        for t, lp in (*e.top, (e.token, e.logprob)):
            key = texts(t)[0]  # two ids with one text (rare): the likelier one's
            alternatives[key] = max(alternatives.get(key, LOGPROB_FLOOR), _floor(lp))
        out.top_logprobs.append(alternatives)
    return out


def joined(parts: list[TextLogprobs]) -> TextLogprobs:
    """Consecutive `TextLogprobs` (an echoed prompt's, then the answer's) as one."""
    return TextLogprobs(tokens=[t for p in parts for t in p.tokens],
                        token_logprobs=[t for p in parts for t in p.token_logprobs],
                        top_logprobs=[t for p in parts for t in p.top_logprobs],
                        text_offset=[t for p in parts for t in p.text_offset])
