"""One source row -> a clean example or the reason it is rejected: the row-level half of `data prepare`, shared by
the in-memory pipeline (`prepare.py`) and the streaming one (`stream.py`)."""

from __future__ import annotations

import json
import re

from tunelab.config import PrepareOptions
from tunelab.data.clean import Cleaner, dedup_key
from tunelab.data.dataset import dataset_kind
from tunelab.data.pii import PiiRedactor
from tunelab.data.words import split_words

SPLIT_NAMES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
               "val": "validation", "dev": "validation", "test": "test", "testing": "test"}
# Reasons that make a row malformed (as opposed to filtered): `--strict` stops at the first of these.
MALFORMED = {"bad_json", "not_an_object", "bad_csv_row", "wrong_field_count", "text_wrong_type",
             "label_wrong_type", "empty_text", "missing_label", "unknown_label", "unknown_split", "too_long",
             "invalid_utf8", "bad_yaml", "not_a_conversation", "no_conversation", "unknown_role",
             "turn_wrong_type", "empty_turn", "no_user_turn", "no_assistant_turn", "bad_conll_line", "no_tokens",
             "tag_count_mismatch", "bad_tag", "misaligned_span", "bad_entities", "no_query", "no_passage",
             "empty_query", "empty_passage", "query_wrong_type", "passage_wrong_type", "negatives_wrong_type"}
# a retrieval pair's columns by role, the first present in a row taken (`--text-column` / `--label-column` name the
# query and passage columns instead)
PAIR_COLUMNS = {"query": ("query", "question", "anchor"), "passage": ("passage", "answer", "positive"),
                "negatives": ("negatives", "negative")}

def _as_text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


ROLE_NAMES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
              "bot": "assistant", "model": "assistant"}


def to_messages(fields: dict) -> list[dict] | str:
    """Any common chat layout -> [{"role", "content"}], or a rejection reason.

    Accepted: `messages` (OpenAI: role/content), `conversations` (ShareGPT: from/value), `conversation`
    (a list of strings alternating user/assistant, as in chatterbot), or Alpaca's `instruction` (+ `input`)
    and `output`."""
    if isinstance(fields.get("messages"), list):
        turns = [(m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
                 for m in fields["messages"]]
    elif isinstance(fields.get("conversations"), list):
        turns = [(m.get("from"), m.get("value")) if isinstance(m, dict) else (None, None)
                 for m in fields["conversations"]]
    elif isinstance(fields.get("conversation"), list):
        turns = [("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(fields["conversation"])]
    elif "instruction" in fields and "output" in fields:
        prompt = "\n\n".join(str(x) for x in (fields["instruction"], fields.get("input")) if x)
        turns = [("user", prompt), ("assistant", fields["output"])]
    else:
        return "no_conversation"
    messages = []
    for role, content in turns:
        role = ROLE_NAMES.get(str(role).lower()) if role is not None else None
        content = _as_text(content)
        if role is None:
            return "unknown_role"
        if content is None:
            return "turn_wrong_type"
        messages.append({"role": role, "content": content})
    return messages


def to_bio(text: str, entities) -> tuple[list[str], list[str], list[bool]] | str:
    """Text + character spans [{"start", "end", "label"}] -> (words as `split_words` splits them, BIO tags,
    spaced), where `spaced[i]` says whether whitespace comes before word i in `text` (what PII redaction joins
    tokens by). A span must start and end on word boundaries, else "misaligned_span"."""
    if not isinstance(entities, list):
        return "bad_entities"
    words = split_words(text)
    tokens, tags = [w for w, _, _ in words], ["O"] * len(words)
    spaced = [i > 0 and s > words[i - 1][2] for i, (_, s, _) in enumerate(words)]
    starts = {s: i for i, (_, s, _) in enumerate(words)}
    ends = {e: i for i, (_, _, e) in enumerate(words)}
    for e in entities:
        if not (isinstance(e, dict) and isinstance(e.get("start"), int) and isinstance(e.get("end"), int)
                and isinstance(e.get("label"), str)):
            return "bad_entities"
        first, last = starts.get(e["start"]), ends.get(e["end"])
        if first is None or last is None or last < first:
            return "misaligned_span"
        tags[first] = f"B-{e['label']}"
        for i in range(first + 1, last + 1):
            tags[i] = f"I-{e['label']}"
    return tokens, tags, spaced


def repair_bio(tags: list[str], counts) -> list[str]:
    """An I-X that does not continue an X entity starts one (B-X), as seqeval's lenient mode reads it."""
    out = []
    for i, tag in enumerate(tags):
        if tag.startswith("I-") and (i == 0 or out[-1][2:] != tag[2:]):
            counts["bio_repaired"] += 1
            tag = "B-" + tag[2:]
        out.append(tag)
    return out


class RowFilter:
    """Turns one parsed source row into a clean example or a rejection reason.

    Every example has `text` (what de-duplication compares) and `label` (None outside classification);
    `messages` for sft. With PII redaction on, every string an example carries to an output (text, label, chat
    turns, category, NER tokens and entity types) is redacted."""

    def __init__(self, opts: PrepareOptions, text_col: str, label_col: str):
        self.opts, self.text_col, self.label_col = opts, text_col, label_col
        kind = dataset_kind(opts.task)
        self.cleaner = Cleaner(opts.clean, keep_newlines=kind.keeps_newlines)
        self.pii = PiiRedactor(opts.pii.types) if opts.pii.enabled else None
        self.allowed = set(opts.clean.labels) if opts.clean.labels else None
        self.extract = getattr(self, f"_extract_{kind.name}")  # one extractor per dataset kind

    def _redact(self, text: str) -> str:
        return self.pii.redact(text) if self.pii is not None else text

    def _clean(self, text: str) -> str:
        return self._redact(self.cleaner.text(text))

    def _redact_value(self, value):
        """A free-form JSON value (e.g. an sft `category`) with every string in it redacted, keys included;
        a number is replaced by its redacted text only where that holds PII."""
        if isinstance(value, str):
            return self._redact(value)
        if isinstance(value, list):
            return [self._redact_value(v) for v in value]
        if isinstance(value, dict):
            return {self._redact(str(k)): self._redact_value(v) for k, v in value.items()}
        text = _as_text(value)
        redacted = self._redact(text) if text is not None else text
        return value if redacted == text else redacted

    def _extract_text(self, fields: dict) -> tuple[dict | None, str | None]:
        raw = fields.get(self.text_col)
        text = _as_text(raw)
        if raw is not None and text is None:
            return None, "text_wrong_type"
        if text is None:
            return None, "empty_text"
        text = self._clean(text)
        reason = self.cleaner.length_reason(text)
        return (None, reason) if reason else ({"text": text, "label": None}, None)

    def _extract_classification(self, fields: dict) -> tuple[dict | None, str | None]:
        raw_label = fields.get(self.label_col)
        label = _as_text(raw_label)
        if raw_label is not None and label is None:
            return None, "label_wrong_type"
        example, reason = self._extract_text(fields)
        if example is None:
            return None, reason
        if label is None or not label.strip():
            return None, "missing_label"
        label = self.cleaner.label(label)
        if self.allowed is not None and label not in self.allowed:
            return None, "unknown_label"
        example["label"] = self._redact(label)  # after the check: `clean.labels` names labels as written
        return example, None

    def _extract_sft(self, fields: dict) -> tuple[dict | None, str | None]:
        messages = to_messages(fields)
        if isinstance(messages, str):
            return None, messages
        for m in messages:
            m["content"] = self._clean(m["content"])
            if not m["content"]:
                return None, "empty_turn"
        roles = [m["role"] for m in messages if m["role"] != "system"]
        if "user" not in roles or "assistant" not in roles:
            return None, "no_assistant_turn" if "user" in roles else "no_user_turn"
        text = "\n".join(m["content"] for m in messages)
        reason = self.cleaner.length_reason(text)
        if reason:
            return None, reason
        example = {"text": text, "label": None, "messages": messages}
        if "category" in fields:
            example["category"] = self._redact_value(fields["category"])
        return example, None

    def _pair_value(self, fields: dict, role: str):
        """The value of a retrieval row's `role` column: the named column, else the first alias present."""
        named = {"query": self.opts.text_column, "passage": self.opts.label_column}.get(role)
        names = (named,) if named else PAIR_COLUMNS[role]
        return next((fields[n] for n in names if fields.get(n) is not None), None)

    def _pair_text(self, fields: dict, role: str) -> tuple[str | None, str | None]:
        """-> (the cleaned text of a pair's query or passage, None) or (None, the reason it is refused)."""
        raw = self._pair_value(fields, role)
        if raw is None:
            return None, f"no_{role}"
        text = _as_text(raw)
        if text is None:
            return None, f"{role}_wrong_type"
        text = self._clean(text)
        reason = self.cleaner.length_reason(text)
        return (None, f"empty_{role}" if reason == "empty_text" else reason) if reason else (text, None)

    def _extract_retrieval(self, fields: dict) -> tuple[dict | None, str | None]:
        """A (query, passage) pair, with the hard negatives given for it (a string or a list of strings) cleaned,
        the empty ones and those equal to the passage left out."""
        query, reason = self._pair_text(fields, "query")
        passage, reason = (None, reason) if query is None else self._pair_text(fields, "passage")
        if passage is None:
            return None, reason
        raw = self._pair_value(fields, "negatives")
        raw = [raw] if isinstance(raw, str) else raw if raw is not None else []
        if not isinstance(raw, list) or any(_as_text(n) is None for n in raw):
            return None, "negatives_wrong_type"
        negatives = list(dict.fromkeys(n for n in (self._clean(_as_text(x)) for x in raw) if n and n != passage))
        example = {"text": f"{query}\n{passage}", "label": None, "query": query, "passage": passage,
                   "_pair": json.dumps([dedup_key(query), dedup_key(passage)], ensure_ascii=False)}
        if negatives:
            example["negatives"] = negatives
        return example, None

    def excerpt_source(self, fields: dict | None, text_col: str):
        """The source value a rejected row is recognised by: its text column (a retrieval pair: its query)."""
        if not fields:
            return None
        return self._pair_value(fields, "query") if self.extract == self._extract_retrieval else fields.get(text_col)

    def _ner_source(self, fields: dict) -> tuple[list, list, list[bool]] | str:
        """-> (tokens, tags, spaced) as given (tokens + tags) or built from text + entity spans, or a reason."""
        if isinstance(fields.get("tokens"), list):
            tokens = fields["tokens"]
            tags = fields.get("tags", fields.get("ner_tags"))
            if not isinstance(tags, list) or len(tags) != len(tokens):
                return "tag_count_mismatch"
            return tokens, tags, [True] * len(tokens)
        if isinstance(fields.get(self.text_col), str):
            return to_bio(fields[self.text_col], fields.get("entities", []))
        return "no_tokens"

    def _extract_ner(self, fields: dict) -> tuple[dict | None, str | None]:
        source = self._ner_source(fields)
        if isinstance(source, str):
            return None, source
        clean_tokens, clean_tags, clean_spaced, spaced = [], [], [], False
        for tok, tag, space_before in zip(*source):
            tok = _as_text(tok)
            if tok is None or not isinstance(tag, str) or not re.fullmatch(r"O|[BI]-\S+", tag):
                return None, "bad_tag" if tok is not None else "text_wrong_type"
            tok = self.cleaner.text(tok).replace(" ", "")
            spaced = spaced or space_before  # a token cleaned away leaves its whitespace to the next one
            # given tokens are re-split by the rule raw text is split by at prediction time ("$5.2" -> "$", "5",
            # ".", "2"), so that a model is trained on the words it will be applied to; the pieces inherit the tag
            for k, (piece, _, _) in enumerate(split_words(tok)):
                clean_tokens.append(piece)
                kind = tag if tag == "O" else ("I-" if k else tag[:2]) + self._redact(tag[2:])
                clean_tags.append(kind)
                clean_spaced.append(spaced)
                spaced = False
        if not clean_tokens:
            return None, "no_tokens"
        if self.pii is not None:  # over the whole sentence: PII split over tokens is found too
            clean_tokens, clean_tags = self.pii.redact_tokens(clean_tokens, clean_tags, clean_spaced)
        clean_tags = repair_bio(clean_tags, self.cleaner.counts)
        text = " ".join(clean_tokens)
        return {"text": text, "label": None, "tokens": clean_tokens, "tags": clean_tags}, None

    def __call__(self, row) -> tuple[dict | None, str | None]:
        if row.error:
            return None, row.error
        if row.invalid_utf8 and self.opts.strict:
            return None, "invalid_utf8"
        out, reason = self.extract(row.fields)
        if out is None:
            return None, reason
        out["_line"] = row.line
        if self.opts.split_column:
            split = SPLIT_NAMES.get(str(row.fields.get(self.opts.split_column, "")).strip().lower())
            if split is None:
                return None, "unknown_split"
            out["_split"] = split
        return out, None


def _excerpt(raw: str | None, pii: PiiRedactor | None, limit: int = 500) -> str | None:
    """Enough of a rejected row's source text to recognise the row (a 10 MB row stays in its source file),
    redacted when `pii` is given."""
    if not raw:
        return raw
    return pii.redact_prefix(raw, limit) if pii is not None else raw[:limit]
