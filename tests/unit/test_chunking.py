"""cloudfs.chunking: chunker parameters, chunk+id helpers and the throughput probe."""

from __future__ import annotations

import hashlib
import hmac
import os

import pytest

from cloudfs import _native
from cloudfs.chunking import (
    DEFAULT_PARAMS,
    Chunk,
    ChunkerParams,
    chunk_data,
    chunk_lengths,
    measure_throughput,
    new_chunker,
    text_data,
)

GEAR_KEY = b"g" * 32
ID_KEY = b"i" * 32
SMALL = ChunkerParams(64, 256, 1024)


def test_defaults_and_superblock_form() -> None:
    assert DEFAULT_PARAMS == ChunkerParams(256 * 1024, 1024 * 1024, 4 * 1024 * 1024)
    assert ChunkerParams.from_dict(SMALL.to_dict()) == SMALL
    assert SMALL.to_dict() == {"min": 64, "avg": 256, "max": 1024}


@pytest.mark.parametrize(
    "sizes",
    [(63, 256, 1024), (300, 256, 1024), (64, 2048, 1024), (64, 256, 2**30 + 1), (64.0, 256, 1024)],
)
def test_bad_params_are_refused(sizes: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError):
        ChunkerParams(*sizes)


def test_chunk_data_names_consecutive_chunks() -> None:
    data = os.urandom(50_000)
    chunks = chunk_data(GEAR_KEY, ID_KEY, SMALL, data, base_offset=4096)
    assert [c.length for c in chunks] == chunk_lengths(GEAR_KEY, SMALL, data)
    offset = 4096
    for chunk in chunks:
        assert isinstance(chunk, Chunk)
        assert chunk.offset == offset
        piece = data[offset - 4096 : offset - 4096 + chunk.length]
        assert chunk.block_id == hmac.new(ID_KEY, piece, hashlib.sha256).digest()
        offset += chunk.length
    assert offset - 4096 == len(data)


def test_new_chunker_streams_like_one_shot() -> None:
    data = os.urandom(30_000)
    chunker = new_chunker(GEAR_KEY, SMALL)
    lengths = chunker.feed(data[:12_345]) + chunker.feed(data[12_345:])
    tail = chunker.finish()
    lengths += [tail] if tail else []
    assert lengths == _native.chunk_lengths(GEAR_KEY, 64, 256, 1024, data)


def test_text_data_is_compressible_text() -> None:
    text = text_data(1 << 20)
    assert len(text) == 1 << 20
    frame = _native.compress(text)
    assert frame is not None and len(frame) < len(text) // 2


def test_measure_throughput_reports_every_path() -> None:
    results = measure_throughput(2 << 20)
    ops = {(r.operation, r.data_kind) for r in results}
    for kind in ("random", "text"):
        for op in ("chunk", "block_id", "chunk+block_id", "zstd-3 compress"):
            assert (op, kind) in ops
    assert ("zstd decompress", "text") in ops
    assert all(r.mib_per_s > 0 for r in results)
