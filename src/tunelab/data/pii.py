"""PII redaction with typed placeholders, counted by type.

Types and placeholders: <SECRET> (API keys and tokens), <EMAIL>, <CREDIT_CARD> (13-19 digits with a
card-network first digit that pass the Luhn check), <IP> (IPv4: four octets of 0-255, not part of a longer dotted
number; IPv6: valid for the stdlib `ipaddress`, written with all 8 groups, or with "::" and 3+ groups or a group
of 3+ hex digits, or "::1"), <PHONE>.

Phones are found three ways: (1) a phone-like layout with separators (7-15 digits, "+1 (415) 555-0132",
"020 7946 0958"); (2) a leading "+" and 8-15 digits (E.164: "+14155550123", "+86 13812345678"); (3) 7-15
digits, bare or with separators, with a phone word among the 5 words before them ("call me at 5551234567",
"手机号13812345678"; words: call, phone, tel, mobile, cell, text/sms/ring/reach me, whatsapp, fax, contact,
dial, number, ph, mob, 电话, 手机, 联系, 致电, 微信, 号码, 拨打, 打给). A bare digit run with no such word
stays: order numbers, timestamps and IDs look the same. Nor is it a phone when an ID noun comes after the phone
word ("returned my call. Case number 8273993", "call about order 5551234567"; nouns: order, case, ticket,
account, tracking, reference, invoice, booking, flight, serial, customer, member, receipt, tag, id, 订单, 单号,
编号, 账号, ...). Dates (2024-01-05, 05/01/2024) are never phones.

Dates, times and timestamps ("2007-10-30 21:58:23", "2007-10-30T21:58:23Z", "2007/10/30", "30.10.2007",
"21:58"), versions ("v2.13.0", "version 1.2.3.4", "1.2.3.4.5") and amounts with a currency ("¥1,299.00",
"12 345 678 €") are masked before cards, IPs and phones are searched, so no part of them is redacted, in any
script's digits. A number straight after an ID label ("Order No.", "order #", "tracking number", "订单号",
"单号", "注文番号", "номер заказа", "رقم الطلب") is neither a card nor a formatted phone, even where it passes the
Luhn check; card words ("card number") and account numbers are no such label.

Patterns are bounded by ASCII letters and digits only, so PII written straight after Chinese or Japanese text
("邮箱jane@example.com") is found.

`find(text)` returns the spans without replacing (callers that keep offsets, like NER tokens, use it);
`redact(text)` replaces and counts each redacted occurrence once by type; `redact_tokens` redacts a token
sequence (NER) as the text the tokens form, so PII split over several tokens becomes one placeholder token;
`redact_prefix` redacts the head of a long text without cutting a PII string in two. `data prepare` redacts
every string that reaches an output (texts, labels, chat turns, categories, NER tokens and entity types) and the
source-text excerpts of rejected rows; its report counts the redactions in rows it cleaned, not those in
rejected-row excerpts (a row cleaned, then rejected, would count twice).

Known limits (pattern matching, not a model): names, street addresses and dates of birth are not
detected. A bare digit run with no phone word before it is kept: a bare 11-digit Chinese mobile "13812345678",
or a phone word only after the number ("5551234567 is my cell"). An ID after a plain "number" ("the number
1234567 on the box") reads as a phone; only the listed ID nouns are recognised. Spelled-out
("five five five ...") and obfuscated ("jane at example dot com") PII is missed, and so is PII split by
whitespace that is not in it (NER tokens "jane", "@", "example.com" joined by spaces; the text + entity spans
layout keeps the source spacing, so there it is found). A rejected row's excerpt is its raw source text, so PII
broken up by invisible characters (a zero-width space inside an e-mail) stays readable there; kept rows are
cleaned first. A 16-digit order number that passes the Luhn check and starts like a card is redacted as a
card unless an ID label comes straight before it; a dotted quad ("1.2.3.4") is an IP unless a version word or "v"
comes straight before it. Phone words are English and Chinese only. Secrets are found by well-known prefixes (sk-, ghp_,
github_pat_, AKIA, xox?-, AIza, glpat-) and as random-looking tokens (32+ characters with 4+ digits making up
10%+), so short, all-letter or hyphenated secrets are missed and long hashes/IDs are redacted too.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections import Counter

PLACEHOLDERS = {"secret": "<SECRET>", "email": "<EMAIL>", "credit_card": "<CREDIT_CARD>", "ip": "<IP>",
                "phone": "<PHONE>"}
TYPES = tuple(PLACEHOLDERS)  # also the search order: where matches would overlap, the earlier type wins

# Bounds use ASCII word characters only: Chinese text runs into PII with no space, and `\w`/`\b` would see
# one long word there.
_SECRET = re.compile(
    r"(?<![A-Za-z\d_])(?:sk-[A-Za-z0-9_-]{20,}|ghp_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}"
    r"|glpat-[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|xox[abposr]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35})")
_RANDOM_TOKEN = re.compile(r"(?<![A-Za-z\d_#@-])[A-Za-z0-9_]{32,}(?![A-Za-z\d_-])")
_EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
                    r"(?![A-Za-z\d_])")
_CARD = re.compile(r"(?<![\d-])(?<!\d\.)(?:\d[ -]?){12,18}\d(?![\d-]|\.\d)")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# Not after a digit or "digit.", not before a digit or ".digit": never a part of a longer dotted number
_IPV4 = re.compile(rf"(?<!\d)(?<!\d\.){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?\d)")
# Candidates: hex groups and colons (an IPv4 tail allowed); `_ipv6_like` keeps only real addresses
_IPV6 = re.compile(r"(?<![A-Za-z\d_:.])(?:[0-9A-Fa-f]{1,4}|(?=::))(?::[0-9A-Fa-f]{0,4}){2,8}"
                   r"(?:\.\d{1,3}){0,3}(?![A-Za-z\d_:]|\.\d)")
# Phones are never part of a longer dotted number ("Chrome 120.0.6099.109")
_PHONE = re.compile(r"(?<![A-Za-z\d_+])(?<!\d\.)(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}"
                    r"(?![A-Za-z\d_]|\.\d)")
_E164 = re.compile(r"(?<![A-Za-z\d_+])\+(?:\d[ .-]?){7,14}\d(?![A-Za-z\d_])")
# 7-15 digits, separators optional: only a phone when a phone word comes before it (`_after_phone_word`)
_PHONE_DIGITS = re.compile(r"(?<![A-Za-z\d_+])(?<!\d\.)(?:\(\d{1,4}\)[ .-]?)?\d(?:[ .-]?\d){6,14}"
                           r"(?![A-Za-z\d_]|\.\d)")
# Phone words, and ID nouns ("order", "case number", "订单"): the last of either before the digits decides
_PHONE_WORD = re.compile(
    r"(?i)(?P<id>\b(?:order|case|ticket|account|tracking|reference|ref|invoice|booking|confirmation|reservation"
    r"|flight|serial|customer|member|transaction|receipt|model|part|item|product|tag|id)(?:\s+numbers?)?\b"
    r"|订单|单号|编号|账号|工单)"
    r"|\b(?:call(?:s|ed|ing)?|phone[sd]?|tel|telephone|mobile|cell(?:phone)?|whatsapp|fax|contacts?|dial(?:l?ed)?"
    r"|ph|mob|sms|(?:text|ring|reach) me|numbers?)\b|电话|手机|联系|致电|微信|号码|拨打|打给")
_PHONE_WORD_WINDOW = 40  # characters before the digits searched for a phone word ...
_PHONE_WORD_WORDS = 5  # ... and at most this many whitespace-separated words of them

_NOT_PHONE = re.compile(r"^(?:\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}|\d{1,3}(?:\.\d{1,3}){3})$")
# A number directly labelled as an order, tracking, invoice ... number is no card or phone ("Order No. 1234 5678
# 9012 3456", "订单号：2023103012345678", "注文番号", "номер заказа", "رقم الطلب"); card words ("card number") are not
# among the labels, nor are account or ID numbers (those are personal).
_ID_LABEL = re.compile(
    r"(?i)(?:\b(?:order|case|ticket|tracking|reference|ref|invoice|booking|confirmation|reservation|transaction"
    r"|txn|receipt|serial|shipment|parcel|waybill|sku|item|product|model|part)(?:\s*(?:numbers?|nos?|nr|num"
    r"|ids?|codes?))?|订单号?|单号|编号|工单号?|流水号|交易号|注文番号|注文|受付番号|伝票番号|問い?合わ?せ番号"
    r"|заказ[а-я]*|номер\s+(?:заказа|счёта|счета|накладной|отслеживания)|трек-номер"
    r"|(?:رقم\s+)?(?:الطلب|الطلبية|الفاتورة|التتبع|الشحنة))[\s:：#№.\-]*$")
_ID_LABEL_WINDOW = 40  # characters before the digits searched for an ID label

# Dates, times, timestamps, versions and amounts are masked before cards, IPs and phones are searched, so no
# part of them can read as one ("2007-10-30 21:58:23", "2007-10-30T21:58:23Z", "30.10.2007", "v2.13.0",
# "version 1.2.3.4", "1.2.3.4.5", "12 345 678 €").
_DAY, _MONTH = r"(?:0?[1-9]|[12]\d|3[01])", r"(?:0?[1-9]|1[0-2])"
_DATE = (rf"(?<!\d)(?<!\d[-/.:])(?:\d{{4}}([-/.]){_MONTH}\1{_DAY}|{_DAY}([-/.]){_DAY}\2\d{{4}}"
         rf"|{_DAY}([/.]){_DAY}\3\d\d)(?=[Tt]\d|(?![A-Za-z\d_])(?![-/.:]\d))")
_TIME = (r"(?:(?<=\d[Tt])|(?<![A-Za-z\d_:.]))(?:[01]?\d|2[0-3]):[0-5]\d(?::[0-5]\d(?:[.,]\d{1,9})?)?"
         r"(?:[Zz]|[+-](?:[01]\d|2[0-3]):?[0-5]\d|\s?[AaPp]\.?[Mm]\b\.?)?(?![A-Za-z\d_:]|[.,]\d)")
_VERSION = (r"(?<![A-Za-z\d_.])[vV]\d+(?:\.\d+)+|(?<!\d)(?<!\d\.)\d+(?:\.\d+){4,}(?!\.?\d)"
            r"|(?i:\b(?:version|ver|release|build|firmware|fw|revision|rev)\b|版本号?|バージョン|верси[яию])"
            r"[\s:：#.]*[vV]?\d+(?:\.\d+)+")
_NUMBER = r"(?:\d{1,3}(?:[,.'\u00a0\u202f]\d{3})+|\d+)(?:[.,]\d{1,2})?"  # 1,299.00 or 1.299,00 or 1299
_AMOUNT = (rf"(?:[$€£¥￥₹₽]|\b(?:USD|EUR|GBP|RMB|CNY|JPY|HKD|US\$|HK\$|Rs\.?))\s?{_NUMBER}(?!\d)"
           rf"|(?<![\d.,])(?:\d{{1,3}}(?: \d{{3}})+(?:,\d{{1,2}})?|{_NUMBER})\s?"
           r"(?:€|₽|元|円|руб\b|(?i:\b(?:USD|EUR|GBP|RMB|CNY|JPY|yuan|dollars?|euros?|rubles?)\b))")
_NOT_PII = re.compile("|".join([_DATE, _TIME, _VERSION, _AMOUNT]))

# Cheap searches that rule a pattern out before the costlier search runs (most texts hold no PII).
_LONG_TOKEN = re.compile(r"[A-Za-z0-9_\-]{20,}")
_EMAIL_HINT = re.compile(r"@[A-Za-z0-9-]+\.[A-Za-z0-9-]")  # not "@" alone: most social texts hold @mentions
_DIGIT_RUN = re.compile(r"\d[\d .()+-]{5,}\d")
_IPV6_HINT = re.compile(r"[0-9A-Fa-f]:[0-9A-Fa-f]{0,4}:|::[0-9A-Fa-f]")  # two colons in a hex run, not "RT @a: http://"

_MASK = "\x00"  # stands in for found PII while later patterns search: no pattern matches it or runs across it
_PREFIX_MARGIN = 256  # > the longest e-mail (254) or phone, so a PII string crossing the cut is seen whole


class _AsciiDigits(dict):
    """str.translate table: every decimal digit ("٣", "३", "３") -> its ASCII digit, filled in as met."""

    def __missing__(self, cp: int) -> int:
        d = unicodedata.decimal(chr(cp), None)
        self[cp] = cp if d is None else ord("0") + d
        return self[cp]


_ASCII_DIGITS = _AsciiDigits()


def _mask_not_pii(text: str) -> str:
    """`text` with its dates, times, versions and amounts masked; they are found in any script's digits
    ("٢٠٠٧-١٠-٣٠")."""
    probe = text if text.isascii() else text.translate(_ASCII_DIGITS)
    spans = [m.span() for m in _NOT_PII.finditer(probe)]
    for start, end in spans:
        text = text[:start] + _MASK * (end - start) + text[end:]
    return text


def _id_labelled(m: re.Match) -> bool:
    """An ID label ("order no.", "订单号", "注文番号") comes straight before the match."""
    return _ID_LABEL.search(m.string, max(0, m.start() - _ID_LABEL_WINDOW), m.start()) is not None


def _phone_like(m: re.Match) -> bool:
    """7-15 digits, a last group of 3+ digits, not a date or a dotted quad, and no ID label before it."""
    s = m.group(0)
    digits = re.sub(r"\D", "", s)
    last = re.split(r"[ .()-]+", s.strip())[-1]
    return 7 <= len(digits) <= 15 and len(last) >= 3 and not _NOT_PHONE.match(s) and not _id_labelled(m)


def _ipv6_like(m: re.Match) -> bool:
    """A valid IPv6 address (stdlib `ipaddress`) written as one: all 8 groups, or "::" with 3+ groups or a
    group of 3+ hex digits ("2001:db8::1", "fe80::1"), or the loopback "::1". Times ("21:58:23"), MAC
    addresses (6 groups), C++ scopes ("A::B") and slices ("1::2") are not."""
    s = m.group(0)
    try:
        addr = ipaddress.IPv6Address(s)
    except ValueError:
        return False
    groups = [g for g in s.split(":") if g]
    return "::" not in s or len(groups) >= 3 or max(len(g) for g in groups) >= 3 or addr == ipaddress.IPv6Address(1)


def _after_phone_word(m: re.Match) -> bool:
    """The digits are not a date, and among the few words before them is a phone word with no ID noun after it
    ("call me about order 5551234567" is an order)."""
    before = m.string[max(0, m.start() - _PHONE_WORD_WINDOW):m.start()]
    words = list(_PHONE_WORD.finditer(" ".join(before.split()[-_PHONE_WORD_WORDS:])))
    return bool(words) and words[-1].group("id") is None and not _NOT_PHONE.match(m.group(0))


def _random_looking(m: re.Match) -> bool:
    """A long token that reads like a key or hash, not a run-together hashtag: 4+ digits making up 10%+
    of it, and 4+ letters."""
    token = m.group(0)
    digits = sum(c.isdigit() for c in token)
    return digits >= 4 and digits >= 0.1 * len(token) and sum(c.isalpha() for c in token) >= 4


def _card_like(m: re.Match) -> bool:
    """13-19 digits, a card-network first digit (2-series only at 16 digits), the Luhn check, and no ID label
    before it ("订单号 2023103012345678" is an order number even where it passes the Luhn check)."""
    digits = re.sub(r"\D", "", m.group(0))
    return ((digits[0] in "3456" or (digits[0] == "2" and len(digits) == 16)) and luhn_ok(digits)
            and not _id_labelled(m))


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


def _inside(tag: str) -> str:
    """The BIO tag of a token that continues the entity `tag` is in (B-X -> I-X; O stays O)."""
    return "I-" + tag[2:] if tag.startswith("B-") else tag


def _search(text: str, spans: list, kind: str, pattern: re.Pattern, check=None) -> str:
    """Appends the matches of `pattern` that pass `check` to `spans` -> `text` with them masked, so that the
    patterns searched later cannot match into them."""
    for m in [m for m in pattern.finditer(text) if check is None or check(m)]:
        start, end = m.span()
        text = text[:start] + _MASK * (end - start) + text[end:]
        spans.append((start, end, kind))
    return text


class PiiRedactor:
    """`redact(text)` -> text with placeholders; `counts[type]` = redactions so far (each occurrence once)."""

    def __init__(self, types: tuple[str, ...] | list[str] = TYPES):
        unknown = set(types) - set(TYPES)
        if unknown:
            raise ValueError(f"unknown PII types {sorted(unknown)}; known: {', '.join(TYPES)}")
        self.types = set(types)
        self.counts: Counter = Counter()

    def find(self, text: str) -> list[tuple[int, int, str]]:
        """Sorted, non-overlapping (start, end, type) spans of the PII in `text`, for the selected types.
        Counts nothing."""
        spans: list[tuple[int, int, str]] = []
        if "secret" in self.types and _LONG_TOKEN.search(text):
            text = _search(text, spans, "secret", _SECRET)
            text = _search(text, spans, "secret", _RANDOM_TOKEN, _random_looking)
        if "email" in self.types and _EMAIL_HINT.search(text):
            text = _search(text, spans, "email", _EMAIL)
        digits = _DIGIT_RUN.search(text) is not None
        if digits:  # dates, times, versions, amounts: no part of them is a card, IP or phone
            text = _mask_not_pii(text)
        if "credit_card" in self.types and digits:
            text = _search(text, spans, "credit_card", _CARD, _card_like)
        if "ip" in self.types:
            if _IPV6_HINT.search(text):
                text = _search(text, spans, "ip", _IPV6, _ipv6_like)
            if digits:
                text = _search(text, spans, "ip", _IPV4)
        if "phone" in self.types and digits:
            text = _search(text, spans, "phone", _PHONE, _phone_like)
            if "+" in text:
                text = _search(text, spans, "phone", _E164)
            _search(text, spans, "phone", _PHONE_DIGITS, _after_phone_word)
        spans.sort()
        return spans

    def _replace(self, text: str, spans: list[tuple[int, int, str]]) -> str:
        """`text` with each span (sorted, from `find`) replaced by its placeholder; counts them."""
        parts, pos = [], 0
        for start, end, kind in spans:
            parts += [text[pos:start], PLACEHOLDERS[kind]]
            pos = end
            self.counts[kind] += 1
        return "".join(parts) + text[pos:]

    def redact(self, text: str) -> str:
        """`text` with each PII string replaced by its type's placeholder; counts them."""
        spans = self.find(text)
        return self._replace(text, spans) if spans else text

    def redact_prefix(self, text: str, limit: int) -> str:
        """`text` cut to its first `limit` characters and redacted; a PII string crossing the cut is replaced
        whole, never kept in part. Only the first `limit` + 256 characters are searched, so a 10 MB text costs
        what a short one does."""
        head = text[:limit + _PREFIX_MARGIN]
        spans = [s for s in self.find(head) if s[0] < limit]
        end = max([limit] + [e for _, e, _ in spans])
        return self._replace(head[:end], spans)

    def redact_tokens(self, tokens: list[str], tags: list[str], spaced: list[bool]) -> tuple[list[str], list[str]]:
        """Redact a tagged token sequence as the text it forms, so PII split over tokens is found.

        The text is the tokens joined by one space where `spaced[i]` (whitespace before token i in the
        source) and by nothing elsewhere. Each PII span becomes one placeholder token; tokens inside a span go,
        tokens partly inside keep their parts outside it. A token's first piece keeps its tag; its later pieces
        (a placeholder that starts inside it, or text after one) continue its entity (B-X -> I-X). So a
        placeholder's tag is that of the token the span starts in. Counts each span once."""
        text, starts = "", []
        for i, tok in enumerate(tokens):
            text += " " if i and spaced[i] else ""
            starts.append(len(text))
            text += tok
        spans = self.find(text)
        if not spans:
            return tokens, tags
        out_tokens, out_tags = [], []
        for tok, tag, start in zip(tokens, tags, starts):
            pieces = self._pieces(text, start, start + len(tok), spans)
            out_tokens += pieces
            out_tags += [tag if j == 0 else _inside(tag) for j in range(len(pieces))]
        return out_tokens, out_tags

    def _pieces(self, text: str, start: int, end: int, spans: list[tuple[int, int, str]]) -> list[str]:
        """The token text[start:end] cut by `spans`: its parts outside them, and the placeholder of each span that
        starts in it (no span starts on a space between tokens, so each placeholder comes once); counts those."""
        pieces, pos = [], start
        for a, b, kind in spans:
            if a >= end or b <= start:
                continue
            if a > pos:
                pieces.append(text[pos:a])
            if a >= start:
                pieces.append(PLACEHOLDERS[kind])
                self.counts[kind] += 1
            pos = max(pos, b)
        return pieces + [text[pos:end]] if pos < end else pieces
