"""Snapshots: copy-on-write copies of a tree, made from the metadata alone."""

from __future__ import annotations

from dataclasses import dataclass

from cloudfs.meta.base import Txn


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


#: inodes.flags bit: the inode belongs to a read-only tree (changes get EROFS)
READONLY = 1


async def readonly_among(tx: Txn, inodes: list[int]) -> bool:
    """Is any of `inodes` read-only?"""
    marks = ", ".join("?" * len(inodes))
    row = await tx.conn.query_one(
        f"SELECT 1 FROM inodes WHERE id IN ({marks}) AND (flags & {READONLY}) <> 0 LIMIT 1",
        inodes,
    )
    return row is not None
