"""`tunelab data prepare`: source -> dataset dir, with every row accounted for.

Pipeline: read -> pick text/label columns -> clean (ftfy, Unicode, invisible characters, social
text, whitespace) -> redact PII -> length and label checks -> exact de-dup -> near de-dup (MinHash
LSH) -> optional seeded sample -> split (stratified and group-aware, or an existing split column) ->
write `train/validation/test.jsonl`, `rejected.jsonl` (source line + reason for every dropped row),
`conflicts.json` (identical texts with different labels), `near_duplicates.jsonl` (each group) and
`dataset.json`. Invariant, checked before writing: rows_read == rows_kept + sum(dropped.values()).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

from tunelab import __version__
from tunelab.artifacts import FolderLock, check_target, write_folder
from tunelab.assets import DATASET_COLUMNS, builtin_path, is_builtin
from tunelab.config import PrepareOptions
from tunelab.data.augment import augment
from tunelab.data.clean import Cleaner, dedup_key
from tunelab.data.dataset import DATASET_FILE, SPLITS, dataset_kind, fingerprint, write_jsonl
from tunelab.data.dedup import exact_dedup
from tunelab.data.neardup import near_duplicates
from tunelab.data.pii import PiiRedactor
from tunelab.data.read import read_rows
from tunelab.data.split import group_split, sample_rows
from tunelab.data.words import split_words
from tunelab.errors import UserError

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
NOT_A_DROP = {"not_sampled"}  # chosen by the user; does not count towards the drop rate


def resolve_source(source: str, opts: PrepareOptions) -> tuple[Path, str, str]:
    """-> (file path, text column, label column); built-in datasets know their own columns.

    `builtin:chatterbot` is the English dialogues; `builtin:chatterbot/LANGUAGE` another language."""
    if source.startswith("builtin:chatterbot"):
        language = source.partition("/")[2] or "english"
        path = builtin_path("builtin:chatterbot") / language
        if not path.is_dir():
            known = sorted(p.name for p in path.parent.iterdir() if p.is_dir())
            raise UserError(f"no chatterbot language '{language}'; known: {', '.join(known)}")
        return path, opts.text_column or "text", opts.label_column or "label"
    if is_builtin(source):
        path = builtin_path(source)
        cols = DATASET_COLUMNS.get(source.removeprefix("builtin:"))
        if cols is None:
            raise UserError(f"{source} is not a dataset")
        return path, opts.text_column or cols["text"], opts.label_column or cols["label"]
    return Path(source), opts.text_column or "text", opts.label_column or "label"


def _check_columns(path: Path, columns: list[str], wanted: dict[str, str | None]) -> None:
    for role, col in wanted.items():
        if col and columns and col not in columns:
            raise UserError(f"{path}: no {role} column '{col}'; columns are: {', '.join(columns)} "
                            f"(choose with --{role}-column)")


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


def collect_rows(path: Path, text_col: str, label_col: str, opts: PrepareOptions
                 ) -> tuple[list[dict], list[dict], dict]:
    """Read, clean and check -> (rows kept so far, rejected rows, counters). Rows carry `_line`.

    A rejected row keeps a redacted excerpt of its source text. Those redactions are not counted in `pii.*`:
    the counters count what redaction did to the rows it cleaned, and a row cleaned then rejected would count
    twice."""
    columns, rows = read_rows(path)
    named = {"text": text_col, "label": label_col}
    wanted = {role: named[role] for role in dataset_kind(opts.task).columns}
    _check_columns(path, columns, {**wanted, "split": opts.split_column})
    keep = RowFilter(opts, text_col, label_col)
    excerpt_pii = PiiRedactor(opts.pii.types) if opts.pii.enabled else None
    kept, rejected = [], []
    counters: Counter = Counter()
    for row in rows:
        counters["rows_read"] += 1
        counters["invalid_utf8_replaced"] += row.invalid_utf8
        example, reason = keep(row)
        if example is not None:
            kept.append(example)
            continue
        if opts.strict and reason in MALFORMED:
            raise UserError(f"{path}:{row.line}: {reason} (--strict stops at the first malformed row)")
        raw = _as_text(keep.excerpt_source(row.fields, text_col))
        rejected.append({"line": row.line, "reason": reason, "text": _excerpt(raw, excerpt_pii)})
    counters.update({f"clean.{k}": v for k, v in keep.cleaner.counts.items()})
    if keep.pii is not None:
        counters.update({f"pii.{k}": v for k, v in keep.pii.counts.items()})
    return kept, rejected, counters


def _excerpt(raw: str | None, pii: PiiRedactor | None, limit: int = 500) -> str | None:
    """Enough of a rejected row's source text to recognise the row (a 10 MB row stays in its source file),
    redacted when `pii` is given."""
    if not raw:
        return raw
    return pii.redact_prefix(raw, limit) if pii is not None else raw[:limit]


def token_length_filter(rows: list[dict], cfg) -> tuple[list[dict], dict[str, list[dict]]]:
    """Drop rows outside [min_tokens, max_tokens] counted with `cfg.tokenizer` -> (kept, {reason: rows})."""
    from tunelab.models import load_tokenizer  # loads torch (~1.2 s): only a token-length filter needs it

    tok = load_tokenizer(cfg.tokenizer)
    kept, dropped = [], {"too_short_tokens": [], "too_long_tokens": []}
    batch = 4096
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        ids = tok([r["text"] for r in chunk], add_special_tokens=False, return_attention_mask=False,
                  return_token_type_ids=False)["input_ids"]
        for r, n in zip(chunk, map(len, ids)):
            if cfg.min_tokens and n < cfg.min_tokens:
                dropped["too_short_tokens"].append(r)
            elif cfg.max_tokens and n > cfg.max_tokens:
                dropped["too_long_tokens"].append(r)
            else:
                kept.append(r)
    return kept, dropped


def near_dedup(rows: list[dict], opts: PrepareOptions) -> tuple[list[dict], list[dict], list[dict], int]:
    """-> (kept rows with `_group`, dropped near-duplicates, group records, LSH candidate count).

    A group whose labels agree keeps its first row (`near_action: drop`) or all rows (`group`); a
    group with conflicting labels keeps all its rows. Kept members of a group share `_group`, so the
    split puts them on the same side."""
    d, kind = opts.dedup, dataset_kind(opts.task)
    res = near_duplicates([r[kind.near_on] for r in rows], d.threshold, d.ngram, d.num_perm, opts.seed + 1)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(res.group.tolist()):
        members.setdefault(g, []).append(i)
    kept_idx, dropped, groups = [], [], []
    for g, idx in members.items():
        if len(idx) == 1:
            kept_idx.append(idx[0])
            continue
        labels = sorted({rows[i]["label"] for i in idx})
        conflict = len(labels) > 1
        keep_all = conflict or (kind.near_action or d.near_action) == "group"
        kept_idx += idx if keep_all else idx[:1]
        dropped += [] if keep_all else [rows[i] for i in idx[1:]]
        groups.append({"lines": [rows[i]["_line"] for i in idx], "labels": labels,
                       "conflicting_labels": conflict, "kept": "all" if keep_all else rows[idx[0]]["_line"]})
    kept = []
    for i in sorted(kept_idx):
        rows[i]["_group"] = int(res.group[i])
        kept.append(rows[i])
    return kept, dropped, groups, res.candidates


def join_groups(rows: list[dict], field: str) -> None:
    """Give rows whose `field` texts are the same (case- and whitespace-insensitive), or that share a near-duplicate
    `_group`, one `_group` (in place, transitively): the split keeps each group on one side."""
    parent = list(range(len(rows)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple, int] = {}
    for i, r in enumerate(rows):
        keys = [("field", dedup_key(r[field]))] + ([("near", r["_group"])] if "_group" in r else [])
        for key in keys:
            parent[root(i)] = root(first.setdefault(key, i))
    for i, r in enumerate(rows):
        r["_group"] = ("joined", root(i))


def _check_drop_rate(report: dict, opts: PrepareOptions, path: Path) -> None:
    dropped = {k: v for k, v in report["dropped"].items() if k not in NOT_A_DROP}
    rate = sum(dropped.values()) / max(1, report["rows_read"])
    if rate > opts.max_drop_rate:
        top = ", ".join(f"{k}={v:,}" for k, v in Counter(dropped).most_common(3))
        raise UserError(f"{path}: {rate:.1%} of {report['rows_read']:,} rows would be dropped (limit "
                        f"{opts.max_drop_rate:.0%}; raise it with --max-drop-rate); top reasons: {top}")


def prepare(source: str, out: str | Path, opts: PrepareOptions | None = None, overwrite: bool = False) -> dict:
    """Build a dataset dir from `source` and return its `dataset.json` content.

    `out` follows the folder rule (tunelab.artifacts): a folder tunelab did not write is refused, an existing
    dataset is replaced only with `overwrite`, and then only once the new one is complete. The dataset dir
    is locked for the whole run (one writer)."""
    opts = opts or PrepareOptions()
    out = Path(out)
    check_target(out, "dataset", overwrite=True)  # a folder tunelab did not write: refused before the work
    with FolderLock(out):
        check_target(out, "dataset", overwrite)  # an earlier dataset: decided holding the lock
        return _prepare(source, out, opts, overwrite)


def _prepare(source: str, out: Path, opts: PrepareOptions, overwrite: bool) -> dict:
    path, text_col, label_col = resolve_source(source, opts)
    rows, rejected, counters = collect_rows(path, text_col, label_col, opts)

    def reject(dropped: list[dict], reason: str) -> None:
        rejected.extend({"line": r["_line"], "reason": reason, "text": r["text"]} for r in dropped)

    conflicts, groups, candidates = [], [], 0
    if opts.clean.min_tokens or opts.clean.max_tokens:
        rows, too_short_or_long = token_length_filter(rows, opts.clean)
        for reason, dropped in too_short_or_long.items():
            reject(dropped, reason)
    kind = dataset_kind(opts.task)
    if opts.dedup.exact:
        rows, dup_dropped, conflicts = exact_dedup(rows, kind.dedup_on)
        for reason, dropped in dup_dropped.items():
            reject(dropped, reason)
    if opts.dedup.near and rows:
        rows, near_dropped, groups, candidates = near_dedup(rows, opts)
        reject(near_dropped, "near_duplicate")
    if opts.max_rows:
        rows, rest = sample_rows(rows, opts.max_rows, "label", opts.seed)
        reject(rest, "not_sampled")
    if not rows:
        reasons = Counter(r["reason"] for r in rejected).most_common(3)
        raise UserError(f"no usable rows in {path} (read {counters['rows_read']}; dropped: "
                        + ", ".join(f"{k}={v}" for k, v in reasons) + ")")
    if kind.group_by:
        join_groups(rows, kind.group_by)
    splits, augmentation = _split(rows, opts)
    labels = kind.label_set(rows)
    report = _report(counters, rows, rejected, conflicts, groups, candidates, augmentation)
    _check_drop_rate(report, opts, path)
    meta = {
        "kind": "dataset", "task": kind.name, "fields": list(kind.fields), "labels": labels,
        "splits": {name: len(splits[name]) for name in SPLITS},
        "class_balance": {name: dict(sorted(Counter(r["label"] for r in splits[name]).items()))
                          for name in SPLITS} if kind.labelled else {},
        "fingerprint": fingerprint(splits),
        "source": {"path": str(source) if is_builtin(source) else str(path.resolve()),
                   "text_column": text_col, "label_column": label_col},
        "options": opts.model_dump(mode="json"),
        "report": report, "warnings": dataset_warnings(opts, labels, splits, label_col),
        "tunelab_version": __version__,
    }
    with write_folder(out, "dataset", overwrite) as tmp:
        for name in SPLITS:
            write_jsonl(tmp / f"{name}.jsonl", (kind.output_row(r) for r in splits[name]))
        write_jsonl(tmp / "rejected.jsonl", sorted(rejected, key=lambda r: r["line"]))
        write_jsonl(tmp / "near_duplicates.jsonl", groups)
        (tmp / "conflicts.json").write_text(json.dumps(conflicts, ensure_ascii=False, indent=1))
        (tmp / DATASET_FILE).write_text(json.dumps(meta, ensure_ascii=False, indent=2))
    return meta


def _split(rows: list[dict], opts: PrepareOptions) -> tuple[dict[str, list[dict]], dict | None]:
    """The splits (an existing split column, or stratified by label for classification and random otherwise,
    near-duplicate groups kept together), and the train split's augmentation when asked -> (splits, its report)."""
    if opts.split_column:
        splits = {name: [r for r in rows if r["_split"] == name] for name in SPLITS}
    else:
        splits = group_split(rows, "label", opts.val_ratio, opts.test_ratio, opts.seed)
    if not opts.augment.enabled:
        return splits, None
    if not dataset_kind(opts.task).labelled:
        raise UserError("augment.enabled works for --task classification only")
    new_rows, augmentation = augment(splits["train"], opts.augment, opts.seed)
    merged = splits["train"] + new_rows
    order = np.random.default_rng(opts.seed).permutation(len(merged))
    splits["train"] = [merged[i] for i in order]
    return splits, augmentation


def _report(counters: Counter, rows: list[dict], rejected: list[dict], conflicts: list, groups: list[dict],
            candidates: int, augmentation: dict | None) -> dict:
    """The preparation's accounting: rows read, kept and dropped by reason, what cleaning and redaction changed,
    duplicates; checked to add up (rows read == kept + dropped)."""
    dropped = dict(Counter(r["reason"] for r in rejected).most_common())
    report = {"rows_read": counters["rows_read"], "rows_kept": len(rows), "dropped": dropped,
              "repaired": {"invalid_utf8_replaced": counters["invalid_utf8_replaced"]},
              "steps": {k: v for k, v in sorted(counters.items()) if k.startswith("clean.")},
              "pii": {k.removeprefix("pii."): v for k, v in sorted(counters.items()) if k.startswith("pii.")},
              "duplicates": {"exact_dropped": dropped.get("duplicate", 0),
                             "exact_conflicting_groups": len(conflicts),
                             "near_groups": len(groups), "near_dropped": dropped.get("near_duplicate", 0),
                             "near_conflicting_groups": sum(g["conflicting_labels"] for g in groups),
                             "near_candidates_checked": candidates}}
    if augmentation is not None:
        report["augmentation"] = augmentation  # extra train rows; not part of rows_read / rows_kept
    if report["rows_read"] != report["rows_kept"] + sum(dropped.values()):
        raise AssertionError(f"row accounting does not add up: {report}")
    return report


MIN_ROWS = 100  # fewer rows in all: scores move by whole points with one row, and a fine-tuned model rarely learns
MIN_LABEL_TRAIN_ROWS = 2  # fewer train rows of a label: the model cannot learn it, and a baseline can't either


def dataset_warnings(opts: PrepareOptions, labels: list[str], splits: dict[str, list[dict]],
                     label_column: str | None = None) -> list[str]:
    """What makes the dataset unable to support its task (one sentence each, with what to do), or []:
    a single label (classification) or no entity tags (ner), a label with fewer than MIN_LABEL_TRAIN_ROWS
    train rows, an empty split, fewer than MIN_ROWS rows in all. Written into `dataset.json` as `warnings`."""
    out, kind = [], dataset_kind(opts.task)
    if kind.labelled and len(labels) == 1:
        column = label_column or opts.label_column or "label"
        out.append(f"only one label ('{labels[0]}'): a classifier needs at least two, and `tunelab train` refuses "
                   f"this dataset; check the label column ('{column}'; another with --label-column) or add rows "
                   "of the other labels")
    elif kind.labelled:
        counts = Counter(r["label"] for r in splits["train"])
        rare = [label for label in labels if counts[label] < MIN_LABEL_TRAIN_ROWS]
        if rare:
            out.append(f"too few train rows (fewer than {MIN_LABEL_TRAIN_ROWS}) for {len(rare)} label(s): "
                       + ", ".join(f"'{label}' ({counts[label]})" for label in rare[:5])
                       + (", ..." if len(rare) > 5 else "")
                       + ": a model cannot learn a label from that; add rows of it, or drop it")
    if kind.tagged and labels == ["O"]:
        out.append("no entity tags (every token is O): a token classifier has nothing to learn")
    total = sum(len(rows) for rows in splits.values())
    needs = {"train": "`tunelab train` has nothing to train on",
             "validation": "`tunelab train` needs validation rows to choose its best step",
             "test": "`tunelab eval` has nothing to score (it would need --split validation, which chose the model)"}
    for name, flag in (("train", None), ("validation", "--val-ratio"), ("test", "--test-ratio")):
        if splits[name]:
            continue
        if opts.split_column:
            why, fix = f"no row has split '{name}' in column '{opts.split_column}'", "label some rows as " + name
        elif flag and getattr(opts, flag[2:].replace("-", "_")) == 0:
            why, fix = f"{flag} 0", f"raise {flag} (e.g. 0.1)"
        else:
            why, fix = f"{total:,} rows are too few to cut it", "add rows"
        out.append(f"the {name} split is empty ({why}): {needs[name]}; {fix}")
    if total < MIN_ROWS:
        per = " per label" if kind.labelled else ""
        out.append(f"only {total:,} rows in all: too few to fine-tune or to compare with a baseline (a score moves "
                   f"by whole points with one row); a few hundred rows{per} is a usual minimum")
    return out
