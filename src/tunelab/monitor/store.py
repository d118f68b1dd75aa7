"""The monitor's database: every scored document, its entity mentions, per-entity window aggregates, the read
position of every source, rejected-document counts, alerts and their webhook deliveries.

`Store.ingest` is one write transaction (`tunelab.database`): the new documents, the aggregates they change, the
source position they were read up to, the rejects, and the alerts the rules raise on the changed windows commit
together or not at all. A document id already stored is skipped (counted as a duplicate), so a replayed file or a
retried POST never counts twice; after a crash the sources resume from the last committed position.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.database import Database
from tunelab.monitor.documents import Document
from tunelab.monitor.stats import Window

OVERALL = "*"  # the entity name of the whole stream's aggregates
_PG_LOCK_KEY = 0x6D6F_6E69  # "moni"
_CHUNK = 500  # ids per IN (…) list


@dataclass
class Scored:
    doc: Document
    label: str
    negative: bool
    score: float  # p(positive) - p(negative), in [-1, 1]
    entities: list[str] = field(default_factory=list)


@dataclass
class Ingested:
    stored: set[str] = field(default_factory=set)  # the ids stored by this ingest
    duplicates: int = 0
    rejected: int = 0
    alerts: list[dict] = field(default_factory=list)


def tables():
    global _TABLES
    if _TABLES is None:
        from sqlalchemy import (BigInteger, Boolean, Column, Float, Integer, MetaData, String, Table, Text,
                                UniqueConstraint)

        md = MetaData()
        Table("documents", md, Column("id", String(200), primary_key=True), Column("ts", Float, nullable=False),
              Column("win", BigInteger, nullable=False, index=True), Column("source", String(200), nullable=False),
              Column("text", Text, nullable=False), Column("label", String(200), nullable=False),
              Column("negative", Boolean, nullable=False), Column("score", Float, nullable=False),
              Column("entities", Text, nullable=False), Column("ingested_at", Float, nullable=False))
        Table("mentions", md, Column("doc_id", String(200), primary_key=True),
              Column("entity", String(200), primary_key=True), Column("ts", Float, nullable=False, index=True))
        Table("aggregates", md, Column("entity", String(200), primary_key=True),
              Column("win", BigInteger, primary_key=True), Column("volume", Integer, nullable=False),
              Column("negatives", Integer, nullable=False), Column("score_sum", Float, nullable=False))
        Table("positions", md, Column("source", String(1000), primary_key=True),
              Column("position", BigInteger, nullable=False), Column("fingerprint", String(100), nullable=False))
        Table("rejects", md, Column("source", String(200), primary_key=True),
              Column("reason", String(40), primary_key=True), Column("n", Integer, nullable=False))
        Table("alerts", md, Column("id", Integer, primary_key=True, autoincrement=True),
              Column("rule", String(100), nullable=False), Column("entity", String(200), nullable=False),
              Column("win", BigInteger, nullable=False), Column("value", Float, nullable=False),
              Column("statistic", Float), Column("volume", Integer, nullable=False),
              Column("message", Text, nullable=False), Column("created_at", Float, nullable=False),
              UniqueConstraint("rule", "entity", "win"))
        Table("deliveries", md, Column("alert_id", Integer, primary_key=True),
              Column("target", String(1000), primary_key=True), Column("status", String(20), nullable=False),
              Column("attempts", Integer, nullable=False), Column("next_at", Float, nullable=False),
              Column("last_error", Text))
        _TABLES = md
    return _TABLES


_TABLES = None


def database_url(state: Path, db: str | None) -> str:
    """`db`, else TUNELAB_MONITOR_DB, else the SQLite file monitor.db in the `state` folder (created)."""
    url = db or os.environ.get("TUNELAB_MONITOR_DB")
    if url:
        return url
    state = Path(state)
    state.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{state.resolve() / 'monitor.db'}"


def _window_of(ts: float, window_s: int) -> int:
    return int(ts // window_s) * window_s


class Store:
    """The database of one monitor. `rules`: a `rules.RuleSet` (or None), evaluated inside each ingest."""

    def __init__(self, url: str, window_s: int, rules=None, webhooks: list[str] = ()):
        self.db = Database(url, tables(), _PG_LOCK_KEY, "monitor database")
        self.window_s, self.rules, self.webhooks = window_s, rules, list(webhooks)
        self.t = tables().tables

    # ---- writing --------------------------------------------------------------------------------------------
    def ingest(self, scored: list[Scored], rejects: dict[tuple[str, str], int] | None = None,
               positions: list[tuple[str, int, str]] = ()) -> Ingested:
        """Store `scored` (ids already stored, or repeated in the batch, are skipped), add `rejects` ((source,
        reason) -> count), move the `positions` ((source key, offset, fingerprint) each), evaluate the rules on the
        windows that changed: one transaction. -> the ids stored, counts and the alerts raised."""
        out = Ingested(rejected=sum((rejects or {}).values()))
        with self.db.write() as conn:
            new = self._new_documents(conn, scored)
            out.duplicates = len(scored) - len(new)
            out.stored = {s.doc.id for s in new}
            changed = self._store_documents(conn, new)
            self._add_rejects(conn, rejects or {})
            for position in positions:
                self._move(conn, *position)
            if self.rules is not None and changed:
                out.alerts = self.rules.evaluate(self, conn, changed)
                for alert in out.alerts:
                    self._add_alert(conn, alert)
        return out

    def add_alerts(self, alerts: list[dict], cooldown_s: int = 0) -> list[dict]:
        """Store the `alerts` (and their webhook deliveries) not within `cooldown_s` of an earlier one of the same
        rule and entity: one transaction -> those stored."""
        stored = []
        with self.db.write() as conn:
            for a in alerts:
                if not self.alert_windows(conn, a["rule"], a["entity"], a["window"] - cooldown_s,
                                          a["window"] + cooldown_s):
                    self._add_alert(conn, a)
                    stored.append(a)
        return stored

    def _new_documents(self, conn, scored: list[Scored]) -> list[Scored]:
        first: dict[str, Scored] = {}
        for s in scored:
            first.setdefault(s.doc.id, s)  # the first of a repeated id
        seen = self._known(conn, list(first))
        return [s for s in first.values() if s.doc.id not in seen]

    def _known(self, conn, ids: list[str]) -> set[str]:
        from sqlalchemy import select

        docs, seen = self.t["documents"], set()
        for i in range(0, len(ids), _CHUNK):
            seen.update(conn.execute(select(docs.c.id).where(docs.c.id.in_(ids[i:i + _CHUNK]))).scalars())
        return seen

    def known(self, ids: list[str]) -> set[str]:
        """The ids among `ids` already stored (read without the write lock: `ingest` checks again under it)."""
        with self.db.read() as conn:
            return self._known(conn, ids)

    def _store_documents(self, conn, new: list[Scored]) -> dict[str, set[int]]:
        """Insert `new` and their mentions, add them to the aggregates -> the windows changed, per entity."""
        if not new:
            return {}
        now = time.time()
        conn.execute(self.t["documents"].insert(), [
            {"id": s.doc.id, "ts": s.doc.ts, "win": _window_of(s.doc.ts, self.window_s), "source": s.doc.source,
             "text": s.doc.text, "label": s.label, "negative": s.negative, "score": s.score,
             "entities": json.dumps(s.entities, ensure_ascii=False), "ingested_at": now} for s in new])
        mentions = [{"doc_id": s.doc.id, "entity": e, "ts": s.doc.ts} for s in new for e in s.entities]
        if mentions:
            conn.execute(self.t["mentions"].insert(), mentions)
        delta: dict[tuple[str, int], list] = defaultdict(lambda: [0, 0, 0.0])
        for s in new:
            w = _window_of(s.doc.ts, self.window_s)
            for entity in (OVERALL, *s.entities):
                d = delta[(entity, w)]
                d[0] += 1
                d[1] += int(s.negative)
                d[2] += s.score
        self._add_to_aggregates(conn, delta)
        changed: dict[str, set[int]] = defaultdict(set)
        for entity, w in delta:
            changed[entity].add(w)
        return changed

    def _add_to_aggregates(self, conn, delta: dict[tuple[str, int], list]) -> None:
        from sqlalchemy import and_, bindparam, select

        agg = self.t["aggregates"]
        existing = set()
        by_entity: dict[str, list[int]] = defaultdict(list)
        for entity, w in delta:
            by_entity[entity].append(w)
        for entity, windows in by_entity.items():
            rows = conn.execute(select(agg.c.win).where(and_(agg.c.entity == entity, agg.c.win.in_(windows))))
            existing.update((entity, w) for w in rows.scalars())
        updates = [{"e": e, "w": w, "v": d[0], "n": d[1], "s": d[2]} for (e, w), d in delta.items()
                   if (e, w) in existing]
        inserts = [{"entity": e, "win": w, "volume": d[0], "negatives": d[1], "score_sum": d[2]}
                   for (e, w), d in delta.items() if (e, w) not in existing]
        if updates:
            conn.execute(agg.update().where(and_(agg.c.entity == bindparam("e"), agg.c.win == bindparam("w")))
                         .values(volume=agg.c.volume + bindparam("v"), negatives=agg.c.negatives + bindparam("n"),
                                 score_sum=agg.c.score_sum + bindparam("s")), updates)
        if inserts:
            conn.execute(agg.insert(), inserts)

    def _add_rejects(self, conn, rejects: dict[tuple[str, str], int]) -> None:
        from sqlalchemy import and_, select

        rej = self.t["rejects"]
        for (source, reason), n in rejects.items():
            where = and_(rej.c.source == source[:200], rej.c.reason == reason)
            if conn.execute(select(rej.c.n).where(where)).first() is None:
                conn.execute(rej.insert().values(source=source[:200], reason=reason, n=n))
            else:
                conn.execute(rej.update().where(where).values(n=rej.c.n + n))

    def _move(self, conn, source: str, offset: int, fingerprint: str) -> None:
        pos = self.t["positions"]
        done = conn.execute(pos.update().where(pos.c.source == source).values(position=offset,
                                                                               fingerprint=fingerprint))
        if done.rowcount == 0:
            conn.execute(pos.insert().values(source=source, position=offset, fingerprint=fingerprint))

    def _add_alert(self, conn, alert: dict) -> None:
        result = conn.execute(self.t["alerts"].insert().values(
            rule=alert["rule"], entity=alert["entity"], win=alert["window"], value=alert["value"],
            statistic=alert.get("statistic"), volume=alert["volume"], message=alert["message"],
            created_at=time.time()))
        alert["id"] = result.inserted_primary_key[0]
        if self.webhooks:
            conn.execute(self.t["deliveries"].insert(), [
                {"alert_id": alert["id"], "target": url, "status": "pending", "attempts": 0, "next_at": 0.0}
                for url in self.webhooks])

    # ---- what the rules read (inside the ingest transaction) --------------------------------------------------
    def windows(self, conn, entity: str, first: int, last: int) -> list[Window]:
        """`entity`'s windows from `first` to `last` (window starts), every one of them: empty ones as zeros."""
        from sqlalchemy import and_, select

        agg = self.t["aggregates"]
        rows = conn.execute(select(agg.c.win, agg.c.volume, agg.c.negatives, agg.c.score_sum).where(
            and_(agg.c.entity == entity, agg.c.win >= first, agg.c.win <= last)))
        found = {r.win: Window(r.win, r.volume, r.negatives, r.score_sum) for r in rows}
        return [found.get(w, Window(w, 0, 0, 0.0)) for w in range(first, last + 1, self.window_s)]

    def alert_windows(self, conn, rule: str, entity: str, first: int, last: int) -> list[int]:
        """The windows between `first` and `last` where `rule` alerted for `entity`."""
        from sqlalchemy import and_, select

        al = self.t["alerts"]
        return list(conn.execute(select(al.c.win).where(and_(
            al.c.rule == rule, al.c.entity == entity, al.c.win >= first, al.c.win <= last))).scalars())

    # ---- the sources' positions --------------------------------------------------------------------------------
    def position(self, source: str) -> tuple[int, str] | None:
        from sqlalchemy import select

        pos = self.t["positions"]
        with self.db.read() as conn:
            row = conn.execute(select(pos.c.position, pos.c.fingerprint).where(pos.c.source == source)).first()
        return None if row is None else (row.position, row.fingerprint)

    def close(self) -> None:
        self.db.close()


class Deliveries:
    """The webhook outbox (table `deliveries`, rows added with their alert): what is due, and each attempt's result."""

    def __init__(self, store: Store):
        self.db, self.t = store.db, store.t

    def due(self, now: float, limit: int = 50) -> list[dict]:
        from sqlalchemy import and_, select

        d, a = self.t["deliveries"], self.t["alerts"]
        query = (select(d.c.alert_id, d.c.target, d.c.attempts, a.c.rule, a.c.entity, a.c.win, a.c.value,
                        a.c.statistic, a.c.volume, a.c.message, a.c.created_at)
                 .join(a, a.c.id == d.c.alert_id)
                 .where(and_(d.c.status == "pending", d.c.next_at <= now)).order_by(d.c.next_at).limit(limit))
        with self.db.read() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def record(self, alert_id: int, target: str, status: str, attempts: int, next_at: float, error: str | None):
        from sqlalchemy import and_

        d = self.t["deliveries"]
        with self.db.write() as conn:
            conn.execute(d.update().where(and_(d.c.alert_id == alert_id, d.c.target == target)).values(
                status=status, attempts=attempts, next_at=next_at, last_error=error))


class Views:
    """What the dashboard and its API read (no lock: WAL readers see the last commit)."""

    def __init__(self, store: Store):
        self.db, self.t, self.window_s = store.db, store.t, store.window_s

    def overview(self, limit: int = 50) -> dict:
        from sqlalchemy import func, select

        agg, docs, rej, al = self.t["aggregates"], self.t["documents"], self.t["rejects"], self.t["alerts"]
        with self.db.read() as conn:
            latest = conn.execute(select(func.max(agg.c.win)).where(agg.c.entity == OVERALL)).scalar()
            totals = conn.execute(select(func.sum(agg.c.volume), func.sum(agg.c.negatives))
                                  .where(agg.c.entity == OVERALL)).first()
            rows = conn.execute(select(agg.c.entity, func.sum(agg.c.volume).label("volume"),
                                       func.sum(agg.c.negatives).label("negatives"),
                                       func.sum(agg.c.score_sum).label("score_sum"))
                                .where(agg.c.entity != OVERALL).group_by(agg.c.entity)
                                .order_by(func.sum(agg.c.volume).desc()).limit(limit)).all()
            alerts = dict(conn.execute(select(al.c.entity, func.count()).group_by(al.c.entity)).all())
            rejects = dict(conn.execute(select(rej.c.reason, func.sum(rej.c.n)).group_by(rej.c.reason)).all())
            documents = conn.execute(select(func.count()).select_from(docs)).scalar()
        return {"window_s": self.window_s, "latest_window": latest, "documents": documents,
                "negatives": int(totals[1] or 0), "rejected": {k: int(v) for k, v in rejects.items()},
                "alerts": int(sum(alerts.values())),
                "entities": [{"name": r.entity, "volume": int(r.volume), "share_negative": r.negatives / r.volume,
                              "mean_score": r.score_sum / r.volume, "alerts": int(alerts.get(r.entity, 0))}
                             for r in rows if r.volume]}

    def series(self, entity: str, windows: int = 168) -> list[dict]:
        from sqlalchemy import and_, func, select

        agg = self.t["aggregates"]
        with self.db.read() as conn:
            earliest, last = conn.execute(select(func.min(agg.c.win), func.max(agg.c.win))
                                          .where(agg.c.entity == OVERALL)).first()
            if last is None:
                return []
            first = max(earliest, last - (windows - 1) * self.window_s)  # from the stream's first window at most
            rows = conn.execute(select(agg).where(and_(agg.c.entity == entity, agg.c.win >= first))
                                .order_by(agg.c.win)).all()
        found = {r.win: r for r in rows}
        out = []
        for w in range(first, last + 1, self.window_s):
            r = found.get(w)
            v, n, s = (r.volume, r.negatives, r.score_sum) if r else (0, 0, 0.0)
            out.append({"window": w, "volume": v, "negatives": n, "share_negative": n / v if v else None,
                        "mean_score": s / v if v else None})
        return out

    def alerts(self, limit: int = 100, entity: str | None = None) -> list[dict]:
        from sqlalchemy import select

        al = self.t["alerts"]
        query = select(al).order_by(al.c.id.desc()).limit(limit)
        if entity is not None:
            query = query.where(al.c.entity == entity)
        with self.db.read() as conn:
            return [{"id": r.id, "rule": r.rule, "entity": r.entity, "window": r.win, "value": r.value,
                     "statistic": r.statistic, "volume": r.volume, "message": r.message, "created_at": r.created_at}
                    for r in conn.execute(query)]

    def documents(self, entity: str | None, limit: int = 20, negative_only: bool = False) -> list[dict]:
        from sqlalchemy import select

        docs, men = self.t["documents"], self.t["mentions"]
        query = select(docs).order_by(docs.c.ts.desc()).limit(limit)
        if entity is not None and entity != OVERALL:
            query = query.join(men, men.c.doc_id == docs.c.id).where(men.c.entity == entity)
        if negative_only:
            query = query.where(docs.c.negative.is_(True))
        with self.db.read() as conn:
            return [{"id": r.id, "ts": r.ts, "source": r.source, "text": r.text, "label": r.label,
                     "negative": bool(r.negative), "score": r.score, "entities": json.loads(r.entities)}
                    for r in conn.execute(query)]
