"""`cloudfs snapshot` on a real mount (issue 6): a copy-on-write copy of a tree from
the metadata alone — the store does not grow, later changes to the source leave the
copy as it was, deleting the source keeps it readable, read-only copies refuse every
change — named snapshots under .cloudfs/snapshots/, and one of 10,000 files and 1 GiB."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
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


def _block_names(fs: CloudFS) -> set[str]:
    """The block objects in the store (names only: cheaper than _blocks at 1 GiB)."""
    return {p.name for p in fs.block_objects()}


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


def _write_small(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def test_snapshot_of_ten_thousand_files_and_a_gibibyte(fs: CloudFS) -> None:
    """The issue's test: a tree of 10,000 small files and 1 GiB in four big files.

    To stay fast on a loaded machine the tree is built the way a user could: 1,250
    files written through the mount, then doubled three times by `snapshot create`
    (copies of copies: a tree/{a,b}/{a,b}/{a,b}/dNN/fNN layout); the big files reuse
    one random buffer behind a distinct prefix, so most of their blocks dedup."""
    m = fs.mnt
    t0 = time.monotonic()
    phases: list[str] = []

    def phase(what: str) -> None:
        phases.append(f"{what} {time.monotonic() - t0:.1f}s")

    base = m / "base"
    base.mkdir()
    small: dict[str, str] = {}
    for d in range(50):
        (base / f"d{d:02d}").mkdir()
        for i in range(25):
            rel = f"d{d:02d}/f{i:02d}"
            data = b"%s %d\n" % (rel.encode(), i) * (1 + i % 5)
            _write_small(base / rel, data)
            small[rel] = hashlib.sha256(data).hexdigest()
    phase("1,250 files")
    level, prefixes = base, [""]
    for n in range(3):
        up = m / f"level{n}"
        up.mkdir()
        os.rename(level, up / "a")
        fs.check("cloudfs", "snapshot", "create", up / "a", up / "b", timeout=600)
        level, prefixes = up, [f"{ab}/{p}" for ab in "ab" for p in prefixes]
    src = m / "tree"
    os.rename(level, src)
    expected = {p + rel: digest for p in prefixes for rel, digest in small.items()}
    assert len(expected) == 10_000
    phase("doubled")
    buffer = os.urandom(64 * MiB)
    for k in range(4):
        digest = hashlib.sha256()
        with open(src / f"big{k}.bin", "wb") as f:
            for part in range(4):
                data = b"%d/%d:" % (k, part) + buffer[4:]
                f.write(data)
                digest.update(data)
        expected[f"big{k}.bin"] = digest.hexdigest()
    phase("1 GiB")
    fs.flush()
    blocks, stored = _block_names(fs), fs.store_block_bytes()

    started = time.monotonic()
    r = fs.check("cloudfs", "snapshot", "create", "--readonly", src, m / "copy", timeout=600)
    elapsed = time.monotonic() - started
    entries = 1 + 2 + 4 + 8 + 8 * 50 + 10_000 + 4  # the tree's directories and files
    assert f"{entries} entries" in r.stdout, r.stdout
    print(f"snapshot of 10,000 files and 1 GiB: {r.stdout.strip()} (command: {elapsed:.2f} s)")
    fs.flush()
    assert _block_names(fs) == blocks and fs.store_block_bytes() == stored, "the store grew"
    assert fs.stat_json()["referenced_bytes"] >= 2 * (1 << 30)

    phase("snapshot")
    # writes to the source after it leave the copy as it was
    with open(src / "big0.bin", "r+b") as f:
        f.seek(100 * MiB)
        f.write(b"changed after the snapshot")
    os.truncate(src / "big1.bin", 5 * MiB)
    with open(src / "a/a/a/d07/f07", "ab") as f:
        f.write(b"appended")
    os.unlink(src / "b/a/b/d08/f08")
    (src / "a/b/a/d09/new").write_bytes(b"new")
    assert _sha256(m / "copy" / "big0.bin") == expected["big0.bin"]
    assert os.path.getsize(m / "copy" / "big1.bin") == 256 * MiB
    assert _sha256(m / "copy" / "a/a/a/d07/f07") == expected["a/a/a/d07/f07"]
    assert sorted(os.listdir(m / "copy/a/b/a/d09")) == [f"f{i:02d}" for i in range(25)]

    # --readonly: every change is refused
    f = m / "copy/a/a/a/d00/f00"
    expect_errno(errno.EROFS, os.open, f, os.O_WRONLY)
    expect_errno(errno.EROFS, os.truncate, m / "copy" / "big2.bin", 0)
    expect_errno(errno.EROFS, os.unlink, f)
    expect_errno(errno.EROFS, os.mkdir, m / "copy/a/a/a/d00/new")
    expect_errno(errno.EROFS, os.rename, f, m / "copy" / "moved")
    expect_errno(errno.EROFS, os.chmod, m / "copy/b", 0o700)

    # deleting the source (with no trash kept) leaves the copy whole: its blocks still
    # have references, so a garbage collection deletes only what the writes above made
    phase("checks")
    fs.check("cloudfs", "retention", m, "trash=0")
    removers = [subprocess.Popen(["rm", "-rf", src / ab]) for ab in ("a/a", "a/b", "b/a", "b/b")]
    assert [p.wait(timeout=600) for p in removers] == [0, 0, 0, 0]  # four at once: faster
    shutil.rmtree(src)
    phase("rm -rf")
    fs.check("cloudfs", "gc", m, "--grace", "0", timeout=600)
    assert _block_names(fs) == blocks
    phase("gc")
    # every file is there with its size; the big files and one small file of each
    # directory read back with the same hash (all 10,000 would take a minute here)
    sizes = {
        os.path.relpath(os.path.join(d, n), m / "copy"): os.lstat(os.path.join(d, n)).st_size
        for d, _dirs, names in os.walk(m / "copy")
        for n in names
    }
    assert sorted(sizes) == sorted(expected)
    sample = [p for p in expected if p.startswith("big") or p.endswith(("f03", "f19"))]
    assert {p: _sha256(m / "copy" / p) for p in sample} == {p: expected[p] for p in sample}
    phase("hashes")
    print("phases:", ", ".join(phases))
