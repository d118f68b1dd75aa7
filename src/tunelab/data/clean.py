"""Text and label cleaning, one configurable step at a time, each counted.

`Cleaner.text(s)` applies, in order: ftfy repair (mojibake; only non-ASCII text can need it), optional
width folding, Unicode normalisation, removal of control and zero-width characters, optional URL / @mention /
#hashtag normalisation for social text, whitespace collapsing. `Cleaner.length_reason(s)` says
why a cleaned text is too short or too long. `Cleaner.label(x)` strips, optionally lower-cases and
maps a label. Every step that changes a value increments `Cleaner.counts[step]`.

The ftfy repair (`fix_text`) repairs what is broken and restyles nothing: it keeps full-width characters
("质量很好，物流也快！") and curly quotes ("他说“很好”"), which are normal in Chinese and Japanese text, so its count
is the rows whose mojibake, HTML entities, ligatures or control characters it repaired. Width folding
(`fold_width`, counted as `width_folded`, off by default) is ftfy's `fix_character_width`: full-width ASCII
letters, digits and punctuation and the ideographic space become ASCII ("ＡＢＣ１２３！" -> "ABC123!"), half-width
katakana become full-width. NFKC (`unicode_form`) folds width too, counted as `unicode_normalized`.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections import Counter

_WS = re.compile(r"\s+")
_HSPACE = re.compile(r"[^\S\n]+")  # whitespace other than newlines
_BLANK_LINES = re.compile(r"\n{3,}")
# C0/C1 controls except \t \n \r (whitespace, handled by the whitespace step), plus zero-width and
# bidi formatting characters and the BOM, which are invisible but break matching and tokenisation.
_INVISIBLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
_MENTION = re.compile(r"(?<![\w@])@\w{1,30}")
_HASHTAG = re.compile(r"(?<![\w#])#(\w+)")


def dedup_key(text: str) -> str:
    """The key under which two texts count as the same (case- and whitespace-insensitive)."""
    return _WS.sub(" ", text.casefold()).strip()


class Cleaner:
    """Applies the steps switched on in a `CleanConfig` (see tunelab.config) and counts their effect."""

    def __init__(self, cfg, keep_newlines: bool = False):
        """`keep_newlines`: documents and chat turns keep their line structure (at most one blank line);
        classification texts become one line."""
        self.cfg = cfg
        self.keep_newlines = keep_newlines
        self.counts: Counter = Counter()
        self._fix = self._fold = None
        if cfg.fix_text:
            import ftfy  # ~60 ms; only a Cleaner that repairs text loads it (data overlap needs just dedup_key)

            config = ftfy.TextFixerConfig(fix_character_width=False, uncurl_quotes=False, normalization=None,
                                          explain=False)
            self._fix = functools.partial(ftfy.fix_text, config=config)
        if cfg.fold_width:
            from ftfy.fixes import fix_character_width  # ftfy again: only with fold_width on

            self._fold = fix_character_width

    def _step(self, name: str, before: str, after: str) -> str:
        if after != before:
            self.counts[name] += 1
        return after

    def text(self, s: str) -> str:
        c = self.cfg
        if self._fix is not None and not s.isascii():
            s = self._step("fix_text", s, self._fix(s))
        if self._fold is not None and not s.isascii():
            s = self._step("width_folded", s, self._fold(s))
        if c.unicode_form:
            s = self._step("unicode_normalized", s, unicodedata.normalize(c.unicode_form, s))
        if c.strip_invisible:
            s = self._step("invisible_removed", s, _INVISIBLE.sub("", s))
        if c.urls != "keep":
            s = self._step("urls", s, _URL.sub("<url>" if c.urls == "replace" else "", s))
        if c.mentions != "keep":
            s = self._step("mentions", s, _MENTION.sub("@user" if c.mentions == "replace" else "", s))
        if c.hashtags != "keep":
            s = self._step("hashtags", s, _HASHTAG.sub(r"\1" if c.hashtags == "strip_hash" else "", s))
        if c.collapse_whitespace and self.keep_newlines:
            lines = _HSPACE.sub(" ", s.replace("\r\n", "\n").replace("\r", "\n")).split("\n")
            s = self._step("whitespace", s, _BLANK_LINES.sub("\n\n", "\n".join(ln.strip() for ln in lines)).strip())
        elif c.collapse_whitespace:
            s = self._step("whitespace", s, _WS.sub(" ", s).strip())
        else:
            s = s.strip()
        return s

    def length_reason(self, s: str) -> str | None:
        """'empty_text', 'too_short' or 'too_long' (characters, then whitespace-separated words), or None."""
        c = self.cfg
        if not s:
            return "empty_text"
        if len(s) < c.min_chars or (c.min_words and len(s.split()) < c.min_words):
            return "too_short"
        if (c.max_chars and len(s) > c.max_chars) or (c.max_words and len(s.split()) > c.max_words):
            return "too_long"
        return None

    def label(self, x: str) -> str:
        c = self.cfg
        y = x.strip()
        if c.lowercase_labels:
            y = y.lower()
        y = c.label_map.get(y, y)
        return self._step("label_normalized", x, y)
