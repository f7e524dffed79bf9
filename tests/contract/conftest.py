"""The object stores the contract suite runs against. Adding a backend is one entry in
STORE_FACTORIES: a context manager that yields a fresh, empty store and cleans up."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import trio

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


StoreFactory = Callable[[pytest.FixtureRequest, Path], AbstractContextManager[ObjectStore]]

STORE_FACTORIES: dict[str, StoreFactory] = {
    "local": _local_store,
    "local+prefix": _local_prefix_store,
}


@pytest.fixture(params=sorted(STORE_FACTORIES))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    with STORE_FACTORIES[request.param](request, tmp_path) as s:
        try:
            yield s
        finally:
            trio.run(s.aclose)
