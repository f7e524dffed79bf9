"""The SQLite engine: one WAL-mode database file, one connection per process.

SQLite calls run on the trio thread: they are local and take microseconds, and a
thread hop per call would cost more than the call. A trio lock makes transactions of
one process take turns; WAL plus BEGIN IMMEDIATE lets the mount and the daemon (two
processes) share the file safely. The mount groups its commits (`run_group_commits`):
a commit costs more than most of its small transactions.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from types import TracebackType

import trio

from cloudfs.meta import schema
from cloudfs.meta.base import Conn, MetaStore, Txn

log = logging.getLogger(__name__)

#: how long a writer waits for the other process's write transaction
BUSY_TIMEOUT_S = 30.0
#: group commits: the longest a change waits for its commit
GROUP_WINDOW_S = 0.01
#: and the pause between two groups, in which transactions commit one by one and the
#: write lock is free between them: the daemon, whose busy handler polls, gets its
#: turn while the mount is busy (SQLite has no fair queue for the lock)
GROUP_GAP_S = 0.005


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
        # NORMAL: a commit survives a crash of the process, not of the machine; a
        # durable transaction (fsync) syncs the WAL after its commit
        self.db.execute("PRAGMA synchronous = NORMAL")
        self.db.execute("PRAGMA cache_size = -65536")
        self._lock = trio.Lock()
        self._conn = _SqliteConn(self.db)
        #: group commits (run_group_commits): the window, None while off
        self._window: float | None = None
        #: a group transaction is open: BEGIN IMMEDIATE done, COMMIT due
        self._group_open = False
        self._group_opened = trio.Event()
        #: no group transaction begins before this time (trio clock): other
        #: processes waiting for the write lock get their turn between groups
        self._quiet_until = 0.0

    # --- group commits ------------------------------------------------------------------

    async def run_group_commits(
        self,
        window_s: float = GROUP_WINDOW_S,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Until cancelled: write transactions of this process become savepoints of one
        long transaction, committed at most `window_s` after its first one. One
        commit (a WAL append) for many small operations; nothing is lost that was
        promised, because every durable transaction (fsync) commits the group and
        syncs the WAL, and the mount calls `commit()` before anything another
        process may depend on (a request to the daemon, an admin command's answer).
        A crash loses at most the last window, like a crash before a NORMAL commit
        reached the disk. On the way out the open group is committed."""
        self._window = window_s
        task_status.started()
        try:
            while True:
                await self._group_opened.wait()
                await trio.sleep(window_s)
                try:
                    await self.commit()
                except sqlite3.Error:
                    pass  # logged; the next group tries again
        finally:
            self._window = None
            with trio.CancelScope(shield=True):
                await self.commit()

    async def commit(self) -> None:
        if self._group_open:
            async with self._lock:
                self._commit_group()

    def _commit_group(self) -> None:
        """COMMIT the open group transaction (the caller holds the lock)."""
        if not self._group_open:
            return
        self._group_open = False
        self._group_opened = trio.Event()
        self._quiet_until = trio.current_time() + GROUP_GAP_S
        try:
            self.db.execute("COMMIT")
        except BaseException:
            # the operations of the group were answered already; they are lost as in
            # a crash before the commit, so say so loudly
            log.exception("the commit of a group of metadata changes failed")
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise

    def _sync_wal(self) -> None:
        """Make every commit so far durable: sync the WAL (where NORMAL commits go
        unsynced). A checkpoint syncs the WAL before it copies frames into the
        database file, so frames no longer in it are durable already."""
        try:
            fd = os.open(f"{self.path}-wal", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def _transaction(self, durable: bool, write: bool) -> _SqliteTransaction:
        return _SqliteTransaction(self, durable, write)

    def _open_group(self) -> None:
        """BEGIN the group transaction (the caller holds the lock)."""
        self.db.execute("BEGIN IMMEDIATE")
        self._group_open = True
        self._group_opened.set()

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
        if self._group_open:
            async with self._lock:
                self._commit_group()
        self.db.close()


#: how a `_SqliteTransaction` runs: a transaction of its own, a savepoint of the
#: group transaction, or a read inside the group transaction
_OWN, _SAVEPOINT, _GROUP_READ = range(3)


class _SqliteTransaction:
    """One transaction of `SqliteMetaStore` (the engine's `_transaction`): a savepoint
    of the open group transaction, or of a new one when group commits are on and the
    gap after the last group is over; else a transaction of its own. A class, not an
    async generator: a small transaction costs less than the generator machinery did.

    The process's lock is taken at once when nobody holds or waits for it, the common
    case: a trio.Lock's acquire() always passes through the scheduler, which on a busy
    mount cost more than the small transaction itself. (A transaction is then no
    checkpoint; loops of them checkpoint on their own, see the snapshot copy.)"""

    __slots__ = ("_durable", "_how", "_store", "_write")

    def __init__(self, store: SqliteMetaStore, durable: bool, write: bool) -> None:
        self._store = store
        self._durable = durable
        self._write = write
        self._how = _OWN

    async def __aenter__(self) -> Conn:
        store = self._store
        try:
            store._lock.acquire_nowait()
        except trio.WouldBlock:
            await store._lock.acquire()
        try:
            write = self._write
            if store._group_open or (
                write
                and not self._durable
                and store._window is not None
                and trio.current_time() >= store._quiet_until
            ):
                if not store._group_open:
                    store._open_group()
                if write:
                    store.db.execute("SAVEPOINT op")
                    self._how = _SAVEPOINT
                else:
                    self._how = _GROUP_READ
            else:
                store.db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                self._how = _OWN
        except BaseException:
            store._lock.release()
            raise
        return store._conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        store, db, how = self._store, self._store.db, self._how
        try:
            if exc_type is not None:
                if how == _OWN:
                    db.execute("ROLLBACK")
                elif how == _SAVEPOINT:
                    if db.in_transaction:
                        db.execute("ROLLBACK TO op")
                        db.execute("RELEASE op")
                    else:  # SQLite rolled the whole group back (an I/O error, a full disk)
                        store._group_open = False
                        store._group_opened = trio.Event()
                        log.error("a failed statement rolled back a group of metadata changes")
                return  # the exception goes on
            if how == _OWN:
                db.execute("COMMIT")
            else:
                if how == _SAVEPOINT:
                    db.execute("RELEASE op")
                if self._durable:
                    store._commit_group()
            if self._durable:
                store._sync_wal()
        finally:
            store._lock.release()
