"""The remover: applies the retention policy and collects garbage in the background.

Every `interval` seconds (the first time `first_after` seconds after the daemon
starts) it prunes the versions and the trash the policy no longer keeps
(cloudfs.retention) and then runs a garbage collection pass (cloudfs.gc), which
deletes the objects of blocks unreferenced for longer than the grace period. A
failure is logged and the next round tries again; a pass cut short (the daemon
stopping) leaves nothing the next one cannot finish.

The clock is the wall clock, moved by $CLOUDFS_TEST_CLOCK_OFFSET_S seconds when that
is set: tests let days pass that way. $CLOUDFS_REMOVER_INTERVAL_S sets the interval,
$CLOUDFS_GC_GRACE_S the grace period of garbage collection (default cloudfs.gc's).
"""

from __future__ import annotations

import logging
import os
import time

import trio

from cloudfs import gc, retention
from cloudfs.cache import CacheDir
from cloudfs.errors import CloudfsError
from cloudfs.meta.base import MetaStore
from cloudfs.objectstore.base import ObjectStore

log = logging.getLogger(__name__)

INTERVAL_S = 3600.0
FIRST_AFTER_S = 60.0
CLOCK_OFFSET_ENV = "CLOUDFS_TEST_CLOCK_OFFSET_S"
INTERVAL_ENV = "CLOUDFS_REMOVER_INTERVAL_S"
GRACE_ENV = "CLOUDFS_GC_GRACE_S"


def now_ns() -> int:
    """The remover's clock: the wall clock, moved by $CLOUDFS_TEST_CLOCK_OFFSET_S."""
    offset = float(os.environ.get(CLOCK_OFFSET_ENV) or 0)
    return time.time_ns() + int(offset * 1e9)


class Remover:
    def __init__(self, meta: MetaStore, store: ObjectStore, cache: CacheDir) -> None:
        self.meta = meta
        self.store = store
        self.cache = cache
        interval = os.environ.get(INTERVAL_ENV)
        self.interval = float(interval) if interval else INTERVAL_S
        self.first_after = min(FIRST_AFTER_S, self.interval)
        grace = os.environ.get(GRACE_ENV)
        self.grace = float(grace) if grace else gc.GRACE_S
        self.rounds = 0
        self.last: dict[str, object] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep(self.first_after)
        while True:
            await self.round()
            await trio.sleep(self.interval)

    async def round(self) -> None:
        """One pruning run and one garbage collection pass."""
        if self.meta.fenced is not None:
            return  # the filesystem is another machine's now: delete nothing of it
        now = now_ns()
        try:
            pruned = await retention.prune(self.meta, now)
            collected = await gc.collect(
                self.meta, self.store, self.cache, now_ns=now, grace_s=self.grace
            )
        except CloudfsError as exc:
            log.warning("retention and garbage collection failed: %s", exc.message)
            return
        self.rounds += 1
        self.last = {"pruned": pruned.to_json(), "collected": collected.to_json()}
