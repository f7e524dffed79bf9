"""`cloudfs versions` and `cloudfs restore` on a real mount (issue 6): every fsync is
a version, each restores byte-identical, in place or into a new file, while the file
is open or not, and restoring stores nothing new."""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import CloudFS

pytestmark = pytest.mark.timeout(300)

MiB = 1 << 20


def _contents(i: int) -> bytes:
    """Version i's bytes: sizes differ, and each shares a prefix with the others."""
    shared = bytes(range(256)) * (4096 * 3)  # 3 MiB the versions have in common
    return shared[: MiB * (1 + i % 3)] + os.urandom(200_000 + 50_000 * i) + f"v{i}".encode()


def _versions(fs: CloudFS, path: os.PathLike[str]) -> list[dict]:
    r = fs.check("cloudfs", "versions", "--json", path)
    return json.loads(r.stdout)


def test_five_fsyncs_five_versions_each_restores(fs: CloudFS) -> None:
    path = fs.mnt / "doc.bin"
    written = []
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        for i in range(5):
            data = _contents(i)
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
            written.append(data)
    finally:
        os.close(fd)
    versions = _versions(fs, path)
    assert [v["version"] for v in versions] == [1, 2, 3, 4, 5]
    assert [v["size"] for v in versions] == [len(d) for d in written]
    assert versions[-1]["current"] and not any(v["current"] for v in versions[:-1])
    assert all(v["origin"] == os.uname().nodename for v in versions)
    table = fs.check("cloudfs", "versions", path).stdout
    assert table.splitlines()[0].split() == ["VERSION", "COMMITTED", "SIZE", "ORIGIN"]
    assert len(table.splitlines()) == 6 and "current" in table.splitlines()[-1]

    fs.flush()
    objects = fs.store_objects()
    blocks_before = {k for k in objects if k.startswith("blocks/")}
    bytes_before = fs.store_block_bytes()

    # into new files: byte-identical, the source unchanged
    for n, data in enumerate(written, start=1):
        copy = fs.mnt / f"copy{n}"
        r = fs.check("cloudfs", "restore", path, "--version", str(n), "--to", copy)
        assert f"restored version {n} of" in r.stdout
        assert copy.read_bytes() == data
        assert os.stat(copy).st_mode & 0o7777 == 0o640
        assert [v["version"] for v in _versions(fs, copy)] == [1]
    assert path.read_bytes() == written[-1]

    # in place: each becomes the newest version, the history keeps growing
    for n, data in enumerate(written, start=1):
        fs.check("cloudfs", "restore", path, "--version", str(n))
        assert path.read_bytes() == data
    versions = _versions(fs, path)
    assert [v["version"] for v in versions] == list(range(1, 11))
    assert [v["restored"] for v in versions] == [False] * 5 + [True] * 5
    assert [v["size"] for v in versions[5:]] == [len(d) for d in written]

    fs.flush()
    assert {k for k in fs.store_objects() if k.startswith("blocks/")} == blocks_before
    assert fs.store_block_bytes() == bytes_before

    # and all of it survives a remount
    fs.remount()
    assert path.read_bytes() == written[-1]
    for n, data in enumerate(written, start=1):
        assert (fs.mnt / f"copy{n}").read_bytes() == data


def test_restore_while_open_and_with_unsealed_writes(fs: CloudFS) -> None:
    path = fs.mnt / "open.txt"
    path.write_bytes(b"first version\n" * 1000)
    with open(path, "r+b", buffering=0) as f:
        assert f.read() == b"first version\n" * 1000  # now in the page cache
        # an unsealed write becomes a version of its own before the restore
        f.seek(0)
        f.write(b"UNSEALED")
        fs.check("cloudfs", "restore", path, "--version", "1")
        f.seek(0)
        assert f.read() == b"first version\n" * 1000, "the open handle sees the restore"
        assert os.fstat(f.fileno()).st_size == 14 * 1000
        # writing on through the same handle continues from the restored contents
        f.seek(0)
        f.write(b"after")
    expected = b"after" + (b"first version\n" * 1000)[5:]
    assert path.read_bytes() == expected
    versions = _versions(fs, path)
    assert [v["version"] for v in versions] == [1, 2, 3, 4]
    # version 2 holds the write that was not sealed when the restore came
    fs.check("cloudfs", "restore", path, "--version", "2", "--to", fs.mnt / "v2")
    assert (fs.mnt / "v2").read_bytes() == b"UNSEALED" + (b"first version\n" * 1000)[8:]


def test_restore_at_a_time_and_errors(fs: CloudFS) -> None:
    path = fs.mnt / "t"
    path.write_bytes(b"old")
    time.sleep(1.1)
    between = time.time()
    time.sleep(1.1)
    path.write_bytes(b"new")
    fs.check("cloudfs", "restore", path, "--at", f"@{between}")
    assert path.read_bytes() == b"old"
    fs.check("cloudfs", "restore", path, "--at", "0s ago")
    assert path.read_bytes() == b"old"  # the newest version is the restored one

    r = fs.run("cloudfs", "restore", path, "--version", "99")
    assert r.returncode != 0 and "has no version 99" in r.stderr
    r = fs.run("cloudfs", "restore", path, "--at", "@1")
    assert r.returncode != 0 and "no version from" in r.stderr
    r = fs.run("cloudfs", "restore", path, "--version", "1", "--to", fs.mnt / "t")
    assert r.returncode != 0 and "exists" in r.stderr
    r = fs.run("cloudfs", "versions", fs.mnt)
    assert r.returncode != 0 and "not a regular file" in r.stderr
    r = fs.run("cloudfs", "versions", "/etc/hostname")
    assert r.returncode != 0 and "not in a cloudfs mount" in r.stderr
    assert path.read_bytes() == b"old"
