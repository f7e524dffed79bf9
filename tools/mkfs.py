"""mkfs.cloudfs: create a filesystem in a store and its metadata database."""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import trio
from cloudfs.tools._cli import (
    add_metadata_arguments,
    add_storage_arguments,
    hide_url_password,
    metadata_password,
    open_cli_store,
    parse_args,
    parse_size,
    run_cli,
    setup_logging,
    storage_options_from_args,
)

from cloudfs import config, retention
from cloudfs.cache import CacheConfig, CacheDir
from cloudfs.errors import FilesystemExists
from cloudfs.meta import open_meta
from cloudfs.meta.base import MetaStore
from cloudfs.meta.url import redact


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
    p.add_argument(
        "--chunk-size", metavar="SIZE",
        help=f"average block size, a power of two (default {config.DEFAULT_CHUNKER[1] >> 20}M):"
        " files are cut into "
        "content-defined chunks of SIZE/4 to 4*SIZE. Larger: fewer, bigger objects "
        "(fewer requests, faster cold reads from S3); smaller: an edit re-stores less",
    )  # fmt: skip
    p.add_argument("--debug", action="store_true")
    p.add_argument(
        "--retention", metavar="NAME=DURATION[,...]",
        help="how long versions and the trash are kept (default keep-all=1d,hourly=7d,"
        "daily=30d,trash=30d; change it later with `cloudfs retention`)",
    )  # fmt: skip
    add_metadata_arguments(p)
    add_storage_arguments(p)
    return p


async def mkfs(args: argparse.Namespace) -> int:
    options = storage_options_from_args(args)
    policy = retention.parse_policy(args.retention or "")  # bad input fails before any change
    chunker = (
        config.chunker_for(parse_size(args.chunk_size, "chunk size"))
        if args.chunk_size is not None
        else config.DEFAULT_CHUNKER
    )
    store = open_cli_store(args.storage, options)
    meta: MetaStore | None = None
    try:
        # refuse before asking for a passphrase: nothing is written on this path
        if not args.force and await store.head(config.SUPERBLOCK_KEY) is not None:
            raise FilesystemExists(store.url)
        cache_root = args.cachedir
        if args.metadata:
            # an unreachable server or a wrong password fails here, before any prompt
            meta = open_meta(
                args.metadata, password=metadata_password(args.metadata, args.mysql_password_file)
            )
            if not args.force and await meta.is_initialized():
                raise FilesystemExists(f"{meta.where} already holds a cloudfs filesystem")
        elif cache_root and not args.force and CacheDir(cache_root).meta_path.exists():
            raise FilesystemExists(f"{cache_root} already holds a metadata database")
        passphrase = None
        if not args.no_encryption:
            passphrase = config.read_passphrase(args.passphrase_file, confirm=True)
        sb, _keys = await config.create_filesystem(
            store, passphrase, encryption=not args.no_encryption, force=args.force,
            chunker=chunker, level=args.compression_level,
        )  # fmt: skip
        cache = CacheDir(cache_root or config.default_cachedir(sb.uuid))
        if cache.root.exists() and args.force:
            for name in ("meta.db", "meta.db-wal", "meta.db-shm"):
                (cache.root / name).unlink(missing_ok=True)
            shutil.rmtree(cache.blocks, ignore_errors=True)
        cache.create()
        password_file = args.mysql_password_file
        cache.write_config(
            CacheConfig(
                storage=store.url,
                metadata=redact(args.metadata) if args.metadata else str(cache.meta_path),
                uuid=sb.uuid,
                options=options,
                metadata_password_file=os.path.abspath(password_file) if password_file else None,
            )
        )
        if meta is None:
            meta = open_meta(str(cache.meta_path))
        elif args.force:
            await meta.wipe()
        await meta.initialize(sb.uuid, uid=os.getuid(), gid=os.getgid())
        async with meta.transaction() as tx:
            await retention.save(tx, policy)
    finally:
        if meta is not None:
            await meta.close()
        await store.aclose()
    print(f"created cloudfs filesystem {sb.uuid} in {store.url}")
    lo, avg, hi = (sb.chunker[k] >> 10 for k in ("min", "avg", "max"))
    print(f"blocks: {lo} KiB to {hi} KiB, {avg} KiB on average")
    if args.metadata:
        print(f"metadata: {redact(args.metadata)}")
        print(f"cache: {cache.root}")
    else:
        print(f"cache and metadata: {cache.root}")
    return 0


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        args = parse_args(_parser(), argv, "mkfs.cloudfs")
        if args is None:
            return 0
        if args.metadata:
            metadata_password(args.metadata, args.mysql_password_file)  # given twice?
        if argv is None:
            hide_url_password("cloudfs.tools.mkfs", sys.argv[1:], args.metadata)
        setup_logging(args.debug)
        return trio.run(mkfs, args)

    return run_cli("mkfs.cloudfs", body)


if __name__ == "__main__":
    sys.exit(main())
