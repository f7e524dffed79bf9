"""`cloudfs upgrade STORAGE|MOUNTPOINT`: migrate a filesystem's metadata database to the
schema of this cloudfs (the migrations live in cloudfs.meta.migrate).

The database is found as the mount finds it: --metadata, else the cache dir's
config.json, else SQLite in the cache dir. A database of another filesystem, or of a
newer schema than this cloudfs knows, is refused. Migrating needs the filesystem
unmounted on this machine (its mount and daemon run the old schema); on MySQL, every
other machine must have unmounted it as well.
"""

from __future__ import annotations

import argparse
import fcntl
import os
from typing import Any

from cloudfs.tools._cli import (
    add_metadata_arguments,
    add_storage_arguments,
    metadata_password,
    open_cli_store,
    storage_options_from_args,
)

from cloudfs import config
from cloudfs.cache import CacheConfig, CacheDir
from cloudfs.errors import MountpointError, NotMounted
from cloudfs.meta import migrate, open_meta, schema


def _mounted_cache(path: str) -> CacheDir | None:
    """The cache dir of the cloudfs mounted at `path`, or None if `path` is no mount."""
    from cloudfs.tools.cloudfs import cache_of

    if not os.path.isdir(path) or not os.path.ismount(path):
        return None
    try:
        return cache_of(path)
    except NotMounted:
        return None


def _busy(cache: CacheDir) -> str | None:
    """What still uses the cache dir (a mount or its daemon), or None."""
    for lock, what in ((cache.root / "mount.lock", "mounted"), (cache.lock_path, "its daemon")):
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return what
        finally:
            os.close(fd)
    return None


async def cmd_upgrade(args: argparse.Namespace) -> int:
    cache = _mounted_cache(args.target)
    if cache is not None:
        fs_uuid = cache.read_config().uuid
    else:
        store = open_cli_store(args.target, storage_options_from_args(args))
        try:
            fs_uuid = (await config.read_superblock(store)).uuid
        finally:
            await store.aclose()
        cache = CacheDir(args.cachedir or config.default_cachedir(fs_uuid))
    previous: CacheConfig | None = cache.read_config() if cache.config_path.exists() else None
    url = args.metadata or (previous.metadata if previous else str(cache.meta_path))
    password_file = args.mysql_password_file or (
        previous.metadata_password_file if previous else None
    )
    meta = open_meta(url, password=metadata_password(url, password_file))
    try:
        _found, version = await meta.schema_info()
        if version < schema.SCHEMA_VERSION:
            busy = _busy(cache)
            if busy == "mounted":
                raise MountpointError(f"unmount the filesystem before upgrading {meta.where}")
            if busy is not None:
                raise MountpointError(
                    f"{busy} still runs for {cache.root}; upgrade once it has exited"
                )
        applied = await migrate.upgrade(meta, fs_uuid)
    finally:
        await meta.close()
    if applied:
        print(f"upgraded {meta.where} from schema {version} to {applied[-1]}")
    else:
        print(f"{meta.where} has schema {version}: nothing to upgrade")
    return 0


def add_parser(sub: Any) -> None:
    """The `upgrade` subcommand of `cloudfs`."""
    u = sub.add_parser(
        "upgrade",
        help="migrate a filesystem's metadata to this cloudfs's schema",
        description=(__doc__ or "").split("\n\n")[0],
    )
    u.add_argument("target", metavar="STORAGE|MOUNTPOINT",
                   help="the filesystem's storage (URL or directory) or its mount point")  # fmt: skip
    u.add_argument("--cachedir", help="cache dir (default ~/.cache/cloudfs/<fs uuid>)")
    add_metadata_arguments(u)
    add_storage_arguments(u)
    u.set_defaults(func=cmd_upgrade)
