"""The mount lease: one machine at a time mounts a filesystem whose metadata is SQLite.
"Another machine" is a second cache dir on the same store (with a copy of the first
one's metadata, as a restore would give it): it is refused with a line naming the
holder, until the holder unmounts, or it takes over with --force after a crash."""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # the fixtures' type; conftest is not importable as a module
    from conftest import CloudFS

pytestmark = pytest.mark.timeout(300)


def second_machine(a: CloudFS, make_fs: Callable[..., CloudFS], name: str = "b") -> CloudFS:
    """A filesystem object for A's store with a cache dir of its own, holding a copy of
    A's metadata (taken with SQLite's backup API, so A may be mounted)."""
    b = make_fs(name, mkfs=False, mount=False)
    b.store, b.storage_url = a.store, a.storage_url
    b.cache.mkdir(parents=True)
    src = sqlite3.connect(a.cache / "meta.db")
    dst = sqlite3.connect(b.cache / "meta.db")
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    config = json.loads((a.cache / "config.json").read_text())
    config["metadata"] = str(b.cache / "meta.db")
    (b.cache / "config.json").write_text(json.dumps(config))
    return b


def lease(fs: CloudFS) -> dict | None:
    path = fs.store / "lease"
    return json.loads(path.read_text()) if path.exists() else None


def refused(fs: CloudFS, *extra: str) -> str:
    """mount.cloudfs fails with one line about the lease; returns it."""
    r = fs.run("mount.cloudfs", fs.storage_url, fs.mnt, "--cachedir", fs.cache, *extra)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 13 and len(lines) == 1, (r.returncode, r.stderr)
    assert not fs.mounted
    return lines[0]


@pytest.mark.log_errors_expected(r"mount lease was taken over by another machine")
def test_one_machine_at_a_time(make_fs: Callable[..., CloudFS]) -> None:
    a = make_fs("a", mount=False)
    a.env["CLOUDFS_TEST_LEASE_RENEW_S"] = "0.5"
    a.mount()
    (a.mnt / "f").write_bytes(b"written on a")
    held = lease(a)
    assert held is not None
    assert held["cachedir"] == str(a.cache) and held["pid"] == a.mount_pid
    assert held["hostname"] == socket.gethostname()
    time.sleep(1.5)  # renewed meanwhile
    assert lease(a)["renewed_at"] > held["renewed_at"]  # type: ignore[index]

    b = second_machine(a, make_fs)
    line = refused(b)
    assert line.startswith(
        "mount.cloudfs: the filesystem is mounted on another machine: host "
        f"{socket.gethostname()}, mount.cloudfs pid {a.mount_pid}, cache dir {a.cache}, "
        "mounted since "
    ), line
    assert line.endswith("if that machine is gone (crashed, replaced), mount with --force "
                         "to take over")  # fmt: skip
    assert re.search(r"lease renewed \d+ s ago", line), line

    # a clean unmount releases it: the other machine may mount
    a.unmount()
    assert lease(a) is None
    b.mount()
    assert (b.mnt / "f").read_bytes() == b"written on a"
    assert f"cache dir {b.cache}," in refused(a)

    # b crashes: its lease stays, and is taken over only with --force
    b.kill_mount()
    assert lease(a)["cachedir"] == str(b.cache)  # type: ignore[index]
    assert f"cache dir {b.cache}," in refused(a)
    r = a.mount("--force")
    assert f"took over the mount lease of host {socket.gethostname()}" in r.stderr
    assert f"cache dir {b.cache}" in r.stderr
    assert lease(a)["cachedir"] == str(a.cache)  # type: ignore[index]
    assert f"cache dir {a.cache}," in refused(b)

    # taken over while a still runs (a mistaken --force): a says so in its log
    b.mount("--force")
    deadline = time.monotonic() + 10
    while "lease was taken over" not in (a.cache / "mount.log").read_text():
        assert time.monotonic() < deadline, "a did not notice that its lease was taken"
        time.sleep(0.2)
    b.unmount()
    a.unmount()
    assert lease(a) is None


def test_same_cache_dir_takes_back_its_own_lease(fs: CloudFS) -> None:
    """A crash of the mount leaves its lease; the next mount of the same cache dir
    simply takes it back."""
    fs.kill_mount()
    assert lease(fs)["cachedir"] == str(fs.cache)  # type: ignore[index]
    r = fs.mount()
    assert "lease" not in r.stderr
    assert lease(fs)["pid"] == fs.mount_pid  # type: ignore[index]
    fs.unmount()
    assert lease(fs) is None
    assert not os.path.exists(fs.store / "lease")
