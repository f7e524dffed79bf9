"""The namespace: POSIX rules for names, links and attributes, over the MetaStore.

Every method checks the rules a local filesystem enforces (which errno for which
case) and changes the metadata in one transaction. File contents belong to
`cloudfs.files`; this module only asks it for unsealed sizes and to truncate.
Inodes with no name left stay until the last open handle is closed and the kernel
has forgotten them (open-unlinked files keep working).
"""

from __future__ import annotations

import errno
import functools
import logging
import stat
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, replace
from typing import Concatenate, ParamSpec, TypeVar

import trio

from cloudfs import clients, snapshots, trash
from cloudfs.errors import CloudfsError, FSOpError
from cloudfs.files import FileStore
from cloudfs.lookups import LookupCounts
from cloudfs.meta.base import InodeAttrs, MetaStore, Txn
from cloudfs.meta.schema import ROOT_INODE

log = logging.getLogger(__name__)

NAME_MAX = 255
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
#: the xattr namespaces a filesystem stores (system.* are ACLs, which the kernel
#: answers itself on a mount without ACL support); other names fail as on ext4
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")
XATTR_CREATE = 1
XATTR_REPLACE = 2
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
#: readdir cookies 1 and 2 are "." and ".."; entry cookies are dentry ids + 2
_DOT_COOKIES = 2
#: relatime: a read refreshes an atime newer than mtime and ctime once it is this old
RELATIME_NS = 86_400 * 10**9
#: an atime update waits at most this long for its write (run_atime_writes), with the
#: others of that time: one transaction for all the files a `grep -r` read
ATIME_WRITE_DELAY_S = 1.0
#: what a read does to atime (the mount options of the same names)
ATIME_MODES = ("relatime", "strictatime", "noatime")
#: reads of inode rows that a commit of the same file straddled are done again, this
#: many in all at most (each retry needs another commit of that file meanwhile)
STALE_READ_ATTEMPTS = 20


@dataclass(frozen=True)
class Caller:
    """Who asks: the requesting process's credentials."""

    uid: int
    gid: int
    umask: int = 0o022


def _err(code: int, detail: str | None = None) -> FSOpError:
    return FSOpError(code, detail)


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise _err(errno.ENAMETOOLONG)
    if not name or b"/" in name or b"\0" in name:
        raise _err(errno.EINVAL)


def _check_xattr_name(name: bytes) -> None:
    if not name.startswith(XATTR_NAMESPACES):
        raise _err(errno.EOPNOTSUPP)


def _without_privileges(mode: int) -> int:
    """`mode` less what Linux clears on a write, truncate or chown: setuid, and setgid
    when the group may execute (setgid without group-x marks mandatory locking)."""
    mode &= ~stat.S_ISUID
    if mode & stat.S_IXGRP:
        mode &= ~stat.S_ISGID
    return mode


P = ParamSpec("P")
T = TypeVar("T")
R = TypeVar("R")


def _retried(
    method: Callable[Concatenate[Namespace, P], Awaitable[T]],
) -> Callable[Concatenate[Namespace, P], Awaitable[T]]:
    """Run a changing operation again when its transaction lost to a concurrent one
    (MetaStore.run): each such method checks and changes in one write transaction, so
    running it again repeats nothing."""

    @functools.wraps(method)
    async def again(self: Namespace, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self.meta.run(method, self, *args, **kwargs)

    return again


class Namespace:
    def __init__(self, meta: MetaStore, files: FileStore, *, atime: str = "relatime") -> None:
        if atime not in ATIME_MODES:
            raise ValueError(f"atime mode {atime!r}")
        self.meta = meta
        self.files = files
        self.atime = atime
        #: kernel lookup counts: an inode with no name stays until they reach 0
        self.kernel_refs = LookupCounts()
        #: inodes that lost their last name while the kernel knew them or a handle had
        #: them open: only these need a look when the kernel forgets one
        self._nameless: set[int] = set()
        #: this mount's `clients` row: it holds (cloudfs.clients) the open inodes that
        #: lose their last name here; an inode another mount holds stays too. None (a
        #: namespace outside a mount, in tests and tools): no holds are written
        self.client: clients.Client | None = None
        #: the inodes this mount holds because they lost their last name while open
        self.marked_open: set[int] = set()
        #: inodes known to hold no extended attribute, while the kernel knows them. The
        #: kernel asks for security.capability before every write(2); these answer
        #: ENODATA without SQL. Sound while this mount is the only writer of xattrs
        #: (single mount: setxattr, removexattr here; a snapshot gives its copies new
        #: ids, which are never reused); in shared mode (other mounts) not kept.
        self._without_xattrs: set[int] = set()
        #: other mounts share the metadata (MySQL): what they change is never known here
        self.shared = False
        #: atime updates not written yet: inode -> (the atime it replaces, the new one).
        #: Replies show the new one (`_live`); run_atime_writes writes them in batches
        self._atimes: dict[int, tuple[int, int]] = {}
        #: set while run_atime_writes runs: it wakes it for the first pending update
        self._atimes_due: trio.Event | None = None

    # --- attributes -------------------------------------------------------------------

    def _live(self, attrs: InodeAttrs) -> InodeAttrs:
        """Attributes with the unsealed size and mtime of an open file, and an atime not
        written yet."""
        st = self.files.current(attrs.id)
        atime = self._atimes.get(attrs.id)
        if st is None:
            return attrs if atime is None else replace(attrs, atime_ns=atime[1])
        changes: dict[str, int] = {"size": st.size}
        if atime is not None:
            changes["atime_ns"] = atime[1]
        if st.mtime_ns is not None:
            changes["mtime_ns"] = st.mtime_ns
            changes["ctime_ns"] = max(st.mtime_ns, attrs.ctime_ns)
        return replace(attrs, **changes)

    @staticmethod
    def _sealed_bytes(*attrs: InodeAttrs) -> dict[int, int]:
        """The live extents' total of each regular file among `attrs`: the inode row's
        `allocated` column (no SUM over the extents on a lookup)."""
        return {a.id: a.sealed_allocated for a in attrs if stat.S_ISREG(a.mode)}

    async def _fill_allocated(self, sealed: dict[int, int], *attrs: InodeAttrs) -> None:
        """Set `allocated` of the regular files among `attrs` (outside a transaction:
        a file with unsealed changes may need its extents loaded)."""
        for a in attrs:
            if stat.S_ISREG(a.mode):
                a.allocated = await self.files.allocated(a.id, sealed.get(a.id, 0))

    async def _get(self, tx: Txn, ino: int) -> InodeAttrs:
        attrs = await tx.get_inode(ino)
        if attrs is None:
            raise _err(errno.ENOENT)
        return attrs

    async def _rows(
        self, read: Callable[[Txn], Awaitable[R]], inodes: Callable[[R], Collection[int]]
    ) -> R:
        """`read(tx)` in a read transaction: inode rows for `_live` to complete. Read
        again while this mount committed the contents of one of `inodes(rows)` meanwhile
        (FileStore.committed_since: the row may predate the commit that the in-memory
        state already reflects). Call `_live` on the rows before the next await."""
        for _ in range(STALE_READ_ATTEMPTS - 1):
            mark = self.files.commit_mark()
            async with self.meta.reading() as tx:
                rows = await read(tx)
            if not self.files.committed_since(mark, inodes(rows)):
                return rows
        async with self.meta.reading() as tx:  # commits of one file cannot go on forever
            return await read(tx)

    async def getattr(self, ino: int) -> InodeAttrs:
        attrs = self._live(await self._rows(lambda tx: self._get(tx, ino), lambda a: (a.id,)))
        await self._fill_allocated(self._sealed_bytes(attrs), attrs)
        return attrs

    async def lookup(self, parent: int, name: bytes) -> InodeAttrs:
        if len(name) > NAME_MAX:
            raise _err(errno.ENAMETOOLONG)

        async def read(tx: Txn) -> InodeAttrs:
            if name in (b".", b".."):
                ino: int | None = parent
                if name == b".." and parent != ROOT_INODE:
                    ino = await tx.parent_of(parent)
                if ino is None:
                    raise _err(errno.ENOENT)
                return await self._get(tx, ino)
            # one query: a lookup is what the kernel asks most (every path, every create)
            named = await tx.lookup_attrs(parent, name)
            if named is None:
                raise _err(errno.ENOENT)
            return named

        attrs = self._live(await self._rows(read, lambda a: (a.id,)))
        await self._fill_allocated(self._sealed_bytes(attrs), attrs)
        return attrs

    @_retried
    async def setattr(
        self,
        ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        ctime_ns: int | None = None,
    ) -> InodeAttrs:
        now = time.time_ns()
        if size is not None and mtime_ns is None:
            mtime_ns = now  # a truncate is a data change, even to the same size (as on ext4)
        if size is not None:
            async with self.meta.reading() as tx:
                attrs = await self._get(tx, ino)
            if stat.S_ISDIR(attrs.mode):
                raise _err(errno.EISDIR)
            if not stat.S_ISREG(attrs.mode):
                raise _err(errno.EINVAL)
            await self.files.truncate(ino, size)
        async with self.meta.transaction() as tx:
            attrs = await self._get(tx, ino)
            changes: dict[str, int] = {"ctime_ns": ctime_ns if ctime_ns is not None else now}
            if mode is not None:
                changes["mode"] = (attrs.mode & ~0o7777) | (mode & 0o7777)
            if uid is not None and uid != attrs.uid or gid is not None and gid != attrs.gid:
                if uid is not None:
                    changes["uid"] = uid
                if gid is not None:
                    changes["gid"] = gid
                # chown clears setuid, and setgid when group-executable (as Linux does)
                if not stat.S_ISDIR(attrs.mode):
                    changes["mode"] = _without_privileges(changes.get("mode", attrs.mode))
            if atime_ns is not None:
                changes["atime_ns"] = atime_ns
                self._atimes.pop(ino, None)  # an explicit time wins over a read's
            if mtime_ns is not None:
                changes["mtime_ns"] = mtime_ns
                st = self.files.current(ino)
                if st is not None:
                    st.mtime_ns = None  # an explicit time wins over the pending write time
            await tx.update_inode(ino, **changes)
            attrs = self._live(replace(attrs, **changes))
            sealed = self._sealed_bytes(attrs)
        await self._fill_allocated(sealed, attrs)
        return attrs

    async def accessed(self, attrs: InodeAttrs) -> bool:
        """The file or directory `attrs` (as `_live` gave them) was read: update its
        atime as the mount's atime mode says (relatime by default: only when atime is
        not newer than mtime and ctime, or is a day old). True if it changed.

        While run_atime_writes runs, the update waits in memory for at most
        ATIME_WRITE_DELAY_S and replies show it meanwhile: the first read of each file
        after a change costs no transaction of its own. A crash loses those updates
        (as Linux's lazytime does), never anything else."""
        if self.atime == "noatime" or self.meta.fenced is not None:
            return False
        now = time.time_ns()
        if (
            self.atime == "relatime"
            and attrs.atime_ns > max(attrs.mtime_ns, attrs.ctime_ns)
            and now - attrs.atime_ns < RELATIME_NS
        ):
            return False
        if self._atimes_due is None:
            await self._set_atime(attrs.id, now)
            return True
        pending = self._atimes.get(attrs.id)
        self._atimes[attrs.id] = (pending[0] if pending else attrs.atime_ns, now)
        self._atimes_due.set()
        return True

    @_retried
    async def _set_atime(self, ino: int, now: int) -> None:
        async with self.meta.transaction() as tx:
            await tx.update_inode(ino, atime_ns=now)  # (changes no row if freed meanwhile)

    async def run_atime_writes(
        self,
        delay_s: float = ATIME_WRITE_DELAY_S,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Until cancelled: write the pending atime updates (`accessed`), each at most
        `delay_s` after it was made, many in one transaction. On the way out the rest
        are written."""
        self._atimes_due = trio.Event()
        task_status.started()
        try:
            while True:
                await self._atimes_due.wait()
                await trio.sleep(delay_s)
                self._atimes_due = trio.Event()
                try:
                    await self.write_atimes()
                except CloudfsError as exc:  # kept, and tried again after the delay
                    log.warning("writing atimes failed: %s", exc.message)
                    self._atimes_due.set()
        finally:
            self._atimes_due = None
            with trio.CancelScope(shield=True):
                try:
                    await self.write_atimes()
                except CloudfsError as exc:
                    log.warning("writing atimes at unmount failed: %s", exc.message)

    async def write_atimes(self) -> None:
        """Write the pending atime updates now. Each only where the row still has the
        atime it replaces: a utimes (here or on another mount) since then wins."""
        if self.meta.fenced is not None:
            self._atimes.clear()  # nothing may be written here any more
        if not self._atimes:
            return
        written = await self._write_atimes()
        for ino, update in written.items():
            if self._atimes.get(ino) is update:  # not read again meanwhile
                del self._atimes[ino]

    @_retried
    async def _write_atimes(self) -> dict[int, tuple[int, int]]:
        async with self.meta.transaction() as tx:
            # taken inside the transaction: a setattr's own transaction runs before or
            # after this one, never between this copy and the writes
            pending = dict(self._atimes)
            await tx.set_atimes([(new, ino, old) for ino, (old, new) in pending.items()])
        return pending

    async def truncate_on_open(self, ino: int, caller: Caller) -> InodeAttrs:
        """open(O_TRUNC): size 0 and new data times, also for an empty file. The kernel
        leaves an atomic O_TRUNC to the filesystem, so the filesystem also clears what a
        truncate by an unprivileged process clears: setuid, and setgid when
        group-executable (root has CAP_FSETID and keeps them)."""
        mode = None
        if caller.uid != 0:
            async with self.meta.reading() as tx:
                attrs = await self._get(tx, ino)
            if _without_privileges(attrs.mode) != attrs.mode:
                mode = _without_privileges(attrs.mode)
        return await self.setattr(ino, size=0, mode=mode)

    # --- creating -----------------------------------------------------------------------

    async def _new_inode(
        self, tx: Txn, parent: int, name: bytes, mode: int, caller: Caller, *, rdev: int = 0
    ) -> InodeAttrs:
        _check_name(name)
        pattrs, existing = await tx.dir_and_entry(parent, name)  # one query
        if pattrs is None:
            raise _err(errno.ENOENT)
        if not stat.S_ISDIR(pattrs.mode):
            raise _err(errno.ENOTDIR)
        if pattrs.nlink == 0:
            raise _err(errno.ENOENT)  # the directory was removed
        if existing is not None:
            raise _err(errno.EEXIST)
        now = time.time_ns()
        gid = caller.gid
        if pattrs.mode & stat.S_ISGID:
            gid = pattrs.gid  # setgid directory: new entries take its group
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        is_dir = stat.S_ISDIR(mode)
        attrs = await tx.create_inode(
            mode=mode, uid=caller.uid, gid=gid, nlink=2 if is_dir else 1, now_ns=now, rdev=rdev
        )
        await tx.add_dentry(parent, name, attrs.id)
        await tx.update_inode(
            parent, mtime_ns=now, ctime_ns=now, nlink=pattrs.nlink + (1 if is_dir else 0)
        )
        return attrs

    @_retried
    async def mknod(
        self, parent: int, name: bytes, mode: int, rdev: int, caller: Caller
    ) -> InodeAttrs:
        if stat.S_IFMT(mode) == 0:
            mode |= stat.S_IFREG
        async with self.meta.transaction() as tx:
            attrs = await self._new_inode(tx, parent, name, mode, caller, rdev=rdev)
        return self._born(attrs)

    @_retried
    async def mkdir(self, parent: int, name: bytes, mode: int, caller: Caller) -> InodeAttrs:
        async with self.meta.transaction() as tx:
            attrs = await self._new_inode(
                tx, parent, name, stat.S_IFDIR | (mode & 0o7777), caller
            )
        return self._born(attrs)

    def _born(self, attrs: InodeAttrs) -> InodeAttrs:
        """A new inode, committed (or in the group): it has no extended attributes."""
        if not self.shared:
            self._without_xattrs.add(attrs.id)
        return attrs

    @_retried
    async def symlink(self, parent: int, name: bytes, target: bytes, caller: Caller) -> InodeAttrs:
        async with self.meta.transaction() as tx:
            attrs = await self._new_inode(tx, parent, name, stat.S_IFLNK | 0o777, caller)
            await tx.set_symlink(attrs.id, target)
            await tx.update_inode(attrs.id, size=len(target))
            return replace(attrs, size=len(target))

    async def readlink(self, ino: int) -> bytes:
        async with self.meta.reading() as tx:
            target = await tx.get_symlink(ino)
        if target is None:
            raise _err(errno.EINVAL)
        return target

    @_retried
    async def link(self, ino: int, new_parent: int, new_name: bytes) -> InodeAttrs:
        _check_name(new_name)
        now = time.time_ns()
        async with self.meta.transaction() as tx:
            attrs = await self._get(tx, ino)
            if stat.S_ISDIR(attrs.mode):
                raise _err(errno.EPERM)
            pattrs = await self._get(tx, new_parent)
            if not stat.S_ISDIR(pattrs.mode):
                raise _err(errno.ENOTDIR)
            if await tx.lookup(new_parent, new_name) is not None:
                raise _err(errno.EEXIST)
            await tx.add_dentry(new_parent, new_name, ino)
            await tx.update_inode(ino, nlink=attrs.nlink + 1, ctime_ns=now)
            await tx.update_inode(new_parent, mtime_ns=now, ctime_ns=now)
            attrs = self._live(replace(attrs, nlink=attrs.nlink + 1, ctime_ns=now))
            sealed = self._sealed_bytes(attrs)
        await self._fill_allocated(sealed, attrs)
        return attrs

    # --- removing -----------------------------------------------------------------------

    async def _drop_name(
        self, tx: Txn, parent: int, name: bytes, attrs: InodeAttrs, now: int
    ) -> bool:
        """Remove one name of inode `attrs` (read in `tx`, already checked); the inode
        loses a link. True when that was its last name and the inode may have to be
        freed (`lost_name`): not when the trash keeps it, unless this mount marked it
        (an open file), since freeing it then also takes the mark off."""
        ino = attrs.id
        await tx.drop_dentry(parent, name)
        if stat.S_ISDIR(attrs.mode):
            await tx.update_inode(ino, nlink=0, ctime_ns=now)
            await tx.add_nlink(parent, -1, now)  # its "..": no read of the parent first
        else:
            await tx.update_inode(ino, nlink=attrs.nlink - 1, ctime_ns=now)
        # every name goes to the trash (a file with several names comes back with all);
        # after its last name the inode stays there, kept for the retention period
        kept = await trash.keep(tx, ino, parent, name, now)
        last = stat.S_ISDIR(attrs.mode) or attrs.nlink <= 1
        if kept and last and self.files.in_use(ino) and self.client is not None:
            # still used here: a purge by another process must leave it to this mount
            # (a mark of its own, apart from shared mode's open holds, which a
            # heartbeat may be releasing right now)
            await self.client.mark(tx, ino)
            self.marked_open.add(ino)
            return True
        # kept: a purge of the trash calls lost_name (so no transaction now, nor when the
        # kernel forgets the inode, only to find it in the trash)
        return last and not kept

    @_retried
    async def unlink(self, parent: int, name: bytes) -> None:
        now = time.time_ns()
        async with self.meta.transaction() as tx:
            found = await tx.lookup_attrs(parent, name)  # entry and inode: one query
            if found is None:
                raise _err(errno.ENAMETOOLONG if len(name) > NAME_MAX else errno.ENOENT)
            attrs, ino = found, found.id
            if stat.S_ISDIR(attrs.mode):
                raise _err(errno.EISDIR)
            last = await self._drop_name(tx, parent, name, attrs, now)
            await tx.update_inode(parent, mtime_ns=now, ctime_ns=now)
        if last:
            await self.lost_name(ino)

    @_retried
    async def rmdir(self, parent: int, name: bytes) -> None:
        now = time.time_ns()
        if name == b".":
            raise _err(errno.EINVAL)
        if name == b"..":
            raise _err(errno.ENOTEMPTY)
        async with self.meta.transaction() as tx:
            # entry, inode and whether it has entries: one query
            found = await tx.lookup_attrs_and_entries(parent, name)
            if found is None:
                raise _err(errno.ENAMETOOLONG if len(name) > NAME_MAX else errno.ENOENT)
            attrs, has_entries = found
            ino = attrs.id
            if not stat.S_ISDIR(attrs.mode):
                raise _err(errno.ENOTDIR)
            if has_entries:
                raise _err(errno.ENOTEMPTY)
            last = await self._drop_name(tx, parent, name, attrs, now)
            await tx.update_inode(parent, mtime_ns=now, ctime_ns=now)
        if last:
            await self.lost_name(ino)

    @_retried
    async def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int = 0
    ) -> None:
        _check_name(new_name)
        if (
            flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE)
            or flags == RENAME_NOREPLACE | RENAME_EXCHANGE
        ):
            raise _err(errno.EINVAL)
        now = time.time_ns()
        replaced: int | None = None
        async with self.meta.transaction() as tx:
            src = await tx.lookup(old_parent, old_name)
            if src is None:
                raise _err(errno.ENOENT)
            sattrs = await self._get(tx, src)
            npattrs = await self._get(tx, new_parent)
            if not stat.S_ISDIR(npattrs.mode):
                raise _err(errno.ENOTDIR)
            if stat.S_ISDIR(sattrs.mode) and await self._is_ancestor(tx, src, new_parent):
                raise _err(errno.EINVAL)  # a directory cannot move into its own subtree
            dst = await tx.lookup(new_parent, new_name)
            if flags & RENAME_EXCHANGE:
                if dst is None:
                    raise _err(errno.ENOENT)
                dattrs = await self._get(tx, dst)
                if stat.S_ISDIR(dattrs.mode) and await self._is_ancestor(tx, dst, old_parent):
                    raise _err(errno.EINVAL)
                await tx.set_dentry_inode(old_parent, old_name, dst)
                await tx.set_dentry_inode(new_parent, new_name, src)
                if old_parent != new_parent:
                    delta = int(stat.S_ISDIR(sattrs.mode)) - int(stat.S_ISDIR(dattrs.mode))
                    await self._touch_dir(tx, old_parent, now, -delta)
                    await self._touch_dir(tx, new_parent, now, delta)
                else:
                    await self._touch_dir(tx, old_parent, now, 0)
                await tx.update_inode(src, ctime_ns=now)
                await tx.update_inode(dst, ctime_ns=now)
                return
            if dst is not None:
                if flags & RENAME_NOREPLACE:
                    raise _err(errno.EEXIST)
                if dst == src:
                    return  # two names of one inode: POSIX says do nothing
                dattrs = await self._get(tx, dst)
                if stat.S_ISDIR(sattrs.mode):
                    if not stat.S_ISDIR(dattrs.mode):
                        raise _err(errno.ENOTDIR)
                    if await tx.has_entries(dst):
                        raise _err(errno.ENOTEMPTY)
                elif stat.S_ISDIR(dattrs.mode):
                    raise _err(errno.EISDIR)
                if await self._drop_name(tx, new_parent, new_name, dattrs, now):
                    replaced = dst
            await tx.remove_dentry(old_parent, old_name)
            await tx.add_dentry(new_parent, new_name, src)
            is_dir = stat.S_ISDIR(sattrs.mode)
            if old_parent != new_parent:
                await self._touch_dir(tx, old_parent, now, -1 if is_dir else 0)
                await self._touch_dir(tx, new_parent, now, 1 if is_dir else 0)
            else:
                await self._touch_dir(tx, old_parent, now, 0)
            await tx.update_inode(src, ctime_ns=now)
        if replaced is not None:
            await self.lost_name(replaced)

    async def _touch_dir(self, tx: Txn, ino: int, now: int, nlink_delta: int) -> None:
        attrs = await self._get(tx, ino)
        await tx.update_inode(ino, mtime_ns=now, ctime_ns=now, nlink=attrs.nlink + nlink_delta)

    async def _is_ancestor(self, tx: Txn, ancestor: int, ino: int) -> bool:
        """Is directory `ancestor` equal to `ino` or above it?"""
        seen = 0
        while True:
            if ino == ancestor:
                return True
            if ino == ROOT_INODE:
                return False
            parent = await tx.parent_of(ino)
            if parent is None:
                return False
            ino = parent
            seen += 1
            if seen > 100_000:
                raise _err(errno.ELOOP)

    # --- lifetime of nameless inodes -------------------------------------------------------

    def remember(self, ino: int, n: int = 1) -> None:
        """The kernel learned about `ino` (lookup, create, ...)."""
        self.kernel_refs.add(ino, n)

    async def forget(self, items: Sequence[tuple[int, int]]) -> None:
        """The kernel gave references back. Only an inode that lost its last name while
        it was known can have to go: the others cost no transaction (the kernel forgets
        whole directories at once when it drops its caches)."""
        for ino, n in items:
            if self.kernel_refs.forget(ino, n) == 0:
                self._without_xattrs.discard(ino)
                if ino in self._nameless:
                    await self.maybe_free(ino)

    async def lost_name(self, ino: int) -> None:
        """`ino` may have lost its last name: free it now or once it is closed and
        forgotten."""
        self._nameless.add(ino)
        await self.maybe_free(ino)

    async def released(self, inodes: list[int]) -> None:
        """Shared mode: this mount's heartbeat released its holds on `inodes`, which
        have no name left. One whose last name went here waits for the kernel to forget
        it, as always; one another mount unlinked while this mount held it is freed as
        that mount would have freed it had the hold been gone: now, unless used here or
        held elsewhere (that mount cannot see this kernel's references either)."""
        for ino in inodes:
            if ino in self._nameless:
                await self.maybe_free(ino)
            else:
                await self.maybe_free(ino, kernel_refs_count=False)

    async def free_at_unmount(self, released: list[int]) -> None:
        """Shared mode, unmounted: the kernel's references are gone, so the inodes
        without a name that this mount used (`released` by its last heartbeat, or
        unlinked here while the kernel knew them) are freed now, unless another mount
        holds them. Else they would wait for some mount's `free_orphans`."""
        for ino in sorted(set(released) | self._nameless | self.marked_open):
            await self.maybe_free(ino, kernel_refs_count=False)

    @_retried
    async def maybe_free(self, ino: int, *, kernel_refs_count: bool = True) -> None:
        """Free `ino` if no name, no open handle and no kernel reference is left
        (`kernel_refs_count`: this mount's kernel references do not keep it)."""
        if self.files.in_use(ino):
            return  # the last close (or the seal under way) calls again
        if kernel_refs_count and self.kernel_refs.get(ino) > 0:
            return  # forget() calls again (when `ino` is in _nameless)
        if self.meta.fenced is not None:
            return  # changes nothing any more; the next mount's free_orphans frees it
        async with self.meta.transaction() as tx:
            if ino in self.marked_open and self.client is not None:
                await self.client.unmark(tx, ino)  # no longer used here
            attrs = await tx.get_inode(ino)
            if attrs is None or attrs.nlink > 0 or ino == ROOT_INODE:
                self._nameless.discard(ino)
                self.marked_open.discard(ino)
                return
            if await trash.holds(tx, ino):
                self._nameless.discard(ino)  # a purge of the trash calls lost_name again
                self.marked_open.discard(ino)
                return  # kept for the retention period (cloudfs.trash)
            if await clients.held_elsewhere(tx, ino, self.client.id if self.client else None):
                self._nameless.discard(ino)
                self.marked_open.discard(ino)
                return  # open on another machine: its last close frees it
            await tx.free_inode(ino, time.time_ns())
        self._nameless.discard(ino)
        self.marked_open.discard(ino)
        self.files.drop(ino)

    async def free_orphans(self) -> int:
        """Free inodes a crashed mount left without names (open-unlinked at the crash,
        or the unfinished copy of a snapshot). Call it after `Client.register`, which
        drops the holds of dead mounts."""
        async with self.meta.reading() as tx:
            unfinished = await snapshots.unfinished_copies(tx)
        for root in unfinished:  # whole trees: freeing only the root would strand the rest
            async with self.meta.transaction() as tx:
                await snapshots.free_tree(tx, root, time.time_ns())
        async with self.meta.reading() as tx:
            # a live mount's holds: its open-unlinked files and the copies it is writing
            held = await clients.held_inodes(tx)
            orphans = [i for i in await tx.orphan_inodes() if i not in held]
        for ino in orphans:
            await self.maybe_free(ino)
        return len(unfinished) + len(orphans)

    async def sync(self) -> None:
        """fsync of a directory: every namespace change committed so far reaches stable
        storage (SQLite commits without syncing its WAL; this syncs it)."""
        async with self.meta.transaction(durable=True):
            pass

    # --- directories --------------------------------------------------------------------

    async def opendir(self, ino: int) -> None:
        async with self.meta.reading() as tx:
            attrs = await self._get(tx, ino)
        if not stat.S_ISDIR(attrs.mode):
            raise _err(errno.ENOTDIR)

    async def readdir(
        self, ino: int, cookie: int, limit: int = 256
    ) -> list[tuple[bytes, InodeAttrs, int]]:
        """Entries after `cookie`: (name, attrs, next cookie); "." and ".." first."""

        async def read(tx: Txn) -> list[tuple[bytes, InodeAttrs, int]]:
            out: list[tuple[bytes, InodeAttrs, int]] = []
            if cookie < 1:
                out.append((b".", await self._get(tx, ino), 1))
            if cookie < 2:
                parent = (
                    ROOT_INODE if ino == ROOT_INODE else (await tx.parent_of(ino) or ROOT_INODE)
                )
                out.append((b"..", await self._get(tx, parent), 2))
            after = max(cookie - _DOT_COOKIES, 0)
            for dentry_id, name, attrs in await tx.readdir_attrs(ino, after, limit):
                out.append((name, attrs, dentry_id + _DOT_COOKIES))
            return out

        rows = await self._rows(read, lambda out: {attrs.id for _n, attrs, _c in out})
        out = [(name, self._live(attrs), c) for name, attrs, c in rows]
        listed = [attrs for _n, attrs, _c in out]
        await self._fill_allocated(self._sealed_bytes(*listed), *listed)
        return out

    # --- extended attributes ------------------------------------------------------------

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        _check_xattr_name(name)
        if ino in self._without_xattrs:
            raise _err(errno.ENODATA)  # the inode exists: the kernel still knows it
        async with self.meta.reading() as tx:
            await self._get(tx, ino)
            value = await tx.get_xattr(ino, name)
            if value is None and not self.shared and self.kernel_refs.get(ino) > 0:
                if not await tx.list_xattrs(ino):
                    # inside the transaction: no setxattr can come between
                    self._without_xattrs.add(ino)
        if value is None:
            raise _err(errno.ENODATA)
        return value

    @_retried
    async def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        if len(name) > XATTR_NAME_MAX or not name:
            raise _err(errno.ERANGE)
        if len(value) > XATTR_SIZE_MAX:
            raise _err(errno.E2BIG)
        _check_xattr_name(name)
        async with self.meta.transaction() as tx:
            await self._get(tx, ino)
            exists = await tx.get_xattr(ino, name) is not None
            if flags & XATTR_CREATE and exists:
                raise _err(errno.EEXIST)
            if flags & XATTR_REPLACE and not exists:
                raise _err(errno.ENODATA)
            await tx.set_xattr(ino, name, value)
            self._without_xattrs.discard(ino)  # in the transaction: see getxattr
            await tx.update_inode(ino, ctime_ns=time.time_ns())

    async def listxattr(self, ino: int) -> list[bytes]:
        async with self.meta.reading() as tx:
            await self._get(tx, ino)
            return await tx.list_xattrs(ino)

    @_retried
    async def removexattr(self, ino: int, name: bytes) -> None:
        _check_xattr_name(name)
        async with self.meta.transaction() as tx:
            await self._get(tx, ino)
            if not await tx.remove_xattr(ino, name):
                raise _err(errno.ENODATA)
            await tx.update_inode(ino, ctime_ns=time.time_ns())
