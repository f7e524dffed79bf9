"""CacheDir.write_block and sync_blocks: block files written with early writeback and
synced later, many at once on threads."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from cloudfs.cache import CacheDir


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
