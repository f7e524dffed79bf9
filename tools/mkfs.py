"""mkfs.cloudfs: create a filesystem in a store and its metadata database."""

from __future__ import annotations

import argparse
import os
import shutil
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
from cloudfs.errors import FilesystemExists, UsageError
from cloudfs.meta import open_meta


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mkfs.cloudfs", description="Create a cloudfs filesystem.")
    p.add_argument(
        "storage", help="where to create it: local:///path, a directory, or s3://bucket[/prefix]"
    )
    p.add_argument("--cachedir", help="cache dir (default ~/.cache/cloudfs/<fs uuid>)")
    p.add_argument("--passphrase-file", help="read the passphrase from this file")
    p.add_argument(
        "--no-encryption", action="store_true", help="store blocks unencrypted (ids stay keyed)"
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing filesystem")
    p.add_argument(
        "--compression-level", type=int, default=config.DEFAULT_LEVEL, help="zstd level (default 3)"
    )
    p.add_argument("--debug", action="store_true")
    add_storage_arguments(p)
    return p


async def mkfs(args: argparse.Namespace) -> int:
    options = storage_options_from_args(args)
    store = open_cli_store(args.storage, options)
    try:
        # refuse before asking for a passphrase: nothing is written on this path
        if not args.force and await store.head(config.SUPERBLOCK_KEY) is not None:
            raise FilesystemExists(store.url)
        cache_root = args.cachedir
        if cache_root and not args.force and CacheDir(cache_root).meta_path.exists():
            raise FilesystemExists(f"{cache_root} already holds a metadata database")
        passphrase = None
        if not args.no_encryption:
            passphrase = config.read_passphrase(args.passphrase_file, confirm=True)
        sb, _keys = await config.create_filesystem(
            store, passphrase, encryption=not args.no_encryption, force=args.force,
            level=args.compression_level,
        )  # fmt: skip
        cache = CacheDir(cache_root or config.default_cachedir(sb.uuid))
        if cache.root.exists() and args.force:
            for name in ("meta.db", "meta.db-wal", "meta.db-shm"):
                (cache.root / name).unlink(missing_ok=True)
            shutil.rmtree(cache.blocks, ignore_errors=True)
        cache.create()
        cache.write_config(
            CacheConfig(
                storage=store.url, metadata=str(cache.meta_path), uuid=sb.uuid, options=options
            )
        )
        meta = open_meta(str(cache.meta_path))
        try:
            await meta.initialize(sb.uuid, uid=os.getuid(), gid=os.getgid())
        finally:
            await meta.close()
    finally:
        await store.aclose()
    print(f"created cloudfs filesystem {sb.uuid} in {store.url}")
    print(f"cache and metadata: {cache.root}")
    return 0


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        try:
            args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
        except SystemExit as exc:
            if exc.code:
                raise UsageError("see mkfs.cloudfs --help") from None
            return 0
        setup_logging(args.debug)
        return trio.run(mkfs, args)

    return run_cli("mkfs.cloudfs", body)


if __name__ == "__main__":
    sys.exit(main())
