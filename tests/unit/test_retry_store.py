"""RetryStore: retries what the inner store calls a temporary failure, with bounded,
jittered exponential waits, and passes every other error through at once."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
import trio
import trio.testing

from cloudfs.errors import ObjectNotFound, StorePermanentError
from cloudfs.objectstore.base import ObjectInfo, ObjectStore
from cloudfs.objectstore.retry import RetryStore


class Flaky(Exception):
    """A failure the fake store calls temporary."""


class FakeStore(ObjectStore):
    """Fails the next `failures` calls with `error`, then answers."""

    url = "fake://"

    def __init__(self, failures: int = 0, error: Exception | None = None) -> None:
        self.failures = failures
        self.error = error or Flaky("503 slow down")
        self.calls = 0
        self.objects: dict[str, bytes] = {}

    def _maybe_fail(self) -> None:
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            raise self.error

    async def get(self, key: str) -> bytes:
        self._maybe_fail()
        try:
            return self.objects[key]
        except KeyError:
            raise ObjectNotFound(key) from None

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        return (await self.get(key))[start : start + length]

    async def put(self, key: str, data: bytes) -> None:
        self._maybe_fail()
        self.objects[key] = data

    async def head(self, key: str) -> ObjectInfo | None:
        self._maybe_fail()
        return ObjectInfo(key, len(self.objects[key])) if key in self.objects else None

    async def delete_many(self, keys: Sequence[str]) -> None:
        self._maybe_fail()
        for key in keys:
            self.objects.pop(key, None)

    async def list(
        self, prefix: str = "", start_after: str = "", limit: int = 1000
    ) -> list[ObjectInfo]:
        self._maybe_fail()
        keys = sorted(k for k in self.objects if k.startswith(prefix) and k > start_after)
        return [ObjectInfo(k, len(self.objects[k])) for k in keys[:limit]]

    def is_temp_failure(self, exc: BaseException) -> bool:
        return isinstance(exc, Flaky)


def run(fn, *args):  # type: ignore[no-untyped-def]
    """trio.run with a clock that skips sleeps, so backoff costs no wall time."""
    return trio.run(fn, *args, clock=trio.testing.MockClock(autojump_threshold=0))


def test_temporary_failures_are_retried() -> None:
    inner = FakeStore(failures=3)
    store = RetryStore(inner, attempts=5, base_delay=1.0, max_delay=100.0)

    async def main() -> float:
        await store.put("k", b"v")
        return trio.current_time()

    elapsed = run(main)
    assert inner.calls == 4 and inner.objects == {"k": b"v"}
    assert 0 <= elapsed <= 1.0 + 2.0 + 4.0  # waits bounded by base_delay * 2**n


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.get("k"),
        lambda s: s.get_range("k", 0, 1),
        lambda s: s.head("k"),
        lambda s: s.delete_many(["k"]),
        lambda s: s.list(),
    ],
)
def test_every_call_is_retried(call) -> None:  # type: ignore[no-untyped-def]
    inner = FakeStore(failures=2)
    inner.objects["k"] = b"v"
    run(call, RetryStore(inner, attempts=3))
    assert inner.calls == 3


def test_permanent_errors_pass_at_once() -> None:
    inner = FakeStore(failures=5, error=StorePermanentError("403 forbidden"))
    store = RetryStore(inner, attempts=5)
    with pytest.raises(StorePermanentError):
        run(store.put, "k", b"v")
    assert inner.calls == 1

    inner = FakeStore()
    with pytest.raises(ObjectNotFound):
        run(RetryStore(inner, attempts=5).get, "missing")
    assert inner.calls == 1


def test_attempts_are_bounded() -> None:
    inner = FakeStore(failures=100)
    store = RetryStore(inner, attempts=4, base_delay=0.5)
    with pytest.raises(Flaky):
        run(store.get, "k")
    assert inner.calls == 4


def test_backoff_is_exponential_with_full_jitter() -> None:
    store = RetryStore(FakeStore(), base_delay=0.25, max_delay=3.0, rng=random.Random(7))
    for retry in range(8):
        bound = min(3.0, 0.25 * 2**retry)
        waits = [store.delay(retry) for _ in range(200)]
        assert all(0 <= w <= bound for w in waits)
        # full jitter: spread over the whole range, not clustered at the bound
        assert min(waits) < bound * 0.2 and max(waits) > bound * 0.8


def test_wrapper_delegates() -> None:
    inner = FakeStore()
    store = RetryStore(inner)
    assert store.url == inner.url
    assert store.is_temp_failure(Flaky()) and not store.is_temp_failure(ValueError())
    with pytest.raises(ValueError):
        RetryStore(inner, attempts=0)
