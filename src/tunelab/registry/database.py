"""The registry's metadata: versions, aliases and the event log, in SQLite (a file under the registry folder, WAL
journal) or PostgreSQL (a URL), through SQLAlchemy Core, the same statements on both.

Writes are serialised (`tunelab.database`), so that no event is lost and no alias is half-moved when several
processes register and promote at once: the alias row and the event that moved it commit together or not at all.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.database import Database as BaseDatabase

_PG_LOCK_KEY = 0x7475_6E65  # "tune": the advisory lock every registry write takes on PostgreSQL


def tables():
    """The registry's tables (SQLAlchemy Core), made on first use so that importing tunelab stays light."""
    global _TABLES
    if _TABLES is None:
        from sqlalchemy import Boolean, Column, Integer, MetaData, String, Table, Text

        md = MetaData()
        versions = Table(
            "versions", md,
            Column("name", String(200), primary_key=True), Column("version", String(64), primary_key=True),
            Column("registered_at", String(40), nullable=False), Column("kind", String(20), nullable=False),
            Column("task", String(40)), Column("weights", String(64), index=True),
            Column("gate_passed", Boolean, nullable=True), Column("files", Text, nullable=False),
            Column("lineage", Text, nullable=False), Column("source", Text, nullable=False))
        aliases = Table(
            "aliases", md,
            Column("name", String(200), primary_key=True), Column("alias", String(100), primary_key=True),
            Column("version", String(64), nullable=False), Column("moved_at", String(40), nullable=False),
            Column("event_id", Integer, nullable=False))
        events = Table(
            "events", md,
            Column("id", Integer, primary_key=True, autoincrement=True), Column("at", String(40), nullable=False),
            Column("actor", String(200), nullable=False), Column("action", String(20), nullable=False),
            Column("name", String(200), nullable=False, index=True), Column("alias", String(100)),
            Column("version", String(64)), Column("previous", String(64)), Column("reason", Text),
            Column("override", Boolean, nullable=False))
        _TABLES = (md, versions, aliases, events)
    return _TABLES


_TABLES = None


class Database(BaseDatabase):
    """The registry's database (`tunelab.database.Database` with the registry's tables and lock)."""

    def __init__(self, url: str):
        super().__init__(url, tables()[0], _PG_LOCK_KEY, "registry database")


def database_url(root: Path, db: str | None) -> str:
    """`db` (a SQLAlchemy URL, e.g. postgresql+psycopg://user@host/registry) or the SQLite file in `root`."""
    return db or f"sqlite:///{Path(root).resolve() / 'registry.db'}"
