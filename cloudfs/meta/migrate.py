"""Schema migrations: bring a metadata database of an older schema up to this code's.

`MIGRATIONS[v]` turns a database of schema v-1 into one of schema v. `upgrade` runs
the missing ones in order, each in its own transaction together with the new
`schema_version`, so an interrupted upgrade resumes where it stopped. A database
newer than the code is refused: only a newer cloudfs can read it.

On MySQL a DDL statement commits at once, before the version is written: a migration
that changes tables there must be safe to run again (IF NOT EXISTS, ...).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from cloudfs.errors import MetadataMismatch, UnsupportedFormat
from cloudfs.meta import schema
from cloudfs.meta.base import MetaStore, Txn

log = logging.getLogger(__name__)

Migration = Callable[[Txn], Awaitable[None]]


async def _extents_file_offset(tx: Txn) -> None:
    """extents.offset → extents.file_offset: OFFSET is a reserved word in MariaDB.
    (Schema 1 was SQLite-only: the MySQL engine arrived with schema 2.)"""
    await tx.conn.execute("ALTER TABLE extents RENAME COLUMN `offset` TO file_offset")


async def _clients_and_holds(tx: Txn) -> None:
    """Shared mode: `clients` gains the mount's cache dir and state (the table was
    unused until schema 3, so it is made anew) and `holds` records which mount has
    which inode open. Safe to run again (MySQL commits each DDL statement at once):
    no mount runs on a database whose schema_version is still 2, so both start empty."""
    for table in ("clients", "holds"):
        await tx.conn.execute(f"DROP TABLE IF EXISTS {table}")
        for stmt in schema.table_ddl(tx.dialect, table):
            await tx.conn.execute(stmt)


async def _trash_removals_and_open_inodes(tx: Txn) -> None:
    """trash.remover and trash.parent_mtime_ns (a removal is restored as it was), and
    the open_inodes table (a purge never frees what a mount has open). Safe to run
    again (MySQL commits each DDL statement at once)."""
    columns = {
        "remover": "VARCHAR(255) NOT NULL DEFAULT ''",
        "parent_mtime_ns": "BIGINT",
    }
    for name, kind in columns.items():
        try:
            await tx.conn.query(f"SELECT {name} FROM trash LIMIT 1")
        except Exception:  # noqa: BLE001 - the column is missing (engine-specific error)
            await tx.conn.execute(f"ALTER TABLE trash ADD COLUMN {name} {kind}")
    await tx.conn.execute(
        "CREATE TABLE IF NOT EXISTS open_inodes (inode BIGINT NOT NULL,"
        " holder VARCHAR(255) NOT NULL, PRIMARY KEY (inode, holder))"
    )  # MySQL's default engine is InnoDB, as schema.MYSQL asks


async def _column_exists(tx: Txn, table: str, column: str) -> bool:
    try:
        await tx.conn.query(f"SELECT {column} FROM {table} LIMIT 1")
    except Exception:  # noqa: BLE001 - the column or table is missing (engine-specific error)
        return False
    return True


async def _one_holds_table_and_allocated(tx: Txn) -> None:
    """One table of open-inode marks, and the allocated size on the inode row.

    `open_inodes` (inode, holder 'machine:pid': nameless inodes a mount still used) and
    `holds` (client, inode: shared mode's open files) said the same thing. `holds` gains
    `why` in its primary key (schema 4's rows are open holds, why 0); the marks of
    `open_inodes` move there (why 1), each holder becoming a `clients` row (a live one
    keeps its marks; a dead one is dropped by the next mount or fsck, as before), and
    `open_inodes` goes. `inodes.allocated` is added and filled with the total of each
    file's live extents.

    Safe to run again: MySQL commits each DDL statement at once (and the DML before
    it), so every step checks what is done already; schema 4's `holds` is renamed to
    `holds_v4` while its rows are copied."""
    if not await _column_exists(tx, "inodes", "allocated"):
        await tx.conn.execute("ALTER TABLE inodes ADD COLUMN allocated BIGINT NOT NULL DEFAULT 0")
    await tx.conn.execute(
        "UPDATE inodes SET allocated = (SELECT COALESCE(SUM(e.length), 0) FROM extents e"
        " WHERE e.inode = inodes.id AND e.v_to = ?)",
        (schema.LIVE,),
    )
    for stmt in schema.table_ddl(tx.dialect, "clients"):
        await tx.conn.execute(stmt)
    if not await _column_exists(tx, "holds", "why") and await _column_exists(
        tx, "holds", "inode"
    ):
        await tx.conn.execute("ALTER TABLE holds RENAME TO holds_v4")
    if await _column_exists(tx, "holds_v4", "inode"):
        # its index name is taken by the new table's: dropped first (SQLite names
        # indexes per database)
        if tx.dialect is schema.SQLITE:
            await tx.conn.execute("DROP INDEX IF EXISTS holds_inode")
    for stmt in schema.table_ddl(tx.dialect, "holds"):
        await tx.conn.execute(stmt)
    if await _column_exists(tx, "holds_v4", "inode"):
        await tx.conn.execute(
            "INSERT INTO holds (client, inode, why) SELECT DISTINCT client, inode, 0 FROM holds_v4"
            " WHERE NOT EXISTS (SELECT 1 FROM holds h WHERE h.client = holds_v4.client"
            " AND h.inode = holds_v4.inode AND h.why = 0)"
        )
        await tx.conn.execute("DROP TABLE holds_v4")  # commits the copy (MySQL)
    if not await _column_exists(tx, "open_inodes", "holder"):
        return  # moved and dropped already
    now = time.time_ns()
    ids: dict[str, int] = {}
    for ino, holder in await tx.conn.query("SELECT inode, holder FROM open_inodes"):
        holder = str(holder)
        if holder not in ids:
            machine, _, pid = holder.rpartition(":")
            ids[holder] = await tx.conn.insert(
                "INSERT INTO clients (hostname, pid, cachedir, started_ns, heartbeat_ns, state)"
                " VALUES (?, ?, '', ?, ?, 0)",
                (machine, int(pid) if pid.isdigit() else 0, now, now),
            )
        await tx.conn.execute(
            "INSERT INTO holds (client, inode, why) VALUES (?, ?, 1)", (ids[holder], ino)
        )
    await tx.conn.execute("DROP TABLE open_inodes")  # commits the moved marks (MySQL)


async def _trash_inode_index(tx: Txn) -> None:
    """An index on trash.inode: each unlink and rmdir asks whether an inode is in the
    trash, which scanned the whole trash before."""
    for stmt in schema.table_ddl(tx.dialect, "trash"):
        if stmt.startswith("CREATE INDEX"):
            await tx.conn.execute(stmt)


MIGRATIONS: Mapping[int, Migration] = {
    2: _extents_file_offset,
    3: _clients_and_holds,
    4: _trash_removals_and_open_inodes,
    5: _one_holds_table_and_allocated,
    6: _trash_inode_index,
}


async def upgrade(
    meta: MetaStore,
    fs_uuid: str,
    *,
    migrations: Mapping[int, Migration] = MIGRATIONS,
    target: int = schema.SCHEMA_VERSION,
) -> list[int]:
    """Migrate `meta` (of filesystem `fs_uuid`) to schema `target`; return the versions
    applied, in order (empty when it was current). MetadataMismatch for a database of
    another filesystem, UnsupportedFormat for one newer than `target`."""
    found, version = await meta.schema_info()
    if found != fs_uuid:
        raise MetadataMismatch(f"{meta.where} holds filesystem {found}, not {fs_uuid}")
    if version > target:
        raise UnsupportedFormat(f"{meta.where} has metadata schema {version}, newer than {target}")
    missing = [v for v in range(version + 1, target + 1) if v not in migrations]
    if missing:
        raise RuntimeError(f"no migration to schema {missing[0]}")
    applied: list[int] = []
    for v in range(version + 1, target + 1):
        log.info("migrating %s to schema %d", meta.where, v)
        async with meta.transaction(durable=True) as tx:
            await migrations[v](tx)
            await tx.set_info("schema_version", str(v))
        applied.append(v)
    return applied
