"""An engine-neutral dump of the metadata: every table of the schema as a stream of
rows, read in batches inside one read-only transaction (on MySQL a REPEATABLE READ
transaction begun WITH CONSISTENT SNAPSHOT, so the dump is one state of the
filesystem whatever other mounts commit meanwhile), and its load into an empty
database in batches. What a metadata backup of a MySQL-backed filesystem holds
(cloudfs.metabackup), and the bridge between engines: a SQLite backup restores into
MySQL and a MySQL backup into SQLite.

The dump is text, one JSON value per line, written to a file as it is read (no
process holds a whole table in memory):

    {"dump": "cloudfs-rows", "version": 1, "engine": "mysql", "schema_version": 4}
    {"table": "inodes", "columns": ["id", "mode", ...]}
    [1, 16877, ...]                      one line per row; bytes as {"b": base64}
    {"end": "inodes", "rows": 17}
    ...                                  every table of the schema, in `ddl` order
    {"done": true}

Tables are paged by their primary key (keyset paging: `WHERE (pk) > (last)`), so each
batch is an index range scan, however large the table.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from pathlib import Path

import trio

from cloudfs.errors import CorruptBlock, UsageError
from cloudfs.meta import schema
from cloudfs.meta.base import MetaStore

FORMAT = "cloudfs-rows"
VERSION = 1
#: rows read per query and inserted per statement
BATCH_ROWS = 2000
#: bytes of the dump read from its file at a time by a load
READ_BYTES = 1 << 20

_COLUMN = re.compile(r"^\s*(\w+)\s+")
_NOT_COLUMNS = {"PRIMARY", "UNIQUE", "KEY", "INDEX", "CONSTRAINT", "FOREIGN"}


def table_columns(table: str) -> list[str]:
    """The columns of `table`, in the order the schema declares them."""
    for stmt in schema.ddl(schema.SQLITE):
        if stmt.startswith(f"CREATE TABLE {table} ("):
            body = stmt.split("(", 1)[1]
            names = []
            for line in body.splitlines():
                m = _COLUMN.match(line)
                if m and m.group(1).upper() not in _NOT_COLUMNS:
                    names.append(m.group(1))
            return names
    raise KeyError(table)


def primary_key(table: str) -> list[str]:
    """The columns that order `table` uniquely: its primary key (or, for a table with
    an auto-increment id and a UNIQUE pair, that id)."""
    for stmt in schema.ddl(schema.SQLITE):
        if stmt.startswith(f"CREATE TABLE {table} ("):
            m = re.search(r"PRIMARY KEY \(([^)]*)\)", stmt)
            if m:
                return [c.strip() for c in m.group(1).split(",")]
            m = re.search(r"^\s*(\w+)\s+[^,\n]*PRIMARY KEY", stmt, re.MULTILINE)
            if m:
                return [m.group(1)]
    raise KeyError(table)


def _encode(value: object) -> object:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"b": base64.b64encode(bytes(value)).decode()}
    return value


def _decode(value: object) -> object:
    if isinstance(value, dict):
        return base64.b64decode(value["b"])
    return value


def _line(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


@dataclass(frozen=True)
class DumpInfo:
    engine: str
    schema_version: int
    rows: int


async def dump_rows(meta: MetaStore, out: Path, *, batch: int = BATCH_ROWS) -> DumpInfo:
    """Write every table of `meta` to the file `out`, one consistent state (one
    read-only transaction), `batch` rows per query."""
    total = 0
    async with await trio.open_file(out, "wb") as f, meta.reading() as tx:
        version = int(await tx.get_info("schema_version") or 0)
        await f.write(_line({"dump": FORMAT, "version": VERSION, "engine": meta.dialect.name,
                             "schema_version": version}))  # fmt: skip
        for table in schema.table_names():
            columns = table_columns(table)
            key = primary_key(table)
            await f.write(_line({"table": table, "columns": columns}))
            select = f"SELECT {', '.join(columns)} FROM {table}"
            order = f" ORDER BY {', '.join(key)} LIMIT {int(batch)}"
            after = f" WHERE ({', '.join(key)}) > ({', '.join('?' * len(key))})"
            key_at = [columns.index(c) for c in key]
            last: tuple | None = None
            rows_in_table = 0
            while True:
                if last is None:
                    rows = await tx.conn.query(select + order)
                else:
                    rows = await tx.conn.query(select + after + order, last)
                if not rows:
                    break
                await f.write(b"".join(_line([_encode(v) for v in row]) for row in rows))
                rows_in_table += len(rows)
                last = tuple(rows[-1][i] for i in key_at)
                if len(rows) < batch:
                    break
            await f.write(_line({"end": table, "rows": rows_in_table}))
            total += rows_in_table
        await f.write(_line({"done": True}))
    return DumpInfo(meta.dialect.name, version, total)


def read_header(dump: Path) -> dict[str, object]:
    """The first line of a row dump; CorruptBlock if the file is not one."""
    with dump.open("rb") as f:
        first = f.readline()
    try:
        header = json.loads(first)
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("dump") != FORMAT:
        raise CorruptBlock("not a cloudfs metadata row dump")
    return header


async def _tables_present(meta: MetaStore) -> list[str]:
    """Which tables of the schema exist in `meta`'s database."""
    names = schema.table_names()
    marks = ", ".join("?" * len(names))
    if meta.dialect is schema.MYSQL:
        sql = ("SELECT table_name FROM information_schema.tables"
               f" WHERE table_schema = DATABASE() AND table_name IN ({marks})")  # fmt: skip
    else:
        sql = f"SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ({marks})"
    async with meta.reading() as tx:
        return sorted(str(r[0]) for r in await tx.conn.query(sql, names))


async def load_rows(
    meta: MetaStore, dump: Path, *, force: bool = False, batch: int = BATCH_ROWS
) -> int:
    """Create the schema in `meta`'s database and insert the dump's rows, `batch` per
    statement. The database must hold none of the schema's tables (UsageError),
    unless `force`: then they are dropped first. Returns the rows inserted."""
    header = read_header(dump)
    version = header.get("schema_version")
    if version != schema.SCHEMA_VERSION:
        raise UsageError(f"the backup has metadata schema {version}; this cloudfs restores "
                         f"schema {schema.SCHEMA_VERSION} only")  # fmt: skip
    present = await _tables_present(meta)
    if present:
        if not force:
            raise UsageError(f"{meta.where} is not empty (it has the tables "
                             f"{', '.join(present)}): restoring needs an empty database "
                             "(--force drops them)")  # fmt: skip
        await meta.wipe()
    async with meta.transaction(durable=True) as tx:
        for stmt in schema.ddl(meta.dialect):
            await tx.conn.execute(stmt)

    total = 0
    table: str | None = None
    insert = ""
    pending: list[list[object]] = []

    async def flush() -> None:
        if pending:
            rows = [list(r) for r in pending]
            pending.clear()
            async with meta.transaction() as tx:
                await tx.conn.executemany(insert, rows)

    done = False
    with dump.open("rb") as f:
        f.readline()  # the header
        while not done:
            lines = await trio.to_thread.run_sync(f.readlines, READ_BYTES)
            if not lines:
                break
            for raw in lines:
                item = json.loads(raw)
                if isinstance(item, list):
                    if table is None:
                        raise CorruptBlock("a row dump with a row outside any table")
                    pending.append([_decode(v) for v in item])
                    total += 1
                    if len(pending) >= batch:
                        await flush()
                elif "table" in item:
                    table = str(item["table"])
                    columns = [str(c) for c in item["columns"]]
                    if table not in schema.table_names() or not set(columns) <= set(
                        table_columns(table)
                    ):
                        raise CorruptBlock(f"a row dump with an unknown table or column: {table}")
                    insert = (f"INSERT INTO {table} ({', '.join(columns)})"
                              f" VALUES ({', '.join('?' * len(columns))})")  # fmt: skip
                elif "end" in item:
                    await flush()
                    table = None
                elif item.get("done"):
                    done = True
                    break
    if not done:
        raise CorruptBlock("a row dump cut short")
    return total
