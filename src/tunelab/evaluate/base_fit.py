"""Can the base model read this data? Measured on the tokenizer, before any training.

A base fits text its tokenizer was built for. Three measurements on a sample of the data show when it was not:
- `unk_rate`: the share of tokens that are the tokenizer's unknown token (an English WordPiece vocabulary on
  Chinese: most characters become [UNK], and the model sees nothing of them);
- `tokens_per_char`: how finely the text is cut. English runs ~0.25 (a token is a word piece); Chinese with a
  tokenizer built for it ~1 (a token is a character or a word); a byte-level tokenizer that does not know the
  script needs 2–3 tokens per character, and an alphabetic script cut letter by letter ~1;
- `coverage`: of the distinct characters of the data's main script, the share the tokenizer encodes as one
  known token.
`train` and `eval` print a warning naming the measurement when the base is a poor fit, and both record the
measurements (`base_fit` in the model's tunelab.json and in the report).
"""

from __future__ import annotations

import unicodedata
from collections import Counter

SPACELESS = {"Han", "Kana", "Hangul", "Thai", "Lao", "Khmer", "Myanmar"}  # a character is about a word piece
SCRIPT_NAMES = {"CJK": "Han", "HIRAGANA": "Kana", "KATAKANA": "Kana", "HANGUL": "Hangul", "FULLWIDTH": "Latin",
                "LATIN": "Latin"}
LANGUAGES = {"Han": "Chinese or Japanese", "Kana": "Japanese", "Hangul": "Korean", "Cyrillic": "Russian or another "
             "Cyrillic-script language", "Arabic": "Arabic-script", "Thai": "Thai", "Greek": "Greek",
             "Hebrew": "Hebrew", "Devanagari": "Hindi or another Devanagari-script language"}
MAX_UNK_RATE = 0.02
MAX_TOKENS_PER_CHAR = {"spaceless": 1.3, "alphabetic": 0.5}
MIN_COVERAGE = 0.8
SAMPLE_ROWS = 2000


def script_of(ch: str) -> str | None:
    """The script of a letter ("Han", "Latin", "Cyrillic", …); None for non-letters."""
    if not ch.isalpha():
        return None
    try:
        first = unicodedata.name(ch).split()[0]
    except ValueError:
        return None
    return SCRIPT_NAMES.get(first, first.capitalize())


def measure(tokenizer, texts: list[str], sample: int = SAMPLE_ROWS) -> dict:
    """-> {"script", "script_share", "unk_rate", "tokens_per_char", "coverage", "rows", "warnings": [...]}."""
    texts = [t for t in texts[:sample] if isinstance(t, str) and t.strip()]
    letters = Counter(s for t in texts for ch in t if (s := script_of(ch)))
    total_letters = sum(letters.values())
    script, count = letters.most_common(1)[0] if letters else (None, 0)
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    n_tokens = sum(len(ids) for ids in enc)
    n_chars = sum(len("".join(t.split())) for t in texts)
    unk = getattr(tokenizer, "unk_token_id", None)
    n_unk = sum(1 for ids in enc for i in ids if i == unk) if unk is not None else 0
    chars = sorted({ch for t in texts for ch in t if script_of(ch) == script}) if script else []
    one = tokenizer(chars, add_special_tokens=False)["input_ids"] if chars else []
    covered = sum(1 for ids in one if len(ids) == 1 and ids[0] != unk)
    fit = {"rows": len(texts), "script": script, "script_share": round(count / max(1, total_letters), 4),
           "unk_rate": round(n_unk / max(1, n_tokens), 4), "tokens_per_char": round(n_tokens / max(1, n_chars), 3),
           "coverage": round(covered / max(1, len(chars)), 4), "script_chars": len(chars)}
    fit["warnings"] = _warnings(fit)
    return fit


def _warnings(fit: dict) -> list[str]:
    out = []
    script = fit["script"]
    if fit["unk_rate"] >= MAX_UNK_RATE:
        out.append(f"{fit['unk_rate']:.0%} of its tokens are the unknown token")
    kind = "spaceless" if script in SPACELESS else "alphabetic"
    if script and fit["tokens_per_char"] >= MAX_TOKENS_PER_CHAR[kind]:
        how = "into bytes or fragments" if kind == "spaceless" else "letter by letter"
        out.append(f"{fit['tokens_per_char']:.2f} tokens per character: it cuts {script} text {how}")
    if script and script != "Latin" and fit["script_chars"] and fit["coverage"] < MIN_COVERAGE:
        out.append(f"it knows {fit['coverage']:.0%} of the {fit['script_chars']} {script} characters in the data "
                   "as tokens of their own")
    return out


def advice(fit: dict, base: str) -> str | None:
    """One warning line for the console, or None when the base fits."""
    if not fit.get("warnings"):
        return None
    script = fit["script"] or "this"
    language = LANGUAGES.get(script, f"{script}-script")
    return (f"{base} looks like a poor fit for this data ({fit['script_share']:.0%} {script} script, measured on "
            f"{fit['rows']:,} rows): " + "; ".join(fit["warnings"]) + f". A base whose tokenizer was trained on "
            f"{language} text will learn far more from it: set model.base to a model dir that fits (a Hugging Face "
            "folder with config.json, tokenizer and safetensors weights).")
