"""Raw text -> words with character offsets: the one rule NER uses both to build BIO rows from text + spans
(`data.rows.to_bio`) and to split the texts a trained model is applied to (`tunelab predict`, /v1/entities).

A word is a run of word characters (`\\w`), or one character that is neither a word character nor
whitespace (punctuation, symbols: "$", "%", "."), or one character of a script written without spaces
between words: CJK ideographs, Japanese kana and Hangul syllables are each a word of their own. Chinese NER
data is tagged per character, and in Japanese and Korean entity boundaries fall inside space-free runs
(a particle written onto a name: "삼성전자가"), so a per-character split is the only one that keeps every
entity boundary a word boundary without a language-specific segmenter.

The rule is strictly finer than `\\w+|[^\\w\\s]` (every boundary of that split stays a boundary, and both cover
the same characters), so any span aligned with the old split is still aligned.
"""

from __future__ import annotations

import re

# Written without spaces between words: one character = one word.
SPACELESS = (
    "\u3005-\u3007"          # 々 〆 〇 (ideographic iteration mark, closing mark, number zero)
    "\u3040-\u30ff"          # hiragana, katakana
    "\u31f0-\u31ff"          # katakana phonetic extensions
    "\u3400-\u4dbf"          # CJK unified ideographs extension A
    "\u4e00-\u9fff"          # CJK unified ideographs
    "\uac00-\ud7af"          # Hangul syllables
    "\uf900-\ufaff"          # CJK compatibility ideographs
    "\uff66-\uff9f"          # half-width katakana
    "\U00020000-\U0003134f"  # CJK unified ideographs extensions B-G, compatibility supplement
)
_WORD = re.compile(rf"[{SPACELESS}]|[^\W{SPACELESS}]+|[^\w\s]")


def split_words(text: str) -> list[tuple[str, int, int]]:
    """-> [(word, start, end)] in text order, with `text[start:end] == word`; whitespace is never in a word."""
    return [(m.group(0), m.start(), m.end()) for m in _WORD.finditer(text)]
