"""The mount's side of history: the admin tool's history commands (restore, ...),
answered through the virtual xattrs of the root.

`HistoryOperations` extends the FUSE adapter: a command the admin tool sets as
`user.cloudfs.command` on the root runs here, in the mount, so that the in-memory state
of open files and the kernel's caches follow the change; its result (JSON, or the
error message) is kept per calling thread and read back as `user.cloudfs.result`.
"""

from __future__ import annotations

import errno
import json
import logging
import stat
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import pyfuse3
import trio
from cloudfs.mount.operations import Operations, _caller, fuse_errors
from cloudfs.tools.cloudfs import XATTR_COMMAND
from cloudfs.tools.history import XATTR_RESULT

from cloudfs.errors import CloudfsError, FSOpError
from cloudfs.meta.schema import ROOT_INODE

log = logging.getLogger(__name__)

#: results kept for callers that have not read them yet
_RESULTS_KEPT = 64

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
        self._handlers: dict[bytes, _Handler] = {
            b"restore": self._cmd_restore,
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
                await self._run_command(handler, body, ctx)
                return
        await super().setxattr(inode, name, value, ctx)

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode == ROOT_INODE and name == XATTR_RESULT:
            return self._results.get(ctx.pid, b"{}")
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
                    pyfuse3.invalidate_inode(ino)
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
        target = src
        if "parent" in args:
            parent, name = _int(args, "parent"), _name(args)
            new = await self.ns.mknod(
                parent, name, stat.S_IFREG | (attrs.mode & 0o7777), 0, _caller(ctx)
            )
            target = new.id
        new_version, size = await self.files.restore(
            src, version, into=None if target == src else target
        )
        await self._invalidate([target])
        return {"inode": target, "version": new_version, "size": size}
