"""The registry's metadata: versions, aliases and the event log, in SQLite (a file under the registry folder, WAL
journal) or PostgreSQL (a URL), through SQLAlchemy Core, the same statements on both.

Writes are serialised, so that no event is lost and no alias is half-moved when several processes register and
promote at once: on SQLite each write transaction starts with `BEGIN IMMEDIATE` (the database's one write lock,
waited for up to `BUSY_TIMEOUT_S`); on PostgreSQL it takes a transaction-level advisory lock first. Reads take no
lock (WAL readers see the last commit). Every write is one transaction: the alias row and the event that moved it
commit together or not at all.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from tunelab.errors import UserError

BUSY_TIMEOUT_S = 60
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


class Database:
    """An engine on the registry's database, its tables created if need be; `write()` and `read()` give a
    connection inside one transaction."""

    def __init__(self, url: str):
        from sqlalchemy import create_engine, event

        self.url = url
        self.sqlite = url.startswith("sqlite")
        try:
            if self.sqlite:
                self.engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S})

                @event.listens_for(self.engine, "connect")
                def _connect(dbapi_conn, _record):
                    dbapi_conn.isolation_level = None  # transactions are begun below, not by the driver
                    cur = dbapi_conn.cursor()
                    cur.execute("PRAGMA journal_mode=WAL")
                    cur.execute("PRAGMA synchronous=FULL")  # a committed event survives a power cut
                    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
                    cur.close()

                @event.listens_for(self.engine, "begin")
                def _begin(conn):
                    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("write")
                                         else "BEGIN")
            else:
                self.engine = create_engine(url, pool_pre_ping=True)
            self._create()
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - a driver missing, a server down, a bad URL: the user's to fix
            raise UserError(f"cannot open the registry database {_safe(url)}: {type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}") from None

    def _create(self) -> None:
        md = tables()[0]
        for attempt in range(5):  # two processes creating the tables at once on PostgreSQL: one of them retries
            try:
                with self.write() as conn:
                    md.create_all(conn)
                return
            except Exception:  # noqa: BLE001
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    @contextmanager
    def write(self):
        """A connection in a write transaction that holds the registry's write lock until it commits."""
        from sqlalchemy import text

        with self.engine.execution_options(write=True).begin() as conn:
            if not self.sqlite:
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
            yield conn

    @contextmanager
    def read(self):
        with self.engine.connect() as conn:
            yield conn

    def close(self) -> None:
        self.engine.dispose()


def database_url(root: Path, db: str | None) -> str:
    """`db` (a SQLAlchemy URL, e.g. postgresql+psycopg://user@host/registry) or the SQLite file in `root`."""
    return db or f"sqlite:///{Path(root).resolve() / 'registry.db'}"


def _safe(url: str) -> str:
    """A URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL that does not parse is shown as given, it holds no password we know
        return url
