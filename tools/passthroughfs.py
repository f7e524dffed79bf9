"""A bare passthrough FUSE filesystem (pyfuse3 + trio): the yardstick for what any
Python FUSE filesystem can reach on this machine, for `cloudfs bench --baseline`.

Every request becomes the same system call on a directory underneath (SOURCE), made
right on the event loop: no caching, threads or batching of its own, pyfuse3's
default mount options and attribute timeouts, and the kernel page cache kept across
opens (`--no-keep-cache` turns that off). Not a product: files are created with the
credentials of the process serving the mount, and an open file whose last name is
removed can no longer be stat'ed by inode.

    python -m cloudfs.tools.passthroughfs SOURCE MOUNTPOINT   # foreground; Ctrl-C or
    fusermount3 -u MOUNTPOINT                                  # either one unmounts
"""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import os
import signal
import stat
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

log = logging.getLogger("passthroughfs")

ROOT = pyfuse3.ROOT_INODE
T = TypeVar("T")
P = ParamSpec("P")
#: the stat fields an entry reply copies from the file underneath
_STAT_FIELDS = (
    "st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size", "st_blksize",
    "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns",
)  # fmt: skip


def _oserror(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Answer an OSError of a handler with its errno (pyfuse3 wants FUSEError)."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None

    return wrapper


class Passthrough(pyfuse3.Operations):
    """Inodes are numbered by this process (the root is ROOT) and map to one path
    underneath; an inode lives while the kernel holds a lookup reference to it."""

    def __init__(self, source: str, *, keep_cache: bool = True) -> None:
        super().__init__()
        self.keep_cache = keep_cache
        root = os.lstat(source)
        self._paths: dict[int, str] = {ROOT: os.path.abspath(source)}
        #: (st_dev, st_ino) underneath -> our inode: hard links share one inode
        self._inodes: dict[tuple[int, int], int] = {(root.st_dev, root.st_ino): ROOT}
        self._keys: dict[int, tuple[int, int]] = {ROOT: (root.st_dev, root.st_ino)}
        self._lookups: dict[int, int] = {ROOT: 1}
        self._next_inode = ROOT + 1
        #: directory handle -> its names, listed once at opendir so offsets stay valid
        self._listings: dict[int, list[str]] = {}
        self._next_dir_handle = 1

    # --- inode table ------------------------------------------------------------------

    def _path(self, inode: int) -> str:
        try:
            return self._paths[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _child(self, parent: int, name: bytes) -> str:
        return os.path.join(self._path(parent), os.fsdecode(name))

    def _inode_of(self, path: str, st: os.stat_result) -> int:
        key = (st.st_dev, st.st_ino)
        inode = self._inodes.get(key)
        if inode is None:
            inode = self._next_inode
            self._next_inode += 1
            self._inodes[key] = inode
            self._keys[inode] = key
            self._lookups[inode] = 0
        self._paths[inode] = path
        return inode

    def _entry(
        self, path: str, st: os.stat_result, *, count: bool = True
    ) -> pyfuse3.EntryAttributes:
        """The entry reply for `path`; `count`: the kernel gains a lookup reference."""
        inode = self._inode_of(path, st)
        if count:
            self._lookups[inode] += 1
        return self._attrs(inode, st)

    @staticmethod
    def _attrs(inode: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = inode
        e.generation = 0
        for name in _STAT_FIELDS:
            setattr(e, name, getattr(st, name))
        return e

    def _drop(self, inode: int) -> None:
        self._paths.pop(inode, None)
        self._lookups.pop(inode, None)
        key = self._keys.pop(inode, None)
        if key is not None:
            del self._inodes[key]

    # --- names --------------------------------------------------------------------------

    @_oserror
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        return self._entry(path, os.lstat(path))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, n in inode_list:
            if inode == ROOT or inode not in self._lookups:
                continue
            self._lookups[inode] -= n
            if self._lookups[inode] <= 0:
                self._drop(inode)

    @_oserror
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(inode, os.lstat(self._path(inode)))

    @_oserror
    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
        fh: int | None, ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:  # fmt: skip
        path = self._path(inode)
        if fields.update_size:
            os.truncate(fh if fh is not None else path, attr.st_size)
        if fields.update_mode:
            os.chmod(path, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            os.chown(path, uid, gid, follow_symlinks=False)
        if fields.update_atime or fields.update_mtime:
            st = os.lstat(path)
            atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            os.utime(path, ns=(atime, mtime), follow_symlinks=False)
        return self._attrs(inode, os.lstat(path))

    @_oserror
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.fsencode(os.readlink(self._path(inode)))

    @_oserror
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        os.mknod(path, mode, rdev)
        return self._entry(path, os.lstat(path))

    @_oserror
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        os.mkdir(path, mode)
        return self._entry(path, os.lstat(path))

    @_oserror
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        os.symlink(os.fsdecode(target), path)
        return self._entry(path, os.lstat(path))

    @_oserror
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(new_parent_inode, new_name)
        os.link(self._path(inode), path, follow_symlinks=False)
        return self._entry(path, os.lstat(path))

    @_oserror
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        os.unlink(self._child(parent_inode, name))

    @_oserror
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        os.rmdir(self._child(parent_inode, name))

    @_oserror
    async def rename(
        self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
        flags: int, ctx: pyfuse3.RequestContext,
    ) -> None:  # fmt: skip
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)  # RENAME_NOREPLACE/EXCHANGE: not here
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        st = os.lstat(old)
        os.rename(old, new)
        inode = self._inodes.get((st.st_dev, st.st_ino))
        if inode is None:
            return
        self._paths[inode] = new
        if stat.S_ISDIR(st.st_mode):
            # every known inode below the directory moved with it
            prefix = old + os.sep
            for other, path in self._paths.items():
                if path.startswith(prefix):
                    self._paths[other] = new + path[len(old) :]

    # --- files ---------------------------------------------------------------------------

    @_oserror
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        # the kernel says where each write goes, so O_APPEND must not move it again
        fd = os.open(self._path(inode), flags & ~(os.O_APPEND | os.O_CREAT | os.O_EXCL))
        return pyfuse3.FileInfo(fh=fd, keep_cache=self.keep_cache)

    @_oserror
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path = self._child(parent_inode, name)
        fd = os.open(path, (flags & ~os.O_APPEND) | os.O_CREAT, mode)
        try:
            entry = self._entry(path, os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        return pyfuse3.FileInfo(fh=fd, keep_cache=self.keep_cache), entry

    @_oserror
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    @_oserror
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return os.pwrite(fh, buf, off)

    async def flush(self, fh: int) -> None:
        pass

    @_oserror
    async def release(self, fh: int) -> None:
        os.close(fh)

    @_oserror
    async def fsync(self, fh: int, datasync: bool) -> None:
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)

    # --- directories ---------------------------------------------------------------------

    @_oserror
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        names = sorted(os.listdir(self._path(inode)))
        fh = self._next_dir_handle
        self._next_dir_handle += 1
        self._listings[fh] = [self._path(inode), *names]  # [0] is the directory itself
        return fh

    @_oserror
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        directory, *names = self._listings[fh]
        for i in range(start_id, len(names)):
            path = os.path.join(directory, names[i])
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue  # removed since opendir
            entry = self._entry(path, st, count=False)
            if not pyfuse3.readdir_reply(token, os.fsencode(names[i]), entry, i + 1):
                if self._lookups.get(entry.st_ino) == 0:
                    self._drop(entry.st_ino)
                return
            self._lookups[entry.st_ino] += 1  # readdirplus: the kernel now holds it

    async def releasedir(self, fh: int) -> None:
        self._listings.pop(fh, None)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass

    @_oserror
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = os.statvfs(self._paths[ROOT])
        s = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail", "f_namemax"):  # fmt: skip
            setattr(s, name, getattr(st, name))
        return s

    # --- extended attributes -------------------------------------------------------------

    @_oserror
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return os.getxattr(self._path(inode), name, follow_symlinks=False)

    @_oserror
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        os.setxattr(self._path(inode), name, value, follow_symlinks=False)

    @_oserror
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        return [os.fsencode(n) for n in os.listxattr(self._path(inode), follow_symlinks=False)]

    @_oserror
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        os.removexattr(self._path(inode), name, follow_symlinks=False)


async def _serve(stopped: list[bool]) -> None:
    async with trio.open_nursery() as nursery:

        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    stopped.append(True)
                    pyfuse3.terminate()

        nursery.start_soon(on_signals)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="passthroughfs", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("source", help="directory whose contents the mount shows")
    p.add_argument("mountpoint")
    p.add_argument("--no-keep-cache", action="store_true",
                   help="let the kernel drop a file's page cache on every open")  # fmt: skip
    p.add_argument("-o", dest="options", default="", help="extra FUSE options, comma separated")
    p.add_argument("--debug", action="store_true", help="log every FUSE request")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING)
    if not os.path.isdir(args.source) or not os.path.isdir(args.mountpoint):
        print("passthroughfs: SOURCE and MOUNTPOINT must be directories", file=sys.stderr)
        return 2
    ops = Passthrough(args.source, keep_cache=not args.no_keep_cache)
    options = set(pyfuse3.default_options) | {"fsname=passthroughfs", "subtype=passthroughfs"}
    options |= {o for o in args.options.split(",") if o}
    if args.debug:
        options.add("debug")
    pyfuse3.init(ops, args.mountpoint, options)
    stopped: list[bool] = []
    try:
        trio.run(_serve, stopped)
    finally:
        # after `fusermount3 -u` the kernel has unmounted already
        pyfuse3.close(unmount=bool(stopped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
