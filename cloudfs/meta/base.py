"""The MetaStore interface and the domain logic shared by every SQL engine.

An engine supplies only connections that run SQL (`Conn`) and the way to begin, commit
and roll back; every domain operation (entries, attributes, extents, refcounts,
versions) is written here once, in SQL both SQLite and MySQL accept. All work happens
inside `async with meta.transaction() as tx:`, never relying on "no await, so atomic".
"""

from __future__ import annotations

import abc
import errno
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, fields
from types import TracebackType
from typing import ParamSpec, TypeVar

import trio

from cloudfs.errors import (
    FSOpError,
    MetadataMismatch,
    MetadataMissing,
    MetadataOutdated,
    TransactionConflict,
    UnsupportedFormat,
)
from cloudfs.meta import schema
from cloudfs.meta.schema import (
    BLOCK_DELETING,
    BLOCK_PENDING,
    BLOCK_REVIVED,
    BLOCK_STORED,
    LIVE,
    ROOT_INODE,
)

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

#: how often `MetaStore.run` calls a function whose transactions keep conflicting
RUN_ATTEMPTS = 12
#: longest pause between two attempts (the pauses grow from about 1 ms)
RUN_MAX_PAUSE_S = 0.5

_INODE_COLUMNS = (
    "id", "mode", "uid", "gid", "nlink", "size", "rdev",
    "atime_ns", "mtime_ns", "ctime_ns", "version", "flags", "allocated",
)  # fmt: skip


@dataclass
class InodeAttrs:
    """One row of `inodes`."""

    id: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    rdev: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    version: int
    flags: int
    #: column `allocated`: bytes of the live extents (sealed data, holes excluded); the
    #: Txn methods that change live extents keep it, nothing else sets it
    sealed_allocated: int = field(default=0, compare=False)
    #: not a column: bytes of a regular file that hold data (holes excluded), unsealed
    #: writes included, when the namespace filled it in (st_blocks); None: unknown
    allocated: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Extent:
    """File bytes [offset, offset+length) are bytes [0, length) of block `block`."""

    offset: int
    length: int
    block: bytes
    v_from: int = 0  # first version the extent belongs to

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class BlockRow:
    id: bytes
    size: int
    stored_size: int | None
    refcount: int
    state: int


@dataclass(frozen=True)
class VersionRow:
    inode: int
    version: int
    size: int
    mtime_ns: int
    committed_ns: int
    origin: str
    flags: int


@dataclass(frozen=True)
class FsStats:
    inodes: int
    files: int
    logical_bytes: int
    blocks: int
    block_bytes: int  # plaintext bytes of all distinct blocks
    referenced_bytes: int  # plaintext bytes that live extents refer to (before dedup)
    stored_bytes: int  # object bytes of stored blocks
    stored_plain_bytes: int  # plaintext bytes of the stored blocks
    pending_blocks: int
    pending_bytes: int


class Conn(abc.ABC):
    """An engine's connection inside one transaction: SQL with `?` placeholders."""

    @abc.abstractmethod
    async def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        """Run a statement; return the number of rows it changed."""

    @abc.abstractmethod
    async def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None: ...

    async def defer(self, sql: str, params: Sequence[object] = ()) -> None:
        """Run a statement whose outcome the caller does not need, now or (an engine
        with round trips, MySQL) just before the transaction's next statement or its
        COMMIT, in the same trip. Order is kept; an error surfaces there, and as any
        error there, ends the transaction (a conflict is retried whole: MetaStore.run)."""
        await self.execute(sql, params)

    async def execute_all(self, statements: Sequence[tuple[str, Sequence[object]]]) -> None:
        """Run independent statements in order (an engine may send them in one trip)."""
        for sql, params in statements:
            await self.execute(sql, params)

    @abc.abstractmethod
    async def insert(self, sql: str, params: Sequence[object] = ()) -> int:
        """Run an INSERT; return the new row's auto-increment id."""

    async def insert_each(self, sql: str, rows: Sequence[Sequence[object]]) -> list[int]:
        """Run an INSERT once per row, in order; the new rows' auto-increment ids (an
        engine may send them all in one trip)."""
        return [await self.insert(sql, row) for row in rows]

    async def execute_each(self, sql: str, rows: Sequence[Sequence[object]]) -> list[int]:
        """Run a statement once per row, in order; the rows each changed (an engine may
        send them all in one trip)."""
        return [await self.execute(sql, row) for row in rows]

    @abc.abstractmethod
    async def query(self, sql: str, params: Sequence[object] = ()) -> list[tuple]: ...

    async def query_one(self, sql: str, params: Sequence[object] = ()) -> tuple | None:
        rows = await self.query(sql, params)
        return rows[0] if rows else None


def _inode(row: tuple) -> InodeAttrs:
    return InodeAttrs(*row)


_INODE_SELECT = "SELECT " + ", ".join(_INODE_COLUMNS) + " FROM inodes"
#: the inode columns of a query that names the inodes table `i` (made once: a lookup
#: is the most frequent query, and joining the names each time cost microseconds)
_I_COLUMNS = ", ".join(f"i.{c}" for c in _INODE_COLUMNS)
_SETTABLE = {f.name for f in fields(InodeAttrs)} - {"id", "allocated", "sealed_allocated"}
#: `Txn.update_inode`'s statements, by the columns they set (in the caller's order)
_UPDATE_INODE: dict[tuple[str, ...], str] = {}


class Txn:
    """Domain operations inside one transaction."""

    def __init__(self, conn: Conn, dialect: schema.Dialect = schema.SQLITE) -> None:
        self.conn = conn
        #: the engine's spellings (migrations create tables with them)
        self.dialect = dialect

    # --- filesystem properties ---------------------------------------------------------

    async def get_info(self, name: str) -> str | None:
        row = await self.conn.query_one("SELECT value FROM meta_info WHERE name = ?", (name,))
        return row[0] if row else None

    async def set_info(self, name: str, value: str) -> None:
        if not await self.conn.execute(
            "UPDATE meta_info SET value = ? WHERE name = ?", (value, name)
        ):
            await self.conn.execute(
                "INSERT INTO meta_info (name, value) VALUES (?, ?)", (name, value)
            )

    # --- inodes ---------------------------------------------------------------------------

    async def get_inode(self, ino: int) -> InodeAttrs | None:
        row = await self.conn.query_one(_INODE_SELECT + " WHERE id = ?", (ino,))
        return _inode(row) if row else None

    async def create_inode(
        self,
        *,
        mode: int,
        uid: int,
        gid: int,
        nlink: int,
        now_ns: int,
        rdev: int = 0,
        size: int = 0,
    ) -> InodeAttrs:
        ino = await self.conn.insert(
            "INSERT INTO inodes (mode, uid, gid, nlink, size, rdev, atime_ns, mtime_ns, ctime_ns,"
            " version, flags) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0)",
            (mode, uid, gid, nlink, size, rdev, now_ns, now_ns, now_ns),
        )
        return InodeAttrs(ino, mode, uid, gid, nlink, size, rdev, now_ns, now_ns, now_ns, 0, 0)

    async def update_inode(self, ino: int, **changes: int) -> None:
        """Set the given columns of inode `ino`."""
        if not changes:
            return
        columns = tuple(changes)
        sql = _UPDATE_INODE.get(columns)
        if sql is None:  # a few column sets recur: each statement is made once
            bad = set(columns) - _SETTABLE
            if bad:
                raise ValueError(f"not inode columns: {sorted(bad)}")
            sql = "UPDATE inodes SET " + ", ".join(f"{c} = ?" for c in columns) + " WHERE id = ?"
            _UPDATE_INODE[columns] = sql
        await self.conn.defer(sql, (*changes.values(), ino))

    async def set_atimes(self, rows: Sequence[tuple[int, int, int]]) -> None:
        """(new atime, inode, the atime it replaces) for each row: set where the inode
        still has the replaced atime (one changed since keeps its own)."""
        if rows:
            await self.conn.executemany(
                "UPDATE inodes SET atime_ns = ? WHERE id = ? AND atime_ns = ?", rows
            )

    async def add_nlink(self, ino: int, delta: int, ctime_ns: int) -> None:
        await self.conn.defer(
            "UPDATE inodes SET nlink = nlink + ?, ctime_ns = ? WHERE id = ?", (delta, ctime_ns, ino)
        )

    async def free_inode(self, ino: int, now_ns: int) -> None:
        """Remove inode `ino` and everything it owns; its blocks lose their references."""
        rows = await self.conn.query("SELECT block FROM extents WHERE inode = ?", (ino,))
        await self.unref_blocks([bytes(r[0]) for r in rows], now_ns)
        await self.conn.execute_all([
            (f"DELETE FROM {table} WHERE {col} = ?", (ino,))
            for table, col in (
                ("extents", "inode"), ("versions", "inode"), ("xattrs", "inode"),
                ("symlinks", "inode"), ("inodes", "id"),
            )
        ])  # fmt: skip

    async def orphan_inodes(self) -> list[int]:
        """Inodes no dentry names (open-unlinked files left by a crash), except those
        the trash keeps."""
        rows = await self.conn.query(
            "SELECT id FROM inodes WHERE nlink = 0 AND id <> ?"
            " AND id NOT IN (SELECT inode FROM trash)",
            (ROOT_INODE,),
        )
        return [r[0] for r in rows]

    # --- directory entries ----------------------------------------------------------------

    async def lookup(self, parent: int, name: bytes) -> int | None:
        row = await self.conn.query_one(
            "SELECT inode FROM dentries WHERE parent = ? AND name = ?", (parent, name)
        )
        return row[0] if row else None

    async def lookup_attrs(self, parent: int, name: bytes) -> InodeAttrs | None:
        """The attributes of the inode entry `name` of `parent` names (one query)."""
        row = await self.conn.query_one(
            "SELECT " + _I_COLUMNS + " FROM dentries d"
            " JOIN inodes i ON i.id = d.inode WHERE d.parent = ? AND d.name = ?",
            (parent, name),
        )
        return _inode(row) if row else None

    async def lookup_attrs_and_entries(
        self, parent: int, name: bytes
    ) -> tuple[InodeAttrs, bool] | None:
        """`lookup_attrs`, and whether that inode has entries of its own, in one query:
        what an rmdir checks first."""
        row = await self.conn.query_one(
            "SELECT " + _I_COLUMNS + ","
            " EXISTS (SELECT 1 FROM dentries c WHERE c.parent = i.id) FROM dentries d"
            " JOIN inodes i ON i.id = d.inode WHERE d.parent = ? AND d.name = ?",
            (parent, name),
        )
        return (_inode(row[:-1]), bool(row[-1])) if row else None

    async def dir_and_entry(self, parent: int, name: bytes) -> tuple[InodeAttrs | None, int | None]:
        """The attributes of inode `parent` and the inode its entry `name` names (None
        for either that does not exist), in one query: what a create checks first."""
        row = await self.conn.query_one(
            "SELECT " + _I_COLUMNS + ", d.inode FROM inodes i"
            " LEFT JOIN dentries d ON d.parent = i.id AND d.name = ? WHERE i.id = ?",
            (name, parent),
        )
        return (_inode(row[:-1]), row[-1]) if row else (None, None)

    async def add_dentry(self, parent: int, name: bytes, ino: int) -> None:
        await self.conn.defer(
            "INSERT INTO dentries (parent, name, inode) VALUES (?, ?, ?)", (parent, name, ino)
        )

    async def remove_dentry(self, parent: int, name: bytes) -> bool:
        n = await self.conn.execute(
            "DELETE FROM dentries WHERE parent = ? AND name = ?", (parent, name)
        )
        return n > 0

    async def drop_dentry(self, parent: int, name: bytes) -> None:
        """`remove_dentry` of an entry the transaction has read (so it is there): its
        outcome needs no answer, so the statement is deferred (`Conn.defer`)."""
        await self.conn.defer("DELETE FROM dentries WHERE parent = ? AND name = ?", (parent, name))

    async def set_dentry_inode(self, parent: int, name: bytes, ino: int) -> None:
        await self.conn.execute(
            "UPDATE dentries SET inode = ? WHERE parent = ? AND name = ?", (ino, parent, name)
        )

    async def readdir(self, parent: int, after_id: int, limit: int) -> list[tuple[int, bytes, int]]:
        """Entries of `parent` with id > after_id, by id: (id, name, inode)."""
        rows = await self.conn.query(
            "SELECT id, name, inode FROM dentries WHERE parent = ? AND id > ? ORDER BY id LIMIT ?",
            (parent, after_id, limit),
        )
        return [(i, bytes(n), ino) for i, n, ino in rows]

    async def readdir_attrs(
        self, parent: int, after_id: int, limit: int
    ) -> list[tuple[int, bytes, InodeAttrs]]:
        """Like `readdir`, with each entry's inode attributes, in one query (an entry
        whose inode is gone is left out)."""
        rows = await self.conn.query(
            "SELECT d.id, d.name, " + _I_COLUMNS
            + " FROM dentries d JOIN inodes i ON i.id = d.inode"
            " WHERE d.parent = ? AND d.id > ? ORDER BY d.id LIMIT ?",
            (parent, after_id, limit),
        )  # fmt: skip
        return [(r[0], bytes(r[1]), _inode(r[2:])) for r in rows]

    async def has_entries(self, parent: int) -> bool:
        return (
            await self.conn.query_one("SELECT 1 FROM dentries WHERE parent = ? LIMIT 1", (parent,))
            is not None
        )

    async def parent_of(self, ino: int) -> int | None:
        """The directory holding directory `ino` (a directory has one dentry)."""
        row = await self.conn.query_one(
            "SELECT parent FROM dentries WHERE inode = ? LIMIT 1", (ino,)
        )
        return row[0] if row else None

    # --- symlinks and xattrs ------------------------------------------------------------

    async def set_symlink(self, ino: int, target: bytes) -> None:
        await self.conn.execute("INSERT INTO symlinks (inode, target) VALUES (?, ?)", (ino, target))

    async def get_symlink(self, ino: int) -> bytes | None:
        row = await self.conn.query_one("SELECT target FROM symlinks WHERE inode = ?", (ino,))
        return bytes(row[0]) if row else None

    async def get_xattr(self, ino: int, name: bytes) -> bytes | None:
        row = await self.conn.query_one(
            "SELECT value FROM xattrs WHERE inode = ? AND name = ?", (ino, name)
        )
        return bytes(row[0]) if row else None

    async def set_xattr(self, ino: int, name: bytes, value: bytes) -> None:
        if not await self.conn.execute(
            "UPDATE xattrs SET value = ? WHERE inode = ? AND name = ?", (value, ino, name)
        ):
            await self.conn.execute(
                "INSERT INTO xattrs (inode, name, value) VALUES (?, ?, ?)", (ino, name, value)
            )

    async def remove_xattr(self, ino: int, name: bytes) -> bool:
        return (
            await self.conn.execute("DELETE FROM xattrs WHERE inode = ? AND name = ?", (ino, name))
            > 0
        )

    async def list_xattrs(self, ino: int) -> list[bytes]:
        rows = await self.conn.query(
            "SELECT name FROM xattrs WHERE inode = ? ORDER BY name", (ino,)
        )
        return [bytes(r[0]) for r in rows]

    # --- extents and versions ---------------------------------------------------------

    async def live_extents(self, ino: int, start: int = 0, end: int = LIVE) -> list[Extent]:
        """Live extents of `ino` that overlap [start, end), by offset."""
        rows = await self.conn.query(
            "SELECT file_offset, length, block, v_from FROM extents WHERE inode = ? AND v_to = ?"
            " AND file_offset < ? AND file_offset + length > ? ORDER BY file_offset",
            (ino, LIVE, end, start),
        )
        return [Extent(o, n, bytes(b), v) for o, n, b, v in rows]

    async def count_allocated(self, inodes: Sequence[int]) -> dict[int, int]:
        """Bytes of the live extents of each of `inodes` (holes have no extent), for
        those that have any, summed over the extents: what `inodes.allocated` must
        say (fsck, the migration to schema 5). Lookups read the column instead."""
        out: dict[int, int] = {}
        for i in range(0, len(inodes), 500):
            part = inodes[i : i + 500]
            rows = await self.conn.query(
                "SELECT inode, SUM(length) FROM extents WHERE v_to = ? AND inode IN ("
                + ", ".join("?" * len(part)) + ") GROUP BY inode",
                (LIVE, *part),
            )  # fmt: skip
            out.update((ino, int(total)) for ino, total in rows)
        return out

    async def _add_allocated(self, ino: int, delta: int) -> None:
        """`inodes.allocated` follows the live extents (invariant checked by fsck)."""
        if delta:
            await self.conn.execute(
                "UPDATE inodes SET allocated = allocated + ? WHERE id = ?", (delta, ino)
            )

    async def version_extents(self, ino: int, version: int) -> list[Extent]:
        """Extents of `ino` as of `version`, by offset."""
        rows = await self.conn.query(
            "SELECT file_offset, length, block, v_from FROM extents WHERE inode = ? AND v_from <= ?"
            " AND v_to > ? ORDER BY file_offset",
            (ino, version, version),
        )
        return [Extent(o, n, bytes(b), v) for o, n, b, v in rows]

    async def close_extents(self, ino: int, version: int, offsets: Iterable[int]) -> None:
        """End the live extents of `ino` at `offsets`: they belong to history from `version` on.

        Refcounts do not change: a closed row still names its block."""
        offsets = list(offsets)
        if not offsets:
            return  # (a new file's first seal: no statement at all)
        closed = 0
        for i in range(0, len(offsets), 500):
            part = offsets[i : i + 500]
            row = await self.conn.query_one(
                "SELECT COALESCE(SUM(length), 0) FROM extents WHERE inode = ? AND v_to = ?"
                " AND file_offset IN (" + ", ".join("?" * len(part)) + ")",
                (ino, LIVE, *part),
            )
            closed += int(row[0]) if row else 0
        await self._add_allocated(ino, -closed)
        await self.conn.executemany(
            "UPDATE extents SET v_to = ? WHERE inode = ? AND v_to = ? AND file_offset = ?",
            [(version, ino, LIVE, off) for off in offsets],
        )

    async def drop_extents(self, ino: int, extents: Sequence[Extent], now_ns: int) -> None:
        """Delete live extents outright (they were never part of a published version)
        and take their references off their blocks."""
        if not extents:
            return
        await self.conn.executemany(
            "DELETE FROM extents WHERE inode = ? AND v_to = ? AND file_offset = ?",
            [(ino, LIVE, e.offset) for e in extents],
        )
        await self._add_allocated(ino, -sum(e.length for e in extents))
        await self.unref_blocks([e.block for e in extents], now_ns)

    async def unref_blocks(self, block_ids: Sequence[bytes], now_ns: int) -> None:
        """One reference less for each id listed (an id listed twice loses two)."""
        counts: dict[bytes, int] = {}
        for b in block_ids:
            counts[b] = counts.get(b, 0) + 1
        if not counts:
            return
        await self.conn.executemany(
            # unref_ns first: MySQL evaluates SET assignments left to right on the new row
            "UPDATE blocks SET unref_ns = CASE WHEN refcount = ? THEN ? ELSE unref_ns END,"
            " refcount = refcount - ? WHERE id = ?",
            # by id: every transaction locks block rows in one order, so two never deadlock
            [(n, now_ns, n, b) for b, n in sorted(counts.items())],
        )

    async def add_extents(self, ino: int, version: int, extents: Sequence[Extent]) -> None:
        """Add live extents from `version` on; each names a block that already has a row
        (see `add_block_refs`, which counts the reference)."""
        await self.conn.executemany(
            "INSERT INTO extents (inode, v_to, file_offset, length, block, v_from)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [(ino, LIVE, e.offset, e.length, e.block, version) for e in extents],
        )
        await self._add_allocated(ino, sum(e.length for e in extents))

    async def add_version(
        self, ino: int, version: int, *, size: int, mtime_ns: int, origin: str, flags: int = 0
    ) -> None:
        await self.conn.execute(
            "INSERT INTO versions (inode, version, size, mtime_ns, committed_ns, origin, flags)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (ino, version, size, mtime_ns, time.time_ns(), origin, flags),
        )

    async def versions(self, ino: int) -> list[VersionRow]:
        rows = await self.conn.query(
            "SELECT inode, version, size, mtime_ns, committed_ns, origin, flags FROM versions"
            " WHERE inode = ? ORDER BY version",
            (ino,),
        )
        return [VersionRow(*r) for r in rows]

    # --- blocks -----------------------------------------------------------------------

    async def add_block_refs(
        self,
        refs: dict[bytes, tuple[int, int]],
        now_ns: int,
        *,
        stored: dict[bytes, int] | None = None,
    ) -> list[bytes]:
        """Count `n` more references to each block {id: (size, n)}; blocks without a row get
        one in state `pending`, and a block a deletion pass claimed (`deleting`: its
        object may be gone already) is revived (`revived`, see cloudfs.gc). `stored`:
        blocks the caller has put in the store ({id: stored size}, --upload=sync): a new
        row of one is `stored` at once, and a `pending` one becomes `stored`. Return
        the ids whose plaintext the caller must have in its cache dir before it
        commits: the new pending ones and the revived ones."""
        stored = stored or {}
        ordered = sorted(refs.items())  # by id: one lock order (unref_blocks)
        # every UPDATE in one go, then the rows none matched as one INSERT (one trip
        # each on MySQL, whatever the count: a snapshot names thousands of blocks)
        matched = await self.conn.execute_each(
            "UPDATE blocks SET refcount = refcount + ?,"
            " state = CASE WHEN state = ? THEN ? ELSE state END WHERE id = ?",
            [(n, BLOCK_DELETING, BLOCK_REVIVED, block_id) for block_id, (_size, n) in ordered],
        )
        fresh = [(b, size, n) for (b, (size, n)), m in zip(ordered, matched, strict=True) if not m]
        await self.conn.executemany(
            "INSERT INTO blocks (id, size, stored_size, refcount, state, created_ns, unref_ns)"
            " VALUES (?, ?, ?, ?, ?, ?, NULL)",
            [
                (b, size, stored.get(b), n, BLOCK_STORED if b in stored else BLOCK_PENDING, now_ns)
                for b, size, n in fresh
            ],
        )
        new = {b for b, _size, _n in fresh}
        if stored:
            # a `deleting` or `revived` row stays so: its object may still be deleted
            await self.conn.executemany(
                "UPDATE blocks SET state = ?, stored_size = ? WHERE id = ? AND state = ?",
                [(BLOCK_STORED, n, b, BLOCK_PENDING) for b, n in sorted(stored.items())
                 if b in refs and b not in new],
            )  # fmt: skip
        needs = [b for b, _size, _n in fresh if b not in stored]
        known = [b for b in sorted(refs) if b not in new]
        rows = await self._blocks_where("id", known, "state = ?", BLOCK_REVIVED)
        needs.extend(bytes(r[0]) for r in rows)
        return needs

    async def _blocks_where(
        self, columns: str, ids: Sequence[bytes], where: str = "1 = 1", *params: object
    ) -> list[tuple]:
        """`SELECT columns FROM blocks WHERE where AND id IN ids`, 500 ids a query."""
        rows: list[tuple] = []
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            marks = ", ".join("?" * len(part))
            rows += await self.conn.query(
                f"SELECT {columns} FROM blocks WHERE {where} AND id IN ({marks})", (*params, *part)
            )
        return rows

    async def known_blocks(self, ids: Sequence[bytes]) -> set[bytes]:
        """Those of `ids` that have a row."""
        return {bytes(r[0]) for r in await self._blocks_where("id", ids)}

    async def block_states(self, ids: Sequence[bytes]) -> dict[bytes, int]:
        """{id: state} of those of `ids` that have a row."""
        return {bytes(r[0]): int(r[1]) for r in await self._blocks_where("id, state", ids)}

    async def pending_sizes(self, ids: Sequence[bytes]) -> dict[bytes, int]:
        """{id: plaintext size} of those of `ids` whose row is `pending`."""
        rows = await self._blocks_where("id, size", ids, "state = ?", BLOCK_PENDING)
        return {bytes(r[0]): int(r[1]) for r in rows}

    async def pending_blocks_of(self, ino: int) -> list[bytes]:
        """The pending blocks the live extents of `ino` name (what an upload=sync
        fsync waits for)."""
        rows = await self.conn.query(
            "SELECT DISTINCT e.block FROM extents e JOIN blocks b ON b.id = e.block"
            " WHERE e.inode = ? AND e.v_to = ? AND b.state = ?",
            (ino, LIVE, BLOCK_PENDING),
        )
        return [bytes(r[0]) for r in rows]

    async def get_block(self, block_id: bytes) -> BlockRow | None:
        row = await self.conn.query_one(
            "SELECT id, size, stored_size, refcount, state FROM blocks WHERE id = ?", (block_id,)
        )
        return BlockRow(bytes(row[0]), *row[1:]) if row else None

    async def pending_blocks(self, limit: int, after: bytes = b"") -> list[tuple[bytes, int]]:
        """Blocks waiting for upload, by id: (id, size)."""
        rows = await self.conn.query(
            "SELECT id, size FROM blocks WHERE state = ? AND id > ? ORDER BY id LIMIT ?",
            (BLOCK_PENDING, after, limit),
        )
        return [(bytes(i), s) for i, s in rows]

    async def pending_page(
        self, limit: int, after: object = None
    ) -> tuple[list[tuple[bytes, int]], object]:
        """One page of the blocks waiting for upload, (id, size), and the cursor of the
        next page (None after the last one). SQLite walks the pending blocks by rowid,
        which its index on `state` holds in order; by id (`pending_blocks`) it fetched
        and sorted every pending block for each page: with 30,000 pending, a pass of the
        uploader over them cost more than the uploads. InnoDB's index on `state` holds
        the primary key, so other engines walk by id."""
        if self.dialect.name == "sqlite":
            rows = await self.conn.query(
                "SELECT rowid, id, size FROM blocks WHERE state = ? AND rowid > ?"
                " ORDER BY rowid LIMIT ?",
                (BLOCK_PENDING, -1 if after is None else after, limit),
            )
            page = [(bytes(i), s) for _r, i, s in rows]
            return page, (rows[-1][0] if len(rows) == limit else None)
        cursor = b"" if after is None else after
        page = await self.pending_blocks(limit, cursor)  # type: ignore[arg-type]
        return page, (page[-1][0] if len(page) == limit else None)

    async def mark_stored(self, block_id: bytes, stored_size: int) -> None:
        await self.conn.execute(
            "UPDATE blocks SET state = ?, stored_size = ? WHERE id = ? AND state = ?",
            (BLOCK_STORED, stored_size, block_id, BLOCK_PENDING),
        )

    async def pending_summary(self) -> tuple[int, int]:
        """(number, plaintext bytes) of blocks not yet stored."""
        row = await self.conn.query_one(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM blocks WHERE state = ?", (BLOCK_PENDING,)
        )
        assert row is not None
        return int(row[0]), int(row[1])

    async def stats(self) -> FsStats:
        n_inodes, n_files, logical = await self._one(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN mode & 61440 = 32768 THEN 1 ELSE 0 END), 0),"
            " COALESCE(SUM(CASE WHEN mode & 61440 = 32768 THEN size ELSE 0 END), 0) FROM inodes"
            # what has a name (or is the root): not what the trash keeps
            " WHERE nlink > 0 OR id = 1"
        )
        n_blocks, block_bytes, stored, stored_plain = await self._one(
            "SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(SUM(stored_size), 0),"
            " COALESCE(SUM(CASE WHEN state = 1 THEN size ELSE 0 END), 0) FROM blocks"
        )
        (referenced,) = await self._one(
            "SELECT COALESCE(SUM(length), 0) FROM extents WHERE v_to = ?", (LIVE,)
        )
        pending, pending_bytes = await self.pending_summary()
        return FsStats(
            n_inodes, n_files, logical, n_blocks, block_bytes, referenced,
            stored, stored_plain, pending, pending_bytes,
        )  # fmt: skip

    async def _one(self, sql: str, params: Sequence[object] = ()) -> tuple[int, ...]:
        row = await self.conn.query_one(sql, params)
        assert row is not None
        return tuple(int(v) for v in row)


class MetaStore(abc.ABC):
    """A metadata database. Engines implement `_transaction`, `is_initialized` and `close`.

    Conflicts: on an engine where transactions of several processes or machines run at
    once (MySQL), a transaction can lose a deadlock or time out waiting for a lock; the
    engine rolls it back and raises TransactionConflict. The body of an `async with
    meta.transaction()` cannot be run again by the context manager, so work that may
    conflict goes through `run`, which calls a whole async function again."""

    dialect: schema.Dialect
    #: the database, as shown in messages (never with a password)
    where: str = "metadata database"
    #: why this process may change nothing any more (its mount lease was taken over by
    #: another machine: cloudfs.lease), or None; see `fence`
    fenced: str | None = None

    def fence(self, reason: str) -> None:
        """From now on every write transaction fails with EROFS (`reason` as its
        detail); reads go on. A mount whose lease another machine took must not write
        a second history into the same bucket."""
        self.fenced = reason

    @abc.abstractmethod
    def _transaction(self, durable: bool, write: bool) -> AbstractAsyncContextManager[Conn]:
        """An async context manager: a connection inside BEGIN … COMMIT (ROLLBACK on error).

        `durable`: the commit reaches stable storage before it returns (fsync).
        `write`: the transaction may write (takes the write lock at once)."""

    def transaction(
        self, *, durable: bool = False, write: bool = True
    ) -> AbstractAsyncContextManager[Txn]:
        return _Transaction(self, durable, write)

    def reading(self) -> AbstractAsyncContextManager[Txn]:
        """A read-only transaction: a consistent view, no write lock."""
        return self.transaction(write=False)

    def detached_reading(self) -> AbstractAsyncContextManager[Txn]:
        """A read-only transaction for a long read (a whole tree, cloudfs.snapshots): a
        consistent view that does not make this process's other transactions wait
        meanwhile. Engines whose `reading` already does not (MySQL's pooled readers)
        keep this default."""
        return self.reading()

    async def run(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """`await fn(*args, **kwargs)`, called again while a transaction of it conflicts
        with a concurrent one (TransactionConflict; the engine rolled that transaction
        back), at most RUN_ATTEMPTS times with a growing random pause.

        `fn` must be safe to call again after a conflict: it changes the metadata in one
        write transaction, and anything before it only reads. A conflict that a nested
        `run` already gave up on is not retried again."""
        for attempt in range(1, RUN_ATTEMPTS + 1):
            try:
                return await fn(*args, **kwargs)
            except TransactionConflict as exc:
                if attempt == RUN_ATTEMPTS or exc.final:
                    exc.final = True
                    raise
                log.debug("transaction conflict (attempt %d): %s", attempt, exc.message)
            await trio.sleep(random.uniform(0, min(RUN_MAX_PAUSE_S, 0.001 * 2**attempt)))
        raise AssertionError("unreachable")

    async def run_group_commits(
        self, window_s: float, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Group the commits of this process's write transactions until cancelled
        (an engine that cannot returns at once: every transaction commits)."""
        task_status.started()

    async def commit(self) -> None:
        """Commit what a group commit holds back, before another process may depend
        on it (nothing to do without group commits)."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def is_initialized(self) -> bool:
        """Does the database hold the schema (of some filesystem)?"""

    async def initialize(
        self, fs_uuid: str, *, uid: int, gid: int, now_ns: int | None = None
    ) -> None:
        """Create the schema and the root directory of a new filesystem.

        On MySQL each CREATE TABLE commits at once: a failure halfway leaves tables
        behind, which `wipe` (mkfs --force) removes."""
        now = now_ns if now_ns is not None else time.time_ns()
        async with self.transaction(durable=True) as tx:
            for stmt in schema.ddl(self.dialect):
                await tx.conn.execute(stmt)
            await tx.set_info("schema_version", str(schema.SCHEMA_VERSION))
            await tx.set_info("fs_uuid", fs_uuid)
            root = await tx.create_inode(mode=0o40755, uid=uid, gid=gid, nlink=2, now_ns=now)
            if root.id != ROOT_INODE:
                raise RuntimeError(f"root inode got id {root.id}")

    async def wipe(self) -> None:
        """Drop every table of the schema (the filesystem's metadata is gone)."""
        async with self.transaction(durable=True) as tx:
            for table in (*schema.table_names(), *schema.RETIRED_TABLES):
                await tx.conn.execute(f"DROP TABLE IF EXISTS {table}")

    async def schema_info(self) -> tuple[str | None, int]:
        """(fs uuid, schema version) the database holds; MetadataMissing if it holds no
        filesystem."""
        if not await self.is_initialized():
            raise MetadataMissing(f"{self.where} holds no cloudfs filesystem")
        async with self.reading() as tx:
            found = await tx.get_info("fs_uuid")
            version = int(await tx.get_info("schema_version") or 0)
        return found, version

    async def check(self, fs_uuid: str, *, older_ok: bool = False) -> int:
        """Refuse a database of another filesystem, of a newer schema, or (unless
        `older_ok`) of an older one that `cloudfs upgrade` must migrate first.
        Return the database's schema version."""
        found, version = await self.schema_info()
        if found != fs_uuid:
            raise MetadataMismatch(f"{self.where} holds filesystem {found}, not {fs_uuid}")
        if version > schema.SCHEMA_VERSION:
            raise UnsupportedFormat(
                f"{self.where} has metadata schema {version}; this cloudfs knows up to"
                f" {schema.SCHEMA_VERSION}"
            )
        if version < schema.SCHEMA_VERSION and not older_ok:
            raise MetadataOutdated(
                f"{self.where} has schema {version}, this cloudfs needs {schema.SCHEMA_VERSION}"
            )
        return version


class _Transaction:
    """`MetaStore.transaction`: the engine's transaction, as a `Txn`. A class rather
    than an async generator: every lookup, stat and create takes one or more, and an
    async generator context manager costs several microseconds more per use (its
    object, trio's hooks for async generators, the generator's frames)."""

    __slots__ = ("_durable", "_inner", "_meta", "_write")

    def __init__(self, meta: MetaStore, durable: bool, write: bool) -> None:
        self._meta = meta
        self._durable = durable
        self._write = write
        self._inner: AbstractAsyncContextManager[Conn] | None = None

    async def __aenter__(self) -> Txn:
        meta = self._meta
        if self._write and meta.fenced is not None:
            raise FSOpError(errno.EROFS, meta.fenced)
        inner = self._inner = meta._transaction(self._durable, self._write)
        return Txn(await inner.__aenter__(), meta.dialect)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._inner is not None
        return await self._inner.__aexit__(exc_type, exc, tb)
