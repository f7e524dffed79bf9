"""File contents: reads, writes into dirty overlays, and sealing them into blocks.

Seal (DESIGN §4): from the start of the extent holding the first changed byte, run
content-defined chunking over overlay + old data; past the changed range, stop as soon
as a new cut point equals an old extent boundary (POSIX writes never shift data, so
cuts realign within about one block). Each new chunk is named by its keyed hash; a
chunk of zeros becomes a hole; a chunk whose block file is not cached is written to
the cache dir. One metadata transaction then replaces the extents and counts the
references. The daemon uploads blocks left `pending`.

--upload=sync (shared mode): before that transaction, the seal has the daemon put
the blocks it names that are not `stored` yet (`FileStore.uploads`), and the commit
records them `stored`: no machine ever reads a commit naming an object that is not in
the store, whichever seal made it (close, fsync, idle, the dirty limit, an append
stream's commits, unmount). The one exception is a block a garbage collection pass
had claimed: the commit revives it and it is stored anew after the pass (cloudfs.gc).

Versions: a seal on fsync, last close or idle *publishes* a version (a `versions` row).
A seal forced by the dirty-bytes limit while a file is still being written amends the
unpublished working version instead, so a 10 GiB copy is one version, not 160.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import trio

from cloudfs import _native, gc
from cloudfs.cache import BlockFiles, CacheDir
from cloudfs.chunking import ChunkerParams
from cloudfs.errors import CloudfsError, FSOpError, StoreError
from cloudfs.meta.base import Extent, FsStats, InodeAttrs, MetaStore
from cloudfs.meta.schema import BLOCK_PENDING
from cloudfs.overlay import DirtyOverlay, Intervals
from cloudfs.stream import BACKLOG_LIMIT, CUT_BATCH, AppendStream, can_stream
from cloudfs.versions import CONFLICT, restore_into

if TYPE_CHECKING:
    from cloudfs.clients import Client

log = logging.getLogger(__name__)

#: unsealed bytes of one file that trigger a seal while it is still being written
DIRTY_LIMIT = 64 << 20
#: a dirty file idle for this long is sealed and published
IDLE_SEAL_S = 5.0
#: bytes of merged data handed to the chunker at a time
PIECE = 4 << 20
#: a stream cut of at most this many bytes runs on the event loop, not a thread
INLINE_CUT = 128 << 10
#: blocks fetched ahead of a reader: the blocks a reader starts ask for those up to
#: this far ahead (READAHEAD_BATCH at a time), so a sequential cold read keeps a
#: window of fetches in flight
READAHEAD_BLOCKS = 16
#: a block asked for ahead is not asked for again this soon (seconds)
READAHEAD_ASKED_S = 10.0
#: a reader that starts a cached block asks for the window ahead once this many blocks
#: at its end were not asked for yet
READAHEAD_BATCH = 4
#: blocks per request to the daemon when a seal stores its blocks first (--upload=sync)
STORE_BATCH = 256
#: --upload=sync: a seal whose commit garbage collection overtook this many times in a
#: row gives up (its writes stay unsealed, for a later seal)
STORE_TRIES = 5
#: --upload=sync: the longest pause between two looks at blocks a garbage collection
#: pass has claimed (seconds)
CLAIMED_POLL_S = 1.0
#: --upload=sync, at unmount: how long a seal keeps asking a store that refuses its
#: blocks before it commits them pending (seconds; the mount point is gone already,
#: only the process lingers)
UNMOUNT_STORE_WAIT_S = 30.0
#: commits remembered for `committed_since`: far more than commit while one inode row
#: is read, even at load 15 (more than that and a reader simply reads again)
COMMIT_LOG = 1024

#: fetch(blocks, prefetch): returns once `blocks` are cached; `prefetch` is best effort
FetchBlocks = Callable[[list[bytes], list[bytes]], Awaitable[None]]


class SyncUploads(Protocol):
    """--upload=sync: the daemon stores blocks while a seal waits (mount.main.DaemonLink)."""

    async def store(self, blocks: list[tuple[bytes, int]]) -> dict[bytes, int]:
        """Put these cached blocks (id, plaintext size) in the object store now, rows
        or not: {id: stored size}. Raises if one could not be stored."""
        ...

    async def flush(self, block_ids: list[bytes]) -> None:
        """Return once none of `block_ids` is pending."""
        ...

    async def finish_collection(self) -> bool:
        """Finish what an interrupted garbage collection pass left claimed; False when
        a pass runs (it finishes them itself)."""
        ...


@dataclass
class FileState:
    """What the mount knows of one file beyond its metadata row."""

    ino: int
    size: int  # logical size now (sealed or not)
    sealed_size: int  # size in the metadata row
    #: the inode's version the sizes and extents here were read at or committed as;
    #: a commit finding another version in the row lost a race with another machine
    base_version: int
    #: bytes of the old extents at or past this offset are gone (the file was truncated
    #: below them since the last seal); equals sealed_size when nothing was cut
    keep_below: int
    lock: trio.Lock = field(default_factory=trio.Lock)
    opens: int = 0
    overlay: DirtyOverlay | None = None
    extents: list[Extent] | None = None  # live extents, loaded on demand
    mtime_ns: int | None = None  # unsealed data change time
    working_version: int | None = None  # amended by unpublished seals
    last_change: float = 0.0  # monotonic time of the last write or truncate
    sealing: bool = False
    pins: int = 0  # operations holding or waiting for `lock`: the state must stay
    #: block files written by seals that did not sync them; the next durable seal
    #: (fsync) syncs them, since the file's extents already name them
    unsynced: list[bytes] = field(default_factory=list)
    #: sequential writes at the end of the file, chunked as they arrive
    stream: AppendStream | None = None
    cut_lock: trio.Lock = field(default_factory=trio.Lock)  # one stream cut at a time
    #: --upload=sync: the stream's cut blocks put in the store ahead of its commit
    #: (`_prestore`): {id: (stored size, gc epoch read before the PUT)}, None while the
    #: PUT is under way; and the puts under way
    prestored: dict[bytes, tuple[int, int] | None] = field(default_factory=dict)
    prestoring: int = 0
    prestore_idle: trio.Event = field(default_factory=trio.Event)

    @property
    def dirty(self) -> bool:
        return (
            bool(self.overlay and self.overlay.ranges)
            or self.size != self.sealed_size
            or (self.keep_below < self.sealed_size)
            or (self.stream is not None and self.stream.uncommitted > 0)
        )


@dataclass
class _StoredFirst:
    """Blocks put in the store before the commit naming them (--upload=sync)."""

    sizes: dict[bytes, int] = field(default_factory=dict)  # id → stored size
    #: the garbage collection epoch read before the oldest of those PUTs (cloudfs.gc)
    gc_epoch: int = 0
    #: every block that needed a PUT got one (False: the store refused at unmount,
    #: and the commit leaves those rows pending)
    complete: bool = True

    def add(self, other: _StoredFirst) -> None:
        if other.sizes:
            self.gc_epoch = min(self.gc_epoch, other.gc_epoch) if self.sizes else other.gc_epoch
            self.sizes.update(other.sizes)
        self.complete = self.complete and other.complete


class _StoreRaced(Exception):
    """--upload=sync: garbage collection overtook a seal between its PUTs and its
    commit; the commit was rolled back and is tried again (`FileStore._commit`)."""


@dataclass
class _SealPlan:
    start: int  # first byte re-chunked
    size: int  # file size to seal
    keep_below: int
    last_changed: float  # past this offset, a cut on an old boundary ends the seal
    old: list[Extent]  # live extents at or past `start`
    hold_tail: bool  # leave the bytes after the last cut dirty (still being appended)


@dataclass
class _SealResult:
    extents: list[Extent]  # new extents (holes skipped)
    stop: int  # old extents at or past this offset are kept
    tail: int | None  # offset of the held-back tail still dirty, if any
    written: list[bytes]  # block files this seal put in the cache
    holds: dict[bytes, Path]  # block files it re-uses, held until the commit


class FileStore:
    def __init__(
        self,
        meta: MetaStore,
        cache: CacheDir,
        *,
        id_key: bytes,
        gear_key: bytes,
        chunker: ChunkerParams,
        fetch: FetchBlocks,
        on_sealed: Callable[[], None],
        origin: str,
    ) -> None:
        self.meta = meta
        self.cache = cache
        self.id_key = id_key
        self.gear_key = gear_key
        self.chunker = chunker
        self._fetch = fetch
        self._on_sealed = on_sealed
        self.origin = origin
        self.blockfiles = BlockFiles(cache)
        self.states: dict[int, FileState] = {}
        self._stats: tuple[float, FsStats] | None = None
        #: where append streams cut in the background (None: cut inline)
        self.nursery: trio.Nursery | None = None
        self._chunkers: list[_native.Chunker] = []  # reset ones, ready for reuse
        #: blocks asked for ahead of readers lately: monotonic time of the request
        self._asked_ahead: dict[bytes, float] = {}
        #: shared mode: this mount's `clients` row; an open file is held there
        self.client: Client | None = None
        #: called with (inode, version) after each commit of a file's contents
        self.on_commit: Callable[[int, int], None] | None = None
        #: --upload=sync: every commit of file contents names only stored blocks (see
        #: `_store_first`); None: the daemon uploads what commits leave pending
        self.uploads: SyncUploads | None = None
        #: the mount is going away: a seal whose blocks cannot be stored now commits
        #: them pending (the daemon uploads them later) rather than lose the writes
        #: (unsealed overlays do not survive the mount), after trying for this long
        self.unmounting = False
        self.unmount_store_wait_s = UNMOUNT_STORE_WAIT_S
        #: (number, inode) of the latest commits of file contents here (see
        #: `committed_since`), and the number of the last one
        self._commit_log: deque[tuple[int, int]] = deque(maxlen=COMMIT_LOG)
        self._commits = 0

    def _take_chunker(self) -> _native.Chunker:
        if self._chunkers:
            return self._chunkers.pop()
        p = self.chunker
        return _native.Chunker(self.gear_key, p.min_size, p.avg_size, p.max_size)

    def _give_chunker(self, chunker: _native.Chunker) -> None:
        if len(self._chunkers) < 32:
            chunker.reset()
            self._chunkers.append(chunker)

    # --- state ----------------------------------------------------------------------

    async def state(self, ino: int, known: InodeAttrs | None = None) -> FileState:
        """The in-memory state of file `ino`, made from its row if it has none. `known`:
        that row as the caller just read it (see `open`), which saves reading it again."""
        st = self.states.get(ino)
        if st is None:
            attrs = known
            if attrs is None:
                async with self.meta.reading() as tx:
                    attrs = await tx.get_inode(ino)
            if attrs is None:
                raise FSOpError(2, f"inode {ino}")
            # another task may have made the state while this one read (MySQL reads on
            # a worker thread): keep that one, it may hold opens and unsealed writes
            st = self.states.setdefault(
                ino,
                FileState(
                    ino=ino, size=attrs.size, sealed_size=attrs.size, base_version=attrs.version,
                    keep_below=attrs.size,
                ),
            )  # fmt: skip
        return st

    def in_use(self, ino: int) -> bool:
        """Is `ino` open, or is an operation on its contents under way?"""
        st = self.states.get(ino)
        return st is not None and (st.opens > 0 or st.pins > 0 or st.sealing)

    def unsealed_bytes(self) -> int:
        """Written bytes not sealed into pending blocks yet (dirty overlays, append
        streams): cache space the mount will need (CacheSpace)."""
        total = 0
        for st in list(self.states.values()):
            if st.overlay is not None:
                total += st.overlay.ranges.total
            if st.stream is not None:
                total += st.stream.uncommitted
        return total

    def current(self, ino: int) -> FileState | None:
        """The in-memory state of `ino`, if it has any (size and times not yet sealed)."""
        return self.states.get(ino)

    def commit_mark(self) -> int:
        """Take before reading inode rows that `current` will complete; see
        `committed_since`."""
        return self._commits

    def committed_since(self, mark: int, inodes: Collection[int]) -> bool:
        """Did this mount commit the contents of one of `inodes` since `mark` (True
        also when more commits came than the log holds)?

        A commit changes the inode row and the in-memory state together (the state's
        unsealed mtime goes; after a last close the whole state goes), so a row read
        before the commit and completed with the state after it is neither: the size
        or mtime from before the seal. On MySQL a read runs on a worker thread while
        the event loop goes on and may straddle a commit; such a read must be done
        again. (On SQLite every read runs on the event loop: never.)"""
        if self._commits == mark:
            return False
        if not self._commit_log or self._commit_log[0][0] > mark + 1:
            return True  # some of the commits since `mark` left the log
        for number, ino in reversed(self._commit_log):
            if number <= mark:
                return False
            if ino in inodes:
                return True
        return False

    def _committed(self, ino: int) -> None:
        """Log a commit of `ino`'s contents, at once after the transaction (no await
        between its COMMIT and this, nor between this and the state's update)."""
        self._commits += 1
        self._commit_log.append((self._commits, ino))

    async def allocated(self, ino: int, sealed: int) -> int:
        """Bytes of file `ino` that hold data (st_blocks): `sealed`, the total of its
        live extents, unless it has unsealed changes; then the old extents still in
        the file, the dirty ranges and the appended tail, together. Call it outside a
        transaction (it may load the extents)."""
        st = self.states.get(ino)
        if st is None or not st.dirty:
            return sealed
        extents = await self._extents(st)
        data = Intervals()
        kept = min(st.keep_below, st.size)  # older bytes past a truncate are gone
        for e in extents:
            if e.offset >= kept:
                break
            data.add(e.offset, min(e.end, kept))
        if st.overlay is not None:
            for start, end in st.overlay.ranges.overlapping(0, st.size):
                data.add(start, end)
        if st.stream is not None:
            data.add(st.stream.start, min(st.stream.end, st.size))
        return data.total

    async def _extents(self, st: FileState) -> list[Extent]:
        if st.extents is None:
            async with self.meta.reading() as tx:
                st.extents = await tx.live_extents(st.ino)
        return st.extents

    @staticmethod
    def _locked(st: FileState) -> _Locked:
        """Hold `st.lock`; while waiting for it, `st` is pinned, so it cannot be
        forgotten (and a later state() made afresh) under the waiting task."""
        return _Locked(st)

    def _forget_if_idle(self, st: FileState) -> None:
        if st.opens == 0 and not st.dirty and not st.sealing and st.pins == 0:
            if st.overlay:
                st.overlay.close()
                st.overlay = None
            self.states.pop(st.ino, None)

    async def stats(self) -> FsStats:
        """Filesystem totals, recomputed at most every few seconds (statfs is frequent)."""
        now = time.monotonic()
        if self._stats is None or now - self._stats[0] > 5.0:
            async with self.meta.reading() as tx:
                self._stats = (now, await tx.stats())
        return self._stats[1]

    # --- open / close ---------------------------------------------------------------

    async def open(
        self,
        ino: int,
        version: int | None = None,
        *,
        known: InodeAttrs | None = None,
        mark: int | None = None,
    ) -> FileState:
        """One more handle on `ino`. `version`: the inode's version as just read from
        the metadata (close-to-open: a state with nothing unsealed that another
        machine's commit made stale is read again). `known`: the inode's row as the
        caller read it after `commit_mark()` returned `mark` (a new inode's, with no
        mark: nothing can have committed it since); used instead of a read of its
        own unless this mount committed the file's contents since (a state sealed
        and forgotten meanwhile: the row would predate that commit)."""
        if known is not None and mark is not None and self.committed_since(mark, (ino,)):
            known = None
        st = await self.state(ino, known)
        if self.client is not None:
            # another mount's unlink must not free it now; pinned (the state stays
            # meanwhile); no transaction when the hold is there already
            st.pins += 1
            try:
                await self.client.hold(ino)
            finally:
                st.pins -= 1
        if version is not None and version != st.base_version:
            if not (st.dirty or st.sealing or st.pins or st.stream or st.working_version):
                async with self.meta.reading() as tx:
                    attrs = await tx.get_inode(ino)
                if attrs is not None:
                    st.size = st.sealed_size = st.keep_below = attrs.size
                    st.base_version = attrs.version
                    st.extents = None
        st.opens += 1
        return st

    def close_handle(self, ino: int) -> bool:
        """One handle fewer; True when it was the last (then call `last_close`)."""
        st = self.states.get(ino)
        if st is None:
            return False
        st.opens -= 1
        return st.opens == 0

    def forget_closed(self, ino: int) -> bool:
        """After the last close of `ino` (close_handle said so): if nothing is left to
        seal or publish (a file only read, or sealed already) and no operation on it is
        under way, forget its state now and return True, without the task and the lock
        that `last_close` takes. False: call `last_close`. Not in shared mode, where
        `last_close` also releases the file's hold."""
        st = self.states.get(ino)
        if st is None:
            return True
        if self.client is not None or st.working_version is not None or st.stream is not None:
            return False
        self._forget_if_idle(st)  # unless still open, dirty, sealing or pinned
        return ino not in self.states

    async def last_close(self, ino: int) -> None:
        """Seal and publish a file nobody has open any more."""
        st = self.states.get(ino)
        if st is not None and st.opens == 0:
            await self._seal_state(st, publish=True)
            if self.client is not None and st.opens == 0:
                self.client.release_soon(ino)  # by the next heartbeat, in one batch
            self._forget_if_idle(st)

    async def release(self, ino: int) -> int:
        """Close one handle; seal and publish on the last close. Returns opens left."""
        if self.close_handle(ino):
            await self.last_close(ino)
        st = self.states.get(ino)
        return st.opens if st else 0

    def drop(self, ino: int) -> None:
        """Forget a freed inode's unsealed state."""
        st = self.states.pop(ino, None)
        if st and st.overlay:
            st.overlay.close()

    # --- read -----------------------------------------------------------------------

    async def read(self, ino: int, offset: int, size: int) -> bytes | bytearray:
        st = await self.state(ino)
        end = min(offset + size, st.size)
        if offset >= end:
            return b""
        old_end = min(end, st.keep_below)
        extents = await self._extents(st) if offset < old_end else []
        if old_end == end and st.stream is None and st.overlay is None:
            # the common case, one block holds the whole range: no copy into a buffer
            i = _first_overlap(extents, offset)
            if i < len(extents) and extents[i].offset <= offset and extents[i].end >= end:
                ext = extents[i]
                return await self._block_bytes(ext, offset - ext.offset, end - offset, extents, i)
        buf = bytearray(end - offset)
        # no await between taking the committed extents and the stream's: a commit
        # moves extents from the stream to the metadata, never out of both at once
        streamed = st.stream.read_into(buf, offset, end) if st.stream is not None else []
        if offset < old_end:
            view = memoryview(buf)
            i = _first_overlap(extents, offset)
            last = i
            while last + 1 < len(extents) and extents[last + 1].offset < old_end:
                last += 1
            if last > i:
                # blocks of this range that are not cached are fetched side by side,
                # not one after the other (the first read of a cold file often spans two)
                missing = [
                    e.block
                    for e in extents[i : last + 1]
                    if not self.blockfiles.is_open(e.block) and not self.cache.has_block(e.block)
                ]
                if len(missing) > 1:
                    await self._fetch(missing, self._ahead(extents, last))
            while i < len(extents) and extents[i].offset < old_end:
                ext = extents[i]
                a, b = max(ext.offset, offset), min(ext.end, old_end)
                # straight from the block file into the reply: a 1 MiB read spans two
                # blocks most of the time, and each copy of it costs
                await self._block_bytes(ext, a - ext.offset, b - a, extents, i,
                                        into=view[a - offset : b - offset])  # fmt: skip
                i += 1
        for ext in streamed:
            a, b = max(ext.offset, offset), min(ext.end, end)
            buf[a - offset : b - offset] = await self._block_bytes(ext, a - ext.offset, b - a)
        if st.overlay is not None:
            st.overlay.read_into(buf, offset, end)
        # pyfuse3 replies with any buffer: a copy into a bytes object would cost a
        # second 1 MiB allocation (its page faults) and a memcpy per read
        return buf

    async def _block_bytes(
        self,
        ext: Extent,
        start: int,
        length: int,
        extents: list[Extent] | None = None,
        index: int = 0,
        *,
        into: memoryview | None = None,
    ) -> bytes:
        """Bytes of an extent's block, fetched through the daemon when not cached;
        with `into` (`length` bytes) they are read into it and b"" is returned."""
        try:
            data = self._pread_block(ext.block, start, length, into)
        except FileNotFoundError:
            # a miss while reading a file: have the blocks that follow fetched too,
            # after the one waited for
            await self._fetch([ext.block], self._ahead(extents, index))
            data = self._pread_block(ext.block, start, length, into)
        else:
            if start == 0 and extents:
                # a reader starts a cached block: keep the window ahead filled, in
                # batches (one request per block was a round trip to the daemon and
                # back, with CPU on both sides, for every block read)
                ahead = self._ahead(extents, index, READAHEAD_BATCH)
                if ahead:
                    if self.nursery is not None:
                        self.nursery.start_soon(self._prefetch, ahead)
                    else:
                        await self._prefetch(ahead)
        if data is None:
            raise FSOpError(5, f"block {ext.block.hex()} is shorter than its extent")
        return data

    def _pread_block(
        self, block_id: bytes, start: int, length: int, into: memoryview | None
    ) -> bytes | None:
        """The bytes (b"" when read `into`), None when the block file is short."""
        if into is None:
            data = self.blockfiles.pread(block_id, length, start)
            return data if len(data) == length else None
        return b"" if self.blockfiles.preadinto(block_id, into, start) == length else None

    def _ahead(
        self, extents: list[Extent] | None, index: int, at_least: int = 1
    ) -> list[bytes]:
        """Blocks of the READAHEAD_BLOCKS extents after `index` that are not cached and
        were not asked for in the last READAHEAD_ASKED_S; none while fewer than
        `at_least` are (unless the window reaches the file's end)."""
        now = time.monotonic()
        ahead: list[bytes] = []
        window = (extents or [])[index + 1 : index + 1 + READAHEAD_BLOCKS]
        if at_least > 1 and len(window) == READAHEAD_BLOCKS:
            fresh = sum(
                now - self._asked_ahead.get(nxt.block, -1e9) >= READAHEAD_ASKED_S
                for nxt in window[-at_least:]
            )
            if fresh < at_least:
                return ahead
        for nxt in window:
            block = nxt.block
            if block in ahead or now - self._asked_ahead.get(block, -1e9) < READAHEAD_ASKED_S:
                continue
            if not self.cache.has_block(block):
                ahead.append(block)
                self._asked_ahead[block] = now
        if len(self._asked_ahead) > 4 * READAHEAD_BLOCKS * 64:
            self._asked_ahead = {
                b: t for b, t in self._asked_ahead.items() if now - t < READAHEAD_ASKED_S
            }
        return ahead

    async def _prefetch(self, block_ids: list[bytes]) -> None:
        """Read-ahead is best effort: a failure shows when the block is read."""
        try:
            await self._fetch([], block_ids)
        except CloudfsError as exc:
            log.debug("read-ahead failed: %s", exc.message)

    # --- write and truncate ----------------------------------------------------------

    async def write(self, ino: int, offset: int, data: bytes) -> int:
        if self.meta.fenced is not None:
            raise FSOpError(errno.EROFS, self.meta.fenced)
        st = await self.state(ino)
        cut = False
        async with self._locked(st):
            stream = st.stream
            if stream is not None and stream.error is not None:
                await self._end_stream(st)  # raises the background cut's error
            if stream is None and can_stream(
                offset,
                st.size,
                st.sealed_size,
                st.keep_below,
                bool(st.overlay and st.overlay.ranges),
            ):
                stream = st.stream = AppendStream(
                    offset, self._take_chunker(), self.id_key, self.cache
                )
            if stream is not None and offset == stream.end == st.size:
                stream.append(data)
                cut = stream.unfed >= CUT_BATCH
                over_limit = stream.uncommitted >= DIRTY_LIMIT
            else:
                if stream is not None:
                    await self._end_stream(st)  # not an append: the overlay takes over
                if st.overlay is None:
                    st.overlay = DirtyOverlay(self.cache.dirty / str(ino))
                st.overlay.write(offset, data)
                over_limit = st.overlay.ranges.total >= DIRTY_LIMIT
            st.size = max(st.size, offset + len(data))
            st.mtime_ns = time.time_ns()
            st.last_change = time.monotonic()
        if over_limit:
            await self._seal_state(st, publish=False)
        elif cut and st.stream is not None:
            if st.stream.unfed >= BACKLOG_LIMIT or self.nursery is None:
                await self._cut_stream(st, final=False)  # the writer waits: bounded memory
            elif not st.cut_lock.locked():
                self.nursery.start_soon(self._cut_in_background, st)
        return len(data)

    async def _cut_stream(self, st: FileState, *, final: bool) -> None:
        async with _held(st.cut_lock):
            stream = st.stream
            if stream is not None and stream.error is None:
                if stream.unfed <= INLINE_CUT:
                    stream.cut(final=final)  # a small file: cheaper than a thread hop
                else:
                    await trio.to_thread.run_sync(
                        functools.partial(stream.cut, final=final), abandon_on_cancel=False
                    )
                if not final:
                    self._prestore_cut(st)

    async def _cut_in_background(self, st: FileState) -> None:
        try:
            await self._cut_stream(st, final=False)
        except Exception as exc:  # noqa: BLE001 - handed to the next writer or seal
            if st.stream is not None:
                st.stream.error = exc

    async def _end_stream(self, st: FileState) -> None:
        """Cut a stream's tail and commit it (st.lock is held); the file leaves
        stream mode. Raises the error of a failed background cut."""
        await self._seal_stream(st, publish=False, final=True, durable=False)

    async def truncate(self, ino: int, size: int) -> None:
        st = await self.state(ino)
        async with self._locked(st):
            if st.stream is not None:
                await self._end_stream(st)
            if st.overlay is not None:
                st.overlay.truncate(size)
            st.size = size
            st.keep_below = min(st.keep_below, size)
            st.mtime_ns = time.time_ns()
            st.last_change = time.monotonic()
        if st.opens == 0:
            await self._seal_state(st, publish=True)
            self._forget_if_idle(st)

    # --- history ----------------------------------------------------------------------

    async def store_version(self, src: int, version: int) -> _StoredFirst | None:
        """--upload=sync (else None): put the blocks of version `version` of file `src`
        that are still pending (left so by a mount whose store refused at unmount),
        so that a restore of it names only stored blocks. A CloudfsError when one
        cannot be put (its plaintext is on the machine that wrote it)."""
        if self.uploads is None:
            return None
        async with self.meta.reading() as tx:
            blocks = sorted({e.block for e in await tx.version_extents(src, version)})
            pending = await tx.pending_sizes(blocks)
        # they are named by the version (refcount >= 1): no collection claims them
        return await self._store_blocks(pending)

    async def restore(
        self,
        src: int,
        version: int,
        *,
        into: int | None = None,
        stored: _StoredFirst | None = None,
    ) -> tuple[int, int]:
        """Make version `version` of file `src` the live contents of file `into` (default:
        `src`) as a new version, naming the same blocks (cloudfs.versions). Unsealed
        writes of the target are sealed and published first, so they stay in its
        history. `stored`: what `store_version` returned (else it is called here).
        Returns (the new version, its size)."""
        if stored is None:
            stored = await self.store_version(src, version)
        st = await self.state(src if into is None else into)
        async with self._locked(st):
            st.sealing = True
            try:
                await self._seal_locked(st, publish=True, durable=False)
                result = await self.meta.run(self._restore_commit, st, src, version, stored)
            finally:
                st.sealing = False
        self._forget_if_idle(st)
        return result

    async def _restore_commit(
        self, st: FileState, src: int, version: int, stored: _StoredFirst | None
    ) -> tuple[int, int]:
        async with self.meta.transaction() as tx:
            new_version, size = await restore_into(
                tx, src, version, st.ino, origin=self.origin, now_ns=time.time_ns(),
                stored=stored.sizes if stored is not None else None,
            )  # fmt: skip
            st.extents = await tx.live_extents(st.ino)
        self._committed(st.ino)
        st.size = st.sealed_size = st.keep_below = size
        st.mtime_ns = None
        st.working_version = None
        st.base_version = new_version
        if self.on_commit is not None:
            self.on_commit(st.ino, new_version)
        return new_version, size

    async def read_version(
        self, extents: list[Extent], size: int, offset: int, length: int
    ) -> bytes:
        """Bytes [offset, offset + length) of a file version of `size` bytes made of
        `extents` (by offset); holes read as zeros."""
        end = min(offset + length, size)
        if offset >= end:
            return b""
        buf = bytearray(end - offset)
        i = _first_overlap(extents, offset)
        while i < len(extents) and extents[i].offset < end:
            ext = extents[i]
            a, b = max(ext.offset, offset), min(ext.end, end)
            data = await self._block_bytes(ext, a - ext.offset, b - a, extents, i)
            buf[a - offset : b - offset] = data
            i += 1
        return bytes(buf)

    # --- seal -------------------------------------------------------------------------

    async def fsync(self, ino: int) -> None:
        st = self.states.get(ino)
        if st is not None and st.dirty and self.meta.fenced is not None:
            # never sealed here any more: the unsealed writes are not durable
            raise FSOpError(errno.EROFS, self.meta.fenced)
        if st is not None:
            await self.seal(ino, publish=True, durable=True)

    async def seal_idle(self, idle_s: float = IDLE_SEAL_S) -> None:
        now = time.monotonic()
        for st in list(self.states.values()):
            if st.dirty and not st.sealing and now - st.last_change >= idle_s:
                await self.seal(st.ino, publish=True)
                self._forget_if_idle(st)

    async def seal_all(self) -> None:
        for st in list(self.states.values()):
            await self.seal(st.ino, publish=True)
            self._forget_if_idle(st)

    async def seal(self, ino: int, *, publish: bool, durable: bool = False) -> None:
        st = self.states.get(ino)
        if st is not None:
            await self._seal_state(st, publish=publish, durable=durable)

    async def _seal_state(self, st: FileState, *, publish: bool, durable: bool = False) -> None:
        if self.meta.fenced is not None:
            return  # a fenced mount seals nothing (see MetaStore.fence)
        async with self._locked(st):
            st.sealing = True
            try:
                await self._seal_locked(st, publish=publish, durable=durable)
            finally:
                st.sealing = False

    async def _sync_blocks(self, st: FileState, written: list[bytes]) -> None:
        """Sync the file's block files not synced yet and `written`, all at once on
        worker threads (before the durable commit that names them); on failure they
        stay in `st.unsynced` for the next try."""
        earlier, st.unsynced = [*st.unsynced, *written], []
        try:
            await trio.to_thread.run_sync(self.cache.sync_blocks, earlier, [])
        except BaseException:
            st.unsynced.extend(earlier)
            raise

    async def _seal_locked(self, st: FileState, *, publish: bool, durable: bool) -> None:
        if st.stream is not None:
            await self._seal_stream(st, publish=publish, final=publish, durable=durable)
            return
        if not st.dirty:
            if durable and st.unsynced:
                # block files before the WAL sync that makes the commits naming them
                # durable
                await self._sync_blocks(st, [])
            if publish and st.working_version is not None:
                await self.meta.run(
                    self._commit, st, [], [], publish=True, durable=durable, size=st.size
                )
            elif durable:
                async with self.meta.transaction(durable=True):
                    pass  # syncs the WAL: earlier commits of this file become durable
            return
        extents = await self._extents(st)
        plan = self._plan(st, extents, hold_tail=not publish)
        result = await trio.to_thread.run_sync(self._rechunk, st, plan, abandon_on_cancel=False)
        if durable:
            await self._sync_blocks(st, result.written)  # before the commit naming them
        else:
            st.unsynced.extend(result.written)
        replaced = [e for e in plan.old if e.offset < result.stop or e.offset >= plan.size]
        size = st.size
        try:
            stored = await self._store_first(result.extents) if self.uploads is not None else None
            needs = await self._commit_stored(
                st, replaced, result.extents, publish=publish, durable=durable,
                size=size, holds=result.holds, stored=stored,
            )  # fmt: skip
        finally:
            CacheDir.release_holds(list(result.holds.values()))
        # the overlay's sealed part is now in blocks
        if st.overlay is not None:
            if result.tail is not None:
                st.overlay.keep_from(result.tail)
            else:
                st.overlay.clear()
        st.sealed_size = size
        st.keep_below = size
        self._on_sealed()
        await self._wait_stored(needs)

    async def _seal_stream(
        self, st: FileState, *, publish: bool, final: bool, durable: bool
    ) -> None:
        """Commit what an append stream has cut (all of it when `final`)."""
        stream = st.stream
        assert stream is not None
        await self._cut_stream(st, final=final)
        if stream.error is not None:
            error, stream.error = stream.error, None
            st.stream = None  # its uncommitted bytes are lost: the writer is told
            self._give_chunker(stream.chunker)
            st.size = st.sealed_size
            raise error
        extents, written, holds, boundary = stream.take_extents()
        size = st.size
        try:
            if durable:
                # the block files first, then the durable commit that names them: a
                # crash between the two never leaves metadata naming lost plaintext.
                # Their writeback started as each was written, so this mostly waits
                # for the last few and one journal commit
                await self._sync_blocks(st, written)
            else:
                st.unsynced.extend(written)
            stored = (
                await self._stream_stored_first(st, extents) if self.uploads is not None else None
            )
            needs = await self._commit_stored(
                st, [], extents, publish=publish, durable=durable, size=size,
                holds=holds, stored=stored,
            )  # fmt: skip
        finally:
            CacheDir.release_holds(list(holds.values()))
        stream.committed(len(extents), boundary)
        for e in extents:
            st.prestored.pop(e.block, None)
        st.sealed_size = size
        st.keep_below = size
        if final:
            st.stream = None
            self._give_chunker(stream.chunker)
        self._on_sealed()
        await self._wait_stored(needs)

    async def _commit_stored(
        self,
        st: FileState,
        replaced: list[Extent],
        new: list[Extent],
        *,
        stored: _StoredFirst | None,
        **kwargs: object,
    ) -> list[bytes]:
        """`_commit` of a seal; with --upload=sync, when garbage collection overtook
        its PUTs (`_StoreRaced`), its blocks are put again and the commit is tried
        again, so it never names a block whose object is not there."""
        attempt = 1
        while True:
            try:
                return await self.meta.run(
                    self._commit, st, replaced, new, stored=stored, **kwargs
                )
            except _StoreRaced as race:
                if attempt == STORE_TRIES:
                    raise StoreError(f"inode {st.ino}: {race} ({attempt} times in a row);"
                                     " the writes stay unsealed") from None  # fmt: skip
                log.info("inode %d: %s: its blocks are stored again", st.ino, race)
                attempt += 1
                stored = await self._store_first(new)

    async def _store_first(self, extents: list[Extent]) -> _StoredFirst:
        """--upload=sync: put the blocks that `extents` (a seal's new ones, each a whole
        chunk) name and that are not stored yet, before the commit that names them,
        for the commit to record them `stored`. Their plaintext is in the cache dir:
        the seal wrote each block file or holds it."""
        return await self._store_blocks({e.block: e.length for e in extents})

    async def _store_blocks(self, sizes: dict[bytes, int]) -> _StoredFirst:
        """`_store_first` of the blocks {id: plaintext size}.

        A block without a row or with a `pending` one (this machine's, or another's
        whose upload is not done) is put: the object is the same whoever puts it.
        A `stored` one needs nothing. A `deleting` or `revived` one (claimed by a
        garbage collection pass, which may still delete its object) is waited for
        until the pass is done with it (`_wait_unclaimed`), and then put."""
        assert self.uploads is not None
        if not sizes:
            return _StoredFirst()
        held: dict[bytes, Path] = {}
        try:
            while True:
                async with self.meta.reading() as tx:
                    # before the PUTs: a collection batch finished after this makes
                    # the commit distrust them (cloudfs.gc)
                    done = _StoredFirst(gc_epoch=await gc.epoch(tx))
                    states = await tx.block_states(list(sizes))
                claimed = [b for b, s in states.items() if s in gc.CLAIMED]
                if not claimed:
                    break
                # the pass's last step deletes their cache files: held for the PUTs
                await trio.to_thread.run_sync(self._hold, claimed, held)
                await self._wait_unclaimed(claimed)
                await trio.to_thread.run_sync(self._restore_held, held)
            await self._put(sizes, states, done)
        finally:
            if held:
                CacheDir.release_holds(list(held.values()))
        return done

    def _hold(self, block_ids: list[bytes], held: dict[bytes, Path]) -> None:
        for block_id in block_ids:
            if block_id not in held and (hold := self.cache.hold_block(block_id)) is not None:
                held[block_id] = hold

    def _restore_held(self, held: dict[bytes, Path]) -> None:
        for block_id, hold in held.items():
            self.cache.restore_held(block_id, hold)

    async def _put(self, sizes: dict[bytes, int], states: dict[bytes, int], done: _StoredFirst) -> None:
        """The PUTs of `_store_blocks`: those of `sizes` without a row or pending in
        `states`, into `done`."""
        assert self.uploads is not None
        todo = [(b, n) for b, n in sizes.items() if states.get(b, BLOCK_PENDING) == BLOCK_PENDING]
        give_up, pause = time.monotonic() + self.unmount_store_wait_s, 0.5
        while True:
            try:
                left = [(b, n) for b, n in todo if b not in done.sizes]
                for i in range(0, len(left), STORE_BATCH):
                    done.sizes.update(await self.uploads.store(left[i : i + STORE_BATCH]))
                return
            except CloudfsError as exc:
                if not self.unmounting:
                    raise  # nothing committed: the writes stay unsealed, sealed again later
                wait = min(pause, give_up - time.monotonic())
                if wait <= 0:
                    done.complete = False
                    log.warning("%d blocks cannot be stored (%s): committed pending at "
                                "unmount; the daemon uploads them, other machines read them "
                                "as I/O errors until then", len(todo) - len(done.sizes),
                                exc.message)  # fmt: skip
                    return
                log.warning("%d blocks cannot be stored at unmount (%s): trying again",
                            len(todo) - len(done.sizes), exc.message)  # fmt: skip
                await trio.sleep(wait)
                pause = min(2 * pause, 5.0)

    async def _wait_unclaimed(self, claimed: list[bytes]) -> None:
        """Return once no garbage collection pass holds any of the `claimed` blocks
        (each row gone, or `pending` again): a running pass is waited for; what one
        that stopped halfway left claimed, the daemon finishes now."""
        assert self.uploads is not None
        log.info("%d blocks to store were claimed by garbage collection: waiting until "
                 "it is done with them", len(claimed))  # fmt: skip
        pause = 0.02
        while True:
            finished = await self.uploads.finish_collection()
            async with self.meta.reading() as tx:
                claimed = await gc.claimed(tx, claimed)
            if not claimed:
                return
            if not finished:  # a pass runs: it finishes them itself
                await trio.sleep(pause)
                pause = min(2 * pause, CLAIMED_POLL_S)

    async def _stream_stored_first(self, st: FileState, extents: list[Extent]) -> _StoredFirst:
        """`_store_first` for an append stream's commit: the blocks put ahead of it
        (`_prestore`, once those under way are done) are not put again."""
        while st.prestoring:
            await st.prestore_idle.wait()
        ahead = _StoredFirst()
        for e in extents:
            put = st.prestored.get(e.block)
            if put is not None:
                ahead.add(_StoredFirst({e.block: put[0]}, put[1]))
        rest = [e for e in extents if e.block not in ahead.sizes]
        done = await self._store_first(rest)
        done.add(ahead)
        return done

    def _prestore_cut(self, st: FileState) -> None:
        """--upload=sync: have the blocks an append stream cut since the last call
        put in the store now, in the background, while the writes go on; its commit
        (at the dirty limit, idle or close) then waits only for what is left, instead
        of writing and uploading by turns."""
        stream = st.stream
        if self.uploads is None or self.nursery is None or stream is None:
            return
        new = [e for e in stream.cut_extents() if e.block not in st.prestored]
        if new:
            for e in new:
                st.prestored[e.block] = None
            st.prestoring += 1
            self.nursery.start_soon(self._prestore, st, new)

    async def _prestore(self, st: FileState, extents: list[Extent]) -> None:
        done = _StoredFirst()
        try:
            done = await self._store_first(extents)
        except Exception as exc:  # noqa: BLE001 - the commit puts them again, and reports
            message = exc.message if isinstance(exc, CloudfsError) else repr(exc)
            log.info("storing %d blocks ahead of their commit failed (the commit tries "
                     "again): %s", len(extents), message)  # fmt: skip
        finally:
            # also when cancelled: a commit waits for `prestoring` to reach 0
            for e in extents:
                if e.block in done.sizes:
                    st.prestored[e.block] = (done.sizes[e.block], done.gc_epoch)
                elif st.prestored.get(e.block, 0) is None:
                    del st.prestored[e.block]  # stored already, or failed: the commit looks
            st.prestoring -= 1
            if st.prestoring == 0:
                st.prestore_idle.set()
                st.prestore_idle = trio.Event()

    async def _wait_stored(self, needs: list[bytes]) -> None:
        """--upload=sync: a commit at unmount, whose blocks the store refused, left
        `needs` pending: return once they are stored (the daemon retries)."""
        if self.uploads is not None and needs:
            await self.uploads.flush(needs)

    def _plan(self, st: FileState, extents: list[Extent], *, hold_tail: bool) -> _SealPlan:
        changed: list[int] = []
        if st.overlay is not None and st.overlay.ranges:
            changed.append(st.overlay.ranges.first)
        truncated = st.keep_below < st.sealed_size
        if truncated:
            changed.append(st.keep_below)
        if st.size > st.sealed_size:
            changed.append(st.sealed_size)  # grown: maybe only a hole, which costs nothing
        first = min(changed) if changed else st.size
        start = first
        i = _first_overlap(extents, first)
        if i < len(extents) and extents[i].offset <= first:
            start = extents[i].offset
        elif (
            first >= st.sealed_size
            and extents
            and extents[-1].end == st.sealed_size
            and not truncated
        ):
            # appending: re-chunk the last block too, it was cut by the old end of file
            start = extents[-1].offset
        if truncated:
            last_changed: float = float("inf")
        else:
            last_changed = st.overlay.ranges.last if st.overlay and st.overlay.ranges else 0
        old = [e for e in extents if e.offset >= start]
        # holding the tail back is only sound where nothing old lies under it
        hold = hold_tail and not truncated and (not old or old[-1].end <= start)
        return _SealPlan(start, st.size, st.keep_below, last_changed, old, hold)

    def _rechunk(self, st: FileState, plan: _SealPlan) -> _SealResult:
        """Chunk, hash and cache the changed range (runs in a worker thread)."""
        old_ends = {e.end for e in plan.old if e.end <= plan.keep_below}
        runs = _data_runs(plan, st)
        new: list[Extent] = []
        written: list[bytes] = []
        holds: dict[bytes, Path] = {}
        chunker = self._take_chunker()  # list pop/append are atomic: safe from a thread

        def emit(chunk: bytes | bytearray, at: int) -> None:
            if _native.is_zero(chunk):
                return  # a hole: costs nothing in the store
            block_id = _native.block_id(self.id_key, chunk)
            if block_id not in holds and block_id not in written:
                hold = self.cache.hold_block(block_id)
                if hold is None:
                    self.cache.write_block(block_id, chunk, durable=False, sync_soon=True)
                    written.append(block_id)
                else:
                    holds[block_id] = hold
            new.append(Extent(at, len(chunk), block_id))

        stop = plan.size
        tail: int | None = None
        for run_no, (rs, re) in enumerate(runs):
            if rs >= plan.last_changed and rs in {e.offset for e in plan.old}:
                stop = rs  # nothing changed from here on
                break
            chunker.reset()
            pos = rs
            pending = bytearray()
            done = False
            for piece in range(rs, re, PIECE):
                data = self._merged(st, plan, piece, min(piece + PIECE, re))
                pending += data
                for length in chunker.feed(data):
                    emit(pending[:length], pos)
                    del pending[:length]
                    pos += length
                    if pos >= plan.last_changed and pos in old_ends:
                        stop, done = pos, True
                        break
                if done:
                    break
            if done:
                break
            chunker.finish()
            if pending:
                last_run = run_no == len(runs) - 1
                if plan.hold_tail and last_run and re == plan.size:
                    tail = pos
                    stop = plan.size
                else:
                    emit(pending, pos)
        self._give_chunker(chunker)
        return _SealResult(new, stop, tail, written, holds)

    def _merged(self, st: FileState, plan: _SealPlan, start: int, end: int) -> bytearray:
        """File bytes [start, end) as the seal sees them: overlay over old blocks."""
        buf = bytearray(end - start)
        old_end = min(end, plan.keep_below)
        for ext in plan.old:
            if ext.offset >= old_end:
                break
            a, b = max(ext.offset, start), min(ext.end, old_end)
            if a < b:
                try:
                    data = self.blockfiles.pread(ext.block, b - a, a - ext.offset)
                except FileNotFoundError:
                    trio.from_thread.run(self._fetch, [ext.block], [])
                    data = self.blockfiles.pread(ext.block, b - a, a - ext.offset)
                buf[a - start : b - start] = data
        if st.overlay is not None:
            st.overlay.read_into(buf, start, end)
        return buf

    def _ensure_plaintext(self, block_id: bytes, holds: dict[bytes, Path]) -> None:
        """The block file is in the cache dir, put back from its hold if it went."""
        if self.cache.has_block(block_id):
            return
        hold = holds.get(block_id)
        if hold is None or not self.cache.restore_held(block_id, hold):
            raise PlaintextMissing(f"block {block_id.hex()}")
        log.info("block %s came back from its hold (gone from the cache meanwhile)",
                 block_id.hex())  # fmt: skip

    async def _commit(
        self,
        st: FileState,
        replaced: list[Extent],
        new: list[Extent],
        *,
        publish: bool,
        durable: bool,
        size: int,
        holds: dict[bytes, Path] | None = None,
        stored: _StoredFirst | None = None,
    ) -> list[bytes]:
        """Replace extents and count references in one transaction (run through
        MetaStore.run: everything it changes outside the database it sets afresh).
        `stored`: blocks already put in the store ({id: stored size}, see
        `_store_first`): their rows are made or marked `stored`. Returns the blocks
        it made or revived `pending`.

        A block this commit makes pending — a new one, or one a deletion pass had
        claimed (cloudfs.gc) — must have its plaintext in the cache dir when the
        transaction commits: it is checked inside the transaction (a deletion pass
        removes block files only inside its own), and a block file that went since
        the seal looked is put back from the seal's hold on it."""
        now = time.time_ns()
        refs: dict[bytes, tuple[int, int]] = {}
        for e in new:
            _, n = refs.get(e.block, (0, 0))
            refs[e.block] = (e.length, n + 1)
        # --upload=sync: the commit names no block whose object may be missing
        strict = stored is not None and stored.complete
        async with self.meta.transaction(durable=durable) as tx:
            put: dict[bytes, int] = {}
            if stored is not None and stored.sizes:
                if await gc.epoch(tx) == stored.gc_epoch:
                    put = stored.sizes
                elif strict:
                    # a collection batch finished since the first PUT: it may have
                    # deleted one of those objects after it was put (cloudfs.gc)
                    raise _StoreRaced("garbage collection finished a batch during its PUTs")
                else:
                    log.info("inode %d: garbage collection ran during the seal: its %d "
                             "blocks are uploaded again", st.ino, len(stored.sizes))  # fmt: skip
            attrs = await tx.get_inode(st.ino)
            if attrs is None:
                return []  # freed meanwhile
            stale = attrs.version != st.base_version
            if not stale and self.client is not None and st.extents is not None:
                # shared mode: another mount may have amended its unpublished working
                # version (same number, other extents) since this one read them
                stale = await tx.live_extents(st.ino) != st.extents
            if stale:
                # another mount committed since this one read the file: the later
                # commit (this one) wins with the whole file as this mount sees it,
                # and the one it overwrites stays in the history, marked a conflict
                version = attrs.version + 1
                gone = {(e.offset, e.block) for e in replaced}
                ours = st.extents
                if ours is None:
                    ours = await tx.version_extents(st.ino, st.base_version)
                kept = [e for e in ours if (e.offset, e.block) not in gone]
                new = sorted(
                    [e for e in kept if e.offset < size] + list(new), key=lambda e: e.offset
                )
                refs = {}
                for e in new:
                    _, n = refs.get(e.block, (0, 0))
                    refs[e.block] = (e.length, n + 1)
                theirs = await tx.live_extents(st.ino)
                await tx.close_extents(st.ino, version, [e.offset for e in theirs])
                await tx.conn.execute(
                    "UPDATE versions SET flags = flags | ? WHERE inode = ? AND version = ?",
                    (CONFLICT, st.ino, attrs.version),
                )
                log.info("inode %d: version %d overwrites version %d, committed meanwhile by"
                         " another mount (kept as a conflict)", st.ino, version, attrs.version)
                publish = True
            else:
                version = st.working_version or attrs.version + 1
                # rows born in the unpublished working version are no one's history
                born_now = [e for e in replaced if e.v_from == version]
                await tx.drop_extents(st.ino, born_now, now)
                await tx.close_extents(
                    st.ino, version, [e.offset for e in replaced if e.v_from != version]
                )
            # a block's size is its chunk's length (a block may back shorter extents later)
            needs = await tx.add_block_refs(refs, now, stored=put)
            if needs and strict:
                # a block read as stored was claimed (or even deleted) by garbage
                # collection since: wait for the pass, put it, commit again
                raise _StoreRaced(f"garbage collection claimed {len(needs)} of its blocks")
            for block_id in needs:
                self._ensure_plaintext(block_id, holds or {})
            await tx.add_extents(st.ino, version, new)
            mtime = st.mtime_ns or attrs.mtime_ns
            await tx.update_inode(
                st.ino,
                size=size,
                mtime_ns=mtime,
                ctime_ns=max(mtime, attrs.ctime_ns),
                version=version,
            )
            if publish:
                await tx.add_version(st.ino, version, size=size, mtime_ns=mtime, origin=self.origin)
            st.extents = await tx.live_extents(st.ino)
        self._committed(st.ino)
        st.working_version = None if publish else version
        st.base_version = version
        st.mtime_ns = None
        if self.on_commit is not None:
            self.on_commit(st.ino, version)
        return needs


class _held:  # (a lowercase name: used as `async with _held(lock)`)
    """`async with lock`, minus the pass through the scheduler that a trio.Lock's
    acquire() makes even when the lock is free (per small file, those passes cost more
    than the seal's own work on a busy mount). Not a checkpoint when it is free. A
    class, not an async generator, for the same reason (see meta.base._Transaction)."""

    __slots__ = ("_lock",)

    def __init__(self, lock: trio.Lock) -> None:
        self._lock = lock

    async def __aenter__(self) -> None:
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self._lock.release()


class _Locked(_held):
    """`FileStore._locked`: `st.lock` held, `st` pinned while waiting and holding."""

    __slots__ = ("_st",)

    def __init__(self, st: FileState) -> None:
        super().__init__(st.lock)
        self._st = st

    async def __aenter__(self) -> FileState:  # type: ignore[override]
        st = self._st
        st.pins += 1
        try:
            await _held.__aenter__(self)
        except BaseException:
            st.pins -= 1
            raise
        return st

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            self._lock.release()
        finally:
            self._st.pins -= 1


class PlaintextMissing(CloudfsError):
    """the plaintext of a block this seal needs left the cache dir"""


def _first_overlap(extents: list[Extent], offset: int) -> int:
    """Index of the first extent ending after `offset`."""
    lo, hi = 0, len(extents)
    while lo < hi:
        mid = (lo + hi) // 2
        if extents[mid].end <= offset:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _data_runs(plan: _SealPlan, st: FileState) -> list[tuple[int, int]]:
    """Maximal ranges within [plan.start, plan.size) that hold data (old or dirty);
    the gaps between them are holes and are not chunked."""
    spans: list[tuple[int, int]] = []
    limit = min(plan.size, plan.keep_below)
    for e in plan.old:
        a, b = max(e.offset, plan.start), min(e.end, limit)
        if a < b:
            spans.append((a, b))
    if st.overlay is not None:
        spans.extend(st.overlay.ranges.overlapping(plan.start, plan.size))
    spans.sort()
    runs: list[tuple[int, int]] = []
    for a, b in spans:
        if runs and a <= runs[-1][1]:
            runs[-1] = (runs[-1][0], max(runs[-1][1], b))
        else:
            runs.append((a, b))
    return runs


def clear_stale_overlays(cache: CacheDir) -> None:
    """Remove overlays a crashed mount left behind (never acknowledged by fsync), and
    its holds on block files."""
    for p in cache.dirty.iterdir():
        os.unlink(p)
    cache.clear_holds()
