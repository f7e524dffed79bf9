"""`cloudfs bench`: one filesystem workload, measured on any directory (cloudfs or not).

The workload, in this order, inside a fresh `.cloudfs-bench-*` directory of DIR that is
removed afterwards (also on an error or Ctrl-C):

1. a big file of incompressible data (AES-CTR keystream, never repeating, so nothing
   dedups), written with 1 MiB writes and one fsync: MB/s as the application sees
   it; then the time until the filesystem has stored it and that end-to-end MB/s
   (cloudfs: until no upload is pending, the `cloudfs flush` semantics; elsewhere
   fsync is storing) and the stored/logical ratio;
2. warm read of that file (page cache hot) and cold read (kernel page cache dropped:
   /proc/sys/vm/drop_caches when root, else posix_fadvise(DONTNEED) on the file; on
   cloudfs also `cloudfs drop-cache`, so every block comes from the object store).
   The bytes read are then checked against what was written;
3. a duplicate copy of the big file (1 MiB read/write, fsync): MB/s and the bytes it
   newly stored;
4. text-like compressible data (shuffled paragraphs of a Zipf-distributed vocabulary)
   the same way as 1, with zlib level 6 over the same bytes as the yardstick for
   the stored/logical ratio (over at most 64 evenly spread 16 MiB segments);
5. an editor-style save: a file of `--edit-size` bytes (default 256 MiB, at most the
   big size) is stored, then written again as a new file with one byte inserted in
   the middle, fsynced and renamed over the old one: the bytes newly stored;
6. small files of 4 KiB (`--small-count`, on `--threads` threads): create (open,
   write, close), stat, read, rename, unlink per second; then mkdir and rmdir per
   second.

"Newly stored" bytes: on cloudfs the growth of `stored_bytes` (`cloudfs stat`) once
nothing is pending; elsewhere the bytes the new file occupies (st_blocks). MB is 10^6
bytes. Time spent generating data is not counted.

Three-way comparison on one machine (plain directory, a bare pyfuse3 filesystem, and
cloudfs, all on the same disk)::

    mkdir -p /srv/bench/plain /srv/bench/under /mnt/pass /mnt/cloud
    python -m cloudfs.tools.passthroughfs /srv/bench/under /mnt/pass &
    mkfs.cloudfs /srv/bench/store --cachedir /srv/bench/cache
    mount.cloudfs /srv/bench/store /mnt/cloud --cachedir /srv/bench/cache
    cloudfs bench /mnt/cloud --baseline /srv/bench/plain
    cloudfs bench /mnt/pass --baseline /srv/bench/plain
    cloudfs bench /mnt/cloud --baseline /mnt/pass --json > cloud-vs-fuse.json
    fusermount3 -u /mnt/cloud; fusermount3 -u /mnt/pass

Run as root for truly cold reads on every filesystem (drop_caches): without it, a
cold read of the passthrough still finds the file underneath in the page cache.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TextIO

import trio
from cloudfs.tools._cli import open_config_meta
from cloudfs.tools.cloudfs import XATTR_COMMAND, _human, cache_of
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from cloudfs.cache import CacheDir
from cloudfs.errors import DaemonError, NotMounted, UsageError
from cloudfs.meta.base import MetaStore

MB = 1_000_000
MiB = 1 << 20
#: the application's I/O size for big files
IO_SIZE = 1 * MiB
#: data is generated (and checked) in pieces of this size
SEGMENT = 16 * MiB
SMALL_FILE_SIZE = 4096
DEFAULT_EDIT_SIZE = 256 * MiB
#: at most this many text segments are compressed with zlib for the yardstick
ZLIB_SEGMENTS = 64

#: Runs a coroutine function on the trio thread from the bench thread
#: (trio.from_thread.run).
Portal = Callable[..., Any]


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str  # "MB/s", "/s", "bytes", "ratio", "s"


#: every figure a run reports, in table order (None where it does not apply)
FIGURES: tuple[Figure, ...] = (
    Figure("write_mb_s", "big file write (1 MiB writes + fsync)", "MB/s"),
    Figure("stored_s", "big file: write start until stored", "s"),
    Figure("stored_mb_s", "big file end to end (until stored)", "MB/s"),
    Figure("stored_ratio", "big file stored / logical", "ratio"),
    Figure("warm_read_mb_s", "warm read", "MB/s"),
    Figure("cold_read_mb_s", "cold read", "MB/s"),
    Figure("copy_mb_s", "duplicate copy (read + write + fsync)", "MB/s"),
    Figure("copy_stored_bytes", "duplicate copy: newly stored", "bytes"),
    Figure("text_write_mb_s", "text write (1 MiB writes + fsync)", "MB/s"),
    Figure("text_stored_mb_s", "text end to end (until stored)", "MB/s"),
    Figure("text_stored_ratio", "text stored / logical", "ratio"),
    Figure("text_zlib6_ratio", "text zlib-6 / logical (yardstick)", "ratio"),
    Figure("edit_stored_bytes", "1-byte insert + save: newly stored", "bytes"),
    Figure("create_per_s", "small files: create 4 KiB", "/s"),
    Figure("stat_per_s", "small files: stat", "/s"),
    Figure("read_per_s", "small files: read", "/s"),
    Figure("rename_per_s", "small files: rename", "/s"),
    Figure("unlink_per_s", "small files: unlink", "/s"),
    Figure("mkdir_per_s", "mkdir", "/s"),
    Figure("rmdir_per_s", "rmdir", "/s"),
)


@dataclass(frozen=True)
class BenchOptions:
    big_size: int
    small_count: int
    threads: int
    edit_size: int


class Interrupted(Exception):
    """The user asked the bench to stop."""


# --- data ---------------------------------------------------------------------------------


class RandomData:
    """`size` bytes of incompressible, never repeating data, made segment by segment
    (AES-CTR keystream: a few GB/s, and any segment can be made again to check it)."""

    def __init__(self, seed: int, size: int) -> None:
        self.key = hashlib.sha256(b"cloudfs bench %d" % seed).digest()
        self.size = size
        self.segments = -(-size // SEGMENT)

    def segment(self, i: int) -> bytes:
        length = min(SEGMENT, self.size - i * SEGMENT)
        # the counter block of byte offset i*SEGMENT: segments never overlap
        counter = (i * SEGMENT // 16).to_bytes(16, "big")
        enc = Cipher(algorithms.AES(self.key), modes.CTR(counter)).encryptor()
        return enc.update(bytes(length))


def _vocabulary(rng: random.Random, n: int) -> list[str]:
    syllables = [
        "ka", "to", "ri", "en", "sa", "mo", "lu", "the", "and", "ver", "pro", "ing",
        "tion", "al", "er", "de", "con", "ex", "im", "ol", "an", "is", "of", "re",
        "in", "st", "ch", "ou", "sh", "ly", "ment", "ness", "ble",
    ]  # fmt: skip
    words: set[str] = set()
    while len(words) < n:
        count = rng.choice((1, 1, 2, 2, 2, 3, 3, 4))
        words.add("".join(rng.choice(syllables) for _ in range(count)))
    ordered = sorted(words)
    rng.shuffle(ordered)
    return ordered


class TextData:
    """`size` bytes of text-like data: each 16 MiB segment is its own random order of
    one pool of paragraphs (Zipf-distributed words in sentences), so it compresses
    like prose while no two blocks of a content-defined chunker come out equal."""

    _pools: ClassVar[dict[int, list[bytes]]] = {}

    def __init__(self, seed: int, size: int) -> None:
        self.seed = seed
        self.size = size
        self.segments = -(-size // SEGMENT)
        self.paragraphs = self._pool(seed)

    @classmethod
    def _pool(cls, seed: int) -> list[bytes]:
        pool = cls._pools.get(seed)
        if pool is not None:
            return pool
        rng = random.Random(seed)
        vocab = _vocabulary(rng, 20_000)
        weights = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(vocab))))
        words = rng.choices(vocab, cum_weights=weights, k=3_000_000)
        pool, total, at = [], 0, 0
        while total < SEGMENT + MiB:
            sentences = []
            for _ in range(rng.randint(3, 8)):
                n = rng.randint(6, 20)
                if at + n > len(words):
                    at = 0
                sentences.append(" ".join(words[at : at + n]).capitalize() + ".")
                at += n
            paragraph = (" ".join(sentences) + "\n\n").encode()
            pool.append(paragraph)
            total += len(paragraph)
        cls._pools[seed] = pool
        return pool

    def segment(self, i: int) -> bytes:
        length = min(SEGMENT, self.size - i * SEGMENT)
        order = list(range(len(self.paragraphs)))
        random.Random(self.seed * 1_000_003 + i).shuffle(order)
        return b"".join([self.paragraphs[k] for k in order])[:length]


class Inserted:
    """Another data source with one byte inserted at offset `at` (an editor's save)."""

    def __init__(self, base: RandomData, at: int, byte: bytes = b"!") -> None:
        self.base = base
        self.at = at
        self.byte = byte
        self.size = base.size + 1
        self.segments = base.segments

    def segment(self, i: int) -> bytes:
        data = self.base.segment(i)
        start = i * SEGMENT
        if start <= self.at < start + len(data):
            k = self.at - start
            return data[:k] + self.byte + data[k:]
        return data


DataSource = RandomData | TextData | Inserted


# --- progress display ---------------------------------------------------------------------


class Progress:
    """One self-rewriting status line on a terminal; silent when `stream` is None."""

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream
        self.prefix = ""
        self.label = ""
        self.total = 0
        self.unit = ""
        self._shown = 0.0

    def phase(self, label: str, total: int = 0, unit: str = "") -> None:
        self.label, self.total, self.unit = label, total, unit
        self._shown = 0.0
        self.update(0, force=True)

    def update(self, done: int, *, force: bool = False) -> None:
        if self.stream is None:
            return
        now = time.monotonic()
        if not force and now - self._shown < 0.1:
            return
        self._shown = now
        text = f"{self.prefix}{self.label}"
        if self.total:
            if self.unit == "bytes":
                amount = f"{done / MiB:,.0f}/{self.total / MiB:,.0f} MiB"
            else:
                amount = f"{done:,}/{self.total:,}"
            text += f"  {amount}  {100 * done / self.total:3.0f}%"
        self.stream.write(f"\r\x1b[K{text}")
        self.stream.flush()

    def clear(self) -> None:
        if self.stream is not None:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


# --- the directory under test -------------------------------------------------------------


def _mount_root(path: Path) -> Path:
    p = path.resolve()
    while not os.path.ismount(p):
        p = p.parent
    return p


def _fstype(mountpoint: Path) -> str:
    """The filesystem type of a mount point, per /proc/self/mountinfo."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    found = "unknown"
    for line in lines:
        fields = line.split()
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        if point == str(mountpoint):
            found = fields[fields.index("-") + 1]  # the last mount there wins
    return found


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


class Target:
    """A directory under test: how its data counts as stored, and how to make a cold
    read cold. A plain directory stores on fsync."""

    kind = "plain"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mountpoint = _mount_root(path)
        self.fstype = _fstype(self.mountpoint)
        self.cold_method = ""

    def settle(self) -> None:
        """Return once everything written so far is stored."""

    def stored_bytes(self) -> int | None:
        """Bytes the filesystem holds in its store (None: it cannot say)."""
        return None

    def stored_by(self, path: Path, before: int | None) -> int:
        """Bytes newly stored since `before` (a `stored_bytes` reading) for `path`."""
        return _allocated(path)

    def make_cold(self, files: Sequence[Path]) -> None:
        """Drop the cached data of `files`, so the next read comes from storage."""
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        self.cold_method = "fadvise"
        if os.geteuid() == 0:
            os.sync()  # drop_caches only drops clean pages
            try:
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("1\n")
                self.cold_method = "drop_caches"
            except OSError:
                pass

    def close(self) -> None:
        pass


class _CloudfsLink:
    """The bench's connections to a cloudfs mount's daemon and metadata (these live on
    the trio thread; the bench thread reaches them through the portal)."""

    def __init__(self, cache: CacheDir) -> None:
        self.cache = cache
        self.meta: MetaStore | None = None
        self.client: Any = None

    async def _client(self) -> Any:
        from cloudfs.daemon.control import DaemonClient

        if self.client is None:
            self.client = await DaemonClient.connect(self.cache, role="tool")
        return self.client

    async def call(self, op: str) -> Any:
        """A daemon request; a lost connection is made again once."""
        for attempt in (1, 2):
            client = await self._client()
            try:
                return await getattr(client, op)()
            except DaemonError:
                self.client = None
                await client.aclose()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def stored_bytes(self) -> int:
        if self.meta is None:
            # with the password the mount was given (file named in config.json, or
            # $CLOUDFS_MYSQL_PASSWORD)
            self.meta = open_config_meta(self.cache.read_config())
        async with self.meta.reading() as tx:
            return (await tx.stats()).stored_bytes

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None
        if self.meta is not None:
            await self.meta.close()
            self.meta = None


class CloudfsTarget(Target):
    """A directory on a cloudfs mount: stored means uploaded (no block pending)."""

    kind = "cloudfs"

    def __init__(self, path: Path, cache: CacheDir, portal: Portal) -> None:
        super().__init__(path)
        self.portal = portal
        self.link = _CloudfsLink(cache)

    def settle(self) -> None:
        # `cloudfs flush`: seal what the mount holds, then wait for the uploads
        os.setxattr(self.mountpoint, XATTR_COMMAND.decode(), b"seal")
        self.portal(self.link.call, "flush")

    def stored_bytes(self) -> int | None:
        return int(self.portal(self.link.stored_bytes))

    def stored_by(self, path: Path, before: int | None) -> int:
        now = self.stored_bytes()
        assert now is not None and before is not None
        return now - before

    def make_cold(self, files: Sequence[Path]) -> None:
        # the daemon deletes its block copies first; then the mount closes its block
        # descriptors and drops the kernel's page cache of its files
        self.portal(self.link.call, "drop_cache")
        os.setxattr(self.mountpoint, XATTR_COMMAND.decode(), b"drop_cache")
        super().make_cold(files)
        self.cold_method = "cloudfs drop-cache + " + self.cold_method

    def close(self) -> None:
        self.portal(self.link.aclose)


def open_target(directory: str, portal: Portal) -> Target:
    """The directory as a Target: a CloudfsTarget when its mount answers cloudfs's
    virtual xattr."""
    path = Path(directory)
    if not path.is_dir():
        raise UsageError(f"{directory} is not a directory")
    root = _mount_root(path)
    try:
        cache = cache_of(str(root))
    except NotMounted:
        return Target(path)
    return CloudfsTarget(path, cache, portal)


# --- measuring ----------------------------------------------------------------------------


@dataclass
class Run:
    """The workload on one target."""

    target: Target
    opts: BenchOptions
    progress: Progress
    stop: threading.Event
    figures: dict[str, float | None] = field(default_factory=dict)

    def check_stop(self) -> None:
        if self.stop.is_set():
            raise Interrupted()

    # --- big files ------------------------------------------------------------------

    def write(self, path: Path, data: DataSource, label: str) -> float:
        """Write `data` with 1 MiB writes, then fsync; the seconds spent in write and
        fsync (generating the data is not counted)."""
        self.progress.phase(label, data.size, "bytes")
        spent = 0.0
        done = 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for i in range(data.segments):
                self.check_stop()
                view = memoryview(data.segment(i))
                t0 = time.perf_counter()
                for off in range(0, len(view), IO_SIZE):
                    piece = view[off : off + IO_SIZE]
                    while piece:
                        piece = piece[os.write(fd, piece) :]
                spent += time.perf_counter() - t0
                done += len(view)
                self.progress.update(done)
            t0 = time.perf_counter()
            os.fsync(fd)
            spent += time.perf_counter() - t0
        finally:
            os.close(fd)
        return spent

    def settle(self, label: str) -> float:
        self.progress.phase(label)
        t0 = time.perf_counter()
        self.target.settle()
        return time.perf_counter() - t0

    def read(self, path: Path, size: int, label: str) -> float:
        """Read the whole file with 1 MiB reads; the seconds it took."""
        self.progress.phase(label, size, "bytes")
        buf = bytearray(IO_SIZE)
        total = 0
        fd = os.open(path, os.O_RDONLY)
        try:
            t0 = time.perf_counter()
            while True:
                n = os.readv(fd, [buf])
                if not n:
                    break
                total += n
                if total % SEGMENT < IO_SIZE:
                    self.check_stop()
                    self.progress.update(total)
            spent = time.perf_counter() - t0
        finally:
            os.close(fd)
        if total != size:
            raise RuntimeError(f"{path}: read {total} bytes, wrote {size}")
        return spent

    def verify(self, path: Path, data: DataSource) -> None:
        """The file holds exactly `data` (a wrong byte is a bug, not a figure)."""
        self.progress.phase(f"checking {path.name}", data.size, "bytes")
        with open(path, "rb", buffering=0) as f:
            for i in range(data.segments):
                self.check_stop()
                expected = data.segment(i)
                got = f.read(len(expected))
                if got != expected:
                    raise RuntimeError(f"{path}: wrong bytes in segment {i} (16 MiB pieces)")
                self.progress.update(i * SEGMENT + len(expected))
            if f.read(1):
                raise RuntimeError(f"{path}: longer than written")

    def copy(self, src: Path, dst: Path, size: int) -> float:
        """cp-like: 1 MiB reads and writes, then fsync; the seconds it took."""
        self.progress.phase("duplicate copy", size, "bytes")
        buf = bytearray(IO_SIZE)
        done = 0
        fin = os.open(src, os.O_RDONLY)
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            t0 = time.perf_counter()
            while True:
                n = os.readv(fin, [buf])
                if not n:
                    break
                view = memoryview(buf)[:n]
                while view:
                    view = view[os.write(fout, view) :]
                done += n
                if done % SEGMENT < IO_SIZE:
                    self.check_stop()
                    self.progress.update(done)
            os.fsync(fout)
            return time.perf_counter() - t0
        finally:
            os.close(fin)
            os.close(fout)

    def big_file(self, work: Path) -> None:
        size = self.opts.big_size
        data = RandomData(1, size)
        big = work / "big"
        before = self.target.stored_bytes()
        written = self.write(big, data, "big file: write")
        settled = self.settle("big file: until stored")
        self.figures["write_mb_s"] = size / MB / written
        self.figures["stored_s"] = written + settled
        self.figures["stored_mb_s"] = size / MB / (written + settled)
        self.figures["stored_ratio"] = self.target.stored_by(big, before) / size

        self.read(big, size, "warm-up read")
        self.figures["warm_read_mb_s"] = size / MB / self.read(big, size, "warm read")
        self.progress.phase("dropping caches")
        self.target.make_cold([big])
        self.figures["cold_read_mb_s"] = size / MB / self.read(big, size, "cold read")
        self.verify(big, data)

        before = self.target.stored_bytes()
        copy = work / "big.copy"
        copied = self.copy(big, copy, size)
        self.settle("duplicate copy: until stored")
        self.figures["copy_mb_s"] = size / MB / copied
        self.figures["copy_stored_bytes"] = self.target.stored_by(copy, before)
        copy.unlink()

    def text_file(self, work: Path) -> None:
        size = self.opts.big_size
        self.progress.phase("making text")
        data = TextData(2, size)
        text = work / "text"
        before = self.target.stored_bytes()
        written = self.write(text, data, "text: write")
        settled = self.settle("text: until stored")
        self.figures["text_write_mb_s"] = size / MB / written
        self.figures["text_stored_mb_s"] = size / MB / (written + settled)
        self.figures["text_stored_ratio"] = self.target.stored_by(text, before) / size
        text.unlink()
        self.figures["text_zlib6_ratio"] = self.zlib_ratio(data)

    def zlib_ratio(self, data: TextData) -> float:
        """zlib level 6 over the same bytes, segment by segment (at most ZLIB_SEGMENTS
        segments, evenly spread), compressed size / size."""
        picks = sorted({i * data.segments // ZLIB_SEGMENTS for i in range(ZLIB_SEGMENTS)})
        picks = [i for i in picks if i < data.segments]
        self.progress.phase("zlib-6 yardstick", len(picks))

        def compress(i: int) -> tuple[int, int]:
            self.check_stop()
            segment = data.segment(i)
            return len(segment), len(zlib.compress(segment, 6))

        logical = compressed = 0
        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
            for n, (plain, packed) in enumerate(pool.map(compress, picks), 1):
                logical += plain
                compressed += packed
                self.progress.update(n)
        return compressed / logical

    def edit_save(self, work: Path) -> None:
        size = min(self.opts.edit_size, self.opts.big_size)
        original = RandomData(3, size)
        path = work / "edit"
        self.write(path, original, "editor save: original")
        self.settle("editor save: original until stored")
        before = self.target.stored_bytes()
        new = work / ".edit.new"
        self.write(new, Inserted(original, size // 2), "editor save: new file")
        os.rename(new, path)
        self.settle("editor save: until stored")
        self.figures["edit_stored_bytes"] = self.target.stored_by(path, before)
        path.unlink()

    # --- small files ----------------------------------------------------------------

    def parallel(self, label: str, op: Callable[[int], object]) -> float:
        """op(i) for every i < small_count, on `threads` threads; the seconds it took."""
        count, threads = self.opts.small_count, self.opts.threads
        self.progress.phase(label, count)
        done = [0] * threads
        errors: list[BaseException] = []
        ready = threading.Barrier(threads + 1)

        def worker(k: int) -> None:
            ready.wait()
            try:
                for i in range(k, count, threads):
                    if self.stop.is_set():
                        return
                    op(i)
                    done[k] += 1
            except BaseException as exc:  # noqa: BLE001 - handed to the bench thread
                errors.append(exc)

        workers = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(threads)]
        for w in workers:
            w.start()
        ready.wait()
        t0 = time.perf_counter()
        for w in workers:
            while w.is_alive():
                w.join(0.1)
                self.progress.update(sum(done))
        spent = time.perf_counter() - t0
        if errors:
            raise errors[0]
        self.check_stop()
        return spent

    def small_files(self, work: Path) -> None:
        count = self.opts.small_count
        files = work / "small"
        files.mkdir()
        names = [os.path.join(files, f"f{i}") for i in range(count)]
        renamed = [os.path.join(files, f"r{i}") for i in range(count)]
        pool = RandomData(4, SMALL_FILE_SIZE).segment(0)

        def create(i: int) -> None:
            fd = os.open(names[i], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, struct.pack("<Q", i) + pool[8:])  # every file its own bytes
            finally:
                os.close(fd)

        def read(i: int) -> None:
            fd = os.open(names[i], os.O_RDONLY)
            try:
                total = 0
                while chunk := os.read(fd, 65536):
                    total += len(chunk)
            finally:
                os.close(fd)
            if total != SMALL_FILE_SIZE:
                raise RuntimeError(f"{names[i]}: read {total} bytes, wrote {SMALL_FILE_SIZE}")

        self.figures["create_per_s"] = count / self.parallel("small files: create", create)
        self.settle("small files: until stored")
        stat = os.stat
        self.figures["stat_per_s"] = count / self.parallel(
            "small files: stat", lambda i: stat(names[i])
        )
        self.figures["read_per_s"] = count / self.parallel("small files: read", read)
        rename = os.rename
        self.figures["rename_per_s"] = count / self.parallel(
            "small files: rename", lambda i: rename(names[i], renamed[i])
        )
        unlink = os.unlink
        self.figures["unlink_per_s"] = count / self.parallel(
            "small files: unlink", lambda i: unlink(renamed[i])
        )
        dirs = [os.path.join(files, f"d{i}") for i in range(count)]
        mkdir, rmdir = os.mkdir, os.rmdir
        self.figures["mkdir_per_s"] = count / self.parallel("mkdir", lambda i: mkdir(dirs[i]))
        self.figures["rmdir_per_s"] = count / self.parallel("rmdir", lambda i: rmdir(dirs[i]))
        self.settle("small files: until stored")

    def run(self) -> dict[str, float | None]:
        work = Path(tempfile.mkdtemp(prefix=".cloudfs-bench-", dir=self.target.path))
        try:
            self.settle("waiting for earlier uploads")  # measure this workload only
            self.big_file(work)
            self.text_file(work)
            self.edit_save(work)
            self.small_files(work)
        finally:
            self.progress.phase("removing the bench files")
            shutil.rmtree(work, ignore_errors=True)
        return {f.key: self.figures.get(f.key) for f in FIGURES}


# --- report -----------------------------------------------------------------------------


def _format(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "MB/s":
        return f"{value:,.1f} MB/s" if value < 100 else f"{value:,.0f} MB/s"
    if unit == "/s":
        return f"{value:,.0f}/s"
    if unit == "bytes":
        return _human(value)
    if unit == "ratio":
        return f"{value:.3f}"
    return f"{value:.2f} s"


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def _describe(target: Target) -> dict[str, Any]:
    return {
        "dir": str(target.path),
        "kind": target.kind,
        "fstype": target.fstype,
        "cold_read": target.cold_method,
    }


def report_json(
    opts: BenchOptions,
    target: Target,
    figures: dict[str, float | None],
    baseline: tuple[Target, dict[str, float | None]] | None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "params": {
            "big_size": opts.big_size,
            "small_count": opts.small_count,
            "threads": opts.threads,
            "edit_size": min(opts.edit_size, opts.big_size),
            "io_size": IO_SIZE,
            "small_file_size": SMALL_FILE_SIZE,
            "mb": MB,
        },
        **_describe(target),
        "figures": figures,
        "units": {f.key: f.unit for f in FIGURES},
        "baseline": None,
        "ratios": None,
    }
    if baseline is not None:
        base_target, base_figures = baseline
        out["baseline"] = {**_describe(base_target), "figures": base_figures}
        out["ratios"] = {k: _ratio(v, base_figures.get(k)) for k, v in figures.items()}
    return out


def report_table(report: dict[str, Any]) -> str:
    params = report["params"]
    head = (
        f"cloudfs bench: {report['dir']} ({report['kind']}, {report['fstype']}); "
        f"big file {_human(params['big_size'])}, edit file {_human(params['edit_size'])}, "
        f"{params['small_count']:,} small files, {params['threads']} thread(s); MB = 10^6 B"
    )
    base = report["baseline"]
    columns = [report["kind"]]
    if base is not None:
        head += f"\nbaseline: {base['dir']} ({base['kind']}, {base['fstype']})"
        columns += [f"baseline ({base['kind']})", "ratio"]
    rows = []
    for f in FIGURES:
        row = [f.label, _format(report["figures"][f.key], f.unit)]
        if base is not None:
            ratio = report["ratios"][f.key]
            row += [
                _format(base["figures"][f.key], f.unit),
                "n/a" if ratio is None else f"{ratio:.2f}",
            ]
        rows.append(row)
    header = ["figure", *columns]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = [head, ""]
    for r in [header, *rows]:
        cells = [r[0].ljust(widths[0])] + [r[c].rjust(widths[c]) for c in range(1, len(r))]
        lines.append("  ".join(cells))
    lines.append("")
    cold = f"cold read: {report['cold_read']}"
    if base is not None:
        cold += f"; baseline: {base['cold_read']}"
    lines.append(cold)
    return "\n".join(lines)


# --- command line ---------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'1G', '256M', '8MiB', '4096' -> bytes (binary multiples)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1G, 256M, 4096)")
    scale = 1 << (10 * " kmgt".index(m.group(2).lower() or " "))
    size = int(float(m.group(1)) * scale)
    if size < 1:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return size


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def add_parser(sub: Any) -> None:
    """The `bench` subcommand of `cloudfs`."""
    b = sub.add_parser(
        "bench",
        help="measure write, store, read and metadata speed of a directory (any filesystem)",
        description=(__doc__ or "").split("\n\n")[0],
    )
    b.add_argument("dir", help="directory to measure (a cloudfs mount or any other)")
    b.add_argument("--baseline", metavar="DIR2", help="run the same workload on DIR2 and compare")
    b.add_argument("--threads", type=_positive, default=1, help="workers for small files")
    b.add_argument("--big-size", type=parse_size, default=1 << 30, help="big file size (1G)")
    b.add_argument("--small-count", type=_positive, default=10_000, help="small files (10000)")
    b.add_argument(
        "--edit-size",
        type=parse_size,
        default=DEFAULT_EDIT_SIZE,
        help="file size for the editor-save test (256M, at most --big-size)",
    )
    b.add_argument("--json", action="store_true", help="machine-readable output")
    b.set_defaults(func=cmd_bench)


def _bench_all(
    dirs: list[str], opts: BenchOptions, progress: Progress, stop: threading.Event, portal: Portal
) -> list[tuple[Target, dict[str, float | None]]]:
    """The workload on each directory in turn (runs on a worker thread)."""
    results = []
    for directory in dirs:
        target = open_target(directory, portal)
        try:
            progress.prefix = f"{directory}: " if len(dirs) > 1 else ""
            figures = Run(target, opts, progress, stop).run()
        finally:
            target.close()
        results.append((target, figures))
    return results


async def cmd_bench(args: argparse.Namespace) -> int:
    opts = BenchOptions(
        big_size=args.big_size,
        small_count=args.small_count,
        threads=args.threads,
        edit_size=args.edit_size,
    )
    dirs = [args.dir] + ([args.baseline] if args.baseline else [])
    for d in dirs:
        if not os.path.isdir(d):
            raise UsageError(f"{d} is not a directory")
    progress = Progress(sys.stderr if sys.stderr.isatty() else None)
    stop = threading.Event()
    finished = threading.Event()

    def work() -> list[tuple[Target, dict[str, float | None]]]:
        try:
            return _bench_all(dirs, opts, progress, stop, trio.from_thread.run)
        finally:
            finished.set()

    try:
        results = await trio.to_thread.run_sync(work, abandon_on_cancel=True)
    except KeyboardInterrupt:
        # let the bench thread remove its files before the command exits
        stop.set()
        await trio.to_thread.run_sync(finished.wait)
        progress.clear()
        raise
    except Interrupted:
        raise KeyboardInterrupt from None
    finally:
        progress.clear()
    target, figures = results[0]
    report = report_json(opts, target, figures, results[1] if len(results) > 1 else None)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(report_table(report))
    return 0
