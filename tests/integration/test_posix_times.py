"""Timestamps on a real mount (issue 3): nanoseconds kept exactly, mtime and ctime on
data changes, ctime on every metadata change, the parent directory's times on entry
changes, utimensat with UTIME_NOW/UTIME_OMIT, and atime as relatime."""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from posixutil import UTIME_NOW, UTIME_OMIT, MiB, cached_pages, fill, utimensat

if TYPE_CHECKING:
    from conftest import CloudFS

DAY_NS = 86_400 * 10**9


def _times(p: Path) -> tuple[int, int, int]:
    st = os.stat(p, follow_symlinks=False)
    return st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns


def _changes(p: Path, action: Callable[[], object]) -> tuple[bool, bool, bool]:
    """Which of (atime, mtime, ctime) of `p` `action` changes."""
    before = _times(p)
    time.sleep(0.002)
    action()
    after = _times(p)
    assert all(b >= a for a, b in zip(before, after)), f"{p}: time went back {before} {after}"
    return tuple(b != a for a, b in zip(before, after))  # type: ignore[return-value]


def test_nanoseconds_round_trip(fs: CloudFS) -> None:
    m = fs.mnt
    (m / "f").write_bytes(b"x")
    (m / "d").mkdir()
    os.symlink("f", m / "l")
    stamps = {
        "f": (1_234_567_890_123_456_789, 1_600_000_000_000_000_001),
        "d": (-10_000_000_005, 999_999_999),  # before 1970 too
        "l": (1_700_000_000_987_654_321, 1_700_000_001_000_000_007),
    }
    for name, (a, mt) in stamps.items():
        os.utime(m / name, ns=(a, mt), follow_symlinks=False)

    def check() -> None:
        for name, (a, mt) in stamps.items():
            st = os.stat(m / name, follow_symlinks=False)
            assert (st.st_atime_ns, st.st_mtime_ns) == (a, mt), name

    check()
    ctime = os.stat(m / "f").st_ctime_ns
    fs.remount()
    check()
    assert os.stat(m / "f").st_ctime_ns == ctime


def test_data_changes_set_mtime_and_ctime(fs: CloudFS) -> None:
    m = fs.mnt
    p = m / "f"
    p.write_bytes(fill(2 * MiB, 1))
    fd = os.open(p, os.O_RDWR)
    try:
        assert _changes(p, lambda: os.pwrite(fd, b"data", 100))[1:] == (True, True)
        assert _changes(p, lambda: os.pwrite(fd, b"more", 3 * MiB))[1:] == (True, True)
        assert _changes(p, lambda: os.ftruncate(fd, MiB))[1:] == (True, True)
        assert _changes(p, lambda: os.ftruncate(fd, MiB))[1:] == (True, True)  # same size
        assert _changes(p, lambda: os.truncate(p, 2 * MiB))[1:] == (True, True)
        assert _changes(p, lambda: os.pread(fd, 10, 0))[1:] == (False, False)
        assert _changes(p, lambda: os.fsync(fd)) == (False, False, False)
        assert _changes(p, lambda: os.fdatasync(fd)) == (False, False, False)
        st = os.fstat(fd)
        assert st.st_mtime_ns == st.st_ctime_ns
        written = st.st_mtime_ns
    finally:
        os.close(fd)
    # the times the writer saw are the ones kept
    assert _times(p)[1] == written
    fs.flush()
    assert _times(p)[1] == written

    # O_TRUNC, also of an empty file
    assert _changes(p, lambda: os.close(os.open(p, os.O_WRONLY | os.O_TRUNC)))[1:] == (True, True)
    assert os.stat(p).st_size == 0
    assert _changes(p, lambda: os.close(os.open(p, os.O_WRONLY | os.O_TRUNC)))[1:] == (True, True)
    # opening without changing anything changes nothing
    assert _changes(p, lambda: os.close(os.open(p, os.O_WRONLY)))[1:] == (False, False)

    # writes through a shared mapping
    p.write_bytes(fill(MiB, 2))
    with open(p, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0)

        def mapped_write() -> None:
            mm[10:15] = b"hello"
            mm.flush()

        assert _changes(p, mapped_write)[1:] == (True, True)
        mm.close()
    kept = _times(p)
    fs.remount()
    assert _times(p)[1:] == kept[1:]


def test_metadata_changes_set_ctime_only(fs: CloudFS) -> None:
    m = fs.mnt
    p = m / "f"
    p.write_bytes(b"x")
    os.link(p, m / "other")
    (m / "d").mkdir()
    actions: dict[str, Callable[[], object]] = {
        "chmod": lambda: os.chmod(p, 0o600),
        "chmod to the same mode": lambda: os.chmod(p, 0o600),
        "chown": lambda: os.chown(p, 1000, 1000),
        "chown -1 -1": lambda: os.chown(p, -1, -1),
        "link": lambda: os.link(p, m / "third"),
        "unlink another name": lambda: os.unlink(m / "third"),
        "rename": lambda: os.rename(p, m / "d" / "f"),
        "rename back": lambda: os.rename(m / "d" / "f", p),
        "setxattr": lambda: os.setxattr(p, "user.a", b"1"),
        "replace xattr": lambda: os.setxattr(p, "user.a", b"2"),
        "removexattr": lambda: os.removexattr(p, "user.a"),
    }
    for what, action in actions.items():
        changed = _changes(m / "other", action)  # the same inode, under a name that stays
        assert changed[1:] == (False, True), f"{what}: (mtime, ctime) changed {changed[1:]}"
    # utime sets the times given and ctime to now
    before = time.time_ns()
    os.utime(p, ns=(5, 6))
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (5, 6) and st.st_ctime_ns >= before - 10**7
    # the same for a directory
    for what, action in {
        "chmod dir": lambda: os.chmod(m / "d", 0o700),
        "setxattr dir": lambda: os.setxattr(m / "d", "user.b", b"1"),
    }.items():
        assert _changes(m / "d", action)[1:] == (False, True), what


def test_entry_changes_set_parent_times(fs: CloudFS) -> None:
    m = fs.mnt
    d, d2 = m / "d", m / "d2"
    d.mkdir()
    d2.mkdir()
    (m / "outside").write_bytes(b"o")
    entry_changes: dict[str, Callable[[], object]] = {
        "create": lambda: (d / "f").write_bytes(b"x"),
        "mkdir": lambda: (d / "sub").mkdir(),
        "mkfifo": lambda: os.mkfifo(d / "fifo"),
        "symlink": lambda: os.symlink("f", d / "link"),
        "link": lambda: os.link(m / "outside", d / "hard"),
        "unlink": lambda: os.unlink(d / "hard"),
        "rmdir": lambda: os.rmdir(d / "sub"),
        "rename within": lambda: os.rename(d / "f", d / "g"),
        "rename out": lambda: os.rename(d / "g", d2 / "g"),
        "rename in": lambda: os.rename(d2 / "g", d / "g"),
        "rename over": lambda: os.rename(d / "g", d / "fifo"),
    }
    for what, action in entry_changes.items():
        changed = _changes(d, action)
        assert changed[1:] == (True, True), f"{what}: parent (mtime, ctime) changed {changed[1:]}"
    assert _changes(d2, lambda: os.rename(d / "link", d2 / "link"))[1:] == (True, True)
    # changing a child itself leaves the parent alone
    for what, action in {
        "write child": lambda: (d / "fifo").write_bytes(b"new"),
        "chmod child": lambda: os.chmod(d / "fifo", 0o600),
        "xattr child": lambda: os.setxattr(d / "fifo", "user.x", b"1"),
    }.items():
        assert _changes(d, action)[1:] == (False, False), what


def test_utimensat_now_and_omit(fs: CloudFS) -> None:
    m = fs.mnt
    p = m / "f"
    p.write_bytes(b"x")
    os.utime(p, ns=(1_000_000_000_000_000_001, 1_000_000_000_000_000_002))

    utimensat(p, (0, UTIME_OMIT), (7, 8))
    assert _times(p)[:2] == (1_000_000_000_000_000_001, 7_000_000_008)
    utimensat(p, (9, 10), (0, UTIME_OMIT))
    assert _times(p)[:2] == (9_000_000_010, 7_000_000_008)

    before = time.time_ns()
    utimensat(p, (0, UTIME_NOW), (0, UTIME_OMIT))
    after = time.time_ns()
    a, mt, c = _times(p)
    assert before - 10**7 <= a <= after + 10**7 and mt == 7_000_000_008
    assert c >= before - 10**7
    utimensat(p, (0, UTIME_OMIT), (0, UTIME_NOW))
    assert _times(p)[1] >= before - 10**7 and _times(p)[0] == a
    # both omitted: nothing changes, not even ctime
    assert _changes(p, lambda: utimensat(p, (0, UTIME_OMIT), (0, UTIME_OMIT))) == (
        False,
        False,
        False,
    )
    fs.remount()
    assert _times(p)[0] == a


def test_atime_is_relatime(fs: CloudFS) -> None:
    m = fs.mnt
    p = m / "f"
    p.write_bytes(b"relatime")
    time.sleep(0.01)

    def read() -> None:
        assert p.read_bytes() == b"relatime"

    # the first read after a change updates atime, later reads do not
    mtime = _times(p)[1]
    assert _changes(p, read) == (True, False, False)
    assert _times(p)[0] > mtime
    assert _changes(p, read) == (False, False, False)
    # a change makes the next read update it again
    os.chmod(p, 0o600)
    assert _changes(p, read) == (True, False, False)
    # times set in the past (utime sets ctime to now): the next read refreshes atime
    now = time.time_ns()
    os.utime(p, ns=(now - 2 * DAY_NS, now - 3 * DAY_NS))
    assert _changes(p, read) == (True, False, False)
    assert _changes(p, read) == (False, False, False)
    # opening for writing only is no access
    os.utime(p, ns=(now - 3 * DAY_NS, now - 2 * DAY_NS))
    assert _changes(p, lambda: os.close(os.open(p, os.O_WRONLY))) == (False, False, False)

    # listing a directory is reading it
    d = m / "d"
    d.mkdir()
    (d / "x").write_bytes(b"")
    time.sleep(0.01)
    assert _changes(d, lambda: os.listdir(d)) == (True, False, False)
    assert _changes(d, lambda: os.listdir(d)) == (False, False, False)
    kept = _times(p)
    fs.remount()
    assert _times(p) == kept


def test_a_read_shows_its_atime_at_once_whatever_the_kernel_cached(fs: CloudFS) -> None:
    """The kernel's cached attributes and pages of a file are fresh; the first read after
    a change, which sets atime, must still show in the next stat: for a file whose pages
    the kernel has, and for an empty one (no read reaches the filesystem)."""
    m = fs.mnt
    for name, data in (("cached", b"in the page cache"), ("empty", b"")):
        p = m / name
        p.write_bytes(data)
        os.stat(p)
        assert p.read_bytes() == data  # the kernel caches its pages now
        time.sleep(0.01)
        os.chmod(p, 0o600)  # a new ctime (not mtime: the pages stay): relatime sets atime
        os.stat(p)
        assert _changes(p, lambda p=p, data=data: p.read_bytes() == data) == (True, False, False)
        assert _changes(p, lambda p=p, data=data: p.read_bytes() == data) == (False, False, False)


def test_an_open_that_sets_atime_keeps_a_big_files_pages(fs: CloudFS) -> None:
    """A file bigger than one READ keeps its page cache through the open that sets its
    atime (its attributes are marked stale instead): reading it again must not cost the
    whole file through the mount. The new atime shows all the same."""
    p = fs.mnt / "big"
    data = fill(MiB, 5)
    p.write_bytes(data)
    for _ in range(2):  # the first read after the write fills the page cache
        assert p.read_bytes() == data
    time.sleep(0.01)
    os.chmod(p, 0o600)  # a new ctime, not mtime: relatime sets atime at the next open
    atime = os.stat(p).st_atime_ns
    with open(p, "rb") as f:
        assert cached_pages(f.fileno(), len(data)) == len(data) // mmap.PAGESIZE
        assert f.read() == data
    assert os.stat(p).st_atime_ns > atime


def test_a_file_written_through_the_mount_keeps_its_pages(fs: CloudFS) -> None:
    """A single mount asks the kernel for no auto_inval_data: the page cache of a file
    it wrote survives the GETATTR that shows the file's new mtime, so the reads after
    the write come from it (the daemon frees the block files' pages after the upload,
    so a read through the mount would go to the disk). Shared mode keeps
    auto_inval_data: other machines change files there."""
    p = fs.mnt / "written"
    data = fill(MiB, 5)
    p.write_bytes(data)
    fs.flush()
    os.stat(p)  # a GETATTR: the write made the kernel's size and mtime stale
    with open(p, "rb") as f:
        pages = cached_pages(f.fileno(), len(data))
        assert f.read() == data
    if fs.metadata is None:
        assert pages == len(data) // mmap.PAGESIZE


def test_atime_mount_options(make_fs: Callable[..., CloudFS]) -> None:
    """-o noatime: reads never touch atime; -o strictatime: every read does."""
    fs = make_fs(mount=False)
    fs.mount("-o", "noatime")
    p = fs.mnt / "f"
    p.write_bytes(b"x")
    time.sleep(0.01)
    assert _changes(p, p.read_bytes) == (False, False, False)
    assert _changes(fs.mnt, lambda: os.listdir(fs.mnt)) == (False, False, False)
    fs.unmount()
    fs.mount("-o", "strictatime")
    assert _changes(p, p.read_bytes) == (True, False, False)
    assert _changes(p, p.read_bytes) == (True, False, False)


def _db_mtimes(fs: CloudFS, inodes: list[int]) -> dict[int, int]:
    with fs.metadata_db() as db:
        marks = ", ".join("?" * len(inodes))
        rows = db.execute(f"SELECT id, mtime_ns FROM inodes WHERE id IN ({marks})", inodes)
        return dict(rows.fetchall())


def test_utime_right_after_close_wins(fs: CloudFS) -> None:
    """write, close, utime at once: the seal that the last close starts in the
    background must not put the write's time back over the utime (a flake once read
    "now" back). Files new (append stream) and rewritten in place (overlay), small
    (sealed inline) and larger (chunked in a thread), so the seal overlaps the utime."""
    m = fs.mnt
    sizes = [10, 300 * 1024]
    paths = [m / f"f{i}" for i in range(24)]
    for p in paths[::2]:  # half of them exist already: rewritten through the overlay
        p.write_bytes(fill(sizes[1], 99))
    wanted: dict[Path, int] = {}
    for rnd in range(3):
        for i, p in enumerate(paths):
            data = fill(sizes[(i // 2 + rnd) % 2], i + rnd)
            with open(p, "r+b" if p.exists() else "wb") as f:
                f.write(data)
            stamp = 1_600_000_000_000_000_000 + (rnd * 1000 + i) * 1_000_003
            os.utime(p, ns=(stamp, stamp))
            wanted[p] = stamp
            assert os.stat(p).st_mtime_ns == stamp
    inodes = {p: os.stat(p).st_ino for p in paths}
    # the mount answers once every seal is done; then the metadata must hold the stamps
    os.setxattr(m, "user.cloudfs.command", b"seal")
    stored = _db_mtimes(fs, list(inodes.values()))
    assert {p: stored[inodes[p]] for p in paths} == wanted
    fs.remount()
    assert {p: os.stat(p).st_mtime_ns for p in paths} == wanted
