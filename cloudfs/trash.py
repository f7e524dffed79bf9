"""The trash: unlinked files and removed directories, kept with their paths for the
retention period.

When a name goes (unlink, rmdir, a rename over it), the namespace records it here, in
the same transaction, with the path it had, the process that removed it and the
mtime its directory had before; when it was the inode's last name, the inode then
stays (nlink 0) instead of being freed, with its extents, versions, xattrs and blocks.
A file with several names gets one entry per name removed. `rm -rf` of a tree leaves
one entry per name, children deleted before their directory; restoring the
directory's path brings each of them back where it was.

A removal: restoring a directory also restores the entries below its path that the
same process ('machine:pid', `remover`) deleted no later than it and after the
path's previous deletion — what that `rm -rf` took, not a file deleted from the
directory earlier by another command. Directories of the removal get back the mtime
they had before it. Purging frees the inodes (not one a mount has open: cloudfs.clients).
"""

from __future__ import annotations

import contextvars
import errno
import stat
from dataclasses import dataclass

from cloudfs import clients, retention
from cloudfs.errors import FSOpError
from cloudfs.meta.base import Txn
from cloudfs.meta.schema import ROOT_INODE

#: deepest directory chain a path is computed through
_MAX_DEPTH = 4096

#: who is removing names now ('machine:pid'; the mount sets it per request)
REMOVER: contextvars.ContextVar[str] = contextvars.ContextVar("trash_remover", default="")


@dataclass(frozen=True)
class TrashEntry:
    id: int
    inode: int
    path: bytes
    deleted_ns: int
    mode: int
    size: int
    remover: str = ""
    parent_mtime_ns: int | None = None


#: directory levels one path query climbs (MySQL's cte_max_recursion_depth is 1,000)
_LEVELS_PER_QUERY = 256

#: the names of directory ? and of its ancestors up to the root (or up to ? levels), the
#: nearest first: one query for a whole path instead of one per level, since an unlink
#: on MySQL pays a round trip per query
_ANCESTORS = """
WITH RECURSIVE up(level, parent, name) AS (
    SELECT 1, parent, name FROM dentries WHERE inode = ?
    UNION ALL
    SELECT up.level + 1, d.parent, d.name FROM up JOIN dentries d ON d.inode = up.parent
    WHERE up.parent <> ? AND up.level < ?
)
SELECT level, parent, name FROM up ORDER BY level
"""

#: the retention policy and the mtime of directory ?: what the trash keeps beside a path
_INFO_COLUMNS = (
    "(SELECT value FROM meta_info WHERE name = ?), (SELECT mtime_ns FROM inodes WHERE id = ?)"
)
_INFO = "SELECT " + _INFO_COLUMNS

#: _ANCESTORS with _INFO's two values on every row: all that `keep` reads, in one query
#: (with MySQL one round trip for it, per unlink, rmdir and rename over a name)
_ANCESTORS_AND_INFO = _ANCESTORS.replace(
    "SELECT level, parent, name FROM up", f"SELECT level, parent, name, {_INFO_COLUMNS} FROM up"
)
assert _ANCESTORS_AND_INFO != _ANCESTORS


async def path_of(
    tx: Txn, parent: int, name: bytes, first: list[tuple[int, int, bytes]] | None = None
) -> bytes:
    """The path of entry `name` of directory `parent` ('/a/b/name'); a directory not
    reachable from the root shows as '?'. `first`: the rows of _ANCESTORS for `parent`,
    read already."""
    parts = [name]
    ino = parent
    while ino != ROOT_INODE and len(parts) <= _MAX_DEPTH:
        if first is not None:
            rows, first = first, None
        else:
            rows = await tx.conn.query(_ANCESTORS, (ino, ROOT_INODE, _LEVELS_PER_QUERY))
        if rows and [row[0] for row in rows] != list(range(1, len(rows) + 1)):
            # a directory with two names (a damaged database: fsck reports it): the
            # chain forks, so follow one name per level as before
            row = await tx.conn.query_one(
                "SELECT parent, name FROM dentries WHERE inode = ? LIMIT 1", (ino,)
            )
            rows = [(1, row[0], row[1])] if row is not None else []
        if not rows:
            parts.append(b"?")
            break
        parts.extend(bytes(row[2]) for row in rows)
        ino = rows[-1][1]
    return b"/" + b"/".join(reversed(parts))


async def keep(tx: Txn, ino: int, parent: int, name: bytes, now_ns: int) -> bool:
    """Record name `name` of inode `ino` in directory `parent`, which is going, in the
    trash (unless the policy keeps no trash); call it before the directory's mtime
    changes. True when it was kept."""
    # the policy, the directory's mtime and its path in one query (the policy is asked
    # every time: `cloudfs retention` changes it in the database, not through a mount)
    rows = []
    if parent != ROOT_INODE:
        rows = await tx.conn.query(
            _ANCESTORS_AND_INFO,
            (parent, ROOT_INODE, _LEVELS_PER_QUERY, retention.INFO_KEY, parent),
        )
    info = rows[0][3:] if rows else await tx.conn.query_one(_INFO, (retention.INFO_KEY, parent))
    text, parent_mtime_ns = info if info is not None else (None, None)
    policy = retention.of_info(text)
    if policy.trash is not None and policy.trash <= 0:
        return False
    path = await path_of(tx, parent, name, [row[:3] for row in rows] if rows else None)
    await tx.conn.defer(
        "INSERT INTO trash (inode, path, deleted_ns, remover, parent_mtime_ns)"
        " VALUES (?, ?, ?, ?, ?)",
        (ino, path, now_ns, REMOVER.get(), parent_mtime_ns),
    )  # fmt: skip
    return True


async def holds(tx: Txn, ino: int) -> bool:
    """Is inode `ino` in the trash (so it must not be freed)?"""
    row = await tx.conn.query_one("SELECT 1 FROM trash WHERE inode = ? LIMIT 1", (ino,))
    return row is not None


async def entries(tx: Txn, under: bytes | None = None) -> list[TrashEntry]:
    """Entries in the trash, oldest first; `under`: only that path and below."""
    rows = await tx.conn.query(
        f"SELECT {_ENTRY_COLUMNS} FROM trash t"
        " JOIN inodes i ON i.id = t.inode ORDER BY t.deleted_ns, t.id"
    )
    found = [_entry(row) for row in rows]
    if under is not None:
        prefix = under.rstrip(b"/") + b"/"
        found = [e for e in found if e.path == under.rstrip(b"/") or e.path.startswith(prefix)]
    return found


_ENTRY_COLUMNS = (
    "t.id, t.inode, t.path, t.deleted_ns, i.mode, i.size, t.remover, t.parent_mtime_ns"
)


def _entry(row: tuple) -> TrashEntry:
    i, ino, p, d, m, s, remover, pmtime = row
    return TrashEntry(i, ino, bytes(p), d, m, s, remover or "", pmtime)


async def entries_by_id(tx: Txn, ids: list[int]) -> list[TrashEntry]:
    """The entries of `ids` that are (still) in the trash."""
    found: list[TrashEntry] = []
    for start in range(0, len(ids), 500):
        part = ids[start : start + 500]
        marks = ", ".join("?" * len(part))
        rows = await tx.conn.query(
            f"SELECT {_ENTRY_COLUMNS} FROM trash t JOIN inodes i ON i.id = t.inode"
            f" WHERE t.id IN ({marks}) ORDER BY t.deleted_ns, t.id",
            part,
        )
        found.extend(_entry(row) for row in rows)
    return found


def _is_below(path: bytes, top: bytes) -> bool:
    return path.startswith(top.rstrip(b"/") + b"/")


def removal_of(all_entries: list[TrashEntry], root: TrashEntry) -> list[TrashEntry]:
    """`root` and, when it is a directory, the entries of the same removal below it
    (module docstring): the newest of each path. Parents come before children."""
    group = {root.path: root}
    if stat.S_ISDIR(root.mode):
        earlier = [
            e.deleted_ns for e in all_entries
            if e.path == root.path and (e.deleted_ns, e.id) < (root.deleted_ns, root.id)
        ]  # fmt: skip
        since = max(earlier, default=-1)
        for e in all_entries:  # oldest first: a later deletion of a path wins
            if (
                _is_below(e.path, root.path)
                and since < e.deleted_ns <= root.deleted_ns
                and (e.remover == root.remover or not root.remover)
            ):
                group[e.path] = e
    return sorted(group.values(), key=lambda e: (e.path.count(b"/"), e.path))


async def resolve(tx: Txn, path: bytes) -> int | None:
    """The inode at `path` (from the root), or None."""
    ino = ROOT_INODE
    for part in filter(None, path.split(b"/")):
        found = await tx.lookup(ino, part)
        if found is None:
            return None
        ino = found
    return ino


async def restore(
    tx: Txn, path: bytes, *, entry_id: int | None = None, to: bytes | None = None, now_ns: int
) -> list[tuple[bytes, int]]:
    """Bring back the newest entry at `path` (or entry `entry_id`) with, for a
    directory, the rest of its removal; at its old path, or at `to`. Directories above
    it that are gone come back too when the trash holds them (only themselves).
    Returns the (path, inode) restored, the first being `path`'s. ENOENT when there is
    nothing to restore or a directory above is gone for good, EEXIST when the path is
    taken."""
    everything = await entries(tx)
    if entry_id is not None:
        candidates = [e for e in everything if e.id == entry_id]
    else:
        candidates = [e for e in everything if e.path == path.rstrip(b"/")]
    if not candidates:
        raise FSOpError(errno.ENOENT, f"nothing in the trash at {path.decode(errors='replace')}")
    root = candidates[-1]
    target = (to if to is not None else root.path).rstrip(b"/")
    ancestors = await _restore_ancestors(tx, everything, target, now_ns)
    restored: list[tuple[bytes, int]] = []
    removal = removal_of(everything, root)
    done: set[int] = set()
    for e in removal:
        dest = target + e.path[len(root.path) :]
        if await _restore_one(tx, e, dest, now_ns, required=e is root):
            restored.append((dest, e.inode))
            done.add(e.id)
    await _restore_dir_mtimes(tx, removal, done)
    return restored + ancestors


async def _restore_dir_mtimes(tx: Txn, removal: list[TrashEntry], restored: set[int]) -> None:
    """Give each restored directory of `removal` the mtime it had before the removal:
    the one its first deleted child recorded (restoring the children changed it).
    `restored`: the ids of the entries restored."""
    by_path = {e.path: e for e in removal}
    first_child: dict[bytes, TrashEntry] = {}
    for e in sorted(removal, key=lambda e: (e.deleted_ns, e.id)):
        first_child.setdefault(e.path.rpartition(b"/")[0], e)
    for dir_path, child in first_child.items():
        d = by_path.get(dir_path)
        if d is None or d.id not in restored or child.parent_mtime_ns is None:
            continue
        if stat.S_ISDIR(d.mode):
            await tx.update_inode(d.inode, mtime_ns=child.parent_mtime_ns)


async def _restore_ancestors(
    tx: Txn, everything: list[TrashEntry], path: bytes, now_ns: int
) -> list[tuple[bytes, int]]:
    """Restore the missing directories above `path` from the trash (each alone)."""
    missing: list[bytes] = []
    parent = path.rpartition(b"/")[0]
    while parent and await resolve(tx, parent) is None:
        missing.append(parent)
        parent = parent.rpartition(b"/")[0]
    restored = []
    for dir_path in reversed(missing):
        dirs = [e for e in everything if e.path == dir_path and stat.S_ISDIR(e.mode)]
        if not dirs:
            shown = dir_path.decode(errors="replace")
            raise FSOpError(errno.ENOENT, f"the directory {shown} does not exist")
        await _restore_one(tx, dirs[-1], dir_path, now_ns, required=True)
        restored.append((dir_path, dirs[-1].inode))
    return restored


async def _restore_one(tx: Txn, e: TrashEntry, dest: bytes, now_ns: int, *, required: bool) -> bool:
    """Give entry `e`'s inode the name `dest` and take it out of the trash. When its
    directory is missing or the name taken: an error if `required`, else False."""
    parent_path, _, name = dest.rpartition(b"/")
    parent = await resolve(tx, parent_path)
    shown = dest.decode(errors="replace")
    if parent is None:
        if required:
            raise FSOpError(errno.ENOENT, f"the directory of {shown} does not exist")
        return False  # its directory was not restored: it stays in the trash
    pattrs = await tx.get_inode(parent)
    if pattrs is None or not stat.S_ISDIR(pattrs.mode):
        raise FSOpError(errno.ENOTDIR, f"the parent of {shown} is not a directory")
    if await tx.lookup(parent, name) is not None:
        if required:
            raise FSOpError(errno.EEXIST, f"{shown} exists (restore it elsewhere with --to)")
        return False
    attrs = await tx.get_inode(e.inode)
    assert attrs is not None  # entries() joins inodes
    await tx.add_dentry(parent, name, e.inode)
    is_dir = stat.S_ISDIR(attrs.mode)
    await tx.update_inode(e.inode, nlink=2 if is_dir else attrs.nlink + 1, ctime_ns=now_ns)
    await tx.update_inode(
        parent, nlink=pattrs.nlink + (1 if is_dir else 0), mtime_ns=now_ns, ctime_ns=now_ns
    )
    await tx.conn.execute("DELETE FROM trash WHERE id = ?", (e.id,))
    return True


async def take_out(tx: Txn, chosen: list[TrashEntry]) -> list[int]:
    """Delete `chosen` entries; the inodes left without entry and without name, which
    the caller frees (now, or once the mount no longer uses them)."""
    nameless = []
    for e in chosen:
        await tx.conn.execute("DELETE FROM trash WHERE id = ?", (e.id,))
        attrs = await tx.get_inode(e.inode)
        if attrs is not None and attrs.nlink == 0 and not await holds(tx, e.inode):
            nameless.append(e.inode)
    return nameless


async def purge_older(tx: Txn, cutoff_ns: int, now_ns: int, limit: int = 1000) -> int:
    """Free at most `limit` entries deleted before `cutoff_ns` (the retention pruner,
    which runs outside the mount: an inode a mount still has open, per cloudfs.clients,
    is left to that mount, which frees it at its last close). Returns how many
    entries went."""
    rows = await tx.conn.query(
        f"SELECT {_ENTRY_COLUMNS} FROM trash t"
        " JOIN inodes i ON i.id = t.inode WHERE t.deleted_ns < ? ORDER BY t.deleted_ns LIMIT ?",
        (cutoff_ns, limit),
    )
    chosen = [_entry(row) for row in rows]
    for ino in await take_out(tx, chosen):
        if not await clients.held(tx, ino):
            await tx.free_inode(ino, now_ns)  # else the mount frees it at its last close
    # rows whose inode is gone (freed by fsck, ...) are dropped as well
    await tx.conn.execute(
        "DELETE FROM trash WHERE deleted_ns < ? AND inode NOT IN (SELECT id FROM inodes)",
        (cutoff_ns,),
    )
    return len(chosen)



async def usage(tx: Txn) -> tuple[int, int]:
    """(entries, bytes): how many names the trash holds, and the size of the files
    it keeps (each inode once; one that still has a name elsewhere not counted)."""
    row = await tx.conn.query_one("SELECT COUNT(*) FROM trash")
    count = int(row[0]) if row else 0
    row = await tx.conn.query_one(
        "SELECT COALESCE(SUM(i.size), 0) FROM inodes i WHERE i.nlink = 0"
        " AND i.id IN (SELECT inode FROM trash)"
    )
    return count, int(row[0]) if row else 0
