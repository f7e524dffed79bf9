"""cloudfs: the admin command (stat, flush, ...) for mounted filesystems."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import trio
from cloudfs.tools._cli import open_config_meta, parse_args, run_cli, setup_logging

from cloudfs import trash, versions
from cloudfs.cache import CacheDir
from cloudfs.errors import DaemonError, NotMounted

if TYPE_CHECKING:
    from cloudfs.daemon.control import DaemonClient as DaemonClientType

#: virtual extended attributes of a mount's root: where its cache dir is, and a
#: command channel to the mount process (answered by the mount, never stored)
XATTR_CACHEDIR = b"user.cloudfs.cachedir"
XATTR_COMMAND = b"user.cloudfs.command"


def cache_of(mountpoint: str) -> CacheDir:
    """The cache dir of the cloudfs mounted at `mountpoint`."""
    if not os.path.isdir(mountpoint):
        raise NotMounted(f"{mountpoint} is not a directory")
    try:
        value = os.getxattr(mountpoint, XATTR_CACHEDIR.decode())
    except OSError:
        raise NotMounted(mountpoint) from None
    return CacheDir(Path(os.fsdecode(value)))


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


async def _daemon_status(cache: CacheDir) -> dict | None:
    from cloudfs.daemon.control import DaemonClient

    try:
        async with await DaemonClient.connect(cache, role="tool") as client:
            return await client.status()
    except DaemonError:
        return None


async def cmd_stat(args: argparse.Namespace) -> int:
    cache = cache_of(args.mountpoint)
    meta = open_config_meta(cache.read_config())
    try:
        async with meta.reading() as tx:
            s = await tx.stats()
            trash_entries, trash_bytes = await trash.usage(tx)
            old_bytes = await versions.old_only_bytes(tx)
    finally:
        await meta.close()
    daemon = await _daemon_status(cache)
    dedup = s.referenced_bytes / s.block_bytes if s.block_bytes else 1.0
    compression = s.stored_plain_bytes / s.stored_bytes if s.stored_bytes else 1.0
    report = {
        "files": s.files,
        "inodes": s.inodes,
        "logical_bytes": s.logical_bytes,
        "referenced_bytes": s.referenced_bytes,
        "block_bytes": s.block_bytes,
        "stored_bytes": s.stored_bytes,
        "blocks": s.blocks,
        "dedup_ratio": round(dedup, 3),
        "compression_ratio": round(compression, 3),
        "pending_uploads": s.pending_blocks,
        "pending_bytes": s.pending_bytes,
        "trash_entries": trash_entries,
        "trash_bytes": trash_bytes,
        "old_version_bytes": old_bytes,
        "daemon": daemon,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    rows = [
        ("files", f"{s.files}"),
        ("logical bytes", _human(s.logical_bytes)),
        ("stored bytes", _human(s.stored_bytes)),
        ("blocks", f"{s.blocks} ({_human(s.block_bytes)} before compression)"),
        ("dedup ratio", f"{dedup:.2f}"),
        ("compression ratio", f"{compression:.2f}"),
        ("pending uploads", f"{s.pending_blocks} blocks ({_human(s.pending_bytes)})"),
        ("trash", f"{trash_entries} entries ({_human(trash_bytes)} of files)"),
        ("only in old versions", f"{_human(old_bytes)} (blocks no live file uses)"),
        ("daemon", "running" if daemon is not None else "not running"),
    ]
    if daemon and daemon.get("errors"):
        rows.append(("upload errors", "; ".join(str(e) for e in daemon["errors"][:5])))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


async def cmd_flush(args: argparse.Namespace) -> int:
    from cloudfs.daemon.control import DaemonClient

    cache = cache_of(args.mountpoint)
    # seal what the mount still holds in dirty overlays, then wait for the uploads
    await trio.to_thread.run_sync(os.setxattr, args.mountpoint, XATTR_COMMAND.decode(), b"seal")
    async with await DaemonClient.connect(cache, role="tool") as client:
        if not sys.stderr.isatty():
            await client.flush()
            return 0
        done = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_show_flush_progress, client, done)
            try:
                await client.flush()
            finally:
                done.set()
    return 0


#: width of the flush progress bar, in characters
_BAR = 30


async def _show_flush_progress(client: DaemonClientType, done: trio.Event) -> None:
    """A self-rewriting line on the terminal: the bytes still to upload going down."""
    most = 1
    try:
        while not done.is_set():
            status = await client.status()
            pending, pending_bytes = int(status["pending"]), int(status["pending_bytes"])
            most = max(most, pending_bytes)  # more may come in while others write
            filled = round(_BAR * (most - pending_bytes) / most)
            sys.stderr.write(
                f"\r\x1b[Kflush [{'#' * filled}{'.' * (_BAR - filled)}] "
                f"{pending} blocks ({_human(pending_bytes)}) to upload"
            )
            sys.stderr.flush()
            with trio.move_on_after(0.25):
                await done.wait()
    except DaemonError:
        pass  # the flush itself reports it
    finally:
        sys.stderr.write("\r\x1b[K")
        sys.stderr.flush()


async def cmd_drop_cache(args: argparse.Namespace) -> int:
    from cloudfs.daemon.control import DaemonClient

    cache = cache_of(args.mountpoint)
    # the daemon deletes its copies of stored blocks first, then the mount closes its
    # block descriptors and drops the kernel's page cache, so reads must fetch again
    async with await DaemonClient.connect(cache, role="tool") as client:
        dropped = await client.drop_cache()
    await trio.to_thread.run_sync(
        os.setxattr, args.mountpoint, XATTR_COMMAND.decode(), b"drop_cache"
    )
    print(f"dropped {dropped['dropped']} cached blocks ({_human(dropped['dropped_bytes'])})")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cloudfs", description="Administer cloudfs filesystems.")
    p.add_argument("--debug", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser(
        "stat", aliases=["status"], help="files, bytes, dedup, pending uploads of a mount"
    )
    s.add_argument("mountpoint")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_stat)
    f = sub.add_parser(
        "flush",
        help="wait until everything written to a mount is in the object store (with a "
        "progress bar on a terminal)",
    )
    f.add_argument("mountpoint")
    f.set_defaults(func=cmd_flush)
    d = sub.add_parser(
        "drop-cache", help="drop a mount's cached file data: later reads fetch from the store"
    )
    d.add_argument("mountpoint")
    d.set_defaults(func=cmd_drop_cache)
    from cloudfs.tools.bench import add_parser as add_bench_parser

    add_bench_parser(sub)
    from cloudfs.tools.upgrade import add_parser as add_upgrade_parser

    add_upgrade_parser(sub)
    from cloudfs.tools.history import add_parser as add_history_parser

    add_history_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        args = parse_args(_parser(), argv, "cloudfs")
        if args is None:
            return 0
        setup_logging(args.debug)
        return trio.run(args.func, args)

    return run_cli("cloudfs", body)


if __name__ == "__main__":
    sys.exit(main())
