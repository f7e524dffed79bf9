"""The FUSE kernel protocol served straight from /dev/fuse, on trio (no libfuse).

Why: with the device polled before the event loop sleeps (spin.py), a GETATTR's round
trip here is bound by the mount's own CPU, and about 70% of that went to pyfuse3's
request loop: its two worker tasks hand a read lock to each other on every request,
each request registers the device with epoll again, and each answer passes through
libfuse's reply path. This loop reads a request with one readv(2) into a buffer of
its own, runs the handler inline and answers with one write(2); the device is waited
for (epoll) only when a read finds nothing.

The handlers are the same `Operations` methods pyfuse3 calls, with the same
arguments and pyfuse3's own reply types (EntryAttributes, FileInfo, StatvfsData,
FUSEError): `fuse.py` picks the loop, and either serves the same handlers.

Concurrency: a handler runs inline in the worker that read its request. When it
really suspends (waits for a lock, a thread or the network; a bare schedule point
does not count), another worker takes over reading the device: a parked one, or a
new one up to MAX_WORKERS. So requests that answer without waiting cost no task
switch at all, and one that waits never holds the others up.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import stat
import struct
import subprocess
import time
import types
from collections.abc import Coroutine, Iterable
from typing import Any

import pyfuse3
import trio

from . import spin

log = logging.getLogger(__name__)

#: the largest WRITE the kernel sends (max_pages 256 of 4 KiB)
MAX_WRITE = 1 << 20
#: a read of the device must have room for the largest request (header, write_in, data)
BUFFER_SIZE = MAX_WRITE + 8192
#: at most this many requests are handled at once (the rest wait in the kernel)
MAX_WORKERS = 99

# --- the protocol (linux/fuse.h) ---------------------------------------------------------
_IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
_OUT_HEADER = struct.Struct("<IiQ")  # len error unique
_ENTRY = struct.Struct("<QQQQII" + "QQQqqqIIIIIIIIII")  # fuse_entry_out with its fuse_attr (128 B)
_ATTR_OUT = struct.Struct("<QII" + "QQQqqqIIIIIIIIII")  # fuse_attr_out (104 bytes)
_DIRENT = struct.Struct("<QQII")  # fuse_dirent before its name
_OPEN_OUT = struct.Struct("<QII")
_STATFS_OUT = struct.Struct("<QQQQQIIII24x")
_INIT_IN = struct.Struct("<IIII")
_INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")
_U32 = struct.Struct("<I")
_U32X2 = struct.Struct("<II")  # also fuse_write_out and fuse_getxattr_out
_U64 = struct.Struct("<Q")
_U64_U32 = struct.Struct("<QI")
_READ_IN = struct.Struct("<QQI")  # fh offset size (of fuse_read_in)
_WRITE_IN = struct.Struct("<QQII")  # fh offset size write_flags (of fuse_write_in, 40 bytes)
_SETATTR_IN = struct.Struct("<IIQQQqqqIIIIIIII")
_MKNOD_IN = struct.Struct("<IIII")
_RENAME2_IN = struct.Struct("<QI")
_FORGET_ONE = struct.Struct("<QQ")
_NOTIFY_INVAL_INODE = struct.Struct("<Qqq")
_NOTIFY_INVAL_ENTRY = struct.Struct("<QII")
_NOTIFY_DELETE = struct.Struct("<QQII")

(LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK, MKNOD, MKDIR, UNLINK, RMDIR, RENAME,
 LINK, OPEN, READ, WRITE, STATFS, RELEASE) = (1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15,
                                             16, 17, 18)  # fmt: skip
(FSYNC, SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR, FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR,
 FSYNCDIR) = (20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30)  # fmt: skip
ACCESS, CREATE, INTERRUPT, DESTROY, BATCH_FORGET, READDIRPLUS, RENAME2 = (
    34, 35, 36, 38, 42, 44, 45)  # fmt: skip

# INIT flags
_ASYNC_READ = 1 << 0
_ATOMIC_O_TRUNC = 1 << 3
_EXPORT_SUPPORT = 1 << 4
_BIG_WRITES = 1 << 5
_AUTO_INVAL_DATA = 1 << 12
_DO_READDIRPLUS = 1 << 13
_ASYNC_DIO = 1 << 15
_MAX_PAGES = 1 << 22
#: what pyfuse3 (libfuse 3.14) asks of the kernel; the same here, so the kernel
#: behaves the same whichever loop serves the mount, except that auto_inval_data is
#: left out when the handlers' `auto_inval_data` is false (Operations: a single mount)
WANTED = (
    _ASYNC_READ | _ATOMIC_O_TRUNC | _EXPORT_SUPPORT | _BIG_WRITES | _AUTO_INVAL_DATA
    | _DO_READDIRPLUS | _ASYNC_DIO | _MAX_PAGES
)  # fmt: skip
#: the protocol minor version answered (libfuse 3.14's too): every request and answer
#: has the layout this module packs
PROTOCOL_MINOR = 31

# setattr_in.valid
_FATTR_MODE, _FATTR_UID, _FATTR_GID, _FATTR_SIZE = 1, 2, 4, 8
_FATTR_ATIME, _FATTR_MTIME, _FATTR_FH = 16, 32, 64
_FATTR_ATIME_NOW, _FATTR_MTIME_NOW, _FATTR_CTIME = 128, 256, 1024
# open_out.open_flags
_FOPEN_DIRECT_IO, _FOPEN_KEEP_CACHE, _FOPEN_NONSEEKABLE = 1, 2, 4
# notification codes (the error field of an answer with unique 0)
_NOTIFY_INVAL_INODE_CODE, _NOTIFY_INVAL_ENTRY_CODE, _NOTIFY_DELETE_CODE = 2, 3, 6

_XATTR_CREATE, _XATTR_REPLACE = 1, 2
_MS_RDONLY, _MS_NOSUID, _MS_NODEV = 1, 2, 4
_MNT_DETACH = 2
_NS = 1_000_000_000

try:  # trio's own schedule point (trio.lowlevel.cancel_shielded_checkpoint) yields this
    from trio._core._traps import CancelShieldedCheckpoint as _SCHEDULE_POINT
except ImportError:  # pragma: no cover - then every yield counts as a wait
    _SCHEDULE_POINT = object()

try:
    from trio._core._run import GLOBAL_RUN_CONTEXT as _GLOBAL_RUN_CONTEXT
except ImportError:  # pragma: no cover
    _GLOBAL_RUN_CONTEXT = None


def _tasks_ready() -> bool:
    """Whether other tasks wait to run (trio's run queue is not empty). trio tells this
    only through current_statistics() (2 us); its run queue itself costs 0.07 us."""
    try:
        return bool(_GLOBAL_RUN_CONTEXT.runner.runq)
    except AttributeError:
        return trio.lowlevel.current_statistics().tasks_runnable > 0


class RequestContext:
    """Who made a request (the attributes of pyfuse3.RequestContext)."""

    __slots__ = ("uid", "gid", "pid", "umask")

    def __init__(self, uid: int, gid: int, pid: int, umask: int = 0) -> None:
        self.uid, self.gid, self.pid, self.umask = uid, gid, pid, umask


class SetattrFields:
    """Which attributes a SETATTR changes (the attributes of pyfuse3.SetattrFields)."""

    __slots__ = ("update_atime", "update_mtime", "update_ctime", "update_mode",
                 "update_uid", "update_gid", "update_size")  # fmt: skip

    def __init__(self, valid: int) -> None:
        self.update_atime = bool(valid & (_FATTR_ATIME | _FATTR_ATIME_NOW))
        self.update_mtime = bool(valid & (_FATTR_MTIME | _FATTR_MTIME_NOW))
        self.update_ctime = bool(valid & _FATTR_CTIME)
        self.update_mode = bool(valid & _FATTR_MODE)
        self.update_uid = bool(valid & _FATTR_UID)
        self.update_gid = bool(valid & _FATTR_GID)
        self.update_size = bool(valid & _FATTR_SIZE)


class ReaddirToken:
    """The answer to one READDIR(PLUS) as it fills (see `readdir_reply`)."""

    __slots__ = ("parts", "room", "plus")

    def __init__(self, size: int, plus: bool) -> None:
        self.parts: list[bytes] = []
        self.room = size
        self.plus = plus


def _timeout(t: float) -> tuple[int, int]:
    if t <= 0:
        return 0, 0
    ns = int(t * _NS)
    return ns // _NS, ns % _NS


def _attr_values(e: pyfuse3.EntryAttributes) -> tuple[int, ...]:
    a_s, a_ns = divmod(e.st_atime_ns, _NS)
    m_s, m_ns = divmod(e.st_mtime_ns, _NS)
    c_s, c_ns = divmod(e.st_ctime_ns, _NS)
    return (
        e.st_ino, e.st_size, e.st_blocks, a_s, m_s, c_s, a_ns, m_ns, c_ns, e.st_mode,
        e.st_nlink, e.st_uid, e.st_gid, e.st_rdev & 0xFFFFFFFF, e.st_blksize, 0,
    )  # fmt: skip


def _entry_bytes(e: pyfuse3.EntryAttributes) -> bytes:
    ev, evn = _timeout(e.entry_timeout)
    av, avn = _timeout(e.attr_timeout)
    return _ENTRY.pack(e.st_ino, e.generation, ev, av, evn, avn, *_attr_values(e))


def readdir_reply(
    token: ReaddirToken, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int
) -> bool:
    """Add one entry to a directory listing; False if it does not fit (then the kernel
    asks again from this entry on)."""
    namelen = len(name)
    padded = (namelen + 7) & ~7
    dirent = _DIRENT.pack(attr.st_ino, next_id, namelen, (attr.st_mode & 0o170000) >> 12)
    size = 24 + padded + (_ENTRY.size if token.plus else 0)
    if size > token.room:
        return False
    token.room -= size
    parts = token.parts
    if token.plus:
        parts.append(_entry_bytes(attr))
    parts.append(dirent)
    parts.append(name + b"\0" * (padded - namelen))
    return True


def _split_name(body: memoryview | bytes) -> bytes:
    """The NUL-terminated name at the start of `body`."""
    data = bytes(body)
    end = data.find(b"\0")
    return data if end < 0 else data[:end]


def _handle_request(name: str, *, datasync: bool = False) -> Any:
    """A Session method for a request that names a file handle (fuse_release_in,
    fuse_flush_in, fuse_fsync_in all begin with it) and calls `Operations.<name>`."""

    async def handler(self: Session, node: int, arg: memoryview, ctx: RequestContext) -> None:
        if datasync:
            fh, flags = _U64_U32.unpack_from(arg)
            await getattr(self.ops, name)(fh, bool(flags & 1))
        else:
            (fh,) = _U64.unpack_from(arg)
            await getattr(self.ops, name)(fh)

    handler.__name__ = f"_{name}"
    return handler


class Session:
    """One mounted FUSE file system and the loop that serves it."""

    def __init__(self, operations: Any, mountpoint: str, options: Iterable[str]) -> None:
        self.ops = operations
        self.mountpoint = os.path.abspath(mountpoint)
        self.options = set(options)
        self.debug = "debug" in self.options
        self.fd = -1
        self._via_fusermount = False
        self._deny_others = "allow_root" in self.options
        self._owner = os.getuid()
        self._ended = False
        self._unmounted = False  # the kernel ended the session (umount from outside)
        self._watching = False  # a worker waits for the device to become readable
        self._idle = 0  # parked workers
        self._workers = 0
        self._standby = trio.lowlevel.ParkingLot()
        self._nursery: trio.Nursery | None = None
        self.proto_minor = 0
        #: seconds a worker that finds no request polls the device before it waits (0:
        #: never), while requests come back to back (the last within spin.BUSY_S) and
        #: nothing else is ready to run (spin.py explains why; here the poll runs in the
        #: worker, so a request it finds costs no pass through trio's scheduler either)
        self.spin_s = 0.0
        self._busy_until = 0.0
        self._poll: Any = None
        #: what the polls ended with: a request, something else trio waits for, their
        #: time, or no poll as other tasks were ready (logged at the end, debug)
        self.spin_found = self.spin_other = self.spin_missed = self.spin_busy = 0
        self._handlers = {
            LOOKUP: self._lookup, GETATTR: self._getattr, SETATTR: self._setattr,
            READLINK: self._readlink, SYMLINK: self._symlink, MKNOD: self._mknod,
            MKDIR: self._mkdir, UNLINK: self._unlink, RMDIR: self._rmdir,
            RENAME: self._rename, RENAME2: self._rename2, LINK: self._link, OPEN: self._open,
            READ: self._read, WRITE: self._write, STATFS: self._statfs,
            RELEASE: self._release, FSYNC: self._fsync, SETXATTR: self._setxattr,
            GETXATTR: self._getxattr, LISTXATTR: self._listxattr,
            REMOVEXATTR: self._removexattr, FLUSH: self._flush, OPENDIR: self._opendir,
            READDIR: self._readdir, READDIRPLUS: self._readdirplus,
            RELEASEDIR: self._releasedir, FSYNCDIR: self._fsyncdir, ACCESS: self._access,
            CREATE: self._create,
        }  # fmt: skip

    # --- mounting -------------------------------------------------------------------------

    def mount(self) -> None:
        st = os.stat(self.mountpoint)
        fsname, subtype = "cloudfs", None
        kernel_opts = []
        flags = _MS_NOSUID | _MS_NODEV
        for opt in sorted(self.options):
            name, _, value = opt.partition("=")
            if name == "fsname":
                fsname = value
            elif name == "subtype":
                subtype = value
            elif name == "ro":
                flags |= _MS_RDONLY
            elif name in ("allow_other", "allow_root"):
                if "allow_other" not in kernel_opts:
                    kernel_opts.append("allow_other")
            elif name == "default_permissions":
                kernel_opts.append(name)
            elif name != "debug":
                raise ValueError(f"unknown FUSE option {opt!r}")
        fstype = f"fuse.{subtype}" if subtype else "fuse"
        if os.getuid() == 0 and not os.environ.get("CLOUDFS_FUSERMOUNT"):
            fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
            data = ",".join([
                f"fd={fd}", f"rootmode={stat.S_IFMT(st.st_mode):o}",
                f"user_id={os.getuid()}", f"group_id={os.getgid()}", *kernel_opts,
            ])  # fmt: skip
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.mount(fsname.encode(), os.fsencode(self.mountpoint), fstype.encode(),
                          ctypes.c_ulong(flags), data.encode()) != 0:  # fmt: skip
                err = ctypes.get_errno()
                os.close(fd)
                raise OSError(err, f"mount {self.mountpoint}: {os.strerror(err)}")
        else:
            fd = self._fusermount(fsname, subtype, flags, kernel_opts)
            self._via_fusermount = True
        os.set_blocking(fd, False)
        self.fd = fd

    def _fusermount(self, fsname: str, subtype: str | None, flags: int, opts: list[str]) -> int:
        """Mount through the setuid helper fusermount3, which hands back the device's
        descriptor over a socket (the protocol of libfuse's mount_util)."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        words = ["rw" if not flags & _MS_RDONLY else "ro", "nosuid", "nodev",
                 f"fsname={fsname}", *opts]  # fmt: skip
        if subtype:
            words.append(f"subtype={subtype}")
        try:
            env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
            done = subprocess.run(
                ["fusermount3", "-o", ",".join(words), "--", self.mountpoint],
                env=env, pass_fds=(theirs.fileno(),), capture_output=True, check=False,
            )  # fmt: skip
            theirs.close()
            if done.returncode != 0:
                raise OSError(errno.EPERM, done.stderr.decode(errors="replace").strip()
                              or f"fusermount3 failed ({done.returncode})")  # fmt: skip
            _msg, fds, _flags, _addr = socket.recv_fds(mine, 1, 1)
            if not fds:
                raise OSError(errno.EIO, "fusermount3 sent no descriptor")
            os.set_inheritable(fds[0], False)
            return fds[0]
        finally:
            theirs.close()
            mine.close()

    def unmount(self) -> None:
        if self._unmounted or self.fd < 0:
            return
        if self._via_fusermount:
            subprocess.run(["fusermount3", "-u", "-q", "-z", "--", self.mountpoint],
                           check=False, capture_output=True)  # fmt: skip
        else:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.umount2(os.fsencode(self.mountpoint), _MNT_DETACH) != 0:
                err = ctypes.get_errno()
                if err not in (errno.EINVAL, errno.ENOENT):
                    raise OSError(err, f"unmount {self.mountpoint}: {os.strerror(err)}")
        self._unmounted = True

    def close(self, unmount: bool = True) -> None:
        try:
            if unmount:
                self.unmount()
        finally:
            fd, self.fd = self.fd, -1  # a notification from a thread now fails cleanly
            if fd >= 0:
                os.close(fd)

    # --- the loop -------------------------------------------------------------------------

    async def serve(self) -> None:
        """Answer requests until the file system is unmounted or `terminate` is called."""
        await self._init()
        if self.spin_s > 0:
            self._poll = spin.device_poll(self.fd)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._spawn()
        finally:
            self._nursery = None
            log.debug("FUSE loop: polls found %d requests; ended %d times by other events, "
                      "%d times by their time; %d not polled (tasks ready)", self.spin_found,
                      self.spin_other, self.spin_missed, self.spin_busy)  # fmt: skip

    def terminate(self) -> None:
        """End `serve` (the requests being handled are answered first)."""
        self._ended = True
        self._standby.unpark_all()
        if self._watching and self.fd >= 0:
            trio.lowlevel.notify_closing(self.fd)

    async def _init(self) -> None:
        """Read and answer the kernel's INIT request (the first one, always)."""
        buf = bytearray(BUFFER_SIZE)
        while True:
            try:
                os.readv(self.fd, (buf,))
                break
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.fd)
        _len, opcode, unique, *_ = _IN_HEADER.unpack_from(buf)
        if opcode != INIT:
            raise OSError(errno.EPROTO, f"FUSE: the first request is {opcode}, not INIT")
        major, minor, max_readahead, flags = _INIT_IN.unpack_from(buf, _IN_HEADER.size)
        if major != 7 or minor < 31:
            self._send_error(unique, errno.EPROTO)
            raise OSError(errno.EPROTO, f"FUSE: kernel protocol {major}.{minor} is too old")
        self.proto_minor = min(minor, PROTOCOL_MINOR)
        want = flags & WANTED
        if not getattr(self.ops, "auto_inval_data", True):
            want &= ~_AUTO_INVAL_DATA
        if self.ops.enable_writeback_cache:
            want |= flags & (1 << 16)
        if self.debug:
            log.debug("INIT: kernel %d.%d flags %#x, answered %d.%d flags %#x", major, minor,
                      flags, 7, self.proto_minor, want)  # fmt: skip
        self.ops.init()
        body = _INIT_OUT.pack(7, self.proto_minor, max_readahead, want, 0, 0, MAX_WRITE, 1,
                              MAX_WRITE // 4096, 0, 0)  # fmt: skip
        self._send(unique, body)

    def _spawn(self) -> None:
        assert self._nursery is not None
        self._workers += 1
        self._nursery.start_soon(self._worker)

    def _handler_waits(self) -> None:
        """The worker reading the device is about to wait inside a handler: let another
        read the requests that come meanwhile."""
        if self._watching or self._ended:
            return
        if self._idle:
            self._standby.unpark()
        elif self._workers < MAX_WORKERS:
            self._spawn()

    @types.coroutine
    def _inline(self, coro: Coroutine[Any, Any, None]) -> Any:
        """`await coro`, noting when it first waits (a trampoline: every value trio's
        scheduler sends in goes to the handler, every trap it yields goes out)."""
        waiting = False
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                msg = coro.throw(error) if error is not None else coro.send(value)
            except StopIteration:
                return
            if not waiting and msg is not _SCHEDULE_POINT:
                waiting = True
                self._handler_waits()
            value = error = None
            try:
                value = yield msg
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # noqa: BLE001 - the handler's to handle
                error = exc

    async def _worker(self) -> None:
        buf = bytearray(BUFFER_SIZE)
        view = memoryview(buf)
        fd = self.fd
        try:
            while not self._ended:
                try:
                    n = os.readv(fd, (buf,))
                except BlockingIOError:
                    if self._poll is not None and not self._watching and self._spin():
                        continue
                    if self._watching:
                        self._idle += 1
                        try:
                            await self._standby.park()
                        finally:
                            self._idle -= 1
                        continue
                    self._watching = True
                    try:
                        await trio.lowlevel.wait_readable(fd)
                    except trio.ClosedResourceError:
                        return
                    finally:
                        self._watching = False
                    continue
                except InterruptedError:
                    continue
                except OSError as exc:
                    if exc.errno == errno.ENOENT:  # the request was interrupted meanwhile
                        continue
                    if exc.errno == errno.ENODEV:  # unmounted
                        self._unmounted = True
                        self.terminate()
                        return
                    raise
                if self._poll is not None:
                    self._busy_until = time.perf_counter() + spin.BUSY_S
                await self._inline(self._dispatch(view[:n]))
                if _tasks_ready():
                    # a request that came at once is read without a pass through the
                    # scheduler: let the tasks a handler started (the seal after a last
                    # close, say) run before the next one, as they would have otherwise
                    await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._workers -= 1

    def _spin(self) -> bool:
        """Poll the device for up to `spin_s` while busy and while nothing else is ready
        to run; True if a request came."""
        now = time.perf_counter()
        if now >= self._busy_until:
            return False
        stats = trio.lowlevel.current_statistics()
        if stats.tasks_runnable or stats.run_sync_soon_queue_size:
            self.spin_busy += 1
            return False
        found = spin.poll_until(
            self._poll, self.fd, now + min(self.spin_s, stats.seconds_to_next_deadline)
        )
        if found:
            self.spin_found += 1
        elif found is None:
            self.spin_missed += 1
        else:
            self.spin_other += 1
        return bool(found)

    async def _dispatch(self, req: memoryview) -> None:
        _len, opcode, unique, node, uid, gid, pid, _ext, _pad = _IN_HEADER.unpack_from(req)
        if self.debug:
            log.debug("request %d: opcode %d, node %d, pid %d", unique, opcode, node, pid)
        handler = self._handlers.get(opcode)
        if handler is None:
            if opcode == FORGET:
                await self._forget(node, req)
            elif opcode == BATCH_FORGET:
                await self._batch_forget(req)
            elif opcode == INTERRUPT:
                pass  # no answer: the request it names is answered when it completes
            elif opcode == DESTROY:
                self._send(unique, b"")
            else:
                self._send_error(unique, errno.ENOSYS)
            return
        if (
            self._deny_others and uid != self._owner and uid != 0
            and opcode not in (READ, WRITE, FSYNC, RELEASE, READDIR, READDIRPLUS, FSYNCDIR,
                               RELEASEDIR)
        ):  # fmt: skip
            self._send_error(unique, errno.EACCES)
            return
        try:
            body = await handler(node, req[_IN_HEADER.size :], RequestContext(uid, gid, pid))
        except pyfuse3.FUSEError as exc:
            self._send_error(unique, exc.errno)
        except Exception:
            log.exception("FUSE request %d (opcode %d) failed", unique, opcode)
            self._send_error(unique, errno.EIO)
        else:
            self._send(unique, body)

    # --- answers --------------------------------------------------------------------------

    def _send(self, unique: int, body: Any) -> None:
        try:
            if body is None or not len(body):
                os.write(self.fd, _OUT_HEADER.pack(16, 0, unique))
            elif isinstance(body, bytes) and len(body) <= 4096:
                os.write(self.fd, _OUT_HEADER.pack(16 + len(body), 0, unique) + body)
            else:
                os.writev(self.fd, (_OUT_HEADER.pack(16 + len(body), 0, unique), body))
        except OSError as exc:
            self._send_failed(unique, exc)

    def _send_error(self, unique: int, err: int) -> None:
        try:
            os.write(self.fd, _OUT_HEADER.pack(16, -err, unique))
        except OSError as exc:
            self._send_failed(unique, exc)

    def _send_failed(self, unique: int, exc: OSError) -> None:
        # ENOENT: the request was interrupted and is gone; ENODEV: unmounted meanwhile
        if exc.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF):
            log.error("FUSE: cannot answer request %d: %s", unique, exc)

    def _notify(self, code: int, body: bytes) -> None:
        if self.fd < 0:
            raise OSError(errno.ENOTCONN, "FUSE session is closed")
        os.write(self.fd, _OUT_HEADER.pack(16 + len(body), code, 0) + body)

    def invalidate_inode(self, inode: int, attr_only: bool = False) -> None:
        self._notify(_NOTIFY_INVAL_INODE_CODE,
                     _NOTIFY_INVAL_INODE.pack(inode, -1 if attr_only else 0, 0))  # fmt: skip

    def invalidate_entry(self, parent: int, name: bytes, deleted: int = 0) -> None:
        if deleted:
            body = _NOTIFY_DELETE.pack(parent, deleted, len(name), 0) + name + b"\0"
            self._notify(_NOTIFY_DELETE_CODE, body)
        else:
            body = _NOTIFY_INVAL_ENTRY.pack(parent, len(name), 0) + name + b"\0"
            self._notify(_NOTIFY_INVAL_ENTRY_CODE, body)

    # --- requests -------------------------------------------------------------------------
    # each takes (node id, the request after its header, the caller) and returns the
    # answer's body

    async def _lookup(self, node: int, arg: memoryview, ctx: RequestContext) -> bytes:
        return _entry_bytes(await self.ops.lookup(node, _split_name(arg), ctx))

    async def _forget(self, node: int, req: memoryview) -> None:
        (nlookup,) = _U64.unpack_from(req, _IN_HEADER.size)
        await self._run_forget([(node, nlookup)])

    async def _batch_forget(self, req: memoryview) -> None:
        (count,) = _U32.unpack_from(req, _IN_HEADER.size)
        at = _IN_HEADER.size + 8
        items = [_FORGET_ONE.unpack_from(req, at + 16 * i) for i in range(count)]
        await self._run_forget(items)

    async def _run_forget(self, items: list[tuple[int, int]]) -> None:
        try:
            await self.ops.forget(items)
        except Exception:  # no answer is due: the session must go on
            log.exception("FUSE forget failed")

    async def _getattr(self, node: int, arg: memoryview, ctx: RequestContext) -> bytes:
        e = await self.ops.getattr(node, ctx)
        av, avn = _timeout(e.attr_timeout)
        return _ATTR_OUT.pack(av, avn, 0, *_attr_values(e))

    async def _setattr(self, node: int, arg: memoryview, ctx: RequestContext) -> bytes:
        (valid, _pad, fh, size, _owner, atime, mtime, ctime, atimens, mtimens, ctimens, mode,
         _u4, uid, gid, _u5) = _SETATTR_IN.unpack_from(arg)  # fmt: skip
        attr = pyfuse3.EntryAttributes()
        if valid & (_FATTR_ATIME_NOW | _FATTR_MTIME_NOW):
            now = time.time_ns()
        if valid & _FATTR_ATIME:
            attr.st_atime_ns = atime * _NS + atimens
        elif valid & _FATTR_ATIME_NOW:
            attr.st_atime_ns = now
        if valid & _FATTR_MTIME:
            attr.st_mtime_ns = mtime * _NS + mtimens
        elif valid & _FATTR_MTIME_NOW:
            attr.st_mtime_ns = now
        if valid & _FATTR_CTIME:
            attr.st_ctime_ns = ctime * _NS + ctimens
        attr.st_mode = mode
        attr.st_uid = uid
        attr.st_gid = gid
        attr.st_size = size
        e = await self.ops.setattr(node, attr, SetattrFields(valid),
                                   fh if valid & _FATTR_FH else None, ctx)  # fmt: skip
        av, avn = _timeout(e.attr_timeout)
        return _ATTR_OUT.pack(av, avn, 0, *_attr_values(e))

    async def _readlink(self, node: int, arg: memoryview, ctx: RequestContext) -> bytes:
        return bytes(await self.ops.readlink(node, ctx))

    async def _symlink(self, node: int, arg: memoryview, ctx: RequestContext) -> bytes:
        name, target = bytes(arg).split(b"\0")[:2]
        return _entry_bytes(await self.ops.symlink(node, name, target, ctx))

    async def _mknod(self, node: int, arg: memoryview, ctx: RequestContext) -> bytes:
        mode, rdev, umask, _pad = _MKNOD_IN.unpack_from(arg)
        ctx.umask = umask
        name = _split_name(arg[_MKNOD_IN.size :])
        return _entry_bytes(await self.ops.mknod(node, name, mode, rdev, ctx))

    async def _mkdir(self, node: int, arg: memoryview, ctx: RequestContext) -> bytes:
        mode, umask = _U32X2.unpack_from(arg)
        ctx.umask = umask
        return _entry_bytes(await self.ops.mkdir(node, _split_name(arg[8:]), mode, ctx))

    async def _unlink(self, node: int, arg: memoryview, ctx: RequestContext) -> None:
        await self.ops.unlink(node, _split_name(arg), ctx)

    async def _rmdir(self, node: int, arg: memoryview, ctx: RequestContext) -> None:
        await self.ops.rmdir(node, _split_name(arg), ctx)

    async def _rename(self, node: int, arg: memoryview, ctx: RequestContext) -> None:
        (newdir,) = _U64.unpack_from(arg)
        old, new = bytes(arg[8:]).split(b"\0")[:2]
        await self.ops.rename(node, old, newdir, new, 0, ctx)

    async def _rename2(self, node: int, arg: memoryview, ctx: RequestContext) -> None:
        newdir, flags = _RENAME2_IN.unpack_from(arg)
        old, new = bytes(arg[16:]).split(b"\0")[:2]
        await self.ops.rename(node, old, newdir, new, flags, ctx)

    async def _link(self, node: int, arg: memoryview, ctx: RequestContext) -> bytes:
        (oldnode,) = _U64.unpack_from(arg)
        return _entry_bytes(await self.ops.link(oldnode, node, _split_name(arg[8:]), ctx))

    @staticmethod
    def _open_out(fi: pyfuse3.FileInfo) -> bytes:
        flags = (
            (_FOPEN_DIRECT_IO if fi.direct_io else 0)
            | (_FOPEN_KEEP_CACHE if fi.keep_cache else 0)
            | (_FOPEN_NONSEEKABLE if fi.nonseekable else 0)
        )
        return _OPEN_OUT.pack(fi.fh, flags, 0)

    async def _open(self, node: int, arg: memoryview, ctx: RequestContext) -> bytes:
        (flags,) = _U32.unpack_from(arg)
        return self._open_out(await self.ops.open(node, flags, ctx))

    async def _create(self, node: int, arg: memoryview, ctx: RequestContext) -> bytes:
        flags, mode, umask, _open_flags = _MKNOD_IN.unpack_from(arg)
        ctx.umask = umask
        fi, e = await self.ops.create(node, _split_name(arg[16:]), mode, flags, ctx)
        return _entry_bytes(e) + self._open_out(fi)

    async def _read(self, node: int, arg: memoryview, ctx: RequestContext) -> Any:
        fh, offset, size = _READ_IN.unpack_from(arg)
        return await self.ops.read(fh, offset, size)

    async def _write(self, node: int, arg: memoryview, ctx: RequestContext) -> bytes:
        fh, offset, size, _flags = _WRITE_IN.unpack_from(arg)
        data = bytes(arg[40 : 40 + size])
        return _U32X2.pack(await self.ops.write(fh, offset, data), 0)

    async def _statfs(self, node: int, arg: memoryview, ctx: RequestContext) -> bytes:
        s = await self.ops.statfs(ctx)
        return _STATFS_OUT.pack(s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree,
                                s.f_bsize, s.f_namemax, s.f_frsize, 0)  # fmt: skip

    # requests that name a file handle and take an empty answer (fsync's carry a flag)
    _release = _handle_request("release")
    _flush = _handle_request("flush")
    _fsync = _handle_request("fsync", datasync=True)
    _releasedir = _handle_request("releasedir")
    _fsyncdir = _handle_request("fsyncdir", datasync=True)

    async def _opendir(self, node: int, arg: memoryview, ctx: RequestContext) -> bytes:
        return _OPEN_OUT.pack(await self.ops.opendir(node, ctx), 0, 0)

    async def _readdir(self, node: int, arg: memoryview, ctx: RequestContext) -> bytes:
        return await self._listing(arg, plus=False)

    async def _readdirplus(self, node: int, arg: memoryview, ctx: RequestContext) -> bytes:
        return await self._listing(arg, plus=True)

    async def _listing(self, arg: memoryview, plus: bool) -> bytes:
        fh, offset, size = _READ_IN.unpack_from(arg)
        token = ReaddirToken(size, plus)
        await self.ops.readdir(fh, offset, token)
        return b"".join(token.parts)

    async def _access(self, node: int, arg: memoryview, ctx: RequestContext) -> None:
        (mask,) = _U32.unpack_from(arg)
        await self.ops.access(node, mask, ctx)

    async def _setxattr(self, node: int, arg: memoryview, ctx: RequestContext) -> None:
        size, flags = _U32X2.unpack_from(arg)
        rest = bytes(arg[8:])
        end = rest.index(b"\0")
        name, value = rest[:end], rest[end + 1 : end + 1 + size]
        if flags & ~(_XATTR_CREATE | _XATTR_REPLACE):
            raise pyfuse3.FUSEError(errno.EINVAL)
        if flags & _XATTR_CREATE:  # the attribute must not exist
            try:
                await self.ops.getxattr(node, name, ctx)
            except pyfuse3.FUSEError as exc:
                if exc.errno != pyfuse3.ENOATTR:
                    raise
            else:
                raise pyfuse3.FUSEError(errno.EEXIST)
        elif flags & _XATTR_REPLACE:  # it must exist
            await self.ops.getxattr(node, name, ctx)
        await self.ops.setxattr(node, name, value, ctx)

    @staticmethod
    def _xattr_answer(value: bytes, size: int) -> bytes:
        if size == 0:
            return _U32X2.pack(len(value), 0)
        if len(value) > size:
            raise pyfuse3.FUSEError(errno.ERANGE)
        return value

    async def _getxattr(self, node: int, arg: memoryview, ctx: RequestContext) -> bytes:
        (size,) = _U32.unpack_from(arg)
        value = bytes(await self.ops.getxattr(node, _split_name(arg[8:]), ctx))
        return self._xattr_answer(value, size)

    async def _listxattr(self, node: int, arg: memoryview, ctx: RequestContext) -> bytes:
        (size,) = _U32.unpack_from(arg)
        names = await self.ops.listxattr(node, ctx)
        value = b"".join(bytes(n) + b"\0" for n in names)
        return self._xattr_answer(value, size)

    async def _removexattr(self, node: int, arg: memoryview, ctx: RequestContext) -> None:
        await self.ops.removexattr(node, _split_name(arg), ctx)
