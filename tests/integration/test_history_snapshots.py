"""`cloudfs snapshot` on a real mount (issue 6): a copy-on-write copy of a tree from
the metadata alone — the store does not grow, later changes to the source leave the
copy as it was, deleting the source keeps it readable, read-only copies refuse every
change — named snapshots under .cloudfs/snapshots/, and one at 10,000 files."""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from typing import TYPE_CHECKING

import pytest
from historyutil import make_tree, tree_state
from posixutil import expect_errno

if TYPE_CHECKING:
    from conftest import CloudFS

pytestmark = pytest.mark.timeout(900)

MiB = 1 << 20


def _blocks(fs: CloudFS) -> set[str]:
    return {k for k in fs.store_objects() if k.startswith("blocks/")}


def test_snapshot_copies_without_data_and_stays_unchanged(fs: CloudFS) -> None:
    m = fs.mnt
    make_tree(m / "src")
    fs.flush()
    blocks, stored = _blocks(fs), fs.store_block_bytes()
    original = tree_state(m / "src")

    r = fs.check("cloudfs", "snapshot", "create", m / "src", m / "copy")
    assert "no data copied" in r.stdout
    r = fs.check("cloudfs", "snapshot", "create", m / "src", "monday")
    assert "snapshot monday (read-only)" in r.stdout
    named = m / ".cloudfs" / "snapshots" / "monday"
    assert tree_state(m / "copy") == original
    assert tree_state(named) == original
    assert os.stat(m / "copy").st_ino != os.stat(m / "src").st_ino
    fs.flush()
    assert _blocks(fs) == blocks and fs.store_block_bytes() == stored

    # the copy is a tree of its own: changing either side leaves the other as it was
    with open(m / "src" / "big.bin", "r+b") as f:
        f.seek(5 * MiB)
        f.write(b"changed in the source")
    (m / "src" / "docs" / "f001.txt").write_bytes(b"rewritten")
    os.unlink(m / "src" / "docs" / "f005.txt")
    os.rename(m / "src" / "docs" / "f007.txt", m / "src" / "moved.txt")
    os.chmod(m / "src" / "docs" / "deep", 0o700)
    os.setxattr(m / "src" / "docs", "user.tag", b"changed")
    (m / "copy" / "docs" / "f009.txt").write_bytes(b"changed in the copy")
    assert tree_state(named) == original
    changed = dict(original)
    assert tree_state(m / "copy")["docs/f009.txt"][5] != original["docs/f009.txt"][5]
    del changed["docs/f009.txt"]
    assert {k: v for k, v in tree_state(m / "copy").items() if k != "docs/f009.txt"} == changed
    assert (m / "src" / "docs" / "f009.txt").read_bytes() != b"changed in the copy"

    listed = json.loads(fs.check("cloudfs", "snapshot", "list", "--json", m).stdout)
    assert [(s["name"], s["source"], s["readonly"]) for s in listed] == [("monday", "/src", True)]

    # deleting the source keeps the snapshots readable, also after a remount
    shutil.rmtree(m / "src")
    fs.remount()
    assert tree_state(named) == original
    assert (m / "copy" / "big.bin").read_bytes() == (named / "big.bin").read_bytes()

    # a copy of a named snapshot brings the tree back, writable
    fs.check("cloudfs", "snapshot", "create", named, m / "restored")
    assert tree_state(m / "restored") == original
    (m / "restored" / "new").write_bytes(b"writable")

    r = fs.check("cloudfs", "snapshot", "delete", m, "monday")
    assert "deleted snapshot monday" in r.stdout
    assert os.listdir(m / ".cloudfs" / "snapshots") == []
    assert fs.check("cloudfs", "snapshot", "list", m).stdout.strip() == "no snapshots"
    assert tree_state(m / "restored")["big.bin"] == original["big.bin"]
    r = fs.run("cloudfs", "snapshot", "delete", m, "monday")
    assert r.returncode != 0 and "no snapshot named monday" in r.stderr


def test_readonly_copy_refuses_changes_until_unlocked(fs: CloudFS) -> None:
    m = fs.mnt
    make_tree(m / "src", files=6, big=MiB)
    fs.check("cloudfs", "snapshot", "create", "--readonly", m / "src", m / "ro")
    fs.check("cloudfs", "snapshot", "create", m / "src", "named")
    original = tree_state(m / "ro")
    for tree in (m / "ro", m / ".cloudfs" / "snapshots" / "named"):
        f = tree / "docs" / "f001.txt"
        assert f.read_bytes()
        expect_errno(errno.EROFS, os.open, f, os.O_WRONLY)
        expect_errno(errno.EROFS, os.open, f, os.O_RDONLY | os.O_TRUNC)
        expect_errno(errno.EROFS, os.open, tree / "new", os.O_CREAT | os.O_WRONLY, 0o644)
        expect_errno(errno.EROFS, os.truncate, f, 0)
        expect_errno(errno.EROFS, os.unlink, f)
        expect_errno(errno.EROFS, os.rmdir, tree / "empty-dir")
        expect_errno(errno.EROFS, os.mkdir, tree / "docs" / "new")
        expect_errno(errno.EROFS, os.symlink, "x", tree / "s")
        expect_errno(errno.EROFS, os.link, f, tree / "hard2")
        expect_errno(errno.EROFS, os.link, f, m / "hard2")
        expect_errno(errno.EROFS, os.rename, f, tree / "docs" / "renamed")
        expect_errno(errno.EROFS, os.rename, f, m / "out")
        expect_errno(errno.EROFS, os.rename, m / "src" / "empty", tree / "in")
        expect_errno(errno.EROFS, os.chmod, f, 0o777)
        expect_errno(errno.EROFS, os.utime, f, (1, 1))
        expect_errno(errno.EROFS, os.setxattr, f, "user.x", b"1")
        expect_errno(errno.EROFS, os.removexattr, tree / "docs", "user.tag")
        with pytest.raises(OSError) as err:
            shutil.rmtree(tree)
        assert err.value.errno == errno.EROFS
    expect_errno(errno.EROFS, os.rename, m / "ro", m / "ro2")
    r = fs.run("cloudfs", "restore", m / "ro" / "big.bin", "--version", "1")
    assert r.returncode != 0 and "read-only tree" in r.stderr
    r = fs.run("cloudfs", "restore", m / "src" / "big.bin", "--version", "1", "--to",
               m / "ro" / "into")  # fmt: skip
    assert r.returncode != 0 and "read-only tree" in r.stderr
    assert tree_state(m / "ro") == original

    r = fs.run("cloudfs", "snapshot", "unlock", m / ".cloudfs" / "snapshots" / "named")
    assert r.returncode != 0 and "stay read-only" in r.stderr
    r = fs.check("cloudfs", "snapshot", "unlock", m / "ro")
    assert "writable" in r.stdout
    (m / "ro" / "docs" / "f001.txt").write_bytes(b"now writable")
    os.rename(m / "ro", m / "rw")
    shutil.rmtree(m / "rw")
    assert tree_state(m / ".cloudfs" / "snapshots" / "named") == original


def test_errors(fs: CloudFS) -> None:
    m = fs.mnt
    (m / "a").mkdir()
    (m / "b").mkdir()
    r = fs.run("cloudfs", "snapshot", "create", m / "a", m / "b")
    assert r.returncode != 0 and "exists" in r.stderr
    r = fs.run("cloudfs", "snapshot", "create", m / "nothing", "x")
    assert r.returncode != 0 and "no such file" in r.stderr
    fs.check("cloudfs", "snapshot", "create", m / "a", "x")
    r = fs.run("cloudfs", "snapshot", "create", m / "b", "x")
    assert r.returncode != 0 and "exists" in r.stderr
    r = fs.run("cloudfs", "snapshot", "create", m / ".cloudfs" / "versions", "y")
    assert r.returncode != 0 and "history view" in r.stderr
    r = fs.run("cloudfs", "snapshot", "create", m / "a", "/tmp/elsewhere")
    assert r.returncode != 0 and "not in a cloudfs mount" in r.stderr


def test_snapshot_of_ten_thousand_files(fs: CloudFS) -> None:
    m = fs.mnt
    src = m / "many"
    src.mkdir()
    for d in range(100):
        sub = src / f"d{d:02d}"
        sub.mkdir()
        for i in range(100):
            (sub / f"f{i:02d}").write_bytes(b"file %d/%d\n" % (d, i) * 20)
    fs.flush()
    blocks = _blocks(fs)
    started = time.monotonic()
    r = fs.check("cloudfs", "snapshot", "create", src, m / "copy", timeout=600)
    elapsed = time.monotonic() - started
    assert "10101 entries" in r.stdout
    print(f"snapshot of 10,000 files: {r.stdout.strip()} (command: {elapsed:.2f} s)")
    assert sorted(os.listdir(m / "copy")) == sorted(os.listdir(src))
    for d in (0, 42, 99):
        names = sorted(os.listdir(m / "copy" / f"d{d:02d}"))
        assert len(names) == 100
        for i in (0, 55, 99):
            assert (m / "copy" / f"d{d:02d}" / f"f{i:02d}").read_bytes() == (
                b"file %d/%d\n" % (d, i) * 20
            )
    fs.flush()
    assert _blocks(fs) == blocks
