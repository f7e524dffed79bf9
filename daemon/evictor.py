"""The evictor: keeps the cache dir under its size limit by deleting the cached copies
of stored blocks, least recently used first.

What counts: block files (pending, stored, or not in the metadata yet) and dirty
overlays. What may go: only the file of a block whose row says `stored` — its object
is in the store, so a read that misses it fetches it back; the file goes inside a
write transaction that sees the row stored (garbage collection may claim a stored row,
and a seal revive it: then its plaintext is needed again). A pending block's file is its only copy, a file without a row may
belong to a seal that has not committed yet, and overlays are unsealed writes: none
of them is ever deleted here (the mount's writers wait instead, see
cloudfs.cache.CacheSpace).

Order: a block file's mtime is its last use (written by the fetcher, touched by the
mount's reads), so the order survives restarts of both processes.

Accounting: an index of the block files (size, and whether the block is stored),
built by a full scan of blocks/ at start and at every eviction round (exact sizes,
fresh mtimes, states from the metadata), and kept current in between by inotify on
the 256 folders of blocks/ (every block file arrives by a rename and leaves by an
unlink, whoever writes it: the mount's seals and append streams, the fetcher) and by
the uploader, which reports the blocks it marks stored. A file whose state is not
known yet (it arrived since the last scan and nobody reported it) makes a round scan
again when the limit is passed. Without inotify (too many instances), the evictor
scans every tick while the cache is near its limit instead.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import trio

from cloudfs.cache import CachedBlock, CacheDir
from cloudfs.meta.base import MetaStore
from cloudfs.meta.schema import BLOCK_STORED

log = logging.getLogger(__name__)

#: past this share of the limit, an eviction round starts (before the limit, so that
#: the blocks arriving while it scans do not pass it) ...
HIGH_WATER = 0.95
#: ... and brings the cache down to this share, so rounds (each a scan of blocks/)
#: are not needed for every block that arrives
LOW_WATER = 0.8
#: how often the evictor looks at the dirty overlays and the estimate
TICK_S = 0.25
#: shortest pause between two eviction rounds ...
MIN_ROUND_GAP_S = 0.1
#: ... and at most this share of the evictor's time goes to scans
SCAN_SHARE = 0.2
#: a full rescan this often, whatever happens (a safety net for the accounting)
RESCAN_S = 60.0

_IN_MOVED_TO = 0x80
_IN_DELETE = 0x200
_IN_Q_OVERFLOW = 0x4000
_IN_IGNORED = 0x8000
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name


class BlockWatch:
    """inotify on the folders of blocks/: which block files arrived and left."""

    def __init__(self, cache: CacheDir) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.fd: int = fd
        self._buf = b""
        try:
            for sub in sorted(cache.blocks.iterdir()):
                wd = libc.inotify_add_watch(fd, os.fsencode(sub), _IN_MOVED_TO | _IN_DELETE)
                if wd < 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"inotify on {sub}: {os.strerror(err)}")
        except BaseException:
            os.close(fd)
            raise

    async def events(self) -> list[tuple[bool, bytes | None]]:
        """Wait for events: (arrived, block id); (False, None) after an overflow (the
        caller must scan: events were lost)."""
        await trio.lowlevel.wait_readable(self.fd)
        out: list[tuple[bool, bytes | None]] = []
        while True:
            try:
                self._buf += os.read(self.fd, 65536)
            except BlockingIOError:
                break
        pos = 0
        while pos + _EVENT.size <= len(self._buf):
            _wd, mask, _cookie, length = _EVENT.unpack_from(self._buf, pos)
            if pos + _EVENT.size + length > len(self._buf):
                break
            name = self._buf[pos + _EVENT.size : pos + _EVENT.size + length].rstrip(b"\0")
            pos += _EVENT.size + length
            if mask & _IN_Q_OVERFLOW:
                out.append((False, None))
            elif not mask & _IN_IGNORED and len(name) == 64:
                try:
                    out.append((bool(mask & _IN_MOVED_TO), bytes.fromhex(name.decode())))
                except ValueError:
                    continue  # not a block file
        self._buf = self._buf[pos:]
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class _Cached:
    size: int
    #: True: stored (evictable); False: pending; None: not known yet (no row at the
    #: last scan, or arrived since)
    stored: bool | None


class Evictor:
    """`limit()` gives the limit in bytes (it may change: the config is re-read when a
    mount connects)."""

    def __init__(self, cache: CacheDir, meta: MetaStore, limit: Callable[[], int]) -> None:
        self.cache = cache
        self.meta = meta
        self._limit = limit
        self._index: dict[bytes, _Cached] = {}
        #: bytes of the block files in the index
        self.block_bytes = 0
        #: bytes of the indexed files of stored blocks (what an eviction can free)
        self.evictable = 0
        #: bytes of the indexed files whose state is not known
        self.unknown = 0
        self.dirty_bytes = 0
        self.evicted = 0
        self.evicted_bytes = 0
        self.scanned = False
        self.watching = False
        self._wake = trio.Event()
        self._last_scan = -1e9
        self._last_round = -1e9
        self._scan_cost = 0.0  # seconds the last scan took
        self._rescan = False  # inotify lost events

    @property
    def used(self) -> int:
        return self.block_bytes + self.dirty_bytes

    @property
    def limit(self) -> int:
        return self._limit()

    # --- the index ---------------------------------------------------------------------

    def _set(self, block_id: bytes, size: int, stored: bool | None) -> None:
        old = self._index.get(block_id)
        if old is not None:
            if stored is None:
                return  # a file arriving again (the fetcher replaced it): nothing new
            self._forget(block_id)
        self._index[block_id] = _Cached(size, stored)
        self.block_bytes += size
        if stored:
            self.evictable += size
        elif stored is None:
            self.unknown += size
        if self.used > self.limit * HIGH_WATER:
            self._wake.set()

    def _forget(self, block_id: bytes) -> None:
        entry = self._index.pop(block_id, None)
        if entry is not None:
            self.block_bytes -= entry.size
            if entry.stored:
                self.evictable -= entry.size
            elif entry.stored is None:
                self.unknown -= entry.size

    def pending_seen(self, block_id: bytes, size: int) -> None:
        """The uploader found a pending block: its file is in the cache, not evictable."""
        entry = self._index.get(block_id)
        if entry is None or entry.stored is None:
            self._set(block_id, entry.size if entry else size, False)

    def stored(self, block_id: bytes, size: int) -> None:
        """A block was uploaded and marked stored: its file may now be evicted."""
        entry = self._index.get(block_id)
        self._set(block_id, entry.size if entry else size, True)

    def fetched(self, block_id: bytes, size: int) -> None:
        """The fetcher put a stored block's file in the cache."""
        self._set(block_id, size, True)

    def removed(self, block_ids: list[bytes]) -> None:
        """Block files deleted by someone else (drop_cache)."""
        for block_id in block_ids:
            self._forget(block_id)

    def _arrived(self, block_id: bytes) -> None:
        if block_id in self._index:
            return
        try:
            size = self.cache.block_path(block_id).stat().st_size
        except FileNotFoundError:
            return  # gone again already
        self._set(block_id, size, None)

    # --- the tasks -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        watch: BlockWatch | None = None
        try:
            watch = BlockWatch(self.cache)
        except OSError as exc:
            log.warning("cannot watch %s (%s): scanning it instead", self.cache.blocks, exc)
        self.watching = watch is not None
        try:
            # watching before the first scan: nothing arrives unseen
            await self._scan()
            async with trio.open_nursery() as nursery:
                if watch is not None:
                    nursery.start_soon(self._follow, watch)
                task_status.started()
                await self._loop()
        finally:
            if watch is not None:
                watch.close()

    async def _follow(self, watch: BlockWatch) -> None:
        while True:
            for arrived, block_id in await watch.events():
                if block_id is None:
                    log.warning("inotify lost events on %s: scanning again", self.cache.blocks)
                    self._rescan = True
                    self._wake.set()
                elif arrived:
                    self._arrived(block_id)
                else:
                    self._forget(block_id)

    async def _loop(self) -> None:
        while True:
            with trio.move_on_after(TICK_S):
                await self._wake.wait()
            self._wake = trio.Event()
            try:
                self.dirty_bytes = await trio.to_thread.run_sync(self.cache.dirty_bytes)
                now = trio.current_time()
                if self._rescan or now - self._last_scan >= RESCAN_S:
                    self._rescan = False
                    await self._scan()
                gap = max(MIN_ROUND_GAP_S, self._scan_cost / SCAN_SHARE)
                if now - self._last_round < gap:
                    continue
                over = self.used > self.limit * HIGH_WATER
                if (over and (self.evictable > 0 or self.unknown > 0)) or (
                    not self.watching and self.used >= self.limit * LOW_WATER
                ):
                    await self.evict()
            except Exception:  # the next tick tries again
                log.exception("cache eviction failed")
                await trio.sleep(1.0)

    async def _scan(self) -> list[CachedBlock]:
        """Rebuild the index from the cache dir; the files of stored blocks found."""
        started = trio.current_time()
        found = await trio.to_thread.run_sync(self.cache.scan_blocks)
        ids = [b.id for b in found]
        states: dict[bytes, int] = {}
        for i in range(0, len(ids), 5000):
            async with self.meta.transaction(write=False) as tx:
                states |= await tx.block_states(ids[i : i + 5000])
        stored = {b for b, state in states.items() if state == BLOCK_STORED}
        # a file without a row stays unknown: a seal may commit it any moment
        index = {
            b.id: _Cached(b.size, True if b.id in stored else (False if b.id in states else None))
            for b in found
        }
        self._index = index
        self.block_bytes = sum(e.size for e in index.values())
        self.evictable = sum(e.size for e in index.values() if e.stored)
        self.unknown = sum(e.size for e in index.values() if e.stored is None)
        self.dirty_bytes = await trio.to_thread.run_sync(self.cache.dirty_bytes)
        self._last_scan = trio.current_time()
        self._scan_cost = self._last_scan - started
        self.scanned = True
        return [b for b in found if b.id in stored]

    async def evict(self) -> int:
        """One round: scan, and if the cache is past HIGH_WATER of its limit, delete
        stored blocks' files, least recently used first, until it is at LOW_WATER (or
        nothing stored is left).
        Returns the bytes freed."""
        self._last_round = trio.current_time()
        candidates = await self._scan()
        limit = self.limit
        if self.used <= limit * HIGH_WATER:
            return 0
        target = int(limit * LOW_WATER)
        candidates.sort(key=lambda b: b.mtime_ns)
        chosen: list[CachedBlock] = []
        excess = self.used - target
        for block in candidates:
            if excess <= 0:
                break
            chosen.append(block)
            excess -= block.size
        freed_each = await self._remove_stored([b.id for b in chosen])
        for block in chosen:
            self._forget(block.id)
        freed = sum(freed_each)
        self.evicted += sum(1 for n in freed_each if n)
        self.evicted_bytes += freed
        if self.used > limit:
            log.debug("cache at %d of %d bytes after evicting %d: the rest is not uploaded",
                      self.used, limit, freed)  # fmt: skip
        return freed

    async def _remove_stored(self, block_ids: list[bytes]) -> list[int]:
        """Delete the files of those blocks whose row is still `stored`, inside a write
        transaction that sees it so: garbage collection may claim a stored row and a
        seal revive it, and then its plaintext is needed again (cloudfs.gc). Returns
        the bytes each freed (0: kept)."""
        freed = [0] * len(block_ids)

        async def remove(start: int, part: list[bytes]) -> None:
            async with self.meta.transaction() as tx:
                states = await tx.block_states(part)
                for n, block_id in enumerate(part):
                    if states.get(block_id) == BLOCK_STORED:
                        freed[start + n] = self.cache.remove_block(block_id)

        for i in range(0, len(block_ids), 500):
            await self.meta.run(remove, i, block_ids[i : i + 500])
        return freed

    def status(self) -> dict[str, int]:
        return {
            "cache_limit": self.limit,
            "cache_used": self.used,
            "cache_evictable": self.evictable,
            "evicted": self.evicted,
            "evicted_bytes": self.evicted_bytes,
        }
