"""Metadata stores: the MetaStore interface and its SQL engines."""

from __future__ import annotations

from cloudfs.errors import UsageError
from cloudfs.meta.base import MetaStore
from cloudfs.meta.url import is_mysql, parse_mysql_url, read_mysql_password, sqlite_path


def open_meta(url: str, *, password: str | None = None) -> MetaStore:
    """Open the metadata store named by `url`: `sqlite:///abs/path.db`, a plain path, or
    `mysql://user@host[:port]/db` (see `cloudfs.meta.url`). A MySQL password missing
    from the URL is `password`, else $CLOUDFS_MYSQL_PASSWORD. Nothing connects yet:
    an unreachable server shows at the first transaction (MetadataUnavailable)."""
    if is_mysql(url):
        from cloudfs.meta.mysql import MysqlMetaStore

        target = parse_mysql_url(url)
        if target.password is None:
            target = target.with_password(
                password if password is not None else read_mysql_password(None)
            )
        return MysqlMetaStore(target)
    path = sqlite_path(url)
    if path is None:
        raise UsageError(f"unsupported metadata URL scheme: {url.split('://', 1)[0]}")
    from cloudfs.meta.sqlite import SqliteMetaStore

    return SqliteMetaStore(path)
