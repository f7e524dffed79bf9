"""Type stub of cloudfs._native (native/_native.pyx): FastCDC chunking,
HMAC-SHA256 block ids, zstd and zero detection, GIL released in every loop."""

from collections.abc import Iterable

from typing_extensions import Buffer

# Every key is 32 bytes (ValueError otherwise); data is any contiguous buffer.

class Chunker:
    """Streaming FastCDC chunker; keeps only the rolling state, never the data."""

    def __init__(self, gear_key: bytes, min_size: int, avg_size: int, max_size: int) -> None: ...
    def feed(self, data: Buffer) -> list[int]:
        """Lengths of the chunks completed by this call."""
    def finish(self) -> int:
        """Length of the trailing partial chunk (0 if none); resets the chunker."""
    def reset(self) -> None: ...

def chunk_lengths(
    gear_key: bytes, min_size: int, avg_size: int, max_size: int, data: Buffer
) -> list[int]:
    """All chunk lengths of data, trailing partial chunk included (sum == len(data))."""

def gear_table(gear_key: bytes) -> list[int]:
    """The 256 uint64 gear values derived from gear_key."""

def block_id(id_key: bytes, data: Buffer) -> bytes:
    """HMAC-SHA256(id_key, data), 32 bytes."""

def block_ids(id_key: bytes, data: Buffer, lengths: Iterable[int]) -> list[bytes]:
    """Ids of consecutive chunks of data; ValueError if the lengths exceed data."""

def compress(data: Buffer, level: int = 3) -> bytes | None:
    """One zstd frame, or None when it would not be smaller than data."""

def decompress(data: Buffer, max_size: int) -> bytes:
    """ValueError on corrupt data or output larger than max_size."""

def is_zero(data: Buffer) -> bool: ...
