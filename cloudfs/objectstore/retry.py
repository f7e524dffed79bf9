"""RetryStore: repeat a store's calls that failed for a passing reason.

A call is retried only when the inner store's `is_temp_failure(exc)` says so; any other
error passes through at once. Waits grow exponentially with "full jitter" (a uniform
random wait between 0 and the exponential bound), so many clients that failed together
do not retry together. Every ObjectStore call is idempotent (put replaces, delete of a
missing key is fine), so repeating one is safe.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import trio

from cloudfs.objectstore.base import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class RetryStore(ObjectStore):
    """Wraps `inner`; each call makes at most `attempts` tries. The wait before try n+1
    is uniform in [0, min(max_delay, base_delay * 2**(n-1))] seconds. Each retry is
    logged at `log_level`."""

    def __init__(
        self,
        inner: ObjectStore,
        attempts: int = 8,
        base_delay: float = 0.2,
        max_delay: float = 30.0,
        *,
        rng: random.Random | None = None,
        log_level: int = logging.WARNING,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be >= 1")
        self.inner = inner
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.url = inner.url
        self._rng = rng or random.Random()
        # command-line tools retry quietly (their stderr is for the one line that
        # says what failed); the daemon logs every retry
        self.log_level = log_level

    def delay(self, retry: int) -> float:
        """The wait before retry number `retry` (0 = the first retry)."""
        bound = min(self.max_delay, self.base_delay * 2**retry)
        return self._rng.uniform(0, bound)

    async def _call(self, what: str, fn: Callable[[], Awaitable[_T]]) -> _T:
        for retry in range(self.attempts):
            try:
                return await fn()
            except Exception as exc:
                if retry == self.attempts - 1 or not self.inner.is_temp_failure(exc):
                    raise
                wait = self.delay(retry)
                log.log(
                    self.log_level,
                    "%s on %s failed (%s), retry %d/%d in %.2fs",
                    what,
                    self.url,
                    exc,
                    retry + 1,
                    self.attempts - 1,
                    wait,
                )
                await trio.sleep(wait)
        raise AssertionError("unreachable")

    async def get(self, key: str) -> bytes:
        return await self._call(f"get {key}", lambda: self.inner.get(key))

    async def get_into(self, key: str, buffer: bytearray) -> memoryview:
        return await self._call(f"get {key}", lambda: self.inner.get_into(key, buffer))

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        return await self._call(f"get {key}", lambda: self.inner.get_range(key, start, length))

    async def put(self, key: str, data: bytes) -> None:
        await self._call(f"put {key}", lambda: self.inner.put(key, data))

    async def head(self, key: str) -> ObjectInfo | None:
        return await self._call(f"head {key}", lambda: self.inner.head(key))

    async def delete_many(self, keys: Sequence[str]) -> None:
        await self._call(f"delete of {len(keys)} keys", lambda: self.inner.delete_many(keys))

    async def list(
        self, prefix: str = "", start_after: str = "", limit: int = 1000
    ) -> list[ObjectInfo]:
        return await self._call(
            f"list {prefix!r}", lambda: self.inner.list(prefix, start_after, limit)
        )

    # A conditional write that succeeded but whose answer was lost returns False when
    # retried (the object is no longer as expected): callers read the object back to
    # tell that from losing a race (cloudfs.lease does).

    @property
    def conditional_writes(self) -> bool:  # type: ignore[override]
        return self.inner.conditional_writes

    async def put_new(self, key: str, data: bytes) -> bool:
        return await self._call(f"put {key}", lambda: self.inner.put_new(key, data))

    async def replace_if(self, key: str, data: bytes, expected: bytes) -> bool:
        return await self._call(f"put {key}", lambda: self.inner.replace_if(key, data, expected))

    async def delete_if(self, key: str, expected: bytes) -> bool:
        return await self._call(f"delete {key}", lambda: self.inner.delete_if(key, expected))

    def is_temp_failure(self, exc: BaseException) -> bool:
        return self.inner.is_temp_failure(exc)

    async def aclose(self) -> None:
        await self.inner.aclose()
