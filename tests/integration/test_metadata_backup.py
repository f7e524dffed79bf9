"""Metadata backups: taken at unmount, periodically and kept to the newest N, sealed
with the filesystem's keys; `fsck.cloudfs --restore-metadata` (and `mount.cloudfs
--restore-metadata`) rebuild a lost metadata database on a fresh cache dir with the
same tree and contents."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import sqlite3
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio

from cloudfs import config
from cloudfs.cache import CacheDir
from cloudfs.codec.crypto import Keys
from cloudfs.config import create_filesystem
from cloudfs.errors import CorruptBlock, UsageError
from cloudfs.meta import open_meta
from cloudfs.metabackup import (
    MAGIC,
    PART_INFIX,
    PART_SIZE,
    list_backups,
    part_key,
    put_backup,
    put_rows_backup,
    read_backup,
    restore_newest,
    restore_newest_into,
    seal_dump,
    snapshot,
)
from cloudfs.metadump import dump_rows
from cloudfs.objectstore.local import LocalStore

if TYPE_CHECKING:  # the fixtures' type; conftest is not importable as a module
    from conftest import CloudFS, MariaDB

pytestmark = pytest.mark.timeout(300)

MiB = 1 << 20
BACKUP_KEY = re.compile(r"^meta/backup-\d{8}T\d{6}Z-\d{8}$")


def make_tree(root: Path) -> None:
    (root / "docs" / "deep" / "er").mkdir(parents=True)
    (root / "docs" / "a.txt").write_bytes(b"hello\n" * 1000)
    (root / "docs" / "deep" / "big").write_bytes(os.urandom(9 * MiB))
    (root / "docs" / "deep" / "er" / "empty").write_bytes(b"")
    (root / "sparse").write_bytes(b"")
    with open(root / "sparse", "r+b") as f:
        f.seek(5 * MiB)
        f.write(b"end")
    os.symlink("docs/a.txt", root / "link")
    os.link(root / "docs" / "a.txt", root / "hard")
    os.chmod(root / "docs" / "a.txt", 0o640)
    os.setxattr(root / "docs" / "deep" / "big", "user.color", b"blue")
    os.mkfifo(root / "fifo")


def tree(root: Path) -> dict[str, Any]:
    """Everything a user sees of a tree: names, types, modes, sizes, links, xattrs,
    mtimes and contents."""
    seen: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            st = path.lstat()
            entry: dict[str, Any] = {"mode": st.st_mode, "nlink": st.st_nlink,
                                     "mtime": st.st_mtime_ns, "size": st.st_size}  # fmt: skip
            if stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                entry["sha"] = hashlib.sha256(path.read_bytes()).hexdigest()
                entry["xattrs"] = {a: os.getxattr(path, a) for a in os.listxattr(path)}
            seen[str(path.relative_to(root))] = entry
    return seen


def backups(fs: CloudFS) -> list[str]:
    """The complete backups: their manifests' keys."""
    return sorted(str(p.relative_to(fs.store)) for p in (fs.store / "meta").glob("*")
                  if PART_INFIX not in p.name)  # fmt: skip


def test_restore_metadata_on_a_fresh_cache_dir(make_fs: Callable[..., CloudFS]) -> None:
    fs = make_fs()
    make_tree(fs.mnt)
    before = tree(fs.mnt)
    fs.flush()
    fs.unmount()  # SQLite: the mount backs the metadata up before it exits
    deadline = time.monotonic() + 180  # MySQL: the daemon's backup once the mount left
    while not backups(fs):
        assert fs.metadata is not None and time.monotonic() < deadline, "no backup at unmount"
        time.sleep(0.2)
    fs.wait_daemon_gone(60)
    key = backups(fs)[-1]
    assert BACKUP_KEY.match(key), key

    # the machine is lost: a new cache dir, the metadata from the store
    shutil.rmtree(fs.cache)
    r = fs.check("fsck.cloudfs", "--restore-metadata", fs.storage_url, "--cachedir", fs.cache)
    assert f"from backup {key} (" in r.stdout
    fs.mount()
    assert tree(fs.mnt) == before
    # and it is a working filesystem
    (fs.mnt / "docs" / "new").write_bytes(b"after the restore")
    fs.remount()
    assert (fs.mnt / "docs" / "new").read_bytes() == b"after the restore"


def test_mount_restore_metadata(
    make_fs: Callable[..., CloudFS], request: pytest.FixtureRequest
) -> None:
    """mount.cloudfs --restore-metadata on a fresh cache dir: into its meta.db, or with
    `--metadata mysql://...` into an empty database (the suite on MySQL)."""
    fs = make_fs()
    make_tree(fs.mnt)
    before = tree(fs.mnt)
    fs.unmount()  # uploads may still be going on: the backup has pending blocks
    deadline = time.monotonic() + 180  # MySQL: the daemon's backup once the mount left
    while not backups(fs):
        assert time.monotonic() < deadline, "no backup at unmount"
        time.sleep(0.2)
    fs.wait_daemon_gone(60)  # uploaded, backed up once more (if anything changed), exited
    assert 1 <= len(backups(fs)) <= 2, backups(fs)
    shutil.rmtree(fs.cache)
    into: list[str] = []
    mariadb = fresh = None
    if fs.metadata is not None:  # the database is lost with the machine: a fresh one
        mariadb = request.getfixturevalue("mariadb")
        fresh = mariadb.create_database()
        into = ["--metadata", mariadb.url(fresh)]
    try:
        r = fs.mount("--restore-metadata", *into)
        assert r.stdout.startswith("restored the metadata from meta/backup-")
        assert tree(fs.mnt) == before
        assert fs.stat_json()["pending_uploads"] == 0
        fs.unmount()
        # it never replaces metadata that is there
        r = fs.run("mount.cloudfs", fs.storage_url, fs.mnt, "--cachedir", fs.cache,
                   "--restore-metadata", *into)  # fmt: skip
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        refusal = "is not empty" if into else "meta.db exists: restoring would replace it"
        assert refusal in r.stderr, r.stderr
        assert not fs.mounted
        fs.kill_daemon()  # before its database goes
    finally:
        if mariadb is not None:
            mariadb.drop_database(fresh)


@pytest.mark.log_errors_expected(r"(?i)object not found|read failed")
def test_blocks_pending_at_backup_time(make_fs: Callable[..., CloudFS]) -> None:
    """A backup taken with uploads pending: after the restore, those that reached the
    store are stored; a file whose blocks never did reads as an I/O error. (SQLite: the
    mount's backup at unmount; MySQL: the daemon's row dump, taken here by the same call
    since the daemon is frozen, restored over the lost database with --force.)"""
    fs = make_fs()
    (fs.mnt / "uploaded").write_bytes(os.urandom(3 * MiB))
    fs.flush()
    daemon = fs.daemon_pid()
    assert daemon is not None
    os.kill(daemon, signal.SIGSTOP)
    try:
        (fs.mnt / "lost").write_bytes(os.urandom(3 * MiB))
        fs.unmount()  # SQLite: backed up with the blocks of "lost" pending
        if fs.metadata is not None:
            trio.run(put_rows_backup_now, fs)
    finally:
        os.kill(daemon, signal.SIGKILL)  # the machine dies: never uploaded
        fs.wait_exit(daemon, 10)
    shutil.rmtree(fs.cache)
    into = () if fs.metadata is None else ("--metadata", fs.metadata, "--force")
    r = fs.check("fsck.cloudfs", "--restore-metadata", fs.storage_url, "--cachedir", fs.cache,
                 *into)  # fmt: skip
    assert re.search(r"blocks pending at backup time: \d+ found in the store, [1-9]\d* missing",
                     r.stdout), r.stdout  # fmt: skip
    fs.mount()
    assert len((fs.mnt / "uploaded").read_bytes()) == 3 * MiB
    with pytest.raises(OSError) as raised:
        (fs.mnt / "lost").read_bytes()
    assert raised.value.errno == 5


@pytest.mark.sqlite_only("reads the backups as SQLite files; on MySQL the daemon's row "
                         "dumps are one per period: test_mysql_backups_once_per_period_...")
def test_backups_are_periodic_sealed_and_pruned(make_fs: Callable[..., CloudFS]) -> None:
    fs = make_fs(mount=False)
    fs.mount("--backup-interval", "0.5", "--backup-keep", "3")
    marker = "marker-" + os.urandom(6).hex()
    for i in range(8):
        (fs.mnt / f"{marker}-{i}").write_bytes(b"x")
        time.sleep(0.6)
    keys = backups(fs)
    assert 2 <= len(keys) <= 3, keys
    assert all(BACKUP_KEY.match(k) for k in keys), keys
    seqs = [int(k.rsplit("-", 1)[1]) for k in keys]
    assert seqs == sorted(seqs) and seqs[-1] >= 4, seqs
    # sealed: no file name in the clear, and only the filesystem's keys open it
    objects = [p.read_bytes() for p in (fs.store / "meta").glob(f"{keys[-1].rsplit('/')[-1]}*")]
    assert len(objects) >= 2  # the manifest and a part
    assert not any(marker.encode() in body for body in objects)
    db = fs.root / "restored.db"
    trio.run(open_newest, fs, db, trio.run(fs_keys, fs))
    names = {r[0] for r in sqlite3.connect(db).execute("SELECT name FROM dentries")}
    assert f"{marker}-0".encode() in names
    with pytest.raises(CorruptBlock):
        trio.run(open_newest, fs, fs.root / "x.db", Keys.from_master(os.urandom(32)))
    part = fs.store / part_key(keys[-1], 0)
    flipped = bytearray(part.read_bytes())
    flipped[len(flipped) // 2] ^= 1
    part.write_bytes(bytes(flipped))
    with pytest.raises(CorruptBlock):
        trio.run(open_newest, fs, fs.root / "x.db", trio.run(fs_keys, fs))


async def put_rows_backup_now(fs: CloudFS) -> None:
    """What the daemon does on MySQL at a backup request."""
    meta = open_meta(fs.metadata, password=fs.env["CLOUDFS_MYSQL_PASSWORD"])
    try:
        key = await put_rows_backup(LocalStore(fs.store), await fs_keys(fs), CacheDir(fs.cache),
                                    meta, encrypt=True, level=3)  # fmt: skip
    finally:
        await meta.close()
    assert key is not None


async def fs_keys(fs: CloudFS) -> Keys:
    sb = await config.read_superblock(LocalStore(fs.store))
    return config.unlock(sb, fs.passphrase.encode())


async def open_newest(fs: CloudFS, out: Path, keys: Keys) -> None:
    store = LocalStore(fs.store)
    newest = (await list_backups(store))[-1]
    await read_backup(store, keys, newest.key, out)


async def test_backups_stream_in_parts(tmp_path: Path) -> None:
    """A database larger than a part goes up as parts of at most PART_SIZE plus a
    manifest, and comes back identical; pruning takes a backup's parts with it, and
    the parts of a backup cut short; a whole-dump backup of an older version is still
    read."""
    store = LocalStore(tmp_path / "store")
    _sb, keys = await create_filesystem(store, b"passphrase")
    cache = CacheDir(tmp_path / "cache")
    cache.create()
    db = tmp_path / "meta.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE t (b BLOB)")
    conn.executemany("INSERT INTO t VALUES (?)", [(os.urandom(100_000),) for _ in range(100)])
    conn.commit()
    conn.close()
    expected = tmp_path / "expected.db"
    snapshot(db, expected)
    assert expected.stat().st_size > 2 * PART_SIZE

    first = await put_backup(store, keys, cache, db, encrypt=True, level=3, keep=1)
    assert first is not None
    parts = sorted(p for p in (tmp_path / "store" / "meta").iterdir() if PART_INFIX in p.name)
    assert len(parts) == -(-expected.stat().st_size // PART_SIZE)
    assert all(p.stat().st_size <= PART_SIZE + 1024 for p in parts)
    out = tmp_path / "out.db"
    assert await read_backup(store, keys, first, out) == expected.stat().st_size
    assert out.read_bytes() == expected.read_bytes()

    # a backup cut short before its manifest (long ago): parts without one
    leftover = "meta/backup-20200101T000000Z-00000002"
    await store.put(part_key(leftover, 0), b"cut short")
    second = await put_backup(store, keys, cache, db, encrypt=True, level=3, keep=1, force=True)
    assert second is not None
    left = sorted(str(p.name) for p in (tmp_path / "store" / "meta").iterdir())
    assert left == sorted(
        [second.rsplit("/")[-1]] + [part_key(second, n).rsplit("/")[-1] for n in range(len(parts))]
    )

    # the format of older versions: one object holding the whole dump
    old_key = "meta/backup-20200101T000000Z-00000009"
    await store.put(old_key, MAGIC + seal_dump(keys, expected.read_bytes(), encrypt=True,
                                               level=3)[len(MAGIC):])  # fmt: skip
    assert await read_backup(store, keys, old_key, out) == expected.stat().st_size
    assert out.read_bytes() == expected.read_bytes()


def test_restore_without_backups_or_with_the_wrong_passphrase(
    make_fs: Callable[..., CloudFS], tmp_path: Path
) -> None:
    fs = make_fs(mount=False)
    r = fs.run("fsck.cloudfs", "--restore-metadata", fs.storage_url, "--cachedir",
               tmp_path / "fresh")  # fmt: skip
    assert r.returncode == 8, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"fsck.cloudfs: the store holds no metadata backup: {fs.storage_url}"
    ]
    fs.mount()
    fs.unmount()
    env = {**fs.env, "CLOUDFS_PASSPHRASE": "wrong"}
    r = fs.run("fsck.cloudfs", "--restore-metadata", fs.storage_url, "--cachedir",
               tmp_path / "fresh", env=env)  # fmt: skip
    assert r.returncode == 3 and r.stderr.strip() == "fsck.cloudfs: wrong passphrase"
    assert not (tmp_path / "fresh" / "meta.db").exists()
    # without the mode, fsck checks the filesystem (issue 6): here its cache dir is missing
    r = fs.run("fsck.cloudfs", fs.storage_url, "--cachedir", tmp_path / "fresh")
    assert r.returncode == 8 and "is no cache dir of this filesystem" in r.stderr


# --- MySQL metadata -------------------------------------------------------------------------
#
# Tests name `mysql_url` before `make_fs`: fixtures end in reverse order, so the mounts and
# daemons stop before the test's database is dropped.


def test_mysql_metadata_backup_and_restore_into_a_fresh_database(
    mysql_url: str, mariadb: MariaDB, make_fs: Callable[..., CloudFS]
) -> None:
    """mkfs on MySQL, a tree written through a mount; the daemon backs the database up
    when the mount leaves; `fsck.cloudfs --restore-metadata --metadata` loads it into a
    fresh database (and refuses one that is not empty); a mount on that database shows
    the same tree and contents, and works."""
    fs = make_fs(mkfs=False, mount=False)
    fs.mkfs("--metadata", mysql_url)
    fs.mount()
    make_tree(fs.mnt)
    before = tree(fs.mnt)
    fs.flush()
    fs.unmount()  # the last mount left: the daemon backs the database up
    deadline = time.monotonic() + 180
    while not backups(fs):
        assert time.monotonic() < deadline, "no backup of the MySQL metadata"
        time.sleep(0.2)
    fs.kill_daemon()  # SIGTERM: a clean stop, sooner than its idle exit
    key = backups(fs)[-1]
    assert BACKUP_KEY.match(key), key

    fresh = mariadb.create_database()
    try:
        fresh_url = mariadb.url(fresh)
        shutil.rmtree(fs.cache)
        r = fs.check("fsck.cloudfs", "--restore-metadata", fs.storage_url, "--cachedir",
                     fs.cache, "--metadata", fresh_url)  # fmt: skip
        assert f"from backup {key} (" in r.stdout and fresh in r.stdout, r.stdout
        # never into a database that holds tables of the schema, unless --force
        r = fs.run("fsck.cloudfs", "--restore-metadata", fs.storage_url, "--cachedir",
                   fs.cache, "--metadata", fresh_url)  # fmt: skip
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1, r.stderr
        assert "is not empty" in lines[0] and "Traceback" not in r.stderr

        fs.mount()  # the cache dir now names the fresh database
        assert tree(fs.mnt) == before
        assert fs.stat_json()["pending_uploads"] == 0
        (fs.mnt / "docs" / "new").write_bytes(b"after the restore")
        fs.remount()
        assert (fs.mnt / "docs" / "new").read_bytes() == b"after the restore"
        fs.unmount()
        fs.kill_daemon()  # before its database goes
    finally:
        mariadb.drop_database(fresh)


async def test_mysql_backups_once_per_period_and_across_engines(
    mysql_url: str, mariadb: MariaDB, tmp_path: Path
) -> None:
    """Two processes sharing one MySQL database (two stores open on it) back up at the
    same moment: one backup is taken. It restores into an empty MySQL database and
    into SQLite with every row as it was; a SQLite backup restores into MySQL."""
    store = LocalStore(tmp_path / "store")
    sb, keys = await create_filesystem(store, b"passphrase")
    caches = [CacheDir(tmp_path / f"cache{n}") for n in (1, 2)]
    for cache in caches:
        cache.create()
    source = open_meta(mysql_url)
    other = open_meta(mysql_url)
    fresh = mariadb.create_database()
    target = open_meta(mariadb.url(fresh))
    try:
        await source.initialize(sb.uuid, uid=os.getuid(), gid=os.getgid())
        async with source.transaction() as tx:
            for n in range(30):  # more rows than a batch of the test's dumps
                ino = await tx.create_inode(mode=0o100644, uid=0, gid=0, nlink=1, now_ns=n)
                await tx.conn.execute("INSERT INTO dentries (parent, name, inode) VALUES (?, ?, ?)",
                                      (1, b"f\xff%d" % n, ino.id))  # fmt: skip
                await tx.conn.execute("INSERT INTO xattrs (inode, name, value) VALUES (?, ?, ?)",
                                      (ino.id, b"user.x", os.urandom(50)))  # fmt: skip

        keys_got: list[str | None] = []

        async def backup(meta: object, cache: CacheDir) -> None:
            keys_got.append(await put_rows_backup(store, keys, cache, meta, encrypt=True,
                                                  level=3, unless_within=600))  # type: ignore[arg-type]  # fmt: skip

        async with trio.open_nursery() as nursery:
            nursery.start_soon(backup, source, caches[0])
            nursery.start_soon(backup, other, caches[1])
        assert sorted(keys_got, key=str) == sorted([None, keys_got[0] or keys_got[1]], key=str)
        assert len(await list_backups(store)) == 1

        expected = tmp_path / "expected.rows"
        await dump_rows(source, expected, batch=7)
        lines = expected.read_bytes().splitlines()
        assert len(lines) > 100

        restored = await restore_newest_into(store, keys, sb.uuid, target, tmp_path / "scratch")
        assert restored.pending_missing == 0
        got = tmp_path / "got.rows"
        await dump_rows(target, got, batch=7)
        assert got.read_bytes() == expected.read_bytes()
        with pytest.raises(UsageError, match="is not empty"):
            await restore_newest_into(store, keys, sb.uuid, target, tmp_path / "scratch")

        # a MySQL backup into SQLite: the same rows
        db = tmp_path / "restored.db"
        await restore_newest(store, keys, sb.uuid, db)
        lite = open_meta(str(db))
        try:
            await dump_rows(lite, got, batch=7)
        finally:
            await lite.close()
        assert got.read_bytes().splitlines()[1:] == lines[1:]

        # and a SQLite backup into MySQL (--force: over the tables there)
        await put_backup(store, keys, caches[0], db, encrypt=True, level=3, force=True)
        await restore_newest_into(store, keys, sb.uuid, target, tmp_path / "scratch", force=True)
        await dump_rows(target, got, batch=7)
        assert got.read_bytes() == expected.read_bytes()
    finally:
        for meta in (source, other, target):
            await meta.close()
        mariadb.drop_database(fresh)
