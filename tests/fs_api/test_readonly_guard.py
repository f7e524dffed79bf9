"""The EROFS guards of a single mount (cloudfs.mount.history) called directly: while no
inode is read-only they ask the database nothing, and every way a read-only tree
appears or goes makes them ask again."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from cloudfs.mount import history
from cloudfs.mount.history import HistoryOperations
from historyutil import CALLER, Env

from cloudfs.errors import FSOpError
from cloudfs.meta.schema import ROOT_INODE


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path, None)
    yield e
    trio.run(e.meta.close)


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every per-operation read-only query the guards make."""
    asked: list[str] = []
    for name in ("readonly_entry", "readonly_among"):
        real = getattr(history, name)

        async def spy(*args: Any, _real: Any = real, _name: str = name) -> bool:
            asked.append(_name)
            return bool(await _real(*args))

        monkeypatch.setattr(history, name, spy)
    return asked


async def _guards(ops: HistoryOperations, parent: int, name: bytes, ino: int) -> None:
    """What an unlink, a create and a chmod of these ask before they change anything."""
    await ops._may_remove(parent, name)
    await ops._may_create(parent, b"new")
    await ops._refuse_readonly(ino)


async def test_guards_ask_nothing_until_a_read_only_tree_exists(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = _counting(monkeypatch)
    ops = HistoryOperations(env.ns, env.files)

    async def no_kernel(inodes: list[int]) -> None:
        return None  # no FUSE session here to invalidate anything in

    monkeypatch.setattr(ops, "_invalidate", no_kernel)
    ino = await env.file(b"some bytes")
    (name,) = [n for n, a, _c in await env.ns.readdir(ROOT_INODE, 0) if a.id == ino]
    src = (await env.ns.mkdir(ROOT_INODE, b"src", 0o755, CALLER)).id
    inside = (await env.ns.mknod(src, b"f", 0o100644, 0, CALLER)).id

    await _guards(ops, ROOT_INODE, name, ino)
    await _guards(ops, src, b"f", inside)
    assert asked == []  # no read-only inode: the first guard found that out once

    # a read-only copy: from its start every guard asks, and refuses inside it
    made = await ops._cmd_snapshot(
        {"source": src, "parent": ROOT_INODE, "dst": b"ro".hex(), "readonly": True}, None
    )
    ro = made["root"]
    (ro_file,) = [a.id for n, a, _c in await env.ns.readdir(ro, 0) if n == b"f"]
    with pytest.raises(FSOpError) as err:
        await ops._may_remove(ro, b"f")
    assert err.value.errno == errno.EROFS
    with pytest.raises(FSOpError) as err:
        await ops._refuse_readonly(ro_file)
    assert err.value.errno == errno.EROFS
    await _guards(ops, ROOT_INODE, name, ino)  # outside it: allowed, but asked
    assert asked

    # unlocked: the next guard finds no read-only inode left, and asks nothing again
    await ops._cmd_unlock({"inode": ro}, None)
    await ops._may_remove(ro, b"f")
    asked.clear()
    await _guards(ops, ro, b"f", ro_file)
    assert asked == []

    # a writable copy: the guards look once more after it, and find nothing
    await ops._cmd_snapshot({"source": src, "parent": ROOT_INODE, "dst": b"rw".hex()}, None)
    await ops._may_remove(ROOT_INODE, name)
    asked.clear()
    await _guards(ops, ROOT_INODE, name, ino)
    assert asked == []

    # a named snapshot is read-only too; deleting it makes the guards look again
    await ops._cmd_snapshot({"source": src, "name": b"monday".hex(), "path": "/src"}, None)
    await _guards(ops, ROOT_INODE, name, ino)
    assert asked
    await ops._cmd_snapshot_delete({"name": b"monday".hex()}, None)
    await ops._may_remove(ROOT_INODE, name)
    asked.clear()
    await _guards(ops, ROOT_INODE, name, ino)
    assert asked == []


async def test_shared_mode_guards_always_ask(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another mount may make a read-only tree at any time."""
    asked = _counting(monkeypatch)
    ops = HistoryOperations(env.ns, env.files, shared=True)
    ino = await env.file(b"x")
    (name,) = [n for n, a, _c in await env.ns.readdir(ROOT_INODE, 0) if a.id == ino]
    await _guards(ops, ROOT_INODE, name, ino)
    await _guards(ops, ROOT_INODE, name, ino)
    assert asked.count("readonly_entry") == 2 and asked.count("readonly_among") == 4
