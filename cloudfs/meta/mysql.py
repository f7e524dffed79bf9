"""The MySQL/MariaDB engine: pymysql connections, every call on a worker thread.

Connections and transactions only; the domain SQL lives in `base`. Writers of one
process take turns on one connection whose transactions are SERIALIZABLE, so reads
inside a write transaction lock what they read and a read-modify-write (nlink + 1)
can never lose an update to another process or machine; such conflicts end as a
deadlock on one side, which `MetaStore.run` retries. Read-only transactions use a
small pool of REPEATABLE READ connections and a consistent snapshot, without locks.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import pymysql
import pymysql.constants.CLIENT
import trio

from cloudfs.errors import MetadataMissing, MetadataUnavailable, TransactionConflict
from cloudfs.meta import schema
from cloudfs.meta.base import Conn, MetaStore
from cloudfs.meta.url import MysqlTarget

T = TypeVar("T")

#: read-only connections kept per store (writers share one more)
READ_POOL_SIZE = 4
CONNECT_TIMEOUT_S = 10

# MySQL error codes
_DEADLOCK = 1213
_LOCK_WAIT_TIMEOUT = 1205
_ACCESS_DENIED = (1044, 1045, 1698)
_UNKNOWN_DATABASE = 1049
#: the client lost (or never had) its connection: the server may be down or restarting
_CONNECTION_LOST = (2002, 2003, 2005, 2006, 2013, 2055)

#: strict: an over-long name is an error, never silently truncated
_SESSION_SETUP = ("SET SESSION sql_mode = 'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION'",)
_WRITER_SETUP = ("SET SESSION TRANSACTION ISOLATION LEVEL SERIALIZABLE",)
_READER_SETUP = ("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ",)


@functools.lru_cache(maxsize=4096)
def pyformat(sql: str) -> str:
    """`?` placeholders → pymysql's `%s` (and a literal `%` → `%%`, since pymysql
    %-formats the whole statement); a `?` inside a quoted literal or name stays."""
    out: list[str] = []
    quote: str | None = None
    for ch in sql:
        if ch == "%":
            out.append("%%")
        elif quote is not None:
            out.append(ch)
            if ch == quote:
                quote = None
        elif ch in "'\"`":
            quote = ch
            out.append(ch)
        else:
            out.append("%s" if ch == "?" else ch)
    return "".join(out)


def _execute(db: pymysql.Connection, sql: str, params: tuple) -> int:
    with db.cursor() as cur:
        return cur.execute(sql, params)


def _executemany(db: pymysql.Connection, sql: str, rows: list[tuple]) -> None:
    with db.cursor() as cur:
        cur.executemany(sql, rows)


def _insert(db: pymysql.Connection, sql: str, params: tuple) -> int:
    with db.cursor() as cur:
        cur.execute(sql, params)
        return cur.lastrowid


def _query(db: pymysql.Connection, sql: str, params: tuple) -> list[tuple]:
    with db.cursor() as cur:
        cur.execute(sql, params)
        return list(cur.fetchall())


def _close(db: pymysql.Connection) -> None:
    try:
        db.close()
    except pymysql.Error:
        pass  # already gone


class _MysqlConn(Conn):
    def __init__(self, store: MysqlMetaStore, db: pymysql.Connection) -> None:
        self.store = store
        self.db = db

    async def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        return await self.store.call(_execute, self.db, pyformat(sql), tuple(params))

    async def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        batch = [tuple(r) for r in rows]
        if batch:
            await self.store.call(_executemany, self.db, pyformat(sql), batch)

    async def insert(self, sql: str, params: Sequence[object] = ()) -> int:
        return await self.store.call(_insert, self.db, pyformat(sql), tuple(params))

    async def query(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        return await self.store.call(_query, self.db, pyformat(sql), tuple(params))


class MysqlMetaStore(MetaStore):
    dialect = schema.MYSQL

    def __init__(self, target: MysqlTarget, *, read_pool_size: int = READ_POOL_SIZE) -> None:
        self.target = target
        self.where = target.display()
        self._write_lock = trio.Lock()
        self._writer: pymysql.Connection | None = None
        self._readers: list[pymysql.Connection] = []
        self._reader_slots = trio.Semaphore(read_pool_size)

    # --- calls on worker threads, errors in cloudfs terms -----------------------------

    async def call(self, fn: Callable[..., T], db: pymysql.Connection, *args: Any) -> T:
        """Run `fn(db, *args)` on a worker thread; MySQL errors that are not bugs become
        TransactionConflict (retryable), MetadataUnavailable or MetadataMissing."""
        try:
            return await trio.to_thread.run_sync(fn, db, *args)
        except pymysql.OperationalError as exc:
            raise self._translate(exc) from None
        except pymysql.InterfaceError as exc:  # the connection was closed under us
            raise MetadataUnavailable(f"{self.where}: connection lost ({exc})") from None

    def _translate(self, exc: pymysql.OperationalError) -> Exception:
        code = exc.args[0] if exc.args else 0
        text = exc.args[1] if len(exc.args) > 1 else str(exc)
        if code in (_DEADLOCK, _LOCK_WAIT_TIMEOUT):
            return TransactionConflict(f"{self.where}: {text}")
        if code in _ACCESS_DENIED:
            return MetadataUnavailable(f"{self.where}: {text} (check user and password)")
        if code == _UNKNOWN_DATABASE:
            return MetadataMissing(f"{self.where}: the database does not exist")
        if code in _CONNECTION_LOST:
            return MetadataUnavailable(f"{self.where}: {text}")
        return exc  # anything else is a bug in the SQL: keep pymysql's error

    def _connect(self, setup: tuple[str, ...]) -> pymysql.Connection:
        t = self.target
        db = pymysql.connect(
            host=t.host,
            port=t.port,
            unix_socket=t.unix_socket,
            user=t.user,
            password=t.password or "",
            database=t.database,
            charset="utf8mb4",
            autocommit=True,  # transactions are explicit: START TRANSACTION ... COMMIT
            # an UPDATE reports the rows it matched, as SQLite does, not only those it
            # changed: "UPDATE, else INSERT" in base relies on it
            client_flag=pymysql.constants.CLIENT.FOUND_ROWS,
            connect_timeout=CONNECT_TIMEOUT_S,
        )
        try:
            for stmt in _SESSION_SETUP + setup:
                _execute(db, stmt, ())
        except BaseException:
            _close(db)
            raise
        return db

    async def _open(self, write: bool) -> pymysql.Connection:
        setup = _WRITER_SETUP if write else _READER_SETUP
        try:
            return await trio.to_thread.run_sync(self._connect, setup)
        except pymysql.OperationalError as exc:
            raise self._translate(exc) from None

    # --- transactions -----------------------------------------------------------------

    @asynccontextmanager
    async def _transaction(self, durable: bool, write: bool) -> AsyncIterator[Conn]:
        # `durable` needs nothing: InnoDB's default commit is durable
        if write:
            async with self._write_lock:
                self._writer = await self._start(self._writer, write=True)
                try:
                    async with self._within(self._writer) as conn:
                        yield conn
                finally:
                    if not self._writer.open:
                        self._writer = None
        else:
            async with self._reader_slots:
                db = await self._start(self._readers.pop() if self._readers else None, write=False)
                try:
                    async with self._within(db) as conn:
                        yield conn
                finally:
                    if db.open:
                        self._readers.append(db)

    async def _start(self, db: pymysql.Connection | None, write: bool) -> pymysql.Connection:
        """Begin a transaction on `db`, or on a new connection when there is none or the
        server dropped it while it was idle (wait_timeout, a restart): nothing has
        happened yet, so a fresh connection may start over once."""
        begin = (
            "START TRANSACTION"
            if write
            else "START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY"
        )
        if db is not None:
            try:
                await self.call(_execute, db, begin, ())
                return db
            except MetadataUnavailable:
                await trio.to_thread.run_sync(_close, db)
        db = await self._open(write)
        try:
            await self.call(_execute, db, begin, ())
        except BaseException:
            await trio.to_thread.run_sync(_close, db)
            raise
        return db

    @asynccontextmanager
    async def _within(self, db: pymysql.Connection) -> AsyncIterator[Conn]:
        """The begun transaction on `db` … COMMIT; ROLLBACK on any exception, shielded
        from cancellation (the connection must leave the transaction before its next
        user). A connection that fails to roll back is closed and left out of the pool."""
        try:
            yield _MysqlConn(self, db)
        except BaseException:
            with trio.CancelScope(shield=True):
                try:
                    await self.call(_execute, db, "ROLLBACK", ())
                except Exception:  # noqa: BLE001 - the body's error is the one to report
                    await trio.to_thread.run_sync(_close, db)
            raise
        try:
            await self.call(_execute, db, "COMMIT", ())
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_close, db)  # its state is unknown
            raise

    async def is_initialized(self) -> bool:
        async with self.reading() as tx:
            row = await tx.conn.query_one(
                "SELECT 1 FROM information_schema.tables"
                " WHERE table_schema = DATABASE() AND table_name = 'meta_info'"
            )
        return row is not None

    async def close(self) -> None:
        dbs = [*self._readers, *([self._writer] if self._writer is not None else [])]
        self._readers, self._writer = [], None
        for db in dbs:
            await trio.to_thread.run_sync(_close, db)
