"""The cache size limit: a file far larger than the cache goes through it, the daemon
evicts stored blocks least recently used first and never a pending block, a dirty
overlay or a file a seal has not committed, reads mark blocks as used, and when the
cache is full of data not uploaded, writers wait and then get ENOSPC without losing
anything they were told was written."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Self

import pytest
import trio
from cloudfs.daemon.service import DaemonService

from cloudfs import _native
from cloudfs.cache import CacheConfig, CacheDir
from cloudfs.config import create_filesystem
from cloudfs.meta import open_meta
from cloudfs.objectstore.local import LocalStore
from cloudfs.objectstore.sealed import SealedStore

if TYPE_CHECKING:  # the fixtures' type; conftest is not importable as a module
    from conftest import CloudFS

pytestmark = pytest.mark.timeout(600)

MiB = 1 << 20
GiB = 1 << 30


def cache_bytes(cache: Path) -> int:
    """Disk space of the cache dir's block files and dirty overlays, as du sees it."""
    total = 0
    for folder in (cache / "blocks").iterdir():
        for entry in os.scandir(folder):
            try:
                total += entry.stat().st_size
            except FileNotFoundError:
                pass
    for entry in os.scandir(cache / "dirty"):
        try:
            total += entry.stat().st_blocks * 512
        except FileNotFoundError:
            pass
    return total


class CacheWatcher:
    """Samples the cache dir's size in a thread; `peak` is the largest seen."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, cache_bytes(self.cache))
            self._stop.wait(0.05)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_cache_size_option_is_kept_and_checked(make_fs: Callable[..., CloudFS]) -> None:
    fs = make_fs(mount=False)
    fs.mount("-o", "cache_size=300M")
    config = json.loads((fs.cache / "config.json").read_text())
    assert config["cache_size"] == 300 * MiB
    assert fs.stat_json()["daemon"]["cache_limit"] == 300 * MiB
    fs.unmount()
    fs.mount()  # remembered for the cache dir
    assert fs.stat_json()["daemon"]["cache_limit"] == 300 * MiB
    fs.unmount()
    fs.mount("--cache-size", "auto")  # back to the default: a share of the disk
    config = json.loads((fs.cache / "config.json").read_text())
    assert config["cache_size"] is None
    st = os.statvfs(fs.cache)
    limit = fs.stat_json()["daemon"]["cache_limit"]
    assert GiB <= limit <= max(GiB, st.f_blocks * st.f_frsize // 10)
    fs.unmount()
    r = fs.run("mount.cloudfs", fs.storage_url, fs.mnt, "--cachedir", fs.cache,
               "--cache-size", "lots")  # fmt: skip
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "mount.cloudfs: invalid arguments: cache size 'lots' is not a size (like 512M, 10G, 1T)"
    ]
    assert not fs.mounted


def test_2_gib_file_through_a_256_mib_cache(make_fs: Callable[..., CloudFS]) -> None:
    limit = 256 * MiB
    fs = make_fs(mount=False)
    fs.mount("--cache-size", "256M")
    rng = random.Random(2048)
    written = hashlib.sha256()
    started = time.monotonic()
    with CacheWatcher(fs.cache) as watcher:
        fd = os.open(fs.mnt / "big", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            for _ in range(2 * GiB // MiB):
                chunk = rng.randbytes(MiB)
                written.update(chunk)
                assert os.write(fd, chunk) == MiB
            os.fsync(fd)
        finally:
            os.close(fd)
        write_s = time.monotonic() - started
        write_peak = watcher.peak
        # a fresh mount: nothing in the kernel's page cache, every block from the cache
        # dir or, for most of them, fetched from the store again
        fs.unmount()
        fs.mount()
        read_started = time.monotonic()
        read = hashlib.sha256()
        with open(fs.mnt / "big", "rb", buffering=0) as f:
            while chunk := f.read(MiB):
                read.update(chunk)
        read_s = time.monotonic() - read_started
    assert read.digest() == written.digest(), "the 2 GiB file reads back different"
    daemon = fs.stat_json()["daemon"]
    print(f"\n2 GiB through a 256 MiB cache: write+fsync {write_s:.1f} s, read {read_s:.1f} s, "
          f"peak cache {write_peak / MiB:.0f} MiB writing, {watcher.peak / MiB:.0f} MiB "
          f"overall; {daemon['evicted']} blocks evicted")  # fmt: skip
    assert daemon["fetched_bytes"] >= 2 * GiB - limit, daemon
    assert daemon["evicted_bytes"] > 2 * GiB, daemon
    # the limit holds while writing and reading (the evictor starts at 95% of it; a
    # loaded machine may leave it behind for a moment)
    assert watcher.peak <= limit * 1.25, f"the cache grew to {watcher.peak / MiB:.0f} MiB"
    assert cache_bytes(fs.cache) <= limit


def test_reads_mark_blocks_as_used(fs: CloudFS) -> None:
    data = os.urandom(6 * MiB)
    (fs.mnt / "f").write_bytes(data)
    fs.flush()
    fs.unmount()
    day_ago = time.time() - 86400
    for path in fs.cached_blocks():
        os.utime(path, (day_ago, day_ago))
    fs.mount()
    assert (fs.mnt / "f").read_bytes() == data
    mtimes = [p.stat().st_mtime for p in fs.cached_blocks()]
    assert len(mtimes) >= 2 and all(m > time.time() - 60 for m in mtimes), mtimes


def test_writers_wait_then_get_enospc_and_lose_nothing(make_fs: Callable[..., CloudFS]) -> None:
    fs = make_fs(mount=False)
    fs.mount("--cache-size", "64M", "--cache-full-wait", "3")
    early = os.urandom(8 * MiB)
    with open(fs.mnt / "early", "wb") as f:
        f.write(early)
        os.fsync(f.fileno())
    daemon = fs.daemon_pid()
    assert daemon is not None
    chunks: list[bytes] = []
    os.kill(daemon, signal.SIGSTOP)  # the upload path stops: nothing leaves the cache
    try:
        fd = os.open(fs.mnt / "late", os.O_WRONLY | os.O_CREAT, 0o644)
        before = 0.0
        try:
            with pytest.raises(OSError) as raised:
                for _ in range(200):
                    chunk = os.urandom(MiB)
                    before = time.monotonic()
                    n = os.write(fd, chunk)
                    chunks.append(chunk[:n])  # a short write: the rest was refused
            waited = time.monotonic() - before
        finally:
            os.close(fd)
        assert raised.value.errno == errno.ENOSPC
        acknowledged = sum(map(len, chunks))
        # refused only near the limit (80% of it may be data not uploaded), and only
        # after the writer waited --cache-full-wait seconds for room
        assert 40 * MiB <= acknowledged <= 56 * MiB, acknowledged
        assert waited >= 2.5, f"ENOSPC after {waited:.1f} s"
    finally:
        os.kill(daemon, signal.SIGCONT)
    fs.flush()
    # once uploaded, there is room again
    more = os.urandom(40 * MiB)
    with open(fs.mnt / "late", "ab") as f:
        f.write(more)
    fs.flush()
    assert fs.stat_json()["pending_uploads"] == 0
    fs.unmount()
    fs.drop_cached_blocks()
    fs.mount()
    assert (fs.mnt / "early").read_bytes() == early
    got = (fs.mnt / "late").read_bytes()
    assert got == b"".join(chunks) + more, "acknowledged data was lost"
    log = (fs.cache / "mount.log").read_text()
    assert "ENOSPC" in log


def test_writers_make_room_by_sealing(make_fs: Callable[..., CloudFS]) -> None:
    """Two files written at once, each below the 64 MiB that seals a file being
    written, together more than the cache holds: the waiting writer has them sealed
    and uploaded instead of waiting for an idle seal that never comes."""
    fs = make_fs(mount=False)
    fs.mount("--cache-size", "80M", "--cache-full-wait", "3")
    data = {name: os.urandom(60 * MiB) for name in ("a", "b")}
    files = {name: open(fs.mnt / name, "wb") for name in data}  # noqa: SIM115
    try:
        for off in range(0, 60 * MiB, MiB):
            for name, f in files.items():
                f.write(data[name][off : off + MiB])
                f.flush()
    finally:
        for f in files.values():
            f.close()
    fs.flush()
    assert fs.stat_json()["pending_uploads"] == 0
    for name, expected in data.items():
        assert (fs.mnt / name).read_bytes() == expected


# --- the evictor on its own (the daemon service in this process) ----------------------


async def test_eviction_order_and_what_is_never_evicted(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    sb, keys = await create_filesystem(store, b"passphrase")
    cache = CacheDir(tmp_path / "cache")
    cache.write_config(
        CacheConfig(storage=str(store.root), metadata=str(cache.meta_path), uuid=sb.uuid)
    )
    meta = open_meta(str(cache.meta_path))
    await meta.initialize(sb.uuid, uid=os.getuid(), gid=os.getgid())
    sealed = SealedStore(store, keys, encrypt=True, level=sb.level, max_size=sb.max_block_size)

    async def add(blocks: list[bytes], *, row: bool = True) -> list[bytes]:
        ids = [_native.block_id(keys.id_key, b) for b in blocks]
        for block_id, data in zip(ids, blocks, strict=True):
            cache.write_block(block_id, data, durable=False)
        if row:
            async with meta.transaction() as tx:
                await tx.add_block_refs({i: (len(b), 1) for i, b in zip(ids, blocks, strict=True)},
                                        time.time_ns())  # fmt: skip
        return ids

    def age(block_ids: list[bytes], first: float) -> None:
        for i, block_id in enumerate(block_ids):
            t = first + i
            os.utime(cache.block_path(block_id), (t, t))

    try:
        # 10 stored blocks of 100 kB, used one second apart, the oldest first
        stored = await add([os.urandom(100_000) for _ in range(10)])
        async with meta.transaction() as tx:
            for block_id in stored:
                await tx.mark_stored(block_id, 100_100)
        for block_id in stored:
            await sealed.put_block(block_id, cache.block_path(block_id).read_bytes())
        age(stored, time.time() - 3600)
        # older still, but never evicted: pending blocks, a file a seal has not
        # committed yet, and a dirty overlay
        pending = await add([os.urandom(100_000) for _ in range(3)])
        age(pending, time.time() - 7200)
        [uncommitted] = await add([os.urandom(50_000)], row=False)
        age([uncommitted], time.time() - 7200)
        (cache.dirty / "42").write_bytes(os.urandom(100_000))
        used = 1_000_000 + 300_000 + 50_000 + cache.dirty_bytes()
        limit = used - 100_000
        # 95% of the limit is passed: down to 80% of it, the oldest stored blocks first
        # only the evictor runs: the uploader would store the pending blocks
        service = DaemonService(cache, meta, sealed, keys, idle_exit=0, cache_size=limit)
        async with trio.open_nursery() as nursery:
            await nursery.start(service.evictor.run)
            with trio.fail_after(10):
                while service.evictor.evicted == 0:
                    await trio.sleep(0.05)
            evicted = [b for b in stored if not cache.has_block(b)]
            must_free = used - int(limit * 0.8)
            count = -(-must_free // 100_000)
            assert evicted == stored[:count]
            assert all(cache.has_block(b) for b in [*pending, uncommitted])
            assert (cache.dirty / "42").exists()
            assert cache_bytes(cache.root) <= limit * 0.8
            status = service.evictor.status()
            assert status["evicted"] == count and status["cache_limit"] == limit

            # a block read now (the mount touches it) outlives older ones: its file
            # arrives when more data comes in, and the oldest unused blocks go first
            survivors = stored[count:]
            os.utime(cache.block_path(survivors[0]))
            newer = await add([os.urandom(100_000) for _ in range(4)])
            async with meta.transaction() as tx:
                for block_id in newer:
                    await tx.mark_stored(block_id, 100_100)
            with trio.fail_after(10):
                while service.evictor.evicted == count:
                    await trio.sleep(0.05)
            assert cache.has_block(survivors[0])
            assert not cache.has_block(survivors[1])
            assert all(cache.has_block(b) for b in [*pending, uncommitted])
            nursery.cancel_scope.cancel()
    finally:
        await meta.close()
