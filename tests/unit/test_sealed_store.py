"""SealedStore: blocks go into the store sealed under their block key and come back
verified."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cloudfs import _native
from cloudfs.codec.crypto import Keys
from cloudfs.codec.framing import block_key
from cloudfs.errors import CorruptBlock, ObjectNotFound
from cloudfs.objectstore.local import LocalStore
from cloudfs.objectstore.sealed import SealedStore


@pytest.mark.parametrize("encrypt", [True, False])
async def test_put_get_block(tmp_path: Path, encrypt: bool) -> None:
    keys = Keys.from_master(os.urandom(32))
    inner = LocalStore(tmp_path)
    store = SealedStore(inner, keys, encrypt=encrypt, level=3, max_size=1 << 20)
    plaintext = b"a compressible block " * 5000
    block_id = _native.block_id(keys.id_key, plaintext)

    stored_size = await store.put_block(block_id, plaintext)
    info = await inner.head(block_key(block_id))
    assert info is not None and info.size == stored_size < len(plaintext)
    assert await store.has_block(block_id)
    assert await store.get_block(block_id) == plaintext

    body = bytearray(await inner.get(block_key(block_id)))
    body[-1] ^= 1
    await inner.put(block_key(block_id), bytes(body))
    with pytest.raises(CorruptBlock):
        await store.get_block(block_id)

    await store.delete_blocks([block_id, bytes(32)])
    assert not await store.has_block(block_id)
    with pytest.raises(ObjectNotFound):
        await store.get_block(block_id)


async def test_block_larger_than_max_size_is_refused(tmp_path: Path) -> None:
    keys = Keys.from_master(os.urandom(32))
    big = bytes(2 << 20)
    block_id = _native.block_id(keys.id_key, big)
    writer = SealedStore(LocalStore(tmp_path), keys, encrypt=True, level=3)
    await writer.put_block(block_id, big)
    reader = SealedStore(LocalStore(tmp_path), keys, encrypt=True, level=3, max_size=1 << 20)
    with pytest.raises(CorruptBlock):
        await reader.get_block(block_id)


async def test_put_block_refuses_a_plaintext_that_is_not_its_block(tmp_path: Path) -> None:
    """A reader trusts an encrypted raw block on its GCM tag alone: nothing may be sealed
    under an id that its plaintext does not have."""
    keys = Keys.from_master(os.urandom(32))
    store = SealedStore(LocalStore(tmp_path), keys, encrypt=True, level=3)
    plaintext = os.urandom(70_000)
    wrong = bytearray(plaintext)
    wrong[1000] ^= 1
    block_id = _native.block_id(keys.id_key, plaintext)
    with pytest.raises(CorruptBlock):
        await store.put_block(block_id, bytes(wrong))
    assert not await store.has_block(block_id)
    await store.put_block(block_id, plaintext)
    assert await store.get_block(block_id) == plaintext
