"""PII redaction with typed placeholders, counted by type.

Types and placeholders: <SECRET> (API keys and tokens), <EMAIL>, <CREDIT_CARD> (13-19 digits with a
card-network first digit that pass the Luhn check), <IP> (IPv4, IPv6), <PHONE> (7-15 digits in a
phone-like layout).

Known limits (pattern matching, not a model): names, street addresses and dates of birth are not
detected; phone numbers written without separators inside longer digit runs, or spelled out, are
missed; secrets are found by well-known prefixes (sk-, ghp_, AKIA, xox?-, AIza, glpat-) and as random-looking
tokens (32+ characters with 4+ digits making up 10%+), so short, all-letter or hyphenated secrets are
missed and long hashes/IDs are redacted too.
"""

from __future__ import annotations

import re
from collections import Counter

_SECRET = re.compile(
    r"\b(?:sk-[A-Za-z0-9_-]{20,}|ghp_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}|glpat-[A-Za-z0-9_-]{20,}"
    r"|AKIA[0-9A-Z]{16}|xox[abposr]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35})")
_RANDOM_TOKEN = re.compile(r"(?<![\w#@-])[A-Za-z0-9_]{32,}(?![\w-])")
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\d.])")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){2,7}[0-9A-Fa-f]{1,4}(?![\w:])"
                   r"|(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){1,6}:(?:[0-9A-Fa-f]{1,4}:){0,5}[0-9A-Fa-f]{1,4}(?![\w:])")
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?![\w])")

_NOT_PHONE = re.compile(r"^(?:\d{4}-\d{1,2}-\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}|\d{1,3}(?:\.\d{1,3}){3})$")

# Cheap searches that rule a pattern out before the costlier substitution runs (most texts hold no PII).
_LONG_TOKEN = re.compile(r"[A-Za-z0-9_\-]{20,}")
_DIGIT_RUN = re.compile(r"\d[\d .()+-]{5,}\d")

TYPES = ("secret", "email", "credit_card", "ip", "phone")


def _phone_like(s: str) -> bool:
    """7-15 digits, a last group of 3+ digits, and not a date or a dotted quad."""
    digits = re.sub(r"\D", "", s)
    last = re.split(r"[ .()-]+", s.strip())[-1]
    return 7 <= len(digits) <= 15 and len(last) >= 3 and not _NOT_PHONE.match(s)


def _random_looking(token: str) -> bool:
    """A long token that reads like a key or hash, not a run-together hashtag: 4+ digits making up 10%+
    of it, and 4+ letters."""
    digits = sum(c.isdigit() for c in token)
    return digits >= 4 and digits >= 0.1 * len(token) and sum(c.isalpha() for c in token) >= 4


def _card_like(s: str) -> bool:
    """13-19 digits, a card-network first digit (2-series only at 16 digits), and the Luhn check."""
    digits = re.sub(r"\D", "", s)
    return (digits[0] in "3456" or (digits[0] == "2" and len(digits) == 16)) and luhn_ok(digits)


def luhn_ok(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = int(ch)
        if i % 2 == parity:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


class PiiRedactor:
    """`redact(text)` -> text with placeholders; `counts[type]` = redactions so far."""

    def __init__(self, types: tuple[str, ...] | list[str] = TYPES):
        unknown = set(types) - set(TYPES)
        if unknown:
            raise ValueError(f"unknown PII types {sorted(unknown)}; known: {', '.join(TYPES)}")
        self.types = set(types)
        self.counts: Counter = Counter()

    def _sub(self, kind: str, pattern: re.Pattern, placeholder: str, text: str, check=None) -> str:
        def repl(m: re.Match) -> str:
            if check is not None and not check(m.group(0)):
                return m.group(0)
            self.counts[kind] += 1
            return placeholder

        return pattern.sub(repl, text)

    def redact(self, text: str) -> str:
        if "secret" in self.types and _LONG_TOKEN.search(text):
            text = self._sub("secret", _SECRET, "<SECRET>", text)
            text = self._sub("secret", _RANDOM_TOKEN, "<SECRET>", text, _random_looking)
        if "email" in self.types and "@" in text:
            text = self._sub("email", _EMAIL, "<EMAIL>", text)
        digits = _DIGIT_RUN.search(text) is not None
        if "credit_card" in self.types and digits:
            text = self._sub("credit_card", _CARD, "<CREDIT_CARD>", text, _card_like)
        if "ip" in self.types:
            if digits:
                text = self._sub("ip", _IPV4, "<IP>", text)
            if text.count(":") >= 2:
                text = self._sub("ip", _IPV6, "<IP>", text, lambda s: s.count(":") >= 2)
        if "phone" in self.types and digits:
            text = self._sub("phone", _PHONE, "<PHONE>", text, _phone_like)
        return text
