"""The object stores the contract suite runs against. Adding a backend is one entry in
STORE_FACTORIES: a context manager that yields a fresh, empty store and cleans up."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import trio
from s3util import Bucket

from cloudfs.objectstore import open_store
from cloudfs.objectstore.base import ObjectStore
from cloudfs.objectstore.local import LocalStore
from cloudfs.objectstore.prefix import PrefixStore


@contextlib.contextmanager
def _local_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    yield LocalStore(tmp_path / "store")


@contextlib.contextmanager
def _local_prefix_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    # A PrefixStore must behave exactly like a store of its own; a sibling object
    # outside the prefix must never show through.
    inner = LocalStore(tmp_path / "store")
    trio.run(inner.put, "other/outside", b"not part of the prefixed store")
    yield PrefixStore(inner, "fs1/")


def _s3_bucket(request: pytest.FixtureRequest) -> Bucket:
    bucket: Bucket = request.getfixturevalue("s3_bucket")
    # moto, unlike S3, is not atomic when a PUT replaces an object that a GET is reading:
    # it frees the old data at once, and the GET fails or returns nothing. With
    # versioning on it keeps the old data, as S3 does for a reader in flight.
    bucket.client.put_bucket_versioning(
        Bucket=bucket.name, VersioningConfiguration={"Status": "Enabled"}
    )
    return bucket


@contextlib.contextmanager
def _s3_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    # a real S3 endpoint over HTTP: the private moto server (tests/s3util.py)
    bucket = _s3_bucket(request)
    yield open_store(bucket.url, endpoint_url=bucket.endpoint)


@contextlib.contextmanager
def _s3_prefix_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    # s3://bucket/prefix: objects outside the prefix must never show through
    bucket = _s3_bucket(request)
    bucket.write("fs0", b"sorts just before the prefix")
    bucket.write("fs1", b"the prefix without its slash")
    bucket.write("other/outside", b"not part of the prefixed store")
    yield open_store(f"{bucket.url}/fs1", endpoint_url=bucket.endpoint)


StoreFactory = Callable[[pytest.FixtureRequest, Path], AbstractContextManager[ObjectStore]]

STORE_FACTORIES: dict[str, StoreFactory] = {
    "local": _local_store,
    "local+prefix": _local_prefix_store,
    "s3": _s3_store,
    "s3+prefix": _s3_prefix_store,
}


@pytest.fixture(params=sorted(STORE_FACTORIES))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    with STORE_FACTORIES[request.param](request, tmp_path) as s:
        try:
            yield s
        finally:
            trio.run(s.aclose)
