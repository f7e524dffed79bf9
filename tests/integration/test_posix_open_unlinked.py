"""An open file whose name goes away (unlink, or rename of another file over it) keeps
working through its handle until the last close; then its blocks are released
(issue 3)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from posixutil import MiB, block_refcounts, fill, wait_for

if TYPE_CHECKING:
    from conftest import CloudFS


def _live_refs(fs: CloudFS) -> int:
    return sum(1 for n in block_refcounts(fs).values() if n > 0)


def _released(fs: CloudFS, referenced: int) -> None:
    """Wait until `cloudfs stat` counts only `referenced` bytes in live extents and no
    block is referenced any more beyond those of the other files."""
    wait_for(
        lambda: fs.stat_json()["referenced_bytes"] == referenced,
        what=f"referenced_bytes == {referenced}",
    )


def _check_handle_works(f: int, old: bytes, path: Path) -> bytes:
    """Through an fd of a nameless file: read the old bytes, overwrite and append."""
    assert os.pread(f, len(old) + 10, 0) == old
    st = os.fstat(f)
    assert st.st_nlink == 0 and stat.S_ISREG(st.st_mode) and st.st_size == len(old)
    os.pwrite(f, b"still writable", MiB)
    os.pwrite(f, b"appended", len(old))
    expected = bytearray(old)
    expected[MiB : MiB + 14] = b"still writable"
    expected += b"appended"
    os.fsync(f)
    assert os.pread(f, len(expected) + 10, 0) == expected
    assert os.fstat(f).st_size == len(expected)
    assert not path.exists()
    return bytes(expected)


def test_unlinked_open_file_keeps_working_then_frees(fs: CloudFS) -> None:
    m = fs.mnt
    keep = fill(MiB, 7)
    (m / "keep").write_bytes(keep)
    old = fill(5 * MiB, 1)
    (m / "victim").write_bytes(old)
    fs.flush()
    assert fs.stat_json()["referenced_bytes"] == len(keep) + len(old)

    fd = os.open(m / "victim", os.O_RDWR)
    reader = os.open(m / "victim", os.O_RDONLY)
    try:
        os.unlink(m / "victim")
        fs.check("cloudfs", "trash", "purge", fs.mnt)  # unlinked files are kept in the trash
        assert os.listdir(m) == ["keep"]
        # a new file of the same name is another file
        (m / "victim").write_bytes(b"new file")
        expected = _check_handle_works(fd, old, m / "nothing")
        assert os.pread(reader, len(expected), 0) == expected  # the other handle too
        os.close(fd)
        fd = -1
        # one handle is still open: the data stays
        assert os.pread(reader, 100, MiB) == expected[MiB : MiB + 100]
        assert fs.stat_json()["referenced_bytes"] >= len(old)
    finally:
        if fd >= 0:
            os.close(fd)
        os.close(reader)
    _released(fs, len(keep) + len(b"new file"))
    assert (m / "victim").read_bytes() == b"new file"
    assert (m / "keep").read_bytes() == keep
    files = fs.stat_json()["files"]
    assert files == 2
    fs.remount()
    assert sorted(os.listdir(m)) == ["keep", "victim"]
    assert fs.stat_json()["referenced_bytes"] == len(keep) + len(b"new file")


def test_rename_over_open_file(fs: CloudFS) -> None:
    m = fs.mnt
    old = fill(4 * MiB, 2)
    new = fill(2 * MiB, 3)
    (m / "target").write_bytes(old)
    (m / "new").write_bytes(new)
    fs.flush()
    with open(m / "target", "r+b", buffering=0) as f:
        os.rename(m / "new", m / "target")
        fs.check("cloudfs", "trash", "purge", fs.mnt)  # unlinked files are kept in the trash
        assert (m / "target").read_bytes() == new
        expected = _check_handle_works(f.fileno(), old, m / "new")
        assert (m / "target").read_bytes() == new, "writes to the old file reach the new one"
        assert os.fstat(f.fileno()).st_size == len(expected)
    _released(fs, len(new))
    refcounts = block_refcounts(fs)
    assert sum(1 for n in refcounts.values() if n > 0) >= 1
    fs.remount()
    assert os.listdir(m) == ["target"]
    assert (m / "target").read_bytes() == new


def test_open_unlinked_survives_mmap_and_remount_frees(fs: CloudFS) -> None:
    """A mapped nameless file still reads its data; a remount after the close leaves
    no trace of it."""
    import mmap

    m = fs.mnt
    data = fill(3 * MiB, 4)
    (m / "mapped").write_bytes(data)
    with open(m / "mapped", "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0)
        os.unlink(m / "mapped")
        fs.check("cloudfs", "trash", "purge", fs.mnt)  # unlinked files are kept in the trash
        assert mm[:100] == data[:100]
        mm[2 * MiB : 2 * MiB + 5] = b"hello"
        mm.flush()
        mm.close()
        f.seek(2 * MiB)
        assert f.read(5) == b"hello"
    _released(fs, 0)
    fs.remount()
    assert os.listdir(m) == []
    assert fs.stat_json()["files"] == 0
    assert _live_refs(fs) == 0
