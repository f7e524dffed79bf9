"""The MySQL/MariaDB engine: pymysql connections, every call on a worker thread.

Connections and transactions only; the domain SQL lives in `base`. Writers of one
process take turns on one connection whose transactions are SERIALIZABLE, so reads
inside a write transaction lock what they read and a read-modify-write (nlink + 1)
can never lose an update to another process or machine; such conflicts end as a
deadlock on one side, which `MetaStore.run` retries. Read-only transactions use a
small pool of REPEATABLE READ connections and a consistent snapshot, without locks.

Round trips: a transaction's BEGIN, and the statements it deferred (`Conn.defer`), travel
in one packet with the statement that follows them (the connection allows several
statements per query); COMMIT takes the deferred statements along the same way. A
read is then one round trip to the server, and an unlink or a create a few.
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
#: how long an idle pooled reader may keep its finished snapshot open
SNAPSHOT_IDLE_S = 0.5
CONNECT_TIMEOUT_S = 10
#: several statements go in one packet up to this many characters (the server's
#: max_allowed_packet is 16 MiB by default)
MULTI_PACKET_CHARS = 1 << 20

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
_BEGIN_WRITE = "START TRANSACTION"
_BEGIN_READ = "START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY"


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


def _insert_each(db: pymysql.Connection, sql: str, rows: list[tuple]) -> list[int]:
    with db.cursor() as cur:
        ids = []
        for params in rows:
            cur.execute(sql, params)
            ids.append(cur.lastrowid)
        return ids


def _execute_each(db: pymysql.Connection, sql: str, rows: list[tuple]) -> list[int]:
    with db.cursor() as cur:
        return [cur.execute(sql, params) for params in rows]


def _query(db: pymysql.Connection, sql: str, params: tuple) -> list[tuple]:
    with db.cursor() as cur:
        cur.execute(sql, params)
        return list(cur.fetchall())


def _bind(db: pymysql.Connection, sql: str, params: tuple) -> str:
    """`sql` with its parameters escaped into it, exactly as pymysql's execute does."""
    return sql % tuple(map(db.escape, params))


def _run_packets(cur: pymysql.cursors.Cursor, bound: list[str]) -> None:
    """Run bound statements, as few packets as the size limit allows; the cursor is
    left at the last one's result. A failing statement raises its error, and the
    server runs none of those after it."""
    i = 0
    while i < len(bound):
        j, size = i + 1, len(bound[i])
        while j < len(bound) and size + len(bound[j]) < MULTI_PACKET_CHARS:
            size += len(bound[j]) + 1
            j += 1
        cur.execute(";".join(bound[i:j]))  # no args: pymysql leaves the text as it is
        for _ in range(j - i - 1):
            cur.nextset()  # raises the error of a statement after the first
        i = j


def _execute_all(db: pymysql.Connection, _sql: str, statements: list[tuple[str, tuple]]) -> None:
    with db.cursor() as cur:
        _run_packets(cur, [_bind(db, sql, params) for sql, params in statements])


#: how each one-statement call reads its result off the cursor
_RESULT: dict[Callable[..., Any], Callable[[pymysql.cursors.Cursor], Any]] = {
    _execute: lambda cur: cur.rowcount,
    _query: lambda cur: list(cur.fetchall()),
    _insert: lambda cur: cur.lastrowid,
}


def _prefixed(
    prefix: list[str], fn: Callable[..., T], db: pymysql.Connection, sql: str, params: Any
) -> T:
    """The bound statements of `prefix` (BEGIN, deferred statements), then `fn`'s: in
    one packet when `fn` runs a single statement, else the prefix in one packet first.
    One trip to a worker thread either way."""
    if fn is _execute_all:
        with db.cursor() as cur:
            _run_packets(cur, [*prefix, *(_bind(db, s, p) for s, p in params)])
        return None  # type: ignore[return-value]
    result = _RESULT.get(fn)
    if result is None:
        with db.cursor() as cur:
            _run_packets(cur, prefix)
        return fn(db, sql, params)
    with db.cursor() as cur:
        _run_packets(cur, [*prefix, _bind(db, sql, params)])
        return result(cur)  # type: ignore[no-any-return]


def _close(db: pymysql.Connection) -> None:
    try:
        db.close()
    except pymysql.Error:
        pass  # already gone


class _StaleConnection(Exception):
    """The server had closed an idle pooled connection: its transaction never began."""

    def __init__(self, cause: pymysql.Error) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _begin_then(
    prefix: list[str], fn: Callable[..., T], db: pymysql.Connection, sql: str, params: Any
) -> T:
    """A transaction's first trip: BEGIN (first in `prefix`) and its first statements.
    A connection lost meanwhile took nothing into effect (nothing was committed), so
    the caller may start over on another connection. Statements that may COMMIT
    (`_execute_all`) therefore never travel with BEGIN: a COMMIT whose answer was lost
    may have taken effect."""
    try:
        if fn is not _execute_all:
            return _prefixed(prefix, fn, db, sql, params)
        with db.cursor() as cur:
            _run_packets(cur, prefix)
    except pymysql.InterfaceError as exc:
        raise _StaleConnection(exc) from None
    except pymysql.OperationalError as exc:
        if exc.args and exc.args[0] in _CONNECTION_LOST:
            raise _StaleConnection(exc) from None
        raise
    return fn(db, sql, params)


def _prefixed_deferred(
    deferred: list[tuple[str, tuple]], fn: Callable[..., T], db: pymysql.Connection, sql: str,
    params: Any,
) -> T:
    return _prefixed([_bind(db, s, p) for s, p in deferred], fn, db, sql, params)


def _begin_deferred(
    begin: str, deferred: list[tuple[str, tuple]], fn: Callable[..., T], db: pymysql.Connection,
    sql: str, params: Any,
) -> T:
    return _begin_then([begin, *(_bind(db, s, p) for s, p in deferred)], fn, db, sql, params)


class _MysqlConn(Conn):
    """One transaction's connection. BEGIN travels with the first statement (a thread
    hop less per transaction), and a transaction that runs no statement costs nothing."""

    def __init__(
        self, store: MysqlMetaStore, db: pymysql.Connection, *, write: bool, pooled: bool
    ) -> None:
        self.store = store
        self.db = db
        self.write = write
        #: BEGIN, until the first statement has carried it
        self.begin: str | None = _BEGIN_WRITE if write else _BEGIN_READ
        #: from the pool: the server may have closed it while it was idle
        self._pooled = pooled
        #: statements whose outcome nobody waits for (`defer`): sent with the next one
        self.deferred: list[tuple[str, tuple]] = []

    async def _run(self, fn: Callable[..., T], sql: str, params: Any) -> T:
        deferred, self.deferred = self.deferred, []
        begin = self.begin
        if begin is None:
            if not deferred:
                return await self.store.call(fn, self.db, sql, params)
            return await self.store.call(
                functools.partial(_prefixed_deferred, deferred, fn), self.db, sql, params
            )
        try:
            result = await self.store.call(
                functools.partial(_begin_deferred, begin, deferred, fn), self.db, sql, params
            )
        except _StaleConnection as stale:
            if not self._pooled:
                raise self.store._translate(stale.cause) from None
            # closed while idle (wait_timeout, a server restart): nothing took effect,
            # so start over once, on a fresh connection
            await trio.to_thread.run_sync(_close, self.db)
            self.store._open_snapshots.discard(self.db)
            self.db = await self.store._open(self.write)
            self._pooled = False
            self.deferred = deferred + self.deferred
            return await self._run(fn, sql, params)
        except BaseException:
            self.begin = None  # BEGIN may have run: the ROLLBACK clears what it left
            raise
        self.begin = None
        return result

    async def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        return await self._run(_execute, pyformat(sql), tuple(params))

    async def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        batch = [tuple(r) for r in rows]
        if batch:
            await self._run(_executemany, pyformat(sql), batch)

    async def defer(self, sql: str, params: Sequence[object] = ()) -> None:
        self.deferred.append((pyformat(sql), tuple(params)))

    async def commit(self) -> None:
        """COMMIT, after the deferred statements in the same trip (and BEGIN, when
        they are the transaction's only statements)."""
        if self.deferred or self.begin is None:
            await self._run(_execute_all, "", [("COMMIT", ())])

    async def execute_all(self, statements: Sequence[tuple[str, Sequence[object]]]) -> None:
        batch = [(pyformat(sql), tuple(params)) for sql, params in statements]
        if batch:
            await self._run(_execute_all, "", batch)

    async def insert(self, sql: str, params: Sequence[object] = ()) -> int:
        return await self._run(_insert, pyformat(sql), tuple(params))

    async def insert_each(self, sql: str, rows: Sequence[Sequence[object]]) -> list[int]:
        batch = [tuple(r) for r in rows]
        return await self._run(_insert_each, pyformat(sql), batch) if batch else []

    async def execute_each(self, sql: str, rows: Sequence[Sequence[object]]) -> list[int]:
        batch = [tuple(r) for r in rows]
        return await self._run(_execute_each, pyformat(sql), batch) if batch else []

    async def query(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        return await self._run(_query, pyformat(sql), tuple(params))


class MysqlMetaStore(MetaStore):
    dialect = schema.MYSQL

    def __init__(self, target: MysqlTarget, *, read_pool_size: int = READ_POOL_SIZE) -> None:
        self.target = target
        self.where = target.display()
        self._write_lock = trio.Lock()
        self._writer: pymysql.Connection | None = None
        self._readers: list[pymysql.Connection] = []
        self._reader_slots = trio.Semaphore(read_pool_size)
        #: pooled readers whose finished read-only transaction is not committed yet
        self._open_snapshots: set[pymysql.Connection] = set()
        self._committer_running = False

    # --- calls on worker threads, errors in cloudfs terms -----------------------------

    async def call(self, fn: Callable[..., T], db: pymysql.Connection, *args: Any) -> T:
        """Run `fn(db, *args)` on a worker thread; MySQL errors that are not bugs become
        TransactionConflict (retryable), MetadataUnavailable or MetadataMissing."""
        try:
            return await trio.to_thread.run_sync(fn, db, *args)
        except (pymysql.OperationalError, pymysql.InterfaceError) as exc:
            raise self._translate(exc) from None

    def _translate(self, exc: pymysql.Error) -> Exception:
        if isinstance(exc, pymysql.InterfaceError):
            return MetadataUnavailable(f"{self.where}: connection lost ({exc})")
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
            client_flag=pymysql.constants.CLIENT.FOUND_ROWS
            # BEGIN, deferred statements and the next one in one packet (`_prefixed`)
            | pymysql.constants.CLIENT.MULTI_STATEMENTS,
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
                pooled, self._writer = self._writer, None
                conn = _MysqlConn(
                    self, pooled or await self._open(write=True), write=True, pooled=bool(pooled)
                )
                try:
                    async with self._within(conn):
                        yield conn
                finally:
                    if conn.db.open:
                        self._writer = conn.db
        else:
            async with self._reader_slots:
                pooled = self._readers.pop() if self._readers else None
                conn = _MysqlConn(
                    self, pooled or await self._open(write=False), write=False, pooled=bool(pooled)
                )
                try:
                    async with self._within(conn):
                        yield conn
                finally:
                    if conn.db.open:
                        self._readers.append(conn.db)

    @asynccontextmanager
    async def _within(self, conn: _MysqlConn) -> AsyncIterator[None]:
        """The body, then COMMIT; ROLLBACK on any exception, shielded from cancellation
        (the connection must leave the transaction before its next user). A connection
        that fails to roll back or commit is closed and left out of the pool."""
        try:
            yield
        except BaseException:
            conn.deferred.clear()  # never sent
            if conn.begin is None:
                with trio.CancelScope(shield=True):
                    try:
                        await self.call(_execute, conn.db, "ROLLBACK", ())
                    except Exception:  # noqa: BLE001 - the body's error is the one to report
                        await trio.to_thread.run_sync(_close, conn.db)
                self._open_snapshots.discard(conn.db)
            raise
        if conn.begin is not None and not conn.deferred:
            return  # no statement ran: nothing began
        if not conn.write:
            # A read-only transaction has nothing to commit: its COMMIT is left to the
            # next BEGIN on the connection (an implicit commit), which saves a round
            # trip per read, or to the committer if the connection stays idle. (A
            # transaction that ran no statement left the earlier one as it was.)
            self._open_snapshots.add(conn.db)
            if not self._committer_running:
                self._committer_running = True
                trio.lowlevel.spawn_system_task(self._commit_idle_snapshots)
            return
        try:
            await conn.commit()
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_close, conn.db)  # its state is unknown
            raise

    async def is_initialized(self) -> bool:
        async with self.reading() as tx:
            row = await tx.conn.query_one(
                "SELECT 1 FROM information_schema.tables"
                " WHERE table_schema = DATABASE() AND table_name = 'meta_info'"
            )
        return row is not None

    async def _commit_idle_snapshots(self) -> None:
        """End the read-only transactions of idle pooled readers: an open snapshot makes
        InnoDB keep the undo history of every later change (on every client's
        behalf), so none may stay open for long."""
        try:
            while self._open_snapshots:
                await trio.sleep(SNAPSHOT_IDLE_S)
                for db in list(self._open_snapshots):
                    if not db.open:
                        self._open_snapshots.discard(db)
                        continue
                    async with self._reader_slots:
                        if db not in self._open_snapshots or db not in self._readers:
                            continue
                        self._readers.remove(db)
                        self._open_snapshots.discard(db)
                        try:
                            await self.call(_execute, db, "COMMIT", ())
                        except Exception:  # noqa: BLE001 - a broken reader is dropped
                            await trio.to_thread.run_sync(_close, db)
                        else:
                            self._readers.append(db)
        finally:
            self._committer_running = False

    async def close(self) -> None:
        self._open_snapshots.clear()
        dbs = [*self._readers, *([self._writer] if self._writer is not None else [])]
        self._readers, self._writer = [], None
        for db in dbs:
            await trio.to_thread.run_sync(_close, db)
