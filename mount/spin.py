"""Poll the FUSE device for a moment before the mount's event loop goes to sleep.

A request that finds the mount asleep costs a wakeup of its thread (and of the CPU it
sleeps on): on this test machine, a virtual machine whose idle CPUs halt, that wakeup
was most of a request's round trip. A bare raw-/dev/fuse loop in Python answered 11,000
GETATTRs/s, and 38,000/s once it polled the device for 50 us before sleeping; the
mount's own GETATTR round trips (statx with AT_STATX_FORCE_SYNC, five alternating
pairs) went from 3,700-8,400/s to 5,400-12,700/s with `FusePoller`. The CPU per
request did not grow (/proc's CPU times): sleeping and waking cost CPU too.

So while requests come back to back, the loop polls the device for up to `SPIN_S`
before it sleeps; the next request of a caller that is working through a tree is
usually there by then. It polls only while busy: when a wait ended with a request
ready, or a poll found one, within the last `BUSY_S`. An idle mount, whose loop wakes
only for its timers, never spins.
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

    def __init__(self, fd: int, spin_s: float = SPIN_S, busy_s: float = BUSY_S) -> None:
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
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
        end = now + min(timeout, self._spin_s)
        poll = self._poll.poll
        while time.perf_counter() < end:
            if poll(0):
                self.hits += 1
                self._busy_until = time.perf_counter() + self._busy_s
                return
        self.misses += 1

    def after_io_wait(self, timeout: float) -> None:
        if timeout > 0 and self._poll.poll(0):
            # the sleep ended with a request: requests are coming
            self._busy_until = time.perf_counter() + self._busy_s


def fuse_fd() -> int | None:
    """This process's descriptor of /dev/fuse (pyfuse3 does not tell), or None."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                return int(name)
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor, say)
    return None


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
    poller = FusePoller(fd, spin_s)
    trio.lowlevel.add_instrument(poller)
    return poller
