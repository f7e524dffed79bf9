"""SealedStore: blocks in, blocks out. Puts a block's plaintext into any ObjectStore as
a sealed object (zstd, AES-256-GCM, see cloudfs.codec.framing) under its block key,
and gets it back verified.

Sealing and opening are CPU work; they run in a worker thread (native zstd and
OpenSSL release the GIL) so the trio thread stays free for I/O.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

import trio

from cloudfs import _native
from cloudfs.codec.crypto import Keys
from cloudfs.codec.framing import (
    BLOCK_SIZE_LIMIT,
    block_key,
    open_block,
    open_block_into,
    seal_block,
)
from cloudfs.errors import CorruptBlock
from cloudfs.objectstore.base import ObjectStore


class SealedStore:
    """Blocks of one filesystem in `inner`. `max_size` is the filesystem's chunker max
    size: no block opened here can grow larger (decompression bombs)."""

    def __init__(
        self,
        inner: ObjectStore,
        keys: Keys,
        *,
        encrypt: bool,
        level: int,
        max_size: int = BLOCK_SIZE_LIMIT,
    ) -> None:
        self.inner = inner
        self.keys = keys
        self.encrypt = encrypt
        self.level = level
        self.max_size = max_size
        self.url = inner.url

    async def put_block(self, block_id: bytes, plaintext: bytes, *, verified: bool = False) -> int:
        """Seal and store the block; the stored object's size in bytes. The plaintext
        is checked against its id first (CorruptBlock), unless the caller did that
        (`verified`): a reader of an encrypted, uncompressed block relies on it (see
        cloudfs.codec.framing.open_block_into)."""
        body = await trio.to_thread.run_sync(self._seal, block_id, plaintext, verified)
        await self.inner.put(block_key(block_id), body)
        return len(body)

    async def get_block(self, block_id: bytes) -> bytes:
        """The block's verified plaintext; ObjectNotFound if it is not stored,
        CorruptBlock if the stored object is not exactly this block."""
        body = await self.get_sealed(block_id)
        return await trio.to_thread.run_sync(self.open_sealed, block_id, body)

    async def get_sealed(self, block_id: bytes) -> bytes:
        """The block's object as stored, not verified yet: `open_sealed` (blocking)
        verifies it, for callers that do more in the same worker thread."""
        return await self.inner.get(block_key(block_id))

    def open_sealed(self, block_id: bytes, body: bytes) -> bytes:
        """The verified plaintext of `body` (from `get_sealed`); CorruptBlock unless
        it is exactly the block `block_id`. CPU work: call from a worker thread."""
        return open_block(self.keys, block_id, body, max_size=self.max_size)

    async def get_sealed_into(self, block_id: bytes, buffer: bytearray) -> memoryview:
        """`get_sealed`, read into `buffer` where the store can (see
        ObjectStore.get_into); for `open_sealed_into`."""
        return await self.inner.get_into(block_key(block_id), buffer)

    def open_sealed_into(
        self, block_id: bytes, body: bytes | bytearray | memoryview, buffer: bytearray
    ) -> memoryview:
        """`open_sealed` with the plaintext in `buffer` where it fits (see
        cloudfs.codec.framing.open_block_into). CPU work: call from a worker thread."""
        return open_block_into(self.keys, block_id, body, buffer, max_size=self.max_size)

    async def has_block(self, block_id: bytes) -> bool:
        """True when an object exists under the block's key (not verified)."""
        return await self.inner.head(block_key(block_id)) is not None

    async def delete_blocks(self, block_ids: Iterable[bytes]) -> None:
        """Delete the blocks' objects; missing ones are not an error."""
        await self.inner.delete_many([block_key(block_id) for block_id in block_ids])

    def _seal(self, block_id: bytes, plaintext: bytes, verified: bool) -> bytes:
        if not verified and not hmac.compare_digest(
            _native.block_id(self.keys.id_key, plaintext), block_id
        ):
            raise CorruptBlock(f"block {block_id.hex()}: plaintext does not match its id")
        return seal_block(self.keys, block_id, plaintext, encrypt=self.encrypt, level=self.level)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def __repr__(self) -> str:
        return f"<SealedStore {self.url}>"
