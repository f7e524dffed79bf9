"""Metadata backups: a consistent copy of the SQLite metadata, compressed and encrypted
like a block, put in the store as meta/backup-<UTC time>-<seq>; the newest N are kept;
and the restore that rebuilds a lost metadata database from the newest one.

Streamed: a backup is parts of PART_SIZE bytes of the dump plus a manifest, so no
process ever holds a whole database in memory, however large. The parts go up first,
as meta/backup-<time>-<seq>.part-<n>; the manifest last, as meta/backup-<time>-<seq>:
a backup whose manifest exists is complete. Each object is b"CFSMETA1" (a part) or
b"CFSMETA2" (a manifest), then its content's id (HMAC-SHA256 with the id key, as a
block's), then the content sealed exactly like a block with that id (cloudfs.codec:
zstd, AES-256-GCM with the id and header as associated data; without encryption an
HMAC tag). The manifest lists the parts' ids and sizes and the dump's SHA-256, so a
restore checks every part, their order and the whole; a backup opens only with the
filesystem's keys, and a damaged one fails to open (CorruptBlock) instead of
restoring wrong metadata. (A backup of an older version is one CFSMETA1 object
holding the whole dump: still restored.)

The copy is taken with SQLite's backup API into a temporary file: one consistent
state, whatever the mount and the daemon commit meanwhile; it is read from there one
part at a time. Backups are taken by the
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

import hashlib
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
from cloudfs.meta.base import MetaStore
from cloudfs.meta.schema import BLOCK_PENDING
from cloudfs.meta.sqlite import SqliteMetaStore
from cloudfs.metadump import dump_rows, load_rows
from cloudfs.objectstore.base import ObjectStore

log = logging.getLogger(__name__)

PREFIX = "meta/backup-"
#: a sealed part of a dump (or, from older versions, a whole dump)
MAGIC = b"CFSMETA1"
#: a sealed manifest: the JSON list of a backup's parts
MANIFEST_MAGIC = b"CFSMETA2"
#: bytes of the dump per part object: what a backup or restore holds in memory
PART_SIZE = 4 << 20
PART_INFIX = ".part-"
#: parts without a manifest this old are of a backup cut short: pruned
ORPHAN_AGE_S = 3600.0
#: backups kept by default
DEFAULT_KEEP = 10
#: seconds between periodic backups by default
DEFAULT_INTERVAL_S = 3600.0
#: a restored database can be this large at most (decompression bound)
MAX_DUMP = 1 << 40
#: the manifest's "engine": what its dump is (a backup without one is "sqlite")
ENGINE_SQLITE = "sqlite"  # a SQLite database file
ENGINE_MYSQL = "mysql"  # a row dump (cloudfs.metadump) of a MySQL database
#: meta_info row of a MySQL database: when (ns) some process last claimed a backup
CLAIM_INFO = "backup_claimed_ns"

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


def snapshot(db_path: Path, tmp: Path) -> None:
    """A consistent copy of the SQLite database into the file `tmp` (blocking: run
    in a thread)."""
    src = sqlite3.connect(db_path, timeout=30)
    try:
        dst = sqlite3.connect(tmp)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()


def _seal(magic: bytes, keys: Keys, data: bytes, *, encrypt: bool, level: int) -> bytes:
    data_id = _native.block_id(keys.id_key, data)
    return magic + data_id + seal_block(keys, data_id, data, encrypt=encrypt, level=level)


def _open(magic: bytes, keys: Keys, body: bytes, max_size: int) -> tuple[bytes, bytes]:
    """(id, content) of a sealed backup object; CorruptBlock if it is not one of this
    filesystem of the kind `magic` says, intact."""
    head = len(magic) + BLOCK_ID_SIZE
    if len(body) < head or body[: len(magic)] != magic:
        raise CorruptBlock("not a cloudfs metadata backup")
    data_id = body[len(magic) : head]
    return data_id, open_block(keys, data_id, body[head:], max_size=max_size)


def seal_dump(keys: Keys, dump: bytes, *, encrypt: bool, level: int) -> bytes:
    """A part (or a whole dump, the format of older versions) as an object."""
    return _seal(MAGIC, keys, dump, encrypt=encrypt, level=level)


def open_dump(keys: Keys, body: bytes) -> bytes:
    """The bytes in a part object (or in a whole-dump backup of an older version);
    CorruptBlock if it is not one of this filesystem, intact."""
    return _open(MAGIC, keys, body, MAX_DUMP)[1]


@dataclass(frozen=True)
class Manifest:
    """What a backup's manifest object says: its parts (id, size) in order, and the
    dump's size and SHA-256."""

    parts: list[tuple[bytes, int]]
    size: int
    sha256: str
    #: what the dump is: "sqlite" a SQLite database file; "mysql" a row dump
    #: (cloudfs.metadump) of a MySQL database
    engine: str = ENGINE_SQLITE

    def to_json(self) -> bytes:
        return json.dumps({
            "format": 2, "size": self.size, "sha256": self.sha256, "engine": self.engine,
            "parts": [[i.hex(), n] for i, n in self.parts],
        }).encode()  # fmt: skip

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        try:
            obj = json.loads(data)
            return cls([(bytes.fromhex(i), int(n)) for i, n in obj["parts"]],
                       int(obj["size"]), str(obj["sha256"]),
                       str(obj.get("engine", ENGINE_SQLITE)))  # fmt: skip
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptBlock(f"a metadata backup manifest that does not parse: {exc}") from None


def part_key(backup_key: str, n: int) -> str:
    return f"{backup_key}{PART_INFIX}{n:06d}"


async def _put_parts(
    store: ObjectStore, keys: Keys, dump_path: Path, backup_key: str, *, encrypt: bool,
    level: int,
) -> Manifest:  # fmt: skip
    """Put the file `dump_path` as parts of `backup_key`, one part in memory at a time."""
    parts: list[tuple[bytes, int]] = []
    whole = hashlib.sha256()
    async with await trio.open_file(dump_path, "rb") as f:
        while True:
            data = await f.read(PART_SIZE)
            if not data and parts:
                break
            whole.update(data)

            def seal(data: bytes = data) -> tuple[bytes, bytes]:
                body = seal_dump(keys, data, encrypt=encrypt, level=level)
                return body[len(MAGIC) : len(MAGIC) + BLOCK_ID_SIZE], body

            part_id, body = await trio.to_thread.run_sync(seal)
            await store.put(part_key(backup_key, len(parts)), body)
            parts.append((part_id, len(data)))
            if len(data) < PART_SIZE:
                break
    return Manifest(parts, sum(n for _i, n in parts), whole.hexdigest())


async def read_backup(store: ObjectStore, keys: Keys, key: str, out: Path) -> int:
    """Write the dump of the backup `key` to the file `out`, one part at a time,
    checking every part and the whole against the manifest. Returns its size;
    CorruptBlock when anything does not match."""
    return (await _read_backup(store, keys, key, out))[0]


async def _read_backup(store: ObjectStore, keys: Keys, key: str, out: Path) -> tuple[int, str]:
    """`read_backup`, and the engine the manifest names (what the dump is)."""
    body = await store.get(key)
    if body[: len(MAGIC)] == MAGIC:  # a whole dump, from an older version
        dump = await trio.to_thread.run_sync(open_dump, keys, body)
        await trio.to_thread.run_sync(out.write_bytes, dump)
        return len(dump), ENGINE_SQLITE
    _id, raw = await trio.to_thread.run_sync(_open, MANIFEST_MAGIC, keys, body, 1 << 30)
    manifest = Manifest.from_json(raw)
    whole = hashlib.sha256()
    async with await trio.open_file(out, "wb") as f:
        for n, (part_id, size) in enumerate(manifest.parts):
            part_body = await store.get(part_key(key, n))
            got_id, data = await trio.to_thread.run_sync(_open, MAGIC, keys, part_body, PART_SIZE)
            if got_id != part_id or len(data) != size:
                raise CorruptBlock(f"part {n} of metadata backup {key} is not the one "
                                   "its manifest names")  # fmt: skip
            whole.update(data)
            await f.write(data)
    if whole.hexdigest() != manifest.sha256 or sum(n for _i, n in manifest.parts) != manifest.size:
        raise CorruptBlock(f"metadata backup {key} does not add up to its manifest")
    return manifest.size, manifest.engine


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
    tmp = cache.tmp / f"meta-backup.{os.getpid()}.{time.monotonic_ns():x}"
    try:
        await trio.to_thread.run_sync(snapshot, db_path, tmp)
        key = await _put_dump(store, keys, tmp, ENGINE_SQLITE, encrypt=encrypt, level=level,
                              keep=keep)  # fmt: skip
    finally:
        tmp.unlink(missing_ok=True)
    _record(cache, key, before)
    return key


async def _put_dump(
    store: ObjectStore, keys: Keys, dump_path: Path, engine: str, *, encrypt: bool, level: int,
    keep: int,
) -> str:  # fmt: skip
    """Put the file `dump_path` as a new backup (parts, then its manifest); keep the
    newest `keep`. The backup's key."""
    existing = await list_backups(store)
    seq = existing[-1].seq + 1 if existing else 1
    key = f"{PREFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{seq:08d}"
    parts = await _put_parts(store, keys, dump_path, key, encrypt=encrypt, level=level)
    manifest = Manifest(parts.parts, parts.size, parts.sha256, engine)
    # last: a backup with a manifest is complete
    await store.put(key, _seal(MANIFEST_MAGIC, keys, manifest.to_json(), encrypt=encrypt,
                               level=level))  # fmt: skip
    await _prune(store, existing[: max(0, len(existing) + 1 - keep)])
    log.info("metadata backup %s (%s): %d bytes in %d parts", key, engine, manifest.size,
             len(manifest.parts))  # fmt: skip
    return key


async def _claim(meta: MetaStore, *, force: bool, unless_within: float) -> int | None:
    """Claim the next backup of a shared database, unless another process (mount or
    daemon, on any machine) claimed one less than `unless_within` seconds ago
    (`force`: anyway). Two claims at once conflict (SERIALIZABLE: a deadlock on one
    side); `run` retries the loser, which then sees the winner's claim. The previous
    claim (ns) to give back if the backup fails, or None when skipped."""

    async def claim() -> int | None:
        now = time.time_ns()
        async with meta.transaction() as tx:
            last = int(await tx.get_info(CLAIM_INFO) or 0)
            if not force and now - last < unless_within * 1e9:
                return None
            await tx.set_info(CLAIM_INFO, str(now))
        return last

    return await meta.run(claim)


async def put_rows_backup(
    store: ObjectStore,
    keys: Keys,
    cache: CacheDir,
    meta: MetaStore,
    *,
    encrypt: bool,
    level: int,
    keep: int = DEFAULT_KEEP,
    force: bool = False,
    unless_within: float = 0.0,
) -> str | None:
    """Back up a MySQL metadata database: a row dump (cloudfs.metadump, one consistent
    snapshot) streamed through a temporary file in the cache dir into parts, like a
    SQLite backup. Of the processes that share the database, only the one that claims
    the backup in it takes one (none if the last claim is less than `unless_within`
    seconds old, unless `force`). The new object's key, or None when skipped."""
    previous = await _claim(meta, force=force, unless_within=unless_within)
    if previous is None:
        return None
    tmp = cache.tmp / f"meta-dump.{os.getpid()}.{time.monotonic_ns():x}"
    try:
        await dump_rows(meta, tmp)
        key = await _put_dump(store, keys, tmp, ENGINE_MYSQL, encrypt=encrypt, level=level,
                              keep=keep)  # fmt: skip
    except BaseException:
        # give the claim back, so the next occasion (here or elsewhere) tries again
        with trio.CancelScope(shield=True):
            try:
                async with meta.transaction() as tx:
                    await tx.set_info(CLAIM_INFO, str(previous))
            except Exception as exc:  # noqa: BLE001 - the backup's error is the one to report
                log.debug("giving the backup claim back failed: %s", exc)
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return key


async def _prune(store: ObjectStore, old: list[BackupName]) -> None:
    """Delete the backups `old` with their parts, and the parts of backups that never
    got their manifest (cut short by a crash) once ORPHAN_AGE_S old (a younger one
    may be another process's backup under way)."""
    complete = {n.key for n in await list_backups(store)} - {n.key for n in old}
    doomed = {n.key for n in old}
    cutoff = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() - ORPHAN_AGE_S))
    parts = []
    async for info in store.list_all(PREFIX):
        owner, infix, _n = info.key.rpartition(PART_INFIX)
        if not infix or owner in complete:
            continue
        name = BackupName.parse(owner)
        if owner in doomed or (name is not None and name.taken < cutoff):
            parts.append(info.key)
    if doomed or parts:
        await store.delete_many([*sorted(doomed), *parts])


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


async def _match_pending(store: ObjectStore, fs_uuid: str, meta: MetaStore) -> tuple[int, int]:
    """Check that `meta` holds `fs_uuid`'s metadata; mark its pending blocks stored
    when the store has them. Returns (found, missing)."""
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
    db_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = db_path.parent / f".{db_path.name}.restore.{os.getpid()}"
    rows = db_path.parent / f".{db_path.name}.rows.{os.getpid()}"
    try:
        size, engine = await _read_backup(store, keys, newest.key, tmp)
        if engine != ENGINE_SQLITE:  # a row dump (of MySQL metadata): into a new database
            os.replace(tmp, rows)
            meta = SqliteMetaStore(tmp)
            try:
                await load_rows(meta, rows)
            finally:
                await meta.close()
        meta = SqliteMetaStore(tmp)
        try:
            found, missing = await _match_pending(store, fs_uuid, meta)
        finally:
            await meta.close()
        for suffix in ("-wal", "-shm"):
            Path(f"{db_path}{suffix}").unlink(missing_ok=True)
        os.replace(tmp, db_path)
    finally:
        rows.unlink(missing_ok=True)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
    if missing:
        log.warning("%d blocks the backup names as pending are not in the store: the files "
                    "using them will read as errors", missing)  # fmt: skip
    return Restored(newest.key, newest.taken, size, found, missing)


async def restore_newest_into(
    store: ObjectStore, keys: Keys, fs_uuid: str, meta: MetaStore, scratch: Path, *,
    force: bool = False,
) -> Restored:  # fmt: skip
    """Load the newest backup into the database of `meta` (MySQL): its rows in batches,
    into a database that holds none of the schema's tables (UsageError; `force`: they
    are dropped first); a backup of SQLite metadata is converted. `scratch` is a
    directory for the dump while it loads. NoMetadataBackup when the store holds none."""
    backups = await list_backups(store)
    if not backups:
        raise NoMetadataBackup(store.url)
    newest = backups[-1]
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = scratch / f"meta-restore.{os.getpid()}.{time.monotonic_ns():x}"
    rows = Path(f"{tmp}.rows")
    try:
        size, engine = await _read_backup(store, keys, newest.key, tmp)
        if engine == ENGINE_SQLITE:  # a SQLite database file: its rows
            source = SqliteMetaStore(tmp)
            try:
                await source.check(fs_uuid)
                await dump_rows(source, rows)
            finally:
                await source.close()
        else:
            os.replace(tmp, rows)
        await load_rows(meta, rows, force=force)
        found, missing = await _match_pending(store, fs_uuid, meta)
    finally:
        for path in (tmp, rows, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            path.unlink(missing_ok=True)
    if missing:
        log.warning("%d blocks the backup names as pending are not in the store: the files "
                    "using them will read as errors", missing)  # fmt: skip
    return Restored(newest.key, newest.taken, size, found, missing)
