"""The ObjectStore interface every backend implements (local directory, S3, and the
wrappers that add retries or a key prefix), and the key rules they all share.

Contract (checked by tests/contract/test_objectstore.py for every store):
- keys are non-empty '/'-separated strings with no empty, "." or ".." component, no
  leading or trailing '/', and no NUL; anything else raises ValueError;
- put is atomic: a reader sees the old object or the new one, never a mix or a prefix;
- get of a missing key raises ObjectNotFound, head of one returns None, and
  delete_many ignores missing keys;
- get_range returns the bytes [start, start + length) clipped to the object's end
  (b"" when start is at or past the end);
- list returns one page of at most `limit` objects, sorted by key, whose keys start with
  `prefix` and sort strictly after `start_after`; a page may be shorter than `limit`
  before the end (S3 allows that), only an empty page means the end; key order is
  code point order, which equals S3's UTF-8 byte order;
- conditional writes (put_new, replace_if, delete_if) change the object only when it is
  as the caller expects, and say whether they did; they are atomic against each other
  when `conditional_writes` is True (a local store locks; S3 has If-None-Match and
  If-Match), else a check followed by a write, which two racing writers can both pass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from cloudfs.errors import ObjectNotFound


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object as a listing or head reports it."""

    key: str
    size: int


def check_key(key: str) -> str:
    """`key` if it is a valid object key, else ValueError (see the module docstring).
    Every store applies the same rule so that a key works on all of them."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"invalid object key {key!r}: empty")
    if "\0" in key:
        raise ValueError(f"invalid object key {key!r}: contains NUL")
    if key.startswith("/"):
        raise ValueError(f"invalid object key {key!r}: absolute")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"invalid object key {key!r}: empty, '.' or '..' component")
    return key


class ObjectStore(ABC):
    """An async key → bytes store (trio)."""

    #: where the store is, for messages and logs; never contains credentials
    url: str

    @abstractmethod
    async def get(self, key: str) -> bytes:
        """The whole object; ObjectNotFound if there is none."""

    async def get_into(self, key: str, buffer: bytearray) -> memoryview:
        """The whole object, as `get`, read into `buffer` where the store can do so
        (the returned view then points into `buffer`; else it is a view of a new bytes
        object, also when the object does not fit). A reader that fetches many objects
        reuses one buffer: a fresh 1 MiB bytes object costs its page faults (~0.5 CPU s
        per GiB) on top of the copy."""
        return memoryview(await self.get(key))

    @abstractmethod
    async def get_range(self, key: str, start: int, length: int) -> bytes:
        """Bytes [start, start + length) of the object, clipped to its end;
        ObjectNotFound if there is none."""

    @abstractmethod
    async def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key`, replacing any old object atomically."""

    @abstractmethod
    async def head(self, key: str) -> ObjectInfo | None:
        """Size of the object, or None if there is none."""

    @abstractmethod
    async def delete_many(self, keys: Sequence[str]) -> None:
        """Delete the objects; keys that do not exist are not an error."""

    @abstractmethod
    async def list(
        self, prefix: str = "", start_after: str = "", limit: int = 1000
    ) -> list[ObjectInfo]:
        """One page of objects, sorted by key (see the module docstring)."""

    #: True when put_new, replace_if and delete_if are atomic (see the module docstring)
    conditional_writes: bool = False

    async def put_new(self, key: str, data: bytes) -> bool:
        """Create the object only if there is none under `key`; False if there is.
        This fallback checks, then writes: not atomic (`conditional_writes`)."""
        if await self.head(key) is not None:
            return False
        await self.put(key, data)
        return True

    async def replace_if(self, key: str, data: bytes, expected: bytes) -> bool:
        """Replace the object only if it holds exactly `expected`; False if it does not
        (or is gone). This fallback reads, then writes: not atomic."""
        try:
            current = await self.get(key)
        except ObjectNotFound:
            return False
        if current != expected:
            return False
        await self.put(key, data)
        return True

    async def delete_if(self, key: str, expected: bytes) -> bool:
        """Delete the object only if it holds exactly `expected`; False if it does not
        (or is gone). This fallback reads, then deletes: not atomic."""
        try:
            current = await self.get(key)
        except ObjectNotFound:
            return False
        if current != expected:
            return False
        await self.delete_many([key])
        return True

    def is_temp_failure(self, exc: BaseException) -> bool:
        """True when `exc`, raised by this store, may succeed if the call is repeated
        (timeouts, throttling, 5xx); RetryStore retries only those."""
        return False

    async def aclose(self) -> None:
        """Release connections and threads; the store is unusable afterwards."""

    async def list_all(self, prefix: str = "", page_size: int = 1000) -> AsyncIterator[ObjectInfo]:
        """Every object under `prefix`, in key order, one page at a time."""
        start_after = ""
        while True:
            page = await self.list(prefix, start_after, page_size)
            if not page:
                return
            for info in page:
                yield info
            start_after = page[-1].key

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"
