"""The metadata DDL of schema 4, frozen as cloudfs wrote it before schema 5 (one holds
table, inodes.allocated): the migration test makes a schema-4 database with it."""

from __future__ import annotations

from cloudfs.meta.schema import Dialect

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
    flags       INTEGER NOT NULL DEFAULT 0 -- reserved: read-only snapshot trees, ...
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

-- Nameless inodes a mount still uses (open, or known to the kernel): the trash purge
-- of another process (the daemon's retention) must not free them, the mount frees
-- them at the last close. fsck drops the rows of mounts that are gone.
CREATE TABLE open_inodes (
    inode       BIGINT NOT NULL,
    holder      VARCHAR(255) NOT NULL,     -- 'machine:pid' of the mount
    PRIMARY KEY (inode, holder)
){suffix};

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

-- Mounts of the filesystem in shared mode (MySQL metadata), one row per mount process:
-- its heartbeat says it is alive, and a row whose heartbeat is long past is a dead mount,
-- whose holds no longer keep inodes (cloudfs.clients).
CREATE TABLE clients (
    id          {autoinc_pk},
    hostname    VARCHAR(255) NOT NULL,
    pid         INTEGER NOT NULL,
    cachedir    VARCHAR(1024) NOT NULL,    -- with hostname: the machine's mount (one per cache dir)
    started_ns  BIGINT NOT NULL,
    heartbeat_ns BIGINT NOT NULL,          -- refreshed every few seconds while mounted
    state       INTEGER NOT NULL DEFAULT 0 -- 0 mounted, 1 unmounting (its files sealed)
){suffix};

-- Which mount has which inode open: an inode with no name left is freed only when no
-- live mount holds it (open-unlinked files keep working on every machine).
CREATE TABLE holds (
    client      BIGINT NOT NULL,           -- clients.id
    inode       BIGINT NOT NULL,
    PRIMARY KEY (client, inode)
){suffix};
CREATE INDEX holds_inode ON holds (inode);
"""


def ddl4(dialect: Dialect) -> list[str]:
    """The CREATE statements of schema 4 for `dialect`."""
    text = _TABLES.format(
        autoinc_pk=dialect.autoinc_pk, blob_name=dialect.blob_name, blob_id=dialect.blob_id,
        blob=dialect.blob, suffix=dialect.table_suffix,
    )
    out = []
    for stmt in text.split(";"):
        body = "\n".join(ln for ln in stmt.splitlines() if not ln.strip().startswith("--"))
        if body.strip():
            out.append(body.strip())
    return out
