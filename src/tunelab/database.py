"""An SQL database shared by several processes: an embedded SQLite file (WAL journal) or a server (PostgreSQL) through
a SQLAlchemy URL, the same statements on both. The registry and the monitor keep their state here.

Writes are serialised, so that two processes never interleave half of a change: on SQLite each write transaction
starts with `BEGIN IMMEDIATE` (the database's one write lock, waited for up to `BUSY_TIMEOUT_S`); on PostgreSQL it
takes a transaction-level advisory lock (one key per kind of database) first. Reads take no lock (WAL readers see
the last commit). Every write is one transaction: what it changes commits together or not at all.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from tunelab.errors import UserError

BUSY_TIMEOUT_S = 60


class Database:
    """An engine on `url`, the tables of `metadata` created if need be; `write()` and `read()` give a connection
    inside one transaction. `lock_key`: the PostgreSQL advisory lock every write takes; `what` names the database
    in messages."""

    def __init__(self, url: str, metadata, lock_key: int, what: str = "database"):
        from sqlalchemy import create_engine, event

        self.url, self.lock_key, self.what = url, lock_key, what
        self.sqlite = url.startswith("sqlite")
        try:
            if self.sqlite:
                self.engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False})

                @event.listens_for(self.engine, "connect")
                def _connect(dbapi_conn, _record):
                    dbapi_conn.isolation_level = None  # transactions are begun below, not by the driver
                    cur = dbapi_conn.cursor()
                    cur.execute("PRAGMA journal_mode=WAL")
                    cur.execute("PRAGMA synchronous=FULL")  # a committed write survives a power cut
                    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
                    cur.close()

                @event.listens_for(self.engine, "begin")
                def _begin(conn):
                    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("write")
                                         else "BEGIN")
            else:
                self.engine = create_engine(url, pool_pre_ping=True)
            self._create(metadata)
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - a driver missing, a server down, a bad URL: the user's to fix
            raise UserError(f"cannot open the {what} {safe_url(url)}: {type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}") from None

    def _create(self, metadata) -> None:
        for attempt in range(5):  # two processes creating the tables at once on PostgreSQL: one of them retries
            try:
                with self.write() as conn:
                    metadata.create_all(conn)
                return
            except Exception:  # noqa: BLE001
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    @contextmanager
    def write(self):
        """A connection in a write transaction that holds the database's write lock until it commits."""
        from sqlalchemy import text

        with self.engine.execution_options(write=True).begin() as conn:
            if not self.sqlite:
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": self.lock_key})
            yield conn

    @contextmanager
    def read(self):
        with self.engine.connect() as conn:
            yield conn

    def close(self) -> None:
        self.engine.dispose()


def safe_url(url: str) -> str:
    """A URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL that does not parse is shown as given, it holds no password we know
        return url
