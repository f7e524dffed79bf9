"""Metadata operations per second through the core (Namespace, no FUSE): create, stat,
first read (an open's atime update), readdir and unlink of N files in one directory, on
any metadata engine.

    python tests/stress/bench_meta.py --metadata /tmp/bench/meta.db
    CLOUDFS_MYSQL_PASSWORD=... python tests/stress/bench_meta.py \\
        --metadata mysql://cloudfs@127.0.0.1:3306/cloudfs_bench [--files 10000] [--tasks 8]

The database is wiped first (every cloudfs table in it is dropped). Each phase runs
`--tasks` workers (default 1: one operation at a time, as a single-threaded `touch`,
`stat`, `ls` or `rm` sends them) and reports operations per second; readdir counts
entries listed per second (pages of 256, as the FUSE adapter asks). Not a test: pytest
does not collect it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from cloudfs.cache import CacheDir
from cloudfs.chunking import ChunkerParams
from cloudfs.files import FileStore
from cloudfs.meta import open_meta
from cloudfs.meta.schema import ROOT_INODE
from cloudfs.namespace import Caller, Namespace

CALLER = Caller(uid=0, gid=0)


async def _fetch(ids: list[bytes], prefetch: list[bytes]) -> None:
    raise AssertionError("no file data in this benchmark")


async def _timed(tasks: int, items: list[int], op: Callable[[int], Awaitable[None]]) -> float:
    """Seconds to run `op` over `items` with `tasks` workers."""
    queue = iter(items)

    async def worker() -> None:
        for item in queue:
            await op(item)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(worker)
    return time.perf_counter() - start


async def bench(url: str, files: int, tasks: int, atime_each: bool = False) -> dict[str, float]:
    meta = open_meta(url)
    with tempfile.TemporaryDirectory() as tmp:
        cache = CacheDir(Path(tmp) / "cache")
        cache.create()
        store = FileStore(
            meta, cache, id_key=b"i" * 32, gear_key=b"g" * 32,
            chunker=ChunkerParams(64 * 1024, 256 * 1024, 1024 * 1024), fetch=_fetch,
            on_sealed=lambda: None, origin="bench",
        )  # fmt: skip
        ns = Namespace(meta, store)
        try:
            await meta.wipe()
            await meta.initialize("00000000-0000-4000-8000-000000000000", uid=0, gid=0)
            d = (await ns.mkdir(ROOT_INODE, b"d", 0o755, CALLER)).id
            names = [b"file-%06d" % i for i in range(files)]
            inodes: dict[int, int] = {}

            async def create(i: int) -> None:
                inodes[i] = (await ns.mknod(d, names[i], 0o100644, 0, CALLER)).id

            async def stat(i: int) -> None:
                await ns.getattr(inodes[i])

            async def first_read(i: int) -> None:  # what an open for reading does
                assert await ns.accessed(await ns.getattr(inodes[i]))

            async def unlink(i: int) -> None:
                await ns.unlink(d, names[i])

            listed = 0

            async def readdir(_: int) -> None:
                nonlocal listed
                cookie = 0
                while page := await ns.readdir(d, cookie):
                    listed += len(page)
                    cookie = page[-1][2]

            order = list(range(files))
            seconds = {"create": await _timed(tasks, order, create)}
            seconds["stat"] = await _timed(tasks, order, stat)
            async with trio.open_nursery() as background:
                if not atime_each:  # as a mount does
                    await background.start(ns.run_atime_writes)
                seconds["1st read"] = await _timed(tasks, order, first_read)
                background.cancel_scope.cancel()
            seconds["readdir"] = await _timed(1, [0], readdir)
            assert listed == files + 2, f"listed {listed} entries"
            seconds["unlink"] = await _timed(tasks, order, unlink)
            rates = {op: files / s for op, s in seconds.items()}
            rates["readdir"] = listed / seconds["readdir"]
            return rates
        finally:
            await meta.close()


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--metadata", required=True, help="metadata URL or SQLite path")
    p.add_argument("--files", type=int, default=10_000)
    p.add_argument("--tasks", type=int, default=1, help="concurrent workers per phase")
    p.add_argument(
        "--atime-each", action="store_true",
        help="first reads write their atime each at once (no batching, as before)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    rates = trio.run(bench, args.metadata, args.files, args.tasks, args.atime_each)
    if args.json:
        print(json.dumps({k: round(v) for k, v in rates.items()}))
        return
    for op, rate in rates.items():
        unit = "entries/s" if op == "readdir" else "ops/s"
        print(f"{op:<8} {rate:>10,.0f} {unit}")


if __name__ == "__main__":
    main()
