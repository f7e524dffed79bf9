"""Helpers of the POSIX tests on real mounts: errno checks, code run as another user in
a forked child, the syscalls Python does not wrap (renameat2, utimensat with
UTIME_OMIT, getxattr into a small buffer, mincore), and a look at the metadata database.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import pickle
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

_libc = ctypes.CDLL(None, use_errno=True)

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

MiB = 1 << 20


def errno_of(fn: Callable[..., object], *args: Any, **kwargs: Any) -> int:
    """The errno fn(*args) fails with, or 0 when it succeeds."""
    try:
        fn(*args, **kwargs)
    except OSError as exc:
        return exc.errno or -1
    return 0


def expect_errno(expected: int, fn: Callable[..., object], *args: Any, **kwargs: Any) -> None:
    got = errno_of(fn, *args, **kwargs)
    assert got == expected, (
        f"{getattr(fn, '__name__', fn)}{args}: "
        f"{'succeeded' if got == 0 else errno.errorcode.get(got, got)}, "
        f"expected {errno.errorcode[expected]}"
    )


def _check(ret: int) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def renameat2(old: str | Path, new: str | Path, flags: int) -> None:
    _check(
        _libc.renameat2(
            AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), ctypes.c_uint(flags)
        )
    )


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat(path: str | Path, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    """utimensat(2) with (seconds, nanoseconds) pairs; nanoseconds may be UTIME_NOW
    or UTIME_OMIT."""
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    _check(_libc.utimensat(AT_FDCWD, os.fsencode(path), times, 0))


def cached_pages(fd: int, size: int) -> int:
    """How many pages of the open file `fd` (`size` bytes) the kernel's page cache holds:
    mincore on a private mapping, which reads nothing in."""
    pages = -(-size // mmap.PAGESIZE)
    m = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        start = ctypes.c_char.from_buffer(m)
        vec = (ctypes.c_ubyte * pages)()
        rc = _libc.mincore(ctypes.c_void_p(ctypes.addressof(start)), ctypes.c_size_t(size), vec)
        del start  # the mapping cannot close while a ctypes object points into it
        _check(rc)
        return sum(v & 1 for v in vec)
    finally:
        m.close()


def getxattr_size(path: str | Path, name: str, size: int) -> tuple[int, bytes]:
    """getxattr(2) into a buffer of `size` bytes (ERANGE when the value is longer; size 0
    asks for the length only): (returned length, bytes in the buffer)."""
    buf = ctypes.create_string_buffer(max(size, 1))
    n = _check(_libc.getxattr(os.fsencode(path), name.encode(), buf if size else None, size))
    return n, buf.raw[: n if size else 0]


def listxattr_size(path: str | Path, size: int) -> tuple[int, bytes]:
    """listxattr(2) into a buffer of `size` bytes, like `getxattr_size`."""
    buf = ctypes.create_string_buffer(max(size, 1))
    n = _check(_libc.listxattr(os.fsencode(path), buf if size else None, size))
    return n, buf.raw[: n if size else 0]


def as_user(
    uid: int,
    gid: int,
    fn: Callable[..., Any],
    *args: Any,
    groups: tuple[int, ...] = (),
    cwd: str | Path | None = None,
    umask: int = 0o022,
) -> Any:
    """Run fn(*args) in a forked child with real and effective uid/gid `uid`/`gid` and
    supplementary `groups`, in `cwd` (entered before dropping root, so the tmp dirs
    above it need not be searchable by that user). Returns fn's result; an OSError in
    the child is raised here again with its errno."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        os.close(r)
        try:
            if cwd is not None:
                os.chdir(cwd)
            os.umask(umask)
            os.setgroups(list(groups))
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            result: tuple[str, Any] = ("ok", fn(*args))
        except OSError as exc:
            result = ("oserror", (exc.errno, str(exc)))
        except BaseException:  # noqa: BLE001 - reported to the parent
            result = ("error", traceback.format_exc())
        try:
            with os.fdopen(w, "wb") as f:
                pickle.dump(result, f)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    if kind == "oserror":
        raise OSError(value[0], value[1])
    if kind == "error":
        raise AssertionError(f"child failed:\n{value}")
    return value


def user_errno(uid: int, gid: int, fn: Callable[..., Any], *args: Any, **kw: Any) -> int:
    """The errno of fn(*args) run as uid/gid (0 when it succeeds)."""
    try:
        as_user(uid, gid, fn, *args, **kw)
    except OSError as exc:
        return exc.errno or -1
    return 0


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def block_refcounts(fs: Any) -> dict[bytes, int]:
    """Every block row of the filesystem's metadata (a CloudFS of the integration
    fixtures, SQLite or MySQL): id -> refcount."""
    with fs.metadata_db() as db:
        rows = db.execute("SELECT id, refcount FROM blocks").fetchall()
    return {bytes(i): int(n) for i, n in rows}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def fill(n: int, seed: int) -> bytes:
    """n bytes of incompressible data that differ per seed."""
    import random

    return random.Random(seed).randbytes(n)


if sys.platform != "linux":  # pragma: no cover
    raise ImportError("the POSIX tests run on Linux")
