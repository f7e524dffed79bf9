"""Durability modes: with --upload=async (the default) fsync returns once the data is
sealed in the cache dir, uploads follow; with --upload=sync fsync, and the close of a
file that was written, return only once its blocks are in the object store."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # the fixtures' type; conftest is not importable as a module
    from conftest import CloudFS

pytestmark = [pytest.mark.timeout(300), pytest.mark.store_kinds("local", "s3")]

MiB = 1 << 20


class Background:
    """Run `fn` in a thread; `done` tells whether it returned, `error` what it raised."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.error: BaseException | None = None
        self.done = threading.Event()

        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported to the test
                self.error = exc
            finally:
                self.done.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()


def write_and_fsync(path: os.PathLike[str], data: bytes, *, close: bool = True) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, data)
    os.fsync(fd)
    if close:
        os.close(fd)
    return fd


def pending_blocks(fs: CloudFS) -> int:
    """Pending blocks per the metadata (read directly: `cloudfs stat` would wait for
    the stopped daemon)."""
    with fs.metadata_db() as db:
        return int(db.execute("SELECT COUNT(*) FROM blocks WHERE state = 0").fetchone()[0])


def stored_everything(fs: CloudFS) -> dict:
    stats = fs.stat_json()
    assert stats["pending_uploads"] == 0, stats
    assert stats["blocks"] == len(fs.block_objects()), stats
    return stats


def test_async_fsync_does_not_wait_for_uploads(fs: CloudFS) -> None:
    daemon = fs.daemon_pid()
    assert daemon is not None
    os.kill(daemon, signal.SIGSTOP)  # nothing is uploaded meanwhile
    try:
        job = Background(lambda: write_and_fsync(fs.mnt / "f", os.urandom(12 * MiB)))
        assert job.done.wait(30), "fsync waited for the (stopped) uploader"
        assert job.error is None, job.error
        assert pending_blocks(fs) >= 3
    finally:
        os.kill(daemon, signal.SIGCONT)
    fs.flush()
    stored_everything(fs)


@pytest.mark.parametrize("how", ["--upload=sync", "-oupload=sync"])
def test_sync_fsync_and_close_wait_until_stored(
    make_fs: Callable[..., CloudFS], how: str, store_kind: str
) -> None:
    if store_kind == "s3" and how != "--upload=sync":
        pytest.skip("the option's other spelling is checked on the local store")
    fs = make_fs(mount=False)
    fs.mount(how)
    daemon = fs.daemon_pid()
    assert daemon is not None

    # fsync: held back while the uploader is stopped, and returns once it stored all
    os.kill(daemon, signal.SIGSTOP)
    try:
        fds: list[int] = []
        job = Background(
            lambda: fds.append(write_and_fsync(fs.mnt / "f", os.urandom(12 * MiB), close=False))
        )
        assert not job.done.wait(3), "fsync returned before the blocks were uploaded"
    finally:
        os.kill(daemon, signal.SIGCONT)
    assert job.done.wait(60) and job.error is None, job.error
    stats = stored_everything(fs)
    assert stats["blocks"] >= 3
    os.close(fds[0])

    # close (no fsync): the same
    os.kill(daemon, signal.SIGSTOP)
    try:
        data = os.urandom(10 * MiB)

        def write_and_close() -> None:
            with open(fs.mnt / "g", "wb") as f:
                f.write(data)

        job = Background(write_and_close)
        assert not job.done.wait(3), "close returned before the blocks were uploaded"
    finally:
        os.kill(daemon, signal.SIGCONT)
    assert job.done.wait(60) and job.error is None, job.error
    stored_everything(fs)

    # closing a file only read waits for nothing (and uploads nothing)
    started = time.monotonic()
    os.kill(daemon, signal.SIGSTOP)
    try:
        assert (fs.mnt / "g").read_bytes() == data
    finally:
        os.kill(daemon, signal.SIGCONT)
    assert time.monotonic() - started < 3

    # a truncate by path (the file open nowhere) seals a new version at once, whose cut
    # chunk's head is a new block: it returns once that block is stored, like a close
    os.kill(daemon, signal.SIGSTOP)
    try:
        job = Background(lambda: os.truncate(fs.mnt / "g", 5 * MiB + 12345))
        assert not job.done.wait(3), "truncate returned before its new block was uploaded"
    finally:
        os.kill(daemon, signal.SIGCONT)
    assert job.done.wait(60) and job.error is None, job.error
    stored_everything(fs)
    assert (fs.mnt / "g").read_bytes() == data[: 5 * MiB + 12345]


@pytest.mark.store_kinds("local")  # store-independent: the mount's own logic
def test_bad_upload_mode(make_fs: Callable[..., CloudFS]) -> None:
    fs = make_fs(mount=False)
    r = fs.run("mount.cloudfs", fs.storage_url, fs.mnt, "--cachedir", fs.cache, "-o",
               "upload=later")  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "mount.cloudfs: invalid arguments: upload=later: use upload=async or upload=sync"
    ]
    assert not fs.mounted
