"""Running fsck on a filesystem that is not mounted: find its cache dir and metadata,
make sure nothing else uses them (the mount lock; the daemon is flushed and stopped,
and its lock kept so that none starts), run the checks (cloudfs.fsck.checks) and say
how it went, with fsck's exit codes:

    0 clean, 1 errors found and all corrected, 4 errors left uncorrected,
    8 operational error (nothing could be checked: mounted, unreachable, ...)
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from dataclasses import dataclass

import trio

from cloudfs import config
from cloudfs.cache import CacheDir
from cloudfs.codec.crypto import Keys
from cloudfs.errors import CloudfsError, DaemonError, MetadataMissing, MountpointError
from cloudfs.fsck.checks import Checker, Store
from cloudfs.meta import open_meta
from cloudfs.meta.url import is_mysql, read_mysql_password
from cloudfs.objectstore.base import ObjectStore
from cloudfs.objectstore.sealed import SealedStore

EXIT_CLEAN = 0
EXIT_CORRECTED = 1
EXIT_LEFT = 4
EXIT_OPERATIONAL = 8

#: how long a running daemon may take to finish its uploads before it is stopped
DAEMON_FLUSH_S = 120.0


@dataclass
class Options:
    cachedir: str | None
    repair: bool
    check_data: bool
    orphan_grace_s: float | None  # None: 0 on SQLite, an hour on MySQL
    passphrase_file: str | None


class Progress:
    """A one-line progress display on a terminal (stderr); nothing otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def __call__(self, what: str, done: int, total: int) -> None:
        if not self.tty:
            return
        now = time.monotonic()
        if done < total and now - self._last < 0.2:
            return
        self._last = now
        pct = 100 * done // total if total else 100
        width = 30
        bar = "#" * (width * pct // 100)
        end = "\n" if done >= total else ""
        print(f"\r{what}: [{bar:<{width}}] {done}/{total} ({pct}%)", end=end, file=sys.stderr,
              flush=True)  # fmt: skip


def _lock(path: os.PathLike[str] | str) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


async def _stop_daemon(cache: CacheDir) -> int:
    """Let a running daemon finish its uploads, stop it, and hold its lock so that no
    other starts; returns the lock's fd."""
    from cloudfs.daemon.control import DaemonClient

    fd = _lock(cache.lock_path)
    if fd is not None:
        return fd
    try:
        async with await DaemonClient.connect(cache, role="tool") as client:
            with trio.move_on_after(DAEMON_FLUSH_S):
                try:
                    await client.flush()
                except CloudfsError:
                    pass  # uploads failing: fsck reports what is pending
            await client.shutdown()
    except DaemonError:
        pass  # dying already, or not answering: wait for its lock
    with trio.move_on_after(60):
        while True:
            fd = _lock(cache.lock_path)
            if fd is not None:
                return fd
            await trio.sleep(0.2)
    raise MountpointError(f"the daemon of {cache.root} does not stop")


def _keys(sb: config.Superblock, opts: Options) -> Keys | None:
    """The filesystem's keys when a repair or the scrub may need them and a passphrase
    is at hand (file, environment or a terminal); None otherwise."""
    if not sb.encryption:
        return config.unlock(sb, None)
    if not (opts.repair or opts.check_data):
        return None  # checking alone needs no passphrase: ask for none
    has_source = (
        opts.passphrase_file is not None
        or os.environ.get(config.PASSPHRASE_ENV)
        or sys.stdin.isatty()
    )
    if not has_source:
        return None
    passphrase = config.read_passphrase(opts.passphrase_file, confirm=False)
    return config.unlock(sb, passphrase)


async def check(store: ObjectStore, opts: Options) -> int:
    """Check (and repair) the filesystem in `store`; the exit code."""
    sb = await config.read_superblock(store)
    cache = CacheDir(opts.cachedir or config.default_cachedir(sb.uuid))
    if not cache.config_path.exists():
        raise MetadataMissing(f"{cache.root} is no cache dir of this filesystem (--cachedir?)")
    cache_config = cache.read_config()
    if cache_config.uuid != sb.uuid:
        raise MetadataMissing(f"{cache.root} serves filesystem {cache_config.uuid}, not {sb.uuid}")
    mount_fd = _lock(cache.root / "mount.lock")
    if mount_fd is None:
        raise MountpointError(f"the filesystem is mounted from {cache.root}: unmount it first")
    daemon_fd = None
    try:
        daemon_fd = await _stop_daemon(cache)
        url = cache_config.metadata
        password = (
            read_mysql_password(cache_config.metadata_password_file) if is_mysql(url) else None
        )
        meta = open_meta(url, password=password)
        try:
            await meta.check(sb.uuid)
            keys = await trio.to_thread.run_sync(_keys, sb, opts)
            if keys is None and opts.check_data:
                raise MountpointError("--check-data needs the passphrase")
            sealed = (
                SealedStore(store, keys, encrypt=sb.encryption, level=sb.level,
                            max_size=sb.max_block_size)
                if keys is not None else None
            )  # fmt: skip
            grace = opts.orphan_grace_s
            if grace is None:
                grace = 3600.0 if is_mysql(url) else 0.0
            checker = Checker(
                meta, cache, Store(store, sealed), repair=opts.repair, orphan_grace_s=grace,
                id_key=keys.id_key if keys else None, progress=Progress(),
            )  # fmt: skip
            await checker.run(check_data=opts.check_data)
        finally:
            await meta.close()
    finally:
        if daemon_fd is not None:
            os.close(daemon_fd)
        os.close(mount_fd)
    return report(checker, keys is None and (opts.repair or opts.check_data))


def report(checker: Checker, no_keys: bool) -> int:
    for f in checker.findings:
        if not f.error:
            print(f"note: {f.check}: {f.message}")
        else:
            state = "fixed" if f.fixed else "NOT FIXED"
            print(f"{f.check}: {f.message} [{state}]")
    if no_keys:
        print("note: no passphrase given: uploads and --check-data were not possible")
    left, fixed = checker.errors_left, checker.errors_fixed
    if not left and not fixed:
        print("clean")
        return EXIT_CLEAN
    print(f"{fixed + left} errors found, {fixed} corrected, {left} left")
    return EXIT_LEFT if left else EXIT_CORRECTED
