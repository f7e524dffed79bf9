"""The ObjectStore contract (cloudfs.objectstore.base), run against every store in
tests/contract/conftest.py: what a caller can rely on, whatever the backend."""

from __future__ import annotations

import os

import pytest
import trio

from cloudfs.errors import ObjectNotFound
from cloudfs.objectstore.base import ObjectInfo, ObjectStore

# Keys chosen so that directory-walk order and key order differ ('-' < '/' < '0'),
# with slashes, several levels, and a non-ASCII key.
TRICKY_KEYS = ["a-1", "a/b", "a/c/d", "a0", "b", "b-", "ba/x", "blocks/ab/abcd", "é/z"]

INVALID_KEYS = ["", "/abs", "a/../b", "..", "../x", "a//b", "a/", "./a", "a/.", "x\0y"]


async def put_all(store: ObjectStore, keys: list[str]) -> None:
    for key in keys:
        await store.put(key, key.encode() * 3)


async def list_keys(store: ObjectStore, prefix: str = "", start_after: str = "") -> list[str]:
    return [info.key for info in await store.list(prefix, start_after)]


async def test_put_get_roundtrip(store: ObjectStore) -> None:
    data = bytes(range(256)) * 1000
    await store.put("obj", data)
    assert await store.get("obj") == data
    await store.put("empty", b"")
    assert await store.get("empty") == b""


async def test_large_object(store: ObjectStore) -> None:
    data = os.urandom(5 * 1024 * 1024 + 7)
    await store.put("big", data)
    assert await store.get("big") == data
    assert await store.head("big") == ObjectInfo("big", len(data))


async def test_get_into(store: ObjectStore) -> None:
    """The whole object, wherever the store put it; a buffer too small is no error."""
    data = os.urandom(300_000)
    await store.put("blob", data)
    buffer = bytearray(b"x" * 400_000)
    assert bytes(await store.get_into("blob", buffer)) == data
    assert bytes(await store.get_into("blob", bytearray(1000))) == data
    await store.put("empty", b"")
    assert bytes(await store.get_into("empty", buffer)) == b""
    with pytest.raises(ObjectNotFound):
        await store.get_into("nope", buffer)


async def test_missing_key(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound):
        await store.get("nope")
    with pytest.raises(ObjectNotFound):
        await store.get("no/such/dir")
    with pytest.raises(ObjectNotFound):
        await store.get_range("nope", 0, 10)
    assert await store.head("nope") is None
    assert await store.head("no/such/dir") is None


async def test_overwrite(store: ObjectStore) -> None:
    await store.put("k", b"first version, longer")
    await store.put("k", b"second")
    assert await store.get("k") == b"second"
    assert await store.head("k") == ObjectInfo("k", 6)
    assert await list_keys(store) == ["k"]


async def test_head(store: ObjectStore) -> None:
    await store.put("dir/k", b"12345")
    await store.put("zero", b"")
    assert await store.head("dir/k") == ObjectInfo("dir/k", 5)
    assert await store.head("zero") == ObjectInfo("zero", 0)
    # a "directory" of keys is not an object
    assert await store.head("dir") is None


async def test_get_range(store: ObjectStore) -> None:
    data = bytes(range(100))
    await store.put("r", data)
    assert await store.get_range("r", 0, 10) == data[:10]
    assert await store.get_range("r", 42, 17) == data[42:59]
    assert await store.get_range("r", 90, 50) == data[90:]  # clipped at the end
    assert await store.get_range("r", 0, 100) == data
    assert await store.get_range("r", 10, 0) == b""
    assert await store.get_range("r", 100, 5) == b""
    assert await store.get_range("r", 500, 5) == b""


async def test_delete_many(store: ObjectStore) -> None:
    await put_all(store, ["x/1", "x/2", "y"])
    await store.delete_many(["x/1", "y", "missing", "x/nope/deeper"])
    assert await list_keys(store) == ["x/2"]
    with pytest.raises(ObjectNotFound):
        await store.get("x/1")
    assert await store.head("y") is None
    await store.delete_many([])
    await store.delete_many(["x/2"])
    assert await store.list() == []
    # the key can be used again after a delete
    await store.put("x/1", b"again")
    assert await store.get("x/1") == b"again"


async def test_list_empty(store: ObjectStore) -> None:
    assert await store.list() == []
    assert await store.list("blocks/") == []
    assert await store.list(start_after="zzz") == []


async def test_list_sorted_with_sizes(store: ObjectStore) -> None:
    await put_all(store, TRICKY_KEYS[::-1])
    page = await store.list()
    assert [info.key for info in page] == sorted(TRICKY_KEYS)
    assert all(info.size == len(info.key.encode()) * 3 for info in page)


async def test_list_prefix(store: ObjectStore) -> None:
    await put_all(store, TRICKY_KEYS)
    assert await list_keys(store, "a/") == ["a/b", "a/c/d"]
    assert await list_keys(store, "a") == ["a-1", "a/b", "a/c/d", "a0"]
    assert await list_keys(store, "a/c") == ["a/c/d"]
    assert await list_keys(store, "a/c/d") == ["a/c/d"]
    assert await list_keys(store, "b") == ["b", "b-", "ba/x", "blocks/ab/abcd"]
    assert await list_keys(store, "blocks/ab/") == ["blocks/ab/abcd"]
    assert await list_keys(store, "blocks/a") == ["blocks/ab/abcd"]
    assert await list_keys(store, "é") == ["é/z"]
    assert await list_keys(store, "zz") == []
    assert await list_keys(store, "a/b/") == []
    assert await list_keys(store, "../") == []


async def test_list_start_after(store: ObjectStore) -> None:
    await put_all(store, TRICKY_KEYS)
    keys = sorted(TRICKY_KEYS)
    for i, key in enumerate(keys):
        assert await list_keys(store, start_after=key) == keys[i + 1 :]
    # start_after need not be an existing key
    assert await list_keys(store, start_after="a/bz") == [k for k in keys if k > "a/bz"]
    assert await list_keys(store, start_after="a/") == [k for k in keys if k > "a/"]
    assert await list_keys(store, start_after="zzz") == ["é/z"]  # code point order
    assert await list_keys(store, start_after="é/z") == []
    # together with a prefix
    assert await list_keys(store, "a", start_after="a/b") == ["a/c/d", "a0"]
    assert await list_keys(store, "b", start_after="a") == ["b", "b-", "ba/x", "blocks/ab/abcd"]


async def test_list_pagination(store: ObjectStore) -> None:
    keys = sorted(f"p/{i % 7}/{i:04d}" for i in range(60)) + ["q"]
    await put_all(store, keys)
    seen: list[str] = []
    start_after = ""
    while True:
        page = await store.list("p/", start_after, limit=7)
        if not page:
            break
        assert len(page) <= 7
        seen += [info.key for info in page]
        start_after = page[-1].key
    assert seen == keys[:-1]
    assert [info.key async for info in store.list_all(page_size=5)] == keys
    assert len(await store.list(limit=1)) == 1


async def test_keys_with_slashes(store: ObjectStore) -> None:
    deep = "blocks/ab/" + "ab" * 32
    await store.put(deep, b"block")
    await store.put("meta/2024/01/dump", b"dump")
    assert await store.get(deep) == b"block"
    assert await store.get("meta/2024/01/dump") == b"dump"
    assert await list_keys(store) == [deep, "meta/2024/01/dump"]
    await store.delete_many([deep])
    assert await list_keys(store) == ["meta/2024/01/dump"]


@pytest.mark.parametrize("key", INVALID_KEYS)
async def test_invalid_keys(store: ObjectStore, key: str) -> None:
    with pytest.raises(ValueError):
        await store.put(key, b"x")
    with pytest.raises(ValueError):
        await store.get(key)
    with pytest.raises(ValueError):
        await store.head(key)
    with pytest.raises(ValueError):
        await store.delete_many([key])


async def test_put_is_atomic_for_concurrent_readers(store: ObjectStore) -> None:
    """A reader sees one whole version, never a mix or a prefix of one."""
    size = 2 * 1024 * 1024
    versions = [bytes([v]) * size for v in range(4)]
    await store.put("hot", versions[0])
    writer_done = trio.Event()
    reads = 0

    async def writer() -> None:
        for i in range(1, 25):
            await store.put("hot", versions[i % len(versions)])
        writer_done.set()

    async def reader() -> None:
        nonlocal reads
        while not writer_done.is_set():
            data = await store.get("hot")
            assert data in versions, f"partial object: {len(data)} bytes"
            info = await store.head("hot")
            assert info is not None and info.size == size
            reads += 1

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(reader)
        nursery.start_soon(writer)
    assert reads > 0


async def test_conditional_writes(store: ObjectStore) -> None:
    assert await store.put_new("lease", b"one")
    assert not await store.put_new("lease", b"two")
    assert await store.get("lease") == b"one"
    assert not await store.replace_if("lease", b"three", b"two")
    assert await store.replace_if("lease", b"three", b"one")
    assert await store.get("lease") == b"three"
    assert not await store.replace_if("missing", b"x", b"")
    assert await store.head("missing") is None
    assert not await store.delete_if("lease", b"one")
    assert await store.get("lease") == b"three"
    assert await store.delete_if("lease", b"three")
    assert await store.head("lease") is None
    assert not await store.delete_if("lease", b"three")
    assert await store.put_new("lease", b"again")
    assert await store.get("lease") == b"again"
