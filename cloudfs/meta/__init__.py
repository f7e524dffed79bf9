"""Metadata stores: the MetaStore interface and its SQL engines."""

from __future__ import annotations

from pathlib import Path

from cloudfs.errors import UsageError
from cloudfs.meta.base import MetaStore


def open_meta(url: str) -> MetaStore:
    """Open the metadata store named by `url`: `sqlite:///abs/path.db` or a plain path."""
    if url.startswith("sqlite://"):
        path = url[len("sqlite://") :]
    elif "://" in url:
        raise UsageError(f"unsupported metadata URL scheme: {url.split('://', 1)[0]}")
    else:
        path = url
    from cloudfs.meta.sqlite import SqliteMetaStore

    return SqliteMetaStore(Path(path))
