"""Garbage collection: deleting the objects of blocks nothing references any more.

A block's refcount reaches 0 when the last extent row naming it goes (a file freed,
a version pruned); `unref_ns` records when. After a grace period a pass deletes it,
in batches, in three steps:

1. claim (one transaction): rows `stored` with refcount 0 since before the grace
   period become `deleting` (unref_ns: the claim's time);
2. delete their objects from the store; any error ends the pass (the rows stay
   `deleting`, and the next pass resumes them);
3. (one transaction) delete the rows still `deleting`, and their files in the local
   cache dir, inside that transaction; rows a seal revived meanwhile (`revived`)
   become `pending` again, so the uploader stores them anew.

The race with a seal that re-uses such a block (dedup) is settled in the metadata: a
seal's transaction that names a `deleting` block revives it (`revived`) and checks,
inside the transaction, that the block's plaintext is in its cache dir
(FileStore._commit); the uploader ignores `revived` rows until step 3 has deleted
the old object, so the new upload cannot be deleted by this pass. A seal that names
a block whose row step 3 deleted makes a new `pending` row, again with its plaintext
checked inside its transaction, which step 3's removal of cache files cannot cross.

A seal of a mount with --upload=sync puts its new blocks before the commit that names
them (cloudfs.files), when they have no row or a `pending` one, and never commits a
reference to a claimed block: it waits until the pass is done with it (the row gone
or `pending` again), finishing itself, through its daemon, what a pass that stopped
halfway left claimed (`collect(resume_only=True)`), and then puts it. Step 3 counts its
batches in `meta_info` (`gc_epoch`, bumped first in its transaction): the seal reads
it before its PUTs and its commit again, and if a batch finished in between, the PUT
may have come before a deletion of the same object (a row made, unreferenced, claimed
and deleted meanwhile), so the commit trusts none of its PUTs: it is rolled back, and
the seal puts its blocks and commits again. An object put for a commit that never came
(a crash) has no row: passes never touch it; fsck deletes it after its orphan grace.

Only one pass runs at a time per filesystem (a lease in meta_info, renewed per
batch): a pass resumes `deleting` rows only when no other pass may be working on
them.

Files of the cache dir: whoever deletes a cached block file because its row says
`stored` (drop_cache, eviction) must do so inside a write transaction that sees that
row `stored` (`remove_stored_block_files`): a row read as stored before a pass claims
it may be revived, and then its plaintext is needed again.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from cloudfs.cache import CacheDir
from cloudfs.codec.framing import block_key
from cloudfs.errors import CloudfsError
from cloudfs.meta.base import MetaStore, Txn
from cloudfs.meta.schema import BLOCK_DELETING, BLOCK_PENDING, BLOCK_REVIVED, BLOCK_STORED
from cloudfs.objectstore.base import ObjectStore

log = logging.getLogger(__name__)

#: default time a block stays unreferenced before it is deleted
GRACE_S = 3600.0
#: blocks per batch (one claim, one multi-delete, one commit)
BATCH = 1000
#: how long a pass's lease lasts without renewal
LEASE_S = 600.0
LEASE_KEY = "gc_lease"
#: step 3's batches so far (see the module docstring)
EPOCH_KEY = "gc_epoch"
#: the states of rows a pass has claimed: their objects may be deleted yet
CLAIMED = (BLOCK_DELETING, BLOCK_REVIVED)


async def epoch(tx: Txn) -> int:
    """How many step-3 batches have finished (ever)."""
    return int(await tx.get_info(EPOCH_KEY) or 0)


@dataclass
class GcReport:
    """What a pass did (or, dry, would do)."""

    blocks: int = 0
    stored_bytes: int = 0  # object bytes freed in the store
    plain_bytes: int = 0  # plaintext bytes of those blocks
    revived: int = 0  # claimed, then referenced again: stored anew
    cache_files: int = 0  # files removed from the local cache dir
    skipped: str | None = None  # why the pass did not run
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "blocks": self.blocks, "stored_bytes": self.stored_bytes,
            "plain_bytes": self.plain_bytes, "revived": self.revived,
            "cache_files": self.cache_files, "skipped": self.skipped, "errors": self.errors,
        }  # fmt: skip


def _owner(role: str = "") -> str:
    return f"{socket.gethostname()}:{os.getpid()}{role}"


async def _take_lease(meta: MetaStore, owner: str) -> bool:
    async with meta.transaction() as tx:
        now = time.time_ns()
        text = await tx.get_info(LEASE_KEY)
        if text:
            lease = json.loads(text)
            if lease.get("owner") != owner and int(lease.get("until_ns", 0)) > now:
                return False
        until = now + int(LEASE_S * 1e9)
        await tx.set_info(LEASE_KEY, json.dumps({"owner": owner, "until_ns": until}))
        return True


async def _drop_lease(meta: MetaStore, owner: str) -> None:
    async with meta.transaction() as tx:
        text = await tx.get_info(LEASE_KEY)
        if text and json.loads(text).get("owner") == owner:
            await tx.set_info(LEASE_KEY, json.dumps({"owner": None, "until_ns": 0}))


async def claimed(tx: Txn, ids: list[bytes]) -> list[bytes]:
    """Those of `ids` whose rows a pass has claimed (`deleting` or `revived`): their
    objects may be deleted yet."""
    states = await tx.block_states(ids)
    return [b for b in ids if states.get(b) in CLAIMED]


async def collectable(meta: MetaStore, now_ns: int, grace_s: float = GRACE_S) -> GcReport:
    """What a pass at `now_ns` would delete (a dry run): nothing changes."""
    cutoff = now_ns - int(grace_s * 1e9)
    async with meta.reading() as tx:
        row = await tx.conn.query_one(
            "SELECT COUNT(*), COALESCE(SUM(stored_size), 0), COALESCE(SUM(size), 0) FROM blocks"
            " WHERE refcount = 0 AND ((state = ? AND unref_ns < ?) OR state = ?)",
            (BLOCK_STORED, cutoff, BLOCK_DELETING),
        )
    assert row is not None
    return GcReport(blocks=int(row[0]), stored_bytes=int(row[1]), plain_bytes=int(row[2]))


async def _claim(
    tx: Txn, cutoff: int, now_ns: int, batch: int, *, new: bool = True
) -> list[tuple[bytes, int, int]]:
    """Step 1: the rows this batch deletes: (id, stored_size, size). Rows left
    `deleting` or `revived` by an interrupted pass come first; `new`: then claim more."""
    rows = await tx.conn.query(
        "SELECT id, COALESCE(stored_size, 0), size FROM blocks WHERE state IN (?, ?)"
        " ORDER BY id LIMIT ?",
        (BLOCK_DELETING, BLOCK_REVIVED, batch),
    )
    if not rows and new:
        rows = await tx.conn.query(
            "SELECT id, COALESCE(stored_size, 0), size FROM blocks"
            " WHERE state = ? AND refcount = 0 AND unref_ns < ? ORDER BY id LIMIT ?",
            (BLOCK_STORED, cutoff, batch),
        )
        await tx.conn.executemany(
            "UPDATE blocks SET state = ?, unref_ns = ? WHERE id = ? AND state = ? AND refcount = 0",
            [(BLOCK_DELETING, now_ns, bytes(r[0]), BLOCK_STORED) for r in rows],
        )
    return [(bytes(i), int(s), int(n)) for i, s, n in rows]


async def _finish(
    tx: Txn, ids: list[bytes], cache: CacheDir | None, report: GcReport
) -> list[bytes]:
    """Step 3: delete the rows still `deleting` (and their cache files, inside this
    transaction); `revived` ones become `pending`. Returns the ids deleted."""
    # first: a seal's commit reads it before it touches block rows, the same order
    await tx.set_info(EPOCH_KEY, str(await epoch(tx) + 1))
    states = await tx.block_states(ids)
    gone = sorted(i for i, s in states.items() if s == BLOCK_DELETING)
    revived = sorted(i for i, s in states.items() if s == BLOCK_REVIVED)
    await tx.conn.executemany(
        "DELETE FROM blocks WHERE id = ? AND state = ? AND refcount = 0",
        [(i, BLOCK_DELETING) for i in gone],
    )
    await tx.conn.executemany(
        "UPDATE blocks SET state = ?, stored_size = NULL WHERE id = ? AND state = ?",
        [(BLOCK_PENDING, i, BLOCK_REVIVED) for i in revived],
    )
    report.revived += len(revived)
    if cache is not None:
        for block_id in gone:
            if cache.remove_block(block_id):
                report.cache_files += 1
    return gone


async def collect(
    meta: MetaStore,
    store: ObjectStore,
    cache: CacheDir | None,
    *,
    now_ns: int | None = None,
    grace_s: float = GRACE_S,
    batch: int = BATCH,
    max_batches: int | None = None,
    progress: Callable[[int], None] | None = None,
    resume_only: bool = False,
) -> GcReport:
    """Run one pass (see the module docstring); `now_ns` is the clock (tests move it).
    `store` is the raw object store of the filesystem (no keys are needed to delete).
    `progress(blocks)` hears of the blocks deleted so far after each batch.
    `resume_only`: only finish the rows an interrupted pass left claimed (what a
    --upload=sync seal waiting for such a row asks its daemon for); skipped while
    another pass runs, even one of this process (the lease names the role)."""
    now = time.time_ns() if now_ns is None else now_ns
    cutoff = now - int(grace_s * 1e9)
    report = GcReport()
    owner = _owner(":resume" if resume_only else "")
    if not await meta.run(_take_lease, meta, owner):
        report.skipped = "another garbage collection is running"
        return report
    try:
        done = 0
        while max_batches is None or done < max_batches:
            done += 1

            async def claim() -> list[tuple[bytes, int, int]]:
                async with meta.transaction() as tx:
                    return await _claim(tx, cutoff, now, batch, new=not resume_only)

            claimed = await meta.run(claim)
            if not claimed:
                break
            ids = [i for i, _s, _n in claimed]
            try:
                await store.delete_many([block_key(i) for i in ids])
            except Exception as exc:  # noqa: BLE001 - the pass ends; the rows stay claimed
                report.errors.append(f"deleting {len(ids)} objects failed: {exc}")
                log.warning("garbage collection stopped: %s", report.errors[-1])
                break

            async def finish(ids: list[bytes] = ids) -> list[bytes]:
                async with meta.transaction() as tx:
                    return await _finish(tx, ids, cache, report)

            gone = set(await meta.run(finish))
            for block_id, stored_size, size in claimed:
                if block_id in gone:
                    report.blocks += 1
                    report.stored_bytes += stored_size
                    report.plain_bytes += size
            if progress is not None:
                progress(report.blocks)
            if not await meta.run(_take_lease, meta, owner):
                report.errors.append("lost the garbage collection lease")
                break
            await trio.lowlevel.checkpoint()
    except CloudfsError as exc:  # the metadata failed: the pass ends, resumable
        report.errors.append(exc.message)
        log.warning("garbage collection stopped: %s", report.errors[-1])
    finally:
        with trio.CancelScope(shield=True):
            try:
                await _drop_lease(meta, owner)
            except Exception:  # noqa: BLE001 - it expires by itself
                log.warning("could not release the garbage collection lease")
    if report.blocks:
        log.info("garbage collection: deleted %d blocks (%d bytes stored)",
                 report.blocks, report.stored_bytes)  # fmt: skip
    return report


async def remove_stored_block_files(
    meta: MetaStore, cache: CacheDir, block_ids: list[bytes]
) -> list[int]:
    """Delete the cached files of those of `block_ids` whose row is `stored`, inside a
    write transaction that sees them stored (module docstring). Returns the bytes each
    freed (0 when not deleted), in order."""
    freed = [0] * len(block_ids)

    async def run() -> None:
        async with meta.transaction() as tx:
            states = await tx.block_states(block_ids)
            for n, block_id in enumerate(block_ids):
                if states.get(block_id) == BLOCK_STORED:
                    freed[n] = cache.remove_block(block_id)

    await meta.run(run)
    return freed
