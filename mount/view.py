"""The read-only view of history inside a mount: `MOUNTPOINT/.cloudfs/`.

    .cloudfs/versions/<path>/<N>   version N of the file at <path> (a directory per file)
    .cloudfs/snapshots/<name>/...  the tree of named snapshot <name>

`.cloudfs` is not a directory entry: a lookup of that name in the root answers it,
readdir of the root does not list it, and no entry of that name can be made there
(EEXIST). Its nodes have inode numbers from VIRTUAL up (2**62), far above any real
inode id, so the two never collide:

    VIRTUAL + 1            .cloudfs
    MIRROR + ino           .cloudfs/versions/<path of ino>: for a directory its
                           entries, for a regular file its versions (MIRROR + 1 is
                           .cloudfs/versions itself, the root's mirror)
    VERSION_FILE + n       one version of one file, numbered as they are looked up

A snapshot's tree is made of real inodes (flagged read-only, see cloudfs.snapshots):
`.cloudfs/snapshots/<name>` is its real root inode, so everything below it is served
by the ordinary operations, which refuse changes to read-only inodes.
"""

from __future__ import annotations

import errno
import stat
from dataclasses import dataclass, replace

from cloudfs.errors import FSOpError
from cloudfs.files import FileStore
from cloudfs.meta.base import Extent, InodeAttrs, MetaStore
from cloudfs.meta.schema import ROOT_INODE
from cloudfs.snapshots import list_snapshots

#: the name of the view in the root directory
VIEW_NAME = b".cloudfs"
VIRTUAL = 1 << 62
DOT = VIRTUAL + 1
MIRROR = VIRTUAL + (1 << 61)
VERSIONS = MIRROR + ROOT_INODE
VERSION_FILE = VIRTUAL + (1 << 60)
SNAPSHOTS = VIRTUAL + 3

_DIR_ENTRIES = [(b"versions", VERSIONS), (b"snapshots", SNAPSHOTS)]


def is_virtual(ino: int) -> bool:
    return ino >= VIRTUAL


def _readonly_dir_mode(mode: int) -> int:
    """Directory permission bits from a node's: read bits, with search where read."""
    perm = mode & 0o444
    return stat.S_IFDIR | perm | (perm >> 2)


@dataclass(frozen=True)
class VersionFile:
    ino: int  # the real file
    version: int


@dataclass
class VersionHandle:
    """An open version file: its extents and size, loaded once at open."""

    extents: list[Extent]
    size: int


class HistoryView:
    def __init__(self, meta: MetaStore, files: FileStore) -> None:
        self.meta = meta
        self.files = files
        self._numbers: dict[VersionFile, int] = {}
        self._files: dict[int, VersionFile] = {}
        #: kernel lookup references of version files: a number is dropped at zero
        self._refs: dict[int, int] = {}
        self._next = VERSION_FILE

    # --- numbering -----------------------------------------------------------------------

    def _version_number(self, vf: VersionFile) -> int:
        n = self._numbers.get(vf)
        if n is None:
            self._next += 1
            n = self._next
            self._numbers[vf] = n
            self._files[n] = vf
        return n

    def remember(self, ino: int) -> None:
        if ino in self._files:
            self._refs[ino] = self._refs.get(ino, 0) + 1

    def forget(self, ino: int, n: int) -> None:
        if ino not in self._files:
            return
        left = self._refs.get(ino, 0) - n
        if left > 0:
            self._refs[ino] = left
            return
        self._refs.pop(ino, None)
        vf = self._files.pop(ino)
        self._numbers.pop(vf, None)

    # --- attributes ----------------------------------------------------------------------

    async def _real(self, ino: int) -> InodeAttrs:
        async with self.meta.reading() as tx:
            attrs = await tx.get_inode(ino)
        if attrs is None:
            raise FSOpError(errno.ENOENT)
        return attrs

    async def _dir_like(self, ino: int, of: int) -> InodeAttrs:
        real = await self._real(of)
        return replace(
            real, id=ino, mode=_readonly_dir_mode(real.mode), nlink=2, size=0, rdev=0, flags=0
        )

    async def getattr(self, ino: int) -> InodeAttrs:
        if ino in (DOT, SNAPSHOTS):
            return await self._dir_like(ino, ROOT_INODE)
        if MIRROR <= ino:
            mirrored = await self._real(ino - MIRROR)
            if not (stat.S_ISDIR(mirrored.mode) or stat.S_ISREG(mirrored.mode)):
                raise FSOpError(errno.ENOENT)
            return await self._dir_like(ino, ino - MIRROR)
        vf = self._files.get(ino)
        if vf is None:
            raise FSOpError(errno.ENOENT)
        async with self.meta.reading() as tx:
            real = await tx.get_inode(vf.ino)
            rows = [v for v in await tx.versions(vf.ino) if v.version == vf.version]
        if real is None or not rows:
            raise FSOpError(errno.ENOENT)
        v = rows[0]
        return replace(
            real,
            id=ino,
            mode=stat.S_IFREG | (real.mode & 0o7555),
            nlink=1,
            size=v.size,
            atime_ns=v.committed_ns,
            mtime_ns=v.mtime_ns,
            ctime_ns=v.committed_ns,
            version=v.version,
            flags=0,
        )

    # --- names -----------------------------------------------------------------------------

    async def lookup(self, parent: int, name: bytes) -> InodeAttrs:
        """A child of a virtual directory: virtual, or (under snapshots/) a real root."""
        if name == b".":
            return await self.getattr(parent)
        if name == b"..":
            return await self.getattr(DOT)
        if parent == DOT:
            for entry, ino in _DIR_ENTRIES:
                if entry == name:
                    return await self.getattr(ino)
            raise FSOpError(errno.ENOENT)
        if parent == SNAPSHOTS:
            async with self.meta.reading() as tx:
                for snap in await list_snapshots(tx):
                    if snap.name == name:
                        attrs = await tx.get_inode(snap.root)
                        if attrs is not None:
                            return attrs
            raise FSOpError(errno.ENOENT)
        if parent < MIRROR:
            raise FSOpError(errno.ENOTDIR)
        real = await self._real(parent - MIRROR)
        if stat.S_ISDIR(real.mode):
            async with self.meta.reading() as tx:
                child = await tx.lookup(real.id, name)
            if child is None:
                raise FSOpError(errno.ENOENT)
            return await self.getattr(MIRROR + child)
        try:
            version = int(name)
        except ValueError:
            raise FSOpError(errno.ENOENT) from None
        if name != str(version).encode():
            raise FSOpError(errno.ENOENT)  # "01", "+1": one name per version
        return await self.getattr(self._version_number(VersionFile(real.id, version)))

    async def readdir(self, ino: int, cookie: int) -> list[tuple[bytes, InodeAttrs, int]]:
        """Entries after `cookie` (cookies 1 and 2 are "." and ".."): (name, attrs, next
        cookie). Under snapshots/ the attrs are the real roots'."""
        out: list[tuple[bytes, InodeAttrs, int]] = []
        if cookie < 1:
            out.append((b".", await self.getattr(ino), 1))
        if cookie < 2:
            out.append((b"..", await self.getattr(DOT), 2))
        if ino == DOT:
            for i, (name, child) in enumerate(_DIR_ENTRIES):
                if cookie < 3 + i:
                    out.append((name, await self.getattr(child), 3 + i))
            return out
        if ino == SNAPSHOTS:
            async with self.meta.reading() as tx:
                for snap in await list_snapshots(tx):
                    if snap.id + 2 > cookie:
                        attrs = await tx.get_inode(snap.root)
                        if attrs is not None:
                            out.append((snap.name, attrs, snap.id + 2))
            return out
        if ino < MIRROR:
            raise FSOpError(errno.ENOTDIR)
        real = await self._real(ino - MIRROR)
        async with self.meta.reading() as tx:
            if stat.S_ISDIR(real.mode):
                after = max(cookie - 2, 0)
                while True:
                    page = await tx.readdir_attrs(real.id, after, 256)
                    if not page:
                        break
                    for dentry_id, name, attrs in page:
                        if stat.S_ISDIR(attrs.mode) or stat.S_ISREG(attrs.mode):
                            mirror = replace(
                                attrs, id=MIRROR + attrs.id, mode=_readonly_dir_mode(attrs.mode),
                                nlink=2, size=0, rdev=0, flags=0,
                            )  # fmt: skip
                            out.append((name, mirror, dentry_id + 2))
                    after = page[-1][0]
                return out
            versions = await tx.versions(real.id)
        for v in versions:
            if v.version + 2 > cookie:
                number = self._version_number(VersionFile(real.id, v.version))
                attrs = replace(
                    real, id=number, mode=stat.S_IFREG | (real.mode & 0o7555), nlink=1,
                    size=v.size, atime_ns=v.committed_ns, mtime_ns=v.mtime_ns,
                    ctime_ns=v.committed_ns, version=v.version, flags=0,
                )  # fmt: skip
                out.append((str(v.version).encode(), attrs, v.version + 2))
        return out

    # --- contents -----------------------------------------------------------------------

    async def open(self, ino: int) -> VersionHandle:
        vf = self._files.get(ino)
        if vf is None:
            if is_virtual(ino):
                raise FSOpError(errno.EISDIR)
            raise FSOpError(errno.ENOENT)
        async with self.meta.reading() as tx:
            rows = [v for v in await tx.versions(vf.ino) if v.version == vf.version]
            if not rows:
                raise FSOpError(errno.ENOENT)
            extents = await tx.version_extents(vf.ino, vf.version)
        return VersionHandle(extents, rows[0].size)

    async def read(self, handle: VersionHandle, offset: int, size: int) -> bytes:
        return await self.files.read_version(handle.extents, handle.size, offset, size)
