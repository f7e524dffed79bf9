"""PrefixStore: a view of another store in which every key lives under a fixed prefix,
so several filesystems (or a filesystem and other data) can share one bucket."""

from __future__ import annotations

from collections.abc import Sequence

from cloudfs.objectstore.base import ObjectInfo, ObjectStore, check_key


class PrefixStore(ObjectStore):
    """Key k of this store is key `prefix + k` of `inner`. The prefix normally ends in
    '/' ("fs1/"); it must not start with '/'."""

    def __init__(self, inner: ObjectStore, prefix: str) -> None:
        if not prefix or prefix.startswith("/"):
            raise ValueError(f"invalid key prefix {prefix!r}")
        self.inner = inner
        self.prefix = prefix
        self.url = f"{inner.url.rstrip('/')}/{prefix}"

    def _key(self, key: str) -> str:
        # Validate the key alone too: "../x" must not climb out of the prefix.
        return self.prefix + check_key(key)

    async def get(self, key: str) -> bytes:
        return await self.inner.get(self._key(key))

    async def get_into(self, key: str, buffer: bytearray) -> memoryview:
        return await self.inner.get_into(self._key(key), buffer)

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        return await self.inner.get_range(self._key(key), start, length)

    async def put(self, key: str, data: bytes) -> None:
        await self.inner.put(self._key(key), data)

    async def head(self, key: str) -> ObjectInfo | None:
        info = await self.inner.head(self._key(key))
        return None if info is None else ObjectInfo(key, info.size)

    async def delete_many(self, keys: Sequence[str]) -> None:
        await self.inner.delete_many([self._key(key) for key in keys])

    async def list(
        self, prefix: str = "", start_after: str = "", limit: int = 1000
    ) -> list[ObjectInfo]:
        page = await self.inner.list(
            self.prefix + prefix, self.prefix + start_after if start_after else "", limit
        )
        n = len(self.prefix)
        return [ObjectInfo(info.key[n:], info.size) for info in page]

    @property
    def conditional_writes(self) -> bool:  # type: ignore[override]
        return self.inner.conditional_writes

    async def put_new(self, key: str, data: bytes) -> bool:
        return await self.inner.put_new(self._key(key), data)

    async def replace_if(self, key: str, data: bytes, expected: bytes) -> bool:
        return await self.inner.replace_if(self._key(key), data, expected)

    async def delete_if(self, key: str, expected: bytes) -> bool:
        return await self.inner.delete_if(self._key(key), expected)

    def is_temp_failure(self, exc: BaseException) -> bool:
        return self.inner.is_temp_failure(exc)

    async def aclose(self) -> None:
        await self.inner.aclose()
