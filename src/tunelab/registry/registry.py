"""The model registry: immutable versions under names, movable aliases, and the log of every move.

- A *version* is a model dir (or export dir) copied into the content-addressed store (`store.py`); its id is the
  content hash, shown by its first 12 characters. It is registered under a *name* (a model line such as
  `tweets-sentiment`) with its lineage: base, parent version (found by the parent's weight hashes), dataset
  fingerprints, run config, metrics, the update's gate, export parity.
- An *alias* (`production`, `staging`, any name) points a name at one version. `promote` moves it, `rollback` moves
  it back to the version it pointed at before the last promote still in effect (again and again, down the
  history). Every move is an event (time, actor, reason, the previous target) written in the same transaction.
- A version whose update gate failed is promoted only with `override=True` and a reason; the event says so.
- References: `NAME@ALIAS`, `NAME:VERSION` (a unique prefix of at least 6 characters), or `NAME` (its newest
  version). Loading a version (`resolve`) verifies every file's hash first.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import socket
from datetime import datetime, timezone
from pathlib import Path

import yaml

from tunelab.artifacts import META_FILE, kind_of
from tunelab.errors import UserError, read_json_file
from tunelab.registry import store
from tunelab.registry.database import Database, database_url, tables

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,99}$")
MIN_PREFIX = 6


def default_root() -> Path:
    """`TUNELAB_REGISTRY`, else `$XDG_DATA_HOME/tunelab/registry` (~/.local/share/tunelab/registry)."""
    env = os.environ.get("TUNELAB_REGISTRY")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "tunelab" / "registry"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _actor() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in this environment (a container without passwd entry)
        user = f"uid{os.getuid()}" if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()} pid {os.getpid()}"


def weights_key(files: dict) -> str | None:
    """A hash of a model dir's weight files ({name: sha256}), as `tunelab.json` records them: how a version is
    found from its child's `base.parent.files`."""
    if not files:
        return None
    return hashlib.sha256(json.dumps(dict(sorted(files.items())), separators=(",", ":")).encode()).hexdigest()


class Registry:
    """A registry folder (`root`: the store, and the SQLite database unless `db` names another database)."""

    def __init__(self, root: str | Path | None = None, db: str | None = None):
        self.root = Path(root) if root is not None else default_root()
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = self.root / "store"
        self.db = Database(database_url(self.root, db or os.environ.get("TUNELAB_REGISTRY_DB")))
        _, self.versions, self.aliases, self.events = tables()

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- writing -------------------------------------------------------------------------------------------

    def register(self, model_dir: str | Path, name: str, reason: str | None = None) -> dict:
        """Copy `model_dir` into the store and record it under `name` -> the version's record. Registering the
        same content under the same name again changes nothing and returns the existing record."""
        from sqlalchemy import insert, select

        _check_name(name)
        src = Path(model_dir)
        if not src.is_dir():
            raise UserError(f"{src} is not a folder; register a model dir (a run's model/) or an export dir")
        kind = kind_of(src)
        if kind not in ("model", "export"):
            raise UserError(f"{src} is not a tunelab model dir or export dir (its {META_FILE} says "
                            f"{kind or 'nothing'}); register the model/ folder of a run, or an export")
        meta = read_json_file(src / META_FILE, f"{src} has no readable {META_FILE}")
        files = store.manifest(src)
        version = store.version_of(files)
        store.put(self.store, src, files)
        v, e = self.versions, self.events
        with self.db.write() as conn:
            row = conn.execute(select(v).where(v.c.name == name, v.c.version == version)).mappings().first()
            if row is not None:
                return _version_record(row)
            lineage = self._lineage(conn, src, meta)
            gate = (meta.get("update") or {}).get("gate")
            record = {"name": name, "version": version, "registered_at": _now(), "kind": kind,
                      "task": meta.get("task"), "weights": weights_key(_weight_hashes(meta)),
                      "gate_passed": None if gate is None else bool(gate.get("passed")),
                      "files": json.dumps(files), "lineage": json.dumps(lineage, ensure_ascii=False),
                      "source": str(src.resolve())}
            conn.execute(insert(v).values(**record))
            conn.execute(insert(e).values(at=record["registered_at"], actor=_actor(), action="register", name=name,
                                          version=version, reason=reason, override=False))
        return _version_record(record)

    def promote(self, ref: str, alias: str, reason: str | None = None, override: bool = False) -> dict:
        """Point `alias` of the version's name at the version `ref` names -> the event. A version whose gate
        failed needs `override` and a reason."""
        from sqlalchemy import select

        _check_alias(alias)
        with self.db.write() as conn:
            row = self._find(conn, ref)
            name, version = row["name"], row["version"]
            if row["gate_passed"] is False:
                if not override:
                    why = (json.loads(row["lineage"]).get("gate") or {}).get("reason", "no reason recorded")
                    raise UserError(f"{name}:{version[:12]} failed its update gate ({why}); promoting it needs "
                                    "--override-gate and a --reason, both logged")
                if not (reason or "").strip():
                    raise UserError("--override-gate needs a --reason: the log must say why a failed version was "
                                    "promoted")
            a = self.aliases
            current = conn.execute(select(a.c.version).where(a.c.name == name, a.c.alias == alias)).scalar()
            if current == version:
                raise UserError(f"{name}@{alias} already points at {version[:12]}")
            return self._move(conn, "promote", name, alias, version, current, reason,
                              override and row["gate_passed"] is False)

    def rollback(self, name: str, alias: str, reason: str | None = None) -> dict:
        """Move `alias` back to the version it pointed at before the promote now in effect -> the event."""
        _check_alias(alias)
        with self.db.write() as conn:
            stack = self._stack(conn, name, alias)
            if not stack:
                raise UserError(f"{name}@{alias} does not exist; nothing to roll back")
            if len(stack) < 2:
                raise UserError(f"{name}@{alias} has no earlier version to roll back to (it was promoted once, to "
                                f"{stack[-1][:12]})")
            return self._move(conn, "rollback", name, alias, stack[-2], stack[-1], reason, False)

    def _move(self, conn, action: str, name: str, alias: str, version: str, previous: str | None,
              reason: str | None, override: bool) -> dict:
        """Write the event and move the alias, in the caller's transaction -> the event."""
        from sqlalchemy import delete, insert

        e, a = self.events, self.aliases
        event = {"at": _now(), "actor": _actor(), "action": action, "name": name, "alias": alias,
                 "version": version, "previous": previous, "reason": reason, "override": override}
        event_id = conn.execute(insert(e).values(**event)).inserted_primary_key[0]
        conn.execute(delete(a).where(a.c.name == name, a.c.alias == alias))
        conn.execute(insert(a).values(name=name, alias=alias, version=version, moved_at=event["at"],
                                      event_id=event_id))
        return {"id": event_id, **event}

    def _stack(self, conn, name: str, alias: str) -> list[str]:
        """The alias's history as a stack: each promote pushes its version, each rollback pops one."""
        from sqlalchemy import select

        e = self.events
        rows = conn.execute(select(e.c.action, e.c.version).where(e.c.name == name, e.c.alias == alias)
                            .order_by(e.c.id)).all()
        stack: list[str] = []
        for action, version in rows:
            if action == "promote":
                stack.append(version)
            elif action == "rollback" and stack:
                stack.pop()
        return stack

    # ---- reading -------------------------------------------------------------------------------------------

    def show(self, ref: str) -> dict:
        """The record of the version `ref` names, with the aliases that point at it."""
        from sqlalchemy import select

        with self.db.read() as conn:
            row = self._find(conn, ref)
            a = self.aliases
            names = conn.execute(select(a.c.alias).where(a.c.name == row["name"], a.c.version == row["version"])
                                 .order_by(a.c.alias)).scalars().all()
        return {**_version_record(row), "aliases": list(names)}

    def resolve(self, ref: str) -> tuple[dict, Path]:
        """The version `ref` names and its folder in the store, every file's hash verified first."""
        record = self.show(ref)
        return record, store.verify(self.store, record["version"], record["files"])

    def list(self, name: str | None = None) -> list[dict]:
        """Every version (of `name`), oldest first, each with its aliases."""
        from sqlalchemy import select

        v, a = self.versions, self.aliases
        with self.db.read() as conn:
            q = select(v).order_by(v.c.registered_at, v.c.version)
            rows = conn.execute(q.where(v.c.name == name) if name else q).mappings().all()
            pointed = conn.execute(select(a.c.name, a.c.alias, a.c.version)).all()
        by_version: dict[tuple[str, str], list[str]] = {}
        for n, alias, version in pointed:
            by_version.setdefault((n, version), []).append(alias)
        if name and not rows:
            raise UserError(f"no version is registered under '{name}'")
        return [{**_version_record(r), "aliases": sorted(by_version.get((r["name"], r["version"]), []))}
                for r in rows]

    def log(self, name: str, alias: str | None = None) -> list[dict]:
        """The events of `name` (of one alias), oldest first."""
        from sqlalchemy import select

        e = self.events
        q = select(e).where(e.c.name == name).order_by(e.c.id)
        with self.db.read() as conn:
            rows = conn.execute(q.where(e.c.alias == alias) if alias else q).mappings().all()
        if not rows:
            raise UserError(f"no event for '{name}'{f'@{alias}' if alias else ''}")
        return [dict(r) for r in rows]

    def diff(self, ref_a: str, ref_b: str) -> dict:
        """What differs between two versions: lineage keys (config, data, metrics, gate ...) and files."""
        a, b = self.show(ref_a), self.show(ref_b)
        la, lb = _flatten(a["lineage"]), _flatten(b["lineage"])
        keys = sorted(k for k in set(la) | set(lb) if la.get(k) != lb.get(k))
        files = sorted(k for k in set(a["files"]) | set(b["files"]) if a["files"].get(k) != b["files"].get(k))
        return {"a": f"{a['name']}:{a['version'][:12]}", "b": f"{b['name']}:{b['version'][:12]}",
                "lineage": [{"key": k, "a": la.get(k), "b": lb.get(k)} for k in keys], "files": files}

    def _find(self, conn, ref: str):
        """The versions row `ref` names (NAME@ALIAS, NAME:PREFIX, NAME)."""
        from sqlalchemy import select

        v, a = self.versions, self.aliases
        if "@" in ref:
            name, alias = ref.split("@", 1)
            version = conn.execute(select(a.c.version).where(a.c.name == name, a.c.alias == alias)).scalar()
            if version is None:
                raise UserError(f"{ref}: no alias '{alias}' for '{name}'")
            rows = conn.execute(select(v).where(v.c.name == name, v.c.version == version)).mappings().all()
        elif ":" in ref:
            name, prefix = ref.split(":", 1)
            if len(prefix) < MIN_PREFIX or not re.fullmatch(r"[0-9a-f]+", prefix):
                raise UserError(f"{ref}: a version is {MIN_PREFIX} or more hex characters of its id")
            rows = conn.execute(select(v).where(v.c.name == name, v.c.version.like(prefix + "%"))).mappings().all()
            if len(rows) > 1:
                raise UserError(f"{ref}: {len(rows)} versions start with {prefix}; give more characters")
        else:
            rows = conn.execute(select(v).where(v.c.name == ref).order_by(v.c.registered_at.desc())
                                .limit(1)).mappings().all()
        if not rows:
            raise UserError(f"{ref}: no such version in the registry at {self.root}")
        return rows[0]

    def _lineage(self, conn, src: Path, meta: dict) -> dict:
        """What the version was made from, as its tunelab.json (and the run's config.yaml beside it, or an
        export's parity report) say; the parent's version when the parent was registered too."""
        from sqlalchemy import select

        if meta.get("kind") == "export":  # its parent is the model dir it was exported from
            made_from = meta.get("source") or {}
            parent = {"model_dir": made_from.get("model_dir"),
                      "files": _weight_hashes({"files": made_from.get("weights")})}
            parity_file = src / str(meta.get("parity") or "parity.json")
            parity = json.loads(parity_file.read_text(encoding="utf-8")) if parity_file.is_file() else None
        else:
            made_from, parity = meta, None
            parent = (meta.get("base") or {}).get("parent") or {}
        key = weights_key(parent.get("files") or {})
        v = self.versions
        found = conn.execute(select(v.c.name, v.c.version).where(v.c.weights == key).limit(1)).first() if key \
            else None
        config = src.parent / "config.yaml"
        data, update = made_from.get("data") or {}, meta.get("update") or {}
        return {"base": (made_from.get("base") or {}).get("ref"), "method": (made_from.get("method") or {}).get("name"),
                "parent": {"model_dir": parent.get("model_dir"), "version": f"{found[0]}:{found[1]}" if found else None}
                if parent.get("model_dir") else None,
                "data": {"fingerprint": data.get("fingerprint"), "path": data.get("path"),
                         "train_examples": data.get("train_examples"),
                         "replay": (data.get("replay") or {}).get("fingerprint")},
                "labels": meta.get("labels"), "metrics": meta.get("metrics"), "gate": update.get("gate"),
                "update": {k: update.get(k) for k in ("before", "after", "replay", "regularize")} if update else None,
                "export": {"format": meta.get("format"), "quantize": meta.get("quantize"),
                           "parity": parity.get("figures") if parity else None} if meta.get("kind") == "export"
                else None,
                "config": yaml.safe_load(config.read_text(encoding="utf-8"))
                if config.is_file() and meta.get("kind") == "model" else None}


def _weight_hashes(meta: dict) -> dict:
    return {n: f.get("sha256") for n, f in (meta.get("files") or {}).items()}


def _version_record(row) -> dict:
    r = dict(row)
    for k in ("files", "lineage"):
        if isinstance(r.get(k), str):
            r[k] = json.loads(r[k])
    return r


def _flatten(obj, prefix: str = "") -> dict:
    """Nested dicts -> {"a.b.c": leaf}; lists stay leaves."""
    if not isinstance(obj, dict):
        return {prefix: obj}
    out = {}
    for k, val in obj.items():
        out.update(_flatten(val, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _check_name(name: str) -> None:
    if not NAME_RE.match(name or ""):
        raise UserError(f"registry name {name!r}: letters, digits, '.', '_' and '-' (up to 200), starting with a "
                        "letter or digit")


def _check_alias(alias: str) -> None:
    if not ALIAS_RE.match(alias or ""):
        raise UserError(f"alias {alias!r}: letters, digits, '.', '_' and '-' (up to 100), starting with a letter")
