"""Command line of mount.cloudfs, also as called by mount(8) and /etc/fstab."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from cloudfs.mount import fuse
from cloudfs.tools._cli import (
    add_metadata_arguments,
    add_storage_arguments,
    parse_size,
    storage_options,
)

from cloudfs.cache import DEFAULT_FULL_WAIT_S
from cloudfs.errors import UsageError

#: options mount(8) passes along that concern it, not the filesystem
_MOUNT8_OPTIONS = {"rw", "auto", "noauto", "user", "nouser", "users", "_netdev", "nofail", "defaults",
                   "exec", "noexec", "suid", "nosuid", "dev", "nodev", "async",
                   "x-systemd.automount"}  # fmt: skip
#: options handed to the kernel FUSE mount as they are
_FUSE_OPTIONS = {"allow_other", "allow_root", "default_permissions", "ro"}


@dataclass
class MountOptions:
    storage: str
    mountpoint: str
    foreground: bool = False
    cachedir: str | None = None
    passphrase_file: str | None = None
    debug: bool = False
    fuse_options: set[str] = field(default_factory=set)
    idle_seal_s: float = 5.0
    #: `open_store` options (S3 endpoint, region, addressing style)
    storage_options: dict[str, Any] = field(default_factory=dict)
    #: metadata database URL (None: the cache dir's config.json, else SQLite there)
    metadata: str | None = None
    mysql_password_file: str | None = None
    #: what reads do to atime: relatime (default), strictatime or noatime
    atime: str = "relatime"
    #: cache size limit in bytes; None: what the cache dir was last mounted with, else
    #: the default; 0: back to the default ("auto")
    cache_size: int | None = None
    #: how long a write waits for cache space before ENOSPC
    cache_full_wait: float = DEFAULT_FULL_WAIT_S
    #: take over the mount lease of another machine (it is gone)
    force: bool = False
    #: seconds between metadata backups, backups kept (None: as last time, else the
    #: defaults; 0: back to the defaults)
    backup_interval: float | None = None
    backup_keep: int | None = None
    #: rebuild a lost metadata database from the newest backup in the store
    restore_metadata: bool = False
    #: "sync": fsync and close wait until the blocks are stored; "async": until they
    #: are sealed in the cache; None: sync with MySQL metadata (shared), else async
    upload: str | None = None
    #: shared mode: Redis URL for change notifications between mounts (None: as the
    #: cache dir was last mounted with; "" given as `--redis none`: no Redis)
    redis: str | None = None
    redis_password_file: str | None = None
    #: seconds the kernel may trust names and attributes (None: an hour with SQLite
    #: metadata, where this mount makes every change; a second with MySQL)
    attr_timeout: float | None = None
    #: microseconds the mount polls the FUSE device before it sleeps, while requests
    #: come back to back (`cloudfs.mount.spin`); 0: never; None: 100 with SQLite
    #: metadata, 0 with MySQL (whose round trips a poll would only spend CPU on)
    poll_us: float | None = None
    #: which request loop answers the kernel: "direct" (cloudfs's own, on /dev/fuse)
    #: or "pyfuse3" (libfuse's); see cloudfs.mount.fuse
    fuse_loop: str = fuse.DEFAULT_LOOP


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mount.cloudfs",
        description="Mount a cloudfs filesystem.",
    )
    p.add_argument("storage", help="where the filesystem lives: local:///path, a directory, "
                   "or s3://bucket[/prefix]")  # fmt: skip
    p.add_argument("mountpoint", help="an empty directory to mount it on")
    p.add_argument("-o", dest="options", action="append", default=[],
                   help="comma-separated mount options: allow_other, default_permissions, ro, "
                        "relatime (default), strictatime, noatime, "
                        "cachedir=DIR, passphrase_file=FILE, fg, debug, s3_endpoint=URL, "
                        "s3_region=REGION, s3_path_style, metadata=URL, "
                        "mysql_password_file=FILE, cache_size=SIZE, "
                        "cache_full_wait=SECONDS, upload=sync|async, redis=URL, "
                        "redis_password_file=FILE, attr_timeout=SECONDS, "
                        "poll_us=MICROSECONDS, fuse_loop=direct|pyfuse3")  # fmt: skip
    p.add_argument("-f", "--fg", "--foreground", dest="fg", action="store_true",
                   help="stay in the foreground")  # fmt: skip
    p.add_argument("--cachedir", help="cache dir (default ~/.cache/cloudfs/<fs uuid>)")
    p.add_argument("--passphrase-file", help="read the passphrase from this file")
    p.add_argument("--debug", action="store_true", help="log debug messages")
    p.add_argument("--cache-size", metavar="SIZE",
                   help="most disk space the cache dir may take (512M, 10G, ...); kept for "
                   "later mounts of the cache dir; 'auto': the default, 10%% of the disk "
                   "holding it, at most half its free space, at least 1 GiB")  # fmt: skip
    p.add_argument("--force", action="store_true",
                   help="mount even though another machine holds the filesystem's mount "
                   "lease: only when that machine is gone (crashed, replaced)")  # fmt: skip
    p.add_argument("--backup-interval", metavar="SECONDS", type=float,
                   help="seconds between backups of the metadata into the store (default "
                   "3600; also at unmount); kept for later mounts of the cache dir")  # fmt: skip
    p.add_argument("--backup-keep", metavar="N", type=int,
                   help="metadata backups kept in the store (default 10)")  # fmt: skip
    p.add_argument("--restore-metadata", action="store_true",
                   help="a fresh machine: rebuild the metadata from the newest backup in "
                   "the store first (files written after it are not in it)")  # fmt: skip
    p.add_argument("--upload", choices=("async", "sync"),
                   help="async: fsync returns once data is sealed in the cache dir (the "
                   "default with SQLite metadata); sync: fsync and close also wait until "
                   "it is in the object store (the default with MySQL)")  # fmt: skip
    p.add_argument("--cache-full-wait", metavar="SECONDS", type=float,
                   help="when the cache is full of data not uploaded yet, how long a write "
                   "waits for uploads before it fails with ENOSPC (default "
                   f"{DEFAULT_FULL_WAIT_S:g})")  # fmt: skip
    p.add_argument("--redis", metavar="URL",
                   help="shared mode (MySQL metadata): redis://[:password@]host[:port][/db] "
                   "to tell the other mounts about changes at once; kept for later mounts of "
                   "the cache dir; 'none': without Redis (changes show after 1 s)")  # fmt: skip
    p.add_argument("--redis-password-file", metavar="F",
                   help="Redis password file (else $CLOUDFS_REDIS_PASSWORD)")
    add_metadata_arguments(p)
    add_storage_arguments(p)
    # mount(8) helpers get these; they are accepted and ignored
    p.add_argument("-n", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-s", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-v", action="store_true", help=argparse.SUPPRESS)
    return p


def parse(argv: list[str]) -> MountOptions:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code == 0:
            raise
        raise UsageError("see mount.cloudfs --help") from None
    opts = MountOptions(
        storage=args.storage,
        mountpoint=args.mountpoint,
        foreground=args.fg,
        cachedir=args.cachedir,
        passphrase_file=args.passphrase_file,
        debug=args.debug,
        fuse_options={"default_permissions"},
        metadata=args.metadata,
        mysql_password_file=args.mysql_password_file,
    )
    s3_endpoint, s3_region, s3_path_style = args.s3_endpoint, args.s3_region, args.s3_path_style
    cache_size: str | None = args.cache_size
    opts.upload = args.upload
    opts.redis = args.redis
    opts.redis_password_file = args.redis_password_file
    opts.force = args.force
    opts.restore_metadata = args.restore_metadata
    if args.backup_interval is not None:
        if not args.backup_interval >= 0:
            raise UsageError("--backup-interval must be 0 (the default) or more seconds")
        opts.backup_interval = args.backup_interval
    if args.backup_keep is not None:
        if args.backup_keep < 0:
            raise UsageError("--backup-keep must be 0 (the default) or more")
        opts.backup_keep = args.backup_keep
    full_wait: str | None = None if args.cache_full_wait is None else str(args.cache_full_wait)
    for group in args.options:
        for item in filter(None, group.split(",")):
            name, _, value = item.partition("=")
            if name in _FUSE_OPTIONS:
                opts.fuse_options.add(name)
            elif name == "cachedir":
                opts.cachedir = value
            elif name == "passphrase_file":
                opts.passphrase_file = value
            elif name == "metadata":
                opts.metadata = value
            elif name == "mysql_password_file":
                opts.mysql_password_file = value
            elif name == "redis":
                opts.redis = value
            elif name == "redis_password_file":
                opts.redis_password_file = value
            elif name in ("fg", "foreground"):
                opts.foreground = True
            elif name == "debug":
                opts.debug = True
            elif name == "s3_endpoint":
                s3_endpoint = value
            elif name == "s3_region":
                s3_region = value
            elif name == "s3_path_style":
                s3_path_style = True
            elif name == "cache_size":
                cache_size = value
            elif name == "cache_full_wait":
                full_wait = value
            elif name == "attr_timeout":
                try:
                    opts.attr_timeout = float(value)
                except ValueError:
                    raise UsageError(f"attr_timeout {value!r} is not a number of seconds") from None
                if not 0 <= opts.attr_timeout < float("inf"):
                    raise UsageError("attr_timeout must be 0 or more seconds")
            elif name == "poll_us":
                try:
                    opts.poll_us = poll_us = float(value)
                except ValueError:
                    raise UsageError(f"poll_us {value!r} is not a number of microseconds") from None
                if not 0 <= poll_us <= 10_000:
                    raise UsageError("poll_us must be 0 to 10000 microseconds")
            elif name == "fuse_loop":
                if value not in fuse.LOOPS:
                    raise UsageError(f"fuse_loop={value}: use fuse_loop=direct or pyfuse3")
                opts.fuse_loop = value
            elif name == "upload":
                if value not in ("async", "sync"):
                    raise UsageError(f"upload={value}: use upload=async or upload=sync")
                opts.upload = value
            elif name in ("relatime", "strictatime", "noatime"):
                opts.atime = name
            elif name == "atime":
                opts.atime = "relatime"
            elif name in _MOUNT8_OPTIONS:
                continue
            else:
                raise UsageError(f"unknown mount option: {name}")
    opts.storage_options = storage_options(
        endpoint=s3_endpoint, region=s3_region, path_style=s3_path_style
    )
    if cache_size is not None:
        opts.cache_size = 0 if cache_size == "auto" else parse_size(cache_size, "cache size")
    if full_wait is not None:
        try:
            opts.cache_full_wait = float(full_wait)
        except ValueError:
            raise UsageError(f"cache_full_wait {full_wait!r} is not a number of seconds") from None
        if not opts.cache_full_wait >= 0:
            raise UsageError("cache_full_wait must be 0 or more seconds")
    return opts
