"""The stored block object format: seal a block's plaintext into the bytes that go to
the object store, open them again, and verify that what comes back is exactly the
block that was asked for.

Format 1 (all integers big-endian)::

    header  = magic b"CFSB" | format u8 = 1 | flags u8 | key id u32      (10 bytes)
    flags   = bit 0: payload is a zstd frame (else the plaintext itself)
              bit 1: payload is encrypted; bits 2-7 must be 0
    body    = header + nonce (12) + AES-256-GCM(data key, payload, aad = block id + header)
              when encrypted (the GCM tag is the last 16 bytes), else
              header + payload + HMAC-SHA256(data key, block id + header + payload)[:16]

Versioning rules: the 4-byte magic and the format byte never move; a reader rejects a
format byte or a flag bit it does not know (CorruptBlock: it cannot verify such an
object), so any new layout or codec gets a new format byte or flag bit and old readers
fail safely instead of returning wrong bytes. The key id names the master key
generation that sealed the block (key rotation).

Every body is authenticated as a whole (GCM tag, or the HMAC tag without encryption:
zstd frames have bits a decoder ignores, so the plaintext check alone would let some
damaged bodies pass). On top, `open_block` checks HMAC-SHA256(id key, plaintext)
against the block id. So a flipped bit, a truncation, a wrong key or a body stored under
another id always raises CorruptBlock and never returns wrong bytes, with or without
encryption. (Without encryption the keys are in the superblock in clear: the tag then
detects damage, not forgery; the id check still pins the content.)
"""

from __future__ import annotations

import hmac
import os
import struct
import threading

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cloudfs import _native
from cloudfs.codec.crypto import NONCE_SIZE, TAG_SIZE, Keys
from cloudfs.errors import CorruptBlock

MAGIC = b"CFSB"
FORMAT = 1
FLAG_COMPRESSED = 0x01
FLAG_ENCRYPTED = 0x02
_KNOWN_FLAGS = FLAG_COMPRESSED | FLAG_ENCRYPTED

_HEADER = struct.Struct(">4sBBI")
HEADER_SIZE = _HEADER.size  # 10

BLOCK_ID_SIZE = 32

#: Largest block plaintext cloudfs accepts at all (also the ceiling for the chunker's
#: max size at mkfs). open_block's default bound for decompression, so that a
#: "zip bomb" object cannot make a reader allocate more than this.
BLOCK_SIZE_LIMIT = 64 * 1024 * 1024

_BLOCK_PREFIX = "blocks/"


def block_key(block_id: bytes) -> str:
    """The object key of a block: "blocks/<first 2 hex>/<64 hex>" (256 fan-out
    directories keep local stores and S3 listings evenly spread)."""
    if len(block_id) != BLOCK_ID_SIZE:
        raise ValueError(f"block id must be {BLOCK_ID_SIZE} bytes, not {len(block_id)}")
    hex_id = block_id.hex()
    return f"{_BLOCK_PREFIX}{hex_id[:2]}/{hex_id}"


def parse_block_key(key: str) -> bytes | None:
    """The block id named by an object key, or None when `key` is not a block key
    (for listings in gc and fsck)."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] + "/" != _BLOCK_PREFIX or len(parts[2]) != 2 * BLOCK_ID_SIZE:
        return None
    hex_id = parts[2]
    if parts[1] != hex_id[:2] or hex_id != hex_id.lower():
        return None
    try:
        return bytes.fromhex(hex_id)
    except ValueError:
        return None


def _body_tag(
    keys: Keys, block_id: bytes, header: bytes, payload: bytes | bytearray | memoryview
) -> bytes:
    mac = hmac.new(keys.data_key, block_id + header, "sha256")
    mac.update(payload)
    return mac.digest()[:TAG_SIZE]


#: bytes at the start of a block that zstd tries first: when they do not shrink, the
#: block is stored raw without compressing the rest (random, encrypted or already
#: compressed data: zstd would spend ~0.25 CPU s per GiB to find nothing)
PROBE_SIZE = 64 << 10
#: the probe must come out at most this share of its size for zstd to run on the block
PROBE_RATIO = 0.97


def _worth_compressing(plaintext: bytes | bytearray | memoryview, level: int) -> bool:
    if len(plaintext) <= 2 * PROBE_SIZE:
        return True  # the probe would cost about as much as the whole block
    probe = _native.compress(memoryview(plaintext)[:PROBE_SIZE], level)
    return probe is not None and len(probe) <= PROBE_SIZE * PROBE_RATIO


def seal_block(
    keys: Keys,
    block_id: bytes,
    plaintext: bytes | bytearray | memoryview,
    *,
    encrypt: bool,
    level: int,
) -> bytes:
    """The object body for `plaintext`, whose id is `block_id`. The payload is zstd
    only when that makes it smaller. CPU-heavy: async callers use a worker thread."""
    if len(block_id) != BLOCK_ID_SIZE:
        raise ValueError(f"block id must be {BLOCK_ID_SIZE} bytes")
    compressed = (
        _native.compress(plaintext, level) if _worth_compressing(plaintext, level) else None
    )
    flags = 0
    payload: bytes | bytearray | memoryview = plaintext
    if compressed is not None and len(compressed) < len(plaintext):
        payload = compressed
        flags |= FLAG_COMPRESSED
    if encrypt:
        flags |= FLAG_ENCRYPTED
    header = _HEADER.pack(MAGIC, FORMAT, flags, keys.key_id)
    if not encrypt:
        return header + bytes(payload) + _body_tag(keys, block_id, header, payload)
    nonce = os.urandom(NONCE_SIZE)
    return header + nonce + AESGCM(keys.data_key).encrypt(nonce, bytes(payload), block_id + header)


def open_block(
    keys: Keys,
    block_id: bytes,
    body: bytes | bytearray | memoryview,
    *,
    max_size: int = BLOCK_SIZE_LIMIT,
) -> bytes:
    """The plaintext of the block `block_id` from its object `body`; CorruptBlock unless
    it is exactly that block. `max_size` bounds the plaintext (pass the filesystem's
    chunker max size). CPU-heavy: async callers use a worker thread."""
    plaintext = _open(keys, block_id, body, max_size, None)
    return plaintext if isinstance(plaintext, bytes) else bytes(plaintext)


def open_block_into(
    keys: Keys,
    block_id: bytes,
    body: bytes | bytearray | memoryview,
    buffer: bytearray,
    *,
    max_size: int = BLOCK_SIZE_LIMIT,
) -> memoryview:
    """`open_block` for a reader of many blocks: the plaintext is decrypted into
    `buffer` when it fits (a view of it), else into new memory; an unencrypted,
    uncompressed one is a view of `body` itself. Reusing the buffer saves the page
    faults of a fresh 1 MiB object per block, which cost more than the decryption.
    The view is valid until `buffer` or `body` is reused.

    Unlike `open_block`, an encrypted block stored uncompressed (random, encrypted or
    already compressed data: most of what is big) skips the HMAC of its plaintext
    against the id, a third of a cold read's CPU: the GCM tag authenticates exactly
    these bytes together with the id (AAD), only a holder of the data key can make
    one (who holds the id key too: both come from the master key), and
    SealedStore.put_block checks the id of every plaintext before it seals it. A
    compressed block keeps the check (it also guards the decompressor), and so does
    an unencrypted one (its keys are in the superblock in clear)."""
    return _open(keys, block_id, body, max_size, buffer, trust_tag=True)


_aead_cache = threading.local()


def _aead(data_key: bytes) -> AESGCM:
    """The AES-GCM context of `data_key`, one per thread (setting up the key schedule
    for every block showed in profiles)."""
    cached: tuple[bytes, AESGCM] | None = getattr(_aead_cache, "last", None)
    if cached is None or cached[0] != data_key:
        cached = _aead_cache.last = (data_key, AESGCM(data_key))
    return cached[1]


def _open(
    keys: Keys,
    block_id: bytes,
    body: bytes | bytearray | memoryview,
    max_size: int,
    into: bytearray | None,
    *,
    trust_tag: bool = False,
) -> bytes | memoryview:
    short_id = block_id.hex()[:16]

    def corrupt(reason: str) -> CorruptBlock:
        return CorruptBlock(f"block {short_id}: {reason}")

    body = memoryview(body)
    if len(body) < HEADER_SIZE:
        raise corrupt(f"truncated ({len(body)} bytes)")
    header = bytes(body[:HEADER_SIZE])
    magic, fmt, flags, key_id = _HEADER.unpack(header)
    if magic != MAGIC:
        raise corrupt("not a cloudfs block (bad magic)")
    if fmt != FORMAT:
        raise corrupt(f"unknown block format {fmt}")
    if flags & ~_KNOWN_FLAGS:
        raise corrupt(f"unknown flags 0x{flags:02x}")
    if key_id != keys.key_id:
        raise corrupt(f"sealed with key id {key_id}, not {keys.key_id}")

    payload: bytes | memoryview = body[HEADER_SIZE:]
    if flags & FLAG_ENCRYPTED:
        if len(payload) < NONCE_SIZE + TAG_SIZE:
            raise corrupt("truncated")
        ciphertext = payload[NONCE_SIZE:]
        size = len(ciphertext) - TAG_SIZE
        if not flags & FLAG_COMPRESSED and size > max_size:
            raise corrupt(f"larger than {max_size} bytes")
        nonce, aad = bytes(payload[:NONCE_SIZE]), block_id + header
        try:
            if into is not None and len(into) >= size:
                payload = memoryview(into)[:size]
                _aead(keys.data_key).decrypt_into(nonce, ciphertext, aad, payload)
            else:
                payload = _aead(keys.data_key).decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            raise corrupt("authentication failed (damaged, swapped, or wrong key)") from None
    else:
        if len(payload) < TAG_SIZE:
            raise corrupt("truncated")
        tag = payload[-TAG_SIZE:]
        payload = payload[:-TAG_SIZE]
        if not hmac.compare_digest(_body_tag(keys, block_id, header, payload), tag):
            raise corrupt("checksum mismatch (damaged, swapped, or wrong key)")

    plaintext: bytes | memoryview
    if flags & FLAG_COMPRESSED:
        try:
            plaintext = _native.decompress(payload, max_size)
        except ValueError as exc:
            raise corrupt(f"bad zstd payload ({exc})") from None
    else:
        if len(payload) > max_size:
            raise corrupt(f"larger than {max_size} bytes")
        plaintext = payload

    # The id check is what makes unencrypted blocks tamper-evident; for encrypted ones
    # the AAD already binds body and id, and this is a second guard that also covers
    # the decompressor (`open_block_into` says when the tag alone is trusted).
    if trust_tag and flags == FLAG_ENCRYPTED:
        return plaintext
    if not hmac.compare_digest(_native.block_id(keys.id_key, plaintext), block_id):
        raise corrupt("content does not match its id")
    return plaintext
