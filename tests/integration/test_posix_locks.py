"""Locks and syncs on a real mount (issue 3). cloudfs implements no lock operations, so
the kernel keeps flock and fcntl locks itself for the mount: they must work between
processes. fsync, fdatasync and a directory's fsync make changes survive a killed
mount process."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from posixutil import MiB, fill

if TYPE_CHECKING:
    from conftest import CloudFS

_HOLDER = textwrap.dedent(
    """
    import fcntl, os, struct, sys
    path, kind = sys.argv[1], sys.argv[2]
    fd = os.open(path, os.O_RDWR)
    if kind == "flock-ex":
        fcntl.flock(fd, fcntl.LOCK_EX)
    elif kind == "flock-sh":
        fcntl.flock(fd, fcntl.LOCK_SH)
    elif kind == "posix":  # a write lock on bytes [0, 100)
        fcntl.lockf(fd, fcntl.LOCK_EX, 100, 0)
    print("locked", flush=True)
    sys.stdin.readline()  # hold until told
    """
)


class Holder:
    """Another process holding a lock on `path` until `release`."""

    def __init__(self, path: Path, kind: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(path), kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0


def _try_flock(path: Path, op: int) -> int:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, op | fcntl.LOCK_NB)
        return 0
    except OSError as exc:
        return exc.errno or -1
    finally:
        os.close(fd)


def test_flock_between_processes(fs: CloudFS) -> None:
    p = fs.mnt / "f"
    p.write_bytes(b"x")
    os.link(p, fs.mnt / "other-name")
    holder = Holder(p, "flock-ex")
    try:
        assert _try_flock(p, fcntl.LOCK_EX) == errno.EWOULDBLOCK
        assert _try_flock(p, fcntl.LOCK_SH) == errno.EWOULDBLOCK
        assert _try_flock(fs.mnt / "other-name", fcntl.LOCK_EX) == errno.EWOULDBLOCK
        # a blocking lock waits for the holder
        fd = os.open(p, os.O_RDWR)
        try:
            releaser = threading.Timer(0.5, holder.release)
            start = time.monotonic()
            releaser.start()
            fcntl.flock(fd, fcntl.LOCK_EX)
            assert time.monotonic() - start >= 0.4
            releaser.join()
        finally:
            os.close(fd)
    finally:
        if holder.proc.poll() is None:
            holder.release()
    assert _try_flock(p, fcntl.LOCK_EX) == 0
    # shared locks coexist
    a, b = Holder(p, "flock-sh"), Holder(p, "flock-sh")
    assert _try_flock(p, fcntl.LOCK_SH) == 0
    assert _try_flock(p, fcntl.LOCK_EX) == errno.EWOULDBLOCK
    a.release()
    b.release()
    assert _try_flock(p, fcntl.LOCK_EX) == 0


def test_fcntl_locks_between_processes(fs: CloudFS) -> None:
    p = fs.mnt / "f"
    p.write_bytes(bytes(1000))
    holder = Holder(p, "posix")
    fd = os.open(p, os.O_RDWR)
    try:
        for start, length, ok in ((50, 10, False), (0, 1, False), (99, 5, False), (100, 100, True)):
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, length, start)
                got = True
                fcntl.lockf(fd, fcntl.LOCK_UN, length, start)
            except OSError as exc:
                assert exc.errno in (errno.EAGAIN, errno.EACCES)
                got = False
            assert got == ok, f"lock of [{start}, {start + length})"
        # F_GETLK names the holder
        query = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 10, 10, 0)
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
        l_type, _, l_start, l_len, l_pid = struct.unpack("hhqqi", answer)
        assert (l_type, l_start, l_len, l_pid) == (fcntl.F_WRLCK, 0, 100, holder.proc.pid)
        holder.release()
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 0)
    finally:
        os.close(fd)
        if holder.proc.poll() is None:
            holder.release()


def test_fsync_fdatasync_and_directory_fsync_survive_a_killed_mount(fs: CloudFS) -> None:
    m = fs.mnt
    synced = fill(3 * MiB, 1)
    (m / "d").mkdir()
    fd = os.open(m / "d" / "synced", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, synced)
    os.fsync(fd)
    os.pwrite(fd, b"datasync", 100)
    os.fdatasync(fd)
    expected = synced[:100] + b"datasync" + synced[108:]
    os.close(fd)
    os.rename(m / "d" / "synced", m / "d" / "renamed")
    os.mkdir(m / "d" / "newdir")
    dfd = os.open(m / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    # the mount process dies without unmounting
    assert fs.mount_pid is not None
    os.kill(fs.mount_pid, signal.SIGKILL)
    fs.wait_exit(fs.mount_pid, 30)
    fs.mount_pid = None
    subprocess.run(["fusermount3", "-u", str(m)], check=True)
    fs.mount()
    assert sorted(os.listdir(m / "d")) == ["newdir", "renamed"]
    assert (m / "d" / "renamed").read_bytes() == expected
    assert os.stat(m / "d" / "renamed").st_mode & 0o777 == 0o600
