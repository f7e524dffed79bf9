"""cloudfs's own FUSE request loop (cloudfs.mount.kernel), on real mounts of a small
in-memory file system served from a thread of this process."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio
from cloudfs.mount import kernel

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")


class MemOps(pyfuse3.Operations):
    """A flat directory of regular files and subdirectories, all in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.attrs: dict[int, pyfuse3.EntryAttributes] = {}
        self.data: dict[int, bytearray] = {}
        self.names: dict[int, dict[bytes, int]] = {}
        self.xattrs: dict[int, dict[bytes, bytes]] = {}
        self.next = 2
        self.forgotten: list[tuple[int, int]] = []
        self.hold: dict[bytes, trio.Event] = {}  # lookup of the name waits for the event
        self.fail_lookup: set[bytes] = set()
        self.timeout = 300.0
        self._new(pyfuse3.ROOT_INODE, stat.S_IFDIR | 0o755)

    def _new(self, ino: int, mode: int) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.st_mode = mode
        e.st_nlink = 2 if stat.S_ISDIR(mode) else 1
        e.st_blksize = 4096
        e.st_mtime_ns = e.st_ctime_ns = e.st_atime_ns = 1_700_000_000_123_456_789
        e.entry_timeout = e.attr_timeout = self.timeout
        self.attrs[ino] = e
        self.xattrs[ino] = {}
        if stat.S_ISDIR(mode):
            self.names[ino] = {}
        else:
            self.data[ino] = bytearray()
        return e

    async def lookup(self, parent: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        if name in self.hold:
            await self.hold[name].wait()
        if name in self.fail_lookup:
            raise RuntimeError("a bug in the handler")
        ino = self.names[parent].get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attrs[ino]

    async def forget(self, items: list[tuple[int, int]]) -> None:
        self.forgotten.extend(items)

    async def getattr(self, ino: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return self.attrs[ino]

    async def setattr(self, ino: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        e = self.attrs[ino]
        if fields.update_size:
            del self.data[ino][attr.st_size :]
            self.data[ino].extend(b"\0" * (attr.st_size - len(self.data[ino])))
            e.st_size = attr.st_size
        if fields.update_mode:
            e.st_mode = stat.S_IFMT(e.st_mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_mtime:
            e.st_mtime_ns = attr.st_mtime_ns
        if fields.update_atime:
            e.st_atime_ns = attr.st_atime_ns
        return e

    async def mkdir(self, parent: int, name: bytes, mode: int, ctx: Any) -> Any:
        return self._add(parent, name, stat.S_IFDIR | mode)

    def _add(self, parent: int, name: bytes, mode: int) -> pyfuse3.EntryAttributes:
        if name in self.names[parent]:
            raise pyfuse3.FUSEError(errno.EEXIST)
        ino, self.next = self.next, self.next + 1
        self.names[parent][name] = ino
        return self._new(ino, mode)

    async def create(self, parent: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
        e = self._add(parent, name, stat.S_IFREG | mode)
        return pyfuse3.FileInfo(fh=e.st_ino), e

    async def open(self, ino: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=ino, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return bytes(self.data[fh][off : off + size])

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        assert isinstance(buf, bytes)
        d = self.data[fh]
        d[off : off + len(buf)] = buf
        self.attrs[fh].st_size = len(d)
        return len(buf)

    async def release(self, fh: int) -> None:
        pass

    async def unlink(self, parent: int, name: bytes, ctx: Any) -> None:
        if self.names[parent].pop(name, None) is None:
            raise pyfuse3.FUSEError(errno.ENOENT)

    async def rename(
        self, p_old: int, old: bytes, p_new: int, new: bytes, flags: int, ctx: Any
    ) -> None:
        self.names[p_new][new] = self.names[p_old].pop(old)

    async def opendir(self, ino: int, ctx: Any) -> int:
        return ino

    async def readdir(self, fh: int, start: int, token: Any) -> None:
        items = sorted(self.names[fh].items())
        for i, (name, ino) in enumerate(items[start:], start + 1):
            if not kernel.readdir_reply(token, name, self.attrs[ino], i):
                return

    async def releasedir(self, fh: int) -> None:
        pass

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks, s.f_bfree, s.f_bavail = 1000, 600, 500
        s.f_files, s.f_ffree, s.f_favail = 100, 90, 90
        s.f_namemax = 255
        return s

    async def setxattr(self, ino: int, name: bytes, value: bytes, ctx: Any) -> None:
        self.xattrs[ino][name] = value

    async def getxattr(self, ino: int, name: bytes, ctx: Any) -> bytes:
        try:
            return self.xattrs[ino][name]
        except KeyError:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None

    async def listxattr(self, ino: int, ctx: Any) -> list[bytes]:
        return list(self.xattrs[ino])

    async def removexattr(self, ino: int, name: bytes, ctx: Any) -> None:
        if self.xattrs[ino].pop(name, None) is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)


class Served:
    def __init__(self, session: kernel.Session, mnt: Path) -> None:
        self.session = session
        self.mnt = mnt
        self.token: trio.lowlevel.TrioToken | None = None
        self.ended = threading.Event()
        self.errors: list[BaseException] = []

    def call(self, fn: Any, *args: Any) -> Any:
        """Run fn(*args) on the serving trio thread."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self.token)


@contextlib.contextmanager
def served(ops: MemOps, tmp_path: Path, *, spin_s: float = 0.0,
           options: tuple[str, ...] = ()) -> Iterator[Served]:  # fmt: skip
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    session = kernel.Session(ops, str(mnt), {"fsname=memfs", "subtype=memfs", *options})
    session.mount()
    s = Served(session, mnt)
    session.spin_s = spin_s
    started = threading.Event()

    async def main() -> None:
        s.token = trio.lowlevel.current_trio_token()
        started.set()
        await session.serve()

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            s.errors.append(exc)
        finally:
            started.set()
            s.ended.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started.wait(10)
    try:
        yield s
    finally:
        if not s.ended.is_set():
            try:
                s.call(session.terminate)
            except RuntimeError:
                pass  # the loop ended meanwhile
        s.ended.wait(10)
        session.close(unmount=True)
        thread.join(10)
    assert not s.errors, s.errors


@pytest.mark.parametrize("spin_s", [0.0, 100e-6], ids=["no-poll", "poll"])
def test_requests_get_the_answers_of_the_handlers(tmp_path: Path, spin_s: float) -> None:
    ops = MemOps()
    with served(ops, tmp_path, spin_s=spin_s) as s:
        m = s.mnt
        (m / "f").write_bytes(b"hello")
        assert (m / "f").read_bytes() == b"hello"
        st = os.stat(m / "f")
        assert stat.S_ISREG(st.st_mode) and st.st_size == 5
        assert st.st_mtime_ns == 1_700_000_000_123_456_789  # seconds and nanoseconds
        big = os.urandom(3 << 20)  # WRITEs of up to 1 MiB, READs of up to 1 MiB
        (m / "big").write_bytes(big)
        os.posix_fadvise(os.open(m / "big", os.O_RDONLY), 0, 0, os.POSIX_FADV_DONTNEED)
        assert bytes(ops.data[ops.names[1][b"big"]]) == big
        assert (m / "big").read_bytes() == big
        (m / "d").mkdir(0o750)
        assert stat.S_IMODE(os.stat(m / "d").st_mode) == 0o750
        os.rename(m / "f", m / "d" / "g")
        assert os.listdir(m / "d") == ["g"]
        os.truncate(m / "d" / "g", 2)
        assert (m / "d" / "g").read_bytes() == b"he"
        os.utime(m / "d" / "g", ns=(5 * 10**9 + 7, 6 * 10**9 + 8))
        assert os.stat(m / "d" / "g").st_mtime_ns == 6 * 10**9 + 8
        os.unlink(m / "big")
        with pytest.raises(FileNotFoundError):
            os.stat(m / "big")
        sv = os.statvfs(m)
        assert (sv.f_blocks, sv.f_bfree, sv.f_bavail, sv.f_files) == (1000, 600, 500, 100)


def test_extended_attributes(tmp_path: Path) -> None:
    with served(MemOps(), tmp_path) as s:
        f = s.mnt / "f"
        f.write_bytes(b"")
        os.setxattr(f, "user.a", b"1")
        os.setxattr(f, "user.b", b"x" * 5000)
        assert os.getxattr(f, "user.a") == b"1"
        assert os.getxattr(f, "user.b") == b"x" * 5000  # sized first, then read
        assert sorted(os.listxattr(f)) == ["user.a", "user.b"]
        with pytest.raises(OSError) as exc:
            os.setxattr(f, "user.a", b"2", os.XATTR_CREATE)
        assert exc.value.errno == errno.EEXIST
        with pytest.raises(OSError) as exc:
            os.setxattr(f, "user.c", b"2", os.XATTR_REPLACE)
        assert exc.value.errno == errno.ENODATA
        os.removexattr(f, "user.a")
        with pytest.raises(OSError) as exc:
            os.getxattr(f, "user.a")
        assert exc.value.errno == errno.ENODATA


def test_a_listing_longer_than_one_answer_comes_whole(tmp_path: Path) -> None:
    ops = MemOps()
    names = sorted(f"file-{i:04d}-{'n' * (i % 50)}" for i in range(700))
    with served(ops, tmp_path) as s:
        for name in names:
            (s.mnt / name).write_bytes(b"")
        assert sorted(os.listdir(s.mnt)) == names
        with os.scandir(s.mnt) as it:  # READDIRPLUS: types and attributes come along
            assert all(e.is_file() for e in it)


def test_a_handler_that_waits_does_not_hold_up_the_others(tmp_path: Path) -> None:
    ops = MemOps()
    with served(ops, tmp_path) as s:
        (s.mnt / "sub").mkdir()  # (the kernel sends one LOOKUP at a time per directory)
        gate = s.call(trio.Event)
        ops.hold[b"slow"] = gate
        waiter = threading.Thread(target=lambda: os.path.exists(s.mnt / "sub" / "slow"))
        waiter.start()
        time.sleep(0.2)
        assert waiter.is_alive()  # its LOOKUP waits in the handler
        for i in range(20):  # meanwhile other requests are answered
            (s.mnt / f"other{i}").write_bytes(b"x")
            assert (s.mnt / f"other{i}").read_bytes() == b"x"
        s.call(gate.set)
        waiter.join(10)
        assert not waiter.is_alive()


def test_a_failing_handler_gets_EIO_and_the_mount_goes_on(tmp_path: Path) -> None:
    ops = MemOps()
    ops.fail_lookup.add(b"bad")
    with served(ops, tmp_path) as s:
        with pytest.raises(OSError) as exc:
            os.stat(s.mnt / "bad")
        assert exc.value.errno == errno.EIO
        (s.mnt / "good").write_bytes(b"ok")
        assert (s.mnt / "good").read_bytes() == b"ok"


def test_invalidations_make_the_kernel_ask_again(tmp_path: Path) -> None:
    ops = MemOps()  # answers are cached for 300 s
    with served(ops, tmp_path) as s:
        f = s.mnt / "f"
        f.write_bytes(b"abc")
        assert os.stat(f).st_size == 3
        ino = ops.names[1][b"f"]
        ops.attrs[ino].st_mode = stat.S_IFREG | 0o600  # behind the kernel's back
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o644  # still the cached attributes
        s.call(s.session.invalidate_inode, ino, True)
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
        ops.names[1][b"g"] = ops.names[1].pop(b"f")
        assert f.exists()  # the cached name
        s.call(s.session.invalidate_entry, 1, b"f")
        assert not f.exists() and (s.mnt / "g").exists()
        with pytest.raises(OSError):  # an inode the kernel does not know
            s.call(s.session.invalidate_inode, 999_999, False)


def test_mount_through_fusermount3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The way a user who is not root mounts (fusermount3 hands the descriptor back)."""
    monkeypatch.setenv("CLOUDFS_FUSERMOUNT", "1")
    with served(MemOps(), tmp_path) as s:
        assert s.session._via_fusermount
        (s.mnt / "f").write_bytes(b"x")
        assert (s.mnt / "f").read_bytes() == b"x"
        assert f" {s.mnt} fuse.memfs " in Path("/proc/mounts").read_text()
    assert f" {s.mnt} " not in Path("/proc/mounts").read_text()


def test_an_unmount_from_outside_ends_the_loop(tmp_path: Path) -> None:
    ops = MemOps()
    with served(ops, tmp_path) as s:
        (s.mnt / "f").write_bytes(b"x")
        subprocess.run(["fusermount3", "-u", str(s.mnt)], check=True)
        assert s.ended.wait(10)
    assert f" {s.mnt} " not in Path("/proc/mounts").read_text()


def test_terminate_ends_the_loop_and_close_unmounts(tmp_path: Path) -> None:
    with served(MemOps(), tmp_path) as s:
        (s.mnt / "f").write_bytes(b"x")
        s.call(s.session.terminate)
        assert s.ended.wait(10)
        assert f" {s.mnt} " in Path("/proc/mounts").read_text()  # until close()
    assert f" {s.mnt} " not in Path("/proc/mounts").read_text()


def test_the_kernel_forgets_what_it_looked_up(tmp_path: Path) -> None:
    ops = MemOps()
    with served(ops, tmp_path) as s:
        (s.mnt / "f").write_bytes(b"x")
        ino = ops.names[1][b"f"]
        os.stat(s.mnt / "f")
        s.call(s.session.invalidate_entry, 1, b"f")
        Path("/proc/sys/vm/drop_caches").write_text("2\n")  # dentries and inodes
        deadline = time.monotonic() + 5
        while not any(i == ino for i, _n in ops.forgotten) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any(i == ino and n >= 1 for i, n in ops.forgotten)


def test_an_unknown_option_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown FUSE option"):
        kernel.Session(MemOps(), str(tmp_path), {"frobnicate"}).mount()
