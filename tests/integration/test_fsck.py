"""fsck.cloudfs after deliberate damage (issue 6), one test per kind: each damage is
reported (exit 4), `--repair` fixes what can be fixed (exit 1), a second fsck is
clean (exit 0), and the files that were intact before the damage read back the same
after a remount (with the cache dropped, so from the store)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from historyutil import make_tree, tree_state

if TYPE_CHECKING:
    from conftest import CloudFS, MetadataSQL

pytestmark = pytest.mark.timeout(600)

MiB = 1 << 20


@contextmanager
def metadata(fs: CloudFS) -> Iterator[MetadataSQL]:
    """The filesystem's metadata database, for damaging it (nothing may run)."""
    with fs.metadata_db() as db:
        yield db


def fsck(fs: CloudFS, *args: str) -> subprocess.CompletedProcess[str]:
    return fs.run("fsck.cloudfs", fs.storage_url, "--cachedir", str(fs.cache), *args)


def expect(fs: CloudFS, code: int, *args: str, says: str | None = None) -> str:
    r = fsck(fs, *args)
    out = r.stdout + r.stderr
    assert r.returncode == code, f"fsck {' '.join(args)} exited {r.returncode}:\n{out}"
    if says is not None:
        assert says in out, out
    return out


def damaged_then_repaired(
    fs: CloudFS, says: str, *, data: bool = False, repair: tuple[str, ...] = ()
) -> str:
    """fsck finds `says` (4), --repair (with `repair` options) fixes it (1), a second
    fsck is clean (0)."""
    extra = ("--check-data",) if data else ()
    expect(fs, 4, *extra, says=says)
    out = expect(fs, 1, "--repair", *repair, *extra, says=says)
    assert "[NOT FIXED]" not in out, out
    expect(fs, 0, *extra, says="clean")
    return out


@pytest.fixture
def populated(fs: CloudFS) -> tuple[CloudFS, dict[str, tuple]]:
    """A filesystem with a tree of files, uploaded and unmounted; fsck finds it clean."""
    make_tree(fs.mnt / "tree", files=20, big=3 * MiB)
    (fs.mnt / "victim").write_bytes(os.urandom(2 * MiB))
    fs.flush()
    state = tree_state(fs.mnt / "tree")
    fs.unmount()
    expect(fs, 0, says="clean")
    expect(fs, 0, "--check-data", says="clean")
    return fs, state


def intact(fs: CloudFS, state: dict[str, tuple]) -> None:
    fs.drop_cached_blocks()
    fs.mount()
    assert tree_state(fs.mnt / "tree") == state
    fs.unmount()


def _block_of(fs: CloudFS, path: str) -> bytes:
    """A block only the file at `path` (from the root) uses."""
    with metadata(fs) as db:
        ino = 1
        for part in path.strip("/").split("/"):
            (ino,) = db.execute(
                "SELECT inode FROM dentries WHERE parent = ? AND name = ?", (ino, part.encode())
            ).fetchone()
        rows = db.execute(
            "SELECT e.block FROM extents e JOIN blocks b ON b.id = e.block"
            " WHERE e.inode = ? AND b.refcount = 1",
            (ino,),
        ).fetchall()
    assert rows, f"{path} has no block of its own"
    return bytes(rows[0][0])


def _object(fs: CloudFS, block_id: bytes) -> Path:
    return fs.store / "blocks" / block_id.hex()[:2] / block_id.hex()


def test_dentry_to_a_missing_inode(populated: tuple[CloudFS, dict]) -> None:
    fs, state = populated
    with metadata(fs) as db:
        db.execute("INSERT INTO dentries (parent, name, inode) VALUES (1, ?, 999999)", (b"ghost",))
    damaged_then_repaired(fs, "entry b'ghost' of directory 1 names missing inode 999999")
    intact(fs, state)


def test_wrong_nlink_and_allocated_size(populated: tuple[CloudFS, dict]) -> None:
    fs, state = populated
    with metadata(fs) as db:
        (ino,) = db.execute("SELECT inode FROM dentries WHERE name = ?", (b"victim",)).fetchone()
        db.execute("UPDATE inodes SET nlink = 7, allocated = 12345 WHERE id = ?", (ino,))
        (tree,) = db.execute("SELECT inode FROM dentries WHERE name = ?", (b"tree",)).fetchone()
        db.execute("UPDATE inodes SET nlink = 2 WHERE id = ?", (tree,))
    out = damaged_then_repaired(fs, f"inode {ino}: nlink 7, should be 1")
    assert f"inode {ino}: allocated size 12345, its extents hold {2 * MiB}" in out, out
    intact(fs, state)
    fs.mount()
    assert os.stat(fs.mnt / "tree").st_nlink == 2 + 2  # its subdirectories docs and empty-dir
    assert os.stat(fs.mnt / "victim").st_blocks * 512 == 2 * MiB  # st_blocks: the column


def test_wrong_refcount(populated: tuple[CloudFS, dict]) -> None:
    fs, state = populated
    block = _block_of(fs, "/tree/big.bin")
    with metadata(fs) as db:
        db.execute("UPDATE blocks SET refcount = 5 WHERE id = ?", (block,))
    damaged_then_repaired(fs, f"block {block.hex()}: refcount 5, 1 extent rows name it")
    intact(fs, state)


def test_block_row_whose_object_was_deleted(populated: tuple[CloudFS, dict]) -> None:
    fs, state = populated
    block = _block_of(fs, "/tree/big.bin")
    _object(fs, block).unlink()
    # the cache dir still holds its plaintext: it is uploaded again
    out = damaged_then_repaired(fs, f"block {block.hex()} is stored but its object is missing")
    assert _object(fs, block).exists()
    assert "waited for upload: uploaded" in out
    intact(fs, state)


def test_object_and_cached_copy_gone_loses_only_that_data(populated: tuple[CloudFS, dict]) -> None:
    fs, state = populated
    block = _block_of(fs, "/victim")
    _object(fs, block).unlink()
    fs.drop_cached_blocks()
    out = damaged_then_repaired(fs, f"DATA LOST: block {block.hex()}")
    assert "used by /victim (inode" in out and "versions live" in out
    intact(fs, state)
    fs.mount()
    data = (fs.mnt / "victim").read_bytes()
    assert len(data) == 2 * MiB and data.count(0) > 100_000, "the lost range reads as zeros"


def test_orphan_object(populated: tuple[CloudFS, dict]) -> None:
    fs, state = populated
    fake = bytes(range(32))
    _object(fs, fake).parent.mkdir(exist_ok=True)
    _object(fs, fake).write_bytes(b"not referenced by anything")
    (fs.store / "blocks" / "00" / "not-a-block").write_bytes(b"stray")
    # no grace period (the default on SQLite; on MySQL an hour, for other machines'
    # uploads whose rows are still to come)
    damaged_then_repaired(fs, f"object of block {fake.hex()} has no row",
                          repair=("--orphan-grace", "0s"))  # fmt: skip
    assert not _object(fs, fake).exists()
    assert not (fs.store / "blocks" / "00" / "not-a-block").exists()
    intact(fs, state)


def test_orphan_object_waits_for_the_grace_period(populated: tuple[CloudFS, dict]) -> None:
    fs, _state = populated
    fake = bytes(range(1, 33))
    _object(fs, fake).parent.mkdir(exist_ok=True)
    _object(fs, fake).write_bytes(b"x")
    # within the grace period a note (a writer may be about to commit its row): clean
    expect(fs, 0, "--repair", "--orphan-grace", "2s", says="has no row (deleted by a repair")
    assert _object(fs, fake).exists()
    time.sleep(2.5)
    expect(fs, 1, "--repair", "--orphan-grace", "2s", says=f"object of block {fake.hex()}")
    assert not _object(fs, fake).exists()
    expect(fs, 0, says="clean")


def test_bit_flipped_in_a_stored_object(populated: tuple[CloudFS, dict]) -> None:
    fs, state = populated
    block = _block_of(fs, "/tree/big.bin")
    path = _object(fs, block)
    body = bytearray(path.read_bytes())
    body[len(body) // 2] ^= 0x10
    path.write_bytes(bytes(body))
    expect(fs, 0, says="clean")  # only reading the data finds it
    out = damaged_then_repaired(fs, f"block {block.hex()} is damaged in the store", data=True)
    assert "/tree/big.bin (inode" in out
    intact(fs, state)


def test_unreachable_and_nameless_inodes(populated: tuple[CloudFS, dict]) -> None:
    fs, state = populated
    with metadata(fs) as db:
        (docs,) = db.execute("SELECT inode FROM dentries WHERE name = ?", (b"docs",)).fetchone()
        db.execute("DELETE FROM dentries WHERE name = ?", (b"docs",))
        db.execute(
            "INSERT INTO inodes (mode, uid, gid, nlink, size, rdev, atime_ns, mtime_ns,"
            " ctime_ns, version, flags) VALUES (33188, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)"
        )
    out = damaged_then_repaired(fs, f"inode {docs} is not reachable from the root")
    assert "left open-unlinked by a crash; freed" in out
    fs.mount()
    moved = fs.mnt / "lost+found" / str(docs)
    assert tree_state(moved) == {
        k.removeprefix("docs/"): v for k, v in state.items() if k.startswith("docs/")
    }
    os.rename(moved, fs.mnt / "tree" / "docs")
    assert tree_state(fs.mnt / "tree") == state
    fs.unmount()
    expect(fs, 0, says="clean")


def test_an_unfinished_snapshot_copy_is_freed(populated: tuple[CloudFS, dict]) -> None:
    """A crash while `cloudfs snapshot create` writes its batches leaves the copy's tree
    without a name, its root at nlink 0: fsck frees all of it, not only the root."""
    fs, state = populated
    fs.mount()
    fs.check("cloudfs", "snapshot", "create", fs.mnt / "tree", fs.mnt / "copy")
    fs.unmount()
    with metadata(fs) as db:
        (copy,) = db.execute("SELECT inode FROM dentries WHERE name = ?", (b"copy",)).fetchone()
        db.execute("DELETE FROM dentries WHERE name = ?", (b"copy",))
        db.execute("UPDATE inodes SET nlink = nlink - 1 WHERE id = 1")
        db.execute("UPDATE inodes SET nlink = 0 WHERE id = ?", (copy,))
    out = damaged_then_repaired(fs, f"directory {copy} has no name: an unfinished copy; freed")
    assert "lost+found" not in out, out
    intact(fs, state)
    fs.mount()
    assert sorted(os.listdir(fs.mnt)) == ["tree", "victim"]
    fs.unmount()


def test_kill_9_of_mount_and_daemon_mid_write(fs: CloudFS) -> None:
    make_tree(fs.mnt / "tree", files=10, big=2 * MiB)
    fs.flush()
    state = tree_state(fs.mnt / "tree")
    daemon = fs.daemon_pid()
    assert daemon is not None
    synced = os.urandom(3 * MiB)
    f = open(fs.mnt / "growing", "wb")  # noqa: SIM115 - held open across the crash
    g = open(fs.mnt / "tree" / "big.bin", "r+b")  # noqa: SIM115
    try:
        f.write(synced[:MiB])
        os.fsync(f.fileno())
        os.kill(daemon, signal.SIGSTOP)  # from here on nothing is uploaded
        f.write(synced[MiB:])
        os.fsync(f.fileno())
        f.write(os.urandom(300_000))  # appended, never fsynced
        f.flush()
        g.seek(100)
        g.write(b"never fsynced" * 100)  # an overwrite: a dirty overlay
        g.flush()
        assert os.listdir(fs.cache / "dirty")
        fs.kill_mount()
    finally:
        for h in (f, g):
            try:
                h.close()
            except OSError:
                pass  # the mount is gone
    os.kill(daemon, signal.SIGKILL)
    fs.wait_exit(daemon, 30)

    out = expect(fs, 4)
    died = (
        "mount lease is held by this cache dir's mount, which died"
        if fs.metadata is None
        else "died, holding"  # MySQL: no lease, the dead mount's `clients` row
    )
    for says in (died, "dirty overlays of a mount that died", "wait for upload"):
        assert says in out, out
    out = expect(fs, 1, "--repair")
    assert "[NOT FIXED]" not in out and "waited for upload: uploaded" in out, out
    expect(fs, 0, says="clean")
    fs.drop_cached_blocks()
    fs.mount()
    assert tree_state(fs.mnt / "tree") == state
    assert (fs.mnt / "growing").read_bytes() == synced


def test_fsck_refuses_a_mounted_filesystem(fs: CloudFS) -> None:
    expect(fs, 8, says="mounted")
    fs.unmount()
    r = fs.run("fsck.cloudfs", fs.storage_url, "--cachedir", str(fs.root / "nowhere"))
    assert r.returncode == 8 and "no cache dir" in r.stderr
