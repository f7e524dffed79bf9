"""Keys, key wrapping, the block object format and the superblock: what is stored can
be read back exactly, and anything else fails loudly instead of returning wrong bytes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cloudfs import _native
from cloudfs.codec import crypto
from cloudfs.codec.crypto import (
    KdfParams,
    Keys,
    derive_wrapping_key,
    unwrap_key,
    wrap_key,
)
from cloudfs.codec.framing import (
    FLAG_COMPRESSED,
    FLAG_ENCRYPTED,
    HEADER_SIZE,
    PROBE_SIZE,
    block_key,
    open_block,
    open_block_into,
    parse_block_key,
    seal_block,
)
from cloudfs.config import (
    FORMAT_VERSION,
    SUPERBLOCK_KEY,
    Superblock,
    change_passphrase,
    create_filesystem,
    read_superblock,
    unlock,
)
from cloudfs.errors import (
    CorruptBlock,
    CorruptObject,
    FilesystemExists,
    NoFilesystem,
    UnsupportedFormat,
    UsageError,
    WrongPassphrase,
)
from cloudfs.objectstore.local import LocalStore

MARKER = b"SECRET-MARKER-7f3a"
COMPRESSIBLE = b"cloudfs block " * 1000 + MARKER * 50
INCOMPRESSIBLE = os.urandom(3000) + MARKER + os.urandom(3000)


@pytest.fixture
def keys() -> Keys:
    return Keys.from_master(os.urandom(32))


def seal(keys: Keys, plaintext: bytes, *, encrypt: bool) -> tuple[bytes, bytes]:
    block_id = _native.block_id(keys.id_key, plaintext)
    return block_id, seal_block(keys, block_id, plaintext, encrypt=encrypt, level=3)


# --- keys and key wrapping -----------------------------------------------------------


def test_subkeys_are_distinct_and_deterministic() -> None:
    master = os.urandom(32)
    a, b = Keys.from_master(master), Keys.from_master(master)
    assert a == b
    assert len({a.data_key, a.id_key, a.gear_key, master}) == 4
    assert all(len(k) == 32 for k in (a.data_key, a.id_key, a.gear_key))
    assert Keys.from_master(os.urandom(32)).data_key != a.data_key
    assert a.data_key.hex() not in repr(a) and a.id_key.hex() not in repr(a)


@pytest.mark.parametrize("algo", ["argon2id", "scrypt"])
def test_kdf_deterministic_per_salt(algo: str) -> None:
    if algo == "argon2id" and not crypto.argon2id_available():
        pytest.skip("no Argon2id in this cryptography build")
    params = KdfParams.new(algo)
    key = derive_wrapping_key(b"pass", params)
    assert len(key) == 32
    assert derive_wrapping_key(b"pass", params) == key
    assert derive_wrapping_key(b"Pass", params) != key
    assert derive_wrapping_key(b"pass", KdfParams.new(algo)) != key  # new salt


def test_kdf_params_json_roundtrip() -> None:
    for algo in ("argon2id", "scrypt"):
        params = KdfParams.new(algo)
        assert KdfParams.from_json(json.loads(json.dumps(params.to_json()))) == params


def test_kdf_production_params(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLOUDFS_TEST_FAST_KDF", raising=False)
    params = KdfParams.new()
    if crypto.argon2id_available():
        assert (params.algo, params.memory_kib, params.iterations, params.lanes) == (
            "argon2id",
            64 * 1024,
            3,
            4,
        )
    else:
        assert (params.algo, params.n, params.r) == ("scrypt", 2**16, 8)
    assert len(params.salt) >= 16
    assert len(derive_wrapping_key(b"pass", params)) == 32  # the real cost works


def test_kdf_params_rejects_bad_json() -> None:
    good = KdfParams.new("argon2id").to_json()
    with pytest.raises(UnsupportedFormat):
        KdfParams.from_json({**good, "algo": "bcrypt-9000"})
    bad_params: list[object] = [
        {**good, "memory_kib": 2**40},
        {**good, "iterations": 0},
        {**good, "lanes": "4"},
        {**good, "salt": "zz"},
        {**KdfParams.new("scrypt").to_json(), "n": 1000},
        [],
    ]
    for bad in bad_params:
        with pytest.raises((ValueError, TypeError)):
            KdfParams.from_json(bad)


def test_wrap_unwrap() -> None:
    wrapping, master, aad = os.urandom(32), os.urandom(32), b"fs-uuid-1"
    wrapped = wrap_key(wrapping, master, aad)
    assert master not in wrapped
    assert unwrap_key(wrapping, wrapped, aad) == master
    assert wrap_key(wrapping, master, aad) != wrapped  # fresh nonce
    with pytest.raises(WrongPassphrase):
        unwrap_key(os.urandom(32), wrapped, aad)
    with pytest.raises(WrongPassphrase):
        unwrap_key(wrapping, wrapped, b"fs-uuid-2")
    with pytest.raises(WrongPassphrase):
        unwrap_key(wrapping, wrapped[:-1] + bytes([wrapped[-1] ^ 1]), aad)
    with pytest.raises(CorruptObject):
        unwrap_key(wrapping, wrapped[:-1], aad)


# --- block objects ---------------------------------------------------------------------


@pytest.mark.parametrize("encrypt", [True, False])
@pytest.mark.parametrize("plaintext", [COMPRESSIBLE, INCOMPRESSIBLE, b"", b"x"])
def test_seal_open_roundtrip(keys: Keys, encrypt: bool, plaintext: bytes) -> None:
    block_id, body = seal(keys, plaintext, encrypt=encrypt)
    assert open_block(keys, block_id, body) == plaintext
    assert body[:4] == b"CFSB" and body[4] == 1
    assert int.from_bytes(body[6:10], "big") == keys.key_id
    flags = body[5]
    assert bool(flags & FLAG_ENCRYPTED) == encrypt
    assert bool(flags & FLAG_COMPRESSED) == (plaintext is COMPRESSIBLE)


def test_compression_only_when_smaller(keys: Keys) -> None:
    _, body = seal(keys, COMPRESSIBLE, encrypt=True)
    assert len(body) < len(COMPRESSIBLE) // 10
    _, body = seal(keys, INCOMPRESSIBLE, encrypt=False)
    assert len(body) == HEADER_SIZE + len(INCOMPRESSIBLE) + 16
    _, body = seal(keys, INCOMPRESSIBLE, encrypt=True)
    assert len(body) == HEADER_SIZE + 12 + len(INCOMPRESSIBLE) + 16


def test_probe_decides_compression_of_big_blocks(keys: Keys) -> None:
    """A block past twice PROBE_SIZE is compressed only if its first PROBE_SIZE bytes
    shrink: random data is stored raw without a full zstd pass, text still shrinks,
    and either way the block opens to its bytes."""
    text = b"".join(b"line %d of some text that repeats\n" % i for i in range(40_000))
    noise = os.urandom(3 * PROBE_SIZE)
    cases = {
        text: True,
        noise: False,
        noise[:PROBE_SIZE] + text: False,  # the price of the probe: stored raw
        text[:PROBE_SIZE] + noise: True,  # a little gained on the head: zstd runs
    }
    for plaintext, compressed in cases.items():
        block_id, body = seal(keys, plaintext, encrypt=True)
        assert bool(body[5] & FLAG_COMPRESSED) == compressed
        assert open_block(keys, block_id, body) == plaintext


def test_encrypted_body_hides_plaintext(keys: Keys) -> None:
    for plaintext in (COMPRESSIBLE, INCOMPRESSIBLE, MARKER):
        _, body = seal(keys, plaintext, encrypt=True)
        assert MARKER not in body
    # the check is meaningful: without encryption the marker is in the clear
    _, body = seal(keys, INCOMPRESSIBLE, encrypt=False)
    assert MARKER in body


def test_encryption_uses_fresh_nonces(keys: Keys) -> None:
    block_id, body1 = seal(keys, COMPRESSIBLE, encrypt=True)
    _, body2 = seal(keys, COMPRESSIBLE, encrypt=True)
    assert body1 != body2
    assert open_block(keys, block_id, body2) == COMPRESSIBLE


@pytest.mark.parametrize("encrypt", [True, False])
@pytest.mark.parametrize("plaintext", [COMPRESSIBLE[:3000], INCOMPRESSIBLE[:500]])
def test_any_flipped_bit_is_detected(keys: Keys, encrypt: bool, plaintext: bytes) -> None:
    block_id, body = seal(keys, plaintext, encrypt=encrypt)
    for pos in range(len(body)):
        for bit in range(8):
            damaged = bytearray(body)
            damaged[pos] ^= 1 << bit
            with pytest.raises(CorruptBlock):
                open_block(keys, block_id, bytes(damaged))


@pytest.mark.parametrize("encrypt", [True, False])
@pytest.mark.parametrize("plaintext", [COMPRESSIBLE, INCOMPRESSIBLE])
def test_truncation_and_extension_are_detected(keys: Keys, encrypt: bool, plaintext: bytes) -> None:
    block_id, body = seal(keys, plaintext, encrypt=encrypt)
    for length in range(len(body)):
        with pytest.raises(CorruptBlock):
            open_block(keys, block_id, body[:length])
    for extra in (b"\0", b"garbage"):
        with pytest.raises(CorruptBlock):
            open_block(keys, block_id, body + extra)


@pytest.mark.parametrize("encrypt", [True, False])
def test_body_of_another_block_is_detected(keys: Keys, encrypt: bool) -> None:
    id_a, body_a = seal(keys, COMPRESSIBLE, encrypt=encrypt)
    id_b, body_b = seal(keys, INCOMPRESSIBLE, encrypt=encrypt)
    with pytest.raises(CorruptBlock):
        open_block(keys, id_b, body_a)
    with pytest.raises(CorruptBlock):
        open_block(keys, id_a, body_b)


@pytest.mark.parametrize("encrypt", [True, False])
@pytest.mark.parametrize("plaintext", [COMPRESSIBLE, INCOMPRESSIBLE])
def test_open_into_a_buffer(keys: Keys, encrypt: bool, plaintext: bytes) -> None:
    """The fetcher's way: the same plaintext as open_block, decrypted into the caller's
    buffer when it fits, and every damage still refused, also for an encrypted block
    stored raw, which is trusted on its GCM tag without the id check."""
    block_id, body = seal(keys, plaintext, encrypt=encrypt)
    buffer = bytearray(len(plaintext) + 100)
    view = open_block_into(keys, block_id, body, buffer)
    assert bytes(view) == plaintext
    if encrypt and body[5] == FLAG_ENCRYPTED:  # stored raw: decrypted in place
        assert view.obj is buffer
    assert bytes(open_block_into(keys, block_id, body, bytearray(10))) == plaintext
    other_id, other_body = seal(keys, plaintext[::-1], encrypt=encrypt)
    damaged = [body[:-1], body + b"\0", other_body]
    for pos in (0, 5, HEADER_SIZE, HEADER_SIZE + 12, len(body) // 2, len(body) - 1):
        flipped = bytearray(body)
        flipped[pos] ^= 0x10
        damaged.append(bytes(flipped))
    for bad in damaged:
        with pytest.raises(CorruptBlock):
            open_block_into(keys, block_id, bad, buffer)
    with pytest.raises(CorruptBlock):
        open_block_into(Keys.from_master(os.urandom(32)), block_id, body, buffer)


@pytest.mark.parametrize("encrypt", [True, False])
def test_wrong_key_is_detected(keys: Keys, encrypt: bool) -> None:
    block_id, body = seal(keys, COMPRESSIBLE, encrypt=encrypt)
    with pytest.raises(CorruptBlock):
        open_block(Keys.from_master(os.urandom(32)), block_id, body)
    other_generation = Keys(keys.data_key, keys.id_key, keys.gear_key, key_id=1)
    with pytest.raises(CorruptBlock):
        open_block(other_generation, block_id, body)


def test_unknown_format_or_flags_are_refused(keys: Keys) -> None:
    block_id, body = seal(keys, COMPRESSIBLE, encrypt=False)
    for pos, value in ((4, 2), (5, body[5] | 0x80)):
        changed = bytearray(body)
        changed[pos] = value
        with pytest.raises(CorruptBlock, match="unknown"):
            open_block(keys, block_id, bytes(changed))


@pytest.mark.parametrize("encrypt", [True, False])
def test_decompression_is_bounded(keys: Keys, encrypt: bool) -> None:
    bomb = bytes(4 * 1024 * 1024)
    block_id, body = seal(keys, bomb, encrypt=encrypt)
    assert len(body) < 4096
    with pytest.raises(CorruptBlock):
        open_block(keys, block_id, body, max_size=1024 * 1024)
    assert open_block(keys, block_id, body, max_size=len(bomb)) == bomb
    block_id, body = seal(keys, INCOMPRESSIBLE, encrypt=encrypt)
    with pytest.raises(CorruptBlock):
        open_block(keys, block_id, body, max_size=len(INCOMPRESSIBLE) - 1)


def test_block_key() -> None:
    block_id = bytes(range(32))
    key = block_key(block_id)
    assert key == "blocks/00/" + block_id.hex()
    assert parse_block_key(key) == block_id
    for other in ("superblock", "blocks/01/" + block_id.hex(), "blocks/00/abc", key.upper()):
        assert parse_block_key(other) is None
    with pytest.raises(ValueError):
        block_key(b"short")


# --- superblock ----------------------------------------------------------------------


async def test_create_and_unlock_encrypted(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    sb, keys = await create_filesystem(store, b"correct horse")
    assert sb.encryption and sb.kdf is not None and sb.format == FORMAT_VERSION
    raw = await store.get(SUPERBLOCK_KEY)
    assert keys.data_key not in raw and b"correct horse" not in raw
    stored = await read_superblock(store)
    assert stored == sb
    assert unlock(stored, b"correct horse") == keys
    with pytest.raises(WrongPassphrase):
        unlock(stored, b"correct horsf")
    with pytest.raises(UsageError):
        unlock(stored, None)


async def test_create_and_unlock_unencrypted(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    _, keys = await create_filesystem(store, None, encryption=False, chunker=(8192, 16384, 65536))
    obj = json.loads(await store.get(SUPERBLOCK_KEY))
    assert "master_key" in obj and "wrapped_key" not in obj and "kdf" not in obj
    stored = await read_superblock(store)
    assert stored.chunker == {"min": 8192, "avg": 16384, "max": 65536}
    assert stored.max_block_size == 65536
    assert unlock(stored, None) == keys


@pytest.mark.parametrize("encryption", [True, False])
async def test_superblock_json_roundtrip(tmp_path: Path, encryption: bool) -> None:
    sb, _ = await create_filesystem(
        LocalStore(tmp_path), b"pw" if encryption else None, encryption=encryption, level=9
    )
    again = Superblock.from_json(sb.to_json())
    assert again == sb
    assert again.level == 9


async def test_newer_format_is_unsupported(tmp_path: Path) -> None:
    sb, _ = await create_filesystem(LocalStore(tmp_path), b"pw")
    obj = json.loads(sb.to_json())
    newer = {"format": FORMAT_VERSION + 1, "whatever": "a later format looks like"}
    with pytest.raises(UnsupportedFormat):
        Superblock.from_json(json.dumps(newer).encode())
    with pytest.raises(UnsupportedFormat):
        Superblock.from_json(json.dumps({**obj, "compression": {"algo": "lz9"}}).encode())
    for bad in (b"not json", b"[]", json.dumps({**obj, "format": "1"}).encode()):
        with pytest.raises(CorruptObject):
            Superblock.from_json(bad)
    broken = dict(obj)
    del broken["wrapped_key"]
    with pytest.raises(CorruptObject):
        Superblock.from_json(json.dumps(broken).encode())


async def test_wrapped_key_is_bound_to_its_filesystem(tmp_path: Path) -> None:
    sb_a, _ = await create_filesystem(LocalStore(tmp_path / "a"), b"same pass")
    sb_b, _ = await create_filesystem(LocalStore(tmp_path / "b"), b"same pass")
    moved = Superblock.from_json(sb_b.to_json())
    moved.kdf, moved.wrapped_key = sb_a.kdf, sb_a.wrapped_key
    with pytest.raises(WrongPassphrase):
        unlock(moved, b"same pass")


async def test_no_filesystem(tmp_path: Path) -> None:
    with pytest.raises(NoFilesystem):
        await read_superblock(LocalStore(tmp_path / "empty"))


async def snapshot(store: LocalStore) -> dict[str, bytes]:
    return {info.key: await store.get(info.key) async for info in store.list_all()}


async def test_create_refuses_existing_filesystem(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    sb, keys = await create_filesystem(store, b"pw")
    await store.put(block_key(bytes(32)), b"a block")
    before = await snapshot(store)
    for encryption, passphrase in ((True, b"other"), (False, None)):
        with pytest.raises(FilesystemExists):
            await create_filesystem(store, passphrase, encryption=encryption)
    assert await snapshot(store) == before
    assert unlock(await read_superblock(store), b"pw") == keys

    sb2, keys2 = await create_filesystem(store, b"new", force=True)
    assert sb2.uuid != sb.uuid and keys2 != keys
    assert unlock(await read_superblock(store), b"new") == keys2


async def test_create_refuses_store_with_blocks_but_no_superblock(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    await store.put(block_key(bytes(32)), b"orphan block")
    with pytest.raises(FilesystemExists):
        await create_filesystem(store, b"pw")
    assert await store.head(SUPERBLOCK_KEY) is None


async def test_create_rejects_bad_arguments(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    for kwargs in (
        {"passphrase": None},
        {"passphrase": b""},
        {"passphrase": b"pw", "encryption": False},
        {"passphrase": b"pw", "chunker": (4096, 2048, 8192)},
        {"passphrase": b"pw", "chunker": (4096, 8192, 2**30)},
        {"passphrase": b"pw", "level": 0},
    ):
        with pytest.raises(UsageError):
            await create_filesystem(store, **kwargs)  # type: ignore[arg-type]
    assert await store.list() == []


async def test_change_passphrase_keeps_keys(tmp_path: Path) -> None:
    sb, keys = await create_filesystem(LocalStore(tmp_path), b"old")
    with pytest.raises(WrongPassphrase):
        change_passphrase(sb, b"wrong", b"new")
    sb2 = change_passphrase(sb, b"old", b"new")
    assert sb2.uuid == sb.uuid and sb2.wrapped_key != sb.wrapped_key
    assert unlock(sb2, b"new") == keys
    with pytest.raises(WrongPassphrase):
        unlock(sb2, b"old")
