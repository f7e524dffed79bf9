"""The uploader frees a block file's page cache once it has read the block (single
mount: the kernel's page cache of the file it belongs to holds that data)."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest
from cloudfs.daemon.uploader import _read_verified

from cloudfs import _native
from cloudfs.codec.crypto import Keys
from posixutil import cached_pages
from tests.unit.test_fetcher import _fs_type

SIZE = 64 * mmap.PAGESIZE


@pytest.mark.parametrize("drop", [False, True])
def test_a_block_read_for_its_upload_leaves_the_page_cache(tmp_path: Path, drop: bool) -> None:
    if _fs_type(tmp_path) == "tmpfs":
        pytest.skip("tmpfs holds a file's data in its pages: they cannot be freed")
    keys = Keys.from_master(os.urandom(32))
    data = os.urandom(SIZE)
    block_id = _native.block_id(keys.id_key, data)
    path = tmp_path / "block"
    path.write_bytes(data)
    os.sync()  # written back: only clean pages can go
    assert _read_verified(path, keys, block_id, SIZE, drop_pages=drop) == data
    fd = os.open(path, os.O_RDONLY)
    try:
        assert cached_pages(fd, SIZE) == (0 if drop else SIZE // mmap.PAGESIZE)
    finally:
        os.close(fd)
