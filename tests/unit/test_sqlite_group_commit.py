"""Group commits of the SQLite engine (SqliteMetaStore.run_group_commits): what another
process sees, when a group reaches the database, what a failed transaction inside a
group undoes, and that fsync's durable transaction ends the group."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from cloudfs.meta.schema import ROOT_INODE
from cloudfs.meta.sqlite import SqliteMetaStore

FS_UUID = "6f1c3a52-8a5e-4d3b-9a51-0c1d2e3f4a5b"
NOW = 1_700_000_000_000_000_000
FILE = 0o100644
#: a window no test reaches: the group is committed only by what the test does
NEVER_S = 3600.0


async def _pair(tmp_path: Path) -> tuple[SqliteMetaStore, SqliteMetaStore]:
    """(the mount's store, another process's view of the same database)."""
    mount = SqliteMetaStore(tmp_path / "meta.db")
    await mount.initialize(FS_UUID, uid=0, gid=0, now_ns=NOW)
    return mount, SqliteMetaStore(tmp_path / "meta.db")


async def _names(meta: SqliteMetaStore) -> list[bytes]:
    async with meta.reading() as tx:
        return sorted(name for _id, name, _ino in await tx.readdir(ROOT_INODE, 0, 1000))


async def _create(meta: SqliteMetaStore, name: bytes) -> None:
    async with meta.transaction() as tx:
        attrs = await tx.create_inode(mode=FILE, uid=0, gid=0, nlink=1, now_ns=NOW)
        await tx.add_dentry(ROOT_INODE, name, attrs.id)


async def test_a_group_is_seen_by_others_once_committed(tmp_path: Path) -> None:
    mount, other = await _pair(tmp_path)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(mount.run_group_commits, NEVER_S)
            await _create(mount, b"a")
            await _create(mount, b"b")
            assert await _names(mount) == [b"a", b"b"]  # the mount sees its own work
            assert await _names(other) == []  # nobody else does yet
            await mount.commit()
            assert await _names(other) == [b"a", b"b"]
            await _create(mount, b"c")
            nursery.cancel_scope.cancel()  # leaving commits the open group
        assert await _names(other) == [b"a", b"b", b"c"]
    finally:
        await mount.close()
        await other.close()


async def test_the_window_commits_without_help(tmp_path: Path) -> None:
    mount, other = await _pair(tmp_path)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(mount.run_group_commits, 0.01)
            await _create(mount, b"a")
            with trio.fail_after(60):  # generous: only the condition matters
                while await _names(other) != [b"a"]:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    finally:
        await mount.close()
        await other.close()


async def test_a_failed_transaction_undoes_only_itself(tmp_path: Path) -> None:
    mount, other = await _pair(tmp_path)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(mount.run_group_commits, NEVER_S)
            await _create(mount, b"kept")
            with pytest.raises(RuntimeError):
                async with mount.transaction() as tx:
                    attrs = await tx.create_inode(mode=FILE, uid=0, gid=0, nlink=1, now_ns=NOW)
                    await tx.add_dentry(ROOT_INODE, b"undone", attrs.id)
                    raise RuntimeError("the operation fails halfway")
            await _create(mount, b"after")
            assert await _names(mount) == [b"after", b"kept"]
            nursery.cancel_scope.cancel()
        assert await _names(other) == [b"after", b"kept"]
    finally:
        await mount.close()
        await other.close()


async def test_a_durable_transaction_commits_the_group_and_syncs_the_wal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mount, other = await _pair(tmp_path)
    synced: list[int] = []
    real = os.fdatasync

    def spy(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", spy)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(mount.run_group_commits, NEVER_S)
            await _create(mount, b"a")
            assert synced == []
            async with mount.transaction(durable=True):
                pass  # what fsync of a file with nothing new to seal does
            assert await _names(other) == [b"a"]
            assert synced == [os.stat(f"{tmp_path / 'meta.db'}-wal").st_ino]
            nursery.cancel_scope.cancel()
    finally:
        await mount.close()
        await other.close()
