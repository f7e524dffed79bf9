"""The mount's side of history: the admin tool's history commands, the read-only
view `.cloudfs/` (mount/view.py) and read-only trees.

`HistoryOperations` extends the FUSE adapter:
- a command the admin tool sets as `user.cloudfs.command` on the root (restore, ...)
  runs here, in the mount, so that the in-memory state of open files and the kernel's
  caches follow the change; its result (JSON, or the error message) is kept per
  calling thread and read back as `user.cloudfs.result`;
- requests on the view's virtual inodes go to the view; every change to them is
  refused with EROFS, and no entry named `.cloudfs` can be made in the root (EEXIST);
- every change to an inode of a read-only tree (inodes.flags, cloudfs.snapshots) is
  refused with EROFS.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import pyfuse3
import trio
from cloudfs.mount import fuse
from cloudfs.mount.operations import Operations, _caller, fuse_errors
from cloudfs.mount.view import (
    DOT,
    MIRROR,
    VERSION_FILE,
    VIEW_NAME,
    HistoryView,
    VersionHandle,
    is_virtual,
)
from cloudfs.tools.cloudfs import XATTR_COMMAND
from cloudfs.tools.history import XATTR_PROGRESS, XATTR_RESULT

from cloudfs import snapshots, trash
from cloudfs.errors import CloudfsError, FSOpError
from cloudfs.meta.base import InodeAttrs
from cloudfs.meta.schema import ROOT_INODE
from cloudfs.snapshots import readonly_among, readonly_entry

log = logging.getLogger(__name__)

T = TypeVar("T")

#: results kept for callers that have not read them yet
_RESULTS_KEPT = 64
#: how long the kernel may keep names and attributes of the view: its directories
#: change as files get new versions, a version file never changes
VIEW_DIR_TIMEOUT = 1.0
VERSION_FILE_TIMEOUT = 60.0
#: inodes a snapshot writes per write transaction; tests make many batches of a small
#: tree (CLOUDFS_TEST_SNAPSHOT_BATCH) and slow them down (CLOUDFS_TEST_SNAPSHOT_PAUSE_S:
#: seconds between two batches), so that other processes act while a copy is made
SNAPSHOT_BATCH = int(os.environ.get("CLOUDFS_TEST_SNAPSHOT_BATCH") or 2000)
SNAPSHOT_PAUSE_S = float(os.environ.get("CLOUDFS_TEST_SNAPSHOT_PAUSE_S") or 0)
#: file handles of open version files
_VIRTUAL_FH = 1 << 62

_Json = dict[str, Any]
_Handler = Callable[[_Json, pyfuse3.RequestContext], Awaitable[_Json]]


def _int(args: _Json, key: str) -> int:
    value = args.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise FSOpError(errno.EINVAL, f"{key!r} must be an integer")
    return value


def _name(args: _Json, key: str = "name") -> bytes:
    try:
        return bytes.fromhex(args[key])
    except (KeyError, TypeError, ValueError):
        raise FSOpError(errno.EINVAL, f"{key!r} must be hex bytes") from None


class HistoryOperations(Operations):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._results: OrderedDict[int, bytes] = OrderedDict()
        #: snapshots being written, by the progress token their command gave
        self._progress: dict[str, snapshots.TreeCopy] = {}
        self.view = HistoryView(self.ns.meta, self.files)
        self._vhandles: dict[int, VersionHandle] = {}
        #: single mount: whether any inode is read-only (None: not known; asked once,
        #: then again only after an unlock or a snapshot delete). Only this mount's
        #: snapshot commands make read-only trees, and each sets it first, so while it
        #: is False the EROFS guards of every create, rename and unlink need no query of
        #: their own (a read transaction and a query: ~45 µs each here, two per rename).
        #: Shared mode: another mount may make one at any time, so every guard asks
        self._readonly_exist: bool | None = None
        #: bumped whenever `_readonly_exist` is set: a scan that ran meanwhile is stale
        self._readonly_epoch = 0
        self._next_vfh = _VIRTUAL_FH
        self._handlers: dict[bytes, _Handler] = {
            b"restore": self._cmd_restore,
            b"snapshot": self._cmd_snapshot,
            b"snapshot-delete": self._cmd_snapshot_delete,
            b"unlock": self._cmd_unlock,
            b"trash-restore": self._cmd_trash_restore,
            b"trash-purge": self._cmd_trash_purge,
        }

    # --- the command channel ---------------------------------------------------------

    @fuse_errors
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        if inode == ROOT_INODE and name == XATTR_COMMAND:
            verb, _, body = value.partition(b" ")
            handler = self._handlers.get(verb)
            if handler is not None:
                try:
                    await self._run_command(handler, body, ctx)
                finally:  # the admin tool may read the metadata next
                    await self.ns.meta.commit()
                return
        if inode != ROOT_INODE or not name.startswith(b"user.cloudfs."):
            await self._refuse_readonly(inode)
        await super().setxattr(inode, name, value, ctx)

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode == ROOT_INODE and name == XATTR_RESULT:
            await self.ns.meta.commit()
            return self._results.get(ctx.pid, b"{}")
        if inode == ROOT_INODE and name.startswith(XATTR_PROGRESS):
            # read while the command runs: getxattr does not wait for the root's inode
            # lock that the command's setxattr holds
            copy = self._progress.get(name[len(XATTR_PROGRESS) :].decode(errors="replace"))
            if copy is None:
                raise FSOpError(errno.ENODATA)
            return json.dumps({"done": copy.inodes_done, "total": copy.total}).encode()
        if is_virtual(inode):
            raise FSOpError(errno.ENODATA)
        return await super().getxattr(inode, name, ctx)

    def _keep_result(self, pid: int, result: _Json) -> None:
        self._results[pid] = json.dumps(result).encode()
        self._results.move_to_end(pid)
        while len(self._results) > _RESULTS_KEPT:
            self._results.popitem(last=False)

    async def _run_command(
        self, handler: _Handler, body: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        """Run a command; its result or error message is kept for the caller. A
        refusal is answered with its errno and never logged as an error of the mount."""
        try:
            try:
                args = json.loads(body or b"{}")
            except ValueError:
                raise FSOpError(errno.EINVAL, "the command's arguments are not JSON") from None
            if not isinstance(args, dict):
                raise FSOpError(errno.EINVAL, "the command's arguments are not a JSON object")
            result = await handler(args, ctx)
        except FSOpError as exc:
            self._keep_result(ctx.pid, {"error": exc.detail or exc.message})
            raise
        except CloudfsError as exc:
            self._keep_result(ctx.pid, {"error": exc.message})
            log.warning("command failed: %s", exc.message)
            raise FSOpError(exc.errno, exc.message) from None
        self._keep_result(ctx.pid, result)

    # --- kernel caches -----------------------------------------------------------------

    async def _invalidate(self, inodes: list[int]) -> None:
        """Drop the kernel's cached data and attributes of `inodes`, in a worker thread:
        an invalidation may wait for requests this event loop must answer.

        Never the entries: a command runs inside a setxattr of the root, whose inode
        lock the kernel holds meanwhile, and invalidating an entry of a directory takes
        that directory's lock. Nor is it needed: names made behind the kernel's back
        were unknown to it (a lookup answered ENOENT leaves no cached negative entry)."""

        def run() -> None:
            for ino in inodes:
                try:
                    fuse.invalidate_inode(ino)
                except OSError:
                    pass  # the kernel does not know it

        await trio.to_thread.run_sync(run)

    # --- commands ------------------------------------------------------------------------

    async def _cmd_restore(self, args: _Json, ctx: pyfuse3.RequestContext) -> _Json:
        """{"inode", "version"[, "parent", "name"]}: version `version` of the file becomes
        its newest version, or the contents of a new file `name` in directory `parent`."""
        src = _int(args, "inode")
        version = _int(args, "version")
        attrs = await self.ns.getattr(src)
        if not stat.S_ISREG(attrs.mode):
            raise FSOpError(errno.EINVAL, "not a regular file")
        async with self.ns.meta.reading() as tx:
            known = any(v.version == version for v in await tx.versions(src))
        if not known:
            raise FSOpError(errno.ENOENT, f"no version {version}")
        # --upload=sync: blocks of it still pending are put first (a failure leaves
        # nothing behind, not even the new file)
        stored = await self.files.store_version(src, version)
        target = src
        if "parent" in args:
            parent, name = _int(args, "parent"), _name(args)
            await self._may_create(parent, name)
            new = await self.ns.mknod(
                parent, name, stat.S_IFREG | (attrs.mode & 0o7777), 0, _caller(ctx)
            )
            target = new.id
        else:
            await self._refuse_readonly(src)
        new_version, size = await self.files.restore(
            src, version, into=None if target == src else target, stored=stored
        )
        await self._invalidate([target])
        return {"inode": target, "version": new_version, "size": size}

    async def _cmd_snapshot(self, args: _Json, ctx: pyfuse3.RequestContext) -> _Json:
        """{"source", "path", "readonly", "progress", and "name" | "parent" + "dst"}: copy
        the tree at inode `source` (its path `path`, for the record) as named snapshot
        `name`, or as entry `dst` of directory `parent`. Unsealed writes are sealed
        first, so the copy holds everything written before the command.

        The source is read at one instant, then the copy is written in batches of
        SNAPSHOT_BATCH inodes (snapshots.TreeCopy); other requests are answered between
        batches, and the copy's progress is readable as `user.cloudfs.progress.<token>`
        (token: `progress`)."""
        src = _int(args, "source")
        if is_virtual(src):
            raise FSOpError(errno.EINVAL, "the source is in the history view")
        readonly = bool(args.get("readonly"))
        token = args.get("progress")
        named = "name" in args
        if named:
            name = _name(args)
            path = os.fsencode(str(args.get("path", "")))
            async with self.ns.meta.reading() as tx:
                await snapshots.check_snapshot_name(tx, name)
        else:
            parent, dst = _int(args, "parent"), _name(args, "dst")
            await self._may_create(parent, dst)
            async with self.ns.meta.reading() as tx:
                await snapshots.check_destination(tx, parent, dst)
        # the copy is read-only, or copies read-only flags of the source: from here on
        # the guards ask (its inodes are nameless until it is whole, so none is reachable)
        self._readonly_changed(True)
        await self.files.seal_all()
        await self.ns.meta.commit()  # the detached read sees committed rows only
        started = time.monotonic()
        async with self.ns.meta.detached_reading() as tx:
            source = await snapshots.read_source(tx, src)
        copy = snapshots.TreeCopy(
            source, readonly=named or readonly, origin=self.files.origin, now_ns=time.time_ns(),
            client=self.ns.client,
        )  # fmt: skip
        read_s = time.monotonic() - started
        if isinstance(token, str):
            self._progress[token] = copy
        try:
            while not copy.written:
                await self.ns.meta.run(self._copy_batch, copy)
                # let waiting requests in between batches
                if SNAPSHOT_PAUSE_S:
                    await trio.sleep(SNAPSHOT_PAUSE_S)
                else:
                    await trio.lowlevel.checkpoint()
            if named:
                root = await self.ns.meta.run(self._in_transaction, copy.finish_named, name, path)
            else:
                root = await self.ns.meta.run(self._in_transaction, copy.finish_at, parent, dst)
                await self._invalidate([parent])
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._discard_copy(copy)
            raise
        finally:
            if isinstance(token, str):
                self._progress.pop(token, None)
        if not copy.readonly:
            self._readonly_changed(None)  # its flags were cleared: perhaps still none
        elapsed = time.monotonic() - started
        log.info("snapshot of inode %d: %d inodes copied in %.2f s (read in %.2f s)",
                 src, copy.total, elapsed, read_s)  # fmt: skip
        return {"root": root, "inodes": copy.total, "seconds": elapsed}

    async def _copy_batch(self, copy: snapshots.TreeCopy) -> None:
        """One batch of `copy` in one write transaction; `copy` moves on once it committed."""
        async with self.ns.meta.transaction() as tx:
            step = await copy.write_batch(tx, SNAPSHOT_BATCH)
        copy.advance(step)

    async def _discard_copy(self, copy: snapshots.TreeCopy) -> None:
        """Free what a failed copy wrote; if even that fails, the next mount does it."""
        try:
            freed = await self.ns.meta.run(self._in_transaction, copy.discard)
        except CloudfsError as exc:
            log.warning("could not free an unfinished copy (the next mount will): %s", exc)
            return
        if freed:
            log.info("freed the %d inodes of an unfinished copy", freed)

    async def _cmd_snapshot_delete(self, args: _Json, ctx: pyfuse3.RequestContext) -> _Json:
        """{"name"}: delete a named snapshot and free its tree."""
        count = await self.ns.meta.run(
            self._in_transaction, snapshots.delete_named, _name(args), time.time_ns()
        )
        self._readonly_changed(None)  # perhaps the last read-only tree
        return {"inodes": count}

    async def _cmd_unlock(self, args: _Json, ctx: pyfuse3.RequestContext) -> _Json:
        """{"inode"}: make the read-only tree at `inode` writable."""
        root = _int(args, "inode")
        if is_virtual(root):
            raise FSOpError(errno.EROFS, "the history view stays read-only")
        count = await self.ns.meta.run(self._in_transaction, snapshots.unlock, root)
        self._readonly_changed(None)  # perhaps the last read-only tree
        return {"inodes": count}

    async def _cmd_trash_restore(self, args: _Json, ctx: pyfuse3.RequestContext) -> _Json:
        """{"path"[, "id"][, "to"]}: bring back what the trash holds at `path` (entry
        `id`), at its old path or at path `to`."""
        path = _name(args, "path")
        entry_id = _int(args, "id") if "id" in args else None
        to = _name(args, "to") if "to" in args else None
        restored = await self.ns.meta.run(
            self._in_transaction, trash.restore, path, entry_id=entry_id, to=to,
            now_ns=time.time_ns(),
        )  # fmt: skip
        async with self.ns.meta.reading() as tx:
            parent = await trash.resolve(tx, restored[0][0].rpartition(b"/")[0])
        if parent is not None:
            await self._invalidate([parent])
        return {"restored": [p.hex() for p, _ino in restored]}

    async def _cmd_trash_purge(self, args: _Json, ctx: pyfuse3.RequestContext) -> _Json:
        """{["path"][, "before_ns"][, "ids"]}: free what the trash holds (at or below
        `path`, deleted before `before_ns`, among entries `ids`: the tool sends batches).
        An inode still open here is freed at its last close."""
        under = _name(args, "path") if "path" in args else None
        before = _int(args, "before_ns") if "before_ns" in args else None
        ids = args.get("ids")
        if ids is not None and not (
            isinstance(ids, list) and all(isinstance(i, int) for i in ids)
        ):
            raise FSOpError(errno.EINVAL, "'ids' must be a list of integers")

        async def take() -> tuple[int, list[int]]:
            async with self.ns.meta.transaction() as tx:
                listed = (
                    await trash.entries(tx, under) if ids is None
                    else await trash.entries_by_id(tx, ids)
                )  # fmt: skip
                chosen = [e for e in listed if before is None or e.deleted_ns < before]
                return len(chosen), await trash.take_out(tx, chosen)

        count, nameless = await self.ns.meta.run(take)
        for ino in nameless:
            await self.ns.lost_name(ino)
        return {"entries": count}

    async def _in_transaction(self, fn: Callable[..., Awaitable[T]], *args: Any, **kw: Any) -> T:
        """`fn(tx, *args, **kw)` in one write transaction (for MetaStore.run)."""
        async with self.ns.meta.transaction() as tx:
            return await fn(tx, *args, **kw)

    # --- guards ----------------------------------------------------------------------------

    def _readonly_changed(self, exist: bool | None) -> None:
        """Read-only trees may have appeared (True) or gone (None: scan again)."""
        self._readonly_exist = exist
        self._readonly_epoch += 1

    async def _readonly_may_exist(self) -> bool:
        """False when no inode can be read-only, so a guard has nothing to ask."""
        if self.shared:
            return True
        if self._readonly_exist is None:
            epoch = self._readonly_epoch
            async with self.ns.meta.reading() as tx:
                found = await snapshots.any_readonly(tx)
            if epoch != self._readonly_epoch:
                return True  # a command changed read-only trees meanwhile: ask
            self._readonly_exist = found
        return self._readonly_exist

    async def _refuse_readonly(self, *inodes: int) -> None:
        """EROFS when one of `inodes` belongs to a read-only tree or the view."""
        if any(is_virtual(i) for i in inodes):
            raise FSOpError(errno.EROFS, "the history view is read-only")
        if not await self._readonly_may_exist():
            return
        async with self.ns.meta.reading() as tx:
            if await readonly_among(tx, list(inodes)):
                raise FSOpError(errno.EROFS, "read-only tree (cloudfs snapshot unlock)")

    async def _may_create(self, parent: int, name: bytes) -> None:
        if parent == ROOT_INODE and name == VIEW_NAME:
            raise FSOpError(errno.EEXIST)  # the view's name is taken
        await self._refuse_readonly(parent)

    async def _may_remove(self, parent: int, name: bytes) -> None:
        """Removing (or renaming away) `name`: its directory and itself must be writable."""
        if parent == ROOT_INODE and name == VIEW_NAME:
            raise FSOpError(errno.EROFS)
        if is_virtual(parent):
            raise FSOpError(errno.EROFS)
        if not await self._readonly_may_exist():
            return
        async with self.ns.meta.reading() as tx:
            if await readonly_entry(tx, parent, name):
                raise FSOpError(errno.EROFS)

    @contextlib.contextmanager
    def _remover(self, ctx: pyfuse3.RequestContext) -> Iterator[None]:
        """Names removed meanwhile are recorded in the trash as removed by the calling
        process (which groups an `rm -rf` into one removal, cloudfs.trash)."""
        token = trash.REMOVER.set(f"{self.files.origin}:{ctx.pid}")
        try:
            yield
        finally:
            trash.REMOVER.reset(token)

    # --- the view: names and attributes ------------------------------------------------------

    def _virtual_entry(self, attrs: InodeAttrs) -> pyfuse3.EntryAttributes:
        """An entry reply for a node of the view (the kernel takes a reference)."""
        entry = self._entry(attrs)
        timeout = VERSION_FILE_TIMEOUT if VERSION_FILE <= attrs.id < MIRROR else VIEW_DIR_TIMEOUT
        entry.entry_timeout = entry.attr_timeout = timeout
        return entry

    def _view_known(self, attrs: InodeAttrs) -> pyfuse3.EntryAttributes:
        if is_virtual(attrs.id):
            self.view.remember(attrs.id)
            return self._virtual_entry(attrs)
        return self._known(attrs)  # a snapshot's root: a real inode

    @fuse_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == ROOT_INODE and name == VIEW_NAME:
            return self._view_known(await self.view.getattr(DOT))
        if is_virtual(parent_inode):
            return self._view_known(await self.view.lookup(parent_inode, name))
        return await super().lookup(parent_inode, name, ctx)

    @fuse_errors
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # a batch can hold tens of thousands of inodes (the kernel dropped its caches):
        # pass the kernel's own list on, without copying its items
        if any(is_virtual(ino) for ino, _n in inode_list):
            for ino, n in inode_list:
                if is_virtual(ino):
                    self.view.forget(ino, n)
            inode_list = [item for item in inode_list if not is_virtual(item[0])]
        if inode_list:
            await super().forget(inode_list)

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if is_virtual(inode):
            return self._virtual_entry(await self.view.getattr(inode))
        return await super().getattr(inode, ctx)

    @fuse_errors
    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:  # fmt: skip
        await self._refuse_readonly(inode)
        return await super().setattr(inode, attr, fields, fh, ctx)

    @fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        if is_virtual(inode):
            raise FSOpError(errno.EINVAL)
        return await super().readlink(inode, ctx)

    # --- changes of names -------------------------------------------------------------------

    @fuse_errors
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        await self._may_create(parent_inode, name)
        return await super().mknod(parent_inode, name, mode, rdev, ctx)

    @fuse_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        await self._may_create(parent_inode, name)
        return await super().mkdir(parent_inode, name, mode, ctx)

    @fuse_errors
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        await self._may_create(parent_inode, name)
        return await super().symlink(parent_inode, name, target, ctx)

    @fuse_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        await self._may_create(parent_inode, name)
        return await super().create(parent_inode, name, mode, flags, ctx)

    @fuse_errors
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        await self._may_create(new_parent_inode, new_name)
        await self._refuse_readonly(inode)  # its link count would change
        return await super().link(inode, new_parent_inode, new_name, ctx)

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._may_remove(parent_inode, name)
        with self._remover(ctx):
            await super().unlink(parent_inode, name, ctx)

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._may_remove(parent_inode, name)
        with self._remover(ctx):
            await super().rmdir(parent_inode, name, ctx)

    @fuse_errors
    async def rename(
        self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes, flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:  # fmt: skip
        await self._may_remove(parent_inode_old, name_old)
        if parent_inode_new == ROOT_INODE and name_new == VIEW_NAME:
            raise FSOpError(errno.EEXIST)
        await self._may_remove(parent_inode_new, name_new)
        with self._remover(ctx):
            await super().rename(
                parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx
            )

    # --- contents -------------------------------------------------------------------------

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        writes = flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC
        if is_virtual(inode):
            if writes:
                raise FSOpError(errno.EROFS)
            handle = await self.view.open(inode)
            self._next_vfh += 1
            self._vhandles[self._next_vfh] = handle
            return pyfuse3.FileInfo(fh=self._next_vfh, keep_cache=True)
        if writes:
            await self._refuse_readonly(inode)
        return await super().open(inode, flags, ctx)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._vhandles.get(fh)
        if handle is not None:
            return await self.view.read(handle, off, size)
        return await super().read(fh, off, size)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if fh in self._vhandles:
            raise FSOpError(errno.EBADF)
        return await super().write(fh, off, buf)

    @fuse_errors
    async def flush(self, fh: int) -> None:
        if fh not in self._vhandles:
            await super().flush(fh)

    @fuse_errors
    async def release(self, fh: int) -> None:
        if self._vhandles.pop(fh, None) is None:
            await super().release(fh)

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        if fh not in self._vhandles:
            await super().fsync(fh, datasync)

    # --- directories --------------------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if is_virtual(inode):
            attrs = await self.view.getattr(inode)
            if not stat.S_ISDIR(attrs.mode):
                raise FSOpError(errno.ENOTDIR)
            return inode
        return await super().opendir(inode, ctx)

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if not is_virtual(fh):
            await super().readdir(fh, start_id, token)
            return
        for name, attrs, next_cookie in await self.view.readdir(fh, start_id):
            entry = self._virtual_entry(attrs) if is_virtual(attrs.id) else self._entry(attrs)
            if not fuse.readdir_reply(token, name, entry, next_cookie):
                return
            if name not in (b".", b".."):
                # readdirplus: an accepted entry gives the kernel a lookup reference
                if is_virtual(attrs.id):
                    self.view.remember(attrs.id)
                else:
                    self.ns.remember(attrs.id)

    @fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        if not is_virtual(fh):
            await super().fsyncdir(fh, datasync)

    # --- extended attributes ------------------------------------------------------------

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        if is_virtual(inode):
            return []
        return await super().listxattr(inode, ctx)

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._refuse_readonly(inode)
        await super().removexattr(inode, name, ctx)
