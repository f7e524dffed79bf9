"""CacheDir.write_block and sync_blocks: block files written with early writeback and
synced later, many at once on threads."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from cloudfs.cache import SPARE_FILES, CacheDir, ThreadPool


def _cache(tmp_path: Path) -> CacheDir:
    cache = CacheDir(tmp_path / "cache")
    cache.create()
    return cache


def test_sync_blocks_many_at_once(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    blocks = {os.urandom(32): os.urandom(1000 + i) for i in range(40)}
    for block_id, data in blocks.items():
        cache.write_block(block_id, data, durable=False, sync_soon=True)
    ids = list(blocks)
    cache.remove_block(ids[0])  # uploaded and evicted meanwhile: nothing to sync
    cache.sync_blocks(ids, [])
    for block_id in ids[1:]:
        assert cache.block_path(block_id).read_bytes() == blocks[block_id]


def test_sync_blocks_fails_when_a_directory_is_gone(tmp_path: Path) -> None:
    """An error on one of the threads reaches the caller (fsync must not succeed)."""
    cache = _cache(tmp_path)
    ids = [os.urandom(32) for _ in range(10)]
    for block_id in ids:
        cache.write_block(block_id, b"x" * 100, durable=False, sync_soon=True)
    shutil.rmtree(cache.block_path(ids[3]).parent)
    with pytest.raises(FileNotFoundError):
        cache.sync_blocks(ids, [])


def test_thread_pool_is_made_again_after_fork() -> None:
    """mount.cloudfs forks after preparing the mount: a pool made before must not be
    used by the child, whose copy of it has no threads (its map would hang)."""
    pool = ThreadPool(2, "test-pool")
    # enough work that the executor counts idle threads it would hand the child's
    # tasks to (and then never start the threads the child lacks)
    assert list(pool.get().map(abs, range(-40, 0))) == list(range(40, 0, -1))
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if the pool works, killed if it hangs
        code = 1
        try:
            signal.alarm(10)
            code = 0 if list(pool.get().map(abs, [-3, -4])) == [3, 4] else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _spares(cache: CacheDir) -> list[str]:
    return sorted(p.name for p in cache.tmp.iterdir() if p.name.startswith("spare."))


def test_seal_block_files_take_spare_temporary_files(tmp_path: Path) -> None:
    """A seal's block file (sync_soon) is written into an empty file made ahead on the
    spare-files thread; a spare gone meanwhile is replaced by a file of the writer's
    own; what is left is removed at close, and none is made after."""
    cache = _cache(tmp_path)
    first = os.urandom(32)
    cache.write_block(first, b"a" * 5000, durable=False, sync_soon=True)  # starts the maker
    deadline = time.monotonic() + 60
    while len(_spares(cache)) < SPARE_FILES:
        assert time.monotonic() < deadline, "no spare files made"
        time.sleep(0.01)
    blocks = {os.urandom(32): os.urandom(100 + i) for i in range(5)}
    os.unlink(cache.tmp / _spares(cache)[0])  # the first one taken next is gone
    for block_id, data in blocks.items():
        cache.write_block(block_id, data, durable=False, sync_soon=True)
    assert cache.block_path(first).read_bytes() == b"a" * 5000
    for block_id, data in blocks.items():
        assert cache.block_path(block_id).read_bytes() == data
    assert not [p for p in cache.tmp.iterdir() if not p.name.startswith("spare.")]
    cache.spares.close()
    assert _spares(cache) == []
    cache.write_block(os.urandom(32), b"b", durable=False, sync_soon=True)
    time.sleep(0.05)
    assert _spares(cache) == [], "no spare files after close"
