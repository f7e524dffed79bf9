"""The fetcher: brings blocks from the object store into the cache dir on request.

GET → verify, decrypt, decompress → cache/blocks (not fsynced: a block lost in a crash
is fetched again); the opening and the write run in one worker thread. Each GET reads
the stored object and decrypts it into buffers that the next GETs reuse. Requests for a
block that is already being fetched wait for that one GET instead of starting another,
and the GETs run in the fetcher's own nursery, so a requester that goes away does not
cancel a GET that others wait for. At most `fetches` GETs run at once, read-ahead
(prefetch) ones in at most three quarters of those slots.

A read that misses (its block is not in flight yet) goes first: no prefetch GET starts
while one waits. The first read of a cold file then has the store to itself instead of
sharing it with the read-ahead that its own request asked for (on S3 the time to its
first byte), while a sequential reader, whose blocks are in flight as prefetches by the
time it asks, never holds the read-ahead back.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from cloudfs.cache import SYNC_SOON_MIN, CacheDir
from cloudfs.errors import CloudfsError, CorruptBlock, DaemonError
from cloudfs.files import READAHEAD_BLOCKS
from cloudfs.objectstore.sealed import SealedStore

log = logging.getLogger(__name__)


@dataclass
class _Get:
    """One GET of one block, shared by everybody asking for that block meanwhile."""

    done: trio.Event = field(default_factory=trio.Event)
    error: CloudfsError | None = None
    #: a prefetch waits in this scope for its turn; a read that needs the block
    #: cancels the wait (promotes it)
    queued: trio.CancelScope | None = None
    #: a read waits for this block, and no GET had started for it when it asked
    missed: bool = False


#: the pages of this many of the last blocks fetched stay in the kernel's page cache;
#: older ones are freed (`CacheDir.drop_pages`): by then their reader has read them
#: (four read-ahead windows of one sequential reader)
KEEP_PAGES_BLOCKS = 4 * READAHEAD_BLOCKS

#: reused buffers grow in steps of this much (to the largest object or block seen)
_BUFFER_STEP = 256 << 10


@dataclass
class _Buffers:
    """Memory that one GET at a time reuses: its stored object, and the plaintext
    decrypted from it. A fresh 1 MiB bytes object per block and step cost more CPU in
    page faults than the decryption itself (0.5 s per GiB each). Each grows to the
    largest size it had to hold, so an idle daemon holds only what blocks needed."""

    sealed: bytearray = field(default_factory=bytearray)
    plain: bytearray = field(default_factory=bytearray)

    def fit(self, sealed_size: int, plain_size: int) -> None:
        """Grow for the next block after one of these sizes did not fit."""
        if sealed_size > len(self.sealed):
            self.sealed = bytearray(-(-sealed_size // _BUFFER_STEP) * _BUFFER_STEP)
        if plain_size > len(self.plain):
            self.plain = bytearray(-(-plain_size // _BUFFER_STEP) * _BUFFER_STEP)


class FetchFailed(Exception):
    """Some blocks of a fetch request failed: {block id: error}, in request order."""

    def __init__(self, failures: dict[bytes, CloudfsError]) -> None:
        self.failures = failures
        super().__init__(f"{len(failures)} block(s) failed")

    def first(self) -> CloudfsError:
        """The error to answer with: a corrupt block above all (the mount must turn
        it into EIO and never retry it as a transient failure)."""
        for exc in self.failures.values():
            if isinstance(exc, CorruptBlock):
                return exc
        return next(iter(self.failures.values()))


class Fetcher:
    def __init__(
        self,
        cache: CacheDir,
        store: SealedStore,
        *,
        fetches: int = 8,
        on_fetched: Callable[[bytes, int], None] | None = None,
        has_room: Callable[[], bool] | None = None,
    ) -> None:
        self.cache = cache
        self.store = store
        #: told of every block file the fetcher writes (the evictor's accounting)
        self._on_fetched = on_fetched
        #: False while the cache is over the evictor's start mark: read-ahead is then
        #: dropped (the block is fetched when read), so it cannot outrun the evictor
        self._has_room = has_room
        self._limit = trio.Semaphore(fetches)
        # Prefetches may hold at most three quarters of the GET slots, so a read that
        # misses the cache never queues behind a long read-ahead; they are most of a
        # sequential reader's GETs, and each one in flight hides a GET's latency.
        self._prefetch_limit = trio.Semaphore(max(1, fetches * 3 // 4))
        self._gets: dict[bytes, _Get] = {}
        #: buffers of GETs that ended, for the next ones (at most one per GET slot)
        self._free_buffers: list[_Buffers] = []
        self._max_buffers = fetches
        #: blocks fetched whose pages may still be in the page cache, oldest first
        self._paged: deque[bytes] = deque()
        #: GETs of missed blocks not done yet; prefetch GETs start only at 0
        self._misses = 0
        self._no_misses = trio.Event()
        self._no_misses.set()
        self._nursery: trio.Nursery | None = None
        #: blocks fetched since the daemon started
        self.fetched = 0
        self.fetched_bytes = 0
        #: trio clock of the last completed GET (for the idle timer)
        self.last_progress = 0.0

    @property
    def busy(self) -> bool:
        return bool(self._gets)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the GETs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def fetch(self, block_ids: list[bytes], prefetch: list[bytes] | None = None) -> None:
        """Return once every block of `block_ids` is in the cache dir; FetchFailed
        naming the blocks that could not be fetched (the others are in the cache all
        the same). `prefetch`: blocks to fetch too, without waiting for them and
        ignoring their failures (read-ahead)."""
        if self._nursery is None:
            raise DaemonError("the fetcher is not running")
        waits: dict[bytes, _Get] = {}
        for block_id in dict.fromkeys(block_ids):
            if self.cache.has_block(block_id):
                continue
            get = self._gets.get(block_id)
            if get is None:
                get = self._gets[block_id] = _Get()
                self._missed(get)
                self._nursery.start_soon(self._get, block_id, get)
            elif get.queued is not None:
                get.queued.cancel()  # a read needs it now
                self._missed(get)
            waits[block_id] = get
        for block_id in dict.fromkeys(prefetch or ()):
            if block_id not in self._gets and not self.cache.has_block(block_id):
                get = self._gets[block_id] = _Get(queued=trio.CancelScope())
                self._nursery.start_soon(self._get, block_id, get)
        failures: dict[bytes, CloudfsError] = {}
        for block_id, get in waits.items():
            await get.done.wait()
            if get.error is not None:
                failures[block_id] = get.error
        if failures:
            raise FetchFailed(failures)

    def _room(self) -> bool:
        return self._has_room is None or self._has_room()

    def _missed(self, get: _Get) -> None:
        if not get.missed:
            get.missed = True
            if self._misses == 0:
                self._no_misses = trio.Event()
            self._misses += 1

    async def _get(self, block_id: bytes, get: _Get) -> None:
        prefetch_slot = False
        try:
            if get.queued is not None:
                with get.queued:
                    await self._prefetch_limit.acquire()
                    prefetch_slot = True
                    while self._misses:
                        await self._no_misses.wait()
                if get.queued.cancelled_caught is False and not self._room():
                    return  # read-ahead dropped (best effort): the finally cleans up
                get.queued = None
            async with self._limit:
                # it may have arrived while we waited for a slot (another process)
                if not self.cache.has_block(block_id):
                    size = await self._fetch_one(block_id)
                    self.fetched += 1
                    self.fetched_bytes += size
                    if self._on_fetched is not None:
                        self._on_fetched(block_id, size)
        except CloudfsError as exc:
            get.error = _about_block(exc, block_id)
            log.warning("fetch of block %s failed: %s", block_id.hex(), exc.message)
        except Exception as exc:
            log.exception("fetch of block %s failed", block_id.hex())
            get.error = DaemonError(f"block {block_id.hex()}: {type(exc).__name__}: {exc}")
        finally:
            if prefetch_slot:
                self._prefetch_limit.release()
            if get.missed:
                self._misses -= 1
                if self._misses == 0:
                    self._no_misses.set()
            # a failed GET is forgotten at once: the next request tries again
            del self._gets[block_id]
            self.last_progress = trio.current_time()
            get.done.set()

    async def _fetch_one(self, block_id: bytes) -> int:
        """GET, open and write one block file; the plaintext's size."""
        buffers = self._free_buffers.pop() if self._free_buffers else _Buffers()
        body = await self.store.get_sealed_into(block_id, buffers.sealed)
        drop = []
        while len(self._paged) >= KEEP_PAGES_BLOCKS:
            drop.append(self._paged.popleft())
        size = await trio.to_thread.run_sync(
            self._open_and_write, block_id, body, buffers, drop
        )
        if size >= SYNC_SOON_MIN:
            self._paged.append(block_id)
        # only now are the buffers surely free: a GET that failed or was cancelled may
        # have left a worker thread behind that still writes into them (a store's
        # abandoned call), so they go with it
        if len(self._free_buffers) < self._max_buffers:
            self._free_buffers.append(buffers)
        return size

    def _open_and_write(
        self, block_id: bytes, body: memoryview, buffers: _Buffers, drop: list[bytes]
    ) -> int:
        """Verify and open the object, write the block file (its writeback started,
        so that its pages can be freed later), and free the pages of the older block
        files in `drop`: one worker thread hop per block. The plaintext's size."""
        plaintext = self.store.open_sealed_into(block_id, body, buffers.plain)
        self.cache.write_block(block_id, plaintext, durable=False, sync_soon=True, spare=False)
        for old in drop:
            self.cache.drop_pages(old)
        buffers.fit(len(body), len(plaintext))  # new buffers: the views stay valid
        return len(plaintext)


def _about_block(exc: CloudfsError, block_id: bytes) -> CloudfsError:
    """The same error class, its detail naming the block."""
    detail = f"block {block_id.hex()}"
    if exc.detail:
        detail += f": {exc.detail}"
    try:
        return type(exc)(detail)
    except TypeError:  # an error class with another constructor
        return exc
