"""`tunelab recommend prepare`: interactions and item metadata → an interactions dir (kind "interactions").

The folder holds `items.jsonl` (every item: its id, the text the text models read, its categories),
`train.jsonl`, `validation.jsonl`, `test.jsonl` (warm interactions: user, item, rating, timestamp),
`cold_test.jsonl` (the interactions with the cold items, which no other split holds), `rejected.jsonl` (source
line and reason for every dropped row) and `tunelab.json` (counts, how it was split, the fingerprint).

Splits never leak the future. `leave-last-out`: each user's interactions ordered by time (ties kept in file
order, so the order is the same on every run) — the last one is the test row, the one before it the validation
row, the rest train; a user with fewer than three stays whole in train. `time`: one global cut — the latest
`test_fraction` of interactions are test, the `validation_fraction` before them validation; a test or validation
row whose item never appears earlier is rejected (its reason in `rejected.jsonl`). Cold items (a seeded random
`cold_items` share of the catalogue's interacted items) are removed from every warm split before it is made; the
cold-start evaluation reads each user's history only up to their cold targets (`Interactions.cold_cases`).

`Interactions` is what the models and the evaluation read: integer user and item indices, each user's history
as an array ordered by time.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from tunelab.artifacts import META_FILE, kind_of, write_folder
from tunelab.assets import builtin_path, is_builtin
from tunelab.data.dataset import write_jsonl
from tunelab.data.read import read_delimited, read_rows
from tunelab.errors import UserError, read_json_file

KIND = "interactions"
SPLITS = ("train", "validation", "test", "cold_test")
USER_COLUMNS = ("user", "user_id", "userid", "uid", "customer_id", "visitor_id")
ITEM_COLUMNS = ("item", "item_id", "itemid", "iid", "movie_id", "movieid", "product_id", "article_id")
RATING_COLUMNS = ("rating", "score", "stars", "value")
TIME_COLUMNS = ("timestamp", "time", "ts", "date", "datetime", "created_at")
TITLE_COLUMNS = ("title", "movie_title", "name", "product_name")
CATEGORY_COLUMNS = ("genres", "genre", "class", "category", "categories", "tags")


@dataclass
class PrepareSpec:
    """How to read and split. Column names None = found among the usual names (case-insensitive)."""

    interactions: str
    items: str | None = None
    user_col: str | None = None
    item_col: str | None = None
    rating_col: str | None = None
    time_col: str | None = None
    item_id_col: str | None = None
    text_cols: list[str] | None = None  # the item text: these columns, in order (default: every text column)
    category_col: str | None = None
    split: str = "leave-last-out"  # or "time"
    validation_fraction: float = 0.1  # split "time" only
    test_fraction: float = 0.1
    cold_items: float = 0.1
    min_rating: float | None = None  # interactions rated below it are not positives (dropped, counted)
    seed: int = 0
    max_drop_rate: float = 0.2  # fail when more rows than this are bad (below min_rating is chosen, not bad)


def _builtin_files(ref: str) -> tuple[Path, Path]:
    folder = builtin_path(ref)
    if ref.removeprefix("builtin:") != "movielens-100k":
        raise UserError(f"{ref} is not interaction data; the built-in interaction data is builtin:movielens-100k")
    return folder / "ml-100k.inter", folder / "ml-100k.item"


def _open(path: str | Path):
    """(columns, rows) of a CSV/TSV/JSONL/Parquet file, or of a RecBole atomic file (`.inter`, `.item`: TSV whose
    header names carry a `:type` suffix, which is dropped)."""
    path = Path(path)
    if path.suffix in (".inter", ".item", ".user"):
        columns, rows = read_delimited(path, "\t")
        strip = {c: c.split(":")[0] for c in columns}
        return list(strip.values()), ({**r.__dict__, "fields": {strip[k]: v for k, v in r.fields.items()}}
                                      for r in rows)
    columns, rows = read_rows(path)
    return columns, (r.__dict__ for r in rows)


def _column(columns: list[str], given: str | None, names: tuple[str, ...], what: str, path, required: bool):
    if given is not None:
        if given not in columns:
            raise UserError(f"{path} has no column '{given}' (the {what}); its columns: {', '.join(columns)}")
        return given
    lower = {c.lower(): c for c in columns}
    found = next((lower[n] for n in names if n in lower), None)
    if found is None and required:
        raise UserError(f"{path}: no {what} column found (looked for {', '.join(names)}); name it with the "
                        f"--{what.replace(' ', '-')}-column option. Its columns: {', '.join(columns)}")
    return found


def _time_value(value) -> float | None:
    """Seconds since the epoch from a number or an ISO date/time; None when it is neither."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) if math.isfinite(value) else None
    text = str(value).strip()
    try:
        number = float(text)
        return number if math.isfinite(number) else None
    except ValueError:
        pass
    try:
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)).timestamp()  # naive = UTC, everywhere


def _key(value) -> str | None:
    """An id as text: ints written the same whether they came as 7, 7.0 or "7"; empty → None."""
    if value is None or isinstance(value, (dict, list, bool)):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    text = str(value).strip()
    return text or None


@dataclass
class _Read:
    rows: list[tuple[str, str, float | None, float, int]] = field(default_factory=list)  # user, item, rating, t, line
    rejected: list[dict] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    read: int = 0  # source rows seen, counted apart from what was kept or rejected

    def reject(self, line: int, reason: str, excerpt: str = "") -> None:
        self.rejected.append({"line": line, "reason": reason, "row": excerpt[:200]})
        self.counts[reason] = self.counts.get(reason, 0) + 1


def _read_interactions(path, spec: PrepareSpec) -> _Read:
    columns, rows = _open(path)
    user_col = _column(columns, spec.user_col, USER_COLUMNS, "user", path, True)
    item_col = _column(columns, spec.item_col, ITEM_COLUMNS, "item", path, True)
    rating_col = _column(columns, spec.rating_col, RATING_COLUMNS, "rating", path, False)
    time_col = _column(columns, spec.time_col, TIME_COLUMNS, "time", path, False)
    out = _Read()
    for row in rows:
        out.read += 1
        line, fields = row["line"], row["fields"]
        if row["error"]:
            out.reject(line, row["error"])
            continue
        user, item = _key(fields.get(user_col)), _key(fields.get(item_col))
        excerpt = json.dumps(fields, ensure_ascii=False, default=str)
        if user is None or item is None:
            out.reject(line, "missing_user" if user is None else "missing_item", excerpt)
            continue
        rating = None
        if rating_col is not None:
            rating = _time_value(fields.get(rating_col)) if fields.get(rating_col) not in (None, "") else None
            if rating is None:
                out.reject(line, "bad_rating", excerpt)
                continue
            if spec.min_rating is not None and rating < spec.min_rating:
                out.reject(line, "below_min_rating", excerpt)
                continue
        t = float(line)  # no time column: file order is the order of events
        if time_col is not None:
            t = _time_value(fields.get(time_col))
            if t is None:
                out.reject(line, "bad_timestamp", excerpt)
                continue
        out.rows.append((user, item, rating, t, line))
    out.rows.sort(key=lambda r: (r[3], r[4]))
    first = {}
    for r in out.rows:  # implicit feedback: a user-item pair counts once, at its earliest time
        if (r[0], r[1]) in first:
            out.reject(r[4], "repeated_interaction", json.dumps({"user": r[0], "item": r[1], "time": r[3]}))
        else:
            first[(r[0], r[1])] = r
    out.rows = list(first.values())
    if not out.rows:
        raise UserError(f"{path}: no usable interactions ({', '.join(f'{k}: {v}' for k, v in out.counts.items())})")
    return out


def _read_items(path, spec: PrepareSpec) -> tuple[dict[str, dict], dict[str, int]]:
    """item id → {title, text, categories} from the metadata file; counts of rows skipped by reason."""
    columns, rows = _open(path)
    id_col = _column(columns, spec.item_id_col, ITEM_COLUMNS, "item id", path, True)
    title_col = _column(columns, None, TITLE_COLUMNS, "title", path, False)
    cat_col = _column(columns, spec.category_col, CATEGORY_COLUMNS, "category", path, False)
    text_cols = spec.text_cols or [c for c in columns if c != id_col]
    for c in text_cols:
        _column(columns, c, (), "text", path, True)
    items, skipped = {}, {}
    for row in rows:
        key = _key(row["fields"].get(id_col)) if not row["error"] else None
        if key is None or key in items:
            reason = row["error"] or ("missing_item" if key is None else "repeated_item")
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        f = row["fields"]
        parts = [_text(f.get(c)) for c in text_cols]
        items[key] = {"title": _text(f.get(title_col)) if title_col else "",
                      "text": " · ".join(p for p in parts if p),
                      "categories": _categories(f.get(cat_col)) if cat_col else []}
    return items, skipped


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(_text(v) for v in value)
    return " ".join(str(value).split())


def _categories(value) -> list[str]:
    if isinstance(value, list):
        return [str(v).strip() for v in value if str(v).strip()]
    text = _text(value)
    for sep in ("|", ",", ";"):
        if sep in text:
            return [p.strip() for p in text.split(sep) if p.strip()]
    return text.split()


def _ordered(rows: list[tuple]) -> dict[str, list[tuple]]:
    """Each user's rows by (time, source line): ties in time keep file order."""
    by_user: dict[str, list[tuple]] = {}
    for r in sorted(rows, key=lambda r: (r[3], r[4])):
        by_user.setdefault(r[0], []).append(r)
    return by_user


def _leave_last_out(rows: list[tuple]) -> tuple[dict[str, list[tuple]], dict[str, int]]:
    splits = {s: [] for s in SPLITS[:3]}
    short = 0
    for events in _ordered(rows).values():
        if len(events) < 3:
            splits["train"] += events
            short += 1
            continue
        splits["train"] += events[:-2]
        splits["validation"].append(events[-2])
        splits["test"].append(events[-1])
    return splits, {"users_too_short_for_test": short}


def _time_cut(rows: list[tuple], spec: PrepareSpec, read: _Read) -> tuple[dict[str, list[tuple]], dict[str, int]]:
    """One global cut; a validation or test row whose item nobody picked before it is rejected (a cold item
    outside the cold split), with its reason in `rejected.jsonl`."""
    ordered = sorted(rows, key=lambda r: (r[3], r[4]))
    n = len(ordered)
    n_test, n_val = int(round(n * spec.test_fraction)), int(round(n * spec.validation_fraction))
    train, val, test = ordered[:n - n_test - n_val], ordered[n - n_test - n_val:n - n_test], ordered[n - n_test:]
    known, counts, kept = {r[1] for r in train}, {}, {}
    for name, part in (("validation", val), ("test", test)):
        reason = f"{name}_item_unseen_before"
        counts[reason] = 0
        for r in part:
            if r[1] not in known:
                read.rejected.append({"line": r[4], "reason": reason, "row": json.dumps({"user": r[0], "item": r[1]})})
                counts[reason] += 1
        kept[name] = [r for r in part if r[1] in known]
        known |= {r[1] for r in kept[name]}
    return {"train": train, **kept}, counts


def prepare(spec: PrepareSpec, out: str | Path, overwrite: bool = False) -> dict:
    """Read, clean, split and write the interactions dir; returns its `tunelab.json`."""
    inter_path, items_path = spec.interactions, spec.items
    if is_builtin(spec.interactions):
        inter_path, builtin_items = _builtin_files(spec.interactions)
        items_path = items_path or builtin_items
    if spec.split not in ("leave-last-out", "time"):
        raise UserError(f"unknown split '{spec.split}'; choose leave-last-out or time")
    for name in ("validation_fraction", "test_fraction", "cold_items"):
        if not 0 <= getattr(spec, name) < 0.5:
            raise UserError(f"{name.replace('_', '-')} must be in [0, 0.5), not {getattr(spec, name)}")
    if spec.split == "time" and min(spec.validation_fraction, spec.test_fraction) <= 0:
        raise UserError("--split time needs a validation and a test share above 0 (models are chosen on "
                        "validation and scored on test)")
    read = _read_interactions(inter_path, spec)
    bad = sum(v for k, v in read.counts.items() if k not in ("below_min_rating", "repeated_interaction"))
    if bad > spec.max_drop_rate * max(1, read.read):
        top = ", ".join(f"{k}={v:,}" for k, v in sorted(read.counts.items(), key=lambda kv: -kv[1])[:3])
        raise UserError(f"{inter_path}: {bad / read.read:.1%} of {read.read:,} rows are unusable (limit "
                        f"{spec.max_drop_rate:.0%}; raise it with --max-drop-rate); top reasons: {top}")
    items, item_skips = _read_items(items_path, spec) if items_path else ({}, {})
    interacted = sorted({r[1] for r in read.rows})
    rng = np.random.default_rng(spec.seed)
    n_cold = int(round(len(interacted) * spec.cold_items))
    cold = set(rng.choice(np.array(interacted, dtype=object), size=n_cold, replace=False).tolist()) if n_cold else set()
    warm_rows = [r for r in read.rows if r[1] not in cold]
    splits, split_counts = (_leave_last_out(warm_rows) if spec.split == "leave-last-out"
                            else _time_cut(warm_rows, spec, read))
    splits["cold_test"] = sorted((r for r in read.rows if r[1] in cold), key=lambda r: (r[0], r[3], r[4]))
    catalogue = interacted + sorted(set(items) - set(interacted))
    meta = {"kind": KIND, "source": {"interactions": str(spec.interactions), "items": str(items_path or "")},
            "split": spec.split, "seed": spec.seed, "cold_items": spec.cold_items,
            "validation_fraction": spec.validation_fraction, "test_fraction": spec.test_fraction,
            "min_rating": spec.min_rating,
            "counts": {"rows_read": read.read, "interactions": len(read.rows),
                       "rejected": dict(sorted(read.counts.items())), "users": len({r[0] for r in read.rows}),
                       "items": len(catalogue), "items_interacted": len(interacted), "cold_items": len(cold),
                       "items_without_metadata": sum(i not in items for i in interacted) if items_path else None,
                       "metadata_rows_skipped": item_skips, **split_counts,
                       **{f"{s}_rows": len(splits[s]) for s in SPLITS}}}
    item_rows = [{"item": i, "cold": i in cold, **items.get(i, {"title": "", "text": "", "categories": []})}
                 for i in catalogue]
    meta["fingerprint"] = _fingerprint(splits, item_rows)
    with write_folder(out, KIND, overwrite) as tmp:
        write_jsonl(tmp / "items.jsonl", item_rows)
        for name in SPLITS:
            write_jsonl(tmp / f"{name}.jsonl", ({"user": u, "item": i, "rating": r, "timestamp": t}
                                                for u, i, r, t, _ in splits[name]))
        write_jsonl(tmp / "rejected.jsonl", read.rejected)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return meta


def _fingerprint(splits: dict, item_rows: list[dict]) -> str:
    h = hashlib.sha256()
    for name in SPLITS:
        for u, i, r, t, _ in splits[name]:
            h.update(json.dumps([name, u, i, r, t]).encode())
    for row in item_rows:
        h.update(json.dumps(row, ensure_ascii=False, sort_keys=True).encode())
    return h.hexdigest()[:16]


# ---- reading an interactions dir ---------------------------------------------------------------------

@dataclass
class Interactions:
    """An interactions dir in memory: ids ↔ indices, item texts and categories, and the splits as index arrays."""

    path: Path
    meta: dict
    items: list[dict]  # catalogue order = item index
    item_index: dict[str, int]
    users: list[str]
    user_index: dict[str, int]
    splits: dict[str, dict[str, np.ndarray]]  # split → {"user", "item", "timestamp"} int/float arrays
    cold: np.ndarray  # bool per item

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_users(self) -> int:
        return len(self.users)

    def histories(self, *names: str) -> list[np.ndarray]:
        """Per user index: the item indices of these splits' interactions, ordered by time (then split order)."""
        return [items for items, _ in self.events(*names)]

    def events(self, *names: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per user index: (item indices, timestamps) of these splits' interactions, by time (then split order)."""
        parts = [self.splits[n] for n in names]
        user = np.concatenate([p["user"] for p in parts])
        item = np.concatenate([p["item"] for p in parts])
        ts = np.concatenate([p["timestamp"] for p in parts])
        rank = np.concatenate([np.full(len(p["user"]), k) for k, p in enumerate(parts)])
        order = np.lexsort((np.arange(len(user)), rank, ts, user))
        user, item, ts = user[order], item[order], ts[order]
        bounds = np.searchsorted(user, np.arange(self.n_users + 1))
        return [(item[bounds[u]:bounds[u + 1]], ts[bounds[u]:bounds[u + 1]]) for u in range(self.n_users)]

    def cold_cases(self) -> tuple[list[np.ndarray], dict[int, np.ndarray], dict[int, np.ndarray]]:
        """The cold-start split without the user's future: per user, the targets are the cold items picked after
        the middle of their warm history (train + validation, by time) and the history is the warm items picked
        strictly before the first of those targets. Returns (histories per user index, user → targets, user → the
        cold items they picked earlier, which are neither)."""
        warm = self.events("train", "validation")
        cold = self.splits["cold_test"]
        histories = [np.zeros(0, np.int64)] * self.n_users
        targets: dict[int, np.ndarray] = {}
        earlier: dict[int, np.ndarray] = {}
        for u in np.unique(cold["user"]).tolist():
            items, ts = warm[u]
            if not len(items):
                continue
            mine = cold["user"] == u
            later = ts[len(ts) // 2] < cold["timestamp"][mine]
            if later.any():
                targets[u] = cold["item"][mine][later]
                earlier[u] = cold["item"][mine][~later]
                histories[u] = items[ts < cold["timestamp"][mine][later].min()]
        return histories, targets, earlier

    def targets(self, name: str) -> dict[int, np.ndarray]:
        """user index → the item indices that user interacted with in split `name`."""
        part = self.splits[name]
        out: dict[int, list[int]] = {}
        for u, i in zip(part["user"].tolist(), part["item"].tolist()):
            out.setdefault(u, []).append(i)
        return {u: np.array(v) for u, v in out.items()}


def load(path: str | Path) -> Interactions:
    path = Path(path)
    if kind_of(path) != KIND:
        raise UserError(f"{path} is not an interactions dir; create one with `tunelab recommend prepare`")
    meta = read_json_file(path / META_FILE, f"{path} has no {META_FILE}")
    items = [json.loads(line) for line in (path / "items.jsonl").read_text(encoding="utf-8").splitlines()]
    item_index = {row["item"]: k for k, row in enumerate(items)}
    raw = {name: [json.loads(line) for line in (path / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
           for name in SPLITS}
    users = sorted({r["user"] for rows in raw.values() for r in rows})
    user_index = {u: k for k, u in enumerate(users)}
    splits = {name: {"user": np.array([user_index[r["user"]] for r in rows], dtype=np.int64),
                     "item": np.array([item_index[r["item"]] for r in rows], dtype=np.int64),
                     "timestamp": np.array([r["timestamp"] for r in rows], dtype=np.float64)}
              for name, rows in raw.items()}
    cold = np.array([bool(row["cold"]) for row in items])
    return Interactions(path, meta, items, item_index, users, user_index, splits, cold)
