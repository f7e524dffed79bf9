"""Helpers of the history tests: what a user sees of a tree, a tree to look at, and
the core (metadata, cache dir, file store, namespace, a local store) called directly."""

from __future__ import annotations

import hashlib
import itertools
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cloudfs.cache import CacheDir
from cloudfs.chunking import ChunkerParams
from cloudfs.codec.framing import block_key
from cloudfs.files import FileStore
from cloudfs.meta import open_meta
from cloudfs.namespace import Caller, Namespace
from cloudfs.objectstore.local import LocalStore

if TYPE_CHECKING:
    from conftest import CloudFS

MiB = 1 << 20


def tree_state(root: Path) -> dict[str, tuple]:
    """What a user sees of a tree: per relative path its type, mode, size, nlink, the
    sha256 of a file, the target of a symlink and its xattrs."""
    state: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                state[rel] = ("link", os.readlink(p))
                continue
            xattrs = tuple(sorted((n, os.getxattr(p, n)) for n in os.listxattr(p)))
            if stat.S_ISDIR(st.st_mode):
                state[rel] = ("dir", st.st_mode, st.st_nlink, st.st_uid, st.st_gid, xattrs)
            else:
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                state[rel] = ("file", st.st_mode, st.st_size, st.st_nlink, st.st_mtime_ns,
                              digest, xattrs)  # fmt: skip
    return state


def make_tree(root: Path, files: int = 60, big: int = 24 * MiB, *, hard_link: bool = True) -> None:
    """Directories (one empty), a big file, many small ones, an empty file with old
    times, a symlink, xattrs, and (unless not `hard_link`) two names of one file."""
    root.mkdir()
    (root / "docs" / "deep" / "er").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "big.bin").write_bytes(os.urandom(big))
    for i in range(files):
        d = root / "docs" if i % 2 else root / "docs" / "deep"
        (d / f"f{i:03d}.txt").write_bytes(os.urandom(1000 + 997 * i))
    (root / "empty").write_bytes(b"")
    os.chmod(root / "docs" / "f001.txt", 0o600)
    os.symlink("docs/f001.txt", root / "link")
    if hard_link:
        os.link(root / "docs" / "f003.txt", root / "docs" / "deep" / "er" / "hard")
    os.setxattr(root / "docs", "user.tag", b"directory tag")
    os.setxattr(root / "big.bin", "user.sum", b"\x00\xff binary")
    os.utime(root / "empty", ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))


PARAMS = ChunkerParams(64, 256, 1024)
CALLER = Caller(uid=0, gid=0)
_names = itertools.count()


class Env:
    def __init__(self, root: Path, meta_url: str | None) -> None:
        self.cache = CacheDir(root / "cache")
        self.cache.create()
        self.store = LocalStore(root / "store")
        self.meta = open_meta(meta_url or str(self.cache.meta_path))

        async def fetch(ids: list[bytes], prefetch: list[bytes]) -> None:
            raise AssertionError("every block of these tests is in the cache")

        self.files = FileStore(
            self.meta, self.cache, id_key=b"i" * 32, gear_key=b"g" * 32, chunker=PARAMS,
            fetch=fetch, on_sealed=lambda: None, origin="test",
        )  # fmt: skip
        self.ns = Namespace(self.meta, self.files)

    async def file(self, *contents: bytes) -> int:
        """A new file, each of `contents` written and published as one version."""
        if not await self.meta.is_initialized():
            await self.meta.initialize("00000000-0000-0000-0000-000000000000", uid=0, gid=0)
        ino = (await self.ns.mknod(1, b"f%d" % next(_names), 0o100644, 0, CALLER)).id
        for data in contents:
            await self.files.open(ino)
            await self.files.truncate(ino, 0)
            await self.files.write(ino, 0, data)
            await self.files.release(ino)
        return ino

    async def upload_all(self) -> None:
        """What the daemon does: put every pending block in the store, mark it stored."""
        async with self.meta.transaction() as tx:
            pending = await tx.pending_blocks(100_000)
            for block_id, _size in pending:
                data = (self.cache.block_path(block_id)).read_bytes()
                await self.store.put(block_key(block_id), data)
                await tx.mark_stored(block_id, len(data))

    async def version_bytes(self, ino: int, version: int) -> bytes:
        async with self.meta.reading() as tx:
            rows = [v for v in await tx.versions(ino) if v.version == version]
            extents = await tx.version_extents(ino, version)
        return await self.files.read_version(extents, rows[0].size, 0, rows[0].size)

    async def refcounts_match(self) -> None:
        async with self.meta.reading() as tx:
            rows = await tx.conn.query(
                "SELECT b.id, b.refcount, (SELECT COUNT(*) FROM extents e WHERE e.block = b.id)"
                " FROM blocks b"
            )
        bad = [(bytes(i).hex()[:8], n, m) for i, n, m in rows if n != m]
        assert bad == [], "refcount differs from the extent rows naming the block"

    async def set_committed(self, ino: int, times: list[int]) -> None:
        """Pretend version i+1 of `ino` was committed at times[i]."""
        async with self.meta.transaction() as tx:
            for n, t in enumerate(times, start=1):
                await tx.conn.execute(
                    "UPDATE versions SET committed_ns = ? WHERE inode = ? AND version = ?",
                    (t, ino, n),
                )

    async def states(self) -> dict[bytes, tuple[int, int]]:
        async with self.meta.reading() as tx:
            rows = await tx.conn.query("SELECT id, state, refcount FROM blocks")
        return {bytes(i): (s, n) for i, s, n in rows}


def on_a_terminal(fs: CloudFS, *args: object) -> str:
    """Run `cloudfs ARGS` with stderr on a pseudo-terminal (so that it draws its
    progress bars); what it showed there."""
    master, slave = os.openpty()
    try:
        cloudfs = Path(sys.executable).parent / "cloudfs"
        r = subprocess.run([str(cloudfs), *map(str, args)], env=fs.env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=slave, timeout=300, check=False,
                           text=True)  # fmt: skip
        os.close(slave)
        slave = -1
        assert r.returncode == 0, r.stdout
        shown = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not chunk:
                break
            shown += chunk
        return shown.decode(errors="replace")
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
