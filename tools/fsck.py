"""fsck.cloudfs: check and repair a filesystem that is not mounted.

fsck.cloudfs STORAGE [--cachedir DIR] [--repair] [--check-data] [--orphan-grace D]
    one check per invariant of DESIGN §3 (cloudfs.fsck); exit 0 clean, 1 errors
    corrected, 4 errors left, 8 operational error
fsck.cloudfs --restore-metadata STORAGE [--cachedir DIR] [--force]
    rebuild a lost metadata database from the newest backup in the store
fsck.cloudfs --restore-metadata STORAGE --metadata mysql://... [--force]
    the same into an empty MySQL database (--force: drop the schema's tables there first)
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys

import trio
from cloudfs.tools._cli import (
    add_metadata_arguments,
    add_storage_arguments,
    metadata_password,
    open_cli_store,
    parse_args,
    run_cli,
    setup_logging,
    storage_options_from_args,
)

from cloudfs import config
from cloudfs.cache import CacheConfig, CacheDir
from cloudfs.codec.crypto import Keys
from cloudfs.errors import CloudfsError, MountpointError, UsageError
from cloudfs.meta import open_meta
from cloudfs.meta.url import is_mysql, redact
from cloudfs.metabackup import restore_newest, restore_newest_into


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fsck.cloudfs", description="Check and repair a cloudfs filesystem."
    )
    p.add_argument("storage", help="where the filesystem lives: local:///path, a directory, "
                   "or s3://bucket[/prefix]")  # fmt: skip
    mode = p.add_argument_group("modes")
    mode.add_argument("--restore-metadata", action="store_true",
                      help="rebuild the metadata database (SQLite in the cache dir, or the "
                      "empty MySQL database --metadata names) from the newest backup in the "
                      "store; files written after that backup are not in it")  # fmt: skip
    mode.add_argument("--repair", action="store_true",
                      help="fix what the checks find: unreachable inodes into /lost+found, "
                      "counts recomputed, leftovers of crashes removed, orphan objects "
                      "deleted after --orphan-grace")  # fmt: skip
    mode.add_argument("--check-data", action="store_true",
                      help="also download and verify every stored block (needs the "
                      "passphrase); damaged blocks are named with the files that use them")  # fmt: skip
    p.add_argument("--orphan-grace", metavar="DURATION",
                   help="objects without a row are deleted by a repair once seen this long "
                   "(default 0 with SQLite metadata, 1h with MySQL)")  # fmt: skip
    p.add_argument("--cachedir", help="cache dir (default ~/.cache/cloudfs/<fs uuid>)")
    p.add_argument("--passphrase-file", help="read the passphrase from this file")
    p.add_argument("--force", action="store_true",
                   help="--restore-metadata: replace a metadata database that exists")  # fmt: skip
    p.add_argument("--debug", action="store_true")
    add_metadata_arguments(p)
    add_storage_arguments(p)
    return p


def _lock_cache_dir(cache: CacheDir) -> int:
    """The cache dir's mount lock: nothing may be mounted from it while its metadata is
    replaced."""
    fd = os.open(cache.root / "mount.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MountpointError(f"the cache dir {cache.root} is in use by a mount") from None
    return fd


async def restore_metadata(args: argparse.Namespace) -> int:
    options = storage_options_from_args(args)
    store = open_cli_store(args.storage, options)
    try:
        sb = await config.read_superblock(store)
        cache = CacheDir(args.cachedir or config.default_cachedir(sb.uuid))
        passphrase = (
            config.read_passphrase(args.passphrase_file, confirm=False) if sb.encryption else None
        )
        master = await trio.to_thread.run_sync(config.unlock_master, sb, passphrase)
        cache.create()
        lock_fd = _lock_cache_dir(cache)
        try:
            keys = Keys.from_master(master)
            password_file = args.mysql_password_file
            if args.metadata:
                meta = open_meta(args.metadata,
                                 password=metadata_password(args.metadata, password_file))  # fmt: skip
                try:
                    restored = await restore_newest_into(
                        store, keys, sb.uuid, meta, cache.tmp, force=args.force
                    )
                finally:
                    await meta.close()
                where = meta.where
            else:
                restored = await restore_newest(
                    store, keys, sb.uuid, cache.meta_path, force=args.force
                )
                where = str(cache.meta_path)
            previous = cache.read_config() if cache.config_path.exists() else None
            cache.write_config(
                CacheConfig(
                    storage=store.url,
                    metadata=redact(args.metadata) if args.metadata else str(cache.meta_path),
                    uuid=sb.uuid,
                    options=options or (previous.options if previous else {}),
                    metadata_password_file=(
                        os.path.abspath(password_file) if args.metadata and password_file else None
                    ),
                    cache_size=previous.cache_size if previous else None,
                )
            )
        finally:
            os.close(lock_fd)
    finally:
        await store.aclose()
    print(f"restored the metadata of {sb.uuid} into {where}")
    print(f"from backup {restored.key} ({restored.size} bytes); files written after it "
          "are not in it")  # fmt: skip
    if restored.pending_stored or restored.pending_missing:
        print(
            f"blocks pending at backup time: {restored.pending_stored} found in the store, "
            f"{restored.pending_missing} missing (files using these read as I/O errors)"
        )
    return 0


def check_filesystem(args: argparse.Namespace) -> int:
    """The check mode, with fsck's exit codes (cloudfs.fsck.runner)."""
    from cloudfs.fsck import runner
    from cloudfs.retention import parse_duration

    grace = None
    if args.orphan_grace is not None:
        grace = parse_duration(args.orphan_grace)
        if grace is None:
            raise UsageError("--orphan-grace forever: use a check without --repair")
    opts = runner.Options(
        cachedir=args.cachedir, repair=args.repair, check_data=args.check_data,
        orphan_grace_s=grace, passphrase_file=args.passphrase_file,
    )  # fmt: skip

    async def run() -> int:
        store = open_cli_store(args.storage, storage_options_from_args(args))
        try:
            return await runner.check(store, opts)
        finally:
            await store.aclose()

    try:
        return trio.run(run)
    except CloudfsError as exc:
        print(f"fsck.cloudfs: {exc.message}", file=sys.stderr)
        return runner.EXIT_OPERATIONAL


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        args = parse_args(_parser(), argv, "fsck.cloudfs")
        if args is None:
            return 0
        setup_logging(args.debug)
        if args.restore_metadata:
            if args.repair or args.check_data:
                raise UsageError("--restore-metadata is a mode of its own")
            if args.metadata and not is_mysql(args.metadata):
                raise UsageError("--metadata: a MySQL URL (SQLite metadata is restored into "
                                 "the cache dir)")  # fmt: skip
            return trio.run(restore_metadata, args)
        if args.metadata or args.mysql_password_file:
            raise UsageError("--metadata is for --restore-metadata (a check finds the "
                             "database in the cache dir's config)")  # fmt: skip
        return check_filesystem(args)

    return run_cli("fsck.cloudfs", body)


if __name__ == "__main__":
    sys.exit(main())
