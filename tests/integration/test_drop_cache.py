"""`cloudfs drop-cache`: after it, reads of a mount come from the object store (the
daemon fetches every block again) and return the same bytes; the daemon's drop_cache
request never deletes the cache copy of a block that is still pending."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
from cloudfs.daemon.control import DaemonClient
from cloudfs.daemon.service import DaemonService
from cloudfs.mount.main import KERNEL_READAHEAD_KIB

from cloudfs import _native
from cloudfs.cache import CacheConfig, CacheDir
from cloudfs.config import create_filesystem
from cloudfs.meta import open_meta
from cloudfs.meta.schema import BLOCK_PENDING, BLOCK_STORED
from cloudfs.objectstore.local import LocalStore
from cloudfs.objectstore.sealed import SealedStore

if TYPE_CHECKING:  # the fixtures' type; conftest is not importable as a module
    from conftest import CloudFS

pytestmark = [pytest.mark.timeout(180), pytest.mark.store_kinds("local", "s3")]

MiB = 1 << 20


def _daemon_status(fs: CloudFS) -> dict:
    status = fs.stat_json()["daemon"]
    assert status is not None, "the daemon does not answer"
    return status


def _kernel_readahead(path: Path) -> tuple[Path, int]:
    """The read-ahead setting (KiB) of the filesystem mounted on `path`."""
    dev = os.stat(path).st_dev
    setting = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    return setting, int(setting.read_text())


def test_reads_after_drop_cache_fetch_from_the_store(fs: CloudFS) -> None:
    # the mount widened the kernel's read-ahead (FUSE starts at 128 KiB), so sequential
    # reads reach it as 1 MiB requests, several at once; only root may set it
    setting, kib = _kernel_readahead(fs.mnt)
    if os.geteuid() == 0 and os.access(setting, os.W_OK):
        assert kib == KERNEL_READAHEAD_KIB
    data = os.urandom(12 * MiB)
    (fs.mnt / "dir").mkdir()
    path = fs.mnt / "dir" / "file"
    path.write_bytes(data)
    fs.flush()
    assert path.read_bytes() == data  # served from the cache and the page cache
    fetched = _daemon_status(fs)["fetched"]
    cached = len(fs.cached_blocks())
    assert cached >= 3

    r = fs.check("cloudfs", "drop-cache", fs.mnt)
    assert r.stdout.startswith(f"dropped {cached} cached blocks (")
    assert fs.cached_blocks() == []

    assert path.read_bytes() == data
    status = _daemon_status(fs)
    assert status["fetched"] - fetched == cached
    assert status["fetched_bytes"] >= len(data)
    # once fetched, the blocks are cached again: a second read needs no fetch
    assert path.read_bytes() == data
    assert _daemon_status(fs)["fetched"] - fetched == cached


@pytest.mark.store_kinds("local")  # store-independent: the mount's own logic
def test_drop_cache_needs_a_mount(tmp_path: Path, fs: CloudFS) -> None:
    r = fs.run("cloudfs", "drop-cache", tmp_path)
    assert r.returncode != 0
    assert r.stderr.startswith("cloudfs: ") and len(r.stderr.strip().splitlines()) == 1


class GatedStore(LocalStore):
    """A local store whose PUTs wait until the test opens the gate."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate = trio.Event()

    async def put(self, key: str, data: bytes) -> None:
        if key.startswith("blocks/"):
            await self.gate.wait()
        await super().put(key, data)


async def test_daemon_drops_stored_blocks_and_keeps_pending_ones(tmp_path: Path) -> None:
    store = GatedStore(tmp_path / "store")
    sb, keys = await create_filesystem(store, b"passphrase")
    cache = CacheDir(tmp_path / "cache")
    cache.write_config(
        CacheConfig(storage=str(store.root), metadata=str(cache.meta_path), uuid=sb.uuid)
    )
    meta = open_meta(str(cache.meta_path))
    await meta.initialize(sb.uuid, uid=os.getuid(), gid=os.getgid())
    sealed = SealedStore(store, keys, encrypt=True, level=sb.level, max_size=sb.max_block_size)
    service = DaemonService(cache, meta, sealed, keys, idle_exit=0)

    async def add_pending(blocks: list[bytes]) -> list[bytes]:
        ids = [_native.block_id(keys.id_key, b) for b in blocks]
        for block_id, data in zip(ids, blocks, strict=True):
            cache.write_block(block_id, data, durable=False)
        async with meta.transaction() as tx:
            await tx.add_block_refs({i: (len(b), 1) for i, b in zip(ids, blocks, strict=True)},
                                    time.time_ns())  # fmt: skip
        return ids

    async def states() -> dict[bytes, int]:
        async with meta.reading() as tx:
            rows = await tx.conn.query("SELECT id, state FROM blocks")
        return {bytes(i): s for i, s in rows}

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            async with await DaemonClient.connect(cache, role="tool") as client:
                stored = await add_pending([os.urandom(100_000 + i) for i in range(4)])
                store.gate.set()
                await client.kick()
                await client.flush()
                store.gate = trio.Event()  # uploads wait again
                pending = await add_pending([os.urandom(90_000 + i) for i in range(3)])
                await client.kick()
                # a block file without a row: a seal that has not committed yet
                orphan = _native.block_id(keys.id_key, b"sealed, not committed")
                cache.write_block(orphan, b"sealed, not committed", durable=False)

                dropped = await client.drop_cache()
                assert dropped["dropped"] == 4
                assert dropped["dropped_bytes"] == sum(100_000 + i for i in range(4))
                assert sorted(cache.cached_block_ids()) == sorted([*pending, orphan])
                s = await states()
                assert all(s[b] == BLOCK_STORED for b in stored)
                assert all(s[b] == BLOCK_PENDING for b in pending)

                # the pending blocks still upload; the dropped ones come back on a fetch
                store.gate.set()
                await client.flush()
                assert all(v == BLOCK_STORED for v in (await states()).values())
                await client.fetch(stored)
                assert sorted(cache.cached_block_ids()) == sorted([*stored, *pending, orphan])
                assert (await client.status())["fetched"] == 4
            service.shutdown()
    finally:
        await meta.close()
