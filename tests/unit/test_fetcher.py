"""The daemon's fetcher: which GETs it starts when. A read that misses goes first (no
read-ahead GET starts while it waits); a read of a block already in flight as
read-ahead holds nothing back. The store here lets the test decide when each GET
answers, so what is asserted is the order in which GETs start, not timing."""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from cloudfs.daemon.fetcher import KEEP_PAGES_BLOCKS, Fetcher
from posixutil import cached_pages

from cloudfs.cache import SYNC_SOON_MIN, CacheDir


class GatedStore:
    """get_sealed_into waits until the test releases the block; `started` lists the GETs in
    the order they began. The "object" is the plaintext itself."""

    def __init__(self) -> None:
        self.started: list[bytes] = []
        self._release: dict[bytes, trio.Event] = {}

    def release(self, block_id: bytes) -> None:
        self._release.setdefault(block_id, trio.Event()).set()

    async def get_sealed_into(self, block_id: bytes, buffer: bytearray) -> memoryview:
        self.started.append(block_id)
        await self._release.setdefault(block_id, trio.Event()).wait()
        return memoryview(block_id * 100)

    def open_sealed_into(self, block_id: bytes, body: memoryview, buffer: bytearray) -> memoryview:
        return body


def _block(n: int) -> bytes:
    return bytes([n]) * 32


async def _until(condition: Callable[[], bool], what: str) -> None:
    """Poll (the fetcher writes block files in worker threads) with a generous limit."""
    with trio.move_on_after(60):
        while not condition():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"waited 60 s for {what}")


def _fetcher(tmp_path: Path) -> tuple[Fetcher, GatedStore, CacheDir]:
    cache = CacheDir(tmp_path / "cache")
    cache.create()
    store = GatedStore()
    return Fetcher(cache, store, fetches=8), store, cache  # type: ignore[arg-type]


async def test_a_missed_read_goes_before_the_read_ahead(tmp_path: Path) -> None:
    fetcher, store, cache = _fetcher(tmp_path)
    a, ahead = _block(1), [_block(n) for n in range(2, 6)]
    async with trio.open_nursery() as nursery:
        await nursery.start(fetcher.run)
        done = trio.Event()

        async def read() -> None:
            await fetcher.fetch([a], ahead)
            done.set()

        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        assert store.started == [a]  # the read-ahead waits for the missed block

        store.release(a)
        await _until(done.is_set, "the read")
        assert cache.block_path(a).read_bytes() == a * 100
        await _until(lambda: len(store.started) == 5, "the read-ahead GETs")
        assert set(store.started[1:]) == set(ahead)

        for block in ahead:
            store.release(block)
        await _until(lambda: all(cache.has_block(b) for b in ahead), "the read-ahead")
        nursery.cancel_scope.cancel()


async def test_a_read_of_a_block_in_flight_holds_no_read_ahead_back(tmp_path: Path) -> None:
    fetcher, store, cache = _fetcher(tmp_path)
    b1, b2, b3 = _block(1), _block(2), _block(3)
    async with trio.open_nursery() as nursery:
        await nursery.start(fetcher.run)
        await fetcher.fetch([], [b1])  # read-ahead: returns at once
        await trio.testing.wait_all_tasks_blocked()
        assert store.started == [b1]

        # a sequential reader reaches b1 while its GET runs, and asks for more ahead
        nursery.start_soon(fetcher.fetch, [b1], [b2, b3])
        await trio.testing.wait_all_tasks_blocked()
        assert store.started[0] == b1 and sorted(store.started[1:]) == [b2, b3]

        for block in (b1, b2, b3):
            store.release(block)
        await _until(lambda: all(cache.has_block(b) for b in (b1, b2, b3)), "the blocks")
        nursery.cancel_scope.cancel()


async def test_a_queued_read_ahead_that_a_read_needs_goes_first(tmp_path: Path) -> None:
    fetcher, store, cache = _fetcher(tmp_path)
    blocks = [_block(n) for n in range(1, 12)]
    async with trio.open_nursery() as nursery:
        await nursery.start(fetcher.run)
        await fetcher.fetch([], blocks[:8])  # 6 read-ahead slots of 8 GETs
        await trio.testing.wait_all_tasks_blocked()
        running = list(store.started)  # (trio starts tasks in no fixed order)
        assert len(running) == 6 and set(running) < set(blocks[:8])
        queued = [b for b in blocks[:8] if b not in running]

        # a read needs a queued one: it starts at once, and the other queued one and
        # the read-ahead asked for with the read wait, though a read-ahead slot frees
        done = trio.Event()

        async def read() -> None:
            await fetcher.fetch([queued[0]], blocks[8:])
            done.set()

        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        assert store.started == [*running, queued[0]]
        store.release(running[0])
        await _until(lambda: fetcher.fetched == 1, "the first block")
        await trio.testing.wait_all_tasks_blocked()
        assert store.started == [*running, queued[0]]

        store.release(queued[0])
        await _until(done.is_set, "the read")
        for block in blocks:
            store.release(block)
        await _until(lambda: all(cache.has_block(b) for b in blocks), "every block")
        assert set(store.started) == set(blocks)
        nursery.cancel_scope.cancel()


class PlainStore:
    """Answers every GET at once; the "object" is BODY bytes of the plaintext."""

    BODY = 2 * SYNC_SOON_MIN

    async def get_sealed_into(self, block_id: bytes, buffer: bytearray) -> memoryview:
        return memoryview(block_id[:1] * self.BODY)

    def open_sealed_into(self, block_id: bytes, body: memoryview, buffer: bytearray) -> memoryview:
        return body


async def test_the_pages_of_older_fetched_blocks_are_freed(tmp_path: Path) -> None:
    """Once KEEP_PAGES_BLOCKS newer blocks came, a fetched block file's pages leave the
    page cache (its reader has its own copy by then); the newer ones keep theirs."""
    if _fs_type(tmp_path) == "tmpfs":
        pytest.skip("tmpfs holds a file's data in its pages: they cannot be freed")
    cache = CacheDir(tmp_path / "cache")
    cache.create()
    fetcher = Fetcher(cache, PlainStore(), fetches=1)  # type: ignore[arg-type]
    blocks = [i.to_bytes(2, "big") * 16 for i in range(KEEP_PAGES_BLOCKS + 2)]
    async with trio.open_nursery() as nursery:
        await nursery.start(fetcher.run)
        for block in blocks[:KEEP_PAGES_BLOCKS]:
            await fetcher.fetch([block])
        os.sync()  # written back: only clean pages can go
        for block in blocks[KEEP_PAGES_BLOCKS:]:
            await fetcher.fetch([block])
        nursery.cancel_scope.cancel()

    def cached(block: bytes) -> int:
        fd = os.open(cache.block_path(block), os.O_RDONLY)
        try:
            return cached_pages(fd, PlainStore.BODY)
        finally:
            os.close(fd)

    pages = PlainStore.BODY // mmap.PAGESIZE
    assert [cached(b) for b in (blocks[0], blocks[1], blocks[2], blocks[-1])] == [0, 0, pages, pages]


def _fs_type(path: Path) -> str:
    """The type of the filesystem holding `path` (from /proc/self/mounts)."""
    best, kind = "", ""
    with open("/proc/self/mounts") as f:
        for line in f:
            _dev, point, fstype, *_ = line.split()
            if str(path).startswith(point.rstrip("/") + "/") and len(point) > len(best):
                best, kind = point, fstype
    return kind
