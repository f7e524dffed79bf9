"""Kernel lookup counts, kept in a few bytes per inode.

The kernel takes a lookup reference on an inode with every entry reply (lookup,
create, mkdir, link, and every entry of a readdirplus listing) and gives them back
with FORGET. A mount must count them: an inode without a name lives on until the
kernel forgets it. A listing of a large directory hands out one reference per entry,
so the count must cost next to nothing per inode; a dict of Python ints costs about
100 bytes an entry.

Inode numbers come from one sequence, so the entries of a directory filled in one go
have runs of neighbouring numbers. The counts live in pages of 64 inodes, one byte
each; a count above 254 keeps 255 in its byte and the rest in a small dict (the
kernel rarely holds more than a handful of references on one inode). A page whose
counts are all 0 is dropped, so the memory follows what the kernel knows now.
"""

from __future__ import annotations

from collections.abc import Iterator

PAGE_BITS = 6
PAGE = 1 << PAGE_BITS
_MASK = PAGE - 1
#: a byte at this value holds the first 255 references; the rest are in `_over`
_FULL = 255
_EMPTY = bytes(PAGE)
#: emptied pages kept for reuse (at most this many: 64 KiB a thousand), so that the
#: kernel forgetting a directory and learning it again does not churn the allocator
SPARE_PAGES = 4096


class LookupCounts:
    __slots__ = ("_pages", "_over", "_spare")

    def __init__(self) -> None:
        self._pages: dict[int, bytearray] = {}
        self._over: dict[int, int] = {}
        self._spare: list[bytearray] = []

    def get(self, ino: int) -> int:
        page = self._pages.get(ino >> PAGE_BITS)
        if page is None:
            return 0
        count = page[ino & _MASK]
        if count == _FULL:
            count += self._over.get(ino, 0)
        return count

    def __contains__(self, ino: object) -> bool:
        return isinstance(ino, int) and self.get(ino) > 0

    def add(self, ino: int, n: int = 1) -> int:
        """The kernel took `n` more references on `ino`; returns its count now."""
        page = self._pages.get(ino >> PAGE_BITS)
        if page is None:
            page = self._spare.pop() if self._spare else bytearray(PAGE)
            self._pages[ino >> PAGE_BITS] = page
        count = page[ino & _MASK] + n
        if count < _FULL:  # the usual case: one byte holds it
            page[ino & _MASK] = count
            return count
        if page[ino & _MASK] == _FULL:
            count += self._over.get(ino, 0)
        self._set(page, ino, count)
        return count

    def forget(self, ino: int, n: int) -> int:
        """The kernel gave `n` references on `ino` back; returns how many it still has
        (0: it has forgotten the inode)."""
        page = self._pages.get(ino >> PAGE_BITS)
        if page is None:
            return 0
        count = max(self.get(ino) - n, 0)
        self._set(page, ino, count)
        if count == 0 and page == _EMPTY:
            del self._pages[ino >> PAGE_BITS]
            if len(self._spare) < SPARE_PAGES:
                self._spare.append(page)
        return count

    def _set(self, page: bytearray, ino: int, count: int) -> None:
        if count >= _FULL:
            page[ino & _MASK] = _FULL
            if count > _FULL:
                self._over[ino] = count - _FULL
            else:
                self._over.pop(ino, None)
        else:
            if page[ino & _MASK] == _FULL:
                self._over.pop(ino, None)
            page[ino & _MASK] = count

    def __iter__(self) -> Iterator[int]:
        """The inodes the kernel holds references on, in order."""
        for base in sorted(self._pages):
            page = self._pages[base]
            for i, count in enumerate(page):
                if count:
                    yield (base << PAGE_BITS) | i

    def __len__(self) -> int:
        return sum(PAGE - page.count(0) for page in self._pages.values())

    def clear(self) -> None:
        self._pages.clear()
        self._over.clear()
        self._spare.clear()
