"""Snapshots: copy-on-write copies of a tree, made from the metadata alone.

A copy duplicates the tree's inode rows, directory entries, symlink targets, xattrs and
the live extent rows of its files, and counts one more reference on every block those
rows name: no block is read, written or uploaded, and the time grows with the number
of entries, not of bytes. It runs in one transaction, so it sees the tree at one
instant and a crash leaves either no copy or a whole one.

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

from cloudfs.errors import FSOpError
from cloudfs.meta.base import _INODE_COLUMNS, InodeAttrs, Txn
from cloudfs.meta.schema import LIVE

#: inodes.flags bit: the inode belongs to a read-only tree (changes get EROFS)
READONLY = 1
#: ids per IN (...) list
_BATCH = 500
#: the version a copied file starts with
COPY_VERSION = 1


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


async def copy_tree(
    tx: Txn, src: int, *, readonly: bool, origin: str, now_ns: int
) -> tuple[int, int]:
    """Copy the tree at `src` (see the module docstring); the copy's root has no name
    yet. Returns (the copy's root inode, the number of inodes copied)."""
    tree = await read_tree(tx, src)
    links: Counter[int] = Counter(child for _p, _n, child in tree.dentries)
    new_id: dict[int, int] = {}
    for old, a in tree.inodes.items():
        if stat.S_ISDIR(a.mode):
            nlink = a.nlink  # 2 + its subdirectories, all of which are copied
        elif old == src:
            nlink = 1  # the root's one name (given by the caller, or none)
        else:
            nlink = links[old]  # links from outside the tree are not copied
        flags = (a.flags | READONLY) if readonly else (a.flags & ~READONLY)
        version = COPY_VERSION if stat.S_ISREG(a.mode) else 0
        new_id[old] = await tx.conn.insert(
            "INSERT INTO inodes (mode, uid, gid, nlink, size, rdev, atime_ns, mtime_ns,"
            " ctime_ns, version, flags) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (a.mode, a.uid, a.gid, nlink, a.size, a.rdev, a.atime_ns, a.mtime_ns, a.ctime_ns,
             version, flags),
        )  # fmt: skip
    await tx.conn.executemany(
        "INSERT INTO dentries (parent, name, inode) VALUES (?, ?, ?)",
        [(new_id[p], name, new_id[c]) for p, name, c in tree.dentries],
    )
    old_ids = list(tree.inodes)
    refs: Counter[bytes] = Counter()
    sizes: dict[bytes, int] = {}
    for part in _batches(old_ids):
        marks = ", ".join("?" * len(part))
        rows = await tx.conn.query(
            f"SELECT inode, target FROM symlinks WHERE inode IN ({marks})", part
        )
        await tx.conn.executemany(
            "INSERT INTO symlinks (inode, target) VALUES (?, ?)",
            [(new_id[i], bytes(t)) for i, t in rows],
        )
        rows = await tx.conn.query(
            f"SELECT inode, name, value FROM xattrs WHERE inode IN ({marks})", part
        )
        await tx.conn.executemany(
            "INSERT INTO xattrs (inode, name, value) VALUES (?, ?, ?)",
            [(new_id[i], bytes(n), bytes(v)) for i, n, v in rows],
        )
        rows = await tx.conn.query(
            f"SELECT inode, file_offset, length, block FROM extents"
            f" WHERE v_to = ? AND inode IN ({marks})",
            (LIVE, *part),
        )
        await tx.conn.executemany(
            "INSERT INTO extents (inode, v_to, file_offset, length, block, v_from)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [(new_id[i], LIVE, off, n, bytes(b), COPY_VERSION) for i, off, n, b in rows],
        )
        for _i, _off, n, b in rows:
            refs[bytes(b)] += 1
            sizes[bytes(b)] = max(sizes.get(bytes(b), 0), n)
    # the copied files start their history with one version: their contents as copied
    await tx.conn.executemany(
        "INSERT INTO versions (inode, version, size, mtime_ns, committed_ns, origin, flags)"
        " VALUES (?, ?, ?, ?, ?, ?, 0)",
        [
            (new_id[old], COPY_VERSION, a.size, a.mtime_ns, now_ns, origin)
            for old, a in tree.inodes.items()
            if stat.S_ISREG(a.mode)
        ],
    )
    # every block named here has a row with refcount >= 1 (the source's rows name it)
    await tx.add_block_refs({b: (sizes[b], n) for b, n in refs.items()}, now_ns)
    return new_id[src], len(new_id)


async def create_named(
    tx: Txn, src: int, name: bytes, source_path: bytes, *, origin: str, now_ns: int
) -> tuple[int, int]:
    """A named (always read-only) snapshot of the tree at `src`: (root, inodes)."""
    if not name or b"/" in name or b"\0" in name or len(name) > 255:
        raise FSOpError(errno.EINVAL, "a snapshot name is 1 to 255 bytes without '/'")
    if await find_snapshot(tx, name) is not None:
        raise FSOpError(errno.EEXIST, f"a snapshot named {name.decode(errors='replace')} exists")
    root, count = await copy_tree(tx, src, readonly=True, origin=origin, now_ns=now_ns)
    await tx.conn.execute(
        "INSERT INTO snapshots (name, root, source, created_ns, readonly) VALUES (?, ?, ?, ?, 1)",
        (name, root, source_path, now_ns),
    )
    return root, count


async def create_at(
    tx: Txn, src: int, parent: int, name: bytes, *, readonly: bool, origin: str, now_ns: int
) -> tuple[int, int]:
    """A copy of the tree at `src` as entry `name` of directory `parent`: (root, inodes)."""
    pattrs = await tx.get_inode(parent)
    if pattrs is None or pattrs.nlink == 0:
        raise FSOpError(errno.ENOENT, "the destination's directory does not exist")
    if not stat.S_ISDIR(pattrs.mode):
        raise FSOpError(errno.ENOTDIR, "the destination's parent is not a directory")
    if await tx.lookup(parent, name) is not None:
        raise FSOpError(errno.EEXIST, "the destination exists")
    root, count = await copy_tree(tx, src, readonly=readonly, origin=origin, now_ns=now_ns)
    await tx.add_dentry(parent, name, root)
    rattrs = await tx.get_inode(root)
    assert rattrs is not None
    await tx.update_inode(
        parent,
        mtime_ns=now_ns,
        ctime_ns=now_ns,
        nlink=pattrs.nlink + (1 if stat.S_ISDIR(rattrs.mode) else 0),
    )
    return root, count


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
