"""Dirty overlays: bytes written to a file but not sealed into blocks yet.

An overlay is a sparse file in the cache dir plus the set of byte ranges written to it.
Reads of a dirty file take these ranges from the overlay and the rest from the blocks.
An overlay lives only as long as the mount: unsealed bytes were never acknowledged by
fsync, so a crash may drop them (POSIX allows that), and a new mount clears the folder.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator
from pathlib import Path


class Intervals:
    """A set of disjoint, non-adjacent half-open ranges [start, end), kept sorted."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(zip(self._starts, self._ends))

    def __repr__(self) -> str:
        return f"Intervals({list(self)})"

    @property
    def total(self) -> int:
        return sum(e - s for s, e in self)

    @property
    def first(self) -> int:
        return self._starts[0]

    @property
    def last(self) -> int:
        return self._ends[-1]

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        # ranges that overlap or touch [start, end) merge with it
        i = bisect.bisect_left(self._ends, start)
        j = bisect.bisect_right(self._starts, end)
        if i < j:
            start = min(start, self._starts[i])
            end = max(end, self._ends[j - 1])
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]

    def remove_from(self, offset: int) -> None:
        """Drop everything at or past `offset`."""
        i = bisect.bisect_left(self._ends, offset + 1)
        del self._starts[i + 1 :], self._ends[i + 1 :]
        if i < len(self._starts):
            if self._starts[i] >= offset:
                del self._starts[i], self._ends[i]
            else:
                self._ends[i] = offset

    def overlapping(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """The parts of the set inside [start, end), in order."""
        i = bisect.bisect_right(self._ends, start)
        while i < len(self._starts) and self._starts[i] < end:
            yield max(self._starts[i], start), min(self._ends[i], end)
            i += 1


class DirtyOverlay:
    """The unsealed writes of one inode (blocking file I/O: it is page-cache speed)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.ranges = Intervals()

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        pos = offset
        while view:
            n = os.pwrite(self.fd, view, pos)
            view = view[n:]
            pos += n
        self.ranges.add(offset, offset + len(data))

    def read_into(self, buf: bytearray | memoryview, start: int, end: int) -> None:
        """Copy the dirty bytes within [start, end) into buf (buf[0] is byte `start`)."""
        out = memoryview(buf)
        for s, e in self.ranges.overlapping(start, end):
            n = os.preadv(self.fd, [out[s - start : e - start]], s)
            if n != e - s:
                raise OSError(f"short read from dirty overlay {self.path}")

    def truncate(self, size: int) -> None:
        self.ranges.remove_from(size)
        os.ftruncate(self.fd, size)

    def keep_from(self, offset: int) -> None:
        """Forget everything below `offset` (it was sealed); keep what lies past it.

        The kept part is small (the unsealed tail of an append), so it is copied to the
        front of a fresh file rather than punched out of the old one."""
        kept = list(self.ranges.overlapping(offset, 1 << 63))
        saved = [(s, os.pread(self.fd, e - s, s)) for s, e in kept]
        os.ftruncate(self.fd, 0)
        self.ranges = Intervals()
        for s, data in saved:
            self.write(s, data)

    def clear(self) -> None:
        self.ranges = Intervals()
        os.ftruncate(self.fd, 0)

    def close(self) -> None:
        os.close(self.fd)
        self.path.unlink(missing_ok=True)
