"""The control protocol in one process: DaemonClient against a ControlServer whose
operations the test drives — concurrent requests answered out of order, a cancelled
request, error classes carried across, a connection lost mid-request."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from cloudfs.daemon.control import ControlServer, DaemonClient
from cloudfs.daemon.service import open_listener

from cloudfs.cache import CacheDir
from cloudfs.errors import CorruptBlock, DaemonError, ObjectNotFound, StoreError, UsageError

A, B, C = (bytes([i]) * 32 for i in (1, 2, 3))


class FakeOps:
    """Answers fetches when the test opens the block's gate."""

    def __init__(self) -> None:
        self.gates: dict[bytes, trio.Event] = {b: trio.Event() for b in (A, B, C)}
        self.fail: dict[bytes, Exception] = {}
        self.mounts: list[int | None] = []
        self.kicks = 0
        self.stopped = False

    def mount_connected(self, pid: int | None) -> None:
        self.mounts.append(pid)

    def mount_disconnected(self, pid: int | None) -> None:
        self.mounts.remove(pid)

    def touch(self) -> None:
        pass

    def kick(self) -> None:
        self.kicks += 1

    async def fetch(self, block_ids: list[bytes], prefetch: list[bytes]) -> dict[str, Any]:
        for block_id in block_ids:
            await self.gates[block_id].wait()
            if block_id in self.fail:
                raise self.fail[block_id]
        return {}

    async def flush(self, block_ids: list[bytes] | None) -> dict[str, Any]:
        return {}

    async def store_blocks(self, blocks: list[tuple[bytes, int]]) -> dict[str, Any]:
        if any(b in self.fail for b, _n in blocks):
            raise next(self.fail[b] for b, _n in blocks if b in self.fail)
        return {"stored_sizes": [n + 40 for _b, n in blocks]}

    async def status(self) -> dict[str, Any]:
        return {"pending": 0, "pending_bytes": 0, "uploading": 0, "uploaded": 0, "errors": []}

    async def drop_cache(self) -> dict[str, Any]:
        return {"dropped": 0, "dropped_bytes": 0}

    def shutdown(self) -> None:
        self.stopped = True


@asynccontextmanager
async def serving(tmp_path: Path) -> AsyncIterator[tuple[CacheDir, FakeOps, trio.CancelScope]]:
    cache = CacheDir(tmp_path)
    ops = FakeOps()
    server = ControlServer(ops)
    listener = await open_listener(cache)
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def serve() -> None:
            with scope:
                await server.serve(listener)

        nursery.start_soon(serve)
        yield cache, ops, scope
        nursery.cancel_scope.cancel()
    await listener.aclose()


async def _three_fetches(
    ops: FakeOps, fetch: Callable[[bytes], Awaitable[None]], done: list[bytes]
) -> None:
    """Fetches of A (which reads the socket for all), B and C; B is answered first,
    then A's task is cancelled and C answered: C's waiter must take over reading."""
    async with trio.open_nursery() as nursery:
        first = trio.CancelScope()

        async def fetch_a() -> None:
            with first:
                await fetch(A)

        nursery.start_soon(fetch_a)  # starts first: it reads for everybody
        await trio.sleep(0.05)
        nursery.start_soon(fetch, B)
        nursery.start_soon(fetch, C)
        await trio.sleep(0.05)
        ops.gates[B].set()
        with trio.fail_after(5):
            while B not in done:
                await trio.sleep(0.01)
        # the reading task goes away: another waiter must take over reading
        first.cancel()
        await trio.sleep(0.05)
        ops.gates[C].set()


async def test_concurrent_requests_answered_out_of_order(tmp_path: Path) -> None:
    async with serving(tmp_path) as (cache, ops, _scope):
        client = await DaemonClient.connect(cache, role="mount")
        assert len(ops.mounts) == 1
        done: list[bytes] = []

        async def fetch(block_id: bytes) -> None:
            await client.fetch([block_id])
            done.append(block_id)

        with trio.fail_after(10):
            await _three_fetches(ops, fetch, done)
        ops.gates[A].set()  # the reply of the cancelled request is dropped
        assert done == [B, C]
        await client.kick()
        assert ops.kicks == 1
        assert (await client.status())["pending"] == 0
        await client.aclose()
        with trio.fail_after(5):
            while ops.mounts:
                await trio.sleep(0.01)


async def test_errors_keep_their_class(tmp_path: Path) -> None:
    async with (
        serving(tmp_path) as (cache, ops, _scope),
        await DaemonClient.connect(cache, role="tool") as client,
    ):
        assert ops.mounts == []
        # store: the stored sizes in order; a bad request and a failed PUT are errors
        assert await client.store([(A, 100), (B, 7)]) == [140, 47]
        assert await client.store([]) == []
        with pytest.raises(UsageError, match="sizes"):
            await client._request("store", blocks=[A.hex()], sizes=[-1])
        ops.fail[B] = StoreError("PUT blocks/02/... failed")
        with pytest.raises(StoreError, match="PUT"):
            await client.store([(A, 1), (B, 2)])
        ops.fail[A] = CorruptBlock(f"block {A.hex()}")
        ops.fail[B] = ObjectNotFound("blocks/02/...")
        ops.gates[A].set()
        ops.gates[B].set()
        with pytest.raises(CorruptBlock, match=A.hex()):
            await client.fetch([A])
        with pytest.raises(ObjectNotFound):
            await client.fetch([B])
        ops.fail[C] = RuntimeError("boom")
        ops.gates[C].set()
        with pytest.raises(DaemonError, match="boom"):
            await client.fetch([C])
        await client.shutdown()  # answered first, then done
        with trio.fail_after(5):
            while not ops.stopped:
                await trio.sleep(0.01)


async def test_connection_lost_mid_request(tmp_path: Path) -> None:
    async with serving(tmp_path) as (cache, _ops, scope):
        client = await DaemonClient.connect(cache, role="mount")
        errors: list[Exception] = []

        async def fetch(block_id: bytes) -> None:
            try:
                await client.fetch([block_id])
            except DaemonError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for block_id in (A, B, C):
                nursery.start_soon(fetch, block_id)
            await trio.sleep(0.1)
            scope.cancel()  # the server goes away with the requests unanswered
        assert len(errors) == 3
        with pytest.raises(DaemonError):
            await client.status()
        await client.aclose()
    with pytest.raises(DaemonError):
        await DaemonClient.connect(cache)
