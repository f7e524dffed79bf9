"""The mount's poll of the FUSE device before its event loop sleeps
(`cloudfs.mount.spin`): only while requests come back to back, never when tasks are
ready to run, at most for its time; and the `poll_us` mount option."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
import trio
from cloudfs.mount import spin
from cloudfs.mount.options import parse as mount_args

from cloudfs.errors import UsageError


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


def _took(fn: object, *args: float) -> float:
    start = time.perf_counter()
    fn(*args)  # type: ignore[operator]
    return time.perf_counter() - start


def test_an_idle_loop_sleeps_at_once(pipe: tuple[int, int]) -> None:
    r, _w = pipe
    poller = spin.FusePoller(r, spin_s=0.2)
    assert _took(poller.before_io_wait, 1.0) < 0.1  # no request has come: not busy
    poller.after_io_wait(1.0)  # a wait that ended without a request
    assert _took(poller.before_io_wait, 1.0) < 0.1
    assert poller.hits == poller.misses == 0


def test_while_busy_it_polls_until_a_request_or_its_time(pipe: tuple[int, int]) -> None:
    r, w = pipe
    poller = spin.FusePoller(r, spin_s=0.2, busy_s=10.0)
    os.write(w, b"x")
    poller.after_io_wait(1.0)  # the wait ended with a request ready: busy now
    assert _took(poller.before_io_wait, 1.0) < 0.1  # one is ready: no waiting
    assert poller.hits == 1
    os.read(r, 1)
    assert _took(poller.before_io_wait, 1.0) >= 0.2  # polls for its whole time
    assert poller.misses == 1
    assert _took(poller.before_io_wait, 0.05) < 0.15  # never past the loop's own timeout
    assert _took(poller.before_io_wait, 0) < 0.1  # tasks are ready to run
    assert poller.misses == 2


def test_it_stops_polling_once_requests_stop_coming(pipe: tuple[int, int]) -> None:
    r, w = pipe
    poller = spin.FusePoller(r, spin_s=0.2, busy_s=0.05)
    os.write(w, b"x")
    poller.after_io_wait(1.0)
    os.read(r, 1)
    time.sleep(0.1)
    assert _took(poller.before_io_wait, 1.0) < 0.1
    assert poller.misses == 0


def test_fuse_fd_finds_the_device() -> None:
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError as exc:
        pytest.skip(f"/dev/fuse: {exc.strerror}")
    try:
        assert spin.fuse_fd() == fd
    finally:
        os.close(fd)


def test_poll_us_option() -> None:
    assert mount_args(["/s", "/m"]).poll_us is None  # the engine decides
    assert spin.poll_time(None, shared=False) == spin.SPIN_S
    assert spin.poll_time(None, shared=True) == 0
    assert spin.poll_time(250, shared=True) == 250e-6
    assert mount_args(["/s", "/m", "-o", "poll_us=0"]).poll_us == 0
    assert mount_args(["/s", "/m", "-o", "poll_us=250"]).poll_us == 250
    for bad in ("poll_us=soon", "poll_us=-1", "poll_us=1e9", "poll_us=nan"):
        with pytest.raises(UsageError, match="poll_us"):
            mount_args(["/s", "/m", "-o", bad])


def test_anything_else_ready_ends_the_poll(pipe: tuple[int, int]) -> None:
    r, _w = pipe
    r2, w2 = os.pipe()
    try:
        poller = spin.FusePoller(r, spin_s=0.2, busy_s=10.0, also=r2)
        poller._busy_until = time.perf_counter() + 10.0  # busy
        os.write(w2, b"x")
        assert _took(poller.before_io_wait, 1.0) < 0.1
        assert poller.hits == poller.misses == 0  # no request came
    finally:
        os.close(r2)
        os.close(w2)


def test_a_worker_threads_result_is_not_held_back_by_the_poll(pipe: tuple[int, int]) -> None:
    """In a running trio loop, with the poller busy and polling for 50 ms: 20 hops to a
    worker thread and back take far less than 20 polls would (trio's epoll ends it)."""
    r, _w = pipe

    async def main() -> float:
        poller = spin.FusePoller(r, spin_s=0.05, busy_s=60.0, also=spin._trio_epoll_fd())
        poller._busy_until = time.perf_counter() + 60.0
        trio.lowlevel.add_instrument(poller)
        try:
            start = time.perf_counter()
            for _ in range(20):
                await trio.to_thread.run_sync(time.sleep, 0.001)
            return time.perf_counter() - start
        finally:
            trio.lowlevel.remove_instrument(poller)

    assert trio.run(main) < 0.5  # 20 x 50 ms would be 1 s
