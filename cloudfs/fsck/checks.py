"""The checks of fsck.cloudfs: one method per invariant of DESIGN §3, run in order by
`Checker.run`, each reporting what it finds and, when repairing, fixing it.

Order matters: names are fixed before reachability is computed, reachability before
link counts, extents and blocks before reference counts, and the store is compared
with the block rows before anything is uploaded or scrubbed.

Lost data: a block neither the store nor the cache dir holds cannot come back. Its
extent rows are dropped (those bytes of the files that used it read as zeros) and
every file and version that used it is named in the report.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import stat
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from cloudfs import _native, clients, snapshots
from cloudfs.cache import CacheDir
from cloudfs.codec.framing import block_key
from cloudfs.errors import CorruptBlock, ObjectNotFound
from cloudfs.meta.base import MetaStore, Txn
from cloudfs.meta.schema import (
    BLOCK_DELETING,
    BLOCK_PENDING,
    BLOCK_REVIVED,
    BLOCK_STORED,
    LIVE,
    ROOT_INODE,
    SQLITE,
)
from cloudfs.objectstore.base import ObjectStore
from cloudfs.objectstore.sealed import SealedStore

log = logging.getLogger(__name__)

LOST_FOUND = b"lost+found"
VIEW_NAME = b".cloudfs"
#: rows per page when a check walks a table
PAGE = 1000
#: blocks fetched at once by the scrub (its memory: this many blocks)
SCRUB_PARALLEL = 8
ORPHANS_KEY = "fsck_orphans"
S_IFDIR = stat.S_IFDIR


@dataclass
class Finding:
    check: str
    message: str
    error: bool = True  # False: a note, not an inconsistency
    fixed: bool = False


@dataclass
class Store:
    """The object store as fsck sees it: the raw store, and the sealed one when the
    keys are known (uploads and the scrub need them)."""

    raw: ObjectStore
    sealed: SealedStore | None = None
    #: id -> object size of every block object, listed once
    listing: dict[bytes, int] = field(default_factory=dict)
    #: keys under blocks/ that name no block id
    strays: list[str] = field(default_factory=list)


def _ids(rows: list[tuple]) -> list[bytes]:
    return [bytes(r[0]) for r in rows]


class Checker:
    def __init__(
        self,
        meta: MetaStore,
        cache: CacheDir,
        store: Store,
        *,
        repair: bool,
        now_ns: int | None = None,
        orphan_grace_s: float = 0.0,
        id_key: bytes | None = None,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> None:
        self.meta = meta
        self.cache = cache
        self.store = store
        self.repair = repair
        self.now = time.time_ns() if now_ns is None else now_ns
        self.orphan_grace_s = orphan_grace_s
        self.id_key = id_key
        self.progress = progress
        self.findings: list[Finding] = []
        self._check = ""

    # --- reporting --------------------------------------------------------------------

    def found(self, message: str, *, fixed: bool | None = None, error: bool = True) -> None:
        """Record a finding of the running check (fixed: by default, when repairing)."""
        done = self.repair if fixed is None else fixed
        self.findings.append(Finding(self._check, message, error, done and error))
        log.debug("%s: %s", self._check, message)

    @property
    def errors_left(self) -> int:
        return sum(1 for f in self.findings if f.error and not f.fixed)

    @property
    def errors_fixed(self) -> int:
        return sum(1 for f in self.findings if f.error and f.fixed)

    async def run(self, *, check_data: bool = False) -> None:
        checks: list[Callable[[], object]] = [
            self.check_cache_leftovers,
            self.check_lease,
            self.check_clients,
            self.check_dentries,
            self.check_dangling_rows,
            self.check_reachable,
            self.check_nlink,
            self.check_extents,
            self.check_block_rows,
            self.check_unknown_blocks,
            self.check_refcounts,
            self.check_orphan_objects,
            self.check_pending_uploads,
        ]
        if check_data:
            checks.append(self.check_data)
        # last: the repairs above may drop live extents (lost blocks, overlaps)
        checks.append(self.check_allocated)
        for check in checks:
            self._check = check.__name__.removeprefix("check_")
            await check()  # type: ignore[misc]

    async def _write(self, fn: Callable[[Txn], object]) -> None:
        """Run a repair in one write transaction (only when repairing)."""
        if not self.repair:
            return

        async def body() -> None:
            async with self.meta.transaction() as tx:
                await fn(tx)  # type: ignore[misc]

        await self.meta.run(body)

    # --- the cache dir ----------------------------------------------------------------

    async def check_cache_leftovers(self) -> None:
        """Unsealed writes (dirty overlays) and block holds of a mount that died: never
        acknowledged by fsync, removed by the next mount anyway."""
        overlays = sorted(self.cache.dirty.iterdir()) if self.cache.dirty.exists() else []
        holds = sorted(self.cache.holds.iterdir()) if self.cache.holds.exists() else []
        if overlays:
            self.found(f"{len(overlays)} dirty overlays of a mount that died (unsealed "
                       "writes, never acknowledged by fsync)")  # fmt: skip
        if holds:
            self.found(f"{len(holds)} block holds of a mount that died")
        if self.repair:
            for p in (*overlays, *holds):
                p.unlink(missing_ok=True)

    # --- the store's lease ------------------------------------------------------------

    async def check_lease(self) -> None:
        """No mount lease is left by a mount that died (SQLite metadata: one machine)."""
        from cloudfs.lease import LEASE_KEY, read_lease, stale_after

        holder = await read_lease(self.store.raw)
        if holder is None:
            return
        own = holder.hostname == socket.gethostname() and holder.cachedir == str(self.cache.root)
        stale = time.time() - holder.renewed_at > stale_after()
        if own or stale:
            why = "this cache dir's mount, which died" if own else "a mount gone for long"
            self.found(f"the store's mount lease is held by {why}: {holder.describe()}")
            if self.repair:
                await self.store.raw.delete_many([LEASE_KEY])
        else:
            self.found(f"the filesystem may be mounted elsewhere: {holder.describe()}",
                       fixed=False)  # fmt: skip

    # --- the mounts and what they hold open ---------------------------------------------

    async def check_clients(self) -> None:
        """Mounts that died leave a `clients` row and holds on the files they had open
        (cloudfs.clients); the open-unlinked ones are freed by check_reachable once the
        holds are gone. Dead: on SQLite every mount (one machine, and fsck runs
        unmounted); in shared mode a mount whose heartbeat expired, or that ran on this
        host and whose process is gone. Holds of a live mount on another machine stay
        (a note)."""
        sqlite = self.meta.dialect is SQLITE
        async with self.meta.reading() as tx:
            rows = await clients.list_clients(tx)
            stray = await clients.stray_holds(tx)
            counts = await clients.hold_counts(tx)
        dead = [r for r in rows if sqlite or clients.is_dead(r, self.now)]
        for row in dead:
            # on SQLite every crash leaves one: no error (as the dirty overlays it left)
            self.found(f"{row.describe()} died, holding {counts.get(row.id, 0)} open files",
                       error=not sqlite)  # fmt: skip
        if stray:
            self.found(f"{len(stray)} holds of mounts that have no row")
        dead_ids = {r.id for r in dead}
        for row in rows:
            if row.id not in dead_ids:
                self.found(f"{row.describe()} is mounted", error=False)

        async def fix(tx: Txn) -> None:
            await clients.drop_dead(tx, lambda row: row.id in dead_ids)

        if dead or stray:
            await self._write(fix)

    # --- names ------------------------------------------------------------------------

    async def check_dentries(self) -> None:
        """Every dentry names an existing inode, in an existing directory; a directory
        has one name; `.cloudfs` in the root is the history view's."""
        async with self.meta.reading() as tx:
            dangling = await tx.conn.query(
                "SELECT d.id, d.parent, d.name, d.inode FROM dentries d"
                " LEFT JOIN inodes i ON i.id = d.inode WHERE i.id IS NULL"
            )
            orphaned = await tx.conn.query(
                "SELECT d.id, d.parent, d.name, d.inode FROM dentries d"
                " LEFT JOIN inodes p ON p.id = d.parent"
                f" WHERE p.id IS NULL OR (p.mode & 61440) <> {S_IFDIR}"
            )
            dir_links = await tx.conn.query(
                "SELECT d.id, d.parent, d.name, d.inode FROM dentries d"
                f" JOIN inodes i ON i.id = d.inode WHERE (i.mode & 61440) = {S_IFDIR}"
                " AND d.inode IN (SELECT inode FROM dentries GROUP BY inode HAVING COUNT(*) > 1)"
                " ORDER BY d.inode, d.id"
            )
            view = await tx.lookup(ROOT_INODE, VIEW_NAME)
        doomed: dict[int, str] = {}
        for did, parent, name, ino in dangling:
            doomed[did] = f"entry {bytes(name)!r} of directory {parent} names missing inode {ino}"
        for did, parent, name, ino in orphaned:
            doomed.setdefault(did, f"entry {bytes(name)!r} (inode {ino}) is in {parent}, "
                                   "which is no directory")  # fmt: skip
        first: set[int] = set()
        for did, parent, name, ino in dir_links:
            if ino not in first:
                first.add(ino)
                continue
            doomed.setdefault(did, f"directory {ino} has a second name {bytes(name)!r} in {parent}")
        for message in doomed.values():
            self.found(message)

        async def drop(tx: Txn) -> None:
            await tx.conn.executemany("DELETE FROM dentries WHERE id = ?", [(d,) for d in doomed])

        await self._write(drop)
        if view is not None:
            self.found(f"a real entry named .cloudfs in the root (inode {view}) is hidden by "
                       "the history view: moved to lost+found")  # fmt: skip

            async def move(tx: Txn) -> None:
                lost = await self._lost_found(tx)
                await tx.remove_dentry(ROOT_INODE, VIEW_NAME)
                await tx.add_dentry(lost, b".cloudfs-%d" % view, view)

            await self._write(move)

    async def check_dangling_rows(self) -> None:
        """Rows of other tables name existing inodes."""
        async with self.meta.reading() as tx:
            found = {}
            for table, col in (("extents", "inode"), ("versions", "inode"), ("xattrs", "inode"),
                               ("symlinks", "inode"), ("trash", "inode"), ("snapshots", "root")):  # fmt: skip
                rows = await tx.conn.query(
                    f"SELECT DISTINCT {col} FROM {table} WHERE {col} NOT IN (SELECT id FROM inodes)"
                )
                if rows:
                    found[(table, col)] = [r[0] for r in rows]
        for (table, col), inodes in found.items():
            self.found(f"{table}: rows of {len(inodes)} missing inodes ({inodes[:5]})")

        async def drop(tx: Txn) -> None:
            for (table, col), inodes in found.items():
                await tx.conn.executemany(
                    f"DELETE FROM {table} WHERE {col} = ?", [(i,) for i in inodes]
                )

        await self._write(drop)

    async def _lost_found(self, tx: Txn) -> int:
        ino = await tx.lookup(ROOT_INODE, LOST_FOUND)
        if ino is not None:
            return ino
        root = await tx.get_inode(ROOT_INODE)
        assert root is not None
        made = await tx.create_inode(
            mode=S_IFDIR | 0o700, uid=root.uid, gid=root.gid, nlink=2, now_ns=self.now
        )
        await tx.add_dentry(ROOT_INODE, LOST_FOUND, made.id)
        await tx.update_inode(ROOT_INODE, nlink=root.nlink + 1)
        return made.id

    async def _reachable(self, tx: Txn) -> set[int]:
        """Inodes reachable from the root, the named snapshots and the trash."""
        roots = [ROOT_INODE]
        roots += [r[0] for r in await tx.conn.query("SELECT root FROM snapshots")]
        roots += [r[0] for r in await tx.conn.query("SELECT inode FROM trash")]
        seen = set(roots)
        level = list(seen)
        while level:
            below = []
            for i in range(0, len(level), PAGE):
                part = level[i : i + PAGE]
                marks = ", ".join("?" * len(part))
                rows = await tx.conn.query(
                    f"SELECT inode FROM dentries WHERE parent IN ({marks})", part
                )
                for (child,) in rows:
                    if child not in seen:
                        seen.add(child)
                        below.append(child)
            level = below
        return seen

    async def check_reachable(self) -> None:
        """Every inode is reachable from the root, a named snapshot or the trash; a
        nameless one left by a crash (open-unlinked) is freed, others go to lost+found."""
        for _round in range(100):
            async with self.meta.reading() as tx:
                reachable = await self._reachable(tx)
                rows = await tx.conn.query("SELECT id, nlink, mode FROM inodes")
                named = {r[0] for r in await tx.conn.query("SELECT DISTINCT inode FROM dentries")}
                # open-unlinked on a live mount of shared mode: its last close frees it
                held = await clients.held_inodes(tx)
            lost = [(i, n, m) for i, n, m in rows if i not in reachable and i not in held]
            if not lost:
                return
            unlinked = [i for i, n, _m in lost if n == 0 and i not in named]
            tops = [i for i, n, _m in lost if i not in named and n != 0]
            if not tops and not unlinked:
                # a cycle of directories: cut one loose, it becomes a top
                cycle = next(i for i, _n, m in lost if stat.S_ISDIR(m))
                self.found(f"directory {cycle} is part of a cycle of directories")

                async def cut(tx: Txn, ino: int = cycle) -> None:
                    await tx.conn.execute("DELETE FROM dentries WHERE inode = ?", (ino,))

                await self._write(cut)
                if not self.repair:
                    return
                continue
            dirs = {i for i, _n, m in lost if stat.S_ISDIR(m)}
            for ino in unlinked:
                if ino in dirs:
                    # a removed directory is empty: one with entries is a copy
                    # (cloudfs.snapshots) that a crash interrupted before naming it
                    self.found(f"directory {ino} has no name: an unfinished copy; freed")
                else:
                    self.found(f"inode {ino} has no name: left open-unlinked by a crash; freed")
            for ino in tops:
                self.found(f"inode {ino} is not reachable from the root: put in /lost+found")

            async def fix(
                tx: Txn, unlinked: list[int] = unlinked, tops: list[int] = tops,
                dirs: set[int] = dirs,
            ) -> None:  # fmt: skip
                for ino in unlinked:
                    if ino in dirs:
                        await snapshots.free_tree(tx, ino, self.now)
                    else:
                        await tx.free_inode(ino, self.now)
                if tops:
                    lost_found = await self._lost_found(tx)
                    for ino in tops:
                        await tx.add_dentry(lost_found, b"%d" % ino, ino)

            await self._write(fix)
            if not self.repair:
                return

    async def check_nlink(self) -> None:
        """nlink equals the names of an inode (a directory: 2 + its subdirectories;
        a named snapshot's root counts the one name it lacks; the trash keeps 0)."""
        async with self.meta.reading() as tx:
            names = Counter(
                {r[0]: r[1] for r in await tx.conn.query(
                    "SELECT inode, COUNT(*) FROM dentries GROUP BY inode")}
            )  # fmt: skip
            subdirs = Counter(
                {r[0]: r[1] for r in await tx.conn.query(
                    "SELECT d.parent, COUNT(*) FROM dentries d JOIN inodes i ON i.id = d.inode"
                    f" WHERE (i.mode & 61440) = {S_IFDIR} GROUP BY d.parent")}
            )  # fmt: skip
            snap_roots = {r[0] for r in await tx.conn.query("SELECT root FROM snapshots")}
            rows = await tx.conn.query("SELECT id, nlink, mode FROM inodes")
        wrong: list[tuple[int, int]] = []
        for ino, nlink, mode in rows:
            has_name = names[ino] > 0 or ino == ROOT_INODE or ino in snap_roots
            if stat.S_ISDIR(mode):
                expected = 2 + subdirs[ino] if has_name else 0
            else:
                expected = names[ino] + (1 if ino in snap_roots else 0)
            if nlink != expected:
                self.found(f"inode {ino}: nlink {nlink}, should be {expected}")
                wrong.append((expected, ino))

        async def fix(tx: Txn) -> None:
            await tx.conn.executemany("UPDATE inodes SET nlink = ? WHERE id = ?", wrong)

        await self._write(fix)

    # --- contents -----------------------------------------------------------------------

    async def check_extents(self) -> None:
        """A file's live extents tile [0, size) without overlap, every extent row has
        v_from < v_to and a positive length, and only regular files have extents."""
        async with self.meta.reading() as tx:
            bad_rows = await tx.conn.query(
                "SELECT inode, v_to, file_offset FROM extents WHERE v_from >= v_to OR length <= 0"
            )
            not_files = await tx.conn.query(
                "SELECT DISTINCT e.inode FROM extents e JOIN inodes i ON i.id = e.inode"
                " WHERE (i.mode & 61440) <> 32768"
            )
        drop: list[tuple[int, int, int]] = [(r[0], r[1], r[2]) for r in bad_rows]
        dropped = set(drop)
        trim: list[tuple[int, int, int, int]] = []  # (length, inode, v_to, offset)
        for ino, v_to, offset in bad_rows:
            self.found(f"inode {ino}: extent at {offset} (v_to {v_to}) is empty or has no versions")
        for (ino,) in not_files:
            self.found(f"inode {ino} is no regular file but has extents")

        after = 0
        while True:
            async with self.meta.reading() as tx:
                inodes = await tx.conn.query(
                    "SELECT DISTINCT e.inode FROM extents e WHERE e.v_to = ? AND e.inode > ?"
                    " ORDER BY e.inode LIMIT ?",
                    (LIVE, after, PAGE),
                )
                if not inodes:
                    break
                ids = [r[0] for r in inodes]
                marks = ", ".join("?" * len(ids))
                rows = await tx.conn.query(
                    "SELECT e.inode, e.file_offset, e.length, i.size FROM extents e"
                    f" JOIN inodes i ON i.id = e.inode WHERE e.v_to = ? AND e.inode IN ({marks})"
                    " ORDER BY e.inode, e.file_offset",
                    (LIVE, *ids),
                )
            after = ids[-1]
            end_of: dict[int, int] = {}
            for ino, offset, length, size in rows:
                if (ino, LIVE, offset) in dropped:
                    continue
                prev_end = end_of.get(ino, 0)
                if offset < prev_end:
                    self.found(f"inode {ino}: extent at {offset} overlaps the one before")
                    drop.append((ino, LIVE, offset))
                    continue
                if offset >= size:
                    self.found(f"inode {ino}: extent at {offset} lies past the end ({size})")
                    drop.append((ino, LIVE, offset))
                    continue
                if offset + length > size:
                    self.found(f"inode {ino}: extent at {offset} runs past the end ({size})")
                    trim.append((size - offset, ino, LIVE, offset))
                end_of[ino] = offset + length
        not_file_ids = [r[0] for r in not_files]

        async def fix(tx: Txn) -> None:
            await tx.conn.executemany(
                "DELETE FROM extents WHERE inode = ? AND v_to = ? AND file_offset = ?", drop
            )
            await tx.conn.executemany(
                "UPDATE extents SET length = ? WHERE inode = ? AND v_to = ? AND file_offset = ?",
                trim,
            )
            await tx.conn.executemany(
                "DELETE FROM extents WHERE inode = ?", [(i,) for i in not_file_ids]
            )

        await self._write(fix)  # refcounts are recounted later

    async def check_allocated(self) -> None:
        """`inodes.allocated` of a regular file is the total of its live extents
        (st_blocks reads it): wrong ones are set to that total."""
        wrong: list[tuple[int, int]] = []  # (allocated, inode)
        after = 0
        while True:
            async with self.meta.reading() as tx:
                rows = await tx.conn.query(
                    "SELECT id, allocated FROM inodes WHERE id > ? AND (mode & 61440 = 32768"
                    " OR allocated <> 0) ORDER BY id LIMIT ?",
                    (after, PAGE),
                )
                if not rows:
                    break
                totals = await tx.count_allocated([r[0] for r in rows])
            after = rows[-1][0]
            for ino, allocated in rows:
                expected = totals.get(ino, 0)
                if allocated != expected:
                    self.found(f"inode {ino}: allocated size {allocated}, its extents hold {expected}")
                    wrong.append((expected, ino))

        async def fix(tx: Txn) -> None:
            await tx.conn.executemany("UPDATE inodes SET allocated = ? WHERE id = ?", wrong)

        if wrong:
            await self._write(fix)

    # --- blocks -------------------------------------------------------------------------

    async def list_store(self) -> None:
        """List every block object once (ids and sizes)."""
        prefix = "blocks/"
        async for info in self.store.raw.list_all(prefix):
            name = info.key.rsplit("/", 1)[-1]
            try:
                block_id = bytes.fromhex(name)
            except ValueError:
                block_id = b""
            if len(block_id) == 32 and info.key == block_key(block_id):
                self.store.listing[block_id] = info.size
            else:
                self.store.strays.append(info.key)

    def _cached_plaintext(self, block_id: bytes, size: int) -> bool:
        """Is the block's plaintext in the cache dir (checked against its id when the
        keys are known, else by its size)?"""
        path = self.cache.block_path(block_id)
        try:
            if self.id_key is None:
                return path.stat().st_size == size
            data = path.read_bytes()
        except FileNotFoundError:
            return False
        return len(data) == size and hmac.compare_digest(
            _native.block_id(self.id_key, data), block_id
        )

    async def _users(self, tx: Txn, block_id: bytes) -> list[str]:
        """The files and versions that use a block, for the report."""
        from cloudfs.trash import path_of

        rows = await tx.conn.query(
            "SELECT inode, v_from, v_to FROM extents WHERE block = ? ORDER BY inode, v_from",
            (block_id,),
        )
        by_inode: dict[int, list[str]] = defaultdict(list)
        for ino, v_from, v_to in rows:
            by_inode[ino].append("live" if v_to == LIVE else f"{v_from}-{v_to - 1}")
        out = []
        for ino, versions in by_inode.items():
            where = await tx.conn.query_one(
                "SELECT parent, name FROM dentries WHERE inode = ? LIMIT 1", (ino,)
            )
            if where is not None:
                path = (await path_of(tx, where[0], bytes(where[1]))).decode(errors="replace")
            else:
                trashed = await tx.conn.query_one(
                    "SELECT path FROM trash WHERE inode = ? LIMIT 1", (ino,)
                )
                path = (
                    f"(trash) {bytes(trashed[0]).decode(errors='replace')}"
                    if trashed else f"inode {ino}"
                )  # fmt: skip
            out.append(f"{path} (inode {ino}, versions {', '.join(versions)})")
        return out

    async def _lose(self, block_ids: list[bytes], why: str) -> None:
        """Blocks gone for good: report their users; repairing drops their extent rows
        (those bytes read as zeros) and their rows."""
        for block_id in block_ids:
            async with self.meta.reading() as tx:
                users = await self._users(tx, block_id)
            self.found(
                f"DATA LOST: block {block_id.hex()} {why}; used by "
                + ("; ".join(users) if users else "nothing")
            )

        async def drop(tx: Txn) -> None:
            # the files' allocated sizes lose the live bytes that become holes
            await tx.conn.executemany(
                "UPDATE inodes SET allocated = allocated - (SELECT COALESCE(SUM(e.length), 0)"
                " FROM extents e WHERE e.inode = inodes.id AND e.v_to = ? AND e.block = ?)"
                " WHERE id IN (SELECT inode FROM extents WHERE block = ? AND v_to = ?)",
                [(LIVE, b, b, LIVE) for b in block_ids],
            )
            await tx.conn.executemany(
                "DELETE FROM extents WHERE block = ?", [(b,) for b in block_ids]
            )
            await tx.conn.executemany("DELETE FROM blocks WHERE id = ?", [(b,) for b in block_ids])

        await self._write(drop)

    async def check_block_rows(self) -> None:
        """A block `stored` has its object; one `pending` has its plaintext here (or
        was stored and not marked); rows a garbage collection pass left claimed are
        finished."""
        await self.list_store()
        listing = self.store.listing
        after = b""
        lost: list[bytes] = []
        # shared mode: a pending block may be in the cache dir of the machine that wrote
        # it (down, or not uploaded yet): never lost from here
        elsewhere: list[bytes] = []
        shared = self.meta.dialect.name == "mysql"
        while True:
            async with self.meta.reading() as tx:
                rows = await tx.conn.query(
                    "SELECT id, state, size FROM blocks WHERE id > ? ORDER BY id LIMIT ?",
                    (after, PAGE),
                )
                if not rows:
                    break
                page = _ids(rows)
                marks = ", ".join("?" * len(page))
                used = set(_ids(await tx.conn.query(
                    f"SELECT DISTINCT block FROM extents WHERE block IN ({marks})", page)))  # fmt: skip
            after = page[-1]
            to_pending: list[bytes] = []
            to_stored: list[tuple[int, bytes]] = []
            gone: list[bytes] = []
            for raw_id, state, size in rows:
                block_id = bytes(raw_id)
                short = block_id.hex()
                in_store = block_id in listing
                cached = self._cached_plaintext(block_id, size)
                if state in (BLOCK_DELETING, BLOCK_REVIVED):
                    self.found(f"block {short} was left claimed by a garbage collection pass "
                               "that stopped")  # fmt: skip
                if block_id not in used and state != BLOCK_STORED:
                    if state == BLOCK_PENDING and cached:
                        continue  # written, not referenced yet or any more: gc's business
                    self.found(f"unreferenced block {short} ({'in the store' if in_store else 'no object'}"
                               f", {'plaintext cached' if cached else 'no plaintext'}): removed")  # fmt: skip
                    gone.append(block_id)
                elif state == BLOCK_PENDING and in_store:
                    # PUT done, marking it lost in a crash: a note, the state is sound
                    self.found(f"block {short} is in the store but marked pending", error=False)
                    to_stored.append((listing[block_id], block_id))
                elif state == BLOCK_STORED and in_store or state == BLOCK_PENDING and cached:
                    continue
                elif cached:
                    if state == BLOCK_STORED:
                        self.found(f"block {short} is stored but its object is missing: it is "
                                   "uploaded again from the cache dir")  # fmt: skip
                    to_pending.append(block_id)
                elif in_store:  # deleting or revived, the object still there
                    to_stored.append((listing[block_id], block_id))
                elif block_id in used and state == BLOCK_PENDING and shared:
                    elsewhere.append(block_id)
                elif block_id in used:
                    lost.append(block_id)
                else:
                    self.found(f"unreferenced block {short}: object missing; row removed")
                    gone.append(block_id)

            async def fix(tx: Txn, to_pending: list[bytes] = to_pending,
                          to_stored: list[tuple[int, bytes]] = to_stored,
                          gone: list[bytes] = gone) -> None:  # fmt: skip
                await tx.conn.executemany(
                    "UPDATE blocks SET state = ?, stored_size = NULL WHERE id = ?",
                    [(BLOCK_PENDING, b) for b in to_pending],
                )
                await tx.conn.executemany(
                    "UPDATE blocks SET state = ?, stored_size = ? WHERE id = ?",
                    [(BLOCK_STORED, n, b) for n, b in to_stored],
                )
                await tx.conn.executemany("DELETE FROM blocks WHERE id = ?", [(b,) for b in gone])
                for b in gone:
                    self.cache.remove_block(b)

            await self._write(fix)
            if self.repair and gone:
                await self.store.raw.delete_many([block_key(b) for b in gone if b in listing])
                for b in gone:
                    listing.pop(b, None)
        if lost:
            await self._lose(lost, "is neither in the store nor in the cache dir")
        if elsewhere:
            await self._pending_elsewhere(elsewhere)

    async def _pending_elsewhere(self, block_ids: list[bytes]) -> None:
        """Shared mode: pending blocks whose plaintext is not in this cache dir are in
        the cache dir of the mount that wrote them. Nothing to repair from here: their
        files read as I/O errors until that machine's mount, daemon or fsck uploads
        them; a machine that never comes back means they are lost (`--repair` on that
        machine's cache dir, or restoring the files from their history)."""
        async with self.meta.reading() as tx:
            mounts = await clients.list_clients(tx)
            users = [u for b in block_ids[:5] for u in await self._users(tx, b)]
        size = len(block_ids)
        where = "; ".join(m.describe() for m in mounts) or "no mount is registered"
        self.found(
            f"{size} blocks wait for upload from another machine's cache dir (not in this "
            f"one, not in the store): files using them read as I/O errors until that "
            f"machine's mount, cloudfsd or fsck.cloudfs uploads them. Used by "
            + "; ".join(users[:5]) + ("; ..." if size > 5 else "")
            + f". Mounts known now: {where}",
            fixed=False,
        )

    async def check_unknown_blocks(self) -> None:
        """Every block an extent names has a row."""
        async with self.meta.reading() as tx:
            rows = await tx.conn.query(
                "SELECT e.block, MAX(e.length) FROM extents e LEFT JOIN blocks b ON b.id = e.block"
                " WHERE b.id IS NULL GROUP BY e.block"
            )
        lost = []
        fixes: list[tuple[bytes, int, int | None, int]] = []
        for raw_id, length in rows:
            block_id = bytes(raw_id)
            path = self.cache.block_path(block_id)
            if block_id in self.store.listing:
                self.found(f"block {block_id.hex()} has no row; its object is in the store")
                fixes.append((block_id, int(length), self.store.listing[block_id], BLOCK_STORED))
            elif path.exists() and self._cached_plaintext(block_id, path.stat().st_size):
                self.found(f"block {block_id.hex()} has no row; its plaintext is in the cache")
                fixes.append((block_id, path.stat().st_size, None, BLOCK_PENDING))
            else:
                lost.append(block_id)

        async def fix(tx: Txn) -> None:
            await tx.conn.executemany(
                "INSERT INTO blocks (id, size, stored_size, refcount, state, created_ns, unref_ns)"
                " VALUES (?, ?, ?, 0, ?, ?, NULL)",
                [(b, size, stored, state, self.now) for b, size, stored, state in fixes],
            )

        await self._write(fix)  # the refcounts are counted next
        if lost:
            await self._lose(lost, "has no row and is neither in the store nor in the cache dir")

    async def check_refcounts(self) -> None:
        """blocks.refcount equals the extent rows (all versions) naming the block."""
        async with self.meta.reading() as tx:
            rows = await tx.conn.query(
                "SELECT b.id, b.refcount, COUNT(e.block) FROM blocks b"
                " LEFT JOIN extents e ON e.block = b.id GROUP BY b.id, b.refcount"
                " HAVING b.refcount <> COUNT(e.block)"
            )
        wrong = [(bytes(i), int(have), int(want)) for i, have, want in rows]
        for block_id, have, want in wrong:
            self.found(f"block {block_id.hex()}: refcount {have}, {want} extent rows name it")

        async def fix(tx: Txn) -> None:
            await tx.conn.executemany(
                "UPDATE blocks SET refcount = ?,"
                " unref_ns = CASE WHEN ? = 0 THEN ? ELSE unref_ns END WHERE id = ?",
                [(want, want, self.now, b) for b, _have, want in wrong],
            )

        await self._write(fix)

    async def check_orphan_objects(self) -> None:
        """No object without its row. An orphan is deleted once it has been seen for
        the grace period: until then it is a note, not an error, since a writer may be
        about to commit its row (--upload=sync stores blocks before their commit, and a
        machine that crashed in between leaves such objects, which nothing names);
        objects under blocks/ that name no block go at once."""
        async with self.meta.reading() as tx:
            known: set[bytes] = set()
            ids = list(self.store.listing)
            for i in range(0, len(ids), PAGE):
                part = ids[i : i + PAGE]
                marks = ", ".join("?" * len(part))
                known.update(_ids(await tx.conn.query(
                    f"SELECT id FROM blocks WHERE id IN ({marks})", part)))  # fmt: skip
            seen_before = json.loads(await tx.get_info(ORPHANS_KEY) or "{}")
        orphans = [b for b in ids if b not in known]
        seen: dict[str, int] = {}
        delete: list[str] = list(self.store.strays)
        for key in self.store.strays:
            self.found(f"object {key} is no block of this filesystem")
        for block_id in orphans:
            first = int(seen_before.get(block_id.hex(), self.now))
            seen[block_id.hex()] = first
            due = (self.now - first) / 1e9 >= self.orphan_grace_s
            if due:
                self.found(f"object of block {block_id.hex()} has no row")
                delete.append(block_key(block_id))
            else:
                self.found(f"object of block {block_id.hex()} has no row (deleted by a repair "
                           f"{self.orphan_grace_s:.0f} s after it was first seen)",
                           fixed=False, error=False)  # fmt: skip
        if self.repair:
            for i in range(0, len(delete), PAGE):
                await self.store.raw.delete_many(delete[i : i + PAGE])
            for block_id in orphans:
                if block_key(block_id) in delete:
                    seen.pop(block_id.hex(), None)
                    self.store.listing.pop(block_id, None)

        async def remember(tx: Txn) -> None:
            await tx.set_info(ORPHANS_KEY, json.dumps(seen))

        if seen or seen_before:
            await self._write(remember)

    async def check_pending_uploads(self) -> None:
        """Pending blocks whose plaintext is here are uploads a mount or daemon left
        unfinished (a crash): repairing uploads them (with the filesystem's keys)."""
        async with self.meta.reading() as tx:
            count, size = await tx.pending_summary()
        if not count:
            return
        if not self.repair or self.store.sealed is None:
            why = "" if not self.repair else " (no passphrase: the next mount uploads them)"
            self.found(f"{count} blocks ({size} bytes) wait for upload{why}", fixed=False)
            return
        uploaded = 0
        after: object = None
        while True:
            async with self.meta.reading() as tx:
                rows, after = await tx.pending_page(PAGE, after)
            for block_id, bsize in rows:
                try:
                    data = self.cache.block_path(block_id).read_bytes()
                except FileNotFoundError:
                    # another machine's (shared mode): check_block_rows reported it
                    count -= 1
                    continue
                if len(data) != bsize:
                    raise CorruptBlock(
                        f"block {block_id.hex()}: cached plaintext has the wrong size"
                    )
                stored = await self.store.sealed.put_block(block_id, data)
                async with self.meta.transaction() as tx:
                    await tx.mark_stored(block_id, stored)
                uploaded += 1
                if self.progress is not None:
                    self.progress("upload", uploaded, count)
            if after is None:
                break
        if count:
            self.found(f"{count} blocks waited for upload: uploaded")

    # --- the data ------------------------------------------------------------------------

    async def check_data(self) -> None:
        """Every stored block downloads and opens (tag and id verified). A damaged one
        is uploaded again from the cache dir when its plaintext is there; else its
        data is lost (see the module docstring)."""
        sealed = self.store.sealed
        if sealed is None:
            self.found("--check-data needs the filesystem's keys", fixed=False)
            return
        async with self.meta.reading() as tx:
            row = await tx.conn.query_one("SELECT COUNT(*) FROM blocks WHERE state = ?",
                                          (BLOCK_STORED,))  # fmt: skip
        total = int(row[0]) if row else 0
        checked = 0
        damaged: list[tuple[bytes, int, str]] = []
        limit = trio.Semaphore(SCRUB_PARALLEL)

        async def verify(block_id: bytes, size: int) -> None:
            nonlocal checked
            async with limit:
                try:
                    await sealed.get_block(block_id)
                except (CorruptBlock, ObjectNotFound) as exc:
                    damaged.append((block_id, size, exc.message))
                checked += 1
                if self.progress is not None:
                    self.progress("check data", checked, total)

        after = b""
        while True:
            async with self.meta.reading() as tx:
                rows = await tx.conn.query(
                    "SELECT id, size FROM blocks WHERE state = ? AND id > ? ORDER BY id LIMIT ?",
                    (BLOCK_STORED, after, 256),
                )
            if not rows:
                break
            after = bytes(rows[-1][0])
            async with trio.open_nursery() as nursery:
                for raw_id, size in rows:
                    nursery.start_soon(verify, bytes(raw_id), int(size))
        lost = []
        for block_id, size, why in damaged:
            if self._cached_plaintext(block_id, size):
                async with self.meta.reading() as tx:
                    users = await self._users(tx, block_id)
                self.found(f"block {block_id.hex()} is damaged in the store ({why}): "
                           f"uploaded again from the cache dir; used by {'; '.join(users)}")  # fmt: skip
                if self.repair:
                    await sealed.put_block(block_id, self.cache.block_path(block_id).read_bytes())
            else:
                lost.append(block_id)
        if lost:
            await self._lose(lost, "is damaged in the store and not in the cache dir")
        self.found(f"checked {checked} stored blocks, {len(damaged)} damaged", error=False)


__all__ = ["Checker", "Finding", "Store"]
