"""fsck.cloudfs: check and repair a filesystem. For now one mode: --restore-metadata
rebuilds a lost metadata database from the newest backup in the store (the checks of
DESIGN §3, one per invariant, come as modes of their own).

    fsck.cloudfs --restore-metadata STORAGE [--cachedir DIR] [--force]
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys

import trio
from cloudfs.tools._cli import (
    add_storage_arguments,
    open_cli_store,
    run_cli,
    setup_logging,
    storage_options_from_args,
)

from cloudfs import config
from cloudfs.cache import CacheConfig, CacheDir
from cloudfs.codec.crypto import Keys
from cloudfs.errors import MountpointError, UsageError
from cloudfs.metabackup import restore_newest


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fsck.cloudfs", description="Check and repair a cloudfs filesystem."
    )
    p.add_argument("storage", help="where the filesystem lives: local:///path, a directory, "
                   "or s3://bucket[/prefix]")  # fmt: skip
    mode = p.add_argument_group("modes")
    mode.add_argument("--restore-metadata", action="store_true",
                      help="rebuild the metadata database (SQLite, in the cache dir) from "
                      "the newest backup in the store; files written after that backup "
                      "are not in it")  # fmt: skip
    p.add_argument("--cachedir", help="cache dir (default ~/.cache/cloudfs/<fs uuid>)")
    p.add_argument("--passphrase-file", help="read the passphrase from this file")
    p.add_argument("--force", action="store_true",
                   help="--restore-metadata: replace a metadata database that exists")  # fmt: skip
    p.add_argument("--debug", action="store_true")
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
            restored = await restore_newest(
                store, Keys.from_master(master), sb.uuid, cache.meta_path, force=args.force
            )
            previous = cache.read_config() if cache.config_path.exists() else None
            cache.write_config(
                CacheConfig(
                    storage=store.url,
                    metadata=str(cache.meta_path),
                    uuid=sb.uuid,
                    options=options or (previous.options if previous else {}),
                    cache_size=previous.cache_size if previous else None,
                )
            )
        finally:
            os.close(lock_fd)
    finally:
        await store.aclose()
    print(f"restored the metadata of {sb.uuid} into {cache.meta_path}")
    print(f"from backup {restored.key} ({restored.size} bytes); files written after it "
          "are not in it")  # fmt: skip
    if restored.pending_stored or restored.pending_missing:
        print(
            f"blocks pending at backup time: {restored.pending_stored} found in the store, "
            f"{restored.pending_missing} missing (files using these read as I/O errors)"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        try:
            args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
        except SystemExit as exc:
            if exc.code:
                raise UsageError("see fsck.cloudfs --help") from None
            return 0
        setup_logging(args.debug)
        if not args.restore_metadata:
            raise UsageError("fsck.cloudfs checks nothing yet: only --restore-metadata is there")
        return trio.run(restore_metadata, args)

    return run_cli("fsck.cloudfs", body)


if __name__ == "__main__":
    sys.exit(main())
