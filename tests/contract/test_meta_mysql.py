"""What only the MySQL engine has: a real server's deadlocks and lock wait timeouts
retried by MetaStore.run, snapshot reads beside writers, connections the server drops,
and the errors a user sees for a wrong password, an unreachable server or a missing
database (never showing the password)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING
from urllib.parse import quote

import pymysql
import pytest
import trio

from cloudfs.errors import MetadataMissing, MetadataUnavailable, TransactionConflict
from cloudfs.meta import open_meta
from cloudfs.meta.base import MetaStore
from cloudfs.meta.mysql import SNAPSHOT_IDLE_S, MysqlMetaStore, pyformat
from cloudfs.meta.schema import ROOT_INODE

if TYPE_CHECKING:  # the fixture's type; conftest is not importable as a module
    from conftest import MariaDB

FS_UUID = "6f1c3a52-8a5e-4d3b-9a51-0c1d2e3f4a5b"
FILE = 0o100644


@pytest.fixture
def stores(mysql_url: str) -> Iterator[list[MetaStore]]:
    opened: list[MetaStore] = []
    yield opened
    for meta in opened:
        trio.run(meta.close)


def _open(stores: list[MetaStore], url: str) -> MetaStore:
    meta = open_meta(url)
    stores.append(meta)
    return meta


async def _two_files(meta: MetaStore) -> tuple[int, int]:
    await meta.initialize(FS_UUID, uid=0, gid=0)
    async with meta.transaction() as tx:
        a = await tx.create_inode(mode=FILE, uid=0, gid=0, nlink=1, now_ns=1)
        b = await tx.create_inode(mode=FILE, uid=0, gid=0, nlink=1, now_ns=1)
    return a.id, b.id


async def _crossed_updates(first: MetaStore, second: MetaStore, *, retry: bool) -> list[str]:
    """Two transactions lock inodes a, b in opposite orders: a real deadlock (1213).
    Each bumps both inodes' size by one. Returns what each side ended with."""
    a, b = await _two_files(first)
    first_locked, second_locked = trio.Event(), trio.Event()
    outcome: list[str] = []

    async def bump(meta: MetaStore, mine: int, theirs: int, locked: trio.Event,
                   other_locked: trio.Event) -> None:  # fmt: skip
        async with meta.transaction() as tx:
            await tx.conn.execute("UPDATE inodes SET size = size + 1 WHERE id = ?", (mine,))
            locked.set()
            await other_locked.wait()
            await tx.conn.execute("UPDATE inodes SET size = size + 1 WHERE id = ?", (theirs,))

    async def side(meta: MetaStore, *args: object) -> None:
        try:
            if retry:
                await meta.run(bump, meta, *args)
            else:
                await bump(meta, *args)  # type: ignore[arg-type]
            outcome.append("committed")
        except TransactionConflict as exc:
            assert "Deadlock" in exc.message
            outcome.append("conflict")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(side, first, a, b, first_locked, second_locked)
        nursery.start_soon(side, second, b, a, second_locked, first_locked)
    async with first.reading() as tx:
        sizes = [(await tx.get_inode(i)).size for i in (a, b)]  # type: ignore[union-attr]
    committed = outcome.count("committed")
    assert sizes == [committed, committed], "a loser leaves nothing behind"
    return sorted(outcome)


async def test_deadlock_is_a_conflict(stores: list[MetaStore], mysql_url: str) -> None:
    outcome = await _crossed_updates(
        _open(stores, mysql_url), _open(stores, mysql_url), retry=False
    )
    assert outcome == ["committed", "conflict"]


async def test_run_retries_a_deadlock(stores: list[MetaStore], mysql_url: str) -> None:
    outcome = await _crossed_updates(_open(stores, mysql_url), _open(stores, mysql_url), retry=True)
    assert outcome == ["committed", "committed"]


async def test_run_retries_a_lock_wait_timeout(
    stores: list[MetaStore], mysql_url: str, mariadb: MariaDB
) -> None:
    """Another client holds a row lock longer than innodb_lock_wait_timeout (1205)."""
    meta = _open(stores, mysql_url)
    a, _ = await _two_files(meta)
    database = mysql_url.rsplit("/", 1)[1]
    holder = mariadb.root()
    holder.select_db(database)
    attempts = 0
    try:
        with holder.cursor() as cur:
            cur.execute("SET GLOBAL innodb_lock_wait_timeout = 1")
            cur.execute("START TRANSACTION")
            cur.execute("SELECT size FROM inodes WHERE id = %s FOR UPDATE", (a,))
        release = threading.Timer(2.5, holder.rollback)
        release.start()
        await meta.close()  # new connections: they take the global timeout

        async def grow() -> None:
            nonlocal attempts
            attempts += 1
            async with meta.transaction() as tx:
                await tx.update_inode(a, size=42)

        await meta.run(grow)
        release.join()
    finally:
        with holder.cursor() as cur:
            cur.execute("SET GLOBAL innodb_lock_wait_timeout = 50")
        holder.close()
    assert attempts >= 2, "the first attempts timed out waiting for the lock"
    async with meta.reading() as tx:
        assert (await tx.get_inode(a)).size == 42  # type: ignore[union-attr]


async def test_readers_keep_a_snapshot(stores: list[MetaStore], mysql_url: str) -> None:
    meta, other = _open(stores, mysql_url), _open(stores, mysql_url)
    await meta.initialize(FS_UUID, uid=0, gid=0)
    async with meta.reading() as tx:
        assert await tx.lookup(ROOT_INODE, b"late") is None
        async with other.transaction() as tx2:
            await tx2.add_dentry(ROOT_INODE, b"late", ROOT_INODE)
        assert await tx.lookup(ROOT_INODE, b"late") is None
    async with meta.reading() as tx:
        assert await tx.lookup(ROOT_INODE, b"late") == ROOT_INODE


async def test_reads_run_beside_a_writer(stores: list[MetaStore], mysql_url: str) -> None:
    """A write transaction that waits does not hold up readers of the same store."""
    meta = _open(stores, mysql_url)
    await meta.initialize(FS_UUID, uid=0, gid=0)
    writer_in, reader_done = trio.Event(), trio.Event()

    async def writer() -> None:
        async with meta.transaction() as tx:
            await tx.set_info("x", "1")
            writer_in.set()
            await reader_done.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await writer_in.wait()
        with trio.fail_after(5):
            async with meta.reading() as tx:
                assert await tx.get_info("x") is None
        reader_done.set()


async def test_idle_readers_end_their_snapshots(
    stores: list[MetaStore], mysql_url: str, mariadb: MariaDB
) -> None:
    """A finished read leaves its snapshot to the next BEGIN, but never for long: an
    open snapshot makes the server keep undo history for every client."""
    meta = _open(stores, mysql_url)
    await meta.initialize(FS_UUID, uid=0, gid=0)
    async with meta.reading() as tx:
        conn_id = (await tx.conn.query("SELECT CONNECTION_ID()"))[0][0]

    def open_transactions() -> int:
        with mariadb.root() as root, root.cursor() as cur:
            cur.execute(
                "SELECT COUNT(*) FROM information_schema.innodb_trx WHERE trx_mysql_thread_id = %s",
                (conn_id,),
            )
            return int(cur.fetchone()[0])

    assert open_transactions() == 1, "the read's snapshot outlives it for a moment"
    await trio.sleep(SNAPSHOT_IDLE_S * 3)
    assert open_transactions() == 0


async def test_dropped_connections_reconnect(
    stores: list[MetaStore], mysql_url: str, mariadb: MariaDB
) -> None:
    meta = _open(stores, mysql_url)
    await meta.initialize(FS_UUID, uid=0, gid=0)
    ids = set()
    async with meta.transaction() as tx:
        ids.add((await tx.conn.query("SELECT CONNECTION_ID()"))[0][0])
    async with meta.reading() as tx:
        ids.add((await tx.conn.query("SELECT CONNECTION_ID()"))[0][0])
    with mariadb.root() as root, root.cursor() as cur:
        for conn_id in ids:
            cur.execute(f"KILL {int(conn_id)}")  # as wait_timeout or a restart would
    async with meta.transaction() as tx:
        await tx.set_info("after", "kill")
    async with meta.reading() as tx:
        assert await tx.get_info("after") == "kill"


async def test_statements_sharing_a_packet(stores: list[MetaStore], mysql_url: str) -> None:
    """BEGIN, deferred statements and the next statement go in one packet: a failing
    deferred statement fails the transaction (nothing of it stays), the connection
    serves the next transaction cleanly, and odd bytes survive being bound into the
    packet's text."""
    meta = _open(stores, mysql_url)
    await meta.initialize(FS_UUID, uid=0, gid=0)
    with pytest.raises(pymysql.IntegrityError):
        async with meta.transaction() as tx:
            await tx.conn.defer("INSERT INTO meta_info (name, value) VALUES (?, ?)", ("a", "1"))
            await tx.conn.defer("INSERT INTO meta_info (name, value) VALUES (?, ?)", ("a", "2"))
            await tx.conn.query("SELECT value FROM meta_info WHERE name = ?", ("a",))
    with pytest.raises(pymysql.IntegrityError):
        async with meta.transaction() as tx:
            await tx.conn.execute("UPDATE meta_info SET value = ? WHERE name = ?", ("x", "fs_uuid"))
            await tx.conn.defer("INSERT INTO meta_info (name, value) VALUES (?, ?)", ("b", "1"))
            await tx.conn.defer("INSERT INTO meta_info (name, value) VALUES (?, ?)", ("b", "2"))
    async with meta.reading() as tx:
        assert await tx.get_info("a") is None and await tx.get_info("b") is None
        assert await tx.get_info("fs_uuid") == FS_UUID
    odd = b"it's 100%s; --\\\x01\xff\n'); DROP TABLE inodes; --"
    async with meta.transaction() as tx:
        file = await tx.create_inode(mode=FILE, uid=0, gid=0, nlink=1, now_ns=1)
        await tx.conn.defer(
            "INSERT INTO dentries (parent, name, inode) VALUES (?, ?, ?)", (ROOT_INODE, odd, file.id)
        )
        found = await tx.conn.query(
            "SELECT inode FROM dentries WHERE parent = ? AND name = ?", (ROOT_INODE, odd)
        )
    assert found == [(file.id,)]
    async with meta.reading() as tx:
        assert await tx.lookup(ROOT_INODE, odd) == file.id


# --- what a user sees ------------------------------------------------------------------------


def _url(mariadb: MariaDB, database: str, password: str | None = None) -> str:
    auth = mariadb.user + (f":{quote(password, safe='')}" if password is not None else "")
    return f"mysql://{auth}@127.0.0.1:{mariadb.port}/{database}"


async def test_wrong_password(mariadb: MariaDB, mysql_url: str) -> None:
    database = mysql_url.rsplit("/", 1)[1]
    secret = "not-the-password-31337"
    meta = open_meta(_url(mariadb, database, secret))
    with pytest.raises(MetadataUnavailable) as caught:
        await meta.is_initialized()
    assert "Access denied" in caught.value.message
    assert secret not in caught.value.message and secret not in meta.where
    assert secret not in repr(meta.target)  # type: ignore[attr-defined]


async def test_password_sources(
    mariadb: MariaDB, mysql_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = mysql_url.rsplit("/", 1)[1]
    monkeypatch.delenv("CLOUDFS_MYSQL_PASSWORD")
    for meta in (
        open_meta(_url(mariadb, database, mariadb.password)),  # in the URL
        open_meta(mysql_url, password=mariadb.password),  # from a file, by the caller
    ):
        assert not await meta.is_initialized()
        await meta.close()
    monkeypatch.setenv("CLOUDFS_MYSQL_PASSWORD", mariadb.password)
    meta = open_meta(mysql_url)  # from the environment
    assert not await meta.is_initialized()
    await meta.close()
    monkeypatch.delenv("CLOUDFS_MYSQL_PASSWORD")
    with pytest.raises(MetadataUnavailable, match="Access denied"):
        await open_meta(mysql_url).is_initialized()


async def test_unix_socket(mariadb: MariaDB, mysql_url: str) -> None:
    database = mysql_url.rsplit("/", 1)[1]
    meta = open_meta(f"mysql://{mariadb.user}@localhost/{database}?unix_socket={mariadb.socket}")
    try:
        await meta.initialize(FS_UUID, uid=0, gid=0)
        assert await meta.check(FS_UUID)
        assert meta.where.endswith(f"?unix_socket={mariadb.socket}")
    finally:
        await meta.close()


async def test_unreachable_server() -> None:
    with pytest.raises(MetadataUnavailable, match="Can't connect"):
        await open_meta("mysql://cloudfs:pw@127.0.0.1:1/db").is_initialized()


async def test_missing_database(mariadb: MariaDB, mysql_url: str) -> None:
    with pytest.raises(MetadataMissing, match="does not exist"):
        await open_meta(_url(mariadb, "cloudfs_no_such_db")).is_initialized()


async def test_other_tables_are_no_filesystem(mariadb: MariaDB, mysql_url: str) -> None:
    database = mysql_url.rsplit("/", 1)[1]
    with mariadb.root() as root, root.cursor() as cur:
        cur.execute(f"CREATE TABLE {database}.unrelated (x INT)")
    meta = open_meta(mysql_url)
    try:
        assert not await meta.is_initialized()
    finally:
        await meta.close()


def test_engine_class(mysql_url: str) -> None:
    assert isinstance(open_meta(mysql_url), MysqlMetaStore)


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT a FROM t WHERE b = ? AND c = ?", "SELECT a FROM t WHERE b = %s AND c = %s"),
        ("SELECT '?', \"?\", `?` FROM t WHERE x = ?", "SELECT '?', \"?\", `?` FROM t WHERE x = %s"),
        ("SELECT 'it''s ?' WHERE a LIKE '%x' AND b = ?",
         "SELECT 'it''s ?' WHERE a LIKE '%%x' AND b = %s"),
        ("SELECT 5 % 2", "SELECT 5 %% 2"),
    ],
)  # fmt: skip
def test_placeholders(sql: str, expected: str) -> None:
    assert pyformat(sql) == expected


def test_placeholders_on_a_server(mariadb: MariaDB) -> None:
    """The translated statement gives the server the same values."""
    with mariadb.root() as db, db.cursor() as cur:
        cur.execute(pyformat("SELECT '?', 7 % 4, ?, ?"), ("%s", b"\xff?"))
        assert cur.fetchone() == ("?", 3, "%s", b"\xff?")


def test_server_error_codes_are_known() -> None:
    # a guard against a pymysql that renames what the engine relies on
    assert pymysql.constants.ER.LOCK_DEADLOCK == 1213
    assert pymysql.constants.ER.LOCK_WAIT_TIMEOUT == 1205
