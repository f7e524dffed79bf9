"""rename(2) and renameat2(2) in full on a real mount (issue 3): every errno case,
RENAME_NOREPLACE and RENAME_EXCHANGE, directory link counts and '..', and atomic
replacement as another process sees it."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING

from posixutil import RENAME_EXCHANGE, RENAME_NOREPLACE, expect_errno, renameat2

if TYPE_CHECKING:
    from conftest import CloudFS


def _tree(m: Path) -> None:
    for d in ("d1", "d1/sub", "d2", "empty", "full"):
        (m / d).mkdir()
    (m / "full" / "x").write_bytes(b"x")
    (m / "f1").write_bytes(b"one")
    (m / "f2").write_bytes(b"two")
    (m / "d1" / "sub" / "deep").write_bytes(b"deep")


def test_rename_replaces_and_moves(fs: CloudFS) -> None:
    m = fs.mnt
    _tree(m)
    f2_ino = os.stat(m / "f2").st_ino

    # file over file: the target's old inode is gone, the source name too
    os.rename(m / "f1", m / "f2")
    assert (m / "f2").read_bytes() == b"one"
    assert not (m / "f1").exists()
    assert os.stat(m / "f2").st_ino != f2_ino
    assert sorted(os.listdir(m)) == ["d1", "d2", "empty", "f2", "full"]

    # directory over an empty directory; link counts and '..' follow the move
    root_nlink = os.stat(m).st_nlink
    os.rename(m / "d1", m / "empty")
    assert sorted(os.listdir(m / "empty")) == ["sub"]
    assert os.stat(m).st_nlink == root_nlink - 1
    os.rename(m / "empty" / "sub", m / "d2" / "moved")
    assert os.stat(m / "empty").st_nlink == 2
    assert os.stat(m / "d2").st_nlink == 3
    assert os.stat(m / "d2" / "moved" / "..").st_ino == os.stat(m / "d2").st_ino
    assert (m / "d2" / "moved" / "deep").read_bytes() == b"deep"

    # onto itself, and onto another name of the same inode: nothing happens
    os.rename(m / "f2", m / "f2")
    os.link(m / "f2", m / "f2link")
    os.rename(m / "f2", m / "f2link")
    assert (m / "f2").exists() and (m / "f2link").exists()
    assert os.stat(m / "f2").st_nlink == 2
    os.rename(m / "d2", m / "d2")
    assert os.stat(m / "d2").st_nlink == 3

    fs.remount()
    assert sorted(os.listdir(m)) == ["d2", "empty", "f2", "f2link", "full"]
    assert os.stat(m / "d2" / "moved" / "..").st_ino == os.stat(m / "d2").st_ino
    assert os.stat(m / "d2").st_nlink == 3
    assert os.stat(m).st_nlink == 5


def test_rename_errors(fs: CloudFS) -> None:
    m = fs.mnt
    _tree(m)
    expect_errno(errno.ENOTEMPTY, os.rename, m / "empty", m / "full")
    expect_errno(errno.EINVAL, os.rename, m / "d1", m / "d1" / "sub" / "inside")
    expect_errno(errno.EINVAL, os.rename, m / "d1", m / "d1" / "inside")
    expect_errno(errno.EISDIR, os.rename, m / "f1", m / "empty")
    expect_errno(errno.ENOTDIR, os.rename, m / "empty", m / "f1")
    expect_errno(errno.ENOENT, os.rename, m / "missing", m / "x")
    expect_errno(errno.ENOENT, os.rename, m / "f1", m / "missing" / "x")
    expect_errno(errno.ENOTDIR, os.rename, m / "f1", m / "f2" / "x")
    expect_errno(errno.ENOTDIR, os.rename, m / "f1" / "x", m / "y")
    expect_errno(errno.ENAMETOOLONG, os.rename, m / "f1", m / ("n" * 256))
    # nothing changed
    assert sorted(os.listdir(m)) == ["d1", "d2", "empty", "f1", "f2", "full"]
    assert (m / "f1").read_bytes() == b"one"
    assert os.listdir(m / "full") == ["x"]


def test_renameat2_flags(fs: CloudFS) -> None:
    m = fs.mnt
    _tree(m)
    expect_errno(errno.EEXIST, renameat2, m / "f1", m / "f2", RENAME_NOREPLACE)
    expect_errno(errno.EEXIST, renameat2, m / "d1", m / "empty", RENAME_NOREPLACE)
    renameat2(m / "f1", m / "f3", RENAME_NOREPLACE)
    assert (m / "f3").read_bytes() == b"one" and not (m / "f1").exists()

    # exchange two files, a file and a directory, directories in different parents
    ino2, ino3 = os.stat(m / "f2").st_ino, os.stat(m / "f3").st_ino
    renameat2(m / "f2", m / "f3", RENAME_EXCHANGE)
    assert (m / "f2").read_bytes() == b"one" and (m / "f3").read_bytes() == b"two"
    assert (os.stat(m / "f2").st_ino, os.stat(m / "f3").st_ino) == (ino3, ino2)

    renameat2(m / "f2", m / "d1" / "sub", RENAME_EXCHANGE)
    assert (m / "d1" / "sub").read_bytes() == b"one"
    assert os.listdir(m / "f2") == ["deep"]
    assert os.stat(m / "d1").st_nlink == 2
    assert os.stat(m / "f2" / "..").st_ino == os.stat(m).st_ino

    root_nlink = os.stat(m).st_nlink
    renameat2(m / "f2", m / "d1" / "sub", RENAME_EXCHANGE)  # and back
    assert os.stat(m).st_nlink == root_nlink - 1
    assert os.stat(m / "d1").st_nlink == 3
    assert os.stat(m / "d1" / "sub" / "..").st_ino == os.stat(m / "d1").st_ino

    (m / "d2" / "inner").mkdir()
    renameat2(m / "d1" / "sub", m / "d2" / "inner", RENAME_EXCHANGE)
    assert os.listdir(m / "d2" / "inner") == ["deep"]
    assert os.listdir(m / "d1" / "sub") == []
    assert os.stat(m / "d2" / "inner" / "..").st_ino == os.stat(m / "d2").st_ino
    assert os.stat(m / "d1" / "sub" / "..").st_ino == os.stat(m / "d1").st_ino

    expect_errno(errno.ENOENT, renameat2, m / "f3", m / "missing", RENAME_EXCHANGE)
    expect_errno(errno.ENOENT, renameat2, m / "missing", m / "f3", RENAME_EXCHANGE)
    expect_errno(errno.EINVAL, renameat2, m / "d1", m / "d1" / "sub", RENAME_EXCHANGE)
    expect_errno(errno.EINVAL, renameat2, m / "f3", m / "f2", RENAME_EXCHANGE | RENAME_NOREPLACE)

    fs.remount()
    assert (m / "f2").read_bytes() == b"one" and (m / "f3").read_bytes() == b"two"
    assert os.listdir(m / "d2" / "inner") == ["deep"]
    assert os.stat(m / "d1").st_nlink == 3 and os.stat(m / "d2").st_nlink == 3


def test_rename_times(fs: CloudFS) -> None:
    m = fs.mnt
    _tree(m)
    time.sleep(0.01)
    before = {p: os.stat(m / p) for p in ("d1", "d2", "f1", "f2")}
    os.rename(m / "f1", m / "d2" / "f1")
    for parent in ("d2",):
        st = os.stat(m / parent)
        assert st.st_mtime_ns > before[parent].st_mtime_ns
        assert st.st_ctime_ns > before[parent].st_ctime_ns
    st = os.stat(m)
    assert st.st_mtime_ns > before["d1"].st_mtime_ns, "the old parent's mtime"
    moved = os.stat(m / "d2" / "f1")
    assert moved.st_ctime_ns > before["f1"].st_ctime_ns, "a renamed inode's ctime"
    assert moved.st_mtime_ns == before["f1"].st_mtime_ns, "rename leaves mtime alone"


_READER = textwrap.dedent(
    """
    import os, sys, time
    path, stop = sys.argv[1], time.monotonic() + float(sys.argv[2])
    seen, bad = set(), []
    while time.monotonic() < stop:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            bad.append(f"open/read: {exc}")
            continue
        version, _, body = data.partition(b":")
        if body != version * 2000:
            bad.append(f"torn content: {data[:40]!r}... ({len(data)} bytes)")
        seen.add(version)
    print(len(seen), len(bad))
    for b in bad[:5]:
        print(b)
    """
)


def test_rename_over_is_atomic_for_another_process(fs: CloudFS) -> None:
    """A reader in another process opening the target in a loop always finds a file,
    and always one complete version of it, while a writer replaces it by rename."""
    m = fs.mnt

    def content(i: int) -> bytes:
        v = str(i).encode()
        return v + b":" + v * 2000

    (m / "target").write_bytes(content(0))
    reader = subprocess.Popen(
        [sys.executable, "-c", _READER, str(m / "target"), "4"],
        stdout=subprocess.PIPE,
        text=True,
    )
    i = 0
    deadline = time.monotonic() + 3.5
    while time.monotonic() < deadline:
        i += 1
        (m / "tmp").write_bytes(content(i))
        os.rename(m / "tmp", m / "target")
    out, _ = reader.communicate(timeout=60)
    first, *examples = out.splitlines()
    versions, bad = first.split()
    assert int(bad) == 0, "\n".join(examples)
    assert int(versions) > 2, f"the reader saw only {versions} versions in {i} renames"
    assert (m / "target").read_bytes() == content(i)
    assert os.listdir(m) == ["target"]
