"""The face of the native code: chunker parameters, cutting file data into blocks
and naming them, and a throughput measurement of those hot paths."""

from __future__ import annotations

import itertools
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from cloudfs import _native

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer from Python 3.12

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

#: below this the gear fingerprint window (64 bytes) would span chunk starts and
#: per-block overhead (metadata row, object) would dwarf the data
MIN_CHUNK_FLOOR = 64
#: blocks are read and written whole; bigger ones would stall reads and memory
MAX_CHUNK_CEILING = 1 * GiB


@dataclass(frozen=True)
class ChunkerParams:
    """FastCDC sizes of one filesystem, fixed at mkfs and kept in the superblock.

    ValueError on sizes the native chunker cannot use; config.check_chunker sets
    the stricter floor a new filesystem must meet.
    """

    min_size: int = 256 * KiB
    avg_size: int = 1 * MiB
    max_size: int = 4 * MiB

    def __post_init__(self) -> None:
        sizes = (self.min_size, self.avg_size, self.max_size)
        if not all(type(s) is int for s in sizes):
            raise ValueError(f"chunk sizes must be integers, not {sizes!r}")
        if not MIN_CHUNK_FLOOR <= self.min_size <= self.avg_size <= self.max_size:
            raise ValueError(
                f"chunk sizes must satisfy {MIN_CHUNK_FLOOR} <= min <= avg <= max "
                f"(got {self.min_size}/{self.avg_size}/{self.max_size})"
            )
        if self.max_size > MAX_CHUNK_CEILING:
            raise ValueError(f"maximum chunk size must be at most {MAX_CHUNK_CEILING} bytes")

    def to_dict(self) -> dict[str, int]:
        """The superblock's `chunker` object."""
        return {"min": self.min_size, "avg": self.avg_size, "max": self.max_size}

    @classmethod
    def from_dict(cls, d: Mapping[str, int]) -> ChunkerParams:
        return cls(int(d["min"]), int(d["avg"]), int(d["max"]))


DEFAULT_PARAMS = ChunkerParams()


class Chunk(NamedTuple):
    """One content-defined piece of a byte range: where it lies and its block id."""

    offset: int
    length: int
    block_id: bytes


def new_chunker(gear_key: bytes, params: ChunkerParams) -> _native.Chunker:
    """A streaming chunker: feed() buffers in order, finish() at the end of data."""
    return _native.Chunker(gear_key, params.min_size, params.avg_size, params.max_size)


def chunk_lengths(gear_key: bytes, params: ChunkerParams, data: Buffer) -> list[int]:
    """Lengths of the chunks of data, the trailing partial chunk included."""
    return _native.chunk_lengths(gear_key, params.min_size, params.avg_size, params.max_size, data)


def chunk_data(
    gear_key: bytes, id_key: bytes, params: ChunkerParams, data: Buffer, base_offset: int = 0
) -> list[Chunk]:
    """Cut data into chunks and name each by its block id; offsets start at base_offset."""
    lengths = chunk_lengths(gear_key, params, data)
    ids = _native.block_ids(id_key, data, lengths)
    chunks = []
    offset = base_offset
    for length, block_id in zip(lengths, ids, strict=True):
        chunks.append(Chunk(offset, length, block_id))
        offset += length
    return chunks


# --- throughput measurement (`cloudfs bench`) ---------------------------------------


class Throughput(NamedTuple):
    """One measured hot path on one kind of data, on one core."""

    operation: str
    data_kind: str
    nbytes: int
    seconds: float

    @property
    def mib_per_s(self) -> float:
        return self.nbytes / MiB / self.seconds if self.seconds > 0 else float("inf")


def random_data(size: int) -> bytes:
    """Incompressible data: the worst case for zstd, the usual case for media."""
    return os.urandom(size)


def text_data(size: int, seed: int = 0) -> bytes:
    """Word soup shaped like source code or prose (zstd shrinks it ~3x).

    A 16 MiB unique stretch is repeated: the repeats are farther apart than
    zstd's level-3 window, so the ratio stays that of unique text, and building
    256 MiB of it does not take longer than measuring it.
    """
    rng = random.Random(seed)
    vocab = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(2, 12)))
        for _ in range(5000)
    ]
    seps = [" ", " ", " ", ", ", ".\n", "(", ") ", " = ", "\n    "]
    unique = min(size, 16 * MiB)
    parts: list[str] = []
    n = 0
    while n < unique:
        words = rng.choices(vocab, k=4096)
        line = "".join(w + rng.choice(seps) for w in words)
        parts.append(line)
        n += len(line)
    stretch = "".join(parts).encode()[:unique]
    reps = -(-size // len(stretch))
    return (stretch * reps)[:size]


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_throughput(
    size: int = 256 * MiB,
    *,
    params: ChunkerParams = DEFAULT_PARAMS,
    level: int = 3,
    kinds: tuple[str, ...] = ("random", "text"),
) -> list[Throughput]:
    """Single-core speed of chunking, block ids, chunk+id and zstd over `size`
    bytes of each kind of data.  Runs in the calling thread only."""
    results: list[Throughput] = []
    for kind in kinds:
        data = random_data(size) if kind == "random" else text_data(size)
        results += _measure_data(kind, data, params, level)
    return results


def _measure_data(kind: str, data: bytes, params: ChunkerParams, level: int) -> list[Throughput]:
    gear_key = bytes(range(32))
    id_key = bytes(range(32, 64))
    size = len(data)
    start = time.perf_counter()
    lengths = chunk_lengths(gear_key, params, data)
    t_cut = time.perf_counter() - start
    t_ids = _timed(lambda: _native.block_ids(id_key, data, lengths))
    t_both = _timed(lambda: chunk_data(gear_key, id_key, params, data))
    # zstd works block by block, as the daemon does.
    view = memoryview(data)
    offsets = [0, *itertools.accumulate(lengths)]
    pieces = [view[a:b] for a, b in itertools.pairwise(offsets)]
    start = time.perf_counter()
    frames = [_native.compress(p, level) for p in pieces]
    t_zstd = time.perf_counter() - start
    # Decompression is measured on the blocks zstd shrank (the others are stored
    # raw), in plaintext bytes produced.
    shrunk = [(f, len(p)) for p, f in zip(pieces, frames, strict=True) if f is not None]
    t_unzstd = _timed(lambda: [_native.decompress(f, params.max_size) for f, _ in shrunk])
    results = [
        Throughput("chunk", kind, size, t_cut),
        Throughput("block_id", kind, size, t_ids),
        Throughput("chunk+block_id", kind, size, t_both),
        Throughput(f"zstd-{level} compress", kind, size, t_zstd),
    ]
    if shrunk:
        results.append(Throughput("zstd decompress", kind, sum(n for _, n in shrunk), t_unzstd))
    return results
