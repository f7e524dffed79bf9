"""mkfs.cloudfs and mount.cloudfs with `--metadata mysql://...` on the private MariaDB
server: files round-trip through a real mount, the password never shows in a command
line, an environment, a log or config.json, and a wrong database, a wrong password or
an unreachable server each end in one line and a non-zero exit. Also `cloudfs upgrade`.

Tests name `mysql_url` before `make_fs`: fixtures end in reverse order, so the mounts
and daemons stop before the test's database is dropped."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import pytest

from cloudfs.meta import schema

if TYPE_CHECKING:  # the fixtures' types; conftest is not importable as a module
    from conftest import CloudFS, MariaDB


def one_line_failure(result: object, prog: str) -> str:
    """A non-zero exit with exactly one line on stderr, naming the program."""
    stderr: str = result.stderr  # type: ignore[attr-defined]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert result.returncode != 0, f"{prog} succeeded: {stderr!r}"  # type: ignore[attr-defined]
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    assert lines[0].startswith(f"{prog}: "), lines[0]
    return lines[0]


def database_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


def root_query(mariadb: MariaDB, database: str, sql: str) -> list[tuple]:
    with mariadb.root() as db, db.cursor() as cur:
        cur.execute(f"USE {database}")
        cur.execute(sql)
        return list(cur.fetchall())


def proc_bytes(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes() + Path(f"/proc/{pid}/environ").read_bytes()


def test_mount_on_mariadb(
    mysql_url: str, mariadb: MariaDB, make_fs: Callable[..., CloudFS]
) -> None:
    fs = make_fs(mkfs=False, mount=False)
    fs.mkfs("--metadata", mysql_url)  # password from $CLOUDFS_MYSQL_PASSWORD
    assert not (fs.cache / "meta.db").exists(), "no SQLite database beside MySQL"
    config = json.loads((fs.cache / "config.json").read_text())
    assert config["metadata"] == mysql_url

    fs.mount()  # the cache dir remembers the database
    payload = os.urandom(3 * 1024 * 1024 + 5)
    (fs.mnt / "dir").mkdir()
    (fs.mnt / "dir" / "f\xe9").write_bytes(payload)
    (fs.mnt / "dir" / "f\xe9").rename(fs.mnt / "dir" / "g")
    fs.flush()
    names = root_query(mariadb, database_of(mysql_url), "SELECT name FROM dentries")
    assert {bytes(n) for (n,) in names} == {b"dir", b"g"}
    pending = root_query(
        mariadb, database_of(mysql_url), "SELECT COUNT(*) FROM blocks WHERE state = 0"
    )
    assert pending == [(0,)], "the daemon uploaded and marked every block on MySQL"
    assert fs.stat_json()["files"] == 1
    fs.unmount()

    # the password from a file instead: the mount hands it to its daemon on stdin
    fs.kill_daemon()
    password_file = fs.root / "mysql-password"
    password_file.write_text(mariadb.password + "\n")
    env = {k: v for k, v in fs.env.items() if k != "CLOUDFS_MYSQL_PASSWORD"}
    fs.mount("--metadata", mysql_url, "--mysql-password-file", str(password_file), env=env)
    assert (fs.mnt / "dir" / "g").read_bytes() == payload
    daemon = fs.daemon_pid()
    assert daemon is not None and fs.mount_pid is not None
    needle = mariadb.password.encode()
    for pid in (fs.mount_pid, daemon):
        assert needle not in proc_bytes(pid), f"the MySQL password shows in /proc/{pid}"
    # tools find the password file through config.json
    assert fs.check("cloudfs", "stat", "--json", fs.mnt, env=env).returncode == 0
    fs.unmount()
    kept = [p for p in fs.cache.rglob("*") if p.is_file() and needle in p.read_bytes()]
    assert not kept, f"the MySQL password is in {kept}"

    # mkfs --force replaces the filesystem in the database too
    fs.kill_daemon()
    fs.mkfs("--metadata", mysql_url, "--force")
    fs.mount()
    assert list(fs.mnt.iterdir()) == []


def test_password_in_the_url_leaves_the_command_line(
    mysql_url: str, mariadb: MariaDB, make_fs: Callable[..., CloudFS]
) -> None:
    fs = make_fs(mkfs=False, mount=False)
    env = {k: v for k, v in fs.env.items() if k != "CLOUDFS_MYSQL_PASSWORD"}
    with_password = mysql_url.replace(
        f"{mariadb.user}@", f"{mariadb.user}:{quote(mariadb.password, safe='')}@"
    )
    fs.check("mkfs.cloudfs", fs.storage_url, "--cachedir", fs.cache, "--metadata", with_password,
             env=env)  # fmt: skip
    config = (fs.cache / "config.json").read_text()
    assert quote(mariadb.password, safe="") not in config and mariadb.password not in config
    fs.mount("--metadata", with_password, env=env)
    (fs.mnt / "f").write_bytes(b"through MySQL")
    cmdline = Path(f"/proc/{fs.mount_pid}/cmdline").read_bytes()
    assert quote(mariadb.password, safe="").encode() not in cmdline
    assert mysql_url.encode() in cmdline, "ps shows the URL without its password"
    fs.unmount()
    # the password was for that mount only: nothing kept it
    r = fs.run("mount.cloudfs", fs.storage_url, fs.mnt, "--cachedir", fs.cache, env=env)
    assert "Access denied" in one_line_failure(r, "mount.cloudfs")
    fs.mount(env={**env, "CLOUDFS_MYSQL_PASSWORD": mariadb.password})
    assert (fs.mnt / "f").read_bytes() == b"through MySQL"


@pytest.mark.log_errors_expected("Access denied")
def test_bad_metadata_databases(
    mysql_url: str, mariadb: MariaDB, make_fs: Callable[..., CloudFS]
) -> None:
    fs = make_fs(mkfs=False, mount=False)
    env_no_pw = {k: v for k, v in fs.env.items() if k != "CLOUDFS_MYSQL_PASSWORD"}
    mkfs = ["mkfs.cloudfs", fs.storage_url, "--cachedir", fs.cache]

    # unreachable server, wrong password: nothing is written anywhere
    unreachable = f"mysql://{mariadb.user}@127.0.0.1:1/{database_of(mysql_url)}"
    line = one_line_failure(fs.run(*mkfs, "--metadata", unreachable), "mkfs.cloudfs")
    assert "Can't connect" in line
    wrong = {**env_no_pw, "CLOUDFS_MYSQL_PASSWORD": "wrong-password-77"}
    line = one_line_failure(fs.run(*mkfs, "--metadata", mysql_url, env=wrong), "mkfs.cloudfs")
    assert "Access denied" in line and "wrong-password-77" not in line
    assert not fs.store.exists() and not fs.cache.exists()

    fs.check(*mkfs, "--metadata", mysql_url)
    # a second filesystem must not take over the first one's database
    other = make_fs("other", mkfs=False, mount=False)
    r = other.run("mkfs.cloudfs", other.storage_url, "--cachedir", other.cache,
                  "--metadata", mysql_url)  # fmt: skip
    assert "already holds" in one_line_failure(r, "mkfs.cloudfs")
    assert not other.store.exists()
    other.mkfs()  # on SQLite
    r = other.run("mount.cloudfs", other.storage_url, other.mnt, "--cachedir", other.cache,
                  "--metadata", mysql_url)  # fmt: skip
    line = one_line_failure(r, "mount.cloudfs")
    assert "another filesystem" in line and database_of(mysql_url) in line
    assert not other.mounted

    mount = ["mount.cloudfs", fs.storage_url, fs.mnt, "--cachedir", fs.cache]
    line = one_line_failure(fs.run(*mount, "--metadata", unreachable), "mount.cloudfs")
    assert "Can't connect" in line
    line = one_line_failure(fs.run(*mount, env=wrong), "mount.cloudfs")
    assert "Access denied" in line
    # a database of a newer cloudfs, and one older than this cloudfs
    database = database_of(mysql_url)
    upgrade = ["cloudfs", "upgrade", fs.storage_url, "--cachedir", fs.cache]
    for version, expected in ((schema.SCHEMA_VERSION + 1, "newer"), (1, "cloudfs upgrade")):
        root_query(mariadb, database, f"UPDATE meta_info SET value = '{version}'"
                   " WHERE name = 'schema_version'")  # fmt: skip
        line = one_line_failure(fs.run(*mount), "mount.cloudfs")
        assert expected in line, line
        assert not fs.mounted
        if version > schema.SCHEMA_VERSION:
            assert "newer" in one_line_failure(fs.run(*upgrade), "cloudfs")
    root_query(mariadb, database, f"UPDATE meta_info SET value = '{schema.SCHEMA_VERSION}'"
               " WHERE name = 'schema_version'")  # fmt: skip
    assert "nothing to upgrade" in fs.check(*upgrade).stdout
    fs.mount()
    assert fs.mounted


@pytest.mark.sqlite_only("a SQLite database as the first cloudfs made it")
def test_upgrade_migrates_a_schema_1_database(make_fs: Callable[..., CloudFS]) -> None:
    """A SQLite database made by the first cloudfs (extents.offset, schema 1)."""
    fs = make_fs()
    payload = os.urandom(300_000)
    (fs.mnt / "kept").write_bytes(payload)
    fs.unmount()
    fs.kill_daemon()
    db = sqlite3.connect(fs.cache / "meta.db")
    db.execute("ALTER TABLE extents RENAME COLUMN file_offset TO `offset`")
    db.execute("UPDATE meta_info SET value = '1' WHERE name = 'schema_version'")
    db.commit()
    db.close()
    mount = ["mount.cloudfs", fs.storage_url, fs.mnt, "--cachedir", fs.cache]
    assert "cloudfs upgrade" in one_line_failure(fs.run(*mount), "mount.cloudfs")

    upgrade = ["cloudfs", "upgrade", fs.storage_url, "--cachedir", fs.cache]
    # a process holding the mount lock (a mount by the older cloudfs) stops it
    fd = os.open(fs.cache / "mount.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert "unmount" in one_line_failure(fs.run(*upgrade), "cloudfs")
    finally:
        os.close(fd)
    r = fs.check(*upgrade)
    assert f"from schema 1 to {schema.SCHEMA_VERSION}" in r.stdout
    assert "nothing to upgrade" in fs.check(*upgrade).stdout
    fs.mount()
    assert (fs.mnt / "kept").read_bytes() == payload
    assert "nothing to upgrade" in fs.check("cloudfs", "upgrade", fs.mnt).stdout
