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
from cloudfs.codec.crypto import Keys
from cloudfs.errors import CorruptBlock
from cloudfs.metabackup import list_backups, open_dump
from cloudfs.objectstore.local import LocalStore

if TYPE_CHECKING:  # the fixtures' type; conftest is not importable as a module
    from conftest import CloudFS

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
    return sorted(str(p.relative_to(fs.store)) for p in (fs.store / "meta").glob("*"))


def test_restore_metadata_on_a_fresh_cache_dir(make_fs: Callable[..., CloudFS]) -> None:
    fs = make_fs()
    make_tree(fs.mnt)
    before = tree(fs.mnt)
    fs.flush()
    fs.unmount()  # the mount backs the metadata up before it exits
    assert backups(fs), "no backup at unmount"
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


def test_mount_restore_metadata(make_fs: Callable[..., CloudFS]) -> None:
    fs = make_fs()
    make_tree(fs.mnt)
    before = tree(fs.mnt)
    fs.unmount()  # uploads may still be going on: the backup has pending blocks
    assert backups(fs), "no backup at unmount"
    fs.wait_daemon_gone(60)  # uploaded, backed up once more (if anything changed), exited
    assert 1 <= len(backups(fs)) <= 2, backups(fs)
    shutil.rmtree(fs.cache)
    r = fs.mount("--restore-metadata")
    assert r.stdout.startswith("restored the metadata from meta/backup-")
    assert tree(fs.mnt) == before
    assert fs.stat_json()["pending_uploads"] == 0
    fs.unmount()
    # it never replaces metadata that is there
    r = fs.run("mount.cloudfs", fs.storage_url, fs.mnt, "--cachedir", fs.cache,
               "--restore-metadata")  # fmt: skip
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "meta.db exists: restoring would replace it" in r.stderr
    assert not fs.mounted


@pytest.mark.log_errors_expected(r"(?i)object not found|read failed")
def test_blocks_pending_at_backup_time(make_fs: Callable[..., CloudFS]) -> None:
    """A backup taken with uploads pending: after the restore, those that reached the
    store are stored; a file whose blocks never did reads as an I/O error."""
    fs = make_fs()
    (fs.mnt / "uploaded").write_bytes(os.urandom(3 * MiB))
    fs.flush()
    daemon = fs.daemon_pid()
    assert daemon is not None
    os.kill(daemon, signal.SIGSTOP)
    try:
        (fs.mnt / "lost").write_bytes(os.urandom(3 * MiB))
        fs.unmount()  # backed up with the blocks of "lost" pending
    finally:
        os.kill(daemon, signal.SIGKILL)  # the machine dies: never uploaded
        fs.wait_exit(daemon, 10)
    shutil.rmtree(fs.cache)
    r = fs.check("fsck.cloudfs", "--restore-metadata", fs.storage_url, "--cachedir", fs.cache)
    assert re.search(r"blocks pending at backup time: \d+ found in the store, [1-9]\d* missing",
                     r.stdout), r.stdout  # fmt: skip
    fs.mount()
    assert len((fs.mnt / "uploaded").read_bytes()) == 3 * MiB
    with pytest.raises(OSError) as raised:
        (fs.mnt / "lost").read_bytes()
    assert raised.value.errno == 5


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
    newest = (fs.store / keys[-1]).read_bytes()
    assert marker.encode() not in newest
    dump = trio.run(open_newest, fs)
    assert marker.encode() in dump
    with pytest.raises(CorruptBlock):
        open_dump(Keys.from_master(os.urandom(32)), newest)
    flipped = bytearray(newest)
    flipped[len(flipped) // 2] ^= 1
    with pytest.raises(CorruptBlock):
        open_dump(trio.run(fs_keys, fs), bytes(flipped))
    db = fs.root / "restored.db"
    db.write_bytes(dump)
    names = {r[0] for r in sqlite3.connect(db).execute("SELECT name FROM dentries")}
    assert f"{marker}-0".encode() in names


async def fs_keys(fs: CloudFS) -> Keys:
    sb = await config.read_superblock(LocalStore(fs.store))
    return config.unlock(sb, fs.passphrase.encode())


async def open_newest(fs: CloudFS) -> bytes:
    store = LocalStore(fs.store)
    newest = (await list_backups(store))[-1]
    return open_dump(await fs_keys(fs), await store.get(newest.key))


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
