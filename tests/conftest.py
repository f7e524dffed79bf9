"""Shared test setup: async tests run under trio, and new filesystems use cheap KDF
parameters so the suite stays fast."""

from __future__ import annotations

import functools
import inspect
import os

import pytest
import trio

# Cheap Argon2id/scrypt parameters for every filesystem a test creates (also in the
# subprocesses tests start); see cloudfs.codec.crypto.
os.environ.setdefault("CLOUDFS_TEST_FAST_KDF", "1")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run `async def test_...` functions with trio.run (we do not use pytest-trio).
    Fixtures stay synchronous; an async resource a fixture yields is closed by the
    fixture with trio.run(resource.aclose)."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    kwargs = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    trio.run(functools.partial(pyfuncitem.obj, **kwargs))
    return True
