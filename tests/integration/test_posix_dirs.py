"""Directories on a real mount (issue 3): readdir stays correct while entries come and
go, '.' and '..', 100,000 entries listed without the mount's memory growing with the
count, name lengths, names of any bytes, and removed directories still in use."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from typing import TYPE_CHECKING

from posixutil import expect_errno, rss_kib

if TYPE_CHECKING:
    from conftest import CloudFS


def test_readdir_while_entries_come_and_go(fs: CloudFS) -> None:
    """Entries that exist throughout a listing are listed exactly once, however many
    others are added and removed meanwhile; nothing is listed twice."""
    d = fs.mnt / "d"
    d.mkdir()
    n = 3000
    for i in range(n):
        os.mknod(d / f"keep-{i:05d}")
        os.mknod(d / f"gone-{i:05d}")
    seen: list[str] = []
    with os.scandir(d) as it:
        for k, entry in enumerate(it):
            seen.append(entry.name)
            if k % 500 == 250:  # several times during the listing
                for i in range(k // 2, min(k // 2 + 400, n)):
                    name = d / f"gone-{i:05d}"
                    if name.exists():
                        os.unlink(name)
                for i in range(200):
                    os.mknod(d / f"new-{k:05d}-{i:03d}")
    assert len(seen) == len(set(seen)), "an entry was listed twice"
    keep = {f"keep-{i:05d}" for i in range(n)}
    assert keep <= set(seen), f"lost: {sorted(keep - set(seen))[:5]}"
    # afterwards a listing is exactly the directory
    now = set(os.listdir(d))
    assert now == {e for e in now if e.startswith(("keep-", "gone-", "new-"))}
    assert len(now) == n + sum(1 for e in now if e.startswith("gone-")) + sum(
        1 for e in now if e.startswith("new-")
    )


def test_dot_and_dotdot(fs: CloudFS) -> None:
    m = fs.mnt
    (m / "a" / "b").mkdir(parents=True)
    ino = {p: os.stat(m / p).st_ino for p in ("a", "a/b")}
    root = os.stat(m).st_ino
    assert os.stat(m / "a" / ".").st_ino == ino["a"]
    assert os.stat(m / "a" / "..").st_ino == root
    assert os.stat(m / "a" / "b" / "..").st_ino == ino["a"]
    assert os.stat(m / "a" / "b" / ".." / "..").st_ino == root
    # a listing carries '.' and '..' with the right inode numbers, and d_ino of every
    # entry is its st_ino
    out = subprocess.run(["ls", "-ai", str(m / "a")], capture_output=True, text=True, check=True)
    listed = {name: int(i) for i, name in (line.split() for line in out.stdout.splitlines())}
    assert listed == {".": ino["a"], "..": root, "b": ino["a/b"]}
    with os.scandir(m / "a") as it:
        for e in it:
            assert e.inode() == os.stat(e.path, follow_symlinks=False).st_ino
            assert e.is_dir() and not e.is_symlink()
    expect_errno(errno.EINVAL, os.rmdir, f"{m}/a/.")  # (pathlib would drop the '.')
    expect_errno(errno.ENOTEMPTY, os.rmdir, f"{m}/a/b/..")
    # moving a directory moves its '..'
    os.rename(m / "a" / "b", m / "b")
    assert os.stat(m / "b" / "..").st_ino == root


def test_names(fs: CloudFS) -> None:
    m = fs.mnt
    ok = "n" * 255
    too_long = "n" * 256
    (m / ok).write_bytes(b"255")
    os.mkdir(m / ("d" * 255))
    for fn, args in (
        (os.mkdir, (m / too_long,)),
        (os.mknod, (m / too_long,)),
        (os.symlink, ("x", m / too_long)),
        (os.link, (m / ok, m / too_long)),
        (os.rename, (m / ok, m / too_long)),
        (os.stat, (m / too_long,)),
        (os.unlink, (m / too_long,)),
        (open, (m / too_long, "wb")),
    ):
        expect_errno(errno.ENAMETOOLONG, fn, *args)
    # any bytes but '/' and NUL, UTF-8 or not
    odd = [
        b"\xff\xfe\xfd-not-utf8",
        b"latin1-\xe9t\xe9",
        b"new\nline",
        b" leading and trailing space ",
        b"back\\slash*?[]{}$'\"",
        bytes(range(1, 47)),  # controls and punctuation, up to before '/'
        bytes(range(48, 256)),  # the rest
        "\u00e9\u4e2d\U0001f600".encode(),
        b"\xe9" * 255,
    ]
    bm = os.fsencode(m)
    for i, name in enumerate(odd):
        with open(os.path.join(bm, name), "wb") as f:
            f.write(str(i).encode())

    def check() -> None:
        listed = set(os.listdir(bm))
        assert set(odd) <= listed
        for i, name in enumerate(odd):
            with open(os.path.join(bm, name), "rb") as f:
                assert f.read() == str(i).encode()

    check()
    fs.remount()
    check()
    assert (m / ok).read_bytes() == b"255"
    assert (m / ("d" * 255)).is_dir()


def test_removed_directory_in_use(fs: CloudFS) -> None:
    """A directory known to the kernel only from a listing, removed while a process has
    it open: fstat still works (nlink 0) and nothing can be created in it."""
    m = fs.mnt
    (m / "parent" / "victim").mkdir(parents=True)
    fs.remount()
    os.listdir(m / "parent")  # readdirplus: the kernel learns 'victim' from the listing
    fd = os.open(m / "parent" / "victim", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rmdir(m / "parent" / "victim")
        st = os.fstat(fd)
        assert stat.S_ISDIR(st.st_mode) and st.st_nlink == 0
        assert os.listdir(fd) == []
        expect_errno(errno.ENOENT, os.open, "x", os.O_CREAT | os.O_WRONLY, dir_fd=fd)
        expect_errno(errno.ENOENT, os.mkdir, "x", dir_fd=fd)
    finally:
        os.close(fd)
    assert os.listdir(m / "parent") == []


def test_hundred_thousand_entries(fs: CloudFS) -> None:
    """100,000 entries in one directory: all listed once, and listing them does not
    make the mount hold the directory in memory."""
    d = fs.mnt / "big"
    d.mkdir()
    n = 100_000
    for i in range(n):
        os.mknod(d / f"entry-{i:06d}", stat.S_IFREG | 0o644)
    fs.remount()  # the kernel has forgotten every entry
    assert fs.mount_pid is not None
    # warm up: one listing of a small directory (imports, first queries)
    os.listdir(fs.mnt)
    before = rss_kib(fs.mount_pid)
    count = 0
    names = set()
    with os.scandir(d) as it:
        for entry in it:
            count += 1
            names.add(entry.name)
    after = rss_kib(fs.mount_pid)
    assert count == n and len(names) == n
    # the mount keeps one lookup count per entry the kernel took from the listing (a
    # small int in a dict); the listing itself is read in batches, so everything else
    # stays flat: well under 250 bytes per entry
    growth = (after - before) * 1024
    print(f"mount RSS {before} KiB before listing {n} entries, {after} KiB after")
    assert growth < n * 250, f"the mount grew by {growth // 1024} KiB listing {n} entries"
    # a second listing costs nothing more
    again = sum(1 for _ in os.scandir(d))
    assert again == n
    assert (rss_kib(fs.mount_pid) - after) * 1024 < n * 20
