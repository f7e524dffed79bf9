"""The metadata schema: every table and column, written once, for every engine.

Engines differ only in a few type names and clauses; `ddl(dialect)` fills them in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: bump when the DDL changes, and add the migration to `cloudfs.meta.migrate`:
#: `cloudfs upgrade` brings older databases up to it
SCHEMA_VERSION = 6

#: `extents.v_to` of a live extent: the version range is open-ended
LIVE = 1 << 62

ROOT_INODE = 1

# block states (blocks.state)
BLOCK_PENDING = 0  # plaintext sealed in a cache dir, not yet in the object store
BLOCK_STORED = 1  # object exists in the object store
BLOCK_DELETING = 2  # refcount reached 0 and a deletion pass claimed it (cloudfs.gc)
#: referenced again while a deletion pass may be deleting its object: the plaintext is
#: in the reviving cache dir, and the pass turns it `pending` once the object is gone
BLOCK_REVIVED = 3


@dataclass(frozen=True)
class Dialect:
    """The few spellings that differ between SQL engines."""

    name: str
    autoinc_pk: str  # an auto-increment 64-bit primary key column
    blob_name: str  # a binary name of at most 255 bytes, compared bytewise
    blob_id: str  # a 32-byte block id
    blob: str  # an arbitrary binary value (xattr values, symlink targets, dumps)
    table_suffix: str  # appended after the closing parenthesis of CREATE TABLE


SQLITE = Dialect(
    name="sqlite",
    autoinc_pk="INTEGER PRIMARY KEY AUTOINCREMENT",
    blob_name="BLOB",
    blob_id="BLOB",
    blob="BLOB",
    table_suffix="",
)

MYSQL = Dialect(
    name="mysql",
    autoinc_pk="BIGINT PRIMARY KEY AUTO_INCREMENT",
    blob_name="VARBINARY(255)",
    blob_id="BINARY(32)",
    blob="LONGBLOB",
    table_suffix=" ENGINE=InnoDB",
)


_TABLES = """
-- Filesystem-wide properties: schema_version, fs_uuid, retention policy, ...
CREATE TABLE meta_info (
    name        VARCHAR(64) NOT NULL PRIMARY KEY,
    value       TEXT NOT NULL
){suffix};

-- One row per file, directory, symlink or special file.
CREATE TABLE inodes (
    id          {autoinc_pk},
    mode        INTEGER NOT NULL,          -- st_mode: type and permission bits
    uid         INTEGER NOT NULL,
    gid         INTEGER NOT NULL,
    nlink       INTEGER NOT NULL,          -- equals the dentries naming it (+1 per subdir for dirs' '..')
    size        BIGINT NOT NULL,           -- logical size in bytes
    rdev        BIGINT NOT NULL DEFAULT 0, -- device number of block/char special files
    atime_ns    BIGINT NOT NULL,
    mtime_ns    BIGINT NOT NULL,
    ctime_ns    BIGINT NOT NULL,
    version     BIGINT NOT NULL DEFAULT 0, -- newest committed data version (see versions)
    flags       INTEGER NOT NULL DEFAULT 0, -- reserved: read-only snapshot trees, ...
    -- bytes of a regular file's live extents (its data, holes excluded, for st_blocks):
    -- kept by every transaction that changes them (cloudfs.meta.base.Txn), checked by fsck
    allocated   BIGINT NOT NULL DEFAULT 0
){suffix};

-- Directory entries. `id` orders readdir and is its resume cookie, so a listing stays
-- correct while entries come and go (new entries get larger ids).
CREATE TABLE dentries (
    id          {autoinc_pk},
    parent      BIGINT NOT NULL,           -- directory inode
    name        {blob_name} NOT NULL,      -- raw bytes, any but '/' and NUL, <= 255
    inode       BIGINT NOT NULL,
    UNIQUE (parent, name)
){suffix};
CREATE INDEX dentries_inode ON dentries (inode);
CREATE INDEX dentries_parent_id ON dentries (parent, id);

-- Target of each symbolic link.
CREATE TABLE symlinks (
    inode       BIGINT NOT NULL PRIMARY KEY,
    target      {blob} NOT NULL
){suffix};

-- Extended attributes.
CREATE TABLE xattrs (
    inode       BIGINT NOT NULL,
    name        {blob_name} NOT NULL,
    value       {blob} NOT NULL,
    PRIMARY KEY (inode, name)
){suffix};

-- Content-addressed blocks, `id` = HMAC-SHA256(id key, plaintext).
CREATE TABLE blocks (
    id          {blob_id} NOT NULL PRIMARY KEY,
    size        INTEGER NOT NULL,          -- plaintext bytes
    stored_size INTEGER,                   -- bytes of the stored object, NULL until stored
    refcount    BIGINT NOT NULL,           -- extent rows (all versions) naming this block
    state       INTEGER NOT NULL,          -- 0 pending, 1 stored, 2 deleting
    created_ns  BIGINT NOT NULL,
    unref_ns    BIGINT                     -- when refcount last reached 0 (gc grace period)
){suffix};
CREATE INDEX blocks_state ON blocks (state);

-- File contents: bytes [file_offset, file_offset+length) of the file are bytes
-- [0, length) of `block`, in versions v_from <= v < v_to. Live rows have v_to = LIVE.
-- Holes have no row. (Not named `offset`: a reserved word in MariaDB.)
CREATE TABLE extents (
    inode       BIGINT NOT NULL,
    v_to        BIGINT NOT NULL,
    file_offset BIGINT NOT NULL,
    length      INTEGER NOT NULL,
    block       {blob_id} NOT NULL,
    v_from      BIGINT NOT NULL,
    PRIMARY KEY (inode, v_to, file_offset)
){suffix};
CREATE INDEX extents_block ON extents (block);

-- One row per seal of a file: its size and times as of that version.
CREATE TABLE versions (
    inode       BIGINT NOT NULL,
    version     BIGINT NOT NULL,
    size        BIGINT NOT NULL,
    mtime_ns    BIGINT NOT NULL,
    committed_ns BIGINT NOT NULL,
    origin      VARCHAR(255) NOT NULL,     -- machine that committed it
    flags       INTEGER NOT NULL DEFAULT 0, -- 1: conflict (an overwritten concurrent commit)
    PRIMARY KEY (inode, version)
){suffix};

-- Unlinked files and removed trees kept for the retention period: one row per name
-- removed, also a name of a file that keeps others (so a hard-linked file comes back
-- with all its names).
CREATE TABLE trash (
    id          {autoinc_pk},
    inode       BIGINT NOT NULL,           -- the removed file or directory (kept while here)
    path        {blob} NOT NULL,           -- its path when removed
    deleted_ns  BIGINT NOT NULL,
    remover     VARCHAR(255) NOT NULL DEFAULT '', -- 'machine:pid' that removed it ('' unknown)
    parent_mtime_ns BIGINT                 -- its directory's mtime before the removal
){suffix};
-- every unlink and rmdir asks whether the inode is in the trash (schema 6: a scan
-- before, so an unlink cost grew with the trash)
CREATE INDEX trash_inode ON trash (inode);

-- Named snapshots of trees.
CREATE TABLE snapshots (
    id          {autoinc_pk},
    name        {blob_name} NOT NULL UNIQUE,
    root        BIGINT NOT NULL,           -- root inode of the copied tree
    source      {blob} NOT NULL,           -- path it was taken from
    created_ns  BIGINT NOT NULL,
    readonly    INTEGER NOT NULL DEFAULT 0
){suffix};

-- Numbered change feed for shared mode (inode or directory entry changed).
CREATE TABLE changes (
    seq         {autoinc_pk},
    inode       BIGINT NOT NULL,
    parent      BIGINT,
    name        {blob_name},
    origin      VARCHAR(255) NOT NULL,
    at_ns       BIGINT NOT NULL
){suffix};

-- Mounts of the filesystem, one row per mount process (on every engine): its heartbeat
-- says it is alive, and a row whose heartbeat is long past, or whose process on this
-- host is gone, is a dead mount, whose holds no longer keep inodes (cloudfs.clients).
CREATE TABLE clients (
    id          {autoinc_pk},
    hostname    VARCHAR(255) NOT NULL,
    pid         INTEGER NOT NULL,
    cachedir    VARCHAR(1024) NOT NULL,    -- with hostname: the machine's mount (one per cache dir)
    started_ns  BIGINT NOT NULL,
    heartbeat_ns BIGINT NOT NULL,          -- refreshed every few seconds while mounted
    state       INTEGER NOT NULL DEFAULT 0 -- 0 mounted, 1 unmounting (its files sealed)
){suffix};

-- Which mount uses which inode (cloudfs.clients): an inode with no name left is freed
-- only when no live mount holds it, neither by another mount's unlink nor by a purge
-- of the trash (the daemon's retention). Two reasons, each its own row: shared mode
-- holds an inode from its first open until a heartbeat after its last close (why 0),
-- and every mount marks an inode it uses when it loses its last name there, and the
-- unfinished root of a snapshot copy it is writing (why 1). Rows of dead mounts go
-- with their `clients` row, at mount and in fsck.
CREATE TABLE holds (
    client      BIGINT NOT NULL,           -- clients.id
    inode       BIGINT NOT NULL,
    why         INTEGER NOT NULL,          -- 0 open (shared mode), 1 lost its last name while used
    PRIMARY KEY (client, inode, why)
){suffix};
CREATE INDEX holds_inode ON holds (inode);
"""


def ddl(dialect: Dialect) -> list[str]:
    """The CREATE statements of the whole schema for `dialect`, one per item."""
    text = _TABLES.format(
        autoinc_pk=dialect.autoinc_pk,
        blob_name=dialect.blob_name,
        blob_id=dialect.blob_id,
        blob=dialect.blob,
        suffix=dialect.table_suffix,
    )
    statements = []
    for stmt in text.split(";"):
        lines = [ln for ln in stmt.splitlines() if not ln.strip().startswith("--")]
        body = "\n".join(lines).strip()
        if body:
            statements.append(body)
    return statements


def table_ddl(dialect: Dialect, table: str) -> list[str]:
    """The CREATE TABLE statement of `table` and its CREATE INDEX statements, made safe
    to run again (IF NOT EXISTS): what a migration adding the table runs."""
    out = []
    for stmt in ddl(dialect):
        if stmt.startswith(f"CREATE TABLE {table} ("):
            out.append(stmt.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS", 1))
        elif re.match(rf"CREATE INDEX \w+ ON {table} ", stmt):
            out.append(stmt.replace("CREATE INDEX", "CREATE INDEX IF NOT EXISTS", 1))
    return out


#: tables of older schemas that no longer exist (a wipe drops them too): open_inodes
#: (schema 4), holds_v4 (schema 4's holds while migration 5 copies it)
RETIRED_TABLES = ("open_inodes", "holds_v4")


def table_names() -> list[str]:
    """Every table of the schema, in the order `ddl` creates them."""
    return re.findall(r"^CREATE TABLE (\w+)", _TABLES, re.MULTILINE)
