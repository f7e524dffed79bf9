"""Retention and garbage collection called directly (issue 6), on SQLite and MariaDB,
with the clock in the test's hands: which versions a policy keeps, pruning keeps the
kept versions byte-identical and releases the rest, gc deletes unreferenced blocks
only after the grace period, and a seal that re-uses a block gc has claimed revives it
with its plaintext in the cache — even when the block file went meanwhile."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from historyutil import Env

from cloudfs import gc, retention
from cloudfs.codec.framing import block_key
from cloudfs.meta.schema import BLOCK_PENDING, BLOCK_REVIVED, BLOCK_STORED

HOUR = 3600 * 10**9
DAY = 24 * HOUR


@pytest.fixture(params=["sqlite", "mysql"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    url = request.getfixturevalue("mysql_url") if request.param == "mysql" else None
    e = Env(tmp_path, url)
    yield e
    trio.run(e.meta.close)


def test_policy_keeps_recent_then_hourly_then_daily() -> None:
    now = 1000 * DAY
    policy = retention.DEFAULT
    versions = [
        (1, now - 40 * DAY),  # older than 30 days: dropped
        (2, now - 20 * DAY + HOUR), (3, now - 20 * DAY + 2 * HOUR),  # one day: the newer
        (4, now - 3 * DAY - 50 * 60 * 10**9), (5, now - 3 * DAY - 10 * 60 * 10**9),  # same hour
        (6, now - 3 * DAY + 2 * HOUR),
        (7, now - 5 * HOUR), (8, now - HOUR), (9, now),  # younger than a day: all
    ]  # fmt: skip
    kept = retention.kept_versions(versions, now, policy)
    assert kept == {3, 5, 6, 7, 8, 9}
    assert retention.kept_versions([(1, now - 400 * DAY)], now, policy) == {1}, "newest kept"
    forever = retention.parse_policy("keep-all=forever,hourly=forever,daily=forever")
    assert retention.kept_versions(versions, now, forever) == set(range(1, 10))
    assert retention.parse_policy("trash=0").trash == 0
    assert retention.parse_policy("daily=1w").describe() == (
        "keep-all=1d,hourly=1w,daily=1w,trash=30d"
    )
    with pytest.raises(Exception, match="keep-all <= hourly <= daily"):
        retention.parse_policy("hourly=2d,daily=1d")
    with pytest.raises(Exception, match="not a duration"):
        retention.parse_policy("trash=soon")


async def test_prune_keeps_kept_versions_and_releases_the_rest(env: Env) -> None:
    contents = [os.urandom(3000) for _ in range(6)]
    ino = await env.file(*contents)
    now = 2000 * DAY
    await env.set_committed(ino, [now - 40 * DAY, now - 35 * DAY, now - 10 * DAY + HOUR,
                                  now - 10 * DAY + 2 * HOUR, now - HOUR, now])  # fmt: skip
    dry = await retention.prune(env.meta, now, dry_run=True)
    assert (dry.versions, dry.files) == (3, 1)
    async with env.meta.reading() as tx:
        assert len(await tx.versions(ino)) == 6, "a dry run changes nothing"
    report = await retention.prune(env.meta, now)
    assert (report.versions, report.files) == (3, 1) and report.extents > 0
    async with env.meta.reading() as tx:
        assert [v.version for v in await tx.versions(ino)] == [4, 5, 6]
    for version in (4, 5, 6):
        assert await env.version_bytes(ino, version) == contents[version - 1]
    assert await env.files.read(ino, 0, 10_000) == contents[-1]
    await env.refcounts_match()
    unreferenced = [i for i, (_s, n) in (await env.states()).items() if n == 0]
    assert unreferenced, "the dropped versions' blocks lost their references"
    again = await retention.prune(env.meta, now)
    assert again.versions == 0


async def test_trash_is_purged_after_its_period(env: Env) -> None:
    ino = await env.file(os.urandom(5000))
    async with env.meta.reading() as tx:
        name = (await tx.readdir(1, 0, 1000))[-1][1]
    await env.ns.unlink(1, name)
    async with env.meta.reading() as tx:
        assert await tx.get_inode(ino) is not None, "kept in the trash"
    now = time.time_ns()
    assert (await retention.prune(env.meta, now + 29 * DAY)).trash == 0
    assert (await retention.prune(env.meta, now + 31 * DAY)).trash == 1
    async with env.meta.reading() as tx:
        assert await tx.get_inode(ino) is None
    assert all(n == 0 for _s, n in (await env.states()).values())


async def test_gc_deletes_after_grace_only(env: Env) -> None:
    keep = await env.file(os.urandom(4000))
    gone = await env.file(os.urandom(4000))
    await env.upload_all()
    async with env.meta.reading() as tx:
        doomed = {e.block for e in await tx.live_extents(gone)}
        kept = {e.block for e in await tx.live_extents(keep)}
    async with env.meta.transaction() as tx:
        await tx.free_inode(gone, 1000 * DAY)  # unreferenced at day 1000
    assert all((env.store.root / block_key(b)).exists() for b in doomed)

    early = await gc.collect(env.meta, env.store, env.cache, now_ns=1000 * DAY + HOUR // 2)
    assert early.blocks == 0
    dry = await gc.collectable(env.meta, 1000 * DAY + 2 * HOUR)
    assert dry.blocks == len(doomed) and dry.stored_bytes > 0
    report = await gc.collect(env.meta, env.store, env.cache, now_ns=1000 * DAY + 2 * HOUR,
                              batch=3)  # fmt: skip
    assert report.blocks == len(doomed) and report.errors == []
    assert report.cache_files == len(doomed)
    assert not any((env.store.root / block_key(b)).exists() for b in doomed)
    assert all((env.store.root / block_key(b)).exists() for b in kept)
    assert not any(env.cache.has_block(b) for b in doomed)
    assert set(await env.states()) == kept
    assert await env.files.read(keep, 0, 10_000)


async def test_a_seal_revives_a_claimed_block(env: Env) -> None:
    data = os.urandom(6000)
    first = await env.file(data)
    await env.upload_all()
    async with env.meta.reading() as tx:
        blocks = {e.block for e in await tx.live_extents(first)}
    async with env.meta.transaction() as tx:
        await tx.free_inode(first, 1000 * DAY)
    # a pass claims the blocks and deletes their objects ...
    async with env.meta.transaction() as tx:
        claimed = await gc._claim(tx, 1001 * DAY, 1001 * DAY, 1000)
    assert {c[0] for c in claimed} == blocks
    await env.store.delete_many([block_key(b) for b in blocks])
    # ... while a seal writes the same bytes; one block file goes in between (evicted)
    evicted = min(blocks)
    hold_block = env.cache.hold_block

    def hold_then_evict(block_id: bytes) -> Path | None:
        hold = hold_block(block_id)
        if block_id == evicted:
            env.cache.remove_block(block_id)
        return hold

    env.cache.hold_block = hold_then_evict  # type: ignore[method-assign]
    second = await env.file(data)
    env.cache.hold_block = hold_block  # type: ignore[method-assign]
    states = await env.states()
    assert {states[b][0] for b in blocks} == {BLOCK_REVIVED}
    assert all(env.cache.has_block(b) for b in blocks), "the plaintext came back from the hold"
    assert list(env.cache.holds.iterdir()) == [], "holds are released after the commit"
    async with env.meta.reading() as tx:
        assert not {b for b, _s in await tx.pending_blocks(1000)} & blocks, (
            "the uploader leaves revived blocks alone while their old object is deleted"
        )
    # the pass ends: nothing is deleted, the revived blocks are pending again
    async with env.meta.transaction() as tx:
        gone = await gc._finish(tx, sorted(blocks), env.cache, gc.GcReport())
    assert gone == []
    states = await env.states()
    assert {states[b] for b in blocks} == {(BLOCK_PENDING, 1)}
    await env.upload_all()
    assert all((env.store.root / block_key(b)).exists() for b in blocks)
    assert await env.files.read(second, 0, 10_000) == data
    await env.refcounts_match()


async def test_a_seal_after_the_pass_writes_the_block_again(env: Env) -> None:
    data = os.urandom(5000)
    first = await env.file(data)
    await env.upload_all()
    async with env.meta.transaction() as tx:
        await tx.free_inode(first, 1000 * DAY)
    report = await gc.collect(env.meta, env.store, env.cache, now_ns=1001 * DAY)
    assert report.blocks > 0 and await env.states() == {}
    second = await env.file(data)
    states = await env.states()
    assert states and {s for s, _n in states.values()} == {BLOCK_PENDING}
    assert all(env.cache.has_block(b) for b in states)
    assert await env.files.read(second, 0, 10_000) == data


async def test_cached_files_go_only_when_stored(env: Env) -> None:
    ino = await env.file(os.urandom(3000))
    async with env.meta.reading() as tx:
        ids = sorted({e.block for e in await tx.live_extents(ino)})
    freed = await gc.remove_stored_block_files(env.meta, env.cache, ids)
    assert freed == [0] * len(ids) and all(env.cache.has_block(b) for b in ids)
    await env.upload_all()
    freed = await gc.remove_stored_block_files(env.meta, env.cache, ids)
    assert all(n > 0 for n in freed) and not any(env.cache.has_block(b) for b in ids)
    assert {s for s, _n in (await env.states()).values()} == {BLOCK_STORED}
