"""Versions, snapshots and the trash called directly (issue 6), on SQLite and MariaDB:
the SQL of cloudfs.versions, cloudfs.snapshots and cloudfs.trash on both engines, and
the invariants every change keeps (refcounts equal extent rows, nlink equals names)."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from historyutil import CALLER, Env

from cloudfs import clients, snapshots, trash
from cloudfs.meta.schema import BLOCK_DELETING, ROOT_INODE


@pytest.fixture(params=["sqlite", "mysql"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    url = request.getfixturevalue("mysql_url") if request.param == "mysql" else None
    e = Env(tmp_path, url)
    yield e
    trio.run(e.meta.close)


async def _nlinks_match(env: Env) -> None:
    async with env.meta.reading() as tx:
        rows = await tx.conn.query(
            "SELECT i.id, i.mode, i.nlink, (SELECT COUNT(*) FROM dentries d WHERE d.inode = i.id),"
            " (SELECT COUNT(*) FROM dentries d JOIN inodes c ON c.id = d.inode"
            "  WHERE d.parent = i.id AND (c.mode & 61440) = 16384) FROM inodes i"
        )
        roots = {r[0] for r in await tx.conn.query("SELECT root FROM snapshots")}
    for ino, mode, nlink, names, subdirs in rows:
        named = names > 0 or ino == ROOT_INODE or ino in roots
        if stat.S_ISDIR(mode):
            assert nlink == (2 + subdirs if named else 0), f"directory {ino}"
        else:
            assert nlink == names + (1 if ino in roots else 0), f"inode {ino}"


async def _tree(env: Env) -> tuple[int, dict[str, bytes]]:
    """/src with a subdirectory, files (one with two names), a symlink and an xattr."""
    await env.file()  # initializes the filesystem
    src = (await env.ns.mkdir(ROOT_INODE, b"src", 0o755, CALLER)).id
    sub = (await env.ns.mkdir(src, b"sub", 0o750, CALLER)).id
    contents = {"a": os.urandom(5000), "sub/b": os.urandom(3000), "sub/empty": b""}
    for name, data in contents.items():
        parent = sub if name.startswith("sub/") else src
        ino = (await env.ns.mknod(parent, name.split("/")[-1].encode(), 0o100640, 0, CALLER)).id
        if data:
            await env.files.open(ino)
            await env.files.write(ino, 0, data)
            await env.files.release(ino)
    a = await env.ns.lookup(src, b"a")
    await env.ns.link(a.id, sub, b"a-again")
    await env.ns.symlink(src, b"link", b"sub/b", CALLER)
    await env.ns.setxattr(sub, b"user.k", b"v")
    return src, contents


async def _read_tree(env: Env, root: int) -> dict[str, tuple]:
    out: dict[str, tuple] = {}

    async def walk(ino: int, prefix: str) -> None:
        for name, attrs, _cookie in await env.ns.readdir(ino, 2, 1000):
            path = prefix + name.decode()
            if stat.S_ISDIR(attrs.mode):
                out[path] = (
                    "dir",
                    attrs.mode,
                    attrs.nlink,
                    tuple(await env.ns.listxattr(attrs.id)),
                )
                await walk(attrs.id, path + "/")
            elif stat.S_ISLNK(attrs.mode):
                out[path] = ("link", await env.ns.readlink(attrs.id))
            else:
                data = await env.files.read(attrs.id, 0, attrs.size + 1)
                out[path] = ("file", attrs.mode, attrs.nlink, data)

    await walk(root, "")
    return out


async def test_snapshots_copy_and_free(env: Env) -> None:
    src, _contents = await _tree(env)
    before = await _read_tree(env, src)
    async with env.meta.transaction() as tx:
        copy, count = await snapshots.create_at(
            tx, src, ROOT_INODE, b"copy", readonly=True, origin="t", now_ns=time.time_ns()
        )
        named, _ = await snapshots.create_named(
            tx, src, b"snap", b"/src", origin="t", now_ns=time.time_ns()
        )
        assert await snapshots.readonly_among(tx, [copy]) and not await snapshots.readonly_among(
            tx, [src]
        )
    assert count == 6  # src, sub, a (two names, one inode), b, empty, link
    assert await _read_tree(env, copy) == before
    assert await _read_tree(env, named) == before
    await env.refcounts_match()
    await _nlinks_match(env)
    async with env.meta.transaction() as tx:
        assert await snapshots.unlock(tx, copy) == count
        assert not await snapshots.readonly_among(tx, [copy])
        with pytest.raises(Exception, match="stays read-only"):
            await snapshots.unlock(tx, named)
        assert await snapshots.delete_named(tx, b"snap", time.time_ns()) == count
        assert await snapshots.list_snapshots(tx) == []
    await env.refcounts_match()
    await _nlinks_match(env)
    assert await _read_tree(env, copy) == before


async def test_trash_keeps_and_restores_a_tree(env: Env) -> None:
    src, _contents = await _tree(env)
    before = await _read_tree(env, src)
    sub = (await env.ns.lookup(src, b"sub")).id
    for name in (b"a-again", b"b", b"empty"):
        await env.ns.unlink(sub, name)
    await env.ns.rmdir(src, b"sub")
    await env.ns.unlink(src, b"a")  # its last name: into the trash
    async with env.meta.reading() as tx:
        paths = [e.path for e in await trash.entries(tx)]
    # every name removed is kept, also one of a file that keeps another
    assert paths == [b"/src/sub/a-again", b"/src/sub/b", b"/src/sub/empty", b"/src/sub",
                     b"/src/a"]  # fmt: skip
    await env.refcounts_match()
    await _nlinks_match(env)
    async with env.meta.transaction() as tx:
        restored = await trash.restore(tx, b"/src/sub", now_ns=time.time_ns())
        assert [p for p, _i in restored] == [
            b"/src/sub", b"/src/sub/a-again", b"/src/sub/b", b"/src/sub/empty"
        ]  # fmt: skip
        await trash.restore(tx, b"/src/a", now_ns=time.time_ns())
    # the hard-linked file comes back with both its names
    assert await _read_tree(env, src) == before
    await _nlinks_match(env)
    await env.ns.unlink(src, b"a")
    async with env.meta.transaction() as tx:
        assert await trash.purge_older(tx, time.time_ns() + 1, time.time_ns()) == 1
    await env.refcounts_match()
    await _nlinks_match(env)


async def test_trash_paths_of_deep_and_cut_off_directories(env: Env) -> None:
    """A path deeper than one ancestor query climbs (trash._LEVELS_PER_QUERY levels) is
    whole; a directory whose chain to the root is cut shows as '?' above the cut."""
    await env.file()  # initializes the filesystem
    depth = trash._LEVELS_PER_QUERY + 5
    names = [b"d%d" % i for i in range(depth)]
    ino = ROOT_INODE
    for name in names:
        ino = (await env.ns.mkdir(ino, name, 0o755, CALLER)).id
    await env.ns.mknod(ino, b"f", stat.S_IFREG | 0o644, 0, CALLER)
    await env.ns.unlink(ino, b"f")
    async with env.meta.transaction() as tx:
        [entry] = await trash.entries(tx)
        assert entry.path == b"/" + b"/".join([*names, b"f"])
        # cut the chain: the entry of d2 goes (as a damaged database might have it)
        d0 = await tx.lookup(ROOT_INODE, b"d0")
        d1 = await tx.lookup(d0 or 0, b"d1")
        d2 = await tx.lookup(d1 or 0, b"d2")
        assert await tx.remove_dentry(d0 or 0, b"d1")
        assert await trash.path_of(tx, ino, b"g") == b"/?/" + b"/".join([*names[2:], b"g"])
        assert d2 is not None and await trash.path_of(tx, d2, b"g") == b"/?/d2/g"


async def test_restore_into_makes_a_new_version(env: Env) -> None:
    first, second = os.urandom(4000), os.urandom(7000)
    ino = await env.file(first, second)
    await env.files.restore(ino, 1)
    assert await env.files.read(ino, 0, 10_000) == first
    async with env.meta.reading() as tx:
        versions = await tx.versions(ino)
    assert [(v.version, v.size, v.flags) for v in versions] == [(1, 4000, 0), (2, 7000, 0),
                                                                 (3, 4000, 2)]  # fmt: skip
    other = await env.file()
    await env.files.restore(ino, 2, into=other)
    assert await env.files.read(other, 0, 10_000) == second
    await env.refcounts_match()


async def test_upgrade_from_schema_3_adds_the_trash_columns(env: Env) -> None:
    from cloudfs.meta import migrate

    uuid = "00000000-0000-0000-0000-000000000000"
    ino = await env.file(b"kept")
    async with env.meta.transaction() as tx:  # back to schema 3
        await tx.conn.execute("ALTER TABLE trash DROP COLUMN remover")
        await tx.conn.execute("ALTER TABLE trash DROP COLUMN parent_mtime_ns")
        await tx.conn.execute(
            "INSERT INTO trash (inode, path, deleted_ns) VALUES (?, ?, ?)", (ino, b"/old", 5)
        )
        await tx.set_info("schema_version", "3")
    assert await migrate.upgrade(env.meta, uuid) == [4, 5, 6]
    assert await migrate.upgrade(env.meta, uuid) == []
    async with env.meta.transaction() as tx:
        (old,) = await trash.entries(tx)
        assert (old.path, old.remover, old.parent_mtime_ns) == (b"/old", "", None)

async def _count_inodes(env: Env) -> int:
    async with env.meta.reading() as tx:
        row = await tx.conn.query_one("SELECT COUNT(*) FROM inodes")
    assert row is not None
    return int(row[0])


async def test_a_copy_in_batches_is_one_instant_and_an_unfinished_one_is_freed(env: Env) -> None:
    """The mount's way (mount/history.py): read once, write in batches, name last."""
    src, _contents = await _tree(env)
    before = await _read_tree(env, src)
    inodes_before = await _count_inodes(env)
    async with env.meta.detached_reading() as tx:
        source = await snapshots.read_source(tx, src)

    async def batch(copy: snapshots.TreeCopy) -> None:
        async with env.meta.transaction() as tx:
            copy.advance(await copy.write_batch(tx, 2))

    copy = snapshots.TreeCopy(source, readonly=False, origin="t", now_ns=time.time_ns())
    await batch(copy)
    # the source changes between two batches: the copy still shows it as read
    a = await env.ns.lookup(src, b"a")
    await env.files.open(a.id)
    await env.files.write(a.id, 0, os.urandom(7000))
    await env.files.release(a.id)
    sub = await env.ns.lookup(src, b"sub")
    await env.ns.unlink(sub.id, b"b")
    while not copy.written:
        await batch(copy)
    async with env.meta.transaction() as tx:
        root = await copy.finish_at(tx, ROOT_INODE, b"copy")
    assert await _read_tree(env, root) == before
    await env.refcounts_match()
    await _nlinks_match(env)
    copied = await _count_inodes(env)
    assert copied == inodes_before + 6

    # a crash after two batches leaves an unnamed tree: the next mount frees it, unless
    # a live mount is still writing it (marked as its holder's)
    writer = clients.Client(env.meta, "/cache/writer")
    await writer.register()
    for holder in (writer, None):
        unfinished = snapshots.TreeCopy(source, readonly=True, origin="t", now_ns=time.time_ns(),
                                        client=holder)  # fmt: skip
        await batch(unfinished)
        await batch(unfinished)
        written = unfinished.inodes_done  # a batch ends early at many extents
        assert 2 < written < unfinished.total
        assert await _count_inodes(env) == copied + written
        await env.ns.free_orphans()
        assert await _count_inodes(env) == (copied + written if holder else copied)
        if holder:
            async with env.meta.transaction() as tx:
                assert await unfinished.discard(tx) == written
        await env.refcounts_match()

    # a block the source stopped naming and a gc pass claimed fails the copy
    unlucky = snapshots.TreeCopy(source, readonly=True, origin="t", now_ns=time.time_ns())
    async with env.meta.transaction() as tx:
        claimed = await tx.conn.execute(
            f"UPDATE blocks SET state = {BLOCK_DELETING} WHERE id IN"
            " (SELECT block FROM extents WHERE inode = ?)",
            (a.id,),
        )
    assert claimed
    with pytest.raises(snapshots.SourceChanged):
        while not unlucky.written:
            await batch(unlucky)
    async with env.meta.transaction() as tx:
        await unlucky.discard(tx)
    assert await _count_inodes(env) == copied


async def test_an_inode_unlinked_elsewhere_is_freed_when_the_heartbeat_releases_it(
    env: Env,
) -> None:
    """Shared mode with two mounts on one database: A wrote a file and closed it, and
    its hold stays until A's heartbeat; B removes the file meanwhile (no trash) and
    must leave it to A. A's heartbeat releases the hold and frees the inode, though A's
    kernel still knows it (B could not have seen that either)."""
    from dataclasses import replace

    from historyutil import PARAMS

    from cloudfs import retention
    from cloudfs.files import FileStore
    from cloudfs.namespace import Namespace

    ino = await env.file()
    async with env.meta.transaction() as tx:
        await retention.save(tx, replace(await retention.load(tx), trash=0))
        (name,) = await tx.conn.query_one("SELECT name FROM dentries WHERE inode = ?", (ino,))
    a, b = clients.Client(env.meta, "/cache/a"), clients.Client(env.meta, "/cache/b")
    for c in (a, b):
        await c.register()
    env.ns.client = env.files.client = a
    b_files = FileStore(
        env.meta, env.cache, id_key=b"i" * 32, gear_key=b"g" * 32, chunker=PARAMS,
        fetch=env.files._fetch, on_sealed=lambda: None, origin="b",
    )  # fmt: skip
    b_ns = Namespace(env.meta, b_files)
    b_ns.client = b_files.client = b

    await env.files.open(ino)
    await env.files.write(ino, 0, b"shared")
    await env.files.release(ino)  # A's last close: the hold stays
    env.ns.kernel_refs.add(ino)  # A's kernel knows the inode
    await b_ns.unlink(ROOT_INODE, bytes(name))
    async with env.meta.reading() as tx:
        attrs = await tx.get_inode(ino)
        assert attrs is not None and attrs.nlink == 0, "left to A, which holds it"
    nameless = await a.heartbeat()
    assert nameless == [ino]
    await env.ns.released(nameless)
    async with env.meta.reading() as tx:
        assert await tx.get_inode(ino) is None
        assert await clients.held_inodes(tx) == set()
    await env.refcounts_match()
