"""Metadata backups: a consistent copy of the SQLite metadata, compressed and encrypted
like a block, put in the store as meta/backup-<UTC time>-<seq>; the newest N are kept;
and the restore that rebuilds a lost metadata database from the newest one.

Object format: b"CFSMETA1", then the dump's id (HMAC-SHA256 with the id key, as a
block's), then the dump sealed exactly like a block with that id (cloudfs.codec:
zstd, AES-256-GCM with the id and header as associated data; without encryption an
HMAC tag). So a backup opens only with the filesystem's keys, and a damaged one fails
to open (CorruptBlock) instead of restoring wrong metadata.

The copy is taken with SQLite's backup API into a temporary file: one consistent
state, whatever the mount and the daemon commit meanwhile. Backups are taken by the
daemon (every interval, when the last mount leaves, before it exits idle) and by the
mount at unmount; `backup.json` in the cache dir records the state of the database
file (sizes and mtimes of meta.db and its WAL) at the last backup, so an unchanged
database is not put again.

A restored database says what the metadata said at backup time: files written after
it are not in it (their blocks stay in the store, unreachable), and blocks that were
pending then are marked stored if the store has them (the daemon usually uploaded them
after the backup), else reported as missing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from cloudfs import _native
from cloudfs.cache import CacheDir
from cloudfs.codec.crypto import Keys
from cloudfs.codec.framing import BLOCK_ID_SIZE, block_key, open_block, seal_block
from cloudfs.errors import CorruptBlock, NoMetadataBackup, UsageError
from cloudfs.meta.schema import BLOCK_PENDING
from cloudfs.meta.sqlite import SqliteMetaStore
from cloudfs.objectstore.base import ObjectStore

log = logging.getLogger(__name__)

PREFIX = "meta/backup-"
MAGIC = b"CFSMETA1"
#: backups kept by default
DEFAULT_KEEP = 10
#: seconds between periodic backups by default
DEFAULT_INTERVAL_S = 3600.0
#: a restored database can be this large at most (decompression bound)
MAX_DUMP = 1 << 40

_KEY = re.compile(r"^meta/backup-(\d{8}T\d{6}Z)-(\d+)$")


@dataclass(frozen=True)
class BackupName:
    key: str
    taken: str  # UTC time, 20260102T030405Z
    seq: int

    @classmethod
    def parse(cls, key: str) -> BackupName | None:
        m = _KEY.match(key)
        return cls(key, m.group(1), int(m.group(2))) if m else None


def fingerprint(db_path: Path) -> list[int]:
    """What changes when the database does: size and mtime of the file and its WAL."""
    out: list[int] = []
    for path in (db_path, Path(f"{db_path}-wal")):
        try:
            st = path.stat()
            out += [st.st_size, st.st_mtime_ns]
        except FileNotFoundError:
            out += [-1, -1]
    return out


def snapshot(db_path: Path, tmp_dir: Path) -> bytes:
    """A consistent copy of the SQLite database (blocking: run in a thread)."""
    tmp = tmp_dir / f"meta-backup.{os.getpid()}.{time.monotonic_ns():x}"
    src = sqlite3.connect(db_path, timeout=30)
    try:
        dst = sqlite3.connect(tmp)
        try:
            src.backup(dst)
        finally:
            dst.close()
        return tmp.read_bytes()
    finally:
        src.close()
        tmp.unlink(missing_ok=True)


def seal_dump(keys: Keys, dump: bytes, *, encrypt: bool, level: int) -> bytes:
    dump_id = _native.block_id(keys.id_key, dump)
    return MAGIC + dump_id + seal_block(keys, dump_id, dump, encrypt=encrypt, level=level)


def open_dump(keys: Keys, body: bytes) -> bytes:
    """The dump in a backup object; CorruptBlock if it is not a backup of this
    filesystem, intact."""
    head = len(MAGIC) + BLOCK_ID_SIZE
    if len(body) < head or body[: len(MAGIC)] != MAGIC:
        raise CorruptBlock("not a cloudfs metadata backup")
    dump_id = body[len(MAGIC) : head]
    return open_block(keys, dump_id, body[head:], max_size=MAX_DUMP)


async def list_backups(store: ObjectStore) -> list[BackupName]:
    """The backups in the store, oldest first (by sequence number)."""
    found = []
    async for info in store.list_all(PREFIX):
        name = BackupName.parse(info.key)
        if name is not None:
            found.append(name)
    return sorted(found, key=lambda n: (n.seq, n.taken))


async def put_backup(
    store: ObjectStore,
    keys: Keys,
    cache: CacheDir,
    db_path: Path,
    *,
    encrypt: bool,
    level: int,
    keep: int = DEFAULT_KEEP,
    force: bool = False,
    unless_within: float = 0.0,
) -> str | None:
    """Back the database up unless it is unchanged since the last backup, or that one
    is less than `unless_within` seconds old (`force`: anyway); keep the newest `keep`.
    The new object's key, or None when skipped."""
    before = fingerprint(db_path)
    last = _last(cache)
    if not force and last.get("fingerprint") == before:
        return None
    last_time = last.get("time")
    if not force and isinstance(last_time, float) and time.time() - last_time < unless_within:
        return None
    dump = await trio.to_thread.run_sync(snapshot, db_path, cache.tmp)
    body = await trio.to_thread.run_sync(
        lambda: seal_dump(keys, dump, encrypt=encrypt, level=level)
    )
    existing = await list_backups(store)
    seq = existing[-1].seq + 1 if existing else 1
    key = f"{PREFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{seq:08d}"
    await store.put(key, body)
    _record(cache, key, before)
    old = [n.key for n in existing[: max(0, len(existing) + 1 - keep)]]
    if old:
        await store.delete_many(old)
    log.info("metadata backup %s: %d bytes (%d stored)", key, len(dump), len(body))
    return key


def _last(cache: CacheDir) -> dict[str, object]:
    try:
        data = json.loads((cache.root / "backup.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _record(cache: CacheDir, key: str, state: list[int]) -> None:
    tmp = cache.tmp / f"backup.json.{os.getpid()}.{time.monotonic_ns():x}"
    tmp.write_text(json.dumps({"key": key, "fingerprint": state, "time": time.time()}))
    os.replace(tmp, cache.root / "backup.json")


async def _match_pending(store: ObjectStore, fs_uuid: str, db_path: Path) -> tuple[int, int]:
    """Check that `db_path` holds `fs_uuid`'s metadata; mark its pending blocks stored
    when the store has them. Returns (found, missing)."""
    meta = SqliteMetaStore(db_path)
    try:
        await meta.check(fs_uuid, older_ok=True)
        async with meta.reading() as tx:
            rows = await tx.conn.query("SELECT id FROM blocks WHERE state = ?", (BLOCK_PENDING,))
        sizes: dict[bytes, int | None] = {}
        limiter = trio.CapacityLimiter(16)

        async def look(block_id: bytes) -> None:
            async with limiter:
                info = await store.head(block_key(block_id))
            sizes[block_id] = None if info is None else info.size

        async with trio.open_nursery() as nursery:
            for (raw,) in rows:
                nursery.start_soon(look, bytes(raw))
        found = {b: n for b, n in sizes.items() if n is not None}
        async with meta.transaction() as tx:
            for block_id, size in sorted(found.items()):
                await tx.mark_stored(block_id, size)
    finally:
        await meta.close()
    return len(found), len(sizes) - len(found)


@dataclass(frozen=True)
class Restored:
    key: str
    taken: str
    size: int  # bytes of the database
    pending_stored: int  # blocks pending in the backup, found in the store
    pending_missing: int  # blocks pending in the backup, not in the store


async def restore_newest(
    store: ObjectStore, keys: Keys, fs_uuid: str, db_path: Path, *, force: bool = False
) -> Restored:
    """Write the newest backup's database to `db_path` (refused when one is there,
    unless `force`), checked to be this filesystem's, with its pending blocks matched
    against the store. NoMetadataBackup when the store holds none."""
    if not force and any(Path(f"{db_path}{s}").exists() for s in ("", "-wal")):
        raise UsageError(
            f"{db_path} exists: restoring would replace it (fsck.cloudfs --restore-metadata "
            "--force does)"
        )
    backups = await list_backups(store)
    if not backups:
        raise NoMetadataBackup(store.url)
    newest = backups[-1]
    dump = await trio.to_thread.run_sync(open_dump, keys, await store.get(newest.key))
    db_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = db_path.parent / f".{db_path.name}.restore.{os.getpid()}"
    tmp.write_bytes(dump)
    try:
        found, missing = await _match_pending(store, fs_uuid, tmp)
        for suffix in ("-wal", "-shm"):
            Path(f"{db_path}{suffix}").unlink(missing_ok=True)
        os.replace(tmp, db_path)
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
    if missing:
        log.warning("%d blocks the backup names as pending are not in the store: the files "
                    "using them will read as errors", missing)  # fmt: skip
    return Restored(newest.key, newest.taken, len(dump), found, missing)
