"""The read-only history view `MOUNTPOINT/.cloudfs/` on a real mount (issue 6): old
versions as files that cp, diff and grep read, hidden from the root's listing,
refusing every change with EROFS, and its name reserved in the root (EEXIST)."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
from typing import TYPE_CHECKING

import pytest
from posixutil import expect_errno

if TYPE_CHECKING:
    from conftest import CloudFS

pytestmark = pytest.mark.timeout(240)

VIRTUAL = 1 << 62


def _write_versions(path: os.PathLike[str], contents: list[bytes]) -> None:
    for data in contents:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def test_versions_view_reads_old_states(fs: CloudFS) -> None:
    m = fs.mnt
    (m / "a" / "b").mkdir(parents=True)
    f = m / "a" / "b" / "notes.txt"
    contents = [b"alpha\nbeta\n", b"alpha\ngamma\n" * 1000, os.urandom(3 << 20)]
    _write_versions(f, contents)
    (m / "top.txt").write_bytes(b"top\n")
    os.symlink("notes.txt", m / "a" / "b" / "link")

    assert ".cloudfs" not in os.listdir(m)
    assert sorted(os.listdir(m / ".cloudfs")) == ["snapshots", "versions"]
    view = m / ".cloudfs" / "versions"
    assert sorted(os.listdir(view)) == ["a", "top.txt"]
    assert os.listdir(view / "a" / "b") == ["notes.txt"], "symlinks have no versions"
    assert os.listdir(view / "a" / "b" / "notes.txt") == ["1", "2", "3"]
    for n, data in enumerate(contents, start=1):
        old = view / "a" / "b" / "notes.txt" / str(n)
        assert old.read_bytes() == data
        st = os.stat(old)
        assert stat.S_ISREG(st.st_mode) and st.st_mode & 0o222 == 0
        assert st.st_size == len(data) and st.st_ino >= VIRTUAL
    assert (view / "top.txt" / "1").read_bytes() == b"top\n"
    assert os.stat(view / "a").st_ino >= VIRTUAL and os.stat(m / "a").st_ino < VIRTUAL

    # the usual tools work on old states directly
    r = subprocess.run(
        ["grep", "-c", "gamma", view / "a/b/notes.txt/2"], check=False, capture_output=True
    )
    assert r.stdout == b"1000\n"
    r = subprocess.run(
        ["diff", view / "a/b/notes.txt/1", view / "a/b/notes.txt/2"],
        check=False, capture_output=True,
    )  # fmt: skip
    assert r.returncode == 1 and b"> alpha" in r.stdout
    shutil.copy(view / "a/b/notes.txt/2", m / "recovered.txt")
    assert (m / "recovered.txt").read_bytes() == contents[1]
    assert subprocess.run(["cmp", f, view / "a/b/notes.txt/3"], check=False).returncode == 0

    # a new version shows up at once; unknown names do not exist
    _write_versions(f, [b"fourth"])
    assert os.listdir(view / "a" / "b" / "notes.txt") == ["1", "2", "3", "4"]
    assert (view / "a/b/notes.txt/4").read_bytes() == b"fourth"
    for missing in ("5", "01", "x", "0"):
        expect_errno(errno.ENOENT, os.stat, view / "a/b/notes.txt" / missing)
    expect_errno(errno.ENOENT, os.stat, view / "nothing")
    expect_errno(errno.ENOENT, os.stat, m / ".cloudfs" / "nothing")


def test_view_refuses_changes(fs: CloudFS) -> None:
    m = fs.mnt
    _write_versions(m / "f", [b"one", b"two"])
    view = m / ".cloudfs" / "versions"
    old = view / "f" / "1"
    assert old.read_bytes() == b"one"
    expect_errno(errno.EROFS, os.open, old, os.O_WRONLY)
    expect_errno(errno.EROFS, os.open, old, os.O_RDWR)
    expect_errno(errno.EROFS, os.open, old, os.O_RDONLY | os.O_TRUNC)
    expect_errno(errno.EROFS, os.unlink, old)
    expect_errno(errno.EROFS, os.truncate, old, 0)
    expect_errno(errno.EROFS, os.chmod, old, 0o777)
    expect_errno(errno.EROFS, os.utime, old, (0, 0))
    expect_errno(errno.EROFS, os.setxattr, old, "user.x", b"1")
    expect_errno(errno.EROFS, os.rename, old, view / "f" / "9")
    expect_errno(errno.EROFS, os.rename, old, m / "stolen")
    expect_errno(errno.EROFS, os.rename, m / "f", view / "f" / "9")
    expect_errno(errno.EROFS, os.link, old, m / "hard")
    expect_errno(errno.EROFS, os.link, m / "f", view / "f" / "9")
    expect_errno(errno.EROFS, os.mkdir, view / "new")
    expect_errno(errno.EROFS, os.symlink, "x", view / "f" / "s")
    expect_errno(errno.EROFS, os.open, view / "new", os.O_CREAT | os.O_WRONLY, 0o644)
    expect_errno(errno.EROFS, os.rmdir, view / "f")
    expect_errno(errno.EROFS, os.rmdir, m / ".cloudfs")
    expect_errno(errno.ENODATA, os.getxattr, old, "user.x")
    assert os.listxattr(old) == []
    assert (m / "f").read_bytes() == b"two"
    assert old.read_bytes() == b"one"


def test_view_name_is_reserved_in_the_root(fs: CloudFS) -> None:
    m = fs.mnt
    (m / "file").write_bytes(b"x")
    expect_errno(errno.EEXIST, os.mkdir, m / ".cloudfs")
    expect_errno(errno.EEXIST, os.open, m / ".cloudfs", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    expect_errno(errno.EEXIST, os.symlink, "file", m / ".cloudfs")
    expect_errno(errno.EEXIST, os.link, m / "file", m / ".cloudfs")
    # the kernel sees a directory there: a file cannot replace it, a directory may not
    expect_errno(errno.EISDIR, os.rename, m / "file", m / ".cloudfs")
    (m / "d").mkdir()
    expect_errno(errno.EEXIST, os.rename, m / "d", m / ".cloudfs")
    os.rmdir(m / "d")
    expect_errno(errno.EEXIST, os.mknod, m / ".cloudfs", 0o600 | stat.S_IFIFO)
    # elsewhere the name is an ordinary one
    (m / "sub").mkdir()
    (m / "sub" / ".cloudfs").write_bytes(b"mine")
    assert (m / "sub" / ".cloudfs").read_bytes() == b"mine"
    assert sorted(os.listdir(m)) == ["file", "sub"]
    fs.remount()
    assert sorted(os.listdir(m)) == ["file", "sub"]
    assert os.path.isdir(m / ".cloudfs" / "versions" / "sub" / ".cloudfs")
