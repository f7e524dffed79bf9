"""The MetaStore contract (cloudfs.meta.base), run against every metadata engine: SQLite
and a private MariaDB server (tests/conftest.py). Every Txn method, transactions that
roll back, concurrent transactions of two stores on one database, and conflicts."""

from __future__ import annotations

import hashlib
import itertools
import re
from time import time_ns
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from cloudfs.errors import (
    MetadataMismatch,
    MetadataMissing,
    MetadataOutdated,
    TransactionConflict,
    UnsupportedFormat,
)
from cloudfs.meta import migrate, open_meta, schema
from cloudfs.meta.base import RUN_ATTEMPTS, Extent, MetaStore, Txn
from cloudfs.meta.schema import (
    BLOCK_DELETING,
    BLOCK_PENDING,
    BLOCK_REVIVED,
    BLOCK_STORED,
    ROOT_INODE,
)

FS_UUID = "6f1c3a52-8a5e-4d3b-9a51-0c1d2e3f4a5b"
OTHER_UUID = "0b2a7c1e-0000-4000-8000-000000000001"
NOW = 1_700_000_000_000_000_000
FILE = 0o100644
DIR = 0o40755

Opener = Callable[[], MetaStore]


@pytest.fixture(params=["sqlite", "mysql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Opener]]:
    """(engine name, a function opening one more store on the same fresh database)."""
    if request.param == "sqlite":
        url = str(tmp_path / "meta.db")
    else:
        url = request.getfixturevalue("mysql_url")
    opened: list[MetaStore] = []

    def open_one() -> MetaStore:
        meta = open_meta(url)
        opened.append(meta)
        return meta

    yield request.param, open_one
    for meta in opened:
        trio.run(meta.close)


@pytest.fixture
def opener(engine: tuple[str, Opener]) -> Opener:
    return engine[1]


async def fresh(opener: Opener) -> MetaStore:
    meta = opener()
    await meta.initialize(FS_UUID, uid=1000, gid=100, now_ns=NOW)
    return meta


def block_id(n: int) -> bytes:
    return hashlib.sha256(b"block %d" % n).digest()


# --- schema, identity, versions --------------------------------------------------------------


async def test_initialize_and_check(opener: Opener) -> None:
    meta = opener()
    assert not await meta.is_initialized()
    with pytest.raises(MetadataMissing):
        await meta.check(FS_UUID)
    await meta.initialize(FS_UUID, uid=1000, gid=100, now_ns=NOW)
    assert await meta.is_initialized()
    assert await meta.check(FS_UUID) == schema.SCHEMA_VERSION
    with pytest.raises(MetadataMismatch, match=FS_UUID):
        await meta.check(OTHER_UUID)
    async with meta.reading() as tx:
        root = await tx.get_inode(ROOT_INODE)
        assert await tx.get_info("fs_uuid") == FS_UUID
    assert root is not None
    assert (root.mode, root.uid, root.gid, root.nlink, root.mtime_ns) == (DIR, 1000, 100, 2, NOW)
    # a second store on the same database sees the filesystem
    assert await opener().check(FS_UUID) == schema.SCHEMA_VERSION


async def test_newer_and_older_schema_are_refused(opener: Opener) -> None:
    meta = await fresh(opener)
    async with meta.transaction() as tx:
        await tx.set_info("schema_version", str(schema.SCHEMA_VERSION + 1))
    with pytest.raises(UnsupportedFormat, match="schema"):
        await meta.check(FS_UUID)
    async with meta.transaction() as tx:
        await tx.set_info("schema_version", str(schema.SCHEMA_VERSION - 1))
    with pytest.raises(MetadataOutdated):
        await meta.check(FS_UUID)
    assert await meta.check(FS_UUID, older_ok=True) == schema.SCHEMA_VERSION - 1


async def test_wipe_removes_the_filesystem(opener: Opener) -> None:
    meta = await fresh(opener)
    await meta.wipe()
    assert not await meta.is_initialized()
    await meta.initialize(OTHER_UUID, uid=0, gid=0)
    assert await meta.check(OTHER_UUID) == schema.SCHEMA_VERSION


async def test_info(opener: Opener) -> None:
    meta = await fresh(opener)
    async with meta.transaction() as tx:
        assert await tx.get_info("retention") is None
        await tx.set_info("retention", "30d")
        await tx.set_info("retention", "30d")  # unchanged value: still one row
        await tx.set_info("retention", "7d")
    async with meta.reading() as tx:
        assert await tx.get_info("retention") == "7d"


# --- inodes ------------------------------------------------------------------------------


async def test_inodes(opener: Opener) -> None:
    meta = await fresh(opener)
    async with meta.transaction() as tx:
        a = await tx.create_inode(mode=FILE, uid=1, gid=2, nlink=1, now_ns=NOW, rdev=0)
        b = await tx.create_inode(mode=0o20644, uid=1, gid=2, nlink=1, now_ns=NOW, rdev=0x0801)
    assert a.id != b.id and ROOT_INODE not in (a.id, b.id)
    async with meta.transaction() as tx:
        await tx.update_inode(a.id, size=1 << 40, mtime_ns=NOW + 5, mode=0o100600)
        await tx.update_inode(a.id, uid=1)  # unchanged value
        await tx.add_nlink(a.id, 2, NOW + 7)
        with pytest.raises(ValueError):
            await tx.update_inode(a.id, id=99)
    async with meta.reading() as tx:
        got = await tx.get_inode(a.id)
        dev = await tx.get_inode(b.id)
        assert await tx.get_inode(10_000) is None
    assert got is not None and dev is not None
    assert (got.size, got.mtime_ns, got.ctime_ns, got.mode, got.nlink) == (
        1 << 40, NOW + 5, NOW + 7, 0o100600, 3,
    )  # fmt: skip
    assert dev.rdev == 0x0801


async def test_orphans_and_free_inode(opener: Opener) -> None:
    meta = await fresh(opener)
    async with meta.transaction() as tx:
        ino = (await tx.create_inode(mode=FILE, uid=0, gid=0, nlink=1, now_ns=NOW)).id
        await tx.add_dentry(ROOT_INODE, b"f", ino)
        await tx.add_block_refs({block_id(1): (100, 1), block_id(2): (50, 1)}, NOW)
        await tx.add_extents(ino, 1, [Extent(0, 100, block_id(1)), Extent(100, 50, block_id(2))])
        await tx.add_version(ino, 1, size=150, mtime_ns=NOW, origin="here")
        await tx.set_xattr(ino, b"user.a", b"1")
        assert await tx.orphan_inodes() == []
        await tx.remove_dentry(ROOT_INODE, b"f")
        await tx.add_nlink(ino, -1, NOW)
        assert await tx.orphan_inodes() == [ino]
        await tx.free_inode(ino, NOW + 1)
    async with meta.reading() as tx:
        assert await tx.get_inode(ino) is None
        assert await tx.orphan_inodes() == []
        assert await tx.live_extents(ino) == []
        assert await tx.versions(ino) == []
        assert await tx.list_xattrs(ino) == []
        b1 = await tx.get_block(block_id(1))
    assert b1 is not None and b1.refcount == 0


# --- directory entries ------------------------------------------------------------------------

# Names that compare equal under some text collation but are different byte strings,
# names that are not UTF-8, and names of the longest length (255 bytes).
TRICKY_NAMES = [
    b"a", b"A", b"a ", b" a", b"\xc3\xa9", b"e\xcc\x81", b"\xff\xfe\x80", b"\x01",
    b"x" * 255, bytes(range(1, 256)).replace(b"/", b"_"), b"\xf0\x9f\x98\x80", b"%s?%%",
]  # fmt: skip


async def test_binary_names(opener: Opener) -> None:
    meta = await fresh(opener)
    assert all(len(n) <= 255 for n in TRICKY_NAMES)
    async with meta.transaction() as tx:
        for i, name in enumerate(TRICKY_NAMES):
            ino = (await tx.create_inode(mode=FILE, uid=0, gid=0, nlink=1, now_ns=NOW + i)).id
            await tx.add_dentry(ROOT_INODE, name, ino)
    async with meta.reading() as tx:
        found = {name: await tx.lookup(ROOT_INODE, name) for name in TRICKY_NAMES}
        listed = await tx.readdir(ROOT_INODE, 0, 100)
        assert await tx.lookup(ROOT_INODE, b"a\x00") is None
        assert await tx.lookup(ROOT_INODE, b"x" * 254) is None
    assert len(set(found.values())) == len(TRICKY_NAMES), "every name is its own entry"
    assert [name for _, name, _ in listed] == TRICKY_NAMES, "names come back byte for byte"


async def test_dentries(opener: Opener) -> None:
    meta = await fresh(opener)
    async with meta.transaction() as tx:
        d = (await tx.create_inode(mode=DIR, uid=0, gid=0, nlink=2, now_ns=NOW)).id
        f = (await tx.create_inode(mode=FILE, uid=0, gid=0, nlink=1, now_ns=NOW)).id
        g = (await tx.create_inode(mode=FILE, uid=0, gid=0, nlink=1, now_ns=NOW)).id
        await tx.add_dentry(ROOT_INODE, b"d", d)
        await tx.add_dentry(d, b"f", f)
        assert await tx.has_entries(d)
        assert await tx.parent_of(d) == ROOT_INODE
        await tx.set_dentry_inode(d, b"f", g)
        assert await tx.lookup(d, b"f") == g
        assert await tx.remove_dentry(d, b"f")
        assert not await tx.remove_dentry(d, b"f")
        assert not await tx.has_entries(d)
        assert await tx.lookup(d, b"f") is None


async def test_readdir_order_and_cookies(opener: Opener) -> None:
    meta = await fresh(opener)
    names = [b"z", b"a", b"m%d" % 3, b"\xff", b"b", b"c", b"y", b"x"]
    async with meta.transaction() as tx:
        for name in names:
            ino = (await tx.create_inode(mode=FILE, uid=0, gid=0, nlink=1, now_ns=NOW)).id
            await tx.add_dentry(ROOT_INODE, name, ino)
    async with meta.reading() as tx:
        first = await tx.readdir(ROOT_INODE, 0, 3)
    assert [n for _, n, _ in first] == names[:3], "creation order, not name order"
    # entries come and go between two pages: the listing resumes after the cookie
    async with meta.transaction() as tx:
        await tx.remove_dentry(ROOT_INODE, b"a")  # already listed
        await tx.remove_dentry(ROOT_INODE, b"b")  # not yet listed
        new = (await tx.create_inode(mode=FILE, uid=0, gid=0, nlink=1, now_ns=NOW)).id
        await tx.add_dentry(ROOT_INODE, b"new", new)
    async with meta.reading() as tx:
        rest = await tx.readdir(ROOT_INODE, first[-1][0], 100)
        assert await tx.readdir(ROOT_INODE, rest[-1][0], 100) == []
    assert [n for _, n, _ in rest] == [b"\xff", b"c", b"y", b"x", b"new"]
    ids = [i for i, _, _ in first + rest]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


async def test_readdir_with_attributes(opener: Opener) -> None:
    meta = await fresh(opener)
    async with meta.transaction() as tx:
        made = []
        for i, name in enumerate([b"b", b"\xff", b"a"]):
            attrs = await tx.create_inode(mode=FILE, uid=i, gid=0, nlink=1, now_ns=NOW + i)
            await tx.add_dentry(ROOT_INODE, name, attrs.id)
            made.append((name, attrs))
        await tx.add_dentry(ROOT_INODE, b"dangling", 99_999)  # names no inode
    async with meta.reading() as tx:
        plain = await tx.readdir(ROOT_INODE, 0, 10)
        first = await tx.readdir_attrs(ROOT_INODE, 0, 2)
        rest = await tx.readdir_attrs(ROOT_INODE, first[-1][0], 10)
    assert [(n, a) for _, n, a in first + rest] == made
    assert [i for i, _, _ in first + rest] == [i for i, _, _ in plain[:3]]


# --- symlinks and xattrs ----------------------------------------------------------------------


async def test_symlinks(opener: Opener) -> None:
    meta = await fresh(opener)
    target = b"../\xff\xfe/" + b"t" * 4000
    async with meta.transaction() as tx:
        ino = (await tx.create_inode(mode=0o120777, uid=0, gid=0, nlink=1, now_ns=NOW)).id
        await tx.set_symlink(ino, target)
    async with meta.reading() as tx:
        assert await tx.get_symlink(ino) == target
        assert await tx.get_symlink(ROOT_INODE) is None


async def test_xattrs(opener: Opener) -> None:
    meta = await fresh(opener)
    big = bytes(range(256)) * 256  # 64 KiB, every byte value
    async with meta.transaction() as tx:
        await tx.set_xattr(ROOT_INODE, b"user.b", b"1")
        await tx.set_xattr(ROOT_INODE, b"user.a", big)
        await tx.set_xattr(ROOT_INODE, b"user.\xff", b"")
        await tx.set_xattr(ROOT_INODE, b"user.b", b"2")  # replaces
        await tx.set_xattr(ROOT_INODE, b"user.b", b"2")  # same value again
    async with meta.reading() as tx:
        assert await tx.list_xattrs(ROOT_INODE) == [b"user.a", b"user.b", b"user.\xff"]
        assert await tx.get_xattr(ROOT_INODE, b"user.a") == big
        assert await tx.get_xattr(ROOT_INODE, b"user.b") == b"2"
        assert await tx.get_xattr(ROOT_INODE, b"user.\xff") == b""
        assert await tx.get_xattr(ROOT_INODE, b"user.B") is None
    async with meta.transaction() as tx:
        assert await tx.remove_xattr(ROOT_INODE, b"user.a")
        assert not await tx.remove_xattr(ROOT_INODE, b"user.a")
        assert await tx.list_xattrs(ROOT_INODE) == [b"user.b", b"user.\xff"]


# --- extents, versions, blocks ----------------------------------------------------------------


async def test_extents_and_versions(opener: Opener) -> None:
    meta = await fresh(opener)
    b = [block_id(i) for i in range(5)]
    async with meta.transaction() as tx:
        ino = (await tx.create_inode(mode=FILE, uid=0, gid=0, nlink=1, now_ns=NOW)).id
        new = await tx.add_block_refs({b[0]: (100, 1), b[1]: (100, 1), b[2]: (100, 1)}, NOW)
        assert sorted(new) == sorted(b[:3])
        v1 = [Extent(0, 100, b[0]), Extent(100, 100, b[1]), Extent(300, 100, b[2])]  # hole
        await tx.add_extents(ino, 1, v1)
        await tx.update_inode(ino, size=400, version=1)
        await tx.add_version(ino, 1, size=400, mtime_ns=NOW, origin="host-a")
    # version 2 replaces the middle extent; its row stays as history
    async with meta.transaction() as tx:
        assert await tx.add_block_refs({b[3]: (100, 1)}, NOW) == [b[3]]
        await tx.close_extents(ino, 2, [100])
        await tx.add_extents(ino, 2, [Extent(100, 100, b[3])])
        await tx.add_version(ino, 2, size=400, mtime_ns=NOW + 1, origin="host-b", flags=1)
    async with meta.reading() as tx:
        live = await tx.live_extents(ino)
        window = await tx.live_extents(ino, 150, 301)
        v1_rows = await tx.version_extents(ino, 1)
        v2_rows = await tx.version_extents(ino, 2)
        versions = await tx.versions(ino)
    assert [(e.offset, e.block, e.v_from) for e in live] == [
        (0, b[0], 1), (100, b[3], 2), (300, b[2], 1),
    ]  # fmt: skip
    assert [e.offset for e in window] == [100, 300], "overlap with [150, 301)"
    assert [e.block for e in v1_rows] == [b[0], b[1], b[2]]
    assert [e.block for e in v2_rows] == [b[0], b[3], b[2]]
    assert [(v.version, v.size, v.origin, v.flags) for v in versions] == [
        (1, 400, "host-a", 0), (2, 400, "host-b", 1),
    ]  # fmt: skip
    assert versions[1].committed_ns >= versions[0].committed_ns > 0
    # an unpublished extent is dropped outright and loses its block reference
    async with meta.transaction() as tx:
        await tx.add_block_refs({b[4]: (10, 2)}, NOW)  # two extents share b4
        await tx.add_extents(ino, 3, [Extent(400, 10, b[4]), Extent(410, 10, b[4])])
        await tx.drop_extents(ino, [Extent(400, 10, b[4]), Extent(410, 10, b[4])], NOW + 9)
    async with meta.reading() as tx:
        assert [e.offset for e in await tx.live_extents(ino)] == [0, 100, 300]
        row = await tx.get_block(b[4])
        still = await tx.get_block(b[1])
    assert row is not None and row.refcount == 0
    assert still is not None and still.refcount == 1, "history keeps its reference"
    # st_blocks: the live extents' bytes (history and holes excluded), per inode
    async with meta.reading() as tx:
        other = (await tx.get_inode(1)).id  # the root: no extents
        assert await tx.count_allocated([ino, other]) == {ino: 300}
        assert await tx.count_allocated([]) == {}
        # ... which the inode row keeps, changed by every add, close and drop above
        attrs = await tx.get_inode(ino)
        assert attrs is not None and attrs.sealed_allocated == 300


async def test_pending_pages_walk_every_pending_block_once(opener: Opener) -> None:
    """The uploader's scan (pending_page): pages with a cursor cover every pending block
    exactly once, blocks stored meanwhile drop out, and on SQLite a page costs no sort
    of all pending blocks (the index on state is walked in rowid order)."""
    meta = await fresh(opener)
    ids = [block_id(i) for i in range(11)]
    async with meta.transaction() as tx:
        await tx.add_block_refs({i: (100 + n, 1) for n, i in enumerate(ids)}, NOW)
        await tx.mark_stored(ids[3], 50)
    seen: list[bytes] = []
    after: object = None
    pages = 0
    while True:
        async with meta.reading() as tx:
            page, after = await tx.pending_page(4, after)
        if pages == 0:
            async with meta.transaction() as tx:
                await tx.mark_stored(ids[9], 50)  # stored while the scan runs
        seen += [i for i, _size in page]
        pages += 1
        if after is None:
            break
    expected = set(ids) - {ids[3], ids[9]}
    assert len(seen) == len(set(seen)) and expected <= set(seen) <= expected | {ids[9]}
    assert pages <= 3
    async with meta.reading() as tx:
        assert await tx.pending_page(4, None) != ([], None)
        if tx.dialect.name == "sqlite":
            plan = await tx.conn.query(
                "EXPLAIN QUERY PLAN SELECT rowid, id, size FROM blocks WHERE state = ?"
                " AND rowid > ? ORDER BY rowid LIMIT ?", (0, -1, 4),
            )  # fmt: skip
            assert not any("TEMP B-TREE" in str(row) for row in plan), plan


async def test_blocks(opener: Opener) -> None:
    meta = await fresh(opener)
    ids = sorted(block_id(i) for i in range(6))
    async with meta.transaction() as tx:
        assert await tx.add_block_refs({i: (1000 + n, 1) for n, i in enumerate(ids)}, NOW) == ids
        assert await tx.add_block_refs({ids[0]: (1000, 2)}, NOW) == []  # known: refs only
        assert await tx.known_blocks([ids[0], block_id(99), ids[5]]) == {ids[0], ids[5]}
    async with meta.reading() as tx:
        page1 = await tx.pending_blocks(4)
        page2 = await tx.pending_blocks(4, after=page1[-1][0])
        assert await tx.pending_summary() == (6, sum(1000 + n for n in range(6)))
    assert [i for i, _ in page1 + page2] == ids, "pending blocks by id, resumable"
    async with meta.transaction() as tx:
        await tx.mark_stored(ids[1], 700)
        await tx.mark_stored(ids[1], 999)  # only a pending block becomes stored
        await tx.unref_blocks([ids[0], ids[0], ids[2]], NOW + 3)
    async with meta.reading() as tx:
        stored = await tx.get_block(ids[1])
        b0 = await tx.get_block(ids[0])
        b2 = await tx.get_block(ids[2])
        assert [i for i, _ in await tx.pending_blocks(10)] == [ids[0], *ids[2:]]
        assert await tx.get_block(block_id(99)) is None
    assert stored is not None and (stored.state, stored.stored_size) == (BLOCK_STORED, 700)
    assert b0 is not None and (b0.refcount, b0.state) == (1, BLOCK_PENDING)
    assert b2 is not None and b2.refcount == 0
    async with meta.reading() as tx:
        unref = await tx.conn.query("SELECT unref_ns FROM blocks WHERE id = ?", (ids[2],))
        kept = await tx.conn.query("SELECT unref_ns FROM blocks WHERE id = ?", (ids[0],))
    assert unref[0][0] == NOW + 3, "when the refcount reached 0"
    assert kept[0][0] is None


async def test_block_refs_of_blocks_stored_first(opener: Opener) -> None:
    """--upload=sync: blocks put before the commit are recorded `stored` by it: a new
    row at once, a `pending` one is marked; a claimed (`deleting`) one is only revived,
    since garbage collection may still delete its object."""
    meta = await fresh(opener)
    fresh_id, pending_id, claimed_id, plain_id = (block_id(i) for i in range(4))
    async with meta.transaction() as tx:
        await tx.add_block_refs({pending_id: (10, 1), claimed_id: (10, 1)}, NOW)
        await tx.conn.execute(
            "UPDATE blocks SET state = ?, refcount = 0 WHERE id = ?", (BLOCK_DELETING, claimed_id)
        )
    stored = {fresh_id: 31, pending_id: 32, claimed_id: 33}
    async with meta.transaction() as tx:
        needs = await tx.add_block_refs(
            {b: (10, 1) for b in (fresh_id, pending_id, claimed_id, plain_id)}, NOW, stored=stored
        )
    assert sorted(needs) == sorted([claimed_id, plain_id])
    async with meta.reading() as tx:
        rows = {b: await tx.get_block(b) for b in (fresh_id, pending_id, claimed_id, plain_id)}
    got = {b: (r.state, r.stored_size, r.refcount) for b, r in rows.items() if r is not None}
    assert got == {
        fresh_id: (BLOCK_STORED, 31, 1), pending_id: (BLOCK_STORED, 32, 2),
        claimed_id: (BLOCK_REVIVED, None, 1), plain_id: (BLOCK_PENDING, None, 1),
    }  # fmt: skip


async def test_known_blocks_many(opener: Opener) -> None:
    meta = await fresh(opener)
    ids = [block_id(i) for i in range(1200)]
    async with meta.transaction() as tx:
        await tx.add_block_refs({i: (1, 1) for i in ids[::2]}, NOW)
        assert await tx.known_blocks(ids) == set(ids[::2])


async def test_stats(opener: Opener) -> None:
    meta = await fresh(opener)
    async with meta.transaction() as tx:
        f = (await tx.create_inode(mode=FILE, uid=0, gid=0, nlink=1, now_ns=NOW, size=300)).id
        await tx.create_inode(mode=DIR, uid=0, gid=0, nlink=2, now_ns=NOW)
        await tx.add_block_refs({block_id(1): (100, 2), block_id(2): (100, 1)}, NOW)
        await tx.add_extents(
            f, 1, [Extent(0, 100, block_id(1)), Extent(100, 100, block_id(1)),
                   Extent(200, 100, block_id(2))],
        )  # fmt: skip
        await tx.mark_stored(block_id(2), 40)
    async with meta.reading() as tx:
        s = await tx.stats()
    assert (s.inodes, s.files, s.logical_bytes) == (3, 1, 300)
    assert (s.blocks, s.block_bytes, s.referenced_bytes) == (2, 200, 300)
    assert (s.stored_bytes, s.stored_plain_bytes) == (40, 100)
    assert (s.pending_blocks, s.pending_bytes) == (1, 100)


# --- transactions -------------------------------------------------------------------------------


class Boom(Exception):
    pass


async def test_exception_rolls_back(opener: Opener) -> None:
    meta = await fresh(opener)
    with pytest.raises(Boom):
        async with meta.transaction() as tx:
            ino = (await tx.create_inode(mode=FILE, uid=0, gid=0, nlink=1, now_ns=NOW)).id
            await tx.add_dentry(ROOT_INODE, b"gone", ino)
            await tx.add_block_refs({block_id(1): (10, 1)}, NOW)
            raise Boom
    async with meta.reading() as tx:
        assert await tx.lookup(ROOT_INODE, b"gone") is None
        assert await tx.get_inode(ino) is None
        assert await tx.get_block(block_id(1)) is None
    # the store is usable afterwards
    async with meta.transaction() as tx:
        await tx.add_dentry(ROOT_INODE, b"kept", ROOT_INODE)
    async with meta.reading() as tx:
        assert await tx.lookup(ROOT_INODE, b"kept") == ROOT_INODE


async def test_duplicate_entry_fails_and_rolls_back(opener: Opener) -> None:
    meta = await fresh(opener)
    async with meta.transaction() as tx:
        await tx.add_dentry(ROOT_INODE, b"dup", 7)
    with pytest.raises(Exception, match="(?i)unique|duplicate"):
        async with meta.transaction() as tx:
            await tx.set_xattr(ROOT_INODE, b"user.x", b"1")
            await tx.add_dentry(ROOT_INODE, b"dup", 8)
    async with meta.reading() as tx:
        assert await tx.lookup(ROOT_INODE, b"dup") == 7
        assert await tx.get_xattr(ROOT_INODE, b"user.x") is None


async def test_cancelled_transaction_rolls_back(opener: Opener) -> None:
    meta = await fresh(opener)
    with trio.move_on_after(0.2):
        async with meta.transaction() as tx:
            await tx.add_dentry(ROOT_INODE, b"cancelled", ROOT_INODE)
            await trio.sleep(10)
    async with meta.transaction() as tx:
        assert await tx.lookup(ROOT_INODE, b"cancelled") is None
        await tx.add_dentry(ROOT_INODE, b"after", ROOT_INODE)
    async with meta.reading() as tx:
        assert await tx.lookup(ROOT_INODE, b"after") == ROOT_INODE


async def test_two_stores_never_lose_an_update(opener: Opener) -> None:
    """Read-modify-write of one row from two stores (two processes' worth of
    connections) and many tasks: every increment survives."""
    a = await fresh(opener)
    b = opener()
    async with a.transaction() as tx:
        ino = (await tx.create_inode(mode=FILE, uid=0, gid=0, nlink=0, now_ns=NOW)).id
        await tx.add_block_refs({block_id(1): (1, 1)}, NOW)

    async def bump(meta: MetaStore) -> None:
        async with meta.transaction() as tx:
            attrs = await tx.get_inode(ino)
            assert attrs is not None
            await tx.update_inode(ino, nlink=attrs.nlink + 1)
            await tx.add_block_refs({block_id(1): (1, 1)}, NOW)

    per_store = 15
    async with trio.open_nursery() as nursery:
        for meta in itertools.chain.from_iterable(itertools.repeat((a, b), per_store)):
            nursery.start_soon(meta.run, bump, meta)
    async with a.reading() as tx:
        attrs = await tx.get_inode(ino)
        row = await tx.get_block(block_id(1))
    assert attrs is not None and attrs.nlink == 2 * per_store
    assert row is not None and row.refcount == 1 + 2 * per_store


async def test_run_gives_up_after_its_attempts(opener: Opener) -> None:
    meta = await fresh(opener)
    calls = 0

    async def always_conflicts() -> None:
        nonlocal calls
        calls += 1
        raise TransactionConflict("simulated")

    with pytest.raises(TransactionConflict) as caught:
        await meta.run(meta.run, always_conflicts)  # the outer run does not retry again
    assert calls == RUN_ATTEMPTS
    assert caught.value.final

    async def returns(x: int, *, y: int) -> int:
        return x + y

    assert await meta.run(returns, 1, y=2) == 3


# --- migrations -----------------------------------------------------------------------------


async def test_upgrade_runs_the_missing_migrations_in_order(opener: Opener) -> None:
    meta = await fresh(opener)
    current = schema.SCHEMA_VERSION
    ran: list[int] = []

    def migration(version: int) -> migrate.Migration:
        async def apply(tx: Txn) -> None:
            ran.append(version)
            await tx.set_info(f"migrated_{version}", "yes")

        return apply

    steps = {v: migration(v) for v in (current + 1, current + 2)}
    assert await migrate.upgrade(meta, FS_UUID, migrations=steps) == [], "current: nothing"
    assert await migrate.upgrade(meta, FS_UUID, migrations=steps, target=current + 2) == [
        current + 1, current + 2,
    ]  # fmt: skip
    assert ran == [current + 1, current + 2]
    assert await migrate.upgrade(meta, FS_UUID, migrations=steps, target=current + 2) == []
    async with meta.reading() as tx:
        assert await tx.get_info("schema_version") == str(current + 2)
        assert await tx.get_info(f"migrated_{current + 2}") == "yes"
    # this cloudfs (target = its own schema) refuses the newer database
    with pytest.raises(UnsupportedFormat):
        await migrate.upgrade(meta, FS_UUID, migrations=steps)
    with pytest.raises(UnsupportedFormat):
        await meta.check(FS_UUID)


async def test_upgrade_refuses_another_filesystem_and_gaps(opener: Opener) -> None:
    meta = await fresh(opener)
    with pytest.raises(MetadataMismatch):
        await migrate.upgrade(meta, OTHER_UUID)
    with pytest.raises(RuntimeError, match="no migration"):
        await migrate.upgrade(meta, FS_UUID, migrations={}, target=schema.SCHEMA_VERSION + 1)


async def test_a_failed_migration_changes_nothing(opener: Opener) -> None:
    meta = await fresh(opener)
    target = schema.SCHEMA_VERSION + 1

    async def broken(tx: Txn) -> None:
        await tx.set_info("half", "done")
        raise Boom

    with pytest.raises(Boom):
        await migrate.upgrade(meta, FS_UUID, migrations={target: broken}, target=target)
    async with meta.reading() as tx:
        assert await tx.get_info("half") is None
        assert await tx.get_info("schema_version") == str(schema.SCHEMA_VERSION)


def test_every_schema_version_has_a_migration() -> None:
    assert sorted(migrate.MIGRATIONS) == list(range(2, schema.SCHEMA_VERSION + 1))


async def test_a_schema_4_database_upgrades_to_the_same_answers(opener: Opener) -> None:
    """A database made by schema 4's own DDL (tests/schema4.py) with files, history, a
    hole, and open-inode marks of both kinds (open_inodes of a SQLite mount, holds of a
    shared-mode mount): migration 5 keeps every answer. Each file's allocated size is
    its live extents' total (history and holes excluded), and the same inodes are held,
    by mounts named as before; the primitives keep the new column from then on."""
    from schema4 import ddl4

    from cloudfs import clients

    meta = opener()
    live = schema.LIVE
    b = [block_id(100 + i) for i in range(4)]
    async with meta.transaction(durable=True) as tx:
        for stmt in ddl4(meta.dialect):
            await tx.conn.execute(stmt)
        await tx.set_info("schema_version", "4")
        await tx.set_info("fs_uuid", FS_UUID)
        # 1 root, 2 a file with history, 3 an empty file, 4 a directory, 5 and 6 nameless
        for ino, mode, nlink, size in ((1, DIR, 3, 0), (2, FILE, 1, 150), (3, FILE, 1, 0),
                                       (4, DIR, 2, 0), (5, FILE, 0, 70), (6, FILE, 0, 4126)):
            await tx.conn.execute(
                "INSERT INTO inodes (id, mode, uid, gid, nlink, size, rdev, atime_ns, mtime_ns,"
                " ctime_ns, version, flags) VALUES (?, ?, 0, 0, ?, ?, 0, ?, ?, ?, 2, 0)",
                (ino, mode, nlink, size, NOW, NOW, NOW),
            )  # fmt: skip
        for parent, name, ino in ((1, b"f", 2), (1, b"empty", 3), (1, b"d", 4)):
            await tx.add_dentry(parent, name, ino)
        for i, block in enumerate(b):
            await tx.conn.execute(
                "INSERT INTO blocks (id, size, stored_size, refcount, state, created_ns,"
                " unref_ns) VALUES (?, 100, NULL, ?, 0, ?, NULL)",
                (block, 2 if i == 0 else 1, NOW),
            )
        for ino, v_to, offset, length, block, v_from in (
            (2, live, 0, 100, b[0], 2), (2, live, 100, 50, b[1], 1),
            (2, 2, 0, 100, b[2], 1),  # history: not allocated
            (5, live, 0, 70, b[3], 1), (6, live, 4096, 30, b[0], 1),  # a hole before it
        ):  # fmt: skip
            await tx.conn.execute(
                "INSERT INTO extents (inode, v_to, file_offset, length, block, v_from)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (ino, v_to, offset, length, block, v_from),
            )
        await tx.conn.execute("INSERT INTO open_inodes (inode, holder) VALUES (5, 'hostA:123')")
        other = await tx.conn.insert(
            "INSERT INTO clients (hostname, pid, cachedir, started_ns, heartbeat_ns, state)"
            " VALUES ('hostB', 77, '/cache/b', ?, ?, 0)",
            (time_ns(), time_ns()),
        )
        await tx.conn.execute("INSERT INTO holds (client, inode) VALUES (?, 6)", (other,))
    with pytest.raises(MetadataOutdated):
        await meta.check(FS_UUID)

    assert await migrate.upgrade(meta, FS_UUID) == [5, 6]
    assert await meta.check(FS_UUID) == schema.SCHEMA_VERSION
    async with meta.reading() as tx:
        # every index of the current DDL (schema 6: trash_inode) is there
        if meta.dialect is schema.SQLITE:
            found = await tx.conn.query("SELECT name FROM sqlite_master WHERE type = 'index'")
        else:
            found = await tx.conn.query("SELECT index_name FROM information_schema.statistics"
                                        " WHERE table_schema = DATABASE()")  # fmt: skip
        wanted = {m[1] for s in schema.ddl(meta.dialect)
                  if (m := re.match(r"CREATE INDEX (\w+) ON", s))}  # fmt: skip
        assert "trash_inode" in wanted
        assert wanted <= {str(row[0]) for row in found}
        allocated = {i: a.sealed_allocated for i in range(1, 7) if (a := await tx.get_inode(i))}
        assert allocated == {1: 0, 2: 150, 3: 0, 4: 0, 5: 70, 6: 30}
        assert await tx.count_allocated(list(range(1, 7))) == {2: 150, 5: 70, 6: 30}
        assert await clients.held_inodes(tx) == {5, 6}
        holders = {(c.hostname, c.pid): c.id for c in await clients.list_clients(tx)}
        assert set(holders) == {("hostA", 123), ("hostB", 77)}
        # schema 4's holds were open files, its open_inodes marks of nameless inodes
        assert sorted(await tx.conn.query("SELECT client, inode, why FROM holds")) == sorted([
            (holders["hostA", 123], 5, clients.HOLD_NAMELESS),
            (holders["hostB", 77], 6, clients.HOLD_OPEN),
        ])  # fmt: skip
        assert not await clients.held_elsewhere(tx, 5, holders["hostA", 123])
        assert await clients.held_elsewhere(tx, 6, holders["hostA", 123])
    # the primitives keep the column: a new version of file 2 replaces its first extent
    async with meta.transaction() as tx:
        await tx.add_block_refs({b[3]: (100, 1)}, NOW)
        await tx.close_extents(2, 3, [0])
        await tx.add_extents(2, 3, [Extent(0, 40, b[3])])
    async with meta.transaction() as tx:  # a dead mount goes with its marks (fsck, mount)
        gone = await clients.drop_dead(tx, lambda row: row.hostname == "hostA")
        assert [(row.hostname, n) for row, n in gone] == [("hostA", 1)]
    async with meta.reading() as tx:
        attrs = await tx.get_inode(2)
        assert attrs is not None and attrs.sealed_allocated == 90
        assert await clients.held_inodes(tx) == {6}


async def test_schema_2_gains_clients_and_holds(opener: Opener) -> None:
    """Migration 3 on a schema-2 database (an unused `clients` table of another shape,
    no `holds`), and again after it ran (MySQL commits DDL at once: a retry must work)."""
    meta = await fresh(opener)
    async with meta.transaction() as tx:
        await tx.conn.execute("DROP TABLE holds")
        await tx.conn.execute("DROP TABLE clients")
        await tx.conn.execute(
            "CREATE TABLE clients (id BIGINT PRIMARY KEY, hostname VARCHAR(255) NOT NULL,"
            " pid INTEGER NOT NULL, started_ns BIGINT NOT NULL, heartbeat_ns BIGINT NOT NULL)"
        )
        await tx.set_info("schema_version", "2")
    # 4: trash columns, open_inodes; 5: open_inodes into holds, inodes.allocated
    assert await migrate.upgrade(meta, FS_UUID) == [3, 4, 5, 6]
    for _again in range(2):
        async with meta.transaction() as tx:
            await tx.conn.execute(
                "INSERT INTO clients (hostname, pid, cachedir, started_ns, heartbeat_ns, state)"
                " VALUES ('h', 1, '/c', 1, 1, 0)"
            )
            (client,) = await tx.conn.query_one("SELECT MAX(id) FROM clients") or (0,)
            await tx.conn.execute(
                "INSERT INTO holds (client, inode, why) VALUES (?, 1, 0)", (client,)
            )
            assert await tx.conn.query("SELECT inode FROM holds WHERE client = ?", (client,)) == [
                (1,)
            ]
        async with meta.transaction() as tx:  # as if the version had not been written
            await tx.set_info("schema_version", "2")
        assert await migrate.upgrade(meta, FS_UUID) == [3, 4, 5, 6]
    assert await meta.check(FS_UUID) == schema.SCHEMA_VERSION


async def test_open_holds_outlive_the_last_close_until_a_heartbeat(opener: Opener) -> None:
    """Shared mode's cheap reopen: the last close leaves the hold for the next heartbeat,
    an open before it costs no transaction, the heartbeat releases what stayed closed in
    one transaction and names the released inodes without names; a mark of the same
    inode (it lost its last name while used) is a row of its own and stays."""
    from cloudfs import clients

    meta = await fresh(opener)
    a, b = clients.Client(meta, "/cache/a"), clients.Client(meta, "/cache/b")
    await a.register()
    await b.register()
    async with meta.transaction() as tx:
        named = (await tx.create_inode(mode=FILE, uid=0, gid=0, nlink=1, now_ns=NOW)).id
        nameless = (await tx.create_inode(mode=FILE, uid=0, gid=0, nlink=0, now_ns=NOW)).id
    transactions = 0
    real = meta.transaction

    def counted(**kwargs: bool):  # type: ignore[no-untyped-def]
        nonlocal transactions
        transactions += 1
        return real(**kwargs)

    meta.transaction = counted  # type: ignore[method-assign]
    await a.hold(named)
    await a.hold(nameless)
    assert transactions == 2
    for _reopen in range(3):
        a.release_soon(named)
        await a.hold(named)  # open again before a heartbeat: the row is still there
    assert transactions == 2
    a.release_soon(named)
    a.release_soon(nameless)
    async with meta.reading() as tx:
        assert await clients.held_elsewhere(tx, named, b.id)
    async with meta.transaction() as tx:  # the nameless one is unlinked while in use
        await a.mark(tx, nameless)
    transactions = 0
    assert await a.heartbeat() == [nameless]
    assert transactions == 1, "heartbeat and releases: one transaction"
    async with meta.reading() as tx:
        assert not await clients.held_elsewhere(tx, named, b.id)
        assert await clients.held_elsewhere(tx, nameless, b.id), "the mark stays"
    async with meta.transaction() as tx:
        await a.unmark(tx, nameless)
        assert not await clients.held(tx, nameless)
    await a.hold(named)  # released: a new open writes its hold again
    async with meta.reading() as tx:
        assert await clients.held_elsewhere(tx, named, b.id)


async def test_clients_hold_inodes_and_dead_ones_are_forgotten(opener: Opener) -> None:
    """Shared mode's bookkeeping (cloudfs.clients) on every engine: a hold is seen by
    the other mounts only; a new mount of the same cache dir forgets the old one and its
    holds; a mount whose heartbeat expired is forgotten by any other."""
    from cloudfs import clients

    meta = await fresh(opener)
    a, b = clients.Client(meta, "/cache/a"), clients.Client(meta, "/cache/b")
    await a.register()
    await b.register()
    await a.hold(7)
    async with meta.reading() as tx:
        assert await clients.held_elsewhere(tx, 7, b.id)
        assert not await clients.held_elsewhere(tx, 7, a.id)
        assert [c.id for c in await clients.list_clients(tx)] == [a.id, b.id]
        # both run in this process, which is no mount.cloudfs: dead as seen from here
        assert [c.id for c in await clients.dead_clients(tx, time_ns())] == [a.id, b.id]
    await a.release(7)
    async with meta.reading() as tx:
        assert not await clients.held_elsewhere(tx, 7, b.id)

    await a.hold(8)
    a_again = clients.Client(meta, "/cache/a")  # a crashed and mounts again
    gone = await a_again.register()
    assert [c.id for c in gone] == [a.id]
    async with meta.reading() as tx:
        assert not await clients.held_elsewhere(tx, 8, b.id)

    await b.hold(9)
    async with meta.transaction() as tx:  # b stopped beating long ago
        await tx.conn.execute("UPDATE clients SET heartbeat_ns = 1 WHERE id = ?", (b.id,))
    c = clients.Client(meta, "/cache/c")
    assert [r.id for r in await c.register()] == [b.id]
    async with meta.reading() as tx:
        assert not await clients.held_elsewhere(tx, 9, c.id)
        assert await clients.stray_holds(tx) == []
    await b.heartbeat()  # b was only paused: it comes back under its own id
    await c.unregister()
    async with meta.reading() as tx:
        assert sorted(r.id for r in await clients.list_clients(tx)) == sorted([a_again.id, b.id])
    await meta.close()
