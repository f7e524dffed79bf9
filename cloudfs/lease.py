"""The mount lease: the object "lease" in the store says which machine mounts a
filesystem whose metadata is SQLite (one machine's file), so that a second machine is
refused instead of writing a second, diverging history into the same bucket.

The lease is JSON: hostname, pid and cache dir of the holder, when it mounted, when it
last renewed the lease, and a random token of that mount. It is taken with a
conditional write (create only if absent; replace only if unchanged since read),
renewed every `renew_interval()` seconds by the mount, and deleted at a clean unmount.
A lease held by the same cache dir on the same host is a leftover of a crash of this
very mount (the cache dir's mount.lock admits one mount at a time): it is taken over
silently. Any other holder refuses the mount (LeaseHeld, naming it), unless `force`:
then the lease is taken over, whoever holds it (the user says that machine is gone);
a lease not renewed for `stale_after()` seconds is called stale in the message.

On a store without atomic conditional writes (`ObjectStore.conditional_writes`), two
machines mounting in the same instant could both get the lease; the renewal of the
loser then finds the lease changed and logs an error.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any

from cloudfs.errors import LeaseHeld, LeaseLost, ObjectNotFound
from cloudfs.objectstore.base import ObjectStore

log = logging.getLogger(__name__)

LEASE_KEY = "lease"
#: how often the mount renews its lease (seconds)
RENEW_S = 60.0
#: a lease not renewed for this long belongs to a machine that is probably gone
STALE_S = 300.0


def renew_interval() -> float:
    """RENEW_S; tests shorten it with $CLOUDFS_TEST_LEASE_RENEW_S."""
    return float(os.environ.get("CLOUDFS_TEST_LEASE_RENEW_S") or RENEW_S)


def stale_after() -> float:
    return max(STALE_S, 5 * renew_interval())


@dataclass(frozen=True)
class LeaseHolder:
    hostname: str
    pid: int
    cachedir: str
    mounted_at: float  # time.time()
    renewed_at: float
    token: str  # random, one per mount

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), sort_keys=True) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> LeaseHolder | None:
        """The holder, or None when the object is not a lease (damaged: anyone may
        replace it)."""
        try:
            obj: Any = json.loads(data)
            return cls(
                hostname=str(obj["hostname"]),
                pid=int(obj["pid"]),
                cachedir=str(obj["cachedir"]),
                mounted_at=float(obj["mounted_at"]),
                renewed_at=float(obj["renewed_at"]),
                token=str(obj["token"]),
            )
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.mounted_at))
        ago = max(0.0, now - self.renewed_at)
        text = (
            f"host {self.hostname}, mount.cloudfs pid {self.pid}, cache dir "
            f"{self.cachedir}, mounted since {since}, lease renewed {ago:.0f} s ago"
        )
        if ago > stale_after():
            text += " (stale)"
        return text


class Lease:
    """The lease of one mount on `store` (a store of the filesystem: superblock level)."""

    def __init__(self, store: ObjectStore, cachedir: str) -> None:
        self.store = store
        self.cachedir = cachedir
        self.hostname = socket.gethostname()
        self.token = secrets.token_hex(16)
        self.mounted_at = time.time()
        #: the lease object as we last wrote it (None: not held)
        self._ours: bytes | None = None

    @property
    def held(self) -> bool:
        return self._ours is not None

    def _make(self) -> bytes:
        return LeaseHolder(self.hostname, os.getpid(), self.cachedir, self.mounted_at,
                           time.time(), self.token).to_json()  # fmt: skip

    async def _current(self) -> bytes | None:
        try:
            return await self.store.get(LEASE_KEY)
        except ObjectNotFound:
            return None

    def _is_own_leftover(self, holder: LeaseHolder) -> bool:
        return holder.hostname == self.hostname and holder.cachedir == self.cachedir

    async def acquire(self, *, force: bool = False) -> LeaseHolder | None:
        """Take the lease. Returns the holder it was taken over from (None if it was
        free or a leftover of this cache dir's earlier mount); LeaseHeld if another
        machine holds it and not `force`."""
        for _ in range(10):  # a race with another machine: look again
            mine = self._make()
            current = await self._current()
            if current is None:
                if await self.store.put_new(LEASE_KEY, mine) or await self._current() == mine:
                    self._ours = mine
                    return None
                continue
            holder = LeaseHolder.from_json(current)
            if holder is not None and holder.token == self.token:
                self._ours = current
                return None
            if holder is not None and not self._is_own_leftover(holder) and not force:
                raise LeaseHeld(f"{holder.describe()}; if that machine is gone (crashed, "
                                "replaced), mount with --force to take over")  # fmt: skip
            if await self.store.replace_if(LEASE_KEY, mine, current) or (
                await self._current() == mine
            ):
                self._ours = mine
                if holder is not None and self._is_own_leftover(holder):
                    return None
                return holder
        raise LeaseHeld("another machine keeps changing the lease")

    async def renew(self) -> None:
        """Write a new renewal time (and this process's pid); LeaseLost when the lease
        is no longer ours (taken over with --force)."""
        if self._ours is None:
            raise LeaseLost("the lease is not held")
        mine = self._make()
        if await self.store.replace_if(LEASE_KEY, mine, self._ours) or (
            await self._current() == mine
        ):
            self._ours = mine
            return
        current = await self._current()
        holder = LeaseHolder.from_json(current) if current is not None else None
        self._ours = None
        raise LeaseLost(holder.describe() if holder else "the lease object is gone")

    async def release(self) -> None:
        """Delete the lease if it is still ours."""
        ours, self._ours = self._ours, None
        if ours is not None and not await self.store.delete_if(LEASE_KEY, ours):
            log.warning("the mount lease was no longer ours at unmount")


async def read_lease(store: ObjectStore) -> LeaseHolder | None:
    """The current holder of the lease, if any."""
    try:
        data = await store.get(LEASE_KEY)
    except ObjectNotFound:
        return None
    return LeaseHolder.from_json(data)
