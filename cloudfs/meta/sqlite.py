"""The SQLite engine: one WAL-mode database file, one connection per process.

SQLite calls run on the trio thread: they are local and take microseconds, and a
thread hop per call would cost more than the call. A trio lock makes transactions of
one process take turns; WAL plus BEGIN IMMEDIATE lets the mount and the daemon (two
processes) share the file safely.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import trio

from cloudfs.meta import schema
from cloudfs.meta.base import Conn, MetaStore, Txn

#: how long a writer waits for the other process's write transaction
BUSY_TIMEOUT_S = 30.0


class _SqliteConn(Conn):
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    async def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        return self.db.execute(sql, params).rowcount

    async def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        self.db.executemany(sql, rows)

    async def insert(self, sql: str, params: Sequence[object] = ()) -> int:
        rowid = self.db.execute(sql, params).lastrowid
        assert rowid is not None
        return rowid

    async def query(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        return self.db.execute(sql, params).fetchall()


class _DetachedSqliteConn(_SqliteConn):
    """A second connection's queries, each in a worker thread (sqlite3 lets go of the
    GIL while it works): the trio thread keeps answering meanwhile."""

    async def query(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        return await trio.to_thread.run_sync(lambda: self.db.execute(sql, params).fetchall())


class SqliteMetaStore(MetaStore):
    dialect = schema.SQLITE

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.where = str(self.path)
        # autocommit mode: transactions are begun explicitly, IMMEDIATE so that two
        # processes never deadlock upgrading read locks to write locks
        self.db = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        self.db.execute("PRAGMA journal_mode = WAL")
        # NORMAL: a commit survives a crash of the process, not of the machine; durable
        # transactions (fsync) switch to FULL for their commit, which syncs the WAL
        self.db.execute("PRAGMA synchronous = NORMAL")
        self.db.execute("PRAGMA cache_size = -65536")
        self._lock = trio.Lock()
        self._conn = _SqliteConn(self.db)

    @asynccontextmanager
    async def _transaction(self, durable: bool, write: bool) -> AsyncIterator[Conn]:
        async with self._lock:
            if durable:
                self.db.execute("PRAGMA synchronous = FULL")
            try:
                self.db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield self._conn
                except BaseException:
                    self.db.execute("ROLLBACK")
                    raise
                self.db.execute("COMMIT")
            finally:
                if durable:
                    self.db.execute("PRAGMA synchronous = NORMAL")

    async def is_initialized(self) -> bool:
        row = self.db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta_info'"
        ).fetchone()
        return row is not None

    @asynccontextmanager
    async def _detached(self) -> AsyncIterator[Txn]:
        db = sqlite3.connect(
            self.path.resolve().as_uri() + "?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S,
            isolation_level=None, check_same_thread=False,
        )  # fmt: skip
        try:
            # WAL: the snapshot is fixed by the first read and writers go on meanwhile
            db.execute("BEGIN")
            yield Txn(_DetachedSqliteConn(db), self.dialect)
        finally:
            db.close()  # ends the read transaction

    def detached_reading(self) -> AbstractAsyncContextManager[Txn]:
        """A read transaction on a connection of its own, without the process's lock."""
        if str(self.path) == ":memory:":
            return self.reading()  # a second connection would see another database
        return self._detached()

    async def close(self) -> None:
        self.db.close()
