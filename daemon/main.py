"""`cloudfsd`, the block storage daemon's command line: parse arguments, take the
cache dir's lock, unlock the filesystem's keys, detach, and run the service.

    cloudfsd --cachedir DIR [--fg] [--passphrase-file F | --key-stdin]
             [--uploads N] [--idle-exit SECONDS]
             [--s3-endpoint URL] [--s3-region R] [--s3-path-style]

Storage options (S3 endpoint, region, addressing style) come from the cache dir's
config.json, where the mount put them; the --s3-* options override them. So do the
cache size limit and the metadata backup interval and count (read again whenever a
mount connects).

One daemon per cache dir: DIR/daemon.lock is flock()ed for the daemon's lifetime; a
second daemon finds it taken and exits 0. Without --fg the daemon detaches (double
fork, new session) and the command returns only once the daemon's socket accepts
connections, or fails with the daemon's error on one line. The daemon logs to
DIR/daemon.log; nothing secret is ever logged.

Keys: with --key-stdin the master key comes hex-encoded on one line of stdin (how
`ensure_daemon` starts it, so no passphrase ever reaches the daemon's argv or
environment); otherwise the passphrase is read as every cloudfs tool reads it
(--passphrase-file, $CLOUDFS_PASSPHRASE, or a prompt), and not at all when the
filesystem is not encrypted. The metadata database is config.json's; a MySQL
password comes on the next line of stdin (--metadata-password-stdin, how the mount
passes it), else from config.json's password file, else $CLOUDFS_MYSQL_PASSWORD.
"""

from __future__ import annotations

import argparse
import binascii
import fcntl
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from cloudfs.daemon.control import answers
from cloudfs.daemon.service import DaemonService
from cloudfs.tools._cli import add_storage_arguments, storage_options_from_args

from cloudfs import malloc
from cloudfs.cache import CacheConfig, CacheDir
from cloudfs.codec.crypto import KEY_SIZE, Keys
from cloudfs.config import Superblock, read_passphrase, read_superblock, unlock
from cloudfs.errors import CloudfsError, DaemonError, MetadataMismatch, MetadataMissing, UsageError
from cloudfs.meta import open_meta
from cloudfs.meta.base import MetaStore
from cloudfs.meta.url import is_mysql, read_mysql_password
from cloudfs.objectstore import open_store
from cloudfs.objectstore.retry import RetryStore
from cloudfs.objectstore.sealed import SealedStore

log = logging.getLogger("cloudfs.daemon")

#: how long `cloudfsd` waits for a daemon that holds the lock to answer (it may be
#: starting, or stopping: up to service.STOP_GRACE_S for its last PUTs, then a backup)
HOLDER_WAIT_S = 60.0

_LOG_FORMAT = "%(asctime)s cloudfsd[%(process)d] %(levelname)s %(name)s: %(message)s"


@dataclass
class Options:
    cachedir: Path
    fg: bool
    passphrase_file: str | None
    key_stdin: bool
    uploads: int
    idle_exit: float
    storage_options: dict[str, Any] = field(default_factory=dict)
    metadata_password_stdin: bool = False
    #: the MySQL password read from stdin (else config.json's password file, else env)
    metadata_password: str | None = field(default=None, repr=False)


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="cloudfsd",
        description="cloudfs block storage daemon: uploads pending blocks of a cache dir "
        "and fetches blocks into it.",
    )
    parser.add_argument("--cachedir", required=True, help="the cache dir to serve")
    parser.add_argument("--fg", action="store_true", help="stay in the foreground")
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument("--passphrase-file", metavar="F", help="read the passphrase from F")
    keys.add_argument("--key-stdin", action="store_true",
                      help="read the hex master key from one line of stdin")  # fmt: skip
    parser.add_argument("--metadata-password-stdin", action="store_true",
                        help="read the MySQL password, hex-encoded, from the next line of "
                        "stdin")  # fmt: skip
    parser.add_argument("--uploads", type=int, default=8, metavar="N",
                        help="uploads in flight (default 8)")  # fmt: skip
    parser.add_argument("--idle-exit", type=float, default=10.0, metavar="SECONDS",
                        help="exit after this long with no mount and nothing to do "
                        "(default 10; 0 = never)")  # fmt: skip
    add_storage_arguments(parser)
    ns = parser.parse_args(argv)
    if ns.uploads < 1:
        parser.error("--uploads must be at least 1")
    return Options(
        cachedir=Path(ns.cachedir).expanduser().absolute(),
        fg=ns.fg,
        passphrase_file=ns.passphrase_file,
        key_stdin=ns.key_stdin,
        uploads=ns.uploads,
        idle_exit=ns.idle_exit,
        storage_options=storage_options_from_args(ns),
        metadata_password_stdin=ns.metadata_password_stdin,
    )


# --- before detaching ----------------------------------------------------------------


def _take_lock(cache: CacheDir) -> int | None:
    """The fd holding daemon.lock, or None when another daemon holds it."""
    fd = os.open(cache.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _lock_or_wait_for_daemon(cache: CacheDir) -> int | None:
    """The fd holding daemon.lock; None once another daemon holds it *and answers* on
    the socket; -1 when the holder never answers within HOLDER_WAIT_S.

    Exiting 0 means "a daemon serves this cache dir now", so a caller may talk to it
    right away. The lock alone does not say that: its holder may still be starting
    (reading the superblock from the store, unlocking keys) or already stopping (its
    socket is gone while it finishes its PUTs). So wait until the holder answers, or
    lets the lock go (then take it and start a daemon of our own)."""
    deadline = time.monotonic() + HOLDER_WAIT_S
    while True:
        fd = _take_lock(cache)
        if fd is not None:
            return fd
        if trio.run(answers, cache):
            return None
        if time.monotonic() > deadline:
            return -1
        time.sleep(0.1)


def _running_pid(cache: CacheDir) -> str:
    try:
        return cache.pid_path.read_text().strip() or "?"
    except OSError:
        return "?"


def _read_key_stdin() -> bytes:
    line = sys.stdin.buffer.readline(4 * KEY_SIZE)
    try:
        key = binascii.unhexlify(line.strip())
    except (binascii.Error, ValueError):
        raise UsageError("--key-stdin: stdin does not hold a hex key") from None
    if len(key) != KEY_SIZE:
        raise UsageError(f"--key-stdin: the key must be {KEY_SIZE} bytes")
    return key


async def _fetch_superblock(config: CacheConfig) -> Superblock:
    store = RetryStore(open_store(config.storage, **config.options), attempts=4)
    try:
        return await read_superblock(store)
    finally:
        await store.aclose()


def _unlock_keys(opts: Options, config: CacheConfig) -> tuple[Superblock, Keys]:
    master = _read_key_stdin() if opts.key_stdin else None
    sb = trio.run(_fetch_superblock, config)
    if sb.uuid != config.uuid:
        raise MetadataMismatch(
            f"the cache dir serves filesystem {config.uuid}, the storage holds {sb.uuid}"
        )
    if master is not None:
        return sb, Keys.from_master(master)
    passphrase = read_passphrase(opts.passphrase_file, confirm=False) if sb.encryption else None
    return sb, unlock(sb, passphrase)


def _setup_logging(cache: CacheDir, fg: bool) -> None:
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    handler = logging.FileHandler(cache.log_path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    root.addHandler(handler)
    if fg:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter(_LOG_FORMAT))
        root.addHandler(console)


# --- detaching -----------------------------------------------------------------------


def _detach(cache: CacheDir) -> int:
    """Become a daemon (double fork, new session, no terminal). Returns, in the
    daemon, the fd to report readiness on; the original process never returns: it
    exits with the daemon's start result."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(ready_w)
        os.waitpid(pid, 0)  # the middle process exits at once
        with os.fdopen(ready_r, "rb") as f:
            report = f.read().decode("utf-8", "replace").strip()
        if report == "ready":
            os._exit(0)
        if report.startswith("error "):
            code, _, message = report[6:].partition(" ")
            print(f"cloudfsd: {message}", file=sys.stderr, flush=True)
            os._exit(int(code) if code.isdigit() else 1)
        print(f"cloudfsd: the daemon exited while starting (see {cache.log_path})",
              file=sys.stderr, flush=True)  # fmt: skip
        os._exit(1)
    os.close(ready_r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)  # the daemon is now no session leader: it can never get a terminal
    os.chdir("/")
    os.umask(0o077)
    devnull = os.open(os.devnull, os.O_RDWR)
    log_fd = os.open(cache.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.dup2(log_fd, 2)  # a stray traceback still lands in the log
    os.close(devnull)
    os.close(log_fd)
    return ready_w


class _Readiness:
    """The pipe a detached daemon reports its start on ("ready" or "error CODE MSG");
    reports once, later reports are dropped (and so is every report with --fg)."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def report(self, message: str) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.write(fd, (message + "\n").encode("utf-8"))
        except OSError:
            pass
        os.close(fd)


# --- the daemon ----------------------------------------------------------------------


def _read_password_stdin() -> str:
    line = sys.stdin.buffer.readline(8192)
    try:
        return binascii.unhexlify(line.strip()).decode("utf-8")
    except (binascii.Error, ValueError):
        raise UsageError("--metadata-password-stdin: stdin does not hold a hex password") from None


def _open_meta(cache: CacheDir, config: CacheConfig, password: str | None) -> MetaStore:
    url = config.metadata
    # a relative SQLite path in config.json is relative to the cache dir
    if "://" not in url and not os.path.isabs(url):
        url = str(cache.root / url)
    if password is None and is_mysql(url):
        password = read_mysql_password(config.metadata_password_file)
    return open_meta(url, password=password)


async def _serve(
    cache: CacheDir, config: CacheConfig, sb: Superblock, keys: Keys, opts: Options,
    ready: _Readiness,
) -> None:  # fmt: skip
    store = SealedStore(
        RetryStore(open_store(config.storage, **config.options)),
        keys,
        encrypt=sb.encryption,
        level=sb.level,
        max_size=sb.max_block_size,
    )
    try:
        meta = _open_meta(cache, config, opts.metadata_password)
        try:
            if not await meta.is_initialized():
                raise MetadataMissing(f"{config.metadata} holds no cloudfs metadata")
            await meta.check(sb.uuid)
            service = DaemonService(cache, meta, store, keys, uploads=opts.uploads,
                                    idle_exit=opts.idle_exit)  # fmt: skip
            async with trio.open_nursery() as nursery:
                await nursery.start(service.run)
                ready.report("ready")
            log.info("stopped (%s)", service.stop_reason)
        finally:
            with trio.CancelScope(shield=True):
                await meta.close()
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    cache = CacheDir(opts.cachedir)
    try:
        config = cache.read_config()
    except CloudfsError as exc:
        print(f"cloudfsd: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except (OSError, ValueError, TypeError) as exc:
        print(f"cloudfsd: cannot read {cache.config_path}: {exc}", file=sys.stderr)
        return MetadataMissing.exit_code
    config.options = {**config.options, **opts.storage_options}
    lock_fd = _lock_or_wait_for_daemon(cache)
    if lock_fd is None:
        print(f"cloudfsd: a daemon is already running for {cache.root} (pid {_running_pid(cache)})",
              file=sys.stderr)  # fmt: skip
        return 0
    if lock_fd < 0:
        print(f"cloudfsd: a daemon (pid {_running_pid(cache)}) holds {cache.lock_path} but does "
              f"not answer on {cache.socket_path} within {HOLDER_WAIT_S:g} s",
              file=sys.stderr)  # fmt: skip
        return DaemonError.exit_code
    _setup_logging(cache, opts.fg)
    malloc.tune()
    try:
        sb, keys = _unlock_keys(opts, config)
        if opts.metadata_password_stdin:
            opts.metadata_password = _read_password_stdin()
    except CloudfsError as exc:
        log.error("cannot start: %s", exc.message)
        print(f"cloudfsd: {exc.message}", file=sys.stderr)
        return exc.exit_code

    ready = _Readiness(None if opts.fg else _detach(cache))
    cache.pid_path.write_text(f"{os.getpid()}\n")
    log.info("starting for filesystem %s (storage %s)", sb.uuid, config.storage)
    try:
        trio.run(_serve, cache, config, sb, keys, opts, ready)
    except CloudfsError as exc:
        log.error("failed: %s", exc.message)
        ready.report(f"error {exc.exit_code} {exc.message}")
        if opts.fg:
            print(f"cloudfsd: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        log.exception("failed")
        ready.report(f"error 1 {type(exc).__name__}: {exc}")
        return 1
    finally:
        try:
            if cache.pid_path.read_text().strip() == str(os.getpid()):
                cache.pid_path.unlink()
        except OSError:
            pass
        os.close(lock_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
