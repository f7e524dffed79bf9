"""Mounts of a filesystem and the inodes they hold open: who is mounted, which inode
must not be freed because a mount still uses it.

Each mount process registers a `clients` row (on every engine); in shared mode it
refreshes its heartbeat every HEARTBEAT_S seconds (a single SQLite mount has nobody to
tell: its row is dead when its process is, and fsck takes every row for dead). A `holds` row (client, inode) says "this mount has
this inode open, do not free it": an inode with no name left is freed only when no live
mount holds it, so machine A's `rm` never frees a file machine B is still reading, and a
purge of the trash by another process (the daemon's retention) never frees a file a
mount has open. This module is the only one that reads or writes `holds`.

When a mount writes its hold differs by engine:
- shared mode (MySQL, several machines): at the first open of an inode (`Client.hold`).
  The last close does not delete it at once (`Client.release_soon`): the next heartbeat
  deletes the holds no handle uses any more, all in its own transaction, and an open
  of the same inode before then costs no transaction at all. Holding longer than the
  open is always safe (it only delays a free); the inodes a late release leaves
  without names and holds are freed then (`Client.on_released`).
  Machine B cannot know that machine A has a file open unless A says so before B's
  unlink: B's unlink, and B's or the daemon's purge, run in transactions that see only
  the database. A mark written when the file loses its last name, as on SQLite, would
  come too late: A does not take part in B's unlink transaction and learns of it (by
  Redis, or by its next look) only after B may have freed the inode.
- one SQLite mount: only when an inode it has open loses its last name, inside the
  transaction that removes the name (`Client.mark`): no other mount exists that could
  unlink it, so every unlink of an open file is this mount's own and can write the hold
  itself. The same for the unfinished root of a snapshot copy it is writing. Shared
  mode writes such a mark too (its own row, `why`): an open hold may be on its way out.

A mount that crashed leaves its row and holds behind. One code path (`drop_dead`) drops
them: when a mount registers (rows of this cache dir on this host, whose process is gone
since this one holds the cache dir's mount lock; rows of processes on this host that no
longer exist; rows whose heartbeat is EXPIRE_S old) and in fsck. Only then are the
orphans they held freed: never those of another machine that is alive.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from cloudfs.errors import CloudfsError
from cloudfs.meta.base import MetaStore, Txn

log = logging.getLogger(__name__)

#: seconds between two heartbeats of a mount
HEARTBEAT_S = 5.0
#: a mount whose heartbeat is this old is dead (a hung machine, a crash elsewhere)
EXPIRE_S = 300.0

CLIENT_MOUNTED = 0
CLIENT_UNMOUNTING = 1

# holds.why: two reasons to hold, in rows of their own, so that releasing one never
# takes away the other (a heartbeat may release an open hold while an unlink marks)
HOLD_OPEN = 0  # shared mode: the mount has the inode open (or had, until its heartbeat)
HOLD_NAMELESS = 1  # it lost its last name while used here, or is an unfinished copy's root


@dataclass(frozen=True)
class ClientRow:
    id: int
    hostname: str
    pid: int
    cachedir: str
    started_ns: int
    heartbeat_ns: int
    state: int

    def describe(self) -> str:
        return f"mount {self.id} (pid {self.pid} on {self.hostname}, cache dir {self.cachedir})"


_SELECT = "SELECT id, hostname, pid, cachedir, started_ns, heartbeat_ns, state FROM clients"


async def list_clients(tx: Txn) -> list[ClientRow]:
    return [ClientRow(*r) for r in await tx.conn.query(_SELECT + " ORDER BY id")]


def _process_is_a_mount(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"mount.cloudfs" in cmdline or b"cloudfs.mount" in cmdline


def is_dead(row: ClientRow, now_ns: int, *, hostname: str | None = None) -> bool:
    """Is the mount of `row` gone? Its heartbeat expired, or it ran on this host and
    its process is no mount any more."""
    if now_ns - row.heartbeat_ns > EXPIRE_S * 1e9:
        return True
    here = hostname if hostname is not None else socket.gethostname()
    return row.hostname == here and not _process_is_a_mount(row.pid)


async def held(tx: Txn, ino: int) -> bool:
    """Does any mount hold `ino` open?"""
    row = await tx.conn.query_one("SELECT 1 FROM holds WHERE inode = ? LIMIT 1", (ino,))
    return row is not None


async def held_elsewhere(tx: Txn, ino: int, client_id: int | None) -> bool:
    """Does a mount other than `client_id` hold `ino` open?"""
    row = await tx.conn.query_one(
        "SELECT 1 FROM holds WHERE inode = ? AND client <> ? LIMIT 1", (ino, client_id or 0)
    )
    return row is not None


async def held_inodes(tx: Txn) -> set[int]:
    """Every inode some mount holds."""
    return {int(r[0]) for r in await tx.conn.query("SELECT DISTINCT inode FROM holds")}


async def hold_counts(tx: Txn) -> dict[int, int]:
    """{client id: how many inodes it holds}."""
    rows = await tx.conn.query("SELECT client, COUNT(*) FROM holds GROUP BY client")
    return {int(c): int(n) for c, n in rows}


async def forget_client(tx: Txn, client_id: int) -> int:
    """Drop a gone mount's row and holds; return how many holds it had."""
    n = await tx.conn.execute("DELETE FROM holds WHERE client = ?", (client_id,))
    await tx.conn.execute("DELETE FROM clients WHERE id = ?", (client_id,))
    return n


async def dead_clients(tx: Txn, now_ns: int) -> list[ClientRow]:
    return [c for c in await list_clients(tx) if is_dead(c, now_ns)]


async def stray_holds(tx: Txn) -> list[tuple[int, int]]:
    """Holds of mounts that have no `clients` row: (client, inode)."""
    rows = await tx.conn.query(
        "SELECT client, inode FROM holds WHERE client NOT IN (SELECT id FROM clients)"
    )
    return [(int(c), int(i)) for c, i in rows]


async def drop_dead(tx: Txn, dead: Callable[[ClientRow], bool]) -> list[tuple[ClientRow, int]]:
    """Drop the rows and holds of the mounts `dead` says are gone, and the holds of
    mounts without a row: the one way marks of dead mounts go (at mount, in fsck).
    Returns each dropped mount with how many holds it had."""
    gone = []
    for row in await list_clients(tx):
        if dead(row):
            gone.append((row, await forget_client(tx, row.id)))
    await tx.conn.execute("DELETE FROM holds WHERE client NOT IN (SELECT id FROM clients)")
    return gone


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's: it exists
    return True


class Client:
    """This mount's row: registered at mount, its heartbeat, its holds."""

    def __init__(self, meta: MetaStore, cachedir: str) -> None:
        self.meta = meta
        self.cachedir = cachedir
        self.hostname = socket.gethostname()
        self.id: int | None = None
        #: inodes this mount has a `holds` row for (or is writing one for): `hold`
        self.held: set[int] = set()
        #: held inodes no handle uses any more: the next heartbeat deletes their rows
        self._idle: set[int] = set()
        #: idle inodes whose rows the heartbeat under way is deleting; an open of one
        #: waits for it (`_released`), then writes its hold anew
        self._releasing: set[int] = set()
        self._released = trio.Event()
        self._released.set()
        #: called with the inodes a heartbeat released that have no name left (the
        #: mount frees those nobody else holds: Namespace.maybe_free)
        self.on_released: Callable[[list[int]], Awaitable[None]] | None = None

    async def register(self) -> list[ClientRow]:
        """Add this mount's row; drop the rows and holds of dead mounts: earlier mounts
        of this cache dir on this host (this process holds the cache dir's mount lock,
        so they are dead), mounts of this host whose process no longer exists, and
        mounts whose heartbeat expired. Returns those dropped."""
        now = time.time_ns()

        def dead(row: ClientRow) -> bool:
            if row.hostname == self.hostname:
                if row.cachedir == self.cachedir or not _process_exists(row.pid):
                    return True
            return now - row.heartbeat_ns > EXPIRE_S * 1e9

        async def body() -> list[ClientRow]:
            async with self.meta.transaction() as tx:
                gone = [row for row, _n in await drop_dead(tx, dead)]
                self.id = await tx.conn.insert(
                    "INSERT INTO clients (hostname, pid, cachedir, started_ns, heartbeat_ns,"
                    " state) VALUES (?, ?, ?, ?, ?, ?)",
                    (self.hostname, os.getpid(), self.cachedir, now, now, CLIENT_MOUNTED),
                )
            return gone

        gone = await self.meta.run(body)
        for row in gone:
            log.info("forgot %s, which is gone", row.describe())
        return gone

    async def heartbeat(self) -> list[int]:
        """Refresh this mount's heartbeat and delete the holds no handle uses any more,
        in one transaction. Returns the released inodes that have no name left."""
        batch = sorted(self._idle)
        self._idle.clear()
        self._releasing = set(batch)
        self._released = trio.Event()

        async def body() -> list[int]:
            nameless: list[int] = []
            async with self.meta.transaction() as tx:
                n = await tx.conn.execute(
                    "UPDATE clients SET heartbeat_ns = ? WHERE id = ?", (time.time_ns(), self.id)
                )
                if batch:
                    await tx.conn.executemany(
                        "DELETE FROM holds WHERE client = ? AND inode = ? AND why = ?",
                        [(self.id, ino, HOLD_OPEN) for ino in batch],
                    )
                    for i in range(0, len(batch), 500):
                        part = batch[i : i + 500]
                        rows = await tx.conn.query(
                            "SELECT id FROM inodes WHERE nlink = 0 AND id IN ("
                            + ", ".join("?" * len(part)) + ")",
                            part,
                        )  # fmt: skip
                        nameless.extend(int(r[0]) for r in rows)
                if not n:  # declared dead meanwhile (a pause longer than EXPIRE_S)
                    log.error("mount %s was declared dead by another mount or fsck; its "
                              "open files lost their holds", self.id)  # fmt: skip
                    await tx.conn.execute(
                        "INSERT INTO clients (id, hostname, pid, cachedir, started_ns,"
                        " heartbeat_ns, state) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (self.id, self.hostname, os.getpid(), self.cachedir, time.time_ns(),
                         time.time_ns(), CLIENT_MOUNTED),
                    )  # fmt: skip
            return nameless

        try:
            nameless = await self.meta.run(body)
            self.held.difference_update(batch)
        except BaseException:
            self._idle.update(batch)  # still held: the next heartbeat tries again
            raise
        finally:
            self._releasing = set()
            self._released.set()
        return nameless

    async def run_heartbeat(self) -> None:
        """Refresh the heartbeat until cancelled; a failure is logged and retried."""
        while True:
            await trio.sleep(HEARTBEAT_S)
            if self.meta.fenced is not None:
                continue  # this mount may change nothing any more
            try:
                nameless = await self.heartbeat()
            except CloudfsError as exc:
                log.warning("cannot refresh this mount's heartbeat: %s", exc.message)
                continue
            if nameless and self.on_released is not None:
                await self.on_released(nameless)

    async def hold(self, ino: int) -> None:
        """Record that this mount has `ino` open (shared mode: before the open returns,
        so that no other machine's unlink frees it meanwhile). Nothing to write when
        the row is there already: held by an earlier open, or idle since a last close
        and not yet released. A blind INSERT otherwise (a SELECT first would take gap
        locks that two mounts holding inodes at once deadlock on)."""
        while ino in self._releasing:
            await self._released.wait()  # then write it anew (or find it idle again)
        if ino in self._idle:
            self._idle.discard(ino)  # the row stays: no transaction
            return
        if ino in self.held:
            return
        self.held.add(ino)

        async def body() -> None:
            async with self.meta.transaction() as tx:
                await tx.conn.execute(
                    "INSERT INTO holds (client, inode, why) VALUES (?, ?, ?)",
                    (self.id, ino, HOLD_OPEN),
                )

        try:
            await self.meta.run(body)
        except BaseException:
            self.held.discard(ino)
            raise

    def release_soon(self, ino: int) -> None:
        """No handle of this mount uses `ino` any more: the next heartbeat deletes its
        hold (unless an open comes first and keeps it)."""
        if ino in self.held:
            self._idle.add(ino)

    async def release(self, ino: int) -> None:
        """Delete the hold on `ino` now."""
        self.held.discard(ino)
        self._idle.discard(ino)

        async def body() -> None:
            async with self.meta.transaction() as tx:
                await tx.conn.execute(
                    "DELETE FROM holds WHERE client = ? AND inode = ? AND why = ?",
                    (self.id, ino, HOLD_OPEN),
                )

        await self.meta.run(body)

    async def mark(self, tx: Txn, ino: int) -> None:
        """Hold `ino` inside the caller's transaction, as HOLD_NAMELESS: an inode used
        here that loses its last name, the root of a copy being written. Idempotent."""
        await self.unmark(tx, ino)
        await tx.conn.execute(
            "INSERT INTO holds (client, inode, why) VALUES (?, ?, ?)",
            (self.id, ino, HOLD_NAMELESS),
        )

    async def unmark(self, tx: Txn, ino: int) -> None:
        await tx.conn.execute(
            "DELETE FROM holds WHERE client = ? AND inode = ? AND why = ?",
            (self.id, ino, HOLD_NAMELESS),
        )

    async def unregister(self) -> None:
        """A clean unmount: every file is sealed and closed; the row and holds go."""
        if self.id is None:
            return
        client_id = self.id

        async def body() -> None:
            async with self.meta.transaction() as tx:
                await forget_client(tx, client_id)

        await self.meta.run(body)
