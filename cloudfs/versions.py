"""File versions: listing them, choosing one by time, and making one the live contents
of a file again.

A version v of a file is the set of its extent rows with v_from <= v < v_to (see
cloudfs.meta.schema). Bringing version v back adds a new version whose live extents
are copies of v's rows: they name the same blocks, whose refcounts grow by one per
row, so no block is read, written or uploaded and the time does not depend on the
file's size. The mount does this (cloudfs.files.FileStore.restore) so that its
in-memory state of the file follows.
"""

from __future__ import annotations

import errno
import re
import time
from collections import Counter
from datetime import datetime

from cloudfs.errors import FSOpError, UsageError
from cloudfs.meta.base import Txn, VersionRow
from cloudfs.meta.schema import LIVE

#: versions.flags bits
CONFLICT = 1  # an overwritten concurrent commit (shared mode)
RESTORED = 2  # made by `cloudfs restore` from an earlier version


async def version_row(tx: Txn, ino: int, version: int) -> VersionRow | None:
    rows = await tx.conn.query(
        "SELECT inode, version, size, mtime_ns, committed_ns, origin, flags FROM versions"
        " WHERE inode = ? AND version = ?",
        (ino, version),
    )
    return VersionRow(*rows[0]) if rows else None


async def restore_into(
    tx: Txn,
    src: int,
    version: int,
    target: int,
    *,
    origin: str,
    now_ns: int,
    stored: dict[bytes, int] | None = None,
) -> tuple[int, int]:
    """Make version `version` of file `src` the live contents of file `target` (`src`
    itself or another file), as a new published version of `target`. The target must
    have no unpublished working version (the caller sealed and published it first).
    `stored`: pending blocks of it the caller has put in the store ({id: stored
    size}): their rows become `stored`. Returns (the new version number, its size).
    ENOENT when the version is unknown."""
    row = await version_row(tx, src, version)
    if row is None:
        raise FSOpError(errno.ENOENT, f"inode {src} has no version {version}")
    attrs = await tx.get_inode(target)
    if attrs is None:
        raise FSOpError(errno.ENOENT, f"inode {target}")
    extents = [e for e in await tx.version_extents(src, version) if e.offset < row.size]
    new_version = attrs.version + 1
    live = await tx.live_extents(target)
    await tx.close_extents(target, new_version, [e.offset for e in live])
    refs: Counter[bytes] = Counter(e.block for e in extents)
    sizes = {e.block: e.length for e in extents}
    # every block of `extents` has a row with refcount >= 1 (version's rows name it)
    await tx.add_block_refs({b: (sizes[b], n) for b, n in refs.items()}, now_ns, stored=stored)
    await tx.add_extents(target, new_version, extents)
    await tx.update_inode(
        target, size=row.size, mtime_ns=now_ns, ctime_ns=now_ns, version=new_version
    )
    await tx.conn.execute(
        "INSERT INTO versions (inode, version, size, mtime_ns, committed_ns, origin, flags)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (target, new_version, row.size, now_ns, now_ns, origin, RESTORED),
    )
    return new_version, row.size


def version_at(versions: list[VersionRow], at_ns: int) -> VersionRow | None:
    """The newest version committed at or before `at_ns`."""
    best = None
    for v in versions:
        if v.committed_ns <= at_ns and (best is None or v.version > best.version):
            best = v
    return best


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])(?:\s+ago)?$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """Seconds of `30d`, `12h`, `90m`, `45s`, `2w` or a plain number of seconds."""
    t = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", t):
        return float(t)
    m = _RELATIVE.match(t)
    if m is None or t.endswith("ago"):
        raise UsageError(f"not a duration: {text!r} (examples: 30d, 12h, 90m, 45s)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_time(text: str, now: float | None = None) -> int:
    """Nanoseconds since the epoch of a time given as ISO 8601 (`2024-05-01 12:30`,
    local time unless it names a zone), `@SECONDS`, `N[smhdw] ago` / `-N[smhdw]`, or
    `+N[smhdw]` (from now on: a clock moved forward, for tests and dry runs)."""
    now = time.time() if now is None else now
    t = text.strip()
    if t.startswith("@"):
        try:
            return int(float(t[1:]) * 1e9)
        except ValueError:
            raise UsageError(f"not a time: {text!r}") from None
    rel = t.removeprefix("-").removeprefix("+")
    m = _RELATIVE.match(rel.lower())
    if m is not None and t.startswith("+") and not rel.lower().endswith("ago"):
        return int((now + float(m.group(1)) * _UNITS[m.group(2)]) * 1e9)
    if m is not None and (t.startswith("-") or rel.lower().endswith("ago")):
        return int((now - float(m.group(1)) * _UNITS[m.group(2)]) * 1e9)
    try:
        when = datetime.fromisoformat(t)
    except ValueError:
        raise UsageError(
            f"not a time: {text!r} (examples: '2024-05-01 12:30', @1714566600, '2h ago')"
        ) from None
    if when.tzinfo is None:
        when = when.astimezone()  # local time
    return int(when.timestamp() * 1e9)


async def old_only_bytes(tx: Txn) -> int:
    """Plaintext bytes of the blocks that only old versions use (no live extent names
    them): what pruning versions could free (`cloudfs stat`)."""
    row = await tx.conn.query_one(
        "SELECT COALESCE(SUM(b.size), 0) FROM blocks b WHERE b.refcount > 0"
        " AND NOT EXISTS (SELECT 1 FROM extents e WHERE e.block = b.id AND e.v_to = ?)",
        (LIVE,),
    )
    return int(row[0]) if row else 0
