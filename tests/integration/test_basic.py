"""cloudfs end to end on real mounts (issue 2): data survives remounts and cache loss,
dedup and CDC keep the store small, nothing readable reaches the store, a killed
daemon loses nothing, bad input gets one clear line, failing ops get the right errno,
and the namespace (names, links, modes, times, xattrs) persists.

Every test checks what a user would see: bytes read back, errno, stat fields, and the
objects in the store directory.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from cloudfs.meta import schema

if TYPE_CHECKING:  # the fixtures' type; conftest is not importable as a module
    from conftest import CloudFS

#: every test runs on a local store and on S3 (moto), see conftest's store_kind
pytestmark = pytest.mark.store_kinds("local", "s3")

MiB = 1 << 20
#: the default maximum chunk size (mkfs default: min 256 KiB, avg 1 MiB, max 4 MiB)
MAX_CHUNK = 4 * MiB
#: per-object overhead allowance: header, nonce and tag of a sealed block
OBJECT_OVERHEAD = 256


# --- helpers ---------------------------------------------------------------------------


def write_file(path: Path | bytes, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def read_file(path: Path | bytes) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def first_difference(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    step = 1 << 16
    for off in range(0, n, step):
        if a[off : off + step] != b[off : off + step]:
            for i in range(off, min(off + step, n)):
                if a[i] != b[i]:
                    return i
    return n


def assert_same(path: Path, expected: bytes) -> None:
    """The file at `path` holds exactly `expected` (size by stat and by read)."""
    size = os.stat(path).st_size
    assert size == len(expected), f"{path}: st_size {size}, expected {len(expected)}"
    got = read_file(path)
    if got != expected:
        pytest.fail(
            f"{path}: read {len(got)} bytes, expected {len(expected)}; "
            f"first difference at offset {first_difference(got, expected)}"
        )


def assert_files(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert_same(root / name, data)


def expect_errno(
    failures: list[str], expected: int, what: str, fn: Callable[..., object], *args: object
) -> None:
    """Call fn(*args); record a failure unless it raises OSError with `expected`."""
    try:
        fn(*args)
    except OSError as exc:
        if exc.errno != expected:
            failures.append(
                f"{what}: errno {errno.errorcode.get(exc.errno or 0, exc.errno)}, "
                f"expected {errno.errorcode[expected]}"
            )
        return
    failures.append(f"{what}: succeeded, expected {errno.errorcode[expected]}")


def one_line_failure(result: subprocess.CompletedProcess[str], prog: str) -> str:
    """A command failed the way bad input must fail: a non-zero exit and exactly one
    line on stderr, naming the program, with no traceback. Returns the line."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0, f"{prog} succeeded; stderr: {result.stderr!r}"
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, (
        f"{prog} printed {len(lines)} lines on stderr, expected 1:\n{result.stderr}"
    )
    assert lines[0].startswith(f"{prog}: "), lines[0]
    return lines[0]


# --- data ---------------------------------------------------------------------------------

SIZES = [0, 1, 4095, 4096, MiB + 1, 64 * MiB]


def test_files_survive_remount_and_loss_of_cached_blocks(fs: CloudFS) -> None:
    files = {f"size-{n}": os.urandom(n) for n in SIZES}
    for name, data in files.items():
        write_file(fs.mnt / name, data)
    assert_files(fs.mnt, files)
    assert sorted(os.listdir(fs.mnt)) == sorted(files)

    fs.remount()
    assert_files(fs.mnt, files)

    fs.flush()
    assert fs.stat_json()["pending_uploads"] == 0
    fs.unmount()
    dropped = fs.drop_cached_blocks()
    # 64 MiB alone is at least 16 blocks of at most 4 MiB
    assert dropped >= 16, f"only {dropped} block copies were in the cache"

    fs.mount()
    assert_files(fs.mnt, files)
    # every block was fetched back from the store through the daemon
    assert len(fs.cached_blocks()) == dropped


def test_unencrypted_filesystem_round_trip(make_fs: Callable[..., CloudFS]) -> None:
    fs = make_fs(encryption=False)
    files = {"small": b"hello\n", "big": os.urandom(5 * MiB + 3)}
    for name, data in files.items():
        write_file(fs.mnt / name, data)
    fs.flush()
    fs.unmount()
    assert fs.drop_cached_blocks() > 0
    fs.mount()
    assert_files(fs.mnt, files)


def test_overwrite_truncate_and_sparse_writes(fs: CloudFS) -> None:
    data = bytearray(os.urandom(3 * MiB))
    write_file(fs.mnt / "f", bytes(data))
    with open(fs.mnt / "f", "r+b") as f:
        f.seek(MiB + 17)
        f.write(b"x" * 5000)
    data[MiB + 17 : MiB + 17 + 5000] = b"x" * 5000
    with open(fs.mnt / "sparse", "wb") as f:
        f.seek(10 * MiB)
        f.write(b"end")
    os.truncate(fs.mnt / "f", 2 * MiB)
    os.truncate(fs.mnt / "f", 2 * MiB + 100)  # grows with zeros
    expected = {"f": bytes(data[: 2 * MiB]) + bytes(100), "sparse": bytes(10 * MiB) + b"end"}
    assert_files(fs.mnt, expected)
    fs.remount()
    assert_files(fs.mnt, expected)


def test_truncate_by_path_right_after_close(fs: CloudFS) -> None:
    """`truncate -s` just after a writer closed the file (its last close is still
    sealing) must not be lost."""
    data = os.urandom(3 * MiB)
    write_file(fs.mnt / "f", data)
    os.truncate(fs.mnt / "f", 1000)
    assert_same(fs.mnt / "f", data[:1000])
    fs.remount()
    assert_same(fs.mnt / "f", data[:1000])


def test_identical_files_are_stored_once(fs: CloudFS) -> None:
    data = os.urandom(32 * MiB)
    write_file(fs.mnt / "a", data)
    fs.flush()
    one_copy = fs.store_block_bytes()
    # random data does not compress: one copy is 32 MiB plus per-object overhead
    assert 32 * MiB <= one_copy <= 32 * MiB + 64 * OBJECT_OVERHEAD, one_copy

    write_file(fs.mnt / "b", data)
    fs.flush()
    two_copies = fs.store_block_bytes()
    assert two_copies - one_copy <= 64 * 1024, (
        f"the second copy added {two_copies - one_copy} bytes"
    )
    stats = fs.stat_json()
    assert stats["files"] == 2 and stats["logical_bytes"] == 64 * MiB, stats
    assert stats["pending_uploads"] == 0, stats
    assert stats["dedup_ratio"] >= 1.95, stats
    assert_same(fs.mnt / "b", data)


def test_inserting_one_byte_stores_at_most_two_chunks(fs: CloudFS) -> None:
    data = os.urandom(64 * MiB)
    write_file(fs.mnt / "big", data)
    fs.flush()
    before = fs.store_block_bytes()

    # an editor's save: write a new file, rename it over the old one
    edited = data[: 32 * MiB] + b"!" + data[32 * MiB :]
    write_file(fs.mnt / "big.new", edited)
    os.rename(fs.mnt / "big.new", fs.mnt / "big")
    fs.flush()
    added = fs.store_block_bytes() - before
    assert added <= 2 * MAX_CHUNK, f"1 inserted byte added {added} bytes to the store"
    assert_same(fs.mnt / "big", edited)
    assert not (fs.mnt / "big.new").exists()


def test_marker_never_reaches_the_store(fs: CloudFS) -> None:
    marker = b"CLOUDFS-MARKER-" + secrets.token_hex(8).encode()
    # compressible (the marker alone) and incompressible (marker between random bytes)
    write_file(fs.mnt / "repeated", marker * 200_000)
    write_file(fs.mnt / "mixed", b"".join(os.urandom(1000) + marker for _ in range(3000)))
    fs.flush()
    fs.unmount()

    # the plaintext copies in the cache do hold it: the scan below would find it
    assert any(marker in p.read_bytes() for p in fs.cached_blocks())
    objects = fs.store_contents()
    assert len(fs.block_objects()) >= 2
    leaking = [name for name, data in objects.items() if marker in data]
    assert not leaking, f"the marker is readable in {leaking}"


def test_passphrase_never_leaks(make_fs: Callable[..., CloudFS]) -> None:
    fs = make_fs(mkfs=False, mount=False)
    secret = "pass-" + secrets.token_hex(12)
    pfile = fs.root / "passphrase"
    pfile.write_text(secret + "\n")
    env = {k: v for k, v in fs.env.items() if k != "CLOUDFS_PASSPHRASE"}
    fs.check(
        "mkfs.cloudfs", fs.storage_url, "--cachedir", fs.cache, *fs.storage_args,
        "--passphrase-file", pfile, env=env,
    )  # fmt: skip
    fs.mount("--passphrase-file", str(pfile), env=env)
    write_file(fs.mnt / "f", os.urandom(MiB))
    fs.flush()

    needle = secret.encode()
    daemon = fs.daemon_pid()
    assert daemon is not None and fs.mount_pid is not None
    for pid in (fs.mount_pid, daemon):
        for what in ("cmdline", "environ"):
            assert needle not in Path(f"/proc/{pid}/{what}").read_bytes(), (
                f"passphrase in /proc/{pid}/{what}"
            )
    fs.unmount()
    files = [p for p in fs.cache.rglob("*") if p.is_file()]
    leaking = [str(p) for p in files if needle in p.read_bytes()]
    leaking += [f"object {k}" for k, data in fs.store_contents().items() if needle in data]
    assert not leaking, f"the passphrase is in {leaking}"

    # the daemon, started by the mount, never saw the passphrase; the mount with a
    # passphrase from the environment must not hand it on either
    fs.kill_daemon()
    fs.mount(env={**env, "CLOUDFS_PASSPHRASE": secret})
    daemon = fs.daemon_pid()
    assert daemon is not None
    for what in ("cmdline", "environ"):
        assert needle not in Path(f"/proc/{daemon}/{what}").read_bytes(), (
            f"passphrase in daemon's {what}"
        )


# --- the daemon -------------------------------------------------------------------------


def test_killed_daemon_resumes_uploads(fs: CloudFS, store_kind: str) -> None:
    """kill -9 the daemon in the middle of uploading 200 MiB (80 MiB to S3, where
    uploads are slower anyway); once restarted, every block ends up stored and every
    file reads back from the store."""
    count = 10 if store_kind == "local" else 4
    files: dict[str, bytes] = {}
    daemon = fs.daemon_pid()
    assert daemon is not None

    # Freeze the daemon while writing, so that uploads are surely under way when it
    # is killed: it resumes, and is frozen again and killed as soon as it has stored
    # something. A loaded machine may not run this process again before the daemon
    # has stored everything; then the round is done again with new files.
    for attempt in range(3):
        batch = {f"part-{attempt}-{i}": os.urandom(20 * MiB) for i in range(count)}
        files.update(batch)
        os.kill(daemon, signal.SIGSTOP)
        try:
            stored_before = len(fs.block_objects())
            for name, data in batch.items():
                write_file(fs.mnt / name, data)
        finally:
            os.kill(daemon, signal.SIGCONT)
        deadline = time.monotonic() + 60
        while len(fs.block_objects()) <= stored_before:
            assert time.monotonic() < deadline, "the daemon stored nothing within 60 s"
            time.sleep(0.01)
        os.kill(daemon, signal.SIGSTOP)
        fs.kill_daemon(signal.SIGKILL)
        assert fs.daemon_pid() is None
        stats = fs.stat_json()
        if stats["pending_uploads"] > 0:
            break
        restarted = fs.run("cloudfsd", "--cachedir", fs.cache)
        assert restarted.returncode == 0, restarted.stderr
        daemon = fs.daemon_pid()
        assert daemon is not None
    else:
        pytest.fail("three times, the daemon had stored everything before it was stopped")
    stored_at_kill = len(fs.block_objects())

    # restart it the way a user would
    restarted = fs.run("cloudfsd", "--cachedir", fs.cache)
    assert restarted.returncode == 0, restarted.stderr
    new_daemon = fs.daemon_pid()
    assert new_daemon is not None and new_daemon != daemon

    fs.flush()
    stats = fs.stat_json()
    assert stats["pending_uploads"] == 0, stats
    assert len(fs.block_objects()) > stored_at_kill
    # every block row names an object, and there is no object without a row
    assert stats["blocks"] == len(fs.block_objects()), stats

    fs.unmount()
    fs.drop_cached_blocks()
    fs.mount()
    for name, data in files.items():
        path = fs.mnt / name
        assert os.stat(path).st_size == len(data)
        with open(path, "rb") as f:
            assert digest(f.read()) == digest(data), f"{name} differs after the daemon was killed"


def test_mount_restarts_a_killed_daemon(fs: CloudFS) -> None:
    data = os.urandom(6 * MiB)
    write_file(fs.mnt / "f", data)
    fs.flush()
    fs.unmount()
    fs.drop_cached_blocks()
    fs.mount()
    old = fs.kill_daemon(signal.SIGKILL)
    assert old is not None
    # the read needs blocks from the store, so the mount must bring a daemon back
    assert_same(fs.mnt / "f", data)
    new = fs.daemon_pid()
    assert new is not None and new != old
    # and new data is uploaded by the new daemon
    write_file(fs.mnt / "g", os.urandom(MiB))
    fs.flush()
    assert fs.stat_json()["pending_uploads"] == 0


def test_daemon_stops_cleanly_on_sigterm_during_uploads(fs: CloudFS) -> None:
    daemon = fs.daemon_pid()
    assert daemon is not None
    files = {f"f{i}": os.urandom(5 * MiB) for i in range(4)}
    os.kill(daemon, signal.SIGSTOP)  # so that the uploads are still to do at SIGTERM
    try:
        for name, data in files.items():
            write_file(fs.mnt / name, data)
        time.sleep(0.5)  # the mount's seals and kicks reach the daemon's socket
    finally:
        os.kill(daemon, signal.SIGTERM)
        os.kill(daemon, signal.SIGCONT)
    code = fs.wait_exit(daemon, 30)
    assert code in (0, None), f"cloudfsd exited {code} on SIGTERM"
    assert not (fs.cache / "daemon.sock").exists()

    restarted = fs.run("cloudfsd", "--cachedir", fs.cache)
    assert restarted.returncode == 0, restarted.stderr
    fs.flush()
    assert fs.stat_json()["pending_uploads"] == 0
    fs.unmount()
    fs.drop_cached_blocks()
    fs.mount()
    assert_files(fs.mnt, files)


def test_mount_unmounts_cleanly_on_sigterm(fs: CloudFS) -> None:
    files = {"a": os.urandom(3 * MiB), "b": b"small"}
    for name, data in files.items():
        write_file(fs.mnt / name, data)
    pid = fs.mount_pid
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    code = fs.wait_exit(pid, 60)
    fs.mount_pid = None
    assert code in (0, None), f"mount.cloudfs exited {code} on SIGTERM"
    assert not fs.mounted
    fs.mount()
    assert_files(fs.mnt, files)


def test_unmount_leaves_the_daemon_to_exit_by_itself(make_fs: Callable[..., CloudFS]) -> None:
    fs = make_fs()
    write_file(fs.mnt / "f", os.urandom(2 * MiB))
    assert fs.daemon_pid() is not None
    assert fs.unmount() in (0, None)
    assert not fs.mounted
    # the daemon uploads what is pending, then exits ~10 s after the last mount left
    fs.wait_daemon_gone(60)
    assert not (fs.cache / "daemon.sock").exists()
    fs.mount()
    assert fs.stat_json()["pending_uploads"] == 0


# --- corrupt objects --------------------------------------------------------------------


@pytest.mark.log_errors_expected(r"(?i)corrupt|verification|damaged|EIO|fetch")
def test_damaged_objects_read_as_eio(fs: CloudFS) -> None:
    files = {
        name: os.urandom(200 * 1024)
        for name in ("flipped", "truncated", "swap1", "swap2", "intact")
    }
    for name, data in files.items():
        write_file(fs.mnt / name, data)  # below the 256 KiB minimum chunk: one block
    fs.flush()
    fs.unmount()
    by_name = {}
    for name, data in files.items():
        objs = [p for p in fs.cached_blocks() if p.read_bytes() == data]
        assert len(objs) == 1, name
        by_name[name] = f"blocks/{objs[0].parent.name}/{objs[0].name}"
    fs.drop_cached_blocks()

    flipped = bytearray(fs.read_object(by_name["flipped"]))
    flipped[len(flipped) // 2] ^= 0x10
    fs.write_object(by_name["flipped"], bytes(flipped))
    truncated = fs.read_object(by_name["truncated"])
    fs.write_object(by_name["truncated"], truncated[: len(truncated) - 100])
    one, two = fs.read_object(by_name["swap1"]), fs.read_object(by_name["swap2"])
    fs.write_object(by_name["swap1"], two)
    fs.write_object(by_name["swap2"], one)

    fs.mount()
    for name in ("flipped", "truncated", "swap1", "swap2"):
        try:
            got = read_file(fs.mnt / name)
        except OSError as exc:
            assert exc.errno == errno.EIO, f"{name}: {exc}"
        else:
            pytest.fail(f"{name}: read {len(got)} bytes from a damaged object instead of EIO")
    assert_same(fs.mnt / "intact", files["intact"])


# --- bad input ---------------------------------------------------------------------------


def test_wrong_passphrase(make_fs: Callable[..., CloudFS]) -> None:
    fs = make_fs(mount=False)
    before = fs.store_objects()
    r = fs.run(
        "mount.cloudfs",
        fs.storage_url,
        fs.mnt,
        "--cachedir",
        fs.cache,
        *fs.storage_args,
        env={**fs.env, "CLOUDFS_PASSPHRASE": "not the passphrase"},
    )
    line = one_line_failure(r, "mount.cloudfs")
    assert "passphrase" in line.lower()
    assert not fs.mounted
    assert fs.daemon_pid() is None
    assert fs.store_objects() == before


def test_store_without_filesystem(make_fs: Callable[..., CloudFS], store_kind: str) -> None:
    fs = make_fs(mkfs=False, mount=False)
    fs.write_object("unrelated", b"not a cloudfs object")
    before = fs.store_objects()
    r = fs.run("mount.cloudfs", fs.storage_url, fs.mnt, "--cachedir", fs.cache, *fs.storage_args)
    one_line_failure(r, "mount.cloudfs")
    assert not fs.mounted
    assert fs.store_objects() == before
    assert list(before) == ["unrelated"]

    if store_kind == "local":
        missing = fs.root / "no-such-store"
        r = fs.run("mount.cloudfs", f"local://{missing}", fs.mnt, "--cachedir", fs.cache)
        one_line_failure(r, "mount.cloudfs")
        assert not missing.exists()
    else:
        r = fs.run("mount.cloudfs", "s3://no-such-bucket/fs", fs.mnt, "--cachedir", fs.cache,
                   *fs.storage_args)  # fmt: skip
        line = one_line_failure(r, "mount.cloudfs")
        assert "no-such-bucket" in line, line


@pytest.mark.store_kinds("local")  # store-independent: the mount's own logic
@pytest.mark.parametrize("kind", ["missing", "file", "mounted"])
def test_bad_mount_point(make_fs: Callable[..., CloudFS], kind: str) -> None:
    fs = make_fs(mount=kind == "mounted")
    target = fs.mnt
    if kind == "missing":
        target = fs.root / "no-such-dir"
    elif kind == "file":
        target = fs.root / "a-file"
        target.write_text("x")
    before = fs.store_objects()
    r = fs.run("mount.cloudfs", fs.storage_url, target, "--cachedir", fs.cache, *fs.storage_args)
    one_line_failure(r, "mount.cloudfs")
    if kind == "missing":
        assert not target.exists()
    elif kind == "file":
        assert target.read_text() == "x"
    else:
        # the first mount still serves
        write_file(fs.mnt / "still-works", b"yes")
        assert read_file(fs.mnt / "still-works") == b"yes"
        assert len([p for p in fs.mount_exits if p is not None]) == 0
    if kind != "mounted":
        assert fs.store_objects() == before


def metadata_digest(fs: CloudFS) -> str:
    """A digest of the rows of every metadata table (SQLite or MySQL)."""
    with fs.metadata_db() as db:
        rows = [
            sorted(map(repr, db.execute(f"SELECT * FROM {table}").fetchall()))
            for table in schema.table_names()
        ]
    return digest(repr(rows).encode())


def test_mkfs_refuses_an_existing_filesystem(make_fs: Callable[..., CloudFS]) -> None:
    fs = make_fs()
    write_file(fs.mnt / "keep", b"precious")
    fs.flush()
    fs.unmount()
    fs.kill_daemon()  # MySQL: the daemon backs the metadata up once the mount left
    before = fs.store_objects()
    meta_before = metadata_digest(fs)
    for cachedir in (fs.cache, fs.root / "other-cache"):
        r = fs.run("mkfs.cloudfs", fs.storage_url, "--cachedir", cachedir, *fs.storage_args)
        line = one_line_failure(r, "mkfs.cloudfs")
        assert "exists" in line, line
        assert fs.store_objects() == before
    assert metadata_digest(fs) == meta_before
    fs.mount()
    assert read_file(fs.mnt / "keep") == b"precious"


def test_mkfs_chunk_size_sets_the_block_sizes(make_fs: Callable[..., CloudFS]) -> None:
    fs = make_fs(mkfs=False, mount=False)
    for bad, why in (("3M", "power of two"), ("32M", "power of two"), ("big", "not a size")):
        r = fs.run("mkfs.cloudfs", fs.storage_url, "--cachedir", fs.cache, "--chunk-size", bad)
        line = one_line_failure(r, "mkfs.cloudfs")
        assert why in line, line
        assert not (fs.store / "superblock").exists()
    fs.mkfs("--chunk-size", "64K")
    fs.mount()
    data = os.urandom(2 << 20)
    (fs.mnt / "f").write_bytes(data)
    fs.flush()
    # 16 KiB to 256 KiB pieces: ~32 blocks, where the default (512 KiB to 8 MiB) makes 1 to 4
    assert 8 <= fs.stat_json()["blocks"] <= 128
    fs.check("cloudfs", "drop-cache", fs.mnt)
    assert (fs.mnt / "f").read_bytes() == data


# --- errno --------------------------------------------------------------------------------


@pytest.mark.store_kinds("local")  # store-independent: the mount's own logic
def test_failing_operations_return_the_right_errno(fs: CloudFS) -> None:
    m = fs.mnt
    (m / "dir").mkdir()
    (m / "dir" / "inner").write_bytes(b"x")
    (m / "empty").mkdir()
    (m / "file").write_bytes(b"data")
    long_name = "n" * 256
    f: list[str] = []

    expect_errno(f, errno.ENOENT, "stat missing", os.stat, m / "missing")
    expect_errno(f, errno.ENOENT, "open missing", open, m / "missing", "rb")
    expect_errno(f, errno.ENOENT, "create in missing dir", open, m / "nodir" / "x", "wb")
    expect_errno(f, errno.ENOENT, "unlink missing", os.unlink, m / "missing")
    expect_errno(f, errno.ENOENT, "rmdir missing", os.rmdir, m / "missing")
    expect_errno(f, errno.ENOENT, "rename missing", os.rename, m / "missing", m / "other")
    expect_errno(f, errno.ENOENT, "listdir missing", os.listdir, m / "missing")
    expect_errno(f, errno.ENOENT, "readlink missing", os.readlink, m / "missing")
    expect_errno(f, errno.ENOENT, "link missing", os.link, m / "missing", m / "other")
    expect_errno(f, errno.ENOENT, "chmod missing", os.chmod, m / "missing", 0o644)

    expect_errno(f, errno.EEXIST, "mkdir existing dir", os.mkdir, m / "dir")
    expect_errno(f, errno.EEXIST, "mkdir over file", os.mkdir, m / "file")
    expect_errno(
        f, errno.EEXIST, "O_EXCL create", os.open, m / "file", os.O_CREAT | os.O_EXCL | os.O_WRONLY
    )
    expect_errno(f, errno.EEXIST, "symlink over file", os.symlink, "target", m / "file")
    expect_errno(f, errno.EEXIST, "link over file", os.link, m / "file", m / "dir" / "inner")
    expect_errno(f, errno.EEXIST, "mknod over file", os.mkfifo, m / "file")

    expect_errno(f, errno.ENOTEMPTY, "rmdir non-empty", os.rmdir, m / "dir")
    expect_errno(
        f, errno.ENOTEMPTY, "rename dir over non-empty dir", os.rename, m / "empty", m / "dir"
    )

    expect_errno(f, errno.ENOTDIR, "rmdir file", os.rmdir, m / "file")
    expect_errno(f, errno.ENOTDIR, "mkdir under file", os.mkdir, m / "file" / "sub")
    expect_errno(f, errno.ENOTDIR, "stat under file", os.stat, m / "file" / "x")
    expect_errno(f, errno.ENOTDIR, "listdir file", os.listdir, m / "file")
    expect_errno(f, errno.ENOTDIR, "rename dir over file", os.rename, m / "empty", m / "file")

    expect_errno(f, errno.EISDIR, "open dir for writing", open, m / "dir", "wb")
    expect_errno(f, errno.EISDIR, "unlink dir", os.unlink, m / "dir")
    expect_errno(f, errno.EISDIR, "rename file over dir", os.rename, m / "file", m / "empty")

    expect_errno(f, errno.ENAMETOOLONG, "create 256-byte name", open, m / long_name, "wb")
    expect_errno(f, errno.ENAMETOOLONG, "mkdir 256-byte name", os.mkdir, m / long_name)
    expect_errno(f, errno.ENAMETOOLONG, "stat 256-byte name", os.stat, m / long_name)
    expect_errno(f, errno.ENAMETOOLONG, "symlink 256-byte name", os.symlink, "t", m / long_name)
    expect_errno(f, errno.ENAMETOOLONG, "link 256-byte name", os.link, m / "file", m / long_name)
    expect_errno(
        f, errno.ENAMETOOLONG, "rename to 256-byte name", os.rename, m / "file", m / long_name
    )
    expect_errno(f, errno.ENAMETOOLONG, "mkfifo 256-byte name", os.mkfifo, m / long_name)

    expect_errno(f, errno.ENODATA, "getxattr missing", os.getxattr, m / "file", "user.missing")
    expect_errno(
        f, errno.ENODATA, "removexattr missing", os.removexattr, m / "file", "user.missing"
    )
    os.setxattr(m / "file", "user.there", b"1")
    expect_errno(
        f,
        errno.EEXIST,
        "setxattr XATTR_CREATE existing",
        os.setxattr,
        m / "file",
        "user.there",
        b"2",
        os.XATTR_CREATE,
    )
    expect_errno(
        f,
        errno.ENODATA,
        "setxattr XATTR_REPLACE missing",
        os.setxattr,
        m / "file",
        "user.nope",
        b"2",
        os.XATTR_REPLACE,
    )

    # a 255-byte name is fine
    ok = "o" * 255
    (m / ok).write_bytes(b"ok")
    assert (m / ok).read_bytes() == b"ok"
    assert ok in os.listdir(m)

    # nothing changed by the failed calls
    assert sorted(os.listdir(m)) == sorted(["dir", "empty", "file", ok])
    assert (m / "file").read_bytes() == b"data"
    assert os.listdir(m / "dir") == ["inner"]
    assert not f, "wrong errno:\n" + "\n".join(f)


# --- namespace ----------------------------------------------------------------------------

_TIMES = (1_600_000_000_123_456_789, 1_650_000_000_987_654_321)
_BINARY_NAME = b"bin\xff\xfe-name"


def _build_tree(m: Path) -> dict[str, bytes]:
    """Make a tree that exercises every namespace operation; returns file contents."""
    (m / "a" / "b" / "c").mkdir(parents=True)
    contents = {
        "a/b/c/deep": os.urandom(1000),
        "a/moved": b"moved file\n",
        "a/replaced": b"new content\n",
        "linked": b"two names\n",
        "ünïcode-名前": b"utf-8 name\n",
        "stamped": b"times set\n",
    }
    write_file(m / "a" / "b" / "c" / "deep", contents["a/b/c/deep"])
    # rename within and across directories
    write_file(m / "orig", contents["a/moved"])
    os.rename(m / "orig", m / "a" / "tmpname")
    os.rename(m / "a" / "tmpname", m / "a" / "moved")
    # rename over an existing file replaces it
    write_file(m / "a" / "replaced", b"old content\n")
    write_file(m / "a" / "replacement", contents["a/replaced"])
    os.rename(m / "a" / "replacement", m / "a" / "replaced")
    # rename a directory
    (m / "olddir").mkdir()
    write_file(m / "olddir" / "inside", b"inside\n")
    os.rename(m / "olddir", m / "a" / "newdir")
    contents["a/newdir/inside"] = b"inside\n"
    # unlink and rmdir
    write_file(m / "gone", b"x")
    os.unlink(m / "gone")
    (m / "gonedir").mkdir()
    os.rmdir(m / "gonedir")
    # hard links: one inode, two names, one of them unlinked later
    write_file(m / "linked", contents["linked"])
    os.link(m / "linked", m / "a" / "hardlink")
    os.link(m / "linked", m / "third")
    os.unlink(m / "third")
    contents["a/hardlink"] = contents["linked"]
    # symlinks, relative and absolute-looking, and a dangling one
    os.symlink("a/b/c/deep", m / "sym")
    os.symlink("/nowhere/at/all", m / "dangling")
    os.symlink("../linked", m / "a" / "up")
    write_file(m / "ünïcode-名前", contents["ünïcode-名前"])
    write_file(os.fsencode(m) + b"/" + _BINARY_NAME, b"binary name\n")
    # modes, owners, times
    os.chmod(m / "a" / "moved", 0o640)
    os.chmod(m / "a" / "b", 0o750)
    os.chmod(m / "a" / "replaced", 0o4755)
    os.chown(m / "a" / "moved", 1234, 5678)
    write_file(m / "stamped", contents["stamped"])
    os.utime(m / "stamped", ns=_TIMES)
    # xattrs
    os.setxattr(m / "a" / "moved", "user.color", b"blue")
    os.setxattr(m / "a" / "moved", "user.empty", b"")
    os.setxattr(m / "a" / "moved", "user.binary", bytes(range(256)))
    os.setxattr(m / "a" / "b", "user.on-dir", b"dir value")
    os.setxattr(m / "a" / "moved", "user.removed", b"x")
    os.removexattr(m / "a" / "moved", "user.removed")
    # a directory with many entries (readdir continues across several replies)
    (m / "many").mkdir()
    for i in range(600):
        (m / "many" / f"entry-{i:04d}").write_bytes(b"%d" % i)
    os.unlink(m / "many" / "entry-0300")
    return contents


def _check_tree(m: Path, contents: dict[str, bytes]) -> None:
    st = os.stat(m / "stamped")
    assert st.st_mtime_ns == _TIMES[1]
    # reading the file below moves a 2020 atime on (relatime: older than a day)
    assert st.st_atime_ns == _TIMES[0] or st.st_atime_ns > time.time_ns() - 600 * 10**9
    assert sorted(os.listdir(m)) == sorted(
        [
            "a",
            "linked",
            "sym",
            "dangling",
            "ünïcode-名前",
            "stamped",
            "many",
            os.fsdecode(_BINARY_NAME),
        ]
    )
    assert _BINARY_NAME in os.listdir(os.fsencode(m))
    assert sorted(os.listdir(m / "a")) == sorted(
        ["b", "moved", "replaced", "newdir", "hardlink", "up"]
    )
    assert os.listdir(m / "a" / "b") == ["c"]
    for rel, data in contents.items():
        assert_same(m / rel, data)
    assert read_file(os.fsencode(m) + b"/" + _BINARY_NAME) == b"binary name\n"

    one, two = os.stat(m / "linked"), os.stat(m / "a" / "hardlink")
    assert one.st_ino == two.st_ino and one.st_nlink == two.st_nlink == 2

    assert os.readlink(m / "sym") == "a/b/c/deep"
    assert stat.S_ISLNK(os.lstat(m / "sym").st_mode)
    assert read_file(m / "sym") == contents["a/b/c/deep"]
    assert os.readlink(m / "dangling") == "/nowhere/at/all"
    assert os.readlink(m / "a" / "up") == "../linked"
    assert read_file(m / "a" / "up") == contents["linked"]

    assert stat.S_IMODE(os.stat(m / "a" / "moved").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(m / "a" / "b").st_mode) == 0o750
    assert stat.S_IMODE(os.stat(m / "a" / "replaced").st_mode) == 0o4755
    assert stat.S_ISDIR(os.stat(m / "a" / "b").st_mode)
    st = os.stat(m / "a" / "moved")
    assert (st.st_uid, st.st_gid) == (1234, 5678)

    assert sorted(os.listxattr(m / "a" / "moved")) == ["user.binary", "user.color", "user.empty"]
    assert os.getxattr(m / "a" / "moved", "user.color") == b"blue"
    assert os.getxattr(m / "a" / "moved", "user.empty") == b""
    assert os.getxattr(m / "a" / "moved", "user.binary") == bytes(range(256))
    assert os.getxattr(m / "a" / "b", "user.on-dir") == b"dir value"

    many = os.listdir(m / "many")
    assert len(many) == len(set(many)) == 599
    assert set(many) == {f"entry-{i:04d}" for i in range(600)} - {"entry-0300"}
    assert read_file(m / "many" / "entry-0599") == b"599"
    # a directory's link count: 2 + its subdirectories
    assert os.stat(m / "a").st_nlink == 4  # ".", "b", "newdir" + its entry in the root


def test_namespace_operations_persist(fs: CloudFS) -> None:
    contents = _build_tree(fs.mnt)
    _check_tree(fs.mnt, contents)
    fs.remount()
    _check_tree(fs.mnt, contents)
    # and after the last name of a hard-linked file goes, the other stays
    os.unlink(fs.mnt / "linked")
    assert os.stat(fs.mnt / "a" / "hardlink").st_nlink == 1
    assert read_file(fs.mnt / "a" / "hardlink") == contents["linked"]
    fs.remount()
    assert os.stat(fs.mnt / "a" / "hardlink").st_nlink == 1
    assert not (fs.mnt / "linked").exists()


def test_open_unlinked_file_stays_readable(fs: CloudFS) -> None:
    data = os.urandom(2 * MiB)
    write_file(fs.mnt / "f", data)
    with open(fs.mnt / "f", "rb") as f:
        os.unlink(fs.mnt / "f")
        assert not (fs.mnt / "f").exists()
        assert f.read() == data
    fs.remount()
    assert os.listdir(fs.mnt) == []


def test_the_pyfuse3_request_loop_serves_the_same_filesystem(
    make_fs: Callable[..., CloudFS],
) -> None:
    """`-o fuse_loop=pyfuse3` (libfuse's loop instead of cloudfs's own) answers the
    same requests with the same handlers: files, listings, xattrs, renames, and the
    invalidations drop-cache sends through it."""
    fs = make_fs(mount=False)
    fs.mount("-o", "fuse_loop=pyfuse3")
    assert "(FUSE loop: pyfuse3)" in (fs.cache / "mount.log").read_text()
    m = fs.mnt
    data = secrets.token_bytes(3 * MiB)
    (m / "d").mkdir()
    (m / "d" / "f").write_bytes(data)
    os.setxattr(m / "d" / "f", "user.k", b"v")
    os.rename(m / "d" / "f", m / "d" / "g")
    assert sorted(os.listdir(m / "d")) == ["g"]
    assert os.getxattr(m / "d" / "g", "user.k") == b"v"
    fs.flush()
    fs.check("cloudfs", "drop-cache", m)
    assert (m / "d" / "g").read_bytes() == data
    fs.unmount()
    fs.mount()  # the direct loop reads what the other one wrote
    assert (m / "d" / "g").read_bytes() == data
    assert os.getxattr(m / "d" / "g", "user.k") == b"v"
