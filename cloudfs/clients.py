"""Mounts of one filesystem in shared mode: who is mounted, who has which inode open.

Each mount process registers a `clients` row and refreshes its heartbeat every
HEARTBEAT_S seconds. While a file is open on a mount, a `holds` row (client, inode)
says so, and an inode whose last name went (open-unlinked) is freed only when no live
mount holds it: machine A's `rm` never frees a file machine B is still reading.

A mount that crashed leaves its row and holds behind. They are cleaned up when the same
mount comes back (same host and cache dir: the cache dir's mount lock proves the old
process gone), by any mount once the heartbeat is EXPIRE_S old, and by fsck. Only then
are the orphans they held freed: never those of another machine that is alive.
"""

from __future__ import annotations

import logging
import os
import socket
import time
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


async def held_elsewhere(tx: Txn, ino: int, client_id: int | None) -> bool:
    """Does a mount other than `client_id` hold `ino` open?"""
    row = await tx.conn.query_one(
        "SELECT 1 FROM holds WHERE inode = ? AND client <> ? LIMIT 1", (ino, client_id or 0)
    )
    return row is not None


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


class Client:
    """This mount's row: registered at mount, its heartbeat, its holds."""

    def __init__(self, meta: MetaStore, cachedir: str) -> None:
        self.meta = meta
        self.cachedir = cachedir
        self.hostname = socket.gethostname()
        self.id: int | None = None

    async def register(self) -> list[ClientRow]:
        """Add this mount's row; drop the rows and holds of earlier mounts of this
        cache dir on this host (this process holds the cache dir's mount lock, so they
        are dead) and of mounts whose heartbeat expired. Returns those dropped."""
        now = time.time_ns()

        async def body() -> list[ClientRow]:
            gone: list[ClientRow] = []
            async with self.meta.transaction() as tx:
                for row in await list_clients(tx):
                    mine = row.hostname == self.hostname and row.cachedir == self.cachedir
                    if mine or now - row.heartbeat_ns > EXPIRE_S * 1e9:
                        await forget_client(tx, row.id)
                        gone.append(row)
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

    async def heartbeat(self) -> None:
        async def body() -> None:
            async with self.meta.transaction() as tx:
                n = await tx.conn.execute(
                    "UPDATE clients SET heartbeat_ns = ? WHERE id = ?", (time.time_ns(), self.id)
                )
                if not n:  # declared dead meanwhile (a pause longer than EXPIRE_S)
                    log.error("mount %s was declared dead by another mount or fsck; its "
                              "open files lost their holds", self.id)  # fmt: skip
                    await tx.conn.execute(
                        "INSERT INTO clients (id, hostname, pid, cachedir, started_ns,"
                        " heartbeat_ns, state) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (self.id, self.hostname, os.getpid(), self.cachedir, time.time_ns(),
                         time.time_ns(), CLIENT_MOUNTED),
                    )  # fmt: skip

        await self.meta.run(body)

    async def run_heartbeat(self) -> None:
        """Refresh the heartbeat until cancelled; a failure is logged and retried."""
        while True:
            await trio.sleep(HEARTBEAT_S)
            try:
                await self.heartbeat()
            except CloudfsError as exc:
                log.warning("cannot refresh this mount's heartbeat: %s", exc.message)

    async def hold(self, ino: int) -> None:
        """Record that this mount has `ino` open. The caller holds each inode once (a
        blind INSERT: a SELECT first would take gap locks that two mounts holding
        inodes at once deadlock on)."""

        async def body() -> None:
            async with self.meta.transaction() as tx:
                await tx.conn.execute(
                    "INSERT INTO holds (client, inode) VALUES (?, ?)", (self.id, ino)
                )

        await self.meta.run(body)

    async def release(self, ino: int) -> None:
        async def body() -> None:
            async with self.meta.transaction() as tx:
                await tx.conn.execute(
                    "DELETE FROM holds WHERE client = ? AND inode = ?", (self.id, ino)
                )

        await self.meta.run(body)

    async def unregister(self) -> None:
        """A clean unmount: every file is sealed and closed; the row and holds go."""
        if self.id is None:
            return
        client_id = self.id

        async def body() -> None:
            async with self.meta.transaction() as tx:
                await forget_client(tx, client_id)

        await self.meta.run(body)
