"""cloudfsd as a real process (no FUSE): uploads of pending blocks, resuming after
kill -9, fetches, corrupt objects, status and flush, idle exit, one daemon per cache
dir. The blocks are put in place the way a mount seals them: plaintext in
cache/blocks, a `pending` row in the metadata store."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
import trio
from cloudfs.daemon.control import DaemonClient, answers, ensure_daemon

from cloudfs import _native, gc
from cloudfs.cache import CacheConfig, CacheDir
from cloudfs.codec.crypto import Keys
from cloudfs.codec.framing import block_key
from cloudfs.config import Superblock, create_filesystem, unlock_master
from cloudfs.errors import CorruptBlock, DaemonError, ObjectNotFound, StoreError
from cloudfs.meta import open_meta
from cloudfs.meta.schema import BLOCK_DELETING, BLOCK_PENDING, BLOCK_REVIVED, BLOCK_STORED
from cloudfs.objectstore.local import LocalStore
from cloudfs.objectstore.sealed import SealedStore

pytestmark = pytest.mark.timeout(180)

PASSPHRASE = b"correct horse battery staple"
KiB = 1024
MiB = 1024 * KiB


@dataclass
class Filesystem:
    """A filesystem in a LocalStore with one cache dir, as a mount would leave it."""

    root: Path
    store_root: Path
    cache: CacheDir
    sb: Superblock
    keys: Keys
    master_key: bytes
    plaintexts: dict[bytes, bytes] = field(default_factory=dict)

    def sealed(self) -> SealedStore:
        return SealedStore(LocalStore(self.store_root), self.keys, encrypt=self.sb.encryption,
                           level=self.sb.level, max_size=self.sb.max_block_size)  # fmt: skip

    def object_path(self, block_id: bytes) -> Path:
        return self.store_root / block_key(block_id)

    async def add_pending(self, blocks: list[bytes], *, keep: bool = True) -> list[bytes]:
        """Seal blocks like a mount: plaintext in cache/blocks, one reference each."""
        refs: dict[bytes, tuple[int, int]] = {}
        for data in blocks:
            block_id = _native.block_id(self.keys.id_key, data)
            await trio.to_thread.run_sync(
                lambda b=block_id, d=data: self.cache.write_block(b, d, durable=False)
            )
            refs[block_id] = (len(data), refs.get(block_id, (0, 0))[1] + 1)
            if keep:
                self.plaintexts[block_id] = data
        meta = open_meta(str(self.cache.meta_path))
        try:
            async with meta.transaction() as tx:
                await tx.add_block_refs(refs, time.time_ns())
        finally:
            await meta.close()
        return list(refs)

    async def states(self) -> dict[bytes, tuple[int, int | None]]:
        """{block id: (state, stored_size)} of every block row."""
        meta = open_meta(str(self.cache.meta_path))
        try:
            async with meta.reading() as tx:
                rows = await tx.conn.query("SELECT id, state, stored_size FROM blocks")
        finally:
            await meta.close()
        return {bytes(i): (s, z) for i, s, z in rows}

    async def start(self, *args: str) -> DaemonClient:
        """Make sure a daemon runs (exiting only after 30 idle s unless told) and
        connect to it as a mount."""
        await ensure_daemon(self.cache, self.master_key, extra_args=["--idle-exit", "30", *args])
        return await DaemonClient.connect(self.cache, role="mount")

    def daemon_pids(self) -> list[int]:
        """Processes serving this cache dir (found by their command line)."""
        pids = []
        needle = str(self.cache.root).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"cloudfs.daemon.main" in cmdline and needle in cmdline:
                pids.append(int(entry.name))
        return pids


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


async def _wait_gone(pid: int, timeout: float = 15.0) -> None:
    with trio.fail_after(timeout):
        while _pid_alive(pid):
            await trio.sleep(0.05)


def _make_fs(tmp_path: Path, *, encryption: bool = True) -> Filesystem:
    async def setup() -> Filesystem:
        store = LocalStore(tmp_path / "store")
        passphrase = PASSPHRASE if encryption else None
        sb, keys = await create_filesystem(store, passphrase, encryption=encryption)
        cache = CacheDir(tmp_path / "cache")
        cache.write_config(CacheConfig(storage=str(store.root), metadata=str(cache.meta_path),
                                       uuid=sb.uuid))  # fmt: skip
        meta = open_meta(str(cache.meta_path))
        try:
            await meta.initialize(sb.uuid, uid=os.getuid(), gid=os.getgid())
        finally:
            await meta.close()
        master = unlock_master(sb, passphrase)
        return Filesystem(tmp_path, store.root, cache, sb, keys, master)

    return trio.run(setup)


def _kill_daemons(fs: Filesystem) -> None:
    """Kill every daemon this test started, whatever state the test left."""
    for pid in fs.daemon_pids():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while fs.daemon_pids() and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[Filesystem]:
    f = _make_fs(tmp_path)
    try:
        yield f
    finally:
        _kill_daemons(f)


@pytest.fixture
def plain_fs(tmp_path: Path) -> Iterator[Filesystem]:
    f = _make_fs(tmp_path, encryption=False)
    try:
        yield f
    finally:
        _kill_daemons(f)


def _blocks(n: int, seed: int, size: int = 300 * KiB) -> list[bytes]:
    """n distinct blocks: random (incompressible) and text-like (compressible) ones."""
    out = []
    for i in range(n):
        if i % 2:
            out.append(os.urandom(size + i))
        else:
            out.append((f"block {seed}/{i} ".encode() * (size // 12 + 1))[: size - i])
    return out


async def _assert_all_stored(fs: Filesystem) -> None:
    states = await fs.states()
    assert states and all(s == BLOCK_STORED and z for s, z in states.values())
    sealed = fs.sealed()
    for block_id, (_state, stored_size) in states.items():
        assert fs.object_path(block_id).stat().st_size == stored_size
        plaintext = await sealed.get_block(block_id)  # verifies the id as well
        if block_id in fs.plaintexts:
            assert plaintext == fs.plaintexts[block_id]


# --- uploads --------------------------------------------------------------------------


async def test_uploads_every_pending_block(fs: Filesystem) -> None:
    ids = await fs.add_pending(_blocks(12, seed=1))
    client = await fs.start()
    try:
        await client.kick()
        await client.flush()
        await _assert_all_stored(fs)
        # compressible blocks really were compressed (and random ones not inflated much)
        states = await fs.states()
        small = [b for b in ids if states[b][1] < len(fs.plaintexts[b]) // 4]
        assert len(small) == 6
        status = await client.status()
        assert status["pending"] == 0 and status["pending_bytes"] == 0
        assert status["uploaded"] == 12 and status["errors"] == []
        # blocks added while the daemon runs go up after a kick
        more = await fs.add_pending(_blocks(3, seed=2))
        await client.kick()
        await client.flush(more)
        await _assert_all_stored(fs)
    finally:
        await client.aclose()


async def test_finish_collection_of_an_interrupted_pass(fs: Filesystem) -> None:
    """`finish_collection` (asked by a --upload=sync seal that re-uses a block a
    garbage collection pass claimed): nothing while a pass holds the lease; once it
    has lapsed, the rows the pass left claimed are finished: a `deleting` one is
    deleted with its object, a `revived` one becomes pending and is uploaded again."""
    doomed, revived, kept = await fs.add_pending(_blocks(3, seed=9, size=20 * KiB))
    client = await fs.start()
    try:
        await client.flush()
        meta = open_meta(str(fs.cache.meta_path))
        try:
            async with meta.transaction() as tx:
                await tx.conn.execute(
                    "UPDATE blocks SET refcount = 0, state = ? WHERE id = ?", (BLOCK_DELETING, doomed)
                )
                await tx.conn.execute(
                    "UPDATE blocks SET state = ? WHERE id = ?", (BLOCK_REVIVED, revived)
                )
                lease = {"owner": "elsewhere:1", "until_ns": time.time_ns() + 600 * 10**9}
                await tx.set_info(gc.LEASE_KEY, json.dumps(lease))
            report = await client.finish_collection()
            assert report["skipped"] and report["blocks"] == 0
            async with meta.transaction() as tx:
                lease["until_ns"] = time.time_ns() - 1  # the pass died: its lease lapsed
                await tx.set_info(gc.LEASE_KEY, json.dumps(lease))
        finally:
            await meta.close()
        report = await client.finish_collection()
        assert (report["skipped"], report["blocks"], report["revived"]) == (None, 1, 1)
        await client.flush()
        states = await fs.states()
        assert doomed not in states and not fs.object_path(doomed).exists()
        assert states[revived][0] == states[kept][0] == BLOCK_STORED
        assert fs.object_path(revived).exists() and fs.object_path(kept).exists()
    finally:
        await client.aclose()


async def test_unencrypted_filesystem_without_passphrase(plain_fs: Filesystem) -> None:
    """A daemon started by hand (no --key-stdin) asks for no passphrase when the
    filesystem is not encrypted."""
    fs = plain_fs
    await fs.add_pending(_blocks(4, seed=3))
    env = {k: v for k, v in os.environ.items() if k != "CLOUDFS_PASSPHRASE"}
    result = await trio.run_process(
        [sys.executable, "-m", "cloudfs.daemon.main", "--cachedir", str(fs.cache.root),
         "--idle-exit", "30"],
        stdin=subprocess.DEVNULL, capture_stderr=True, check=False, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    async with await DaemonClient.connect(fs.cache, role="tool") as client:
        await client.flush()
    await _assert_all_stored(fs)
    body = fs.object_path(next(iter(fs.plaintexts))).read_bytes()
    assert body[4 + 1] & 0x02 == 0  # header flags: not encrypted


async def test_passphrase_file_and_wrong_passphrase(fs: Filesystem, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"not the passphrase\n")
    cmd = [sys.executable, "-m", "cloudfs.daemon.main", "--cachedir", str(fs.cache.root)]
    result = await trio.run_process([*cmd, "--passphrase-file", str(bad)],
                                    capture_stderr=True, check=False)  # fmt: skip
    assert result.returncode == 3
    assert result.stderr.decode().strip().splitlines() == ["cloudfsd: wrong passphrase"]
    assert not fs.cache.socket_path.exists() and not fs.daemon_pids()

    good = tmp_path / "good"
    good.write_bytes(PASSPHRASE + b"\n")
    await fs.add_pending(_blocks(2, seed=4))
    result = await trio.run_process([*cmd, "--passphrase-file", str(good)],
                                    capture_stderr=True, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    async with await DaemonClient.connect(fs.cache, role="tool") as client:
        await client.flush()
    await _assert_all_stored(fs)
    log = fs.cache.log_path.read_text()
    assert PASSPHRASE.decode() not in log and fs.master_key.hex() not in log


async def test_kill_9_mid_upload_then_resume(fs: Filesystem) -> None:
    # ~200 MiB of incompressible pending blocks
    total = 0
    ids: list[bytes] = []
    for seed in range(10):
        batch = [os.urandom(2 * MiB + i * 4096) for i in range(10)]
        total += sum(map(len, batch))
        ids += await fs.add_pending(batch, keep=False)
    assert total >= 200 * MiB
    mount = await fs.start("--uploads", "4")
    pid = mount.daemon_pid
    assert pid is not None
    flush_error: list[BaseException] = []

    async def flush_until_killed() -> None:
        try:
            await mount.flush()
        except DaemonError as exc:
            flush_error.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flush_until_killed)
        with trio.fail_after(60):
            while True:
                stored = sum(s == BLOCK_STORED for s, _z in (await fs.states()).values())
                if stored:
                    break
                await trio.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        await _wait_gone(pid)
    await mount.aclose()
    assert 0 < stored < len(ids), "the upload was not interrupted: make the test bigger"
    # the request in flight saw the connection drop
    assert len(flush_error) == 1
    states = await fs.states()
    assert any(s == BLOCK_PENDING for s, _z in states.values())

    client = await fs.start()  # a new daemon: stale socket and pid file are no obstacle
    try:
        assert client.daemon_pid != pid
        await client.flush()
        status = await client.status()
        assert status["pending"] == 0 and status["errors"] == []
        assert status["uploaded"] <= len(ids)
    finally:
        await client.aclose()
    states = await fs.states()
    assert set(states) == set(ids)
    sealed = fs.sealed()
    for block_id in ids:
        assert states[block_id][0] == BLOCK_STORED
        data = await sealed.get_block(block_id)
        assert data == fs.cache.block_path(block_id).read_bytes()


async def test_missing_cache_file_is_reported_and_retried(fs: Filesystem) -> None:
    good = await fs.add_pending(_blocks(3, seed=5))
    [lost] = await fs.add_pending(_blocks(1, seed=6, size=100 * KiB))
    saved = fs.cache.block_path(lost).read_bytes()
    fs.cache.remove_block(lost)
    client = await fs.start()
    try:
        await client.flush(good)
        with pytest.raises(StoreError, match="cannot be uploaded"):
            await client.flush()
        status = await client.status()
        assert status["pending"] == 1
        [error] = status["errors"]
        assert error["block"] == lost.hex() and "not in the cache dir" in error["error"]
        # never dropped: once the plaintext is back, it is uploaded
        fs.cache.write_block(lost, saved, durable=False)
        await client.flush([lost])
        assert (await client.status())["errors"] == []
        await _assert_all_stored(fs)
    finally:
        await client.aclose()


# --- fetches --------------------------------------------------------------------------


async def test_fetch_restores_evicted_blocks(fs: Filesystem) -> None:
    ids = await fs.add_pending(_blocks(8, seed=7))
    client = await fs.start()
    try:
        await client.flush()
        for block_id in ids[:6]:
            fs.cache.remove_block(block_id)
        # concurrent requests, overlapping blocks, and blocks already in the cache
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.fetch, ids[:4])
            nursery.start_soon(client.fetch, ids[2:6])
            nursery.start_soon(client.fetch, ids)
        for block_id in ids:
            assert fs.cache.block_path(block_id).read_bytes() == fs.plaintexts[block_id]
        assert (await client.status())["fetched"] == 6
        await client.fetch([])
    finally:
        await client.aclose()


async def test_fetch_of_corrupt_object_raises_corrupt_block(fs: Filesystem) -> None:
    ids = await fs.add_pending(_blocks(3, seed=8))
    client = await fs.start()
    try:
        await client.flush()
        bad = ids[1]
        path = fs.object_path(bad)
        body = bytearray(path.read_bytes())
        body[len(body) // 2] ^= 0x10
        path.write_bytes(bytes(body))
        for block_id in ids:
            fs.cache.remove_block(block_id)
        with pytest.raises(CorruptBlock, match=bad.hex()):
            await client.fetch(ids)
        assert not fs.cache.has_block(bad)  # wrong bytes never reach the cache
        for block_id in (ids[0], ids[2]):  # the good blocks of the request arrived
            assert fs.cache.block_path(block_id).read_bytes() == fs.plaintexts[block_id]
        # asked again: still corrupt (a failure is not cached as success)
        with pytest.raises(CorruptBlock):
            await client.fetch([bad])
        # an object that is not there at all
        unknown = _native.block_id(fs.keys.id_key, b"never stored")
        with pytest.raises(ObjectNotFound):
            await client.fetch([unknown])
        # read-ahead: not waited for, and its failures are not the reader's
        for block_id in (ids[0], ids[2]):
            fs.cache.remove_block(block_id)
        await client.fetch([ids[0]], prefetch=[bad, ids[2]])
        assert fs.cache.has_block(ids[0])
        with trio.fail_after(10):
            while not fs.cache.has_block(ids[2]):
                await trio.sleep(0.02)
        assert fs.cache.block_path(ids[2]).read_bytes() == fs.plaintexts[ids[2]]
        assert not fs.cache.has_block(bad)
        # the connection is still fine after errors
        assert (await client.status())["pending"] == 0
    finally:
        await client.aclose()


# --- lifetime -------------------------------------------------------------------------


async def test_idle_exit_only_without_mount(fs: Filesystem) -> None:
    await ensure_daemon(fs.cache, fs.master_key, extra_args=["--idle-exit", "1"])
    pid = int(fs.cache.pid_path.read_text())
    mount = await DaemonClient.connect(fs.cache, role="mount")
    await trio.sleep(2.5)
    assert _pid_alive(pid), "exited although a mount is connected"
    # pending work keeps it alive too, until uploaded
    await fs.add_pending(_blocks(2, seed=9))
    await mount.kick()
    await mount.aclose()
    await _wait_gone(pid, timeout=10)
    assert all(s == BLOCK_STORED for s, _z in (await fs.states()).values())
    assert not fs.cache.socket_path.exists() and not fs.cache.pid_path.exists()
    with pytest.raises(DaemonError):
        await DaemonClient.connect(fs.cache)


async def test_shutdown_request_and_sigterm(fs: Filesystem) -> None:
    client = await fs.start()
    pid = client.daemon_pid
    assert pid is not None and pid == int(fs.cache.pid_path.read_text())
    await client.shutdown()
    await _wait_gone(pid)
    assert not fs.cache.socket_path.exists() and not fs.cache.pid_path.exists()
    # the old connection is dead: requests say so
    with pytest.raises(DaemonError):
        await client.status()
    await client.aclose()

    client = await fs.start()
    pid = client.daemon_pid
    assert pid is not None
    await fs.add_pending(_blocks(4, seed=10))
    await client.kick()
    os.kill(pid, signal.SIGTERM)
    await _wait_gone(pid)
    await client.aclose()
    assert not fs.cache.socket_path.exists() and not fs.cache.pid_path.exists()
    assert "stopping: signal SIGTERM" in fs.cache.log_path.read_text()


async def test_second_daemon_exits_0_and_leaves_the_first(fs: Filesystem) -> None:
    client = await fs.start()
    try:
        first = client.daemon_pid
        result = await trio.run_process(
            [sys.executable, "-m", "cloudfs.daemon.main", "--cachedir", str(fs.cache.root),
             "--key-stdin"],
            stdin=fs.master_key.hex().encode() + b"\n", capture_stderr=True, check=False,
        )  # fmt: skip
        assert result.returncode == 0
        assert b"already running" in result.stderr
        # ensure_daemon finds the running one and starts nothing
        await ensure_daemon(fs.cache, fs.master_key)
        assert fs.daemon_pids() == [first]
        assert (await client.status())["pid"] == first
    finally:
        await client.aclose()


async def test_ensure_daemon_reports_start_failure(fs: Filesystem) -> None:
    with pytest.raises(DaemonError, match="key"):
        await ensure_daemon(fs.cache, b"short")
    fs.cache.meta_path.unlink()
    with pytest.raises(DaemonError, match="metadata"):
        await ensure_daemon(fs.cache, fs.master_key)
    with trio.fail_after(5):  # the failed daemon is on its way out
        while fs.daemon_pids():
            await trio.sleep(0.05)
    assert not fs.cache.socket_path.exists()


async def test_launcher_waits_for_a_lock_holder_that_does_not_answer_yet(fs: Filesystem) -> None:
    """`cloudfsd` exiting 0 means a daemon answers now. A daemon holding the lock may
    still be starting or already stopping (its socket gone): the launcher waits until
    the holder answers or lets go (then it starts one itself). Once it said "already
    running" while the mount's own restart was starting, and `cloudfs flush` found no
    socket. Here the test holds the lock, as such a daemon would."""
    lock = os.open(fs.cache.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        async with trio.open_nursery() as nursery:
            launcher = await nursery.start(
                partial(
                    trio.run_process,
                    [sys.executable, "-m", "cloudfs.daemon.main", "--cachedir",
                     str(fs.cache.root), "--key-stdin"],
                    stdin=fs.master_key.hex().encode() + b"\n", capture_stderr=True,
                    check=False,
                )
            )  # fmt: skip
            # while the lock holder does not answer, the launcher does not return
            await trio.sleep(1.0)
            assert launcher.returncode is None, "cloudfsd returned while no daemon answered"
            os.close(lock)  # the holder is gone: the launcher starts its own daemon
            lock = -1
            with trio.fail_after(60):
                await launcher.wait()
        assert launcher.returncode == 0
        assert await answers(fs.cache), "cloudfsd exited 0 but no daemon answers"
    finally:
        if lock >= 0:
            os.close(lock)
