"""Shared mode: two mounts of one filesystem on this machine (two mount points, two
cache dirs, two daemons) sharing the private MariaDB, the moto S3 server and a private
redis-server, as two machines would.

Tests name `redis` and `mysql_url` before `make_fs`: fixtures end in reverse order, so
the mounts and daemons stop before the Redis server and the test's database go.
Everything that waits for the other mount polls with a deadline; the 1 s promise of
Redis notifications is measured from the return of the operation on A to the start of
the poll on B that saw it."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import pytest

from cloudfs.meta.base import LIVE
from cloudfs.meta.schema import BLOCK_PENDING
from cloudfs.mount.operations import SHARED_TIMEOUT

if TYPE_CHECKING:  # the fixtures' types; conftest is not importable as a module
    from conftest import CloudFS, MariaDB
    from s3util import Bucket

REDIS_PASSWORD = "redis test password 41f2"
#: how long the other mount may take when nothing hurries it (attribute timeout), with
#: room for a loaded machine
CONVERGE_S = SHARED_TIMEOUT + 4.0


# --- a private redis-server ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """redis-server on a free loopback port, in its own dir, with no persistence and
    a password; dies with pytest (setpriv --pdeathsig)."""

    password = REDIS_PASSWORD

    def __init__(self, root: Path) -> None:
        self.dir = root
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, port: int | None = None) -> None:
        """Start on a free port, or on `port` (a restart where the mounts expect it)."""
        binary = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin")
        if binary is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        setpriv = shutil.which("setpriv")
        prefix = [setpriv, "--pdeathsig", "TERM"] if setpriv else []
        for _attempt in range(3):  # a free port may be taken before the server binds it
            self.port = port or _free_port()
            self.proc = subprocess.Popen(
                [*prefix, binary, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", str(self.dir),
                 "--requirepass", self.password, "--logfile", str(self.dir / "redis.log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            if self._wait_ready(30.0):
                return
            self.stop()
        pytest.fail(f"redis-server did not start: see {self.dir / 'redis.log'}")

    def _wait_ready(self, timeout: float) -> bool:
        import redis

        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                redis.Redis(port=self.port, password=self.password, socket_timeout=1).ping()
                return True
            except (redis.RedisError, OSError):
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    root = tmp_path_factory.mktemp("redis")
    server = RedisServer(root)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


# --- two mounts ---------------------------------------------------------------------------


class Pair:
    def __init__(self, a: CloudFS, b: CloudFS, redis_url: str) -> None:
        self.a, self.b = a, b
        self.redis_url = redis_url


@pytest.fixture
def pair(
    redis_server: RedisServer,
    mysql_url: str,
    s3_bucket: Bucket,
    make_fs: Callable[..., CloudFS],
) -> Pair:
    """A filesystem in S3 with MySQL metadata, mounted twice (A and B) with Redis."""
    return _mount_pair(redis_server, mysql_url, s3_bucket, make_fs)


def _mount_pair(
    redis_server: RedisServer,
    mysql_url: str,
    s3_bucket: Bucket,
    make_fs: Callable[..., CloudFS],
    *b_options: str,
) -> Pair:
    """The `pair` fixture; B's mount gets `b_options` too."""
    a = make_fs("a", bucket=s3_bucket, mkfs=False, mount=False)
    a.mkfs("--metadata", mysql_url)
    a.metadata = mysql_url  # for a.metadata_db() (mkfs named it: mount adds no option)
    b = make_fs("b", bucket=s3_bucket, mkfs=False, mount=False)
    b.storage_url = a.storage_url
    b.key_prefix = a.key_prefix  # type: ignore[attr-defined]
    # A: the Redis password from a file; B: in the URL, given as a -o option (the
    # mount runs itself again without it)
    password_file = a.root / "redis-password"
    password_file.write_text(redis_server.password + "\n")
    a.mount("--redis", redis_server.url, "--redis-password-file", str(password_file))
    with_password = redis_server.url.replace("//", f"//:{quote(REDIS_PASSWORD, safe='')}@")
    b.mount("-o", f"metadata={mysql_url},redis={with_password}", *b_options)
    return Pair(a, b, redis_server.url)


def seen_after(check: Callable[[], bool], deadline_s: float, what: str) -> float:
    """Seconds from now to the start of the first call of `check` that returns True;
    fails after `deadline_s`."""
    t0 = time.monotonic()
    while True:
        start = time.monotonic()
        if check():
            return start - t0
        if start - t0 > deadline_s:
            pytest.fail(f"{what}: not seen within {deadline_s:.1f} s")
        time.sleep(0.02)


def exists(p: Path) -> bool:
    try:
        os.lstat(p)
        return True
    except FileNotFoundError:
        return False


def one_line_failure(result: subprocess.CompletedProcess[str], prog: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0, f"{prog} succeeded: {result.stderr!r}"
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{prog}: "), lines[0]
    return lines[0]


# --- tests ----------------------------------------------------------------------------------


def test_files_between_mounts(pair: Pair) -> None:
    """Write on A, read identical on B after close (also after an edit in place and an
    append on B); a file open on B survives its unlink on A; two writers of one file
    leave a winner and a conflict version."""
    _write_on_a_reads_identical_on_b(pair)
    _sealed_while_open_on_a_reads_on_b(pair)
    _open_unlinked_on_b_survives_unlink_on_a(pair)
    _concurrent_writers_leave_a_winner_and_a_conflict(pair)
    _gc_with_two_writers(pair)


def _gc_with_two_writers(pair: Pair) -> None:
    """Garbage collection runs over and over (no grace period) while both mounts write
    copies of the same few contents and remove older copies: a block whose last copy
    just went is collected while the other mount is about to name it again (the seal
    waits for the pass and stores the block again before its commit). The other mount
    reads each copy at once (never a block that is not in the store), and no stored
    block may go missing: fsck --check-data reads every block back from the store."""
    a, b = pair.a, pair.b
    pool = [os.urandom(300_000) for _ in range(3)]
    stop = threading.Event()
    runs: list[subprocess.CompletedProcess[str]] = []

    def collect() -> None:
        while not stop.is_set():
            runs.append(a.run("cloudfs", "gc", a.mnt, "--grace", "0", "--json", timeout=120))

    collector = threading.Thread(target=collect)
    collector.start()
    try:
        for i in range(12):
            ((a.mnt, b.mnt)[i % 2] / f"g{i}").write_bytes(pool[i % 3])
            assert ((a.mnt, b.mnt)[(i + 1) % 2] / f"g{i}").read_bytes() == pool[i % 3]
            if i >= 2:  # the other mount removes an older copy: content (i+1) % 3 has none
                ((a.mnt, b.mnt)[(i + 1) % 2] / f"g{i - 2}").unlink()
            if i == 6:
                seen_after(lambda: len(runs) >= 2, 120, "two gc passes")
    finally:
        stop.set()
        collector.join()
    failed = [r.stdout + r.stderr for r in runs if r.returncode != 0]
    assert not failed, failed
    freed = sum(json.loads(r.stdout)["blocks"] for r in runs)
    print(f"gc: {len(runs)} passes freed {freed} blocks")
    for i in (10, 11):
        assert (a.mnt / f"g{i}").read_bytes() == pool[i % 3]
        assert (b.mnt / f"g{i}").read_bytes() == pool[i % 3]
    b.unmount()
    a.unmount()
    r = a.run("fsck.cloudfs", a.storage_url, "--cachedir", a.cache, "--check-data",
              *a.storage_args)  # fmt: skip
    assert r.returncode == 0 and "clean" in r.stdout, r.stdout + r.stderr


def _write_on_a_reads_identical_on_b(pair: Pair) -> None:
    a, b = pair.a, pair.b
    payload = os.urandom(3 * 1024 * 1024 + 11)
    (a.mnt / "f").write_bytes(payload)  # close: sealed and uploaded (upload=sync)
    assert (b.mnt / "f").read_bytes() == payload
    # B's page cache holds the file now; A changes it in place, same size: close-to-open
    edited = bytearray(payload)
    edited[1_000_000:1_000_005] = b"EDIT!"
    with open(a.mnt / "f", "r+b") as f:
        f.seek(1_000_000)
        f.write(b"EDIT!")
    assert (b.mnt / "f").read_bytes() == bytes(edited)
    # grown on B, read on A
    with open(b.mnt / "f", "ab") as f:
        f.write(b"tail from b")
    assert (a.mnt / "f").read_bytes() == bytes(edited) + b"tail from b"

    # the password of Redis is nowhere in sight
    for fs in (a, b):
        config = (fs.cache / "config.json").read_text()
        assert json.loads(config)["redis"] == pair.redis_url
        assert fs.mount_pid is not None
        cmdline = Path(f"/proc/{fs.mount_pid}/cmdline").read_bytes()
        for needle in (REDIS_PASSWORD, quote(REDIS_PASSWORD, safe="")):
            assert needle not in config and needle.encode() not in cmdline
            assert needle not in (fs.cache / "mount.log").read_text()
    assert REDIS_PASSWORD.encode() not in Path(f"/proc/{a.mount_pid}/environ").read_bytes()


def _sealed_while_open_on_a_reads_on_b(pair: Pair) -> None:
    """--upload=sync holds for the seals no program waits for: A writes two files
    (one front to back, an append stream; one back to front, the dirty overlay) and
    keeps them open, no close, no fsync, until its idle seal commits them. From the
    first moment the metadata shows a commit, no block of the file's live extents is
    pending, and B reads the bytes (before, B's fetch failed with EIO, "object not
    found in the store", while A's daemon was still uploading what A had committed)."""
    a, b = pair.a, pair.b
    data = os.urandom(2 * 1024 * 1024 + 5)
    piece = 256 * 1024
    with open(a.mnt / "streamed", "wb") as fs, open(a.mnt / "edited", "wb") as fe:
        fs.write(data)
        for at in reversed(range(0, len(data), piece)):
            fe.seek(at)
            fe.write(data[at : at + piece])
        fs.flush()
        fe.flush()
        inodes = {"streamed": os.fstat(fs.fileno()).st_ino, "edited": os.fstat(fe.fileno()).st_ino}
        with a.metadata_db() as db:
            for name, ino in inodes.items():

                def committed(name: str = name, ino: int = ino) -> bool:
                    # one statement: the size and the block states of one moment
                    size, pending = db.execute(
                        "SELECT i.size, (SELECT COUNT(*) FROM extents e JOIN blocks b"
                        " ON b.id = e.block WHERE e.inode = i.id AND e.v_to = ? AND b.state = ?)"
                        " FROM inodes i WHERE i.id = ?",
                        (LIVE, BLOCK_PENDING, ino),
                    ).fetchone()
                    assert not pending, f"{name}: committed naming {pending} pending blocks"
                    return bool(size == len(data))

                seen_after(committed, 120, f"A's idle seal of {name}")
                assert (b.mnt / name).read_bytes() == data, name


def _open_unlinked_on_b_survives_unlink_on_a(pair: Pair) -> None:
    """A file B has open stays readable there after A removes it (no trash): A's
    unlink must not free an inode another mount holds; B's last close frees it."""
    a, b = pair.a, pair.b
    a.check("cloudfs", "retention", a.mnt, "trash=0")
    payload = os.urandom(600_000)
    (a.mnt / "held").write_bytes(payload)
    with open(b.mnt / "held", "rb") as f:
        (a.mnt / "held").unlink()
        assert not exists(a.mnt / "held")
        time.sleep(0.2)  # A's release of the inode, had it freed it, is done by now
        assert f.read() == payload
    seen_after(lambda: not exists(b.mnt / "held"), CONVERGE_S, "the unlink on B")
    assert not exists(a.mnt / "held")


def _namespace_round(pair: Pair, tag: str, limit_s: float) -> dict[str, float]:
    """mkdir, rename and unlink on A, each looked at on B first (so B's kernel has the
    old names cached); returns how long B took to show each."""
    a, b = pair.a, pair.b
    (a.mnt / f"x{tag}").write_bytes(b"x")
    (a.mnt / f"z{tag}").write_bytes(b"z")
    assert seen_after(lambda: exists(b.mnt / f"z{tag}"), CONVERGE_S, "new files on B") >= 0
    assert exists(b.mnt / f"x{tag}")  # B's kernel has both names cached now
    took = {}

    start = time.monotonic()
    (a.mnt / f"d{tag}").mkdir()
    took["mkdir op"] = time.monotonic() - start
    took["mkdir"] = seen_after(lambda: exists(b.mnt / f"d{tag}"), limit_s + 30, "mkdir")

    os.lstat(b.mnt / f"x{tag}")  # B's kernel has the name cached afresh
    start = time.monotonic()
    (a.mnt / f"x{tag}").rename(a.mnt / f"d{tag}" / "y")
    took["rename op"] = time.monotonic() - start
    took["rename"] = seen_after(
        lambda: not exists(b.mnt / f"x{tag}") and exists(b.mnt / f"d{tag}" / "y"),
        limit_s + 30, "rename",
    )  # fmt: skip

    os.lstat(b.mnt / f"z{tag}")
    start = time.monotonic()
    (a.mnt / f"z{tag}").unlink()
    took["unlink op"] = time.monotonic() - start
    took["unlink"] = seen_after(lambda: not exists(b.mnt / f"z{tag}"), limit_s + 30, "unlink")
    assert sorted(os.listdir(b.mnt)) == sorted(os.listdir(a.mnt))
    return took


def _race(first: Callable[[], None], second: Callable[[], None]) -> list[str]:
    """Run both at once (threads released together); each one's outcome: "ok" or
    the errno name."""
    barrier = threading.Barrier(2)
    out = ["", ""]

    def run(i: int, fn: Callable[[], None]) -> None:
        barrier.wait()
        try:
            fn()
            out[i] = "ok"
        except OSError as exc:
            out[i] = errno.errorcode[exc.errno or 0]

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate((first, second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _racing_namespace_operations(pair: Pair) -> None:
    """The same name made on both machines at once, two renames onto one name, rmdir
    against a create inside: one wins and the other gets the errno one machine gives."""
    a, b = pair.a.mnt, pair.b.mnt
    for i in range(3):
        got = _race(lambda: os.mkdir(a / f"same{i}"), lambda: os.mkdir(b / f"same{i}"))
        assert sorted(got) == ["EEXIST", "ok"], got
    (a / "r1").write_bytes(b"one")
    (a / "r2").write_bytes(b"two")
    seen_after(lambda: exists(b / "r2"), CONVERGE_S, "r2 on B")
    got = _race(lambda: os.rename(a / "r1", a / "target"), lambda: os.rename(b / "r2", b / "target"))
    assert got == ["ok", "ok"], got
    assert (a / "target").read_bytes() in (b"one", b"two")
    # B's rename reaches A's kernel cache by a notification (or the 1 s timeout)
    seen_after(lambda: not exists(a / "r1") and not exists(a / "r2"), CONVERGE_S,
               "both renames on A")  # fmt: skip
    for i in range(3):
        os.mkdir(a / f"gone{i}")
        seen_after(lambda: exists(b / f"gone{i}"), CONVERGE_S, "the directory on B")  # noqa: B023
        got = _race(lambda: os.rmdir(a / f"gone{i}"),  # noqa: B023
                    lambda: (b / f"gone{i}" / "f").write_bytes(b"f"))  # noqa: B023  # fmt: skip
        assert got in (["ok", "ENOENT"], ["ENOTEMPTY", "ok"]), got
        if got[0] == "ENOTEMPTY":
            assert (a / f"gone{i}" / "f").read_bytes() == b"f"
        else:
            assert not exists(a / f"gone{i}")


def test_namespace_over_two_mounts(
    pair: Pair, redis_server: RedisServer, tmp_path: Path
) -> None:
    """A program of operations spread over both mounts agrees with a local model;
    mkdir, rename and unlink on A show on B within 1 s with Redis, and within the
    attribute timeout once Redis is gone (which slows no operation down)."""
    _operations_spread_over_both_mounts_agree_with_a_local_model(pair, tmp_path)
    _racing_namespace_operations(pair)
    with_redis = _namespace_round(pair, "1", 1.0)
    print("with Redis:", with_redis)
    for op in ("mkdir", "rename", "unlink"):
        assert with_redis[op] < 1.0, f"{op} on A took {with_redis[op]:.2f} s to show on B"

    redis_server.stop()  # an outage: operations go on, B converges by the timeouts
    without = _namespace_round(pair, "2", CONVERGE_S)
    print("without Redis:", without)
    for op in ("mkdir", "rename", "unlink"):
        assert without[op] < CONVERGE_S, f"{op} took {without[op]:.2f} s without Redis"
        # a dead Redis costs an operation nothing it waits for
        assert without[f"{op} op"] < 5.0, f"{op} on A took {without[f'{op} op']:.2f} s"
    payload = os.urandom(200_000)
    (pair.a.mnt / "after").write_bytes(payload)
    assert (pair.b.mnt / "after").read_bytes() == payload


def test_changes_missed_while_redis_was_down_reach_b_after_it_resubscribes(
    redis_server: RedisServer,
    mysql_url: str,
    s3_bucket: Bucket,
    make_fs: Callable[..., CloudFS],
) -> None:
    """B keeps its kernel caches for an hour (-o attr_timeout=3600) and counts on Redis
    to hear of changes. What A changes while Redis is down is never announced; once
    B's subscriber is back it drops every kernel cache it has, so B shows the changes
    long before its timeouts would."""
    pair = _mount_pair(redis_server, mysql_url, s3_bucket, make_fs, "-o", "attr_timeout=3600")
    a, b = pair.a, pair.b
    (a.mnt / "d").mkdir()
    (a.mnt / "d" / "f").write_bytes(b"old")
    seen_after(lambda: exists(b.mnt / "d" / "f"), CONVERGE_S, "the file on B")
    assert (b.mnt / "d" / "f").read_bytes() == b"old"  # B's kernel caches it now
    mode = os.stat(b.mnt / "d" / "f").st_mode & 0o777

    redis_server.stop()
    new = b"new contents, longer than the old"
    (a.mnt / "d" / "f").write_bytes(new)
    os.chmod(a.mnt / "d" / "f", mode ^ 0o070)
    (a.mnt / "d" / "g").write_bytes(b"g")
    log = b.cache / "mount.log"
    again = len(re.findall(r"subscribed to Redis \S+ again", log.read_text()))
    redis_server.start(port=int(pair.redis_url.rsplit(":", 1)[1].split("/")[0]))
    # the subscriber retries with pauses of up to 5 s; generous for a loaded machine
    seen_after(
        lambda: len(re.findall(r"subscribed to Redis \S+ again", log.read_text())) > again,
        60.0, "B subscribing to Redis again",
    )  # fmt: skip
    # the caches were dropped before that line was logged; the rest is B's own round trip
    seen_after(lambda: os.stat(b.mnt / "d" / "f").st_size == len(new), 10.0, "the new size on B")
    assert os.stat(b.mnt / "d" / "f").st_mode & 0o777 == mode ^ 0o070
    assert (b.mnt / "d" / "f").read_bytes() == new
    assert sorted(os.listdir(b.mnt / "d")) == ["f", "g"]


@pytest.mark.log_errors_expected(r"read failed: object not found in the store")
def test_a_dead_machines_pending_uploads_are_reported_and_kept(
    redis_server: RedisServer,
    mysql_url: str,
    s3_bucket: Bucket,
    make_fs: Callable[..., CloudFS],
) -> None:
    """B runs with --upload=async; its daemon is frozen, B fsyncs a file (acknowledged:
    sealed and committed, not uploaded) and the machine dies. Its blocks are pending
    with their plaintext only in B's cache dir: A reads the file as EIO, and fsck
    --repair from A's cache dir reports them as waiting on another machine instead of
    dropping them as lost. Once B comes back, its daemon uploads them and the file
    reads back whole everywhere."""
    pair = _mount_pair(redis_server, mysql_url, s3_bucket, make_fs, "--upload=async")
    a, b = pair.a, pair.b
    daemon = b.daemon_pid()
    assert daemon is not None
    os.kill(daemon, signal.SIGSTOP)  # nothing of B's is uploaded from here on
    payload = os.urandom(200_000)
    with open(b.mnt / "f", "wb") as f:
        f.write(payload)
        os.fsync(f.fileno())  # async: returns once sealed in B's cache dir, committed
    b.kill_mount(signal.SIGKILL)
    b.kill_daemon(signal.SIGKILL)

    seen_after(lambda: exists(a.mnt / "f"), CONVERGE_S, "the file on A")
    assert os.stat(a.mnt / "f").st_size == len(payload)
    with pytest.raises(OSError) as raised:
        (a.mnt / "f").read_bytes()
    assert raised.value.errno == errno.EIO
    a.unmount()
    r = a.run("fsck.cloudfs", a.storage_url, "--cachedir", a.cache, *a.storage_args, "--repair")
    out = r.stdout + r.stderr
    assert r.returncode == 4, out  # left uncorrected: only B can
    assert "blocks wait for upload from another machine's cache dir" in out, out
    assert "DATA LOST" not in out, out

    # B is back (its Redis password was in the URL, so it is not remembered): its
    # daemon uploads what it left pending
    b.mount(env=dict(b.env, CLOUDFS_REDIS_PASSWORD=redis_server.password))
    b.flush()
    assert (b.mnt / "f").read_bytes() == payload
    b.unmount()
    r = a.run("fsck.cloudfs", a.storage_url, "--cachedir", a.cache, *a.storage_args)
    assert r.returncode == 0 and "clean" in r.stdout, r.stdout + r.stderr


def _concurrent_writers_leave_a_winner_and_a_conflict(pair: Pair) -> None:
    a, b = pair.a, pair.b
    (a.mnt / "c").write_bytes(b"original\n" * 1000)
    from_a = b"written on A\n" * 2000
    from_b = b"written on B\n" * 1500
    with open(a.mnt / "c", "r+b") as fa, open(b.mnt / "c", "r+b") as fb:
        fa.write(from_a)
        fb.write(from_b)
        fb.truncate(len(from_b))
        fa.flush()
        fb.flush()
        os.fsync(fa.fileno())  # A commits first ...
        os.fsync(fb.fileno())  # ... B later, from the original it read: B wins
    for mnt in (a.mnt, b.mnt):
        assert (mnt / "c").read_bytes() == from_b
    r = a.check("cloudfs", "versions", "--json", a.mnt / "c")
    versions = json.loads(r.stdout)
    conflicts = [v for v in versions if v["conflict"]]
    assert len(conflicts) == 1, versions
    assert versions[-1]["current"] and not versions[-1]["conflict"]
    # the overwritten content is still there, in the history
    lost = a.mnt / ".cloudfs" / "versions" / "c" / str(conflicts[0]["version"])
    assert lost.read_bytes() == from_a  # longer than the original: all of it A's


def _operations_spread_over_both_mounts_agree_with_a_local_model(
    pair: Pair, tmp_path: Path
) -> None:
    """A seeded random program of namespace and content operations, each on A or B,
    also run on a local directory; after each step both mounts show the model's tree
    (the other mount within the convergence time)."""
    rng = random.Random(5)
    model = tmp_path / "model"
    model.mkdir()
    mounts = [pair.a.mnt, pair.b.mnt]

    def tree(root: Path) -> dict[str, bytes | None]:
        out: dict[str, bytes | None] = {}
        for dirpath, dirnames, filenames in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            for d in dirnames:
                out[os.path.normpath(os.path.join(rel, d)) + "/"] = None
            for f in filenames:
                out[os.path.normpath(os.path.join(rel, f))] = Path(dirpath, f).read_bytes()
        return out

    def paths(kind: str) -> list[str]:
        found = [p for p, v in tree(model).items() if (v is None) == (kind == "dir")]
        return sorted(p.rstrip("/") for p in found)

    def apply(root: Path, op: tuple) -> str:
        name, *args = op
        try:
            if name == "write":
                with open(root / args[0], "r+b" if exists(root / args[0]) else "wb") as f:
                    f.seek(args[1])
                    f.write(args[2])
            elif name == "truncate":
                os.truncate(root / args[0], args[1])
            elif name == "mkdir":
                os.mkdir(root / args[0])
            elif name == "rename":
                os.rename(root / args[0], root / args[1])
            elif name == "unlink":
                os.unlink(root / args[0])
            elif name == "rmdir":
                os.rmdir(root / args[0])
        except OSError as exc:
            return errno.errorcode[exc.errno or 0]
        return "ok"

    for step in range(40):
        files, dirs = paths("file"), paths("dir")
        where = rng.choice([".", *dirs])
        new = os.path.normpath(os.path.join(where, rng.choice("abcdefg")))
        choice = rng.choice(["write", "write", "truncate", "mkdir", "rename", "unlink", "rmdir"])
        if choice == "write":
            target = rng.choice([*files, new]) if files else new
            data = bytes([rng.randrange(256)]) * rng.randrange(1, 70_000)
            op: tuple = ("write", target, rng.randrange(0, 50_000), data)
        elif choice == "truncate" and files:
            op = ("truncate", rng.choice(files), rng.randrange(0, 60_000))
        elif choice == "mkdir":
            op = ("mkdir", new)
        elif choice == "rename" and (files or dirs):
            op = ("rename", rng.choice(files + dirs), new)
        elif choice == "unlink" and files:
            op = ("unlink", rng.choice(files))
        elif choice == "rmdir" and dirs:
            op = ("rmdir", rng.choice(dirs))
        else:
            op = ("mkdir", new)
        side = rng.randrange(2)
        expected = apply(model, op)
        got = apply(mounts[side], op)
        assert got == expected, f"step {step}: {op[:2]} on {'AB'[side]}: {got}, model {expected}"
        want = tree(model)
        for other in (side, 1 - side):
            seen_after(lambda: tree(mounts[other]) == want, CONVERGE_S,  # noqa: B023
                       f"step {step}: the tree on {'AB'[other]}")  # fmt: skip


def test_kill_one_mount_mid_write_the_other_goes_on_and_fsck_is_clean(pair: Pair) -> None:
    a, b = pair.a, pair.b
    (a.mnt / "before").write_bytes(os.urandom(100_000))
    writer = subprocess.Popen(
        [sys.executable, "-c",
         "import os, sys\n"
         "with open(sys.argv[1], 'wb') as f:\n"
         "    while True:\n"
         "        f.write(os.urandom(65536))\n",
         str(b.mnt / "growing")],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        seen_after(lambda: exists(b.mnt / "growing") and (b.mnt / "growing").stat().st_size
                   > 1_000_000, 60, "the writer on B")  # fmt: skip
        daemon = b.daemon_pid()
        b.kill_mount(signal.SIGKILL)
        if daemon is not None:
            b.kill_daemon(signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait()
    # A keeps working
    payload = os.urandom(500_000)
    (a.mnt / "after").write_bytes(payload)
    assert (a.mnt / "after").read_bytes() == payload
    (a.mnt / "dir").mkdir()
    assert {"before", "after", "dir"} <= set(os.listdir(a.mnt))

    # fsck from B's cache dir names the dead mount (A is alive: only a note)
    r = b.run("fsck.cloudfs", b.storage_url, "--cachedir", b.cache, *b.storage_args)
    assert r.returncode == 4, r.stdout + r.stderr
    assert "died" in r.stdout and "is mounted" in r.stdout, r.stdout

    # the cache dir remembers MySQL and Redis (the password: from the environment now);
    # the dead mount's rows go
    b.mount(env=dict(b.env, CLOUDFS_REDIS_PASSWORD=REDIS_PASSWORD))
    assert "change notifications through" in (b.cache / "mount.log").read_text()
    assert (b.mnt / "after").read_bytes() == payload
    b.unmount()
    a.unmount()
    for fs in (a, b):
        r = fs.run("fsck.cloudfs", fs.storage_url, "--cachedir", fs.cache, *fs.storage_args)
        # objects without rows may be left (with --upload=sync a seal stores its blocks
        # before its commit, and A was killed in between): within the orphan grace
        # period they are notes, and a repair after it deletes them
        assert r.returncode == 0 and "clean" in r.stdout, r.stdout + r.stderr


def test_bad_shared_mounts_fail_with_one_line(
    redis_server: RedisServer,
    mariadb: MariaDB,
    mysql_url: str,
    s3_bucket: Bucket,
    make_fs: Callable[..., CloudFS],
) -> None:
    a = make_fs("a", bucket=s3_bucket, mkfs=False, mount=False)
    a.mkfs("--metadata", mysql_url)
    other = make_fs("other", bucket=s3_bucket, mkfs=False, mount=False)
    other_db = mariadb.create_database()
    try:
        other.mkfs("--metadata", mariadb.url(other_db))
        mount = ["mount.cloudfs", a.storage_url, a.mnt, "--cachedir", a.root / "cache2",
                 *a.storage_args]  # fmt: skip
        closed = _free_port()
        cases = [
            ([*mount, "--metadata", f"mysql://{mariadb.user}@127.0.0.1:{closed}/x"], a.env),
            ([*mount, "--metadata", mysql_url], dict(a.env, CLOUDFS_MYSQL_PASSWORD="wrong")),
            ([*mount, "--metadata", mariadb.url(other_db)], a.env),
            ([*mount, "--metadata", mysql_url, "--redis", f"redis://127.0.0.1:{closed}/0"],
             dict(a.env, CLOUDFS_REDIS_PASSWORD=REDIS_PASSWORD)),
            ([*mount, "--metadata", mysql_url, "--redis", redis_server.url],
             dict(a.env, CLOUDFS_REDIS_PASSWORD="wrong")),
        ]  # fmt: skip
        for argv, env in cases:
            started = time.monotonic()
            r = a.run(*argv, env=env, timeout=120)
            print(f"{time.monotonic() - started:.1f} s: {r.stderr.strip()}")
            line = one_line_failure(r, "mount.cloudfs")
            assert REDIS_PASSWORD not in line and mariadb.password not in line
            assert not a.mounted
    finally:
        mariadb.drop_database(other_db)
