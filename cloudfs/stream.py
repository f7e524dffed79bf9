"""Append streams: a file written sequentially is chunked as its bytes arrive.

`cp`, `dd`, `tar -x` and downloads write a new file front to back. Routing those
bytes through the dirty overlay would write them to disk twice and read them back
at the seal. An append stream instead keeps the bytes after the last cut point in
memory, feeds the streaming chunker as data comes in, and turns each complete chunk
into a block file at once (on a worker thread, while the next writes arrive). The
seal then only commits the extents the stream produced.

A stream covers [start, end) of its file: start was the end of the sealed data when
the stream began, and nothing old lies past it. Any write that is not an append at
the end of the file, and any truncate, ends the stream first (its tail is cut and its
extents committed) and then takes the overlay path.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from cloudfs import _native
from cloudfs.cache import CacheDir, ThreadPool
from cloudfs.meta.base import Extent

#: unprocessed bytes that make a write hand the buffer to the chunker
CUT_BATCH = 4 << 20
#: unprocessed bytes past which a writer waits for the chunker (memory bound)
BACKLOG_LIMIT = 4 * CUT_BATCH


#: threads that hash and write the chunks of one cut at once (shared by all streams)
BLOCK_THREADS = 3
_block_pool = ThreadPool(BLOCK_THREADS, "cloudfs-cut")


@dataclass
class AppendStream:
    """The unsealed appended bytes of one file: cut extents and the uncut tail."""

    start: int
    #: a reset streaming chunker of the filesystem's parameters (making one derives
    #: its gear table: FileStore keeps a few to hand out)
    chunker: _native.Chunker
    id_key: bytes
    cache: CacheDir
    #: extents cut but not committed to the metadata yet, in file order
    extents: list[Extent] = field(default_factory=list)
    #: block files written by the stream and not fsynced
    written: list[bytes] = field(default_factory=list)
    #: block files the stream re-uses, held until the commit (CacheDir.hold_block)
    holds: dict[bytes, Path] = field(default_factory=dict)
    #: bytes after the last cut, as the writes brought them (immutable, never copied
    #: on arrival): pieces[0][head:] is file offset `tail_start`
    pieces: deque[bytes] = field(default_factory=deque)
    head: int = 0
    #: bytes in `pieces` past `head`
    buffered: int = 0
    tail_start: int = 0
    #: bytes after `tail_start` already fed to the chunker
    fed: int = 0
    #: an error of a background cut, raised to the next writer or seal
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.tail_start = self.start
        # guards pieces/extents/tail_start against readers while a cut runs in a thread
        self._lock = threading.Lock()

    @property
    def end(self) -> int:
        return self.tail_start + self.buffered

    @property
    def unfed(self) -> int:
        return self.buffered - self.fed

    @property
    def uncommitted(self) -> int:
        """Bytes the metadata does not know yet (cut extents and the tail)."""
        return self.end - self.start

    def append(self, data: bytes) -> None:
        if not isinstance(data, bytes):
            data = bytes(data)  # a piece must never change under the chunker
        with self._lock:
            self.pieces.append(data)
            self.buffered += len(data)

    def _unfed_views(self) -> list[memoryview]:
        """The bytes not fed to the chunker yet, as views of the pieces (lock held)."""
        views: list[memoryview] = []
        skip = self.head + self.fed
        for piece in self.pieces:
            if skip >= len(piece):
                skip -= len(piece)
                continue
            views.append(memoryview(piece)[skip:])
            skip = 0
        return views

    def _slice(self, skip: int, length: int) -> bytes | memoryview:
        """`length` bytes of the tail from `skip` bytes past its start: a view when one
        piece holds them, else one copy (lock held; the pieces never change)."""
        parts: list[memoryview] = []
        pos = -self.head  # tail offset of the current piece's first byte
        start, need = skip, length
        for piece in self.pieces:
            if pos + len(piece) > start:
                a = start - pos
                take = min(need, len(piece) - a)
                parts.append(memoryview(piece)[a : a + take])
                need -= take
                start += take
                if not need:
                    break
            pos += len(piece)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _drop_front(self, length: int) -> None:
        """The first `length` bytes of the tail became a chunk (lock held)."""
        self.head += length
        while self.pieces and self.head >= len(self.pieces[0]):
            self.head -= len(self.pieces.popleft())
        self.buffered -= length
        self.fed -= length
        self.tail_start += length

    def cut(self, *, final: bool) -> None:
        """Feed what is buffered to the chunker and make block files of the chunks it
        completes (blocking: run it in a worker thread). `final` cuts the tail too.

        Each byte is copied at most once here (a chunk that spans two writes is
        joined); the chunker and the hash read the writes' own buffers."""
        with self._lock:
            views = self._unfed_views()
            self.fed = self.buffered
        lengths: list[int] = []
        for view in views:
            lengths.extend(self.chunker.feed(view))
        if final:
            last = self.chunker.finish()
            if last:
                lengths.append(last)
        if not lengths:
            return
        with self._lock:
            chunks: list[tuple[bytes | memoryview, int]] = []
            skip = 0
            for length in lengths:
                chunks.append((self._slice(skip, length), self.tail_start + skip))
                skip += length
        # hashing and writing release the GIL: the chunks of one cut go in parallel
        if len(chunks) == 1:
            made = [self._store_chunk(chunks[0])]
        else:
            made = list(_block_pool.get().map(self._store_chunk, chunks))
        with self._lock:
            # the chunks' bytes leave the tail as their extents appear, in file order:
            # a reader finds them in one place or the other
            for (chunk, _at), (extent, written, hold) in zip(chunks, made):
                if extent is not None:
                    self.extents.append(extent)
                if written is not None:
                    self.written.append(written)
                if hold is not None:
                    if extent is not None and extent.block not in self.holds:
                        self.holds[extent.block] = hold
                    else:  # held twice by chunks of one cut
                        CacheDir.release_holds([hold])
                self._drop_front(len(chunk))

    def _store_chunk(
        self, chunk_at: tuple[bytes | memoryview, int]
    ) -> tuple[Extent | None, bytes | None, Path | None]:
        """Name a chunk and make sure its block file exists (blocking, thread-safe):
        its extent (None: a hole), the id of the block file it wrote, or the hold it
        took on an existing one."""
        chunk, at = chunk_at
        if _native.is_zero(chunk):
            return None, None, None  # a hole: costs nothing in the store
        block_id = _native.block_id(self.id_key, chunk)
        extent = Extent(at, len(chunk), block_id)
        if block_id in self.holds:
            return extent, None, None
        hold = self.cache.hold_block(block_id)
        if hold is not None:
            return extent, None, hold
        self.cache.write_block(block_id, chunk, durable=False, sync_soon=True)
        return extent, block_id, None

    def cut_extents(self) -> list[Extent]:
        """The extents cut and not committed yet (a copy)."""
        with self._lock:
            return list(self.extents)

    def take_extents(self) -> tuple[list[Extent], list[bytes], dict[bytes, Path], int]:
        """What a commit may take: the extents cut so far, their new block files, the
        holds on the block files they re-use (the caller releases them after the
        commit), and the offset up to which the stream is then committed (holes
        included). The extents stay readable here until `committed` drops them, so a
        reader never finds them in neither place."""
        with self._lock:
            extents = list(self.extents)
            boundary = self.tail_start
            written, self.written = self.written, []
            holds, self.holds = self.holds, {}
        return extents, written, holds, boundary

    def committed(self, count: int, boundary: int) -> None:
        """The metadata now holds the first `count` extents and everything below
        `boundary`."""
        with self._lock:
            del self.extents[:count]
            self.start = max(self.start, boundary)

    def read_into(self, buf: bytearray, offset: int, end: int) -> list[Extent]:
        """Copy the stream's bytes within [offset, end) into buf (buf[0] is `offset`).
        Returns the cut extents in range whose block files must be read by the
        caller (they could be fetched if evicted; normally they are cached)."""
        with self._lock:
            extents = [e for e in self.extents if e.offset < end and e.end > offset]
            pos = self.tail_start - self.head  # file offset of pieces[0][0]
            for piece in self.pieces:
                a, b = max(offset, pos, self.tail_start), min(end, pos + len(piece))
                if a < b:
                    buf[a - offset : b - offset] = memoryview(piece)[a - pos : b - pos]
                pos += len(piece)
                if pos >= end:
                    break
        return extents


def can_stream(
    offset: int, size: int, sealed_size: int, keep_below: int, has_overlay: bool
) -> bool:
    """May a write at `offset` start an append stream? Only a write at the end of a
    file whose sealed data reaches exactly there and that has nothing else dirty."""
    return offset == size == sealed_size == keep_below and not has_overlay
