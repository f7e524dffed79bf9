"""The namespace's "no extended attributes" fact (single mount): the kernel asks for
security.capability before every write(2), and an inode known to hold no xattr is
answered without SQL. These tests check that the answers stay right around it."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from cloudfs.cache import CacheDir
from cloudfs.chunking import ChunkerParams
from cloudfs.errors import FSOpError
from cloudfs.files import FileStore
from cloudfs.meta.sqlite import SqliteMetaStore
from cloudfs.namespace import Caller, Namespace

CAP = b"security.capability"
CALLER = Caller(uid=0, gid=0)


class Env:
    """A namespace over SQLite metadata in a cache dir (the fact is kept only there:
    without other mounts)."""

    def __init__(self, root: Path) -> None:
        cache = CacheDir(root / "cache")
        cache.create()
        self.meta = SqliteMetaStore(cache.meta_path)

        async def fetch(ids: list[bytes], prefetch: list[bytes]) -> None:
            raise AssertionError("these tests read no file")

        self.files = FileStore(
            self.meta, cache, id_key=b"i" * 32, gear_key=b"g" * 32,
            chunker=ChunkerParams(64, 256, 1024), fetch=fetch, on_sealed=lambda: None,
            origin="test",
        )  # fmt: skip
        self.ns = Namespace(self.meta, self.files)
        self._names = 0

    async def setup(self) -> int:
        """A new regular file in the root; its inode."""
        if not await self.meta.is_initialized():
            await self.meta.initialize("00000000-0000-0000-0000-000000000000", uid=0, gid=0)
        self._names += 1
        attrs = await self.ns.mknod(1, b"f%d" % self._names, 0o100644, 0, CALLER)
        return attrs.id


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    env = Env(tmp_path)
    yield env
    trio.run(env.meta.close)


class Statements:
    """Counts the SQL statements the metadata store runs."""

    def __init__(self, env: Env) -> None:
        self.count = 0
        env.meta.db.set_trace_callback(self._one)

    def _one(self, sql: str) -> None:
        self.count += 1

    def take(self) -> int:
        n, self.count = self.count, 0
        return n


async def _enodata(ns: Namespace, ino: int, name: bytes) -> None:
    with pytest.raises(FSOpError) as info:
        await ns.getxattr(ino, name)
    assert info.value.errno == errno.ENODATA


async def test_new_inode_answers_without_sql_and_stays_right(env: Env) -> None:
    ino = await env.setup()  # mknod: born without xattrs
    env.ns.remember(ino)
    sql = Statements(env)
    await _enodata(env.ns, ino, CAP)
    assert sql.take() == 0
    await env.ns.setxattr(ino, b"user.k", b"v")
    assert await env.ns.getxattr(ino, b"user.k") == b"v"
    await _enodata(env.ns, ino, CAP)
    assert sql.take() > 0  # no fact any more: asked the database
    await env.ns.removexattr(ino, b"user.k")
    await _enodata(env.ns, ino, b"user.k")


async def test_fact_learned_from_the_database_and_dropped_at_forget(env: Env) -> None:
    plain = await env.setup()
    tagged = await env.setup()
    await env.ns.setxattr(tagged, b"user.k", b"v")
    ns = Namespace(env.meta, env.files)  # a new mount: knows no fact yet
    sql = Statements(env)
    for ino in (plain, tagged):
        ns.remember(ino)
        await _enodata(ns, ino, CAP)
        assert sql.take() > 0
    await _enodata(ns, plain, CAP)
    assert sql.take() == 0  # learned: no xattr at all
    await _enodata(ns, tagged, CAP)
    assert sql.take() > 0  # it has one, so every name is asked for
    assert await ns.getxattr(tagged, b"user.k") == b"v"
    await ns.setxattr(plain, b"user.new", b"1")
    assert await ns.getxattr(plain, b"user.new") == b"1"
    await ns.removexattr(plain, b"user.new")
    await _enodata(ns, plain, CAP)  # learned again
    await ns.forget([(plain, 1)])  # the kernel forgot it: so does the fact
    sql.take()
    ns.remember(plain)
    await _enodata(ns, plain, CAP)
    assert sql.take() > 0


async def test_no_fact_with_other_mounts(env: Env) -> None:
    ino = await env.setup()
    ns = Namespace(env.meta, env.files)
    ns.shared = True  # shared mode: other mounts set xattrs
    ns.remember(ino)
    sql = Statements(env)
    for _ in range(2):
        await _enodata(ns, ino, CAP)
        assert sql.take() > 0
