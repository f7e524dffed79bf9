"""The uploader: moves pending blocks from the cache dir to the object store.

The metadata store is the queue: a block row in state `pending` names plaintext in
cache/blocks that is not stored yet. The uploader scans those rows (on a kick from the
mount, and every `scan_interval` seconds), reads each block's plaintext, checks it
against its id, seals it (zstd + AES-GCM, in worker threads) and PUTs it with
`uploads` PUTs in flight, then marks it `stored`. Nothing else is remembered, so after
a crash or kill -9 the next daemon simply finds the same pending rows again (a block
whose PUT finished but whose mark did not is PUT once more: puts are idempotent).

Invariants:
- a block id is in `_in_flight` from the moment the scanner queues it until its row
  is marked stored or its attempt failed, and the scanner never queues an id that is
  in `_in_flight`: no block is uploaded twice at the same time;
- the queue between scanner and workers is a bounded memory channel, so at most
  `uploads` plaintexts (plus as many sealed bodies) are in memory, however much is
  pending;
- a block that cannot be uploaded (plaintext missing or damaged, store refusing) is
  kept in `failures`, reported by `status`, and tried again with exponential backoff:
  it is never dropped.

`store_now` is the other way in (--upload=sync, the control socket's `store`): the
mount names cached blocks that no row may name yet, and they are read, checked, sealed
and PUT by the same code at once, the reply waiting for all of them. The mount's commit
then records them `stored`: the object exists before any row names it, and a crash in
between leaves only an object without a row (fsck deletes it after its orphan grace
period; garbage collection never looks at objects without rows).
"""

from __future__ import annotations

import functools
import hmac
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from cloudfs import _native
from cloudfs.cache import CacheDir
from cloudfs.codec.crypto import Keys
from cloudfs.errors import CloudfsError, LeaseLost, StoreError
from cloudfs.meta.base import MetaStore
from cloudfs.meta.schema import BLOCK_PENDING, BLOCK_STORED
from cloudfs.objectstore.sealed import SealedStore

log = logging.getLogger(__name__)

#: rows read per metadata query while scanning
SCAN_PAGE = 512
#: most blocks marked stored in one metadata transaction
COMMIT_BATCH = 512
#: backoff of a failing block: 1 s, 2 s, 4 s ... at most this
MAX_RETRY_DELAY_S = 60.0
#: how many failures `status` lists (the count is always complete)
STATUS_ERRORS = 50


class BlockUnreadable(CloudfsError):
    """a pending block's plaintext is missing or damaged in the cache dir"""


@dataclass
class Failure:
    """The last failed upload attempt of one block."""

    error: str
    kind: str
    attempts: int
    last_wall: float  # time.time() of the last attempt, for people
    last_attempt: float  # trio clock of the last attempt
    retry_at: float  # trio clock: not tried again before this

    def to_json(self, block_id: bytes) -> dict[str, Any]:
        return {"block": block_id.hex(), "error": self.error, "kind": self.kind,
                "attempts": self.attempts, "last": self.last_wall}  # fmt: skip


def _read_verified(
    path: os.PathLike[str], keys: Keys, block_id: bytes, size: int, *, drop_pages: bool = False
) -> bytes:
    """A block's plaintext from the cache dir, checked against its row and its id
    (blocking: runs in a worker thread). Uploading damaged plaintext would store an
    object that can never open again; left pending, the damage is reported instead.
    `drop_pages`: let the kernel free the file's clean pages once read (see Uploader)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
            if drop_pages:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    except FileNotFoundError:
        raise BlockUnreadable(f"block {block_id.hex()}: not in the cache dir") from None
    except OSError as exc:
        raise BlockUnreadable(f"block {block_id.hex()}: {exc.strerror}") from None
    if len(data) != size:
        raise BlockUnreadable(
            f"block {block_id.hex()}: {len(data)} bytes in the cache dir, not {size}"
        )
    if not hmac.compare_digest(_native.block_id(keys.id_key, data), block_id):
        raise BlockUnreadable(f"block {block_id.hex()}: cache file does not match its id")
    return data


class Uploader:
    def __init__(
        self,
        meta: MetaStore,
        cache: CacheDir,
        store: SealedStore,
        keys: Keys,
        *,
        uploads: int = 8,
        scan_interval: float = 1.0,
        on_pending: Callable[[bytes, int], None] | None = None,
        on_stored: Callable[[bytes, int], None] | None = None,
        drop_pages: bool = False,
    ) -> None:
        """`drop_pages`: free the page cache of a block file once it is read for its
        upload. Set for a single mount (SQLite metadata): there the kernel keeps the
        page cache of a file written through the mount (no FUSE auto_inval_data, see
        cloudfs.mount.kernel), so the block file's pages are a second copy, and the
        page cache kept growing into pages never touched before, which this test
        machine makes dear (CacheDir.drop_pages). Not with shared metadata, where the
        kernel drops a written file's pages at its next GETATTR and reads it again
        through the mount from these block files."""
        if uploads < 1:
            raise ValueError("uploads must be >= 1")
        self.meta = meta
        self.cache = cache
        self.store = store
        self.keys = keys
        self.uploads = uploads
        self.scan_interval = scan_interval
        #: told of every pending block a scan sees, and of every block marked stored
        #: (the evictor's accounting)
        self._on_pending = on_pending
        self._on_stored = on_stored
        #: blocks queued or being uploaded or being marked stored
        self.in_flight: set[bytes] = set()
        #: blocks whose last attempt failed
        self.failures: dict[bytes, Failure] = {}
        #: PUTs running now
        self.active = 0
        #: blocks (and plaintext bytes) uploaded since the daemon started
        self.uploaded = 0
        self.uploaded_bytes = 0
        #: trio clock of the last completed attempt (for the idle timer)
        self.last_progress = 0.0
        self._wake = trio.Event()
        self._changed = trio.Event()
        self._stopping = False
        #: PUTs of `store_now` in flight, all requests together
        self._store_slots = trio.CapacityLimiter(uploads)
        self.drop_pages = drop_pages

    # --- control ----------------------------------------------------------------------

    def kick(self) -> None:
        """New pending blocks exist: scan now."""
        self._wake.set()

    def stop(self) -> None:
        """Queue nothing more; `run` returns once the running PUTs are marked."""
        self._stopping = True
        self._wake.set()

    def retry_now(self) -> None:
        """Let failed blocks be tried at once (a flush is waiting for them)."""
        for failure in self.failures.values():
            failure.retry_at = 0.0
        self.kick()

    def _notify(self, *, progress: bool = True) -> None:
        """Wake flush waiters; `progress`: an attempt ended (the daemon is not idle)."""
        if progress:
            self.last_progress = trio.current_time()
        self._changed.set()
        self._changed = trio.Event()

    @property
    def busy(self) -> bool:
        return bool(self.in_flight)

    # --- the pipeline -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        queue_send, queue_recv = trio.open_memory_channel[tuple[bytes, int]](self.uploads)
        done_send, done_recv = trio.open_memory_channel[tuple[bytes, int, int]](self.uploads)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._commit_loop, done_recv)
            # each worker owns clones: when all are gone the commit loop ends
            async with queue_recv, done_send:
                for _ in range(self.uploads):
                    nursery.start_soon(self._worker, queue_recv.clone(), done_send.clone())
            task_status.started()
            async with queue_send:
                await self._scan_loop(queue_send)

    async def _scan_loop(self, queue: trio.MemorySendChannel[tuple[bytes, int]]) -> None:
        while not self._stopping:
            # a kick during the pass makes another pass follow at once
            self._wake = trio.Event()
            await self._scan_pass(queue)
            self._notify(progress=False)
            with trio.move_on_after(self.scan_interval):
                await self._wake.wait()

    async def _scan_pass(self, queue: trio.MemorySendChannel[tuple[bytes, int]]) -> None:
        if self.meta.fenced is not None:
            return  # fenced (DaemonService.fence): nothing more goes up
        after: object = None
        seen_failed: set[bytes] = set()
        while not self._stopping:
            try:
                async with self.meta.transaction(write=False) as tx:
                    rows, after = await tx.pending_page(SCAN_PAGE, after)
            except Exception:
                log.exception("reading pending blocks failed")
                return
            for block_id, size in rows:
                if self._stopping:
                    return
                if self._on_pending is not None:
                    self._on_pending(block_id, size)
                failure = self.failures.get(block_id)
                if failure is not None:
                    seen_failed.add(block_id)
                if block_id in self.in_flight:
                    continue
                if failure is not None and failure.retry_at > trio.current_time():
                    continue
                self.in_flight.add(block_id)
                await queue.send((block_id, size))  # waits while `uploads` are queued
            if after is None:
                break
        if self._stopping:
            return
        # a complete pass: failures of blocks no longer pending are history
        for block_id in [
            b for b in self.failures if b not in seen_failed and b not in self.in_flight
        ]:
            del self.failures[block_id]

    async def _worker(
        self,
        queue: trio.MemoryReceiveChannel[tuple[bytes, int]],
        done: trio.MemorySendChannel[tuple[bytes, int, int]],
    ) -> None:
        async with queue, done:
            async for block_id, size in queue:
                if self._stopping or self.meta.fenced is not None:
                    self.in_flight.discard(block_id)
                    continue
                self.active += 1
                try:
                    stored_size = await self._upload(block_id, size)
                # any failure of one block is that block's: recorded, retried, and
                # the worker carries on with the next
                except Exception as exc:  # noqa: BLE001
                    self.in_flight.discard(block_id)
                    await self._failed(block_id, exc)
                    continue
                finally:
                    self.active -= 1
                await done.send((block_id, size, stored_size))

    async def _upload(self, block_id: bytes, size: int) -> int:
        plaintext = await trio.to_thread.run_sync(
            functools.partial(
                _read_verified, self.cache.block_path(block_id), self.keys, block_id, size,
                drop_pages=self.drop_pages,
            )
        )  # fmt: skip
        return await self.store.put_block(block_id, plaintext, verified=True)

    async def _failed(self, block_id: bytes, exc: Exception) -> None:
        # A row that is no longer pending (collected by gc, stored meanwhile by a
        # daemon of an earlier run) explains a missing file: not an error.
        try:
            async with self.meta.transaction(write=False) as tx:
                row = await tx.get_block(block_id)
        except Exception:  # noqa: BLE001 - cannot tell: keep the failure on record
            row = None
        else:
            if row is None or row.state != BLOCK_PENDING:
                self.failures.pop(block_id, None)
                self._notify()
                return
        now = trio.current_time()
        old = self.failures.get(block_id)
        attempts = (old.attempts if old else 0) + 1
        delay = min(MAX_RETRY_DELAY_S, 2.0 ** (attempts - 1)) * random.uniform(0.75, 1.25)
        message = exc.message if isinstance(exc, CloudfsError) else f"{type(exc).__name__}: {exc}"
        kind = type(exc).__name__ if isinstance(exc, CloudfsError) else "StoreError"
        self.failures[block_id] = Failure(message, kind, attempts, time.time(), now, now + delay)
        log.warning("upload of block %s failed (attempt %d, next in %.0f s): %s",
                    block_id.hex(), attempts, delay, message)  # fmt: skip
        self._notify()

    async def _commit_loop(self, done: trio.MemoryReceiveChannel[tuple[bytes, int, int]]) -> None:
        async with done:
            async for first in done:
                batch = [first]
                while len(batch) < COMMIT_BATCH:
                    try:
                        batch.append(done.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break  # EndOfChannel: shutting down; commit what came in
                await self._commit(batch)

    async def _mark_stored(self, batch: list[tuple[bytes, int, int]]) -> None:
        async with self.meta.transaction() as tx:
            # by id: the mount's transactions lock block rows in the same order
            for block_id, _size, stored_size in sorted(batch):
                await tx.mark_stored(block_id, stored_size)

    async def _commit(self, batch: list[tuple[bytes, int, int]]) -> None:
        if self.meta.fenced is not None:
            # the metadata takes no writes any more; the objects in the bucket are
            # harmless (named by content), the rows stay pending
            for block_id, _size, _stored in batch:
                self.in_flight.discard(block_id)
            self._notify()
            return
        # Shielded: the objects are already PUT; losing the mark only costs a second
        # PUT later, but finishing it is what a clean shutdown promises.
        with trio.CancelScope(shield=True):
            try:
                await self.meta.run(self._mark_stored, batch)
            except Exception as exc:
                log.exception("marking %d blocks stored failed", len(batch))
                for block_id, _size, _stored in batch:
                    self.in_flight.discard(block_id)
                    await self._failed(block_id, exc)
                return
        for block_id, size, _stored in batch:
            self.in_flight.discard(block_id)
            self.failures.pop(block_id, None)
            self.uploaded += 1
            self.uploaded_bytes += size
            if self._on_stored is not None:
                self._on_stored(block_id, size)
        self._notify()

    # --- stored at once (--upload=sync) -----------------------------------------------

    async def store_now(self, blocks: list[tuple[bytes, int]]) -> list[int]:
        """Put the listed cached blocks (id, plaintext size) in the store now, whatever
        their rows say (a seal of a mount with --upload=sync asks before the commit
        that names them: they may have no row yet). Returns each object's stored size,
        in order. Every block is tried; then the first failure is raised
        (BlockUnreadable, StoreError ...): the caller's commit must not happen."""
        if self.meta.fenced is not None:
            raise LeaseLost(f"uploads stopped: {self.meta.fenced}")
        stored = [0] * len(blocks)
        failures: list[Exception] = []

        async def one(i: int, block_id: bytes, size: int) -> None:
            async with self._store_slots:
                self.active += 1
                try:
                    stored[i] = await self._upload(block_id, size)
                except BlockUnreadable as exc:
                    # its file may have gone because the block got stored meanwhile
                    # (another upload, then eviction): then its object is there
                    row_size = await self._stored_size(block_id)
                    if row_size is None:
                        failures.append(exc)
                        return
                    stored[i] = row_size
                # one block's failure is reported once all are tried (a cancelled
                # nursery would leave the others' PUTs half done for nothing)
                except Exception as exc:  # noqa: BLE001
                    failures.append(exc)
                    return
                finally:
                    self.active -= 1
            self.uploaded += 1
            self.uploaded_bytes += size
            self.last_progress = trio.current_time()

        async with trio.open_nursery() as nursery:
            for i, (block_id, size) in enumerate(blocks):
                nursery.start_soon(one, i, block_id, size)
        if failures:
            exc = failures[0]
            message = (
                exc.message if isinstance(exc, CloudfsError) else f"{type(exc).__name__}: {exc}"
            )
            log.warning("storing %d blocks for a seal failed (%d failures); first: %s",
                        len(blocks), len(failures), message)  # fmt: skip
            if isinstance(exc, StoreError):
                raise exc
            # BlockUnreadable is the daemon's own: the client knows a StoreError
            raise StoreError(message) from exc
        return stored

    async def _stored_size(self, block_id: bytes) -> int | None:
        """The stored size of a block whose row says `stored`, else None."""
        try:
            async with self.meta.transaction(write=False) as tx:
                row = await tx.get_block(block_id)
        except CloudfsError:
            return None
        if row is None or row.state != BLOCK_STORED or row.stored_size is None:
            return None
        return int(row.stored_size)

    # --- flush and status ---------------------------------------------------------------

    async def flush(self, block_ids: list[bytes] | None = None) -> None:
        """Return once no block (of `block_ids`) is pending. StoreError when each block
        still pending has failed since this flush began and none is being uploaded:
        waiting longer would only hang the caller (it may flush again)."""
        started = trio.current_time()
        self.retry_now()
        while True:
            if self.meta.fenced is not None:
                raise LeaseLost(f"uploads stopped: {self.meta.fenced}")
            changed = self._changed
            waiting = await self._still_pending(block_ids)
            if not waiting:
                return
            failed = [
                self.failures[b] for b in waiting
                if b in self.failures and self.failures[b].last_attempt >= started
                and b not in self.in_flight
            ]  # fmt: skip
            if len(failed) == len(waiting):
                raise StoreError(
                    f"{len(failed)} block(s) cannot be uploaded; first: {failed[0].error}"
                )
            with trio.move_on_after(self.scan_interval):
                await changed.wait()

    async def _still_pending(self, block_ids: list[bytes] | None) -> list[bytes]:
        """The listed blocks that are pending, or — without a list — all pending
        blocks when there are few enough to all be failures, else a non-empty stand-in
        list that never counts as all failed."""
        async with self.meta.transaction(write=False) as tx:
            if block_ids is not None:
                waiting = []
                for block_id in dict.fromkeys(block_ids):
                    row = await tx.get_block(block_id)
                    if row is not None and row.state == BLOCK_PENDING:
                        waiting.append(block_id)
                return waiting
            count, _bytes = await tx.pending_summary()
            if count == 0:
                return []
            if count > len(self.failures):
                return [b""]  # more pending than failed: some are simply not done yet
            rows = await tx.pending_blocks(count + 1)
            return [block_id for block_id, _size in rows]

    def status(self) -> dict[str, Any]:
        failures = sorted(self.failures.items(), key=lambda item: -item[1].last_wall)
        return {
            "uploading": self.active,
            "queued": len(self.in_flight),
            "uploaded": self.uploaded,
            "uploaded_bytes": self.uploaded_bytes,
            "error_count": len(failures),
            "errors": [f.to_json(b) for b, f in failures[:STATUS_ERRORS]],
        }
