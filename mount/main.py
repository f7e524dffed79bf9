"""mount.cloudfs: check everything, start the daemon, mount, serve until unmounted.

Every check that can fail on bad input (storage, passphrase, metadata, mount point)
runs before the process goes to the background, so the user sees one clear line and
a non-zero exit. The background child reports "mounted" or its error through a pipe.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyfuse3
import trio
from cloudfs.daemon.control import DaemonClient, ensure_daemon
from cloudfs.mount import fuse, spin
from cloudfs.mount.history import HistoryOperations
from cloudfs.mount.options import MountOptions, parse
from cloudfs.tools._cli import hide_url_password, metadata_password, open_cli_store, run_cli

from cloudfs import config, malloc, notify
from cloudfs.cache import CacheConfig, CacheDir, CacheSpace
from cloudfs.chunking import ChunkerParams
from cloudfs.clients import Client
from cloudfs.codec.crypto import Keys
from cloudfs.errors import (
    CloudfsError,
    DaemonError,
    LeaseLost,
    MetadataMissing,
    MountpointError,
    UsageError,
)
from cloudfs.files import FileStore, clear_stale_overlays
from cloudfs.lease import Lease, renew_interval
from cloudfs.meta import open_meta
from cloudfs.meta.base import MetaStore
from cloudfs.meta.sqlite import GROUP_WINDOW_S
from cloudfs.meta.url import is_mysql, redact, sqlite_path
from cloudfs.metabackup import DEFAULT_KEEP, put_backup, restore_newest, restore_newest_into
from cloudfs.namespace import Namespace
from cloudfs.objectstore import ObjectStore, open_store
from cloudfs.objectstore.retry import RetryStore

log = logging.getLogger("cloudfs.mount")

#: how long the mount process waits, at unmount, for its metadata backup
BACKUP_AT_UNMOUNT_S = 120.0
#: the kernel's read-ahead window for this mount (KiB). FUSE starts every mount at
#: 128 KiB, so a sequential reader reaches the mount as 128 KiB requests, one window
#: at a time; at 4 MiB the kernel sends 1 MiB requests (libfuse's largest) several at
#: once, and a cold read fetches blocks side by side instead of one after the other.
KERNEL_READAHEAD_KIB = 4096


@dataclass
class Prepared:
    """What the checks produced: everything the serving process needs."""

    opts: MountOptions
    sb: config.Superblock
    master: bytes
    keys: Keys
    cache: CacheDir
    storage_url: str  # canonical, without credentials
    lock_fd: int  # flock on the cache dir's mount.lock, held for the mount's life
    meta_url: str  # without a password
    meta_password: str | None = field(default=None, repr=False)
    #: the mount lease (SQLite metadata only), held from here on
    lease: Lease | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    #: shared mode: where change notifications go (None: no Redis)
    redis: notify.RedisTarget | None = field(default=None, repr=False)


def check_mountpoint(path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise MountpointError(f"{path} does not exist")
    if not p.is_dir():
        raise MountpointError(f"{path} is not a directory")
    if os.path.ismount(p):
        raise MountpointError(f"{path} is already a mount point")


async def prepare(opts: MountOptions) -> Prepared:
    check_mountpoint(opts.mountpoint)
    storage_options = _storage_options_of(opts)
    store = open_cli_store(opts.storage, storage_options)
    try:
        sb = await config.read_superblock(store)
    finally:
        await store.aclose()
    cache = CacheDir(opts.cachedir or config.default_cachedir(sb.uuid))
    master: bytes | None = None
    lock_fd: int | None = None
    if opts.restore_metadata:
        # a fresh machine: the metadata comes from the newest backup in the store
        if opts.metadata and not is_mysql(opts.metadata):
            raise UsageError("--restore-metadata --metadata: a MySQL URL (SQLite metadata is "
                             "restored into the cache dir)")  # fmt: skip
        master = await _unlock(opts, sb)
        cache.create()
        lock_fd = await _lock_cache_dir(cache)
        await _restore_metadata(opts, storage_options, sb, master, cache)
    meta_url, password_file = _metadata_of(opts, cache)
    meta_password = metadata_password(meta_url, password_file)
    # the metadata first: a wrong database fails before the passphrase prompt
    await _check_metadata(meta_url, meta_password, sb.uuid)
    redis_url, redis_password_file = _redis_of(opts, cache)
    redis_target = None
    if redis_url is not None:
        if not is_mysql(meta_url):
            raise UsageError("--redis is for shared mode: a filesystem with MySQL metadata")
        redis_target = notify.parse_redis_url(
            redis_url,
            None
            if notify.redis_url_password(redis_url) is not None
            else notify.read_redis_password(redis_password_file),
        )
        await trio.to_thread.run_sync(notify.check_redis, redis_target)
    if master is None:
        master = await _unlock(opts, sb)
    cache.create()
    if lock_fd is None:
        lock_fd = await _lock_cache_dir(cache)
    # one machine per SQLite-backed filesystem (MySQL is made for several)
    lease = None if is_mysql(meta_url) else await _take_lease(opts, storage_options, cache)
    # the daemon opens the store with the same options (config.json, never credentials)
    # and the same metadata database (its URL without the password)
    cache.write_config(
        CacheConfig(
            storage=store.url,
            metadata=redact(meta_url),
            uuid=sb.uuid,
            options=storage_options,
            metadata_password_file=password_file,
            cache_size=_kept(opts.cache_size, "cache_size", cache),
            backup_interval=_kept(opts.backup_interval, "backup_interval", cache),
            backup_keep=_kept(opts.backup_keep, "backup_keep", cache),
            redis=notify.redact_redis(redis_url) if redis_url else None,
            redis_password_file=redis_password_file if redis_url else None,
        )
    )
    return Prepared(
        opts, sb, master, Keys.from_master(master), cache, store.url, lock_fd,
        meta_url=redact(meta_url), meta_password=meta_password, lease=lease,
        storage_options=storage_options, redis=redis_target,
    )  # fmt: skip


def _redis_of(opts: MountOptions, cache: CacheDir) -> tuple[str | None, str | None]:
    """(Redis URL, password file): from the options (`none`: no Redis), else what the
    cache dir was last mounted with."""
    password_file = opts.redis_password_file
    if password_file:
        password_file = os.path.abspath(password_file)
    if opts.redis is not None:
        if opts.redis.lower() in ("", "none"):
            return None, None
        return opts.redis, password_file
    try:
        previous = cache.read_config() if cache.config_path.exists() else None
    except (CloudfsError, OSError, ValueError, TypeError):
        previous = None
    if previous is None or not previous.redis:
        if password_file:
            raise UsageError("--redis-password-file without --redis")
        return None, None
    return previous.redis, password_file or previous.redis_password_file


async def _take_lease(
    opts: MountOptions, storage_options: dict[str, Any], cache: CacheDir
) -> Lease:
    """The mount lease of this cache dir; LeaseHeld (naming the holder) if another
    machine holds it and not --force."""
    store = open_cli_store(opts.storage, storage_options)
    lease = Lease(store, str(cache.root))
    try:
        taken = await lease.acquire(force=opts.force)
    finally:
        await store.aclose()
    if taken is not None:
        log.warning("took over the mount lease of %s", taken.describe())
    return lease


def _widen_kernel_readahead(mountpoint: str, kib: int) -> None:
    """Set the read-ahead window of the mount's backing device (its "bdi",
    /sys/class/bdi/MAJOR:MINOR, named after the device number of the mount in
    /proc/self/mountinfo: a stat of the mount point would ask this very process).
    `mountpoint`: resolved already. Best effort: only root may write there, and
    reads work either way."""
    target = os.fsencode(mountpoint)
    device = None
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields = line.split()
                # the mount point is field 5, with space, tab, newline, backslash octal-escaped
                if len(fields) > 4 and _unescape_mountinfo(fields[4]) == target:
                    device = fields[2].decode()  # the last one listed is the one on top
        if device is None:
            log.debug("read-ahead: %s not in /proc/self/mountinfo", mountpoint)
            return
        path = Path("/sys/class/bdi") / device / "read_ahead_kb"
        if int(path.read_text()) < kib:
            path.write_text(f"{kib}\n")
            log.debug("read-ahead of %s (bdi %s): %d KiB", mountpoint, device, kib)
    except (OSError, ValueError) as exc:
        log.debug("read-ahead of %s stays at the kernel's default: %s", mountpoint, exc)


def _unescape_mountinfo(field: bytes) -> bytes:
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


async def _renew_lease(lease: Lease, meta: MetaStore, link: DaemonLink) -> None:
    """Renew the lease until cancelled. When another machine took it over (--force),
    this mount must not write a second history into the bucket: it is fenced (every
    change gets EROFS, reads go on, nothing is sealed or backed up any more) and so is
    its daemon (no more uploads, removals or backups for this cache dir)."""
    while True:
        try:
            await lease.renew()
        except LeaseLost as exc:
            reason = exc.message  # "the mount lease was taken over by another machine: …"
            meta.fence(reason)
            log.critical("%s: this mount is read-only from now on (changes get EROFS; "
                         "nothing more is sealed, uploaded or backed up); unmount it",
                         reason)  # fmt: skip
            await link.fence(reason)
            return
        except CloudfsError as exc:
            log.warning("cannot renew the mount lease (%s); trying again", exc.message)
        await trio.sleep(renew_interval())


def _storage_options_of(opts: MountOptions) -> dict[str, Any]:
    """The --s3-* options; without any, those the cache dir named by --cachedir was
    last used with for the same storage (so a remount needs no --s3-endpoint)."""
    if opts.storage_options or not opts.cachedir:
        return opts.storage_options
    cache = CacheDir(opts.cachedir)
    try:
        previous = cache.read_config()
    except (CloudfsError, OSError, ValueError, TypeError):
        return {}
    if previous.storage.rstrip("/") != opts.storage.rstrip("/"):
        return {}
    return dict(previous.options)


def _kept(given: float | None, name: str, cache: CacheDir) -> Any:
    """A setting for config.json (cache size, backup interval and count): the option,
    else what the cache dir was last mounted with; None (and an option of 0, "auto"):
    the default."""
    if given is not None:
        return given or None
    try:
        return getattr(cache.read_config(), name)
    except (CloudfsError, OSError, ValueError, TypeError):
        return None


async def _unlock(opts: MountOptions, sb: config.Superblock) -> bytes:
    """The master key (asks for the passphrase when the filesystem is encrypted)."""
    passphrase = (
        config.read_passphrase(opts.passphrase_file, confirm=False) if sb.encryption else None
    )
    return await trio.to_thread.run_sync(config.unlock_master, sb, passphrase)


async def _restore_metadata(
    opts: MountOptions,
    storage_options: dict[str, Any],
    sb: config.Superblock,
    master: bytes,
    cache: CacheDir,
) -> None:
    """--restore-metadata: the newest metadata backup becomes the cache dir's meta.db
    (refused when it has one), or with `--metadata mysql://...` the rows of that database
    (refused unless it holds none of the schema's tables, as fsck.cloudfs does without
    --force); the cache dir's config then names it."""
    store = open_cli_store(opts.storage, storage_options)
    keys = Keys.from_master(master)
    try:
        if opts.metadata:
            meta = open_meta(
                opts.metadata,
                password=metadata_password(opts.metadata, opts.mysql_password_file),
            )
            try:
                restored = await restore_newest_into(store, keys, sb.uuid, meta, cache.tmp)
            finally:
                await meta.close()
        else:
            restored = await restore_newest(store, keys, sb.uuid, cache.meta_path)
    finally:
        await store.aclose()
    where = redact(opts.metadata) if opts.metadata else str(cache.meta_path)
    previous = cache.read_config() if cache.config_path.exists() else None
    if previous is not None and previous.metadata != where:
        password_file = opts.mysql_password_file
        cache.write_config(replace(
            previous, metadata=where,
            metadata_password_file=os.path.abspath(password_file) if password_file else None,
        ))  # fmt: skip
    print(f"restored the metadata from {restored.key} ({restored.size} bytes)")
    if restored.pending_missing:
        log.warning("%d blocks of the backup are not in the store: files using them read "
                    "as I/O errors", restored.pending_missing)  # fmt: skip


def _metadata_of(opts: MountOptions, cache: CacheDir) -> tuple[str, str | None]:
    """(metadata URL, MySQL password file): from the options, else what the cache dir
    was last used with, else SQLite in the cache dir."""
    password_file = opts.mysql_password_file
    if password_file:
        password_file = os.path.abspath(password_file)
    previous = cache.read_config() if cache.config_path.exists() else None
    if opts.metadata:
        url = opts.metadata
        if not password_file and previous and previous.metadata == redact(url):
            password_file = previous.metadata_password_file
    elif previous is not None:
        url = previous.metadata
        password_file = password_file or previous.metadata_password_file
    else:
        url = str(cache.meta_path)
    path = sqlite_path(url)
    if path is not None and not path.exists():
        raise MetadataMissing(f"{path} does not exist (was the filesystem made on this machine?)")
    return url, password_file


async def _check_metadata(url: str, password: str | None, fs_uuid: str) -> None:
    meta = open_meta(url, password=password)
    try:
        await meta.check(fs_uuid)
    finally:
        await meta.close()


async def _lock_cache_dir(cache: CacheDir, wait_s: float = 60.0) -> int:
    """Take the cache dir's mount lock: one mount process per cache dir. A process
    that was just unmounted may still be sealing the files closed last; wait for it."""
    path = cache.root / "mount.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    with trio.move_on_after(wait_s):
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                await trio.sleep(0.1)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
    holder = path.read_text().strip()
    os.close(fd)
    raise MountpointError(f"the cache dir {cache.root} is in use by another mount (pid {holder})")


class DaemonLink:
    """The mount's connection to cloudfsd; restarts the daemon if it died."""

    def __init__(
        self,
        cache: CacheDir,
        master: bytes,
        meta_password: str | None = None,
        *,
        commit: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.cache = cache
        #: commits the metadata changes a group commit holds back: the daemon reads
        #: the metadata, so every request waits for that first
        self._commit = commit
        self._master = master
        self._meta_password = meta_password
        self._client: DaemonClient | None = None
        #: why the daemon must not upload for this mount any more (see `fence`)
        self.fenced: str | None = None
        self._kick = trio.Event()
        self._lock = trio.Lock()

    async def _connected(self) -> DaemonClient:
        async with self._lock:
            if self._client is None:
                await ensure_daemon(self.cache, self._master, meta_password=self._meta_password)
                client = await DaemonClient.connect(self.cache, role="mount")
                try:
                    # a daemon fenced for an earlier mount that lost its lease is
                    # lifted by a mount that holds the lease again
                    if self.fenced is not None or self.cache.fence_path.exists():
                        await client.fence(self.fenced)
                except BaseException:
                    await client.aclose()
                    raise
                self._client = client
            return self._client

    async def _call(self, op: str, *args: object) -> Any:
        if self._commit is not None:
            await self._commit()
        for attempt in range(3):
            client = await self._connected()
            try:
                return await getattr(client, op)(*args)
            except DaemonError as exc:
                log.warning("daemon connection lost (%s); reconnecting", exc.message)
                if self._client is client:
                    self._client = None
                    await client.aclose()
                if attempt == 2:
                    raise

    async def fetch(self, block_ids: list[bytes], prefetch: list[bytes]) -> None:
        await self._call("fetch", block_ids, prefetch)

    async def flush(self, block_ids: list[bytes]) -> None:
        """Return once none of `block_ids` is pending."""
        await self._call("flush", block_ids)

    async def store(self, blocks: list[tuple[bytes, int]]) -> dict[bytes, int]:
        """Have the daemon put these cached blocks (id, plaintext size) in the store
        now (--upload=sync, before the commit naming them): {id: stored size}."""
        sizes = await self._call("store", blocks)
        return {block_id: n for (block_id, _size), n in zip(blocks, sizes, strict=True)}

    async def finish_collection(self) -> bool:
        """Have the daemon finish what an interrupted garbage collection pass left
        claimed; False when a pass is running (nothing was done)."""
        report = await self._call("finish_collection")
        return not report.get("skipped")

    async def cache_limit(self) -> int:
        """The cache size limit the daemon keeps."""
        client = await self._connected()
        limit = (await client.status())["cache_limit"]
        assert isinstance(limit, int)
        return limit

    async def fence(self, reason: str) -> None:
        """Make the daemon stop uploading, removing and backing up for this cache dir
        (the mount lease was taken over); every later connection says so again."""
        self.fenced = reason
        # first in the cache dir: a daemon that starts from now on (a restart of a
        # killed one) uploads nothing, not even before it hears from this mount
        try:
            await trio.to_thread.run_sync(
                lambda: self.cache.fence_path.write_text(reason + "\n", encoding="utf-8")
            )
        except OSError as exc:
            log.warning("cannot write %s: %s", self.cache.fence_path, exc)
        try:
            await self._call("fence", reason)
        except CloudfsError as exc:
            log.warning("cannot tell the daemon to stop uploading: %s (a daemon started "
                        "later is told)", exc.message)  # fmt: skip

    def kick_soon(self) -> None:
        self._kick.set()

    async def run_kicker(self) -> None:
        """Tell the daemon about new pending blocks, coalescing bursts of seals."""
        while True:
            await self._kick.wait()
            self._kick = trio.Event()
            try:
                await self._call("kick")
            except CloudfsError as exc:
                log.warning(
                    "cannot reach the daemon: %s (uploads resume when it runs)", exc.message
                )
            await trio.sleep(0.05)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


async def serve(prep: Prepared, ready: os.PathLike[str] | int | None) -> None:
    """Mount and serve until unmounted; the mount lease is released at the end, also
    when mounting failed."""
    lease = prep.lease
    if lease is None:
        await _serve(prep, ready)
        return
    lease.store = RetryStore(open_store(prep.storage_url, **prep.storage_options))
    try:
        await lease.renew()  # now naming this process, the one that serves
        await _serve(prep, ready)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(60):
            try:
                await lease.release()
            except CloudfsError as exc:
                log.warning("cannot release the mount lease: %s", exc.message)
        await lease.store.aclose()


async def _backup_metadata(prep: Prepared, store: ObjectStore) -> None:
    db = sqlite_path(prep.meta_url)
    if db is None:
        return
    keep = prep.cache.read_config().backup_keep or DEFAULT_KEEP
    try:
        key = await put_backup(store, prep.keys, prep.cache, db, encrypt=prep.sb.encryption,
                               level=prep.sb.level, keep=keep)  # fmt: skip
    except (CloudfsError, OSError) as exc:
        message = exc.message if isinstance(exc, CloudfsError) else str(exc)
        log.warning("metadata backup at unmount failed (the daemon tries again): %s", message)
        return
    if key is not None:
        log.info("metadata backed up at unmount: %s", key)


async def _serve(prep: Prepared, ready: os.PathLike[str] | int | None) -> None:
    opts, sb, cache = prep.opts, prep.sb, prep.cache
    meta: MetaStore = open_meta(prep.meta_url, password=prep.meta_password)
    link = DaemonLink(cache, prep.master, prep.meta_password, commit=meta.commit)
    await link._connected()
    clear_stale_overlays(cache)
    await _clear_crash_leftovers(cache, meta)
    files = FileStore(
        meta,
        cache,
        id_key=prep.keys.id_key,
        gear_key=prep.keys.gear_key,
        chunker=ChunkerParams(sb.chunker["min"], sb.chunker["avg"], sb.chunker["max"]),
        fetch=link.fetch,
        on_sealed=link.kick_soon,
        origin=socket.gethostname(),
    )
    ns = Namespace(meta, files, atime=opts.atime)
    shared = ns.shared = is_mysql(prep.meta_url)
    # this mount's row, on every engine; rows and holds of mounts that died go
    client = Client(meta, str(cache.root))
    await client.register()
    ns.client = client
    if shared:
        files.client = client  # holds every open file: another machine may unlink it

        async def free_released(inodes: list[int]) -> None:
            try:  # freed unless used again here or held elsewhere
                await ns.released(inodes)
            except CloudfsError as exc:
                log.warning("cannot free inodes released by the heartbeat: %s", exc.message)

        client.on_released = free_released
    freed = await ns.free_orphans()
    if freed:
        log.info("freed %d inodes left open-unlinked by an earlier crash", freed)

    async def unuploaded() -> int:
        async with meta.reading() as tx:
            _count, pending = await tx.pending_summary()
        return pending + files.unsealed_bytes()

    async def make_room() -> None:
        # unsealed bytes cannot be uploaded: seal them (as the dirty limit would)
        for st in [st for st in files.states.values() if st.dirty and not st.sealing]:
            await files.seal(st.ino, publish=False)

    space = CacheSpace(
        await link.cache_limit(), unuploaded, link.kick_soon, full_wait=opts.cache_full_wait,
        make_room=make_room,
    )  # fmt: skip

    async def wait_stored(ino: int) -> None:
        async with meta.reading() as tx:
            blocks = await tx.pending_blocks_of(ino)
        if blocks:
            await link.flush(blocks)

    upload = opts.upload or ("sync" if is_mysql(prep.meta_url) else "async")
    log.info("uploads: %s", upload)
    if upload == "sync":
        # every commit of file contents, not only those a close or fsync waits for,
        # names only blocks that are in the store already (FileStore.uploads)
        files.uploads = link
    ops = HistoryOperations(
        ns, files, space, wait_stored=wait_stored if upload == "sync" else None, shared=shared,
        cache_timeout=opts.attr_timeout,
    )  # fmt: skip
    files.on_commit = ops.file_committed
    notifier: notify.Notifier | None = None
    if client.id is not None and prep.redis is not None:
        notifier = notify.Notifier(
            prep.redis, notify.channel_of(sb.uuid), client.id, _invalidate_inode_quietly,
            _invalidate_entry_quietly, _resync_kernel(ops, trio.lowlevel.current_trio_token()),
        )  # fmt: skip
        ops.changed = notifier.changed
    fuse_opts = (
        set(pyfuse3.default_options)
        | opts.fuse_options
        | {
            f"fsname={prep.storage_url.replace(',', '_')}",
            "subtype=cloudfs",
        }
    )
    if opts.debug:
        fuse_opts.add("debug")
    # resolved before the mount: once mounted, a lookup of the path asks this process
    mountpoint_path = os.path.realpath(opts.mountpoint)
    ops.after_init = lambda: _widen_kernel_readahead(mountpoint_path, KERNEL_READAHEAD_KIB)
    fuse.init(ops, opts.mountpoint, fuse_opts, loop=opts.fuse_loop)
    log.info("mounted %s on %s (FUSE loop: %s)", opts.storage, opts.mountpoint, opts.fuse_loop)
    if notifier is not None:
        notifier.start()  # invalidations need the FUSE session
        log.info("change notifications through %s", prep.redis.display() if prep.redis else "")
    unmounted = False
    try:
        async with trio.open_nursery() as last_closes:
            ops.background = last_closes
            files.nursery = last_closes
            async with trio.open_nursery() as nursery:
                await nursery.start(meta.run_group_commits, GROUP_WINDOW_S)
                await nursery.start(ns.run_atime_writes)
                nursery.start_soon(link.run_kicker)
                if prep.lease is not None:
                    nursery.start_soon(_renew_lease, prep.lease, meta, link)
                if shared:  # (one SQLite mount: nobody to tell, and an idle
                    # database stays unchanged, so no metadata backup is taken of it)
                    nursery.start_soon(client.run_heartbeat)
                nursery.start_soon(_seal_idle_files, files, opts.idle_seal_s)
                nursery.start_soon(_stop_on_signals)
                if ready is not None:
                    _report_ready(ready, "ok")
                await fuse.main(spin.poll_time(opts.poll_us, shared=shared))
                nursery.cancel_scope.cancel()
            # leaving `last_closes` waits for the seals of files closed at the end
        ops.background = None
        files.nursery = None
        files.unmounting = True
        await files.seal_all()
        if meta.fenced is None:  # a fenced mount changes nothing; the next one drops it
            if shared:
                # the holds that closed files keep until a heartbeat go now, and the
                # inodes that lost their last names meanwhile go with them
                await ns.free_at_unmount(await client.heartbeat())
            await client.unregister()  # everything is sealed: nothing is held
    finally:
        if notifier is not None:
            await trio.to_thread.run_sync(notifier.stop)
        try:
            fuse.close(unmount=True)
            unmounted = True
        except Exception as exc:  # noqa: BLE001 - unmount must be attempted whatever failed
            log.error("unmount failed: %s", exc)
        files.blockfiles.close()
        cache.spares.close()
        await meta.close()
        if prep.lease is not None and meta.fenced is None:
            # the metadata is consistent now: back it up before the daemon sees this
            # mount leave (or it would take a backup of its own) and before the lease
            # is released (another machine may then restore the newest backup)
            with trio.CancelScope(shield=True), trio.move_on_after(BACKUP_AT_UNMOUNT_S):
                await _backup_metadata(prep, prep.lease.store)
        await link.aclose()
    log.info("unmounted %s (clean=%s)", opts.mountpoint, unmounted)


async def _clear_crash_leftovers(cache: CacheDir, meta: MetaStore) -> None:
    """Remove block files that no metadata row names: a seal or an append stream of a
    mount that crashed cut them and never committed them. This mount holds mount.lock
    and serves nothing yet, so no seal of its own is under way, and the daemon only
    writes blocks that have rows (fetched ones). Temporary files of dead processes go
    too."""
    stale_tmp = await trio.to_thread.run_sync(cache.clear_stale_tmp)
    found = await trio.to_thread.run_sync(cache.cached_block_ids)
    async with meta.reading() as tx:
        known = await tx.block_states(found)
    orphans = [b for b in found if b not in known]
    freed = await trio.to_thread.run_sync(lambda: sum(cache.remove_block(b) for b in orphans))
    if orphans or stale_tmp:
        log.info("removed %d uncommitted block files (%d bytes) and %d temporary files "
                 "left by a crash", len(orphans), freed, stale_tmp)  # fmt: skip


def _invalidate_inode_quietly(ino: int) -> None:
    """Another mount changed `ino`: drop the kernel's attributes and cached data of it
    (on the notifier's thread: it may wait for the kernel's writeback)."""
    try:
        fuse.invalidate_inode(ino)
    except OSError:
        pass  # the kernel does not know it


def _resync_kernel(ops: HistoryOperations, token: trio.lowlevel.TrioToken) -> Callable[[], None]:
    """The notifier's resync: after (re)subscribing, drop the attributes, cached data and
    directory listings of every inode the kernel may hold, since changes of other mounts
    may have gone unannounced meanwhile. Names the kernel cached still resolve until
    their entry timeout (1 s in shared mode; kernel dentries cannot be listed), but each
    resolves to an inode whose attributes are fetched again."""

    def known() -> list[int]:  # on the trio thread: the lookup counts change there
        return sorted(set(ops.ns.kernel_refs) | set(ops.files.states) | {pyfuse3.ROOT_INODE})

    def resync() -> None:
        inodes = trio.from_thread.run_sync(known, trio_token=token)
        for ino in inodes:
            _invalidate_inode_quietly(ino)
        log.info("dropped the kernel caches of %d inodes (Redis subscription (re)established)",
                 len(inodes))  # fmt: skip

    return resync


def _invalidate_entry_quietly(parent: int, name: bytes) -> None:
    try:
        fuse.invalidate_entry(parent, name)
    except OSError:
        pass


async def _seal_idle_files(files: FileStore, idle_s: float) -> None:
    while True:
        await trio.sleep(1.0)
        try:
            await files.seal_idle(idle_s)
        except CloudfsError as exc:
            log.error("sealing idle files failed: %s", exc.message)
        # evicted block files take disk space as long as they are open here
        files.blockfiles.close_evicted()


async def _stop_on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("got signal %d: unmounting", signum)
            fuse.terminate()
            return


def _report_ready(fd: os.PathLike[str] | int, message: str) -> None:
    assert isinstance(fd, int)
    try:
        os.write(fd, message.encode() + b"\n")
        os.close(fd)
    except OSError:
        pass


class _AbandonedReplies(logging.Filter):
    """pyfuse3 logs an ERROR when the kernel refuses a reply with ENOENT: the request
    is no longer waited for (interrupted, or a RELEASE sent while the file system is
    being unmounted). The operation itself was carried out; nothing is lost, so the
    line goes to the log as INFO instead of looking like a failure."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            record.levelno == logging.ERROR
            and "fuse_reply_* failed" in str(record.msg)
            and record.args
            and record.args[-1] == os.strerror(errno.ENOENT)  # type: ignore[index]
        ):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = str(record.msg) + " (the kernel no longer waited for this answer)"
        return True


def _setup_logging(cache: CacheDir, foreground: bool, debug: bool) -> None:
    logging.getLogger("pyfuse3").addFilter(_AbandonedReplies())
    level = logging.DEBUG if debug else logging.INFO
    fmt = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
    if foreground:
        logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)
    else:
        logging.basicConfig(
            level=level, format=fmt, filename=str(cache.root / "mount.log"), force=True
        )


def _mount(argv: list[str], *, command_line: bool = False) -> int:
    opts = parse(argv)
    malloc.tune()
    if opts.metadata:
        metadata_password(opts.metadata, opts.mysql_password_file)  # given twice?
    if command_line:
        hide_url_password("cloudfs.mount.main", argv, opts.metadata, opts.redis)
    logging.basicConfig(level=logging.WARNING, format="mount.cloudfs: %(message)s")
    prep = trio.run(prepare, opts)
    if opts.foreground:
        _setup_logging(prep.cache, True, opts.debug)
        trio.run(serve, prep, None)
        return 0
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        os.close(prep.lock_fd)  # the child holds the lock from here on
        with os.fdopen(read_fd, "rb") as r:
            answer = r.readline().decode().strip()
        if answer == "ok":
            return 0
        raise MountpointError(answer or "the mount process died; see its log in the cache dir")
    # child: detach from the terminal and serve
    os.close(read_fd)
    os.pwrite(prep.lock_fd, f"{os.getpid()}\n".encode().ljust(16), 0)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    _setup_logging(prep.cache, False, opts.debug)
    try:
        trio.run(serve, prep, write_fd)
    except BaseException as exc:
        msg = exc.message if isinstance(exc, CloudfsError) else f"{type(exc).__name__}: {exc}"
        # an unexpected failure leaves its traceback in the log
        log.error("mount failed: %s", msg, exc_info=not isinstance(exc, CloudfsError))
        _report_ready(write_fd, msg)
        os._exit(1)
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        return run_cli("mount.cloudfs", lambda: _mount(sys.argv[1:], command_line=True))
    return run_cli("mount.cloudfs", lambda: _mount(argv))


if __name__ == "__main__":
    sys.exit(main())
