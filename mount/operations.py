"""The FUSE adapter: pyfuse3 requests in, core calls out.

Each handler translates arguments, calls the namespace or the file store, and turns
the result into pyfuse3 types. Domain errors become `FUSEError(errno)` here and
nowhere else; an unexpected exception is logged once with its traceback and answered
with EIO, so the kernel always gets an errno.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pyfuse3
import trio
from cloudfs.mount import fuse
from cloudfs.tools.cloudfs import XATTR_CACHEDIR, XATTR_COMMAND

from cloudfs.cache import CacheSpace
from cloudfs.errors import CloudfsError, CorruptBlock, FSOpError
from cloudfs.files import FileStore
from cloudfs.meta.base import InodeAttrs
from cloudfs.namespace import Caller, Namespace

log = logging.getLogger(__name__)

T = TypeVar("T")

#: how long the kernel may trust names and attributes without asking again. A
#: single mount (SQLite metadata) sees every change itself and tells the kernel of
#: those it makes behind the kernel's back (restore, snapshot, trash restore), so
#: its answers stay true for as long as the kernel keeps them
SINGLE_MOUNT_TIMEOUT = 3600.0
#: the same in shared mode: another machine's change shows within this time even
#: without Redis notifications
SHARED_TIMEOUT = 1.0

#: changed(inodes, entries): announce a change to the other mounts (shared mode)
Changed = Callable[[Sequence[int], Sequence[tuple[int, bytes]]], None]
BLOCK_SIZE = 4096
#: an open that sets atime drops the page cache of a file up to this size (its first
#: read is then one READ anyway) and keeps that of a bigger one (see `open`)
ATIME_DROPS_CACHE_MAX = 128 << 10


def fuse_errors(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Answer every failure of a handler with an errno."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except FSOpError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except CorruptBlock as exc:
            log.error("%s: %s", fn.__name__, exc.message)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except CloudfsError as exc:
            log.error("%s failed: %s", fn.__name__, exc.message)
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            log.error("%s failed: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _caller(ctx: pyfuse3.RequestContext) -> Caller:
    return Caller(uid=ctx.uid, gid=ctx.gid, umask=ctx.umask)


class Operations(pyfuse3.Operations):
    def __init__(
        self,
        namespace: Namespace,
        files: FileStore,
        space: CacheSpace | None = None,
        *,
        wait_stored: Callable[[int], Awaitable[None]] | None = None,
        shared: bool = False,
        cache_timeout: float | None = None,
    ) -> None:
        super().__init__()
        #: several mounts share the metadata: short kernel cache timeouts, and the page
        #: cache of a file is kept at open only if no other mount changed it since
        self.shared = shared
        #: entry and attribute timeout of the replies (-o attr_timeout overrides)
        if cache_timeout is None:
            cache_timeout = SHARED_TIMEOUT if shared else SINGLE_MOUNT_TIMEOUT
        self.timeout = cache_timeout
        #: FUSE auto_inval_data (the direct loop asks for it only when this is true):
        #: the kernel drops a file's page cache when a GETATTR shows a new mtime. A
        #: single mount makes every change through the kernel's page cache itself and
        #: invalidates what it changes behind its back (restore, drop-cache), so the
        #: pages of a file it just wrote stay for the reads after; only shared mode,
        #: where other machines change files, needs it
        self.auto_inval_data = shared
        #: shared mode: the version of each file whose contents the kernel may cache
        self._cached_version: dict[int, int] = {}
        #: shared mode with Redis: tells the other mounts what changed here
        self.changed: Changed | None = None
        self.ns = namespace
        self.files = files
        #: backpressure: a write waits while the cache is full of data not uploaded
        self.space = space
        #: --upload=sync: fsync, and the close of a handle that wrote, return only once
        #: the file's blocks are in the object store (wait_stored(ino) waits for that)
        self.wait_stored = wait_stored
        self._written: set[int] = set()  # handles written through since their last flush
        self._handles: dict[int, int] = {}  # file handle -> inode
        #: inodes whose seal after the last close runs (set when it is done)
        self._closing: dict[int, trio.Event] = {}
        self._next_fh = 1
        #: runs the seal after a last close, so release answers at once (the kernel
        #: does not wait for it, and at unmount it stops listening for the answer);
        #: serve() waits for these tasks before it exits
        self.background: trio.Nursery | None = None
        #: run once the kernel's INIT request is answered (the answer sets the mount's
        #: read-ahead window, so whatever widens it must come after)
        self.after_init: Callable[[], None] | None = None

    def init(self) -> None:
        # pyfuse3 calls this inside its FUSE_INIT handler, before the answer goes out;
        # a task started now runs once that synchronous handler has returned
        if self.after_init is not None and self.background is not None:
            after_init = self.after_init

            async def run() -> None:
                after_init()

            self.background.start_soon(run)

    # --- helpers ----------------------------------------------------------------------

    def _entry(self, attrs: InodeAttrs) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = attrs.id
        e.generation = 0
        e.entry_timeout = self.timeout
        e.attr_timeout = self.timeout
        e.st_mode = attrs.mode
        e.st_nlink = attrs.nlink
        e.st_uid = attrs.uid
        e.st_gid = attrs.gid
        e.st_rdev = attrs.rdev
        e.st_size = attrs.size
        e.st_blksize = BLOCK_SIZE
        # a regular file counts the bytes that hold data (holes cost nothing in the
        # store, so `du` of a sparse file is small); other inodes their size
        used = attrs.size if attrs.allocated is None else attrs.allocated
        e.st_blocks = (used + 511) // 512
        e.st_atime_ns = attrs.atime_ns
        e.st_mtime_ns = attrs.mtime_ns
        e.st_ctime_ns = attrs.ctime_ns
        return e

    def _known(self, attrs: InodeAttrs) -> pyfuse3.EntryAttributes:
        """An entry reply: the kernel now holds one more lookup reference."""
        self.ns.remember(attrs.id)
        return self._entry(attrs)

    def _announce(
        self, inodes: Sequence[int] = (), entries: Sequence[tuple[int, bytes]] = ()
    ) -> None:
        if self.changed is not None:
            self.changed(inodes, entries)

    def file_committed(self, ino: int, version: int) -> None:
        """FileStore.on_commit: this mount's kernel holds what it committed."""
        if self.shared:
            self._cached_version[ino] = version
        self._announce([ino])

    def _new_handle(self, ino: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = ino
        return fh

    def _refuse_if_fenced(self) -> None:
        """EROFS once the mount's lease was taken over (MetaStore.fence): the metadata
        refuses every change then; this catches the changes that begin elsewhere."""
        if self.ns.meta.fenced is not None:
            raise FSOpError(errno.EROFS, self.ns.meta.fenced)

    def _ino(self, fh: int) -> int:
        try:
            return self._handles[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    # --- names --------------------------------------------------------------------------

    @fuse_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._known(await self.ns.lookup(parent_inode, name))

    @fuse_errors
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # the kernel takes no answer to a forget: an error raised here would end the
        # whole FUSE session. An inode not freed now is freed by the next mount.
        try:
            await self.ns.forget(inode_list)
        except CloudfsError as exc:
            log.warning("forget: freeing unlinked inodes failed: %s", exc.message)
        for ino, _n in inode_list:
            if ino not in self.ns.kernel_refs:
                self._cached_version.pop(ino, None)

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(await self.ns.getattr(inode))

    @fuse_errors
    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:  # fmt: skip
        self._refuse_if_fenced()  # a truncate changes the overlay before the metadata
        attrs = await self.ns.setattr(
            inode,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            ctime_ns=attr.st_ctime_ns if fields.update_ctime else None,
        )
        self._announce([inode])
        return self._entry(attrs)

    @fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return await self.ns.readlink(inode)

    @fuse_errors
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        attrs = await self.ns.mknod(parent_inode, name, mode, rdev, _caller(ctx))
        self._announce([parent_inode], [(parent_inode, name)])
        return self._known(attrs)

    @fuse_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        attrs = await self.ns.mkdir(parent_inode, name, mode, _caller(ctx))
        self._announce([parent_inode], [(parent_inode, name)])
        return self._known(attrs)

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.ns.unlink(parent_inode, name)
        self._announce([parent_inode], [(parent_inode, name)])

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.ns.rmdir(parent_inode, name)
        self._announce([parent_inode], [(parent_inode, name)])

    @fuse_errors
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        attrs = await self.ns.symlink(parent_inode, name, target, _caller(ctx))
        self._announce([parent_inode], [(parent_inode, name)])
        return self._known(attrs)

    @fuse_errors
    async def rename(
        self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes, flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:  # fmt: skip
        await self.ns.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)
        self._announce(
            sorted({parent_inode_old, parent_inode_new}),
            [(parent_inode_old, name_old), (parent_inode_new, name_new)],
        )

    @fuse_errors
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        attrs = await self.ns.link(inode, new_parent_inode, new_name)
        self._announce([new_parent_inode, inode], [(new_parent_inode, new_name)])
        return self._known(attrs)

    # --- files ----------------------------------------------------------------------------

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        closing = self._closing.get(inode)
        if closing is not None:
            await closing.wait()
        mark = self.files.commit_mark()
        attrs = await self.ns.getattr(inode)
        if stat.S_ISDIR(attrs.mode):
            raise FSOpError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            self._refuse_if_fenced()
        # atime is set at open, not at read(): reads served from the page cache never
        # reach the filesystem. The kernel keeps cached attributes and hears nothing of
        # the new atime from an open. So an open that set it drops the page cache of a
        # small file: the first read comes here as a READ, after which the kernel marks
        # its cached atime stale itself. (Marking all attributes stale at once instead
        # cost a GETATTR between the open and the read: its size is needed.) A bigger
        # file keeps its pages and has its attributes marked stale: one GETATTR, where
        # reading it all again came from the cache dir (256 MiB cached, then chmod:
        # 1.3-1.5 GB/s read that way, 3.6-4.1 GB/s kept). An empty file sees no READ:
        # its attributes are marked stale.
        atime_set = flags & os.O_ACCMODE != os.O_WRONLY and await self.ns.accessed(attrs)
        drop_pages = atime_set and 0 < attrs.size <= ATIME_DROPS_CACHE_MAX
        if atime_set and not drop_pages:
            _invalidate_attributes(inode)
        await self.files.open(
            inode, attrs.version if self.shared else None, known=attrs, mark=mark
        )
        # the kernel's page cache stays valid across opens: every change passes through
        # it, except, in shared mode, another mount's (close-to-open: drop it then)
        keep_cache = not self.shared or self._cached_version.get(inode) == attrs.version
        if self.shared:
            if not keep_cache:
                # the kernel's cached size may be another mount's older one: reads stop
                # at it, so it must ask again
                await trio.to_thread.run_sync(_invalidate_attributes, inode)
            self._cached_version[inode] = attrs.version
        if flags & os.O_TRUNC:
            try:
                await self.ns.truncate_on_open(inode, _caller(ctx))
            except Exception:
                if self.files.close_handle(inode):  # no handle was made: undo the open
                    await self._after_last_close(inode)
                raise
        return pyfuse3.FileInfo(
            fh=self._new_handle(inode), keep_cache=keep_cache and not drop_pages
        )

    @fuse_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        attrs = await self.ns.mknod(
            parent_inode, name, stat.S_IFREG | (mode & 0o7777), 0, _caller(ctx)
        )
        # a new inode: no commit of its contents can have come since its row was made
        await self.files.open(attrs.id, known=attrs)
        if self.shared:
            self._cached_version[attrs.id] = attrs.version
        self._announce([parent_inode], [(parent_inode, name)])
        return pyfuse3.FileInfo(fh=self._new_handle(attrs.id), keep_cache=True), self._known(attrs)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.files.read(self._ino(fh), off, size)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        ino = self._ino(fh)
        if self.space is not None:
            await self.space.admit(len(buf))
        if self.wait_stored is not None:
            self._written.add(fh)
        return await self.files.write(ino, off, buf)

    @fuse_errors
    async def flush(self, fh: int) -> None:
        # close(2) waits for this answer (release comes later, unwaited for)
        if self.wait_stored is None:
            # --upload=async: a close has nothing to wait for. ENOSYS makes the kernel
            # stop sending FLUSH for good (one round trip fewer per close; POSIX locks
            # are the kernel's own here, so no lock owner needs this request)
            raise pyfuse3.FUSEError(errno.ENOSYS)
        ino = self._ino(fh)
        if self.wait_stored is not None and fh in self._written:
            self._written.discard(fh)
            await self.files.seal(ino, publish=True)
            await self.wait_stored(ino)

    @fuse_errors
    async def release(self, fh: int) -> None:
        self._written.discard(fh)
        ino = self._handles.pop(fh, None)
        if ino is None or not self.files.close_handle(ino):
            return
        if (
            self.ns.meta.fenced is None
            and self.ns.kernel_refs.get(ino) > 0  # maybe_free would keep it
            and self.files.forget_closed(ino)
        ):
            return  # nothing to seal (a file only read): no task for it
        if self.background is not None:
            # an open of the file waits for this seal: what was closed is a version of
            # its own even when the file is opened again at once (a reopen before the
            # seal would have found the file open and left its data unsealed)
            done = self._closing[ino] = trio.Event()
            self.background.start_soon(self._after_last_close, ino, done)
        else:
            await self._after_last_close(ino)

    async def _after_last_close(self, ino: int, done: trio.Event | None = None) -> None:
        try:
            await self._seal_closed(ino)
        finally:
            if done is not None:
                if self._closing.get(ino) is done:
                    del self._closing[ino]
                done.set()

    async def _seal_closed(self, ino: int) -> None:
        if self.ns.meta.fenced is not None:
            return  # nothing may be sealed or freed here any more
        try:
            await self.files.last_close(ino)
            await self.ns.maybe_free(ino)
        except CloudfsError as exc:
            log.error("sealing inode %d after its last close failed: %s", ino, exc.message)
        except Exception:  # a bug must not take the whole mount down
            log.exception("sealing inode %d after its last close failed", ino)

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        ino = self._ino(fh)
        await self.files.fsync(ino)
        if self.wait_stored is not None:
            await self.wait_stored(ino)

    # --- directories ------------------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        await self.ns.opendir(inode)
        return inode

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:  # a listing starts: the directory is read (the kernel then
            await self.ns.accessed(await self.ns.getattr(fh))  # asks for its atime again)
        cookie = start_id
        while True:
            entries = await self.ns.readdir(fh, cookie)
            if not entries:
                return
            for name, attrs, next_cookie in entries:
                if not fuse.readdir_reply(token, name, self._entry(attrs), next_cookie):
                    return
                if name not in (b".", b".."):
                    # readdirplus: an accepted entry gives the kernel a lookup reference
                    self.ns.remember(attrs.id)
                cookie = next_cookie

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        return None

    @fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.ns.sync()

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        stats = await self.files.stats()
        s = pyfuse3.StatvfsData()
        s.f_bsize = BLOCK_SIZE
        s.f_frsize = BLOCK_SIZE
        # object storage has no fixed capacity: report 1 PiB, minus what is used
        total = (1 << 50) // BLOCK_SIZE
        used = (stats.block_bytes + BLOCK_SIZE - 1) // BLOCK_SIZE
        s.f_blocks = total
        s.f_bfree = s.f_bavail = max(total - used, 0)
        s.f_files = 1 << 32
        s.f_ffree = s.f_favail = max((1 << 32) - stats.inodes, 0)
        s.f_namemax = 255
        return s

    # --- extended attributes ----------------------------------------------------------

    @fuse_errors
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        if inode == pyfuse3.ROOT_INODE and name == XATTR_COMMAND:
            try:
                await self._command(value)
            finally:  # the admin tool may read the metadata next
                await self.ns.meta.commit()
            return
        await self.ns.setxattr(inode, name, value)
        self._announce([inode])

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode == pyfuse3.ROOT_INODE and name == XATTR_CACHEDIR:
            await self.ns.meta.commit()  # an admin tool: it reads the metadata next
            return os.fsencode(self.files.cache.root)
        # the kernel asks for security.capability before every write(2): the namespace
        # answers it for inodes known to have no xattrs without SQL
        return await self.ns.getxattr(inode, name)

    async def _command(self, command: bytes) -> None:
        """Commands of the admin tool, sent as a virtual xattr of the root."""
        if command == b"seal":
            self._refuse_if_fenced()  # `cloudfs flush` must not wait for what never goes up
            await self.files.seal_all()
        elif command == b"drop_cache":
            await self._drop_cache()
        else:
            raise FSOpError(errno.EINVAL)

    async def _drop_cache(self) -> None:
        """Forget cached file contents (`cloudfs drop-cache`, after the daemon deleted
        its block copies): close the open block files, whose descriptors would keep
        serving deleted blocks, and drop the kernel's page cache of every inode it
        knows, so the next read comes here and fetches from the store."""
        self.files.blockfiles.close()
        inodes = sorted(set(self.ns.kernel_refs) | set(self.files.states) | {pyfuse3.ROOT_INODE})
        # in a worker thread: an invalidation may wait for the kernel to write dirty
        # pages back, and those writes need this event loop
        await trio.to_thread.run_sync(_invalidate_inodes, inodes)

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        return await self.ns.listxattr(inode)

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.ns.removexattr(inode, name)
        self._announce([inode])


def _invalidate_attributes(ino: int) -> None:
    """Make the kernel ask for the attributes of `ino` again. Called on the trio thread:
    the kernel only marks the cached attributes stale, it leaves cached data alone and
    so never waits for writeback or for an answer of this process (a thread hop per
    first read of a written file cost more than the call)."""
    try:
        fuse.invalidate_inode(ino, attr_only=True)
    except OSError:
        pass  # the kernel does not know the inode (any more)


def _invalidate_inodes(inodes: list[int]) -> None:
    """Drop the kernel's cached data and attributes of `inodes` (blocking)."""
    for ino in inodes:
        try:
            fuse.invalidate_inode(ino)
        except OSError:
            pass  # the kernel has forgotten it meanwhile
