"""Poll the FUSE device for a moment before the mount's event loop goes to sleep.

A request that finds the mount asleep costs a wakeup of its thread (and of the CPU it
sleeps on): on this test machine, a virtual machine whose idle CPUs halt, that wakeup
was most of a request's round trip. A bare raw-/dev/fuse loop in Python answered 11,000
GETATTRs/s, and 38,000/s once it polled the device for 50 us before sleeping; the
mount's own GETATTR round trips (statx with AT_STATX_FORCE_SYNC, five alternating
pairs) went from 3,700-8,400/s to 5,400-12,700/s with `FusePoller` (this version,
three pairs: 6,700-9,900/s with `-o poll_us=0`, 9,700-12,300/s by default). The CPU
per request did not grow (/proc's CPU times): sleeping and waking cost CPU too.

So while requests come back to back, the loop polls the device for up to `SPIN_S`
before it sleeps; the next request of a caller that is working through a tree is
usually there by then. It polls only while busy: when a wait ended with a request
ready, or a poll found one, within the last `BUSY_S`. An idle mount, whose loop wakes
only for its timers, never spins. It polls trio's own epoll descriptor too, so that
anything else the loop waits for (a worker thread's result, such as every MySQL
query's, a socket) ends the poll at once instead of waiting for its end.
"""

from __future__ import annotations

import logging
import os
import select
import time

import trio

log = logging.getLogger(__name__)

#: how long the loop polls the device before it sleeps
SPIN_S = 100e-6
#: how long after the last request that found the loop busy it still polls
BUSY_S = 0.002


class FusePoller(trio.abc.Instrument):
    """A trio instrument: `before_io_wait` polls the FUSE device (see the module)."""

    def __init__(
        self, fd: int, spin_s: float = SPIN_S, busy_s: float = BUSY_S, *, also: int | None = None
    ) -> None:
        """`also`: another descriptor that ends a poll when readable (trio's epoll)."""
        self._fd = fd
        self._device = select.poll()
        self._device.register(fd, select.POLLIN)
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        if also is not None:
            self._poll.register(also, select.POLLIN)
        self._spin_s = spin_s
        self._busy_s = busy_s
        self._busy_until = 0.0
        #: polls that found a request / ran out (for tests and the curious)
        self.hits = 0
        self.misses = 0

    def before_io_wait(self, timeout: float) -> None:
        if timeout <= 0:
            return  # tasks are ready to run: the loop does not sleep
        now = time.perf_counter()
        if now >= self._busy_until:
            return
        found = poll_until(self._poll, self._fd, now + min(timeout, self._spin_s))
        if found:
            self.hits += 1
            self._busy_until = time.perf_counter() + self._busy_s
        elif found is None:
            self.misses += 1
        # (False: something the loop waits for otherwise is ready: no sleep either)

    def after_io_wait(self, timeout: float) -> None:
        if timeout > 0 and self._device.poll(0):
            # the sleep ended with a request: requests are coming
            self._busy_until = time.perf_counter() + self._busy_s


def poll_until(poll: select.poll, fd: int, end: float) -> bool | None:
    """Poll the descriptors registered with `poll` until `end` (time.perf_counter):
    True once `fd` is readable, False once only another one is, None at `end`."""
    clock = time.perf_counter
    while clock() < end:
        ready = poll.poll(0)
        if ready:
            return any(ready_fd == fd for ready_fd, _ in ready)
    return None


def device_poll(fd: int) -> select.poll:
    """A poll object for the FUSE device `fd` and the running trio loop's epoll
    descriptor, so that anything else the loop waits for ends a poll too."""
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    loop_fd = _trio_epoll_fd()
    if loop_fd is not None:
        poll.register(loop_fd, select.POLLIN)
    return poll


def fuse_fd() -> int | None:
    """This process's descriptor of /dev/fuse (pyfuse3 does not tell), or None."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                return int(name)
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor, say)
    return None


def poll_time(poll_us: float | None, *, shared: bool) -> float:
    """Seconds to poll for: `-o poll_us` if given, else SPIN_S for a single mount and
    none in shared mode. There each request waits for MySQL round trips, and polling
    only spent CPU: `tests/stress/bench_mount_mariadb.sh --small-count 3000`, two
    alternating pairs, mount CPU 74.5-78.9 s without and 89.7-90.8 s with, every
    small-file rate the same or lower."""
    if poll_us is not None:
        return poll_us / 1e6
    return 0.0 if shared else SPIN_S


def install(spin_s: float = SPIN_S) -> FusePoller | None:
    """Add a `FusePoller` that polls for up to `spin_s` for this process's FUSE device to
    the running trio loop (call after pyfuse3.init); None when `spin_s` is 0 or there is
    no such device."""
    if spin_s <= 0:
        return None
    fd = fuse_fd()
    if fd is None:
        log.warning("no /dev/fuse descriptor found: the mount will not poll it")
        return None
    poller = FusePoller(fd, spin_s, also=_trio_epoll_fd())
    trio.lowlevel.add_instrument(poller)
    return poller


def _trio_epoll_fd() -> int | None:
    """The running trio loop's epoll descriptor, or None. trio does not tell it: this
    reads its private state, and a trio that keeps it elsewhere gets a poller of the
    device alone."""
    try:
        from trio._core._run import GLOBAL_RUN_CONTEXT

        fd = GLOBAL_RUN_CONTEXT.runner.io_manager._epoll.fileno()
    except Exception:  # noqa: BLE001 - any other layout of trio's insides
        log.info("trio's epoll descriptor not found: the mount polls the FUSE device alone")
        return None
    return fd if isinstance(fd, int) else None
