"""mmap on a real mount (issue 3): writes through a shared mapping reach the store after
msync or close; mapped reads see written data, in this process and in others."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING

from posixutil import MiB, fill

if TYPE_CHECKING:
    from conftest import CloudFS

_MAPPED_READER = textwrap.dedent(
    """
    import mmap, sys
    with open(sys.argv[1], "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        sys.stdout.buffer.write(mm[int(sys.argv[2]) : int(sys.argv[3])])
    """
)


def _mapped_read_elsewhere(path: str, start: int, end: int) -> bytes:
    return subprocess.run(
        [sys.executable, "-c", _MAPPED_READER, path, str(start), str(end)],
        capture_output=True,
        check=True,
    ).stdout


def test_shared_mapping_reaches_the_store(fs: CloudFS) -> None:
    m = fs.mnt
    p = m / "mapped"
    data = bytearray(fill(6 * MiB, 1))
    p.write_bytes(data)
    with open(p, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0)
        for off in (0, 100, 4095, 2 * MiB + 7, 6 * MiB - 5):
            mm[off : off + 5] = b"MMAP!"
            data[off : off + 5] = b"MMAP!"
        mm.flush()  # msync(MS_SYNC)
        # read(2) in this process and a mapping in another see the stores
        f.seek(2 * MiB)
        assert f.read(16) == data[2 * MiB : 2 * MiB + 16]
        assert _mapped_read_elsewhere(str(p), 0, 200) == data[:200]
        mm[MiB : MiB + 4] = b"late"  # written back at munmap/close, no msync
        data[MiB : MiB + 4] = b"late"
        mm.close()
    assert p.read_bytes() == data
    # from the store alone: cached blocks gone, a fresh mount
    fs.flush()
    fs.unmount()
    assert fs.drop_cached_blocks() > 0
    fs.mount()
    assert p.read_bytes() == data


def test_mapped_reads_see_written_data(fs: CloudFS) -> None:
    m = fs.mnt
    p = m / "f"
    data = bytearray(fill(3 * MiB, 2))
    p.write_bytes(data)
    with open(p, "r+b", buffering=0) as f:
        mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        assert mm[:] == data
        f.seek(MiB)
        f.write(b"written by write(2)")
        data[MiB : MiB + 19] = b"written by write(2)"
        assert mm[MiB : MiB + 19] == b"written by write(2)"
        mm.close()
    # another process that maps the file sees it too, also after a remount
    assert _mapped_read_elsewhere(str(p), MiB, MiB + 19) == b"written by write(2)"
    fs.remount()
    assert _mapped_read_elsewhere(str(p), 0, len(data)) == data
    # a mapping grows with the file
    with open(p, "r+b") as f:
        f.truncate(4 * MiB)
        mm = mmap.mmap(f.fileno(), 0)
        mm[4 * MiB - 3 :] = b"end"
        mm.close()
    assert p.read_bytes() == data + bytes(MiB - 3) + b"end"


def test_mapping_of_uncached_file(fs: CloudFS) -> None:
    """A mapping faults its pages in through the daemon when blocks are not cached."""
    m = fs.mnt
    data = fill(9 * MiB, 3)
    (m / "f").write_bytes(data)
    fs.flush()
    fs.unmount()
    fs.drop_cached_blocks()
    fs.mount()
    with open(m / "f", "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        assert mm[8 * MiB : 8 * MiB + 100] == data[8 * MiB : 8 * MiB + 100]
        assert mm[:] == data
        mm.close()
    assert os.stat(m / "f").st_size == len(data)
