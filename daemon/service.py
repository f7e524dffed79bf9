"""The daemon's one trio nursery: control socket, uploader, fetcher, evictor, idle
timer and signals, and the order they stop in.

Stopping (shutdown request, SIGTERM/SIGINT, or idle): the listening socket goes first
(unlinked, so a new `ensure_daemon` does not reach a daemon on its way out), then the
uploader queues nothing more and its running PUTs are finished and marked stored
(within `STOP_GRACE_S`; a PUT cut off stays pending and is uploaded by the next
daemon), then everything else is cancelled.
"""

from __future__ import annotations

import logging
import os
import signal
import socket as pysocket
from typing import Any

import trio
from cloudfs.daemon.backup import Backups
from cloudfs.daemon.control import ControlServer, SocketPath
from cloudfs.daemon.evictor import HIGH_WATER, Evictor
from cloudfs.daemon.fetcher import Fetcher, FetchFailed
from cloudfs.daemon.remover import Remover
from cloudfs.daemon.uploader import Uploader

from cloudfs import gc
from cloudfs.cache import CacheDir, default_cache_size
from cloudfs.codec.crypto import Keys
from cloudfs.config import SUPERBLOCK_KEY
from cloudfs.errors import LeaseLost
from cloudfs.gc import remove_stored_block_files
from cloudfs.meta.base import MetaStore
from cloudfs.meta.sqlite import SqliteMetaStore
from cloudfs.metabackup import DEFAULT_INTERVAL_S, DEFAULT_KEEP
from cloudfs.objectstore.sealed import SealedStore

log = logging.getLogger(__name__)

#: how long running PUTs may take to finish when the daemon stops
STOP_GRACE_S = 10.0
#: how often the idle timer looks
IDLE_CHECK_S = 0.5
#: block rows read per metadata transaction by drop_cache
DROP_BATCH = 500
#: when the last mount leaves, a backup younger than this was its own, at unmount
LAST_MOUNT_BACKUP_GAP_S = 60.0


async def open_listener(cache: CacheDir) -> trio.SocketListener:
    """Listen on the cache dir's socket. The caller holds daemon.lock, so an existing
    socket file is a leftover of a daemon that died: it is replaced."""
    path = cache.socket_path
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    address = SocketPath.open(path)
    try:
        old_umask = os.umask(0o077)  # only the owner may talk to the daemon
        try:
            await sock.bind(address.address)
        finally:
            os.umask(old_umask)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    finally:
        address.close()
    return trio.SocketListener(sock)


class DaemonService:
    """One daemon serving one cache dir. Implements control.DaemonOps."""

    def __init__(
        self,
        cache: CacheDir,
        meta: MetaStore,
        store: SealedStore,
        keys: Keys,
        *,
        uploads: int = 8,
        fetches: int = 8,
        idle_exit: float = 10.0,
        cache_size: int | None = None,
    ) -> None:
        """`cache_size`: the cache size limit in bytes; None: config.json's, else the
        default (see cloudfs.cache.default_cache_size)."""
        self.cache = cache
        self.meta = meta
        self.store = store
        self._cache_size_arg = cache_size
        self._cache_size = cache_size
        self._default_limit: int | None = None
        self._default_final = False
        self._backup_settings = (DEFAULT_INTERVAL_S, DEFAULT_KEEP)
        self._read_settings()
        self.backups = Backups(
            cache, meta.path if isinstance(meta, SqliteMetaStore) else None, store.inner, keys,
            encrypt=store.encrypt, level=store.level, settings=lambda: self._backup_settings,
            shared_meta=meta,
        )  # fmt: skip
        self.evictor = Evictor(cache, meta, self.cache_limit)
        self.uploader = Uploader(
            meta, cache, store, keys, uploads=uploads,
            on_pending=self.evictor.pending_seen, on_stored=self.evictor.stored,
            drop_pages=isinstance(meta, SqliteMetaStore),
        )  # fmt: skip
        self.fetcher = Fetcher(
            cache, store, fetches=fetches, on_fetched=self.evictor.fetched,
            has_room=lambda: self.evictor.used < self.evictor.limit * HIGH_WATER,
        )  # fmt: skip
        self.remover = Remover(meta, store.inner, cache)
        self.control = ControlServer(self)
        self.idle_exit = idle_exit
        self.mounts = 0
        self.stop_reason: str | None = None
        self._last_request = 0.0
        self._stop = trio.Event()
        self._read_fence()

    # --- lifetime ----------------------------------------------------------------------

    async def _warm_up_store(self) -> None:
        """One cheap request at start: the first request of a new S3 client pays its
        setup (endpoint rules, signer, connection: 20-50 ms against moto here), which
        otherwise lands on the first cold read after a mount, its time to first byte.
        Best effort: a store that cannot answer shows that in the first real call."""
        try:
            await self.store.inner.head(SUPERBLOCK_KEY)
        except Exception as exc:  # noqa: BLE001 (nothing depends on it)
            log.debug("store warm-up: %s", exc)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until stopped; `task_status.started()` once the socket accepts."""
        self._last_request = trio.current_time()
        listener = await open_listener(self.cache)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.fetcher.run)
                await nursery.start(self.evictor.run)
                await nursery.start(self.backups.run)
                await nursery.start(self.remover.run)
                log.info("cache: %d of %d bytes used", self.evictor.used, self.cache_limit())
                upload_scope = trio.CancelScope()
                upload_done = trio.Event()

                async def run_uploader() -> None:
                    with upload_scope:
                        await self.uploader.run()
                    upload_done.set()

                nursery.start_soon(run_uploader)
                control_scope = trio.CancelScope()

                async def serve_control() -> None:
                    with control_scope:
                        await self.control.serve(listener)

                nursery.start_soon(serve_control)
                nursery.start_soon(self._watch_signals)
                nursery.start_soon(self._watch_idle)
                nursery.start_soon(self._warm_up_store)
                log.info("cloudfsd %d serving %s", os.getpid(), self.cache.root)
                task_status.started()

                await self._stop.wait()
                log.info("stopping: %s", self.stop_reason)
                self.control.stop_accepting()
                await trio.lowlevel.checkpoint()  # let the accept loop leave first
                await listener.aclose()
                self._unlink_socket()
                self.uploader.stop()
                with trio.move_on_after(STOP_GRACE_S) as grace:
                    await upload_done.wait()
                if grace.cancelled_caught:
                    log.warning("uploads still running after %.0f s: left pending", STOP_GRACE_S)
                    upload_scope.cancel()
                control_scope.cancel()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await listener.aclose()
            self._unlink_socket()

    # --- settings ----------------------------------------------------------------------

    def _read_settings(self) -> None:
        """Take the cache size from config.json (the mount writes it there before it
        connects), unless the daemon was given one."""
        try:
            config = self.cache.read_config()
        except Exception as exc:  # noqa: BLE001 - keep the settings we have
            log.warning("cannot read %s: %s", self.cache.config_path, exc)
        else:
            if self._cache_size_arg is None:
                self._cache_size = config.cache_size
            self._backup_settings = (
                config.backup_interval or DEFAULT_INTERVAL_S,
                config.backup_keep or DEFAULT_KEEP,
            )
        self._default_limit = None
        self._default_final = False

    def cache_limit(self) -> int:
        """The cache size limit in bytes."""
        if self._cache_size is not None:
            return self._cache_size
        # the default counts the cache's own files as free for it: known after the
        # evictor's first scan
        if self._default_limit is None or (not self._default_final and self.evictor.scanned):
            self._default_final = self.evictor.scanned
            self._default_limit = default_cache_size(self.cache.root, self.evictor.block_bytes)
        return self._default_limit

    def _unlink_socket(self) -> None:
        try:
            self.cache.socket_path.unlink()
        except FileNotFoundError:
            pass

    def shutdown(self, reason: str = "shutdown requested") -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self._stop.set()

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                self.shutdown(f"signal {signal.Signals(signum).name}")

    async def _watch_idle(self) -> None:
        """Exit when no mount is connected, nothing is pending or running, and nothing
        happened for `idle_exit` seconds (0 or less: never)."""
        if self.idle_exit <= 0:
            return
        while True:
            await trio.sleep(IDLE_CHECK_S)
            if self.mounts or self.uploader.busy or self.fetcher.busy:
                continue
            last = max(self._last_request, self.uploader.last_progress, self.fetcher.last_progress)
            if trio.current_time() - last < self.idle_exit:
                continue
            try:
                async with self.meta.transaction(write=False) as tx:
                    pending, _bytes = await tx.pending_summary()
            except Exception:
                log.exception("reading the pending blocks failed")
                continue
            if pending == 0 or self.meta.fenced is not None:  # fenced: nothing to do
                # the uploads since the last mount left changed block states
                await self.backups.backup("idle exit")
                if self.mounts or trio.current_time() - self._last_request < self.idle_exit:
                    continue  # a mount came meanwhile
                self.shutdown(f"idle for {self.idle_exit:g} s with no mount")
                return

    # --- control.DaemonOps ---------------------------------------------------------------

    def mount_connected(self, pid: int | None) -> None:
        self.mounts += 1
        self.touch()
        self._read_settings()  # the mount may have changed them
        log.info("mount connected (pid %s), %d connected; cache limit %d bytes",
                 pid, self.mounts, self.cache_limit())  # fmt: skip

    def mount_disconnected(self, pid: int | None) -> None:
        self.mounts -= 1
        self.touch()
        log.info("mount disconnected (pid %s), %d connected", pid, self.mounts)
        if self.mounts == 0:
            # a clean unmount has just backed up itself; a crash did not
            self.backups.soon("the last mount left", unless_within=LAST_MOUNT_BACKUP_GAP_S)

    def fence(self, reason: str | None) -> None:
        """With a reason (the mount's lease was taken over by another machine): upload,
        remove and back up nothing more; flushes fail with LeaseLost; kept across
        restarts in DIR/fenced (CacheDir.fence_path). None lifts it (a mount holds the
        lease again)."""
        path = self.cache.fence_path
        if reason is None:
            path.unlink(missing_ok=True)
            if self.meta.fenced is not None:
                log.info("uploads resume: the mount holds the lease again")
        else:
            path.write_text(reason + "\n", encoding="utf-8")
            if self.meta.fenced is None:
                log.warning("uploads, removals and backups stop: %s", reason)
        self._apply_fence(reason)
        self.uploader.kick()  # its next pass wakes the flush waiters: they fail now

    def _apply_fence(self, reason: str | None) -> None:
        self.meta.fenced = reason
        self.backups.fenced = reason

    def _read_fence(self) -> None:
        try:
            reason = self.cache.fence_path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return
        log.warning("fenced since an earlier run: %s", reason)
        self._apply_fence(reason or "fenced")

    def touch(self) -> None:
        self._last_request = trio.current_time()

    def kick(self) -> None:
        self.uploader.kick()

    async def fetch(self, block_ids: list[bytes], prefetch: list[bytes]) -> dict[str, Any]:
        try:
            await self.fetcher.fetch(block_ids, prefetch)
        except FetchFailed as failed:
            raise failed.first() from None
        return {}

    async def flush(self, block_ids: list[bytes] | None) -> dict[str, Any]:
        await self.uploader.flush(block_ids)
        return {}

    async def store_blocks(self, blocks: list[tuple[bytes, int]]) -> dict[str, Any]:
        return {"stored_sizes": await self.uploader.store_now(blocks)}

    async def finish_collection(self) -> dict[str, Any]:
        """Finish what an interrupted garbage collection pass left claimed, unless a
        pass runs (cloudfs.gc `resume_only`): {"collected": GcReport as JSON}."""
        if self.meta.fenced is not None:
            raise LeaseLost(f"garbage collection stopped: {self.meta.fenced}")
        report = await gc.collect(
            self.meta, self.remover.store, self.cache, resume_only=True
        )
        return {"collected": report.to_json()}

    async def status(self) -> dict[str, Any]:
        async with self.meta.transaction(write=False) as tx:
            pending, pending_bytes = await tx.pending_summary()
        return {
            "pending": pending,
            "pending_bytes": pending_bytes,
            **self.uploader.status(),
            "fetched": self.fetcher.fetched,
            "fetched_bytes": self.fetcher.fetched_bytes,
            **self.evictor.status(),
            **self.backups.status(),
            "fenced": self.meta.fenced,
            "mounts": self.mounts,
            "remover_rounds": self.remover.rounds,
            "remover_last": self.remover.last,
            "pid": os.getpid(),
        }

    async def backup(self) -> dict[str, Any]:
        """Back the metadata up now (even if unchanged): {"key": object key or None
        when the metadata is not SQLite or the backup failed}."""
        return {"key": await self.backups.backup("requested", force=True)}

    async def drop_cache(self) -> dict[str, Any]:
        """Delete the cache copies of stored blocks, so reads fetch them again (cold
        reads, `cloudfs drop-cache`). Only a block whose row says `stored` loses its
        file: a pending block's file is its only copy, and a file without a row may
        belong to a seal that has not committed yet. A stored row can be revived by a
        seal after garbage collection claimed it (then its plaintext is needed again),
        so each file goes inside a transaction that sees its row stored (cloudfs.gc)."""
        block_ids = await trio.to_thread.run_sync(self.cache.cached_block_ids)
        dropped = dropped_bytes = 0
        for i in range(0, len(block_ids), DROP_BATCH):
            part = block_ids[i : i + DROP_BATCH]
            freed = await remove_stored_block_files(self.meta, self.cache, part)
            self.evictor.removed([b for b, n in zip(part, freed, strict=True) if n])
            dropped += sum(1 for n in freed if n)
            dropped_bytes += sum(freed)
        log.info("dropped %d cached blocks (%d bytes)", dropped, dropped_bytes)
        return {"dropped": dropped, "dropped_bytes": dropped_bytes}
