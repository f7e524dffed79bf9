"""Metadata URLs: parsing, redaction, and where the MySQL password comes from."""

from __future__ import annotations

from pathlib import Path

import pytest
from cloudfs.tools._cli import metadata_password

from cloudfs.errors import UsageError
from cloudfs.meta import open_meta
from cloudfs.meta.mysql import MysqlMetaStore
from cloudfs.meta.sqlite import SqliteMetaStore
from cloudfs.meta.url import (
    MysqlTarget,
    parse_mysql_url,
    read_mysql_password,
    redact,
    sqlite_path,
    url_password,
)


def test_parse_tcp_and_socket_urls() -> None:
    t = parse_mysql_url("mysql://fs%40user:p%40ss%3Aw%2Fd@db.example:3307/cloud%5Ffs")
    assert (t.user, t.password, t.host, t.port, t.database, t.unix_socket) == (
        "fs@user", "p@ss:w/d", "db.example", 3307, "cloud_fs", None,
    )  # fmt: skip
    t = parse_mysql_url("mysql://u@localhost/db?unix_socket=/run/mysqld/mysqld.sock")
    assert (t.host, t.port, t.unix_socket, t.password) == (
        "localhost", 3306, "/run/mysqld/mysqld.sock", None,
    )  # fmt: skip


@pytest.mark.parametrize(
    "url",
    [
        "mysql://u:secret@h",  # no database
        "mysql://u:secret@h/",
        "mysql://:secret@h/db",  # no user
        "mysql://u:secret@h:notaport/db",
        "mysql://u:secret@h/db?ssl=1",  # unknown parameter
        "mysql://u:secret@/db",  # neither host nor socket
    ],
)
def test_bad_urls_are_refused_without_the_password(url: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_mysql_url(url)
    assert "secret" not in caught.value.message


def test_redact() -> None:
    assert (
        redact("mysql://u:s3cr%40t@h:3307/db?unix_socket=/x")
        == "mysql://u@h:3307/db?unix_socket=/x"
    )
    assert redact("mysql://u@h/db") == "mysql://u@h/db"
    assert redact("/var/lib/meta.db") == "/var/lib/meta.db"
    assert url_password("mysql://u:s3cr%40t@h/db") == "s3cr@t"
    assert url_password("mysql://u@h/db") is None


def test_the_password_stays_out_of_repr_and_display() -> None:
    t = MysqlTarget("u", "h", 3306, "db", password="hunter2")
    assert "hunter2" not in repr(t) and "hunter2" not in t.display()
    assert t.display() == "mysql://u@h/db"
    assert (
        MysqlTarget("u", "h", 3307, "d b", "/s").display()
        == "mysql://u@h:3307/d%20b?unix_socket=/s"
    )


def test_password_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLOUDFS_MYSQL_PASSWORD", raising=False)
    f = tmp_path / "pw"
    f.write_text("from file\n")
    assert read_mysql_password(None) is None
    monkeypatch.setenv("CLOUDFS_MYSQL_PASSWORD", "from env")
    assert read_mysql_password(None) == "from env"
    assert read_mysql_password(str(f)) == "from file"
    with pytest.raises(UsageError, match="password file"):
        read_mysql_password(str(tmp_path / "missing"))
    assert metadata_password("mysql://u:in%20url@h/db", None) == "in url"
    assert metadata_password("mysql://u@h/db", str(f)) == "from file"
    assert metadata_password("mysql://u@h/db", None) == "from env"
    assert metadata_password(str(tmp_path / "meta.db"), None) is None, "SQLite needs none"
    with pytest.raises(UsageError, match="twice"):
        metadata_password("mysql://u:in%20url@h/db", str(f))


def test_open_meta_picks_the_engine(tmp_path: Path) -> None:
    assert isinstance(open_meta(str(tmp_path / "a.db")), SqliteMetaStore)
    assert isinstance(open_meta(f"sqlite://{tmp_path}/b.db"), SqliteMetaStore)
    mysql = open_meta("mysql://u:pw@h/db")  # nothing connects yet
    assert isinstance(mysql, MysqlMetaStore) and mysql.where == "mysql://u@h/db"
    assert sqlite_path("mysql://u@h/db") is None
    with pytest.raises(UsageError, match="scheme"):
        open_meta("postgres://u@h/db")


def test_redis_urls_share_the_password_helpers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cloudfs import notify

    assert notify.redact_redis("redis://:s%40cret@h:6379/0") == "redis://h:6379/0"
    assert notify.redact_redis("redis://user:pw@h/1") == "redis://user@h/1"
    assert notify.redact_redis("redis://h/1") == "redis://h/1"
    assert notify.redis_url_password("redis://:s%40cret@h/0") == "s@cret"
    assert notify.redis_url_password("redis://h/0") is None
    monkeypatch.setenv("CLOUDFS_REDIS_PASSWORD", "from env")
    assert notify.read_redis_password(None) == "from env"
    with pytest.raises(UsageError, match="Redis password file"):
        notify.read_redis_password(str(tmp_path / "missing"))
    assert redact("mysql://u:pw@h/db") == "mysql://u@h/db"
