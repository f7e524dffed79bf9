"""File sizes and holes on a real mount (issue 3): truncate up and down (mid-block
too), O_TRUNC, O_APPEND with concurrent appenders, sparse files whose holes read as
zeros and cost nothing in the store, a file past 4 GiB, a sparse 1 TiB file, and
statfs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from posixutil import MiB, fill, wait_for

if TYPE_CHECKING:
    from conftest import CloudFS

GiB = 1 << 30
TiB = 1 << 40
#: store bytes a block may cost beyond its data (header, nonce, tag)
OVERHEAD = 256


def test_truncate_down_and_up(fs: CloudFS) -> None:
    m = fs.mnt
    p = m / "f"
    data = fill(10 * MiB, 1)
    p.write_bytes(data)

    cut = 5 * MiB + 12345  # inside a block
    os.truncate(p, cut)
    expected = data[:cut]
    assert p.read_bytes() == expected
    os.truncate(p, 8 * MiB)  # growing again must not bring the old bytes back
    expected += bytes(8 * MiB - cut)
    assert p.read_bytes() == expected
    fs.remount()
    assert p.read_bytes() == expected

    # the same on an open file with unsealed writes around the cut
    with open(p, "r+b", buffering=0) as f:
        f.seek(3 * MiB)
        f.write(b"W" * 100_000)
        os.ftruncate(f.fileno(), 3 * MiB + 50_000)
        os.ftruncate(f.fileno(), 4 * MiB)
        f.seek(4 * MiB - 10)
        f.write(b"tail")
        expected = (
            expected[: 3 * MiB] + b"W" * 50_000 + bytes(MiB - 50_000 - 10) + b"tail" + bytes(6)
        )
        f.seek(0)
        assert f.read() == expected
    assert p.read_bytes() == expected
    os.truncate(p, 0)
    assert p.read_bytes() == b"" and os.stat(p).st_size == 0
    os.truncate(p, 1)
    assert p.read_bytes() == b"\0"
    fs.remount()
    assert p.read_bytes() == b"\0"


def test_o_trunc(fs: CloudFS) -> None:
    m = fs.mnt
    p = m / "f"
    p.write_bytes(fill(3 * MiB, 2))
    with open(p, "r+b") as f:  # no O_TRUNC: the data stays
        assert len(f.read()) == 3 * MiB
    fd = os.open(p, os.O_RDWR | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        assert os.read(fd, 10) == b""
        os.write(fd, b"fresh")
    finally:
        os.close(fd)
    assert p.read_bytes() == b"fresh"
    fs.remount()
    assert p.read_bytes() == b"fresh"
    # while another handle has it open
    with open(p, "rb") as reader:
        p.write_bytes(b"new")  # "wb" is O_TRUNC
        assert reader.read() == b"new"


_APPENDER = textwrap.dedent(
    """
    import os, sys
    path, me, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for i in range(count):
        size = 150_000 if i % 10 == 0 else 100
        head = f"{me}:{i:05d}:{size}:".encode()
        record = head + b"." * (size - len(head) - 1) + b"\\n"
        assert os.write(fd, record) == size
    os.close(fd)
    """
)


def test_concurrent_appenders(fs: CloudFS) -> None:
    """Processes appending with O_APPEND never overwrite each other's records."""
    p = fs.mnt / "log"
    writers, count = 4, 300
    procs = [
        subprocess.Popen([sys.executable, "-c", _APPENDER, str(p), f"w{w}", str(count)])
        for w in range(writers)
    ]
    for proc in procs:
        assert proc.wait(timeout=300) == 0
    per_writer = sum(150_000 if i % 10 == 0 else 100 for i in range(count))
    assert os.stat(p).st_size == writers * per_writer

    def check() -> None:
        seen = set()
        for line in p.read_bytes().split(b"\n")[:-1]:
            me, i, size, rest = line.split(b":", 3)
            assert len(line) + 1 == int(size) and rest == b"." * len(rest), line[:60]
            seen.add((me, int(i)))
        assert seen == {(f"w{w}".encode(), i) for w in range(writers) for i in range(count)}

    check()
    fs.remount()
    check()


def test_sparse_files_cost_nothing(fs: CloudFS) -> None:
    m = fs.mnt
    p = m / "sparse"
    head, tail = fill(MiB, 3), fill(MiB, 4)
    with open(p, "wb") as f:
        f.write(head)
        f.seek(GiB)
        f.write(tail)
    assert os.stat(p).st_size == GiB + MiB

    def check() -> None:
        with open(p, "rb") as f:
            assert f.read(MiB) == head
            for off in (MiB, 200 * MiB, GiB - 4096):
                f.seek(off)
                assert f.read(4096) == bytes(4096), f"hole at {off}"
            f.seek(GiB)
            assert f.read() == tail

    check()
    fs.flush()
    assert fs.store_block_bytes() <= 2 * MiB + 16 * OVERHEAD
    # a file that is all hole costs no block
    with open(m / "all-hole", "wb") as f:
        f.truncate(100 * MiB)
    with open(m / "zeros", "wb") as f:
        f.write(bytes(20 * MiB))  # written zeros are holes too
    fs.flush()
    assert fs.store_block_bytes() <= 2 * MiB + 16 * OVERHEAD
    assert (m / "zeros").read_bytes() == bytes(20 * MiB)
    fs.remount()
    check()
    assert os.stat(m / "all-hole").st_size == 100 * MiB


def test_file_past_4_gib(fs: CloudFS) -> None:
    m = fs.mnt
    p = m / "big"
    pieces = {
        0: fill(MiB, 5),
        4 * GiB - MiB // 2: fill(MiB, 6),  # across the 32-bit boundary
        5 * GiB: fill(MiB, 7),
    }
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for off, data in pieces.items():
            assert os.pwrite(fd, data, off) == len(data)
    finally:
        os.close(fd)
    size = 5 * GiB + MiB

    def check() -> None:
        assert os.stat(p).st_size == size
        fd = os.open(p, os.O_RDONLY)
        try:
            for off, data in pieces.items():
                assert os.pread(fd, len(data), off) == data, f"piece at {off}"
            assert os.pread(fd, 4096, 3 * GiB) == bytes(4096)
            assert os.pread(fd, 4096, 4 * GiB + MiB) == bytes(4096)
            assert os.pread(fd, 100, size - 50) == pieces[5 * GiB][-50:]
        finally:
            os.close(fd)

    check()
    fs.flush()
    assert fs.store_block_bytes() <= 3 * MiB + 16 * OVERHEAD
    fs.remount()
    check()
    os.truncate(p, 4 * GiB + 10)  # cut inside the piece across 4 GiB
    fd = os.open(p, os.O_RDONLY)
    try:
        assert os.pread(fd, 100, 4 * GiB - 10) == pieces[4 * GiB - MiB // 2][MiB // 2 - 10 :][:20]
    finally:
        os.close(fd)
    assert os.stat(p).st_size == 4 * GiB + 10


def test_sparse_one_tib_file(fs: CloudFS) -> None:
    m = fs.mnt
    p = m / "tib"
    with open(p, "wb") as f:
        f.write(b"start")
        f.truncate(TiB)
        f.seek(TiB - 3)
        f.write(b"end")
    assert os.stat(p).st_size == TiB

    def check() -> None:
        with open(p, "rb") as f:
            assert f.read(5) == b"start"
            f.seek(TiB // 2)
            assert f.read(MiB) == bytes(MiB)
            f.seek(TiB - 10)
            assert f.read() == bytes(7) + b"end"

    check()
    fs.flush()
    assert fs.store_block_bytes() <= 2 * OVERHEAD + 64
    assert fs.stat_json()["logical_bytes"] == TiB
    fs.remount()
    check()
    st = os.statvfs(m)
    assert st.f_bfree > 0, "a sparse file does not fill the filesystem"


def test_statfs(fs: CloudFS) -> None:
    m = fs.mnt
    before = os.statvfs(m)
    assert before.f_bsize > 0 and before.f_frsize > 0
    assert before.f_blocks >= before.f_bfree >= before.f_bavail > 0
    assert before.f_files >= before.f_ffree > 0
    assert before.f_namemax == 255
    data = fill(16 * MiB, 8)
    (m / "data").write_bytes(data)
    for i in range(10):
        (m / f"f{i}").write_bytes(b"")
    fs.flush()

    def changed() -> bool:
        now = os.statvfs(m)
        used = (before.f_bfree - now.f_bfree) * now.f_frsize
        return used >= len(data) and before.f_ffree - now.f_ffree >= 11

    wait_for(changed, timeout=20, what="statfs to count the new data and files")
    after = os.statvfs(m)
    assert (before.f_bfree - after.f_bfree) * after.f_frsize < 2 * len(data)
    # the numbers df prints
    out = subprocess.run(["df", "-P", str(m)], capture_output=True, text=True, check=True)
    total_kib, used_kib = (int(x) for x in out.stdout.splitlines()[1].split()[1:3])
    assert total_kib > 0 and used_kib >= len(data) // 1024


def _used(p: Path | int) -> int:
    """Bytes st_blocks says `p` (a path or an fd) occupies."""
    st = os.fstat(p) if isinstance(p, int) else os.stat(p)
    return st.st_blocks * 512


def _du(p: Path) -> int:
    out = subprocess.run(["du", "-s", "-B1", str(p)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def test_st_blocks_counts_data_not_holes(fs: CloudFS) -> None:
    """st_blocks is the bytes that hold data (holes cost nothing in the store), the
    same while the data is still unsealed, after the seal and after a remount; `du`
    (which stats what a listing returned) agrees."""
    m = fs.mnt
    (m / "d").mkdir()
    sparse, grown, zeros, cut, streamed = (
        m / "d" / n for n in ("sparse", "grown", "zeros", "cut", "streamed")
    )
    expected = {sparse: 2 * MiB, grown: 0, zeros: 0, cut: MiB, streamed: 3 * MiB}
    fd = os.open(sparse, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, fill(MiB, 1), 0)
        os.pwrite(fd, fill(MiB, 2), GiB)
        assert os.fstat(fd).st_size == GiB + MiB
        assert _used(fd) == 2 * MiB  # unsealed: the dirty ranges
        os.fsync(fd)
        assert _used(fd) == 2 * MiB  # sealed: the extents
        os.pwrite(fd, fill(4096, 3), MiB // 2)  # over data: no more room
        os.pwrite(fd, fill(4096, 4), 10 * MiB)  # into the hole: 4 KiB more
        assert _used(fd) == 2 * MiB + 4096
    finally:
        os.close(fd)
    expected[sparse] += 4096
    with open(grown, "wb") as f:
        f.truncate(100 * MiB)  # all hole
        assert _used(f.fileno()) == 0
    with open(zeros, "wb") as f:
        f.write(bytes(MiB))  # written zeros become holes when sealed
    with open(cut, "wb") as f:
        f.write(fill(2 * MiB, 5))
        f.flush()
        os.fsync(f.fileno())
        f.truncate(MiB)
        assert _used(f.fileno()) == MiB  # cut below sealed data, not sealed yet
    with open(streamed, "wb") as f:
        for i in range(3):
            f.write(fill(MiB, 10 + i))
            f.flush()
            assert _used(f.fileno()) == (i + 1) * MiB  # appended, unsealed
    os.setxattr(m, "user.cloudfs.command", b"seal")
    for p, n in expected.items():
        assert _used(p) == n, p.name
    assert _du(m / "d") == sum(expected.values()) + _used(m / "d")
    fs.remount()
    assert _du(m / "d") == sum(expected.values()) + _used(m / "d")  # from the listing
    for p, n in expected.items():
        assert _used(p) == n, p.name
    # a hard link and a file of another version report the same
    os.link(sparse, m / "link")
    assert _used(m / "link") == expected[sparse]
