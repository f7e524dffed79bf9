"""A filesystem's fixed configuration: the superblock (format, uuid, chunker and
compression settings, KDF parameters, the wrapped master key), creating and unlocking
a filesystem, reading the passphrase, and the default cache dir.

The superblock is the object "superblock" in the store, as JSON. A reader refuses a
format newer than FORMAT_VERSION (UnsupportedFormat) before looking at anything else,
so a later format is free to change every other field.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import json
import logging
import os
import sys
import time
import uuid as uuidlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio

from cloudfs.codec.crypto import (
    KEY_SIZE,
    KdfParams,
    Keys,
    derive_wrapping_key,
    unwrap_key,
    wrap_key,
)
from cloudfs.codec.framing import BLOCK_SIZE_LIMIT
from cloudfs.errors import (
    CorruptObject,
    FilesystemExists,
    NoFilesystem,
    ObjectNotFound,
    UnsupportedFormat,
    UsageError,
)
from cloudfs.objectstore.base import ObjectStore

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SUPERBLOCK_KEY = "superblock"
PASSPHRASE_ENV = "CLOUDFS_PASSPHRASE"

KiB = 1024
MiB = 1024 * KiB
#: (min, avg, max) chunk sizes of a new filesystem (mkfs --chunk-size AVG makes avg/4,
#: avg, 4 * avg). A 2 MiB average rather than DESIGN.md's 1 MiB: a cold sequential read
#: from S3 pays per request, and 2 MiB objects read ~50% faster there (README,
#: Architecture), while an edit still re-stores only about one 2 MiB block.
DEFAULT_CHUNKER = (512 * KiB, 2 * MiB, 8 * MiB)
DEFAULT_LEVEL = 3
# Smallest chunker min size: below this the per-block overhead (metadata row, object
# header, request) dominates.
_MIN_CHUNK = 4 * KiB


@dataclass
class Superblock:
    """What mkfs fixed for a filesystem. `wrapped_key` is the master key wrapped by
    the passphrase when `encryption` is on, and the master key itself when it is off
    (block ids stay keyed and verified; block data is not encrypted)."""

    format: int
    uuid: str
    created: float
    chunker: dict[str, int]  # {"min": ..., "avg": ..., "max": ...} bytes
    compression: dict[str, Any]  # {"algo": "zstd", "level": 3}
    encryption: bool
    kdf: KdfParams | None
    wrapped_key: bytes = field(repr=False)

    @property
    def max_block_size(self) -> int:
        """Upper bound of a block's plaintext (the chunker's forced cut)."""
        return self.chunker["max"]

    @property
    def level(self) -> int:
        """zstd level blocks are compressed with."""
        return int(self.compression["level"])

    def to_json(self) -> bytes:
        obj: dict[str, Any] = {
            "format": self.format,
            "uuid": self.uuid,
            "created": self.created,
            "chunker": dict(self.chunker),
            "compression": dict(self.compression),
            "encryption": self.encryption,
        }
        key_b64 = base64.b64encode(self.wrapped_key).decode("ascii")
        if self.encryption:
            assert self.kdf is not None
            obj["kdf"] = self.kdf.to_json()
            obj["wrapped_key"] = key_b64
        else:
            # Its own name, so that nobody mistakes a clear key for a wrapped one.
            obj["master_key"] = key_b64
        return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> Superblock:
        """Parse a superblock. UnsupportedFormat for a newer format (or a KDF or
        compression this version does not know); CorruptObject for a malformed one."""
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CorruptObject(f"superblock is not JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise CorruptObject("superblock is not a JSON object")
        fmt = obj.get("format")
        if type(fmt) is not int or fmt < 1:
            raise CorruptObject(f"superblock format {fmt!r} is invalid")
        if fmt > FORMAT_VERSION:
            raise UnsupportedFormat(f"format {fmt}; this cloudfs reads format {FORMAT_VERSION}")
        try:
            return cls._parse_v1(obj)
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise CorruptObject(f"superblock: {type(exc).__name__}: {exc}") from None

    @classmethod
    def _parse_v1(cls, obj: dict[str, Any]) -> Superblock:
        fs_uuid = str(uuidlib.UUID(obj["uuid"]))
        created = float(obj["created"])
        chunker = {name: obj["chunker"][name] for name in ("min", "avg", "max")}
        check_chunker(chunker["min"], chunker["avg"], chunker["max"])
        compression = dict(obj["compression"])
        if compression.get("algo") != "zstd":
            raise UnsupportedFormat(f"compression {compression.get('algo')!r}")
        check_level(compression.get("level"))
        encryption = obj["encryption"]
        if type(encryption) is not bool:
            raise ValueError("encryption is not true or false")
        if encryption:
            kdf: KdfParams | None = KdfParams.from_json(obj["kdf"])
            key = base64.b64decode(obj["wrapped_key"], validate=True)
        else:
            kdf = None
            key = base64.b64decode(obj["master_key"], validate=True)
            if len(key) != KEY_SIZE:
                raise ValueError(f"master key has {len(key)} bytes")
        return cls(
            format=obj["format"],
            uuid=fs_uuid,
            created=created,
            chunker=chunker,
            compression=compression,
            encryption=encryption,
            kdf=kdf,
            wrapped_key=key,
        )


def check_chunker(min_size: Any, avg_size: Any, max_size: Any) -> None:
    """ValueError unless min <= avg <= max are sane chunk sizes in bytes."""
    sizes = (min_size, avg_size, max_size)
    if any(type(size) is not int for size in sizes):
        raise ValueError(f"chunk sizes {sizes} are not integers")
    if not _MIN_CHUNK <= min_size <= avg_size <= max_size <= BLOCK_SIZE_LIMIT:
        raise ValueError(
            f"chunk sizes must satisfy {_MIN_CHUNK} <= min <= avg <= max <= "
            f"{BLOCK_SIZE_LIMIT}, not {sizes}"
        )


def chunker_for(avg_size: int) -> tuple[int, int, int]:
    """(min, avg, max) for an average chunk size (mkfs --chunk-size): a power of two from
    16 KiB to 16 MiB, with min = avg / 4 and max = 4 * avg. UsageError otherwise."""
    if not (16 * KiB <= avg_size <= 16 * MiB and avg_size & (avg_size - 1) == 0):
        raise UsageError(
            f"chunk size {avg_size:,} bytes is not a power of two from 16K to 16M (like 1M, 2M, 4M)"
        )
    return avg_size // 4, avg_size, avg_size * 4


def check_level(level: Any) -> None:
    """ValueError unless `level` is a zstd level cloudfs uses (1..22)."""
    if type(level) is not int or not 1 <= level <= 22:
        raise ValueError(f"zstd level {level!r} is not in 1..22")


def _key_aad(fs_uuid: str) -> bytes:
    # The wrapped key opens only in the filesystem it was made for.
    return fs_uuid.encode("ascii")


async def read_superblock(store: ObjectStore) -> Superblock:
    """The store's superblock; NoFilesystem if it has none."""
    try:
        data = await store.get(SUPERBLOCK_KEY)
    except ObjectNotFound:
        raise NoFilesystem(store.url) from None
    return Superblock.from_json(data)


async def write_superblock(store: ObjectStore, sb: Superblock) -> None:
    """Replace the store's superblock (atomic: put)."""
    await store.put(SUPERBLOCK_KEY, sb.to_json())


async def create_filesystem(
    store: ObjectStore,
    passphrase: bytes | None,
    *,
    encryption: bool = True,
    force: bool = False,
    chunker: tuple[int, int, int] = DEFAULT_CHUNKER,
    level: int = DEFAULT_LEVEL,
) -> tuple[Superblock, Keys]:
    """Write the superblock of a new filesystem with a random master key; its keys.

    Refuses (FilesystemExists, store untouched) when the store already has a superblock
    or blocks, unless `force`. With `force` only the superblock is replaced: blocks of
    the old filesystem stay in the store (unreadable with the new keys) until the
    caller deletes them. UsageError for invalid arguments, checked before any write.
    """
    try:
        check_chunker(*chunker)
        check_level(level)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if encryption and not passphrase:
        raise UsageError("an encrypted filesystem needs a non-empty passphrase")
    if not encryption and passphrase is not None:
        raise UsageError("a passphrase was given but encryption is off")

    if not force:
        if await store.head(SUPERBLOCK_KEY) is not None:
            raise FilesystemExists(store.url)
        if await store.list("blocks/", limit=1):
            raise FilesystemExists(f"{store.url} holds blocks but no superblock")

    fs_uuid = str(uuidlib.uuid4())
    master = os.urandom(KEY_SIZE)
    kdf: KdfParams | None = None
    if encryption:
        assert passphrase is not None
        kdf = KdfParams.new()
        wrapping_key = await trio.to_thread.run_sync(derive_wrapping_key, passphrase, kdf)
        stored_key = wrap_key(wrapping_key, master, _key_aad(fs_uuid))
    else:
        stored_key = master
    sb = Superblock(
        format=FORMAT_VERSION,
        uuid=fs_uuid,
        created=time.time(),
        chunker={"min": chunker[0], "avg": chunker[1], "max": chunker[2]},
        compression={"algo": "zstd", "level": level},
        encryption=encryption,
        kdf=kdf,
        wrapped_key=stored_key,
    )
    await write_superblock(store, sb)
    log.info("created filesystem %s in %s", fs_uuid, store.url)
    return sb, Keys.from_master(master)


def _master_key(sb: Superblock, passphrase: bytes | None) -> bytes:
    if not sb.encryption:
        return sb.wrapped_key
    if not passphrase:
        raise UsageError("this filesystem is encrypted: a passphrase is needed")
    assert sb.kdf is not None
    wrapping_key = derive_wrapping_key(passphrase, sb.kdf)
    return unwrap_key(wrapping_key, sb.wrapped_key, _key_aad(sb.uuid))


def unlock_master(sb: Superblock, passphrase: bytes | None) -> bytes:
    """The master key itself (for handing to cloudfsd through a pipe); WrongPassphrase
    if `passphrase` does not open it. Runs the KDF: async callers use a thread."""
    return _master_key(sb, passphrase)


def unlock(sb: Superblock, passphrase: bytes | None) -> Keys:
    """The filesystem's keys; WrongPassphrase if `passphrase` does not open the
    wrapped key. Runs the KDF (slow by design): async callers use a worker thread.
    The passphrase is ignored when encryption is off."""
    return Keys.from_master(_master_key(sb, passphrase))


def change_passphrase(sb: Superblock, old: bytes, new: bytes) -> Superblock:
    """A copy of `sb` whose master key is wrapped by `new` (fresh salt and current
    KDF parameters); WrongPassphrase if `old` is wrong. The keys, and so every block,
    stay the same: only the superblock needs rewriting."""
    if not sb.encryption:
        raise UsageError("this filesystem is not encrypted: it has no passphrase")
    if not new:
        raise UsageError("the new passphrase is empty")
    master = _master_key(sb, old)
    kdf = KdfParams.new()
    wrapped = wrap_key(derive_wrapping_key(new, kdf), master, _key_aad(sb.uuid))
    return replace(sb, kdf=kdf, wrapped_key=wrapped)


def default_cachedir(uuid: str) -> Path:
    """~/.cache/cloudfs/<uuid> ($XDG_CACHE_HOME/cloudfs/<uuid> when that is set)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "cloudfs" / uuid


def read_passphrase(passphrase_file: str | None, *, confirm: bool) -> bytes:
    """The passphrase from, in this order: `passphrase_file` (one trailing newline
    stripped), the environment variable CLOUDFS_PASSPHRASE, or a prompt on the
    terminal (asked twice when `confirm`). UsageError when none is available or the
    passphrase is empty."""
    if passphrase_file is not None:
        try:
            with open(passphrase_file, "rb") as f:
                passphrase = f.read()
        except OSError as exc:
            raise UsageError(
                f"cannot read passphrase file {passphrase_file}: {exc.strerror}"
            ) from None
        if passphrase.endswith(b"\r\n"):
            passphrase = passphrase[:-2]
        elif passphrase.endswith(b"\n"):
            passphrase = passphrase[:-1]
        if not passphrase:
            raise UsageError(f"passphrase file {passphrase_file} is empty")
        return passphrase

    env = os.environ.get(PASSPHRASE_ENV)
    if env is not None:
        if not env:
            raise UsageError(f"the environment variable {PASSPHRASE_ENV} is empty")
        return os.fsencode(env)

    if sys.stdin is None or not sys.stdin.isatty():
        raise UsageError(
            "a passphrase is needed but there is no terminal to ask for it: "
            f"use --passphrase-file or set {PASSPHRASE_ENV}"
        )
    first = getpass.getpass("Passphrase: ")
    if not first:
        raise UsageError("the passphrase is empty")
    if confirm and getpass.getpass("Passphrase (again): ") != first:
        raise UsageError("the passphrases do not match")
    return first.encode("utf-8")
