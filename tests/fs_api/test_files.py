"""The file store called directly: writes, truncates and seals against a bytearray
model, on a real metadata store (SQLite, and a private MariaDB server) and a real cache
dir (small chunk sizes so that files of a few KiB span many blocks)."""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from cloudfs.daemon.uploader import Uploader
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudfs import gc
from cloudfs.cache import CacheDir
from cloudfs.chunking import ChunkerParams
from cloudfs.codec.crypto import Keys
from cloudfs.errors import StoreError
from cloudfs.files import FileStore
from cloudfs.meta import open_meta
from cloudfs.meta.base import LIVE, InodeAttrs, Txn
from cloudfs.codec.framing import block_key
from cloudfs.meta.schema import BLOCK_DELETING, BLOCK_PENDING, BLOCK_STORED
from cloudfs.namespace import Caller, Namespace
from cloudfs.objectstore.local import LocalStore
from cloudfs.objectstore.sealed import SealedStore

PARAMS = ChunkerParams(64, 256, 1024)
_unique = itertools.count()
CALLER = Caller(uid=0, gid=0)


class Env:
    def __init__(self, root: Path, meta_url: str | None = None) -> None:
        """`meta_url`: the metadata database (default: SQLite in the cache dir)."""
        self.cache = CacheDir(root / "cache")
        self.cache.create()
        self.meta = open_meta(meta_url or str(self.cache.meta_path))
        self.fetches: list[bytes] = []

        async def fetch(ids: list[bytes], prefetch: list[bytes]) -> None:
            self.fetches.extend(ids)
            raise AssertionError("every block of these tests is in the cache")

        self.files = FileStore(
            self.meta, self.cache, id_key=b"i" * 32, gear_key=b"g" * 32, chunker=PARAMS,
            fetch=fetch, on_sealed=lambda: None, origin="test",
        )  # fmt: skip
        self.ns = Namespace(self.meta, self.files)

    async def setup(self) -> int:
        if not await self.meta.is_initialized():
            await self.meta.initialize("00000000-0000-0000-0000-000000000000", uid=0, gid=0)
        attrs = await self.ns.mknod(1, b"f%d" % next(_unique), 0o100644, 0, CALLER)
        return attrs.id

    async def check_invariants(self, ino: int) -> None:
        async with self.meta.reading() as tx:
            attrs = await tx.get_inode(ino)
            ext = await tx.live_extents(ino)
            refs = await tx.conn.query(
                "SELECT b.id, b.refcount, (SELECT COUNT(*) FROM extents e WHERE e.block = b.id) FROM blocks b"
            )
        assert attrs is not None
        pos = 0
        for e in ext:
            assert e.offset >= pos, "extents overlap"
            assert e.end <= attrs.size, "extent past end of file"
            pos = e.end
        for block, refcount, rows in refs:
            assert refcount == rows, f"refcount of {bytes(block).hex()[:8]}"


@pytest.fixture(params=["sqlite", "mysql"])
def meta_url(request: pytest.FixtureRequest) -> str | None:
    """The metadata database of the test's Env: None for SQLite in the cache dir, or an
    empty database of the private MariaDB server."""
    return request.getfixturevalue("mysql_url") if request.param == "mysql" else None


@pytest.fixture
def env(tmp_path: Path, meta_url: str | None) -> Iterator[Env]:
    env = Env(tmp_path, meta_url)
    yield env
    trio.run(env.meta.close)


async def read_all(env: Env, ino: int) -> bytes:
    st_ = await env.files.state(ino)
    return await env.files.read(ino, 0, st_.size + 10)


async def test_write_seal_read(env: Env) -> None:
    ino = await env.setup()
    data = os.urandom(10_000)
    await env.files.open(ino)
    await env.files.write(ino, 0, data)
    assert await read_all(env, ino) == data
    await env.files.release(ino)
    assert env.files.current(ino) is None
    assert await read_all(env, ino) == data
    await env.check_invariants(ino)
    async with env.meta.reading() as tx:
        versions = await tx.versions(ino)
    assert [v.size for v in versions] == [10_000]


async def test_edit_in_middle_reuses_blocks(env: Env) -> None:
    ino = await env.setup()
    # seeded: how soon cuts realign after an edit varies with the data (with these
    # tiny chunks, more than 4 new blocks in about 4% of random inputs)
    data = bytearray(random.Random(20261122).randbytes(50_000))
    await env.files.open(ino)
    await env.files.write(ino, 0, bytes(data))
    await env.files.fsync(ino)
    async with env.meta.reading() as tx:
        before = {e.block for e in await tx.live_extents(ino)}
    data[25_000:25_010] = b"x" * 10
    await env.files.write(ino, 25_000, b"x" * 10)
    await env.files.release(ino)
    assert await read_all(env, ino) == bytes(data)
    async with env.meta.reading() as tx:
        after = {e.block for e in await tx.live_extents(ino)}
        old = await tx.version_extents(ino, 1)
    assert len(after - before) <= 4, "only the blocks around the edit are new"
    assert {e.block for e in old} == before, "version 1 still names its blocks"
    await env.check_invariants(ino)


async def test_holes_cost_nothing(env: Env) -> None:
    ino = await env.setup()
    await env.files.open(ino)
    await env.files.write(ino, 1 << 30, b"end")
    await env.files.write(ino, 0, bytes(5000))
    await env.files.release(ino)
    st_ = await env.files.state(ino)
    assert st_.size == (1 << 30) + 3
    assert await env.files.read(ino, (1 << 30) - 2, 10) == b"\0\0end"
    async with env.meta.reading() as tx:
        ext = await tx.live_extents(ino)
    assert sum(e.length for e in ext) <= 1024


async def test_large_append_amends_one_version(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cloudfs.files.DIRTY_LIMIT", 4096)
    ino = await env.setup()
    data = os.urandom(100_000)
    await env.files.open(ino)
    for i in range(0, len(data), 1000):
        await env.files.write(ino, i, data[i : i + 1000])
    await env.files.release(ino)
    assert await read_all(env, ino) == data
    async with env.meta.reading() as tx:
        versions = await tx.versions(ino)
        dead = await tx.conn.query(
            "SELECT COUNT(*) FROM extents WHERE inode = ? AND v_to <> ?", (ino, LIVE)
        )
    assert len(versions) == 1
    assert dead[0][0] == 0, "no history rows for an unpublished working version"
    await env.check_invariants(ino)


class SyncUploads:
    """What mount.main.DaemonLink does for a mount with --upload=sync, minus the
    socket: the daemon's uploader stores, a resumed collection pass finishes what a
    pass left claimed. `after_put` runs after each store request's PUTs."""

    def __init__(self, env: Env, tmp_path: Path) -> None:
        self.env = env
        keys = Keys(data_key=b"d" * 32, id_key=b"i" * 32, gear_key=b"g" * 32)
        self.raw = LocalStore(tmp_path / "store")
        self.sealed = SealedStore(self.raw, keys, encrypt=True, level=1)
        self.uploader = Uploader(env.meta, env.cache, self.sealed, keys)
        self.put: list[bytes] = []
        self.flushed: list[bytes] = []
        self.finishing = 0  # finish_collection requests
        self.refuse: Exception | None = None
        self.refusals = -1  # how many store requests `refuse` fails (-1: all)
        self.after_put: Callable[[], Awaitable[None]] | None = None

    async def store(self, blocks: list[tuple[bytes, int]]) -> dict[bytes, int]:
        if self.refuse is not None and self.refusals != 0:
            self.refusals -= 1
            raise self.refuse
        self.put.extend(b for b, _n in blocks)
        sizes = await self.uploader.store_now(blocks)
        if self.after_put is not None:
            await self.after_put()
        return {b: n for (b, _n), n in zip(blocks, sizes, strict=True)}

    async def flush(self, block_ids: list[bytes]) -> None:
        self.flushed.extend(block_ids)

    async def finish_collection(self) -> bool:
        self.finishing += 1
        report = await gc.collect(self.env.meta, self.raw, self.env.cache, resume_only=True)
        return report.skipped is None

    async def states(self) -> dict[bytes, int]:
        async with self.env.meta.reading() as tx:
            return {bytes(b): s for b, s in await tx.conn.query("SELECT id, state FROM blocks")}

    def has_object(self, block_id: bytes) -> bool:
        return (self.raw.root / block_key(block_id)).exists()


async def test_sync_uploads_store_before_every_commit(
    env: Env, tmp_path: Path, small_batches: None
) -> None:
    """--upload=sync: seals no program waits for (the dirty limit, on an append stream
    and on an overlay; an idle seal) have the daemon's uploader put their new blocks
    before the commit names them, and the commit records them `stored`; an append
    stream's cut blocks are put while the writes go on. Nothing uploads in the
    background here, so a commit that left a row pending would show at the end. A
    copy of the same bytes puts nothing more (its blocks are stored already)."""
    uploads = SyncUploads(env, tmp_path)
    store, put = uploads.sealed, uploads.put
    env.files.uploads = uploads
    ahead = 0
    prestore = env.files._prestore

    async def counted(st_: Any, extents: Any) -> None:
        nonlocal ahead
        ahead += 1
        await prestore(st_, extents)

    env.files._prestore = counted  # type: ignore[method-assign, assignment]
    async with trio.open_nursery() as nursery:
        env.files.nursery = nursery  # where streams cut, and put their blocks ahead
        await _sync_upload_writes(env, store, put)
        env.files.nursery = None
    assert ahead > 0, "the stream's blocks were put ahead of its commits"
    assert uploads.flushed == [], "no commit left a block pending"


async def test_sync_uploads_overtaken_by_garbage_collection(env: Env, tmp_path: Path) -> None:
    """A garbage collection batch that finishes between a seal's PUTs and its commit
    may have deleted one of those objects (made, unreferenced and claimed meanwhile):
    the commit then trusts none of them; it is rolled back, and the seal puts its
    blocks again and commits them stored."""
    uploads = SyncUploads(env, tmp_path)
    batches = 0

    async def batch_finishes() -> None:
        nonlocal batches
        if batches == 0:
            batches += 1
            async with env.meta.transaction() as tx:
                await tx.set_info(gc.EPOCH_KEY, str(await gc.epoch(tx) + 1))

    uploads.after_put = batch_finishes
    env.files.uploads = uploads
    ino = await env.setup()
    await env.files.open(ino)
    await env.files.write(ino, 0, random.Random(6).randbytes(3000))
    await env.files.release(ino)
    states = await uploads.states()
    assert states and set(states.values()) == {BLOCK_STORED}
    assert sorted(uploads.put) == sorted([*states, *states]), "each block was put twice"
    assert uploads.flushed == []
    await env.check_invariants(ino)


async def test_sync_seal_of_blocks_garbage_collection_claimed(env: Env, tmp_path: Path) -> None:
    """--upload=sync: a seal re-using blocks a collection pass has claimed (their
    objects deleted, or about to be) never commits a reference to them while the pass
    holds them: it waits for a running pass to finish, and has its daemon finish what
    a pass that stopped halfway left claimed, then puts them again. That also holds
    when the pass claims them between the seal's look at their rows (stored: nothing
    to put) and its commit, which is then rolled back and tried again."""
    uploads = SyncUploads(env, tmp_path)
    env.files.uploads = uploads
    data = random.Random(7).randbytes(5000)

    async def write(data: bytes) -> int:
        ino = await env.setup()
        await env.files.open(ino)
        await env.files.write(ino, 0, data)
        await env.files.release(ino)
        return ino

    async def free_and_claim(ino: int, lease_owner: str | None) -> list[bytes]:
        """Step 1 and 2 of a pass over the blocks of `ino`, freed."""
        async with env.meta.transaction() as tx:
            await tx.free_inode(ino, 1)
            if lease_owner is not None:
                until = time.time_ns() + 600 * 10**9
                await tx.set_info(gc.LEASE_KEY, json.dumps({"owner": lease_owner,
                                                            "until_ns": until}))  # fmt: skip
            ids = [c[0] for c in await gc._claim(tx, 10**18, 10**18, 1000)]
        await uploads.raw.delete_many([block_key(b) for b in ids])
        return ids

    first = await write(data)
    blocks = sorted(await uploads.states())
    assert blocks and all(uploads.has_object(b) for b in blocks)

    # a running pass holds them: the seal waits until the pass is done with them
    assert await free_and_claim(first, "elsewhere:1") == blocks
    second_ino: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _append(second_ino, write(data)))
        with trio.fail_after(120):
            while uploads.finishing < 3:  # it asked; the pass runs: nothing done
                await trio.sleep(0.01)
        assert not second_ino and set((await uploads.states()).values()) == {BLOCK_DELETING}
        async with env.meta.transaction() as tx:  # step 3; the pass ends
            await gc._finish(tx, blocks, env.cache, gc.GcReport())
            await tx.set_info(gc.LEASE_KEY, json.dumps({"owner": None, "until_ns": 0}))
    assert await uploads.states() == dict.fromkeys(blocks, BLOCK_STORED)
    assert all(uploads.has_object(b) for b in blocks)
    assert await read_all(env, second_ino[0]) == data

    # a pass that died after step 2 claims them between the seal's look and its commit
    looked = env.files._store_first
    raced = []

    async def then_claimed(extents: list[Any]) -> Any:
        done = await looked(extents)
        if not raced:
            raced.extend(await free_and_claim(second_ino[0], None))
        return done

    env.files._store_first = then_claimed  # type: ignore[method-assign, assignment]
    third = await write(data)
    assert raced == blocks
    assert await uploads.states() == dict.fromkeys(blocks, BLOCK_STORED)
    assert all(uploads.has_object(b) for b in blocks), "put again after the pass's deletion"
    assert uploads.flushed == []
    assert await read_all(env, third) == data
    await env.check_invariants(third)


async def test_sync_seal_at_unmount_waits_for_a_store_that_refused(
    env: Env, tmp_path: Path
) -> None:
    """--upload=sync, at unmount: a store that refuses for a while is asked again (for
    up to `unmount_store_wait_s`) before the blocks are committed pending."""
    uploads = SyncUploads(env, tmp_path)
    env.files.uploads = uploads
    env.files.unmounting = True
    uploads.refuse, uploads.refusals = StoreError("the store is unreachable"), 2
    ino = await env.setup()
    data = random.Random(10).randbytes(3000)
    await env.files.open(ino)
    await env.files.write(ino, 0, data)
    await env.files.release(ino)
    assert uploads.refusals == 0, "asked again after each refusal"
    states = await uploads.states()
    assert states and set(states.values()) == {BLOCK_STORED}
    assert uploads.flushed == []
    assert await read_all(env, ino) == data


async def _append(into: list[Any], value: Awaitable[Any]) -> None:
    into.append(await value)


async def test_sync_restore_stores_pending_blocks_first(env: Env, tmp_path: Path) -> None:
    """--upload=sync: blocks a commit at unmount left pending (the store refused) are
    put before a restore names them again; the store refusing fails the restore."""
    uploads = SyncUploads(env, tmp_path)
    env.files.uploads = uploads
    ino = await env.setup()
    old = random.Random(8).randbytes(4000)
    uploads.refuse = StoreError("the store is unreachable")
    env.files.unmounting = True
    env.files.unmount_store_wait_s = 0.0
    await env.files.open(ino)
    await env.files.write(ino, 0, old)
    await env.files.release(ino)
    env.files.unmounting = False
    pending = await uploads.states()
    assert pending and set(pending.values()) == {BLOCK_PENDING}
    async with env.meta.reading() as tx:
        version = max(v.version for v in await tx.versions(ino))
    await env.files.open(ino)
    await env.files.truncate(ino, 0)
    await env.files.release(ino)
    with pytest.raises(StoreError):
        await env.files.restore(ino, version)
    uploads.refuse = None
    await env.files.restore(ino, version)
    states = await uploads.states()
    assert {states[b] for b in pending} == {BLOCK_STORED}
    assert all(uploads.has_object(b) for b in pending)
    assert await read_all(env, ino) == old


async def test_store_now_of_blocks_gone_from_the_cache(env: Env, tmp_path: Path) -> None:
    """The daemon's `store` of a block whose cache file went: fine when its row says
    stored meanwhile (another upload, then eviction), a StoreError when not."""
    keys = Keys(data_key=b"d" * 32, id_key=b"i" * 32, gear_key=b"g" * 32)
    uploader = Uploader(
        env.meta, env.cache, SealedStore(LocalStore(tmp_path / "store"), keys, encrypt=True,
                                         level=1), keys,
    )  # fmt: skip
    await env.setup()
    stored_id, lost_id = b"s" * 32, b"l" * 32
    async with env.meta.transaction() as tx:
        await tx.add_block_refs({stored_id: (10, 1)}, 1, stored={stored_id: 77})
    assert await uploader.store_now([(stored_id, 10)]) == [77]
    with pytest.raises(StoreError, match="not in the cache dir"):
        await uploader.store_now([(stored_id, 10), (lost_id, 10)])


async def _sync_upload_writes(env: Env, store: SealedStore, put: list[bytes]) -> None:
    data = random.Random(5).randbytes(12_000)
    streamed, edited, copy = await env.setup(), await env.setup(), await env.setup()
    for ino in (streamed, edited):
        await env.files.open(ino)
    for i in range(0, len(data), 1000):  # front to back: an append stream
        await env.files.write(streamed, i, data[i : i + 1000])
    for i in reversed(range(0, len(data), 1000)):  # back to front: the overlay
        await env.files.write(edited, i, data[i : i + 1000])
    await env.files.seal_idle(0.0)  # both still open: sealed as idle
    async with env.meta.reading() as tx:
        rows = await tx.conn.query("SELECT id, state, stored_size FROM blocks")
        sizes = [getattr(await tx.get_inode(ino), "size", None) for ino in (streamed, edited)]
    assert sizes == [len(data)] * 2
    assert rows and {state for _b, state, _s in rows} == {BLOCK_STORED}
    for block_id, _state, stored_size in rows:
        body = await store.get_sealed(bytes(block_id))
        assert len(body) == stored_size
        assert store.open_sealed(bytes(block_id), body) == env.cache.block_path(
            bytes(block_id)
        ).read_bytes()
    before = len(put)
    await env.files.open(copy)
    await env.files.write(copy, 0, data)
    for ino in (streamed, edited, copy):
        await env.files.release(ino)
        assert await read_all(env, ino) == data
        await env.check_invariants(ino)
    assert len(put) == before, "the copy's blocks are stored already"


@pytest.mark.parametrize("how", ["getattr", "lookup", "readdir"])
async def test_attributes_read_across_a_seal_are_the_sealed_ones(
    tmp_path: Path, mysql_url: str, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """A stat, lookup or listing whose read of the inode row began before the seal after
    a last close committed, and ended once the file's in-memory state was forgotten,
    answers the sealed size and mtime, not the row from before the seal (the kernel
    would keep that stale size: the model test on MySQL saw 300000 for a file truncated
    to 817). MySQL only: its reads run on worker threads while the event loop goes on;
    SQLite's run on the event loop, so no commit can come between."""
    env = Env(tmp_path, mysql_url)
    try:
        await env.setup()
        name = b"stale%d" % next(_unique)
        ino = (await env.ns.mknod(1, name, 0o100644, 0, CALLER)).id
        await env.files.open(ino)
        await env.files.write(ino, 0, random.Random(1).randbytes(30_000))
        await env.files.seal(ino, publish=True)  # the row: 30000 bytes, this mtime
        await env.files.write(ino, 207, random.Random(5).randbytes(1385))
        await env.files.truncate(ino, 817)  # unsealed: only the file's state knows
        want = await env.ns.getattr(ino)
        assert want.size == 817

        # the first inode row read from now on is held until the seal is done
        read_done, go_on = trio.Event(), trio.Event()

        def held(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            async def read(*args: Any) -> Any:
                rows = await method(*args)
                if not read_done.is_set():
                    read_done.set()
                    await go_on.wait()
                return rows

            return read

        monkeypatch.setattr(Txn, "get_inode", held(Txn.get_inode))
        monkeypatch.setattr(Txn, "lookup_attrs", held(Txn.lookup_attrs))  # a lookup's read
        monkeypatch.setattr(Txn, "readdir_attrs", held(Txn.readdir_attrs))
        got: list[InodeAttrs] = []

        async def ask() -> None:
            if how == "getattr":
                got.append(await env.ns.getattr(ino))
            elif how == "lookup":
                got.append(await env.ns.lookup(1, name))
            else:
                got.extend(a for n, a, _c in await env.ns.readdir(1, 2) if n == name)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            with trio.fail_after(60):
                await read_done.wait()
            assert env.files.close_handle(ino)
            await env.files.last_close(ino)  # seals, commits, forgets the state
            assert env.files.current(ino) is None
            go_on.set()
        assert [(a.size, a.mtime_ns) for a in got] == [(817, want.mtime_ns)]
    finally:
        await env.meta.close()


async def test_concurrent_opens_share_one_state(env: Env) -> None:
    """Two opens of a file with no state yet, at once: on MySQL both read its row on
    worker threads; the second must not replace the state the first made (its open and
    its writes would be lost to the file)."""
    ino = await env.setup()
    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(env.files.open, ino)
    st_ = env.files.current(ino)
    assert st_ is not None and st_.opens == 2
    await env.files.release(ino)
    assert env.files.current(ino) is st_, "one handle is still open"
    await env.files.release(ino)
    assert env.files.current(ino) is None


async def test_open_with_a_row_read_before_a_commit_reads_again(env: Env) -> None:
    """An open hands FileStore the row its getattr read (no second read). If the
    file's contents were committed here since (a seal after another handle's last
    close, its state forgotten meanwhile), that row is stale: the open reads again,
    or the file would show the old size and its next seal would take this mount's
    own commit for another mount's (a conflict version)."""
    ino = await env.setup()
    await env.files.open(ino)
    await env.files.write(ino, 0, b"a" * 100)
    await env.files.release(ino)  # sealed: 100 bytes, the state forgotten
    mark = env.files.commit_mark()
    before = await env.ns.getattr(ino)
    assert before.size == 100
    await env.files.open(ino)  # another handle appends, then closes: committed
    await env.files.write(ino, 100, b"b" * 100)
    await env.files.release(ino)
    assert env.files.current(ino) is None
    st_ = await env.files.open(ino, known=before, mark=mark)
    assert (st_.size, st_.sealed_size) == (200, 200)
    await env.files.write(ino, 200, b"c" * 50)
    await env.files.release(ino)
    assert await read_all(env, ino) == b"a" * 100 + b"b" * 100 + b"c" * 50
    async with env.meta.reading() as tx:
        versions = await tx.versions(ino)
    assert [(v.size, v.flags) for v in versions] == [(100, 0), (200, 0), (250, 0)]
    # no commit since the row was read: the open takes the row as it is
    assert env.files.forget_closed(ino)  # (the state the read made)
    mark = env.files.commit_mark()
    now = await env.ns.getattr(ino)
    st_ = await env.files.open(ino, known=now, mark=mark)
    assert (st_.size, st_.base_version) == (250, now.version)
    assert env.files.close_handle(ino) and env.files.forget_closed(ino)


async def test_forget_closed_keeps_what_must_be_sealed(env: Env) -> None:
    """The last close of a file with unsealed writes is not forgotten on the fast path
    (the writes would be lost); one only read is."""
    ino = await env.setup()
    await env.files.open(ino)
    await env.files.write(ino, 0, b"x" * 5000)
    assert env.files.close_handle(ino)
    assert not env.files.forget_closed(ino)
    assert env.files.current(ino) is not None
    await env.files.last_close(ino)
    await env.files.open(ino)
    assert await read_all(env, ino) == b"x" * 5000
    assert env.files.close_handle(ino)
    assert env.files.forget_closed(ino)
    assert env.files.current(ino) is None
    assert await read_all(env, ino) == b"x" * 5000


ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("write"), st.integers(0, 6000), st.integers(1, 3000), st.integers(0, 255)
        ),
        st.tuples(st.just("append"), st.integers(1, 2500), st.integers(0, 255)),
        st.tuples(st.just("truncate"), st.integers(0, 8000)),
        st.tuples(st.just("seal"), st.booleans()),
        st.tuples(st.just("reopen")),
    ),
    max_size=25,
)


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Append streams cut every few hundred bytes, so cuts happen between writes."""
    monkeypatch.setattr("cloudfs.files.CUT_BATCH", 700)
    monkeypatch.setattr("cloudfs.files.BACKLOG_LIMIT", 2100)
    monkeypatch.setattr("cloudfs.files.DIRTY_LIMIT", 5000)


MODEL_EXAMPLES = int(os.environ.get("CLOUDFS_MODEL_EXAMPLES", "80"))


@settings(
    max_examples=MODEL_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=ops)
def test_model(tmp_path: Path, meta_url: str | None, small_batches: None, ops: list[tuple]) -> None:
    """Random writes, appends, truncates and seals agree with a bytearray at every step."""

    async def run() -> None:
        env = Env(tmp_path / f"m{next(_unique)}", meta_url)
        ino = await env.setup()
        model = bytearray()
        await env.files.open(ino)
        for op in ops:
            if op[0] == "write":
                _, off, n, fill = op
                payload = bytes((fill + i * 7) % 256 for i in range(n))
                await env.files.write(ino, off, payload)
                if len(model) < off:
                    model.extend(bytes(off - len(model)))
                model[off : off + n] = payload
            elif op[0] == "append":
                _, n, fill = op
                payload = bytes((fill * 3 + i) % 256 for i in range(n))
                await env.files.write(ino, len(model), payload)
                model += payload
            elif op[0] == "truncate":
                await env.files.truncate(ino, op[1])
                del model[op[1] :]
                model.extend(bytes(op[1] - len(model)))
            elif op[0] == "seal":
                await env.files.seal(ino, publish=op[1])
            else:
                await env.files.release(ino)
                await env.files.open(ino)
            assert await read_all(env, ino) == bytes(model)
        await env.files.release(ino)
        assert await read_all(env, ino) == bytes(model)
        await env.check_invariants(ino)
        await env.meta.close()

    trio.run(run)


async def test_atime_updates_wait_in_memory_and_a_later_time_wins(env: Env) -> None:
    """While run_atime_writes runs, a read's atime update is shown at once and written
    later, in a batch; a utime here or a change of the row by another mount meanwhile
    is not overwritten by it; the rest is written on the way out."""
    ino = await env.setup()

    async def row_atime() -> int:
        async with env.meta.reading() as tx:
            attrs = await tx.get_inode(ino)
        assert attrs is not None
        return attrs.atime_ns

    async def read() -> bool:
        return await env.ns.accessed(await env.ns.getattr(ino))

    async with trio.open_nursery() as nursery:
        await nursery.start(env.ns.run_atime_writes, 3600.0)  # no write until asked
        before = await row_atime()
        assert await read()  # relatime: the atime is not newer than mtime
        shown = (await env.ns.getattr(ino)).atime_ns
        assert shown > before and await row_atime() == before
        assert not await read()  # relatime goes by the atime shown
        await env.ns.write_atimes()
        assert await row_atime() == shown

        await env.ns.setattr(ino, mode=0o600)  # a change: the next read updates atime
        assert await read()
        await env.ns.setattr(ino, atime_ns=5)  # utime, after that read
        assert (await env.ns.getattr(ino)).atime_ns == 5
        await env.ns.write_atimes()
        assert await row_atime() == 5

        assert await read()
        async with env.meta.transaction() as tx:  # another mount's utime meanwhile
            await tx.update_inode(ino, atime_ns=7)
        await env.ns.write_atimes()
        assert await row_atime() == 7
        assert (await env.ns.getattr(ino)).atime_ns == 7

        assert await read()
        pending = (await env.ns.getattr(ino)).atime_ns
        assert await row_atime() == 7
        nursery.cancel_scope.cancel()
    assert await row_atime() == pending


async def test_atime_writes_that_failed_are_tried_again(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    ino = await env.setup()
    real = env.ns._write_atimes
    failures = [StoreError("the metadata store is away")]

    async def flaky() -> dict[int, tuple[int, int]]:
        if failures:
            raise failures.pop()
        return await real()

    monkeypatch.setattr(env.ns, "_write_atimes", flaky)
    async with trio.open_nursery() as nursery:
        await nursery.start(env.ns.run_atime_writes, 0.05)
        assert await env.ns.accessed(await env.ns.getattr(ino))
        shown = (await env.ns.getattr(ino)).atime_ns
        with trio.fail_after(5):
            while True:  # no other read comes to wake the writer
                await trio.sleep(0.05)
                async with env.meta.reading() as tx:
                    attrs = await tx.get_inode(ino)
                assert attrs is not None
                if attrs.atime_ns == shown:
                    break
        assert not failures
        nursery.cancel_scope.cancel()
