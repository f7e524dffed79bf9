"""Metadata URLs: which engine and where, and the MySQL password kept out of sight.

    sqlite:///abs/path.db  or a plain path        the SQLite engine
    mysql://user[:password]@host[:port]/db         MySQL or MariaDB over TCP
    mysql://user@localhost/db?unix_socket=/path    ... over a unix socket

The password may sit in the URL, but it is better read from a file
(`--mysql-password-file`) or the environment (`CLOUDFS_MYSQL_PASSWORD`): a URL
shows in `ps`. Whatever is displayed, logged or written to a file uses `redact`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from cloudfs.errors import UsageError

MYSQL_PASSWORD_ENV = "CLOUDFS_MYSQL_PASSWORD"
MYSQL_DEFAULT_PORT = 3306


@dataclass(frozen=True)
class MysqlTarget:
    """Where a MySQL metadata database is and who logs in."""

    user: str
    host: str
    port: int
    database: str
    unix_socket: str | None = None
    password: str | None = field(default=None, repr=False)

    def display(self) -> str:
        """The URL without the password."""
        where = f"{quote(self.user, safe='')}@{self.host}"
        if self.port != MYSQL_DEFAULT_PORT:
            where += f":{self.port}"
        url = f"mysql://{where}/{quote(self.database, safe='')}"
        if self.unix_socket:
            url += f"?unix_socket={quote(self.unix_socket, safe='/')}"
        return url

    def with_password(self, password: str | None) -> MysqlTarget:
        return replace(self, password=password)


def is_mysql(url: str) -> bool:
    return url.startswith("mysql://")


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL (`sqlite:///abs/path` or a plain path); None
    for a URL of another engine."""
    if url.startswith("sqlite://"):
        return Path(url[len("sqlite://") :])
    if "://" in url:
        return None
    return Path(url)


def parse_mysql_url(url: str) -> MysqlTarget:
    """UsageError (without the password) when `url` is not a usable mysql:// URL."""
    parts = urlsplit(url)
    shown = redact(url)
    try:
        port = parts.port or MYSQL_DEFAULT_PORT
    except ValueError:
        raise UsageError(f"invalid port in metadata URL {shown}") from None
    database = unquote(parts.path.lstrip("/"))
    if not database or "/" in database:
        raise UsageError(f"metadata URL {shown} names no database (mysql://user@host/DB)")
    if not parts.username:
        raise UsageError(f"metadata URL {shown} names no user (mysql://USER@host/db)")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = set(query) - {"unix_socket"}
    if unknown:
        raise UsageError(f"unknown parameter {min(unknown)!r} in metadata URL {shown}")
    unix_socket = query.get("unix_socket", [None])[-1] or None
    if not parts.hostname and not unix_socket:
        raise UsageError(f"metadata URL {shown} names no host")
    return MysqlTarget(
        user=unquote(parts.username),
        host=parts.hostname or "localhost",
        port=port,
        database=database,
        unix_socket=unix_socket,
        password=unquote(parts.password) if parts.password is not None else None,
    )


def redact(url: str) -> str:
    """`url` without its password (any metadata URL; other URLs are left as they are)."""
    return without_password(url) if is_mysql(url) else url


def without_password(url: str) -> str:
    """`url` (mysql://, redis://, ...) with the password of its user part left out."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return parts._replace(netloc=f"{user}@{hostport}" if user else hostport).geturl()


def password_of(url: str) -> str | None:
    """The password written in `url`'s user part, if any."""
    password = urlsplit(url).password
    return unquote(password) if password is not None else None


def url_password(url: str) -> str | None:
    """The password written in a mysql:// URL, if any."""
    return password_of(url) if is_mysql(url) else None


def read_mysql_password(password_file: str | None) -> str | None:
    """The MySQL password from `password_file` (first line), else $CLOUDFS_MYSQL_PASSWORD,
    else None (a passwordless account, or one the URL carries the password of)."""
    return read_password(password_file, MYSQL_PASSWORD_ENV, "MySQL")


def read_password(password_file: str | None, env: str, server: str) -> str | None:
    """The first line of `password_file`, else the environment variable `env`, else
    None; an unreadable file is a UsageError naming the `server` it is for."""
    if password_file:
        try:
            with open(password_file, encoding="utf-8") as f:
                return f.readline().rstrip("\r\n")
        except OSError as exc:
            raise UsageError(
                f"cannot read the {server} password file {password_file}: {exc.strerror}"
            ) from None
    return os.environ.get(env)
