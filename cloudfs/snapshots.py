"""Snapshots: copy-on-write copies of a tree, made from the metadata alone.

A copy duplicates the tree's inode rows, directory entries, symlink targets, xattrs and
the live extent rows of its files, and counts one more reference on every block those
rows name: no block is read, written or uploaded, and the time grows with the number
of entries, not of bytes.

A copy reflects one instant of the source: everything it needs is read in one read
transaction (Source; MetaStore.detached_reading, which holds up no writer), then the
copy is written in batches of write transactions (TreeCopy), so that a tree of 100k
entries never holds the metadata store for seconds, and named in a last one. Writes to
the source between batches change rows the copy no longer reads; the blocks it names
keep their data because a block without references stays for the gc grace period, and a
batch that would name a block collected meanwhile fails the copy (SourceChanged). The
copy is unnamed (root nlink 0) until it is whole: users never see half of one, and a
crash leaves an unnamed tree that the next mount or fsck frees.

A copy lands at a path of the namespace (`cloudfs snapshot create SRC DST`), or, as a
named snapshot, outside it: a `snapshots` row names its root, which only the view
`.cloudfs/snapshots/<name>` shows. Its root then counts its links as if it had the
one name it lacks (a directory 2 + subdirectories, a file 1), so fsck and nlink agree.

Read-only trees: every inode of one carries READONLY in inodes.flags, and the mount
refuses changes to such inodes with EROFS. Named snapshots are always read-only; a copy
at a path is when made with --readonly, until `cloudfs snapshot unlock`.
"""

from __future__ import annotations

import errno
import stat
from collections import Counter
from dataclasses import dataclass

from cloudfs.clients import Client
from cloudfs.errors import FSOpError
from cloudfs.meta.base import _INODE_COLUMNS, InodeAttrs, Txn
from cloudfs.meta.schema import LIVE, ROOT_INODE

#: inodes.flags bit: the inode belongs to a read-only tree (changes get EROFS)
READONLY = 1
#: ids per IN (...) list
_BATCH = 500
#: the version a copied file starts with
COPY_VERSION = 1
#: a batch of a copy ends early at this many extents per inode it may hold
_EXTENTS_PER_INODE = 8


@dataclass(frozen=True)
class Snapshot:
    """One row of `snapshots`: a named copy of a tree, outside the namespace."""

    id: int
    name: bytes
    root: int
    source: bytes
    created_ns: int
    readonly: bool


async def list_snapshots(tx: Txn) -> list[Snapshot]:
    rows = await tx.conn.query(
        "SELECT id, name, root, source, created_ns, readonly FROM snapshots ORDER BY id"
    )
    return [Snapshot(i, bytes(n), r, bytes(s), c, bool(ro)) for i, n, r, s, c, ro in rows]


async def find_snapshot(tx: Txn, name: bytes) -> Snapshot | None:
    for snap in await list_snapshots(tx):
        if snap.name == name:
            return snap
    return None


async def readonly_among(tx: Txn, inodes: list[int]) -> bool:
    """Is any of `inodes` read-only?"""
    marks = ", ".join("?" * len(inodes))
    row = await tx.conn.query_one(
        f"SELECT 1 FROM inodes WHERE id IN ({marks}) AND (flags & {READONLY}) <> 0 LIMIT 1",
        inodes,
    )
    return row is not None


async def any_readonly(tx: Txn) -> bool:
    """Does any inode belong to a read-only tree? (A scan of the inodes when none does;
    a single mount asks once, then only after the read-only trees changed.)"""
    row = await tx.conn.query_one(f"SELECT 1 FROM inodes WHERE (flags & {READONLY}) <> 0 LIMIT 1")
    return row is not None


async def readonly_entry(tx: Txn, parent: int, name: bytes) -> bool:
    """Is directory `parent`, or the inode its entry `name` names (if any), read-only?
    (One query: every unlink and rename asks.)"""
    row = await tx.conn.query_one(
        f"SELECT 1 FROM inodes WHERE id = ? AND (flags & {READONLY}) <> 0"
        " UNION ALL SELECT 1 FROM dentries d JOIN inodes i ON i.id = d.inode"
        f" WHERE d.parent = ? AND d.name = ? AND (i.flags & {READONLY}) <> 0 LIMIT 1",
        (parent, parent, name),
    )
    return row is not None


@dataclass
class Tree:
    """The inodes and entries of a tree, read in one transaction."""

    root: InodeAttrs
    inodes: dict[int, InodeAttrs]  # by id, parents before children
    dentries: list[tuple[int, bytes, int]]  # (parent, name, child) inside the tree


def _batches(ids: list[int]) -> list[list[int]]:
    return [ids[i : i + _BATCH] for i in range(0, len(ids), _BATCH)]


async def read_tree(tx: Txn, root: int) -> Tree:
    """Every inode and entry below `root` (a directory, or any other inode alone)."""
    attrs = await tx.get_inode(root)
    if attrs is None:
        raise FSOpError(errno.ENOENT, f"inode {root}")
    inodes = {root: attrs}
    dentries: list[tuple[int, bytes, int]] = []
    level = [root] if stat.S_ISDIR(attrs.mode) else []
    columns = ", ".join(f"i.{c}" for c in _INODE_COLUMNS)
    while level:
        below: list[int] = []
        for part in _batches(level):
            marks = ", ".join("?" * len(part))
            rows = await tx.conn.query(
                f"SELECT d.parent, d.name, {columns} FROM dentries d"
                f" JOIN inodes i ON i.id = d.inode WHERE d.parent IN ({marks}) ORDER BY d.id",
                part,
            )
            for row in rows:
                child = InodeAttrs(*row[2:])
                dentries.append((row[0], bytes(row[1]), child.id))
                if child.id in inodes:
                    continue  # another hard link of a file met already
                inodes[child.id] = child
                if stat.S_ISDIR(child.mode):
                    below.append(child.id)
        level = below
    return Tree(attrs, inodes, dentries)


@dataclass
class Source:
    """What a copy needs of the tree at `root`, all read in one transaction: the tree,
    and the symlink targets, xattrs and live extents of its inodes (by old id)."""

    tree: Tree
    symlinks: dict[int, bytes]
    xattrs: dict[int, list[tuple[bytes, bytes]]]
    extents: dict[int, list[tuple[int, int, bytes]]]  # (file_offset, length, block)


async def read_source(tx: Txn, src: int) -> Source:
    """The tree at `src` and everything a copy of it needs, as `tx` sees it."""
    tree = await read_tree(tx, src)
    source = Source(tree, {}, {}, {})
    for part in _batches(list(tree.inodes)):
        marks = ", ".join("?" * len(part))
        for i, t in await tx.conn.query(
            f"SELECT inode, target FROM symlinks WHERE inode IN ({marks})", part
        ):
            source.symlinks[i] = bytes(t)
        for i, n, v in await tx.conn.query(
            f"SELECT inode, name, value FROM xattrs WHERE inode IN ({marks})", part
        ):
            source.xattrs.setdefault(i, []).append((bytes(n), bytes(v)))
        for i, off, n, b in await tx.conn.query(
            f"SELECT inode, file_offset, length, block FROM extents"
            f" WHERE v_to = ? AND inode IN ({marks})",
            (LIVE, *part),
        ):
            source.extents.setdefault(i, []).append((off, n, bytes(b)))
    return source


@dataclass
class Step:
    """What one batch wrote; applied to its TreeCopy once the batch has committed."""

    new_ids: dict[int, int]
    inodes_done: int
    dentries_done: int


class SourceChanged(FSOpError):
    """Blocks of the source were collected while the copy was being written."""


class TreeCopy:
    """A copy of a Source, written in batches of write transactions (`write_batch`,
    then `advance` once it committed), then named in one more (`finish_named` or
    `finish_at`).

    Invariants: every batch is whole or absent; the copy's root has nlink 0 and no name
    until the transaction that names it, so a half-made copy is never visible and, after
    a crash, is an unnamed tree that the next mount (Namespace.free_orphans) or fsck
    frees; every block a copied extent names gains its reference in the batch that
    writes the extent, and a block the source stopped naming and that a gc pass claimed
    or deleted in the meantime makes the batch fail (SourceChanged) instead of naming
    missing data."""

    def __init__(
        self, source: Source, *, readonly: bool, origin: str, now_ns: int,
        client: Client | None = None,
    ) -> None:  # fmt: skip
        self.source = source
        #: the mount writing the copy: it holds the unfinished root (cloudfs.clients),
        #: so that another mount's start does not take it for a crash's
        self.client = client
        self.readonly = readonly
        self.origin = origin
        self.now_ns = now_ns
        self.order = list(source.tree.inodes)  # parents before children
        self.links: Counter[int] = Counter(c for _p, _n, c in source.tree.dentries)
        self.new_id: dict[int, int] = {}
        self.inodes_done = 0
        self.dentries_done = 0

    @property
    def total(self) -> int:
        return len(self.order)

    @property
    def root(self) -> int | None:
        """The copy's root, once written."""
        return self.new_id.get(self.source.tree.root.id)

    def _nlink(self, old: int, a: InodeAttrs) -> int:
        if old == self.source.tree.root.id:
            return 0  # until the copy is named (finish_*)
        if stat.S_ISDIR(a.mode):
            return a.nlink  # 2 + its subdirectories, all of which are copied
        return self.links[old]  # links from outside the tree are not copied

    async def write_batch(self, tx: Txn, max_inodes: int) -> Step:
        """Write the next at most `max_inodes` inodes (fewer when their extents are
        many) with their entries, symlinks, xattrs, extents, versions and block
        references. Changes nothing in `self`: call `advance` after the commit."""
        src = self.source
        ids = dict(self.new_id)
        batch: list[int] = []
        extents = 0
        for old in self.order[self.inodes_done :]:
            if batch and (len(batch) >= max_inodes or extents >= _EXTENTS_PER_INODE * max_inodes):
                break
            batch.append(old)
            extents += len(src.extents.get(old, ()))
        rows = []
        for old in batch:
            a = src.tree.inodes[old]
            flags = (a.flags | READONLY) if self.readonly else (a.flags & ~READONLY)
            version = COPY_VERSION if stat.S_ISREG(a.mode) else 0
            # allocated: the live extents copied below (inodes.allocated follows them)
            allocated = sum(n for _off, n, _b in src.extents.get(old, ()))
            rows.append((a.mode, a.uid, a.gid, self._nlink(old, a), a.size, a.rdev, a.atime_ns,
                         a.mtime_ns, a.ctime_ns, version, flags, allocated))  # fmt: skip
        # one INSERT per inode for its new id, all sent at once (one trip on MySQL)
        new_ids = await tx.conn.insert_each(
            "INSERT INTO inodes (mode, uid, gid, nlink, size, rdev, atime_ns, mtime_ns,"
            " ctime_ns, version, flags, allocated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        ids.update(zip(batch, new_ids, strict=True))
        root = src.tree.root.id
        if self.client is not None and root in batch:
            await self.client.mark(tx, ids[root])
        # the entries whose two ends exist now, in the order read (a prefix: an entry's
        # parent and child were met no later than the entry itself)
        dentries = src.tree.dentries
        done = self.dentries_done
        while done < len(dentries) and dentries[done][0] in ids and dentries[done][2] in ids:
            done += 1
        await tx.conn.executemany(
            "INSERT INTO dentries (parent, name, inode) VALUES (?, ?, ?)",
            [(ids[p], name, ids[c]) for p, name, c in dentries[self.dentries_done : done]],
        )
        await tx.conn.executemany(
            "INSERT INTO symlinks (inode, target) VALUES (?, ?)",
            [(ids[i], src.symlinks[i]) for i in batch if i in src.symlinks],
        )
        await tx.conn.executemany(
            "INSERT INTO xattrs (inode, name, value) VALUES (?, ?, ?)",
            [(ids[i], n, v) for i in batch for n, v in src.xattrs.get(i, ())],
        )
        await tx.conn.executemany(
            "INSERT INTO extents (inode, v_to, file_offset, length, block, v_from)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [(ids[i], LIVE, off, n, b, COPY_VERSION) for i in batch
             for off, n, b in src.extents.get(i, ())],
        )  # fmt: skip
        # the copied files start their history with one version: their contents as copied
        await tx.conn.executemany(
            "INSERT INTO versions (inode, version, size, mtime_ns, committed_ns, origin, flags)"
            " VALUES (?, ?, ?, ?, ?, ?, 0)",
            [
                (ids[old], COPY_VERSION, a.size, a.mtime_ns, self.now_ns, self.origin)
                for old in batch
                if stat.S_ISREG((a := src.tree.inodes[old]).mode)
            ],
        )
        refs: Counter[bytes] = Counter()
        sizes: dict[bytes, int] = {}
        for i in batch:
            for _off, n, b in src.extents.get(i, ()):
                refs[b] += 1
                sizes[b] = max(sizes.get(b, 0), n)
        # a block named by the source when it was read has a row; one that must be
        # fetched back (revived) or made again lost its data meanwhile
        lost = await tx.add_block_refs({b: (sizes[b], n) for b, n in refs.items()}, self.now_ns)
        if lost:
            raise SourceChanged(
                errno.EAGAIN,
                f"{len(lost)} blocks of the source were collected during the copy; try again",
            )
        return Step({old: ids[old] for old in batch}, self.inodes_done + len(batch), done)

    def advance(self, step: Step) -> None:
        self.new_id.update(step.new_ids)
        self.inodes_done = step.inodes_done
        self.dentries_done = step.dentries_done

    @property
    def written(self) -> bool:
        return self.inodes_done == self.total

    async def _name_root(self, tx: Txn) -> int:
        """Give the written copy's root its link count; its id."""
        root = self.root
        assert self.written and root is not None
        attrs = await tx.get_inode(root)
        if attrs is None or attrs.nlink != 0:
            raise FSOpError(errno.EAGAIN, "the unfinished copy was freed meanwhile; try again")
        a = self.source.tree.root
        await tx.update_inode(root, nlink=a.nlink if stat.S_ISDIR(a.mode) else 1)
        await self._unmark(tx, root)
        return root

    async def finish_named(self, tx: Txn, name: bytes, source_path: bytes) -> int:
        """Name the copy as snapshot `name` (checked again: names may have come meanwhile)."""
        await check_snapshot_name(tx, name)
        root = await self._name_root(tx)
        await tx.conn.execute(
            "INSERT INTO snapshots (name, root, source, created_ns, readonly) VALUES (?, ?, ?, ?, 1)",
            (name, root, source_path, self.now_ns),
        )
        return root

    async def finish_at(self, tx: Txn, parent: int, name: bytes) -> int:
        """Name the copy as entry `name` of directory `parent`."""
        pattrs = await check_destination(tx, parent, name)
        root = await self._name_root(tx)
        await tx.add_dentry(parent, name, root)
        await tx.update_inode(
            parent,
            mtime_ns=self.now_ns,
            ctime_ns=self.now_ns,
            nlink=pattrs.nlink + (1 if stat.S_ISDIR(self.source.tree.root.mode) else 0),
        )
        return root

    async def discard(self, tx: Txn) -> int:
        """Free what was written of an unfinished copy; how many inodes."""
        root = self.root
        if root is None or await tx.get_inode(root) is None:
            return 0
        await self._unmark(tx, root)
        return await free_tree(tx, root, self.now_ns)

    async def _unmark(self, tx: Txn, root: int) -> None:
        if self.client is not None:
            await self.client.unmark(tx, root)


async def check_snapshot_name(tx: Txn, name: bytes) -> None:
    if not name or b"/" in name or b"\0" in name or len(name) > 255:
        raise FSOpError(errno.EINVAL, "a snapshot name is 1 to 255 bytes without '/'")
    if await find_snapshot(tx, name) is not None:
        raise FSOpError(errno.EEXIST, f"a snapshot named {name.decode(errors='replace')} exists")


async def check_destination(tx: Txn, parent: int, name: bytes) -> InodeAttrs:
    """The attributes of directory `parent`, which has no entry `name`."""
    pattrs = await tx.get_inode(parent)
    if pattrs is None or pattrs.nlink == 0:
        raise FSOpError(errno.ENOENT, "the destination's directory does not exist")
    if not stat.S_ISDIR(pattrs.mode):
        raise FSOpError(errno.ENOTDIR, "the destination's parent is not a directory")
    if await tx.lookup(parent, name) is not None:
        raise FSOpError(errno.EEXIST, "the destination exists")
    return pattrs


async def _copy_in_one(tx: Txn, src: int, *, readonly: bool, origin: str, now_ns: int) -> TreeCopy:
    copy = TreeCopy(await read_source(tx, src), readonly=readonly, origin=origin, now_ns=now_ns)
    copy.advance(await copy.write_batch(tx, copy.total))
    return copy


async def create_named(
    tx: Txn, src: int, name: bytes, source_path: bytes, *, origin: str, now_ns: int
) -> tuple[int, int]:
    """A named (always read-only) snapshot of the tree at `src`, in transaction `tx`:
    (root, inodes). The mount writes big trees in batches instead (TreeCopy)."""
    await check_snapshot_name(tx, name)
    copy = await _copy_in_one(tx, src, readonly=True, origin=origin, now_ns=now_ns)
    return await copy.finish_named(tx, name, source_path), copy.total


async def create_at(
    tx: Txn, src: int, parent: int, name: bytes, *, readonly: bool, origin: str, now_ns: int
) -> tuple[int, int]:
    """A copy of the tree at `src` as entry `name` of directory `parent`, in transaction
    `tx`: (root, inodes)."""
    await check_destination(tx, parent, name)
    copy = await _copy_in_one(tx, src, readonly=readonly, origin=origin, now_ns=now_ns)
    return await copy.finish_at(tx, parent, name), copy.total


async def unfinished_copies(tx: Txn) -> list[int]:
    """Roots of copies a crash interrupted: directories without a name or a link that
    still have entries (a removed directory is empty), except what the trash keeps and
    the copies live mounts are writing (their holds, cloudfs.clients)."""
    rows = await tx.conn.query(
        "SELECT id FROM inodes i WHERE nlink = 0 AND id <> ?"
        " AND id NOT IN (SELECT inode FROM trash) AND id NOT IN (SELECT inode FROM holds)"
        " AND EXISTS (SELECT 1 FROM dentries d WHERE d.parent = i.id)",
        (ROOT_INODE,),
    )
    return [r[0] for r in rows]


async def free_tree(tx: Txn, root: int, now_ns: int) -> int:
    """Free every inode of the tree at `root` (which has no name left): their blocks
    lose their references. Returns how many."""
    tree = await read_tree(tx, root)
    for part in _batches(list(tree.inodes)):
        marks = ", ".join("?" * len(part))
        await tx.conn.execute(f"DELETE FROM dentries WHERE parent IN ({marks})", part)
    for ino in tree.inodes:
        await tx.free_inode(ino, now_ns)
    return len(tree.inodes)


async def delete_named(tx: Txn, name: bytes, now_ns: int) -> int:
    """Delete a named snapshot and free its tree; the number of inodes freed."""
    snap = await find_snapshot(tx, name)
    if snap is None:
        raise FSOpError(errno.ENOENT, f"no snapshot named {name.decode(errors='replace')}")
    await tx.conn.execute("DELETE FROM snapshots WHERE id = ?", (snap.id,))
    return await free_tree(tx, snap.root, now_ns)


async def unlock(tx: Txn, root: int) -> int:
    """Make the tree at `root` writable; the number of inodes that were read-only."""
    tree = await read_tree(tx, root)
    named = {s.root for s in await list_snapshots(tx)}
    if root in named:
        raise FSOpError(errno.EPERM, "a named snapshot stays read-only (copy it instead)")
    changed = 0
    for part in _batches(list(tree.inodes)):
        marks = ", ".join("?" * len(part))
        changed += await tx.conn.execute(
            f"UPDATE inodes SET flags = flags & ~{READONLY}"
            f" WHERE (flags & {READONLY}) <> 0 AND id IN ({marks})",
            part,
        )
    return changed
