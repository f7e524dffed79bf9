"""What is particular to LocalStore and open_store (the shared behaviour is in
tests/contract/test_objectstore.py): files on disk, temporary files, key conflicts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cloudfs.errors import BadStorageURL, StorePermanentError
from cloudfs.objectstore import open_store
from cloudfs.objectstore.local import LocalStore
from cloudfs.objectstore.prefix import PrefixStore


async def test_keys_map_to_subdirectories(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    await store.put("blocks/ab/cdef", b"data")
    assert (tmp_path / "s" / "blocks" / "ab" / "cdef").read_bytes() == b"data"
    # nothing is left in the temporary directory, and it is never listed
    assert os.listdir(tmp_path / "s" / ".tmp") == []
    assert [i.key for i in await store.list()] == ["blocks/ab/cdef"]


async def test_tmp_dir_is_reserved(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    with pytest.raises(ValueError):
        await store.put(".tmp/x", b"")
    assert await store.list(".tmp/") == []


async def test_delete_prunes_empty_directories(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    await store.put("a/b/c", b"1")
    await store.put("a/d", b"2")
    await store.delete_many(["a/b/c"])
    assert not (tmp_path / "s" / "a" / "b").exists()
    assert (tmp_path / "s" / "a" / "d").exists()
    await store.delete_many(["a/d"])
    assert not (tmp_path / "s" / "a").exists()
    assert (tmp_path / "s").is_dir()
    # a key may become a "directory" once it is gone, and the other way round
    await store.put("a", b"now a file")
    assert await store.get("a") == b"now a file"


async def test_key_and_directory_conflict(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    await store.put("a", b"file")
    with pytest.raises(StorePermanentError):
        await store.put("a/b", b"x")
    await store.put("d/e", b"x")
    with pytest.raises(StorePermanentError):
        await store.put("d", b"x")
    assert await store.get("a") == b"file" and await store.get("d/e") == b"x"
    assert os.listdir(tmp_path / ".tmp") == []


async def test_stale_tmp_files_are_swept(tmp_path: Path) -> None:
    (tmp_path / ".tmp").mkdir()
    stale, fresh = tmp_path / ".tmp" / "put-stale", tmp_path / ".tmp" / "put-fresh"
    stale.write_bytes(b"left by a crash")
    fresh.write_bytes(b"another process is writing this")
    os.utime(stale, (0, 0))
    await LocalStore(tmp_path).put("k", b"v")
    assert not stale.exists() and fresh.exists()


async def test_missing_root(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "not" / "yet")
    assert await store.list() == []
    assert await store.head("k") is None
    await store.put("k", b"v")
    assert await store.get("k") == b"v"


async def test_prefix_store_stays_inside_its_prefix(tmp_path: Path) -> None:
    inner = LocalStore(tmp_path)
    await inner.put("outside", b"o")
    store = PrefixStore(inner, "fs1/")
    await store.put("k", b"v")
    assert await inner.get("fs1/k") == b"v"
    assert [i.key for i in await store.list()] == ["k"]
    assert (await store.head("k")).key == "k"  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        await store.get("../outside")
    with pytest.raises(ValueError):
        PrefixStore(inner, "/abs/")


def test_open_store_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(f"local://{tmp_path}")
    assert isinstance(store, LocalStore) and store.root == tmp_path
    assert store.url == f"local://{tmp_path}"
    store = open_store(str(tmp_path / "plain"))
    assert isinstance(store, LocalStore) and store.root == tmp_path / "plain"
    monkeypatch.chdir(tmp_path)
    store = open_store("relative/dir")
    assert isinstance(store, LocalStore) and store.root == tmp_path / "relative" / "dir"
    for bad in ("", "local://host/path", "local://relative", "ftp://x/y"):
        with pytest.raises(BadStorageURL):
            open_store(bad)
    with pytest.raises(BadStorageURL):
        open_store(f"local://{tmp_path}", region="x")


async def test_conditional_writes_are_atomic(tmp_path: Path) -> None:
    """Racing writers (threads with their own lock descriptors, as processes have):
    one put_new wins, and compare-and-replace loses no update."""
    import trio

    store = LocalStore(tmp_path / "s")
    assert store.conditional_writes and PrefixStore(store, "p/").conditional_writes
    wins: list[int] = []

    async def create(i: int) -> None:
        if await store.put_new("lease", str(i).encode()):
            wins.append(i)

    async def increment() -> None:
        for _ in range(5):
            while True:
                current = await store.get("counter")
                if await store.replace_if("counter", str(int(current) + 1).encode(), current):
                    break

    await store.put("counter", b"0")
    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(create, i)
        for _ in range(10):
            nursery.start_soon(increment)
    assert len(wins) == 1 and await store.get("lease") == str(wins[0]).encode()
    assert await store.get("counter") == b"50"
    # the lock file is not an object, and sweeping old temporary files keeps it
    assert [i.key for i in await store.list()] == ["counter", "lease"]
    os.utime(tmp_path / "s" / ".tmp" / "lock", (0, 0))
    await LocalStore(tmp_path / "s").put("x", b"")
    assert (tmp_path / "s" / ".tmp" / "lock").exists()


async def test_get_into_reads_into_the_buffer(tmp_path: Path) -> None:
    """The fetcher's reads land in its reused buffer (no new object per block), also
    through the retry and prefix wrappers."""
    from cloudfs.objectstore.retry import RetryStore

    data = os.urandom(200_000)
    store = RetryStore(PrefixStore(LocalStore(tmp_path), "p/"))
    await store.put("k", data)
    buffer = bytearray(300_000)
    view = await store.get_into("k", buffer)
    assert view.obj is buffer and bytes(view) == data
    small = bytearray(100)
    view = await store.get_into("k", small)
    assert view.obj is not small and bytes(view) == data
