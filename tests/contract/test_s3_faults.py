"""S3 through a faulty network (tests/faultproxy.py between boto3 and moto): every fault
the proxy injects reaches the caller of S3Store as a temporary failure, never as wrong
data; and RetryStore over S3Store turns a network that fails a quarter of all requests
into one on which every operation succeeds with the right bytes."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import trio
from botocore.exceptions import ClientError
from faultproxy import FAULTS, FaultProxy, FaultRates
from s3util import Bucket

from cloudfs.errors import ObjectNotFound, StoreTemporaryError
from cloudfs.objectstore.base import ObjectInfo
from cloudfs.objectstore.retry import RetryStore
from cloudfs.objectstore.s3 import S3Store

KiB = 1024
MiB = 1024 * KiB


def _proxy(bucket: Bucket, rates: FaultRates, seed: int) -> FaultProxy:
    upstream = urlsplit(bucket.endpoint)
    assert upstream.hostname and upstream.port
    return FaultProxy(upstream.hostname, upstream.port, rates, seed=seed)


@pytest.fixture
def only_fault(request: pytest.FixtureRequest, s3_bucket: Bucket) -> Iterator[FaultProxy]:
    """A proxy that injects the fault named by the test's parameter into every request."""
    rates = FaultRates(
        internal_error=float(request.param == "500"),
        slow_down=float(request.param == "503"),
        cut_request=float(request.param == "cut_request"),
        cut_response=float(request.param == "cut_response"),
    )
    with _proxy(s3_bucket, rates, seed=7) as proxy:
        yield proxy


@pytest.mark.parametrize("only_fault", FAULTS, indirect=True)
async def test_every_fault_is_a_temporary_failure(
    only_fault: FaultProxy, s3_bucket: Bucket
) -> None:
    data = os.urandom(300 * KiB)
    s3_bucket.write("obj", data)
    store = S3Store(s3_bucket.name, endpoint_url=only_fault.endpoint)
    # A request the server carried out may count as done when only the end of its
    # answer was cut (nothing the client needed was lost); reads never may.
    carried_out = only_fault.rates.cut_response == 1.0
    try:
        for _attempt in range(8):  # cut points and timing differ between attempts
            for name, call in [
                ("get", lambda: store.get("obj")),
                ("get_range", lambda: store.get_range("obj", 1000, 100 * KiB)),
                ("list", lambda: store.list()),
                ("put", lambda: store.put("new", data)),
                ("head", lambda: store.head("obj")),
                ("delete", lambda: store.delete_many(["obj-other"])),
            ]:
                try:
                    result = await call()
                except StoreTemporaryError as exc:
                    assert store.is_temp_failure(exc)
                    continue
                assert carried_out and name in ("put", "head", "delete"), (
                    f"{name} succeeded through fault {only_fault.counts}: {result!r:.100}"
                )
                if name == "head":
                    assert result == ObjectInfo("obj", len(data))
    finally:
        await store.aclose()
    assert only_fault.counts["forwarded"] == 0
    # the object is untouched, and a cut answer never made an object of its own
    assert s3_bucket.read("obj") == data
    if carried_out:
        assert s3_bucket.objects() == {"obj": len(data), "new": len(data)}
        assert s3_bucket.read("new") == data
    else:
        assert s3_bucket.objects() == {"obj": len(data)}


def _objects(rng: random.Random) -> dict[str, bytes]:
    sizes = [0, 1, 1000, 64 * KiB, 300 * KiB, MiB + 7, 4 * MiB] + [
        rng.randrange(1, 2 * MiB) for _ in range(33)
    ]
    return {f"blocks/{i % 7:02x}/obj-{i:03d}": rng.randbytes(size) for i, size in enumerate(sizes)}


async def test_retry_store_over_a_faulty_network(s3_bucket: Bucket) -> None:
    rng = random.Random(2024)
    objects = _objects(rng)
    with _proxy(s3_bucket, FaultRates.uniform(0.06, max_delay_s=0.2), seed=11) as proxy:
        store = RetryStore(
            S3Store(s3_bucket.name, endpoint_url=proxy.endpoint),
            attempts=12,
            base_delay=0.01,
            max_delay=0.2,
        )
        try:
            send, receive = trio.open_memory_channel[str](len(objects))
            for key in objects:
                send.send_nowait(key)
            send.close()

            async def putter() -> None:
                async for key in receive:
                    await store.put(key, objects[key])

            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(putter)

            for key, data in objects.items():
                assert await store.get(key) == data, key
                assert await store.head(key) == ObjectInfo(key, len(data))
                if data:
                    start = rng.randrange(len(data))
                    assert await store.get_range(key, start, 5000) == data[start : start + 5000]

            listed = [info async for info in store.list_all(page_size=7)]
            assert listed == [ObjectInfo(k, len(objects[k])) for k in sorted(objects)]
            assert [i.key for i in await store.list("blocks/03/")] == sorted(
                k for k in objects if k.startswith("blocks/03/")
            )

            gone = sorted(objects)[::2]
            await store.delete_many([*gone, "blocks/never/existed"])
            for key in gone:
                with pytest.raises(ObjectNotFound):
                    await store.get(key)
                del objects[key]
            listed = [info async for info in store.list_all(page_size=5)]
            assert listed == [ObjectInfo(k, len(objects[k])) for k in sorted(objects)]
        finally:
            await store.aclose()

    # what the server holds, looked at without the proxy
    assert s3_bucket.objects() == {key: len(data) for key, data in objects.items()}
    for key, data in objects.items():
        assert s3_bucket.read(key) == data
    # the network really was bad: every kind of fault happened, many times
    for fault in (*FAULTS, "delay"):
        assert proxy.counts[fault] >= 3, proxy.counts


async def test_conditional_writes_survive_lost_answers(s3_bucket: Bucket) -> None:
    """A conditional write the server carried out but whose answer was cut is retried;
    the retry finds the object as written and reports success, not "refused"."""
    rates = FaultRates(cut_response=0.5)
    with _proxy(s3_bucket, rates, seed=5) as proxy:
        store = RetryStore(
            S3Store(s3_bucket.name, endpoint_url=proxy.endpoint), attempts=20, base_delay=0.01
        )
        try:
            for i in range(15):
                assert await store.put_new(f"lease-{i}", b"mine %d" % i)
                assert await store.replace_if(f"lease-{i}", b"renewed %d" % i, b"mine %d" % i)
                assert not await store.put_new(f"lease-{i}", b"someone else")
                assert not await store.replace_if(f"lease-{i}", b"x", b"mine %d" % i)
        finally:
            await store.aclose()
    assert proxy.counts["cut_response"] >= 10, proxy.counts
    assert s3_bucket.objects() == {f"lease-{i}": len(b"renewed %d" % i) for i in range(15)}
    assert s3_bucket.read("lease-3") == b"renewed 3"


async def test_conditional_headers_reach_the_server(s3_bucket: Bucket) -> None:
    """The server itself refuses a conditional write that lost a race (the check that
    comes first cannot see a writer that got in between)."""
    store = S3Store(s3_bucket.name, endpoint_url=s3_bucket.endpoint)
    try:
        s3_bucket.write("lease", b"theirs")
        with pytest.raises(ClientError) as info:
            await trio.to_thread.run_sync(
                lambda: store._put_sync("lease", b"mine", IfNoneMatch="*")
            )
        assert info.value.response["Error"]["Code"] == "PreconditionFailed"
        with pytest.raises(ClientError) as info:
            await trio.to_thread.run_sync(
                lambda: store._put_sync("lease", b"mine", IfMatch='"0123456789abcdef"')
            )
        assert info.value.response["Error"]["Code"] == "PreconditionFailed"
    finally:
        await store.aclose()
    assert s3_bucket.read("lease") == b"theirs"
