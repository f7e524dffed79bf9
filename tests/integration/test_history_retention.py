"""Retention and garbage collection on a real mount (issue 6), on a clock the tests
move: `cloudfs prune --now` and `cloudfs gc --now`, and the daemon's remover with its
clock moved forward. After the retention period a removed file's unique blocks leave
the store; what is kept reads back unchanged."""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING

import pytest
from posixutil import wait_for

if TYPE_CHECKING:
    from conftest import CloudFS

pytestmark = pytest.mark.timeout(300)

MiB = 1 << 20
DAY = 86400


def _fsync_versions(path: os.PathLike[str], contents: list[bytes]) -> None:
    with open(path, "wb") as f:
        for data in contents:
            f.seek(0)
            f.truncate()
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def _json(fs: CloudFS, *args: object) -> dict | list:
    return json.loads(fs.check("cloudfs", *map(str, args), "--json").stdout)


def test_prune_and_gc_on_a_moved_clock(fs: CloudFS) -> None:
    m = fs.mnt
    assert fs.check("cloudfs", "retention", m).stdout.strip() == (
        "keep-all=1d,hourly=1w,daily=30d,trash=30d"
    )
    contents = [os.urandom(2 * MiB) for _ in range(3)]
    _fsync_versions(m / "doc", contents)
    unique = os.urandom(4 * MiB)
    (m / "removed").write_bytes(unique)
    fs.flush()
    with_removed = fs.store_block_bytes()
    os.unlink(m / "removed")
    fs.flush()

    # nothing is old enough yet
    assert _json(fs, "prune", m, "--dry-run") == {"versions": 0, "extents": 0, "files": 0,
                                                    "trash": 0}  # fmt: skip
    assert _json(fs, "prune", m, "--dry-run", "--now", "+29d")["trash"] == 0
    dry = _json(fs, "prune", m, "--dry-run", "--now", "+31d")
    assert (dry["versions"], dry["trash"]) == (2, 1)
    assert _json(fs, "gc", m, "--dry-run", "--now", "+31d")["blocks"] == 0
    assert fs.store_block_bytes() == with_removed

    assert fs.stat_json()["old_version_bytes"] == 2 * 2 * MiB  # versions 1 and 2 of doc
    r = fs.check("cloudfs", "prune", m, "--now", "+31d")
    assert r.stdout.startswith("dropped 2 versions of 1 files (")
    assert "and 1 trash entries" in r.stdout
    assert _json(fs, "trash", "list", m) == []
    assert os.listdir(m / ".cloudfs" / "versions" / "doc") == ["3"]
    versions = _json(fs, "versions", m / "doc")
    assert [v["version"] for v in versions] == [3]
    assert fs.stat_json()["old_version_bytes"] == 0

    # unreferenced blocks wait for the grace period, then leave the store
    assert _json(fs, "gc", m, "--now", "+31d", "--grace", "100d")["blocks"] == 0
    dry = _json(fs, "gc", m, "--dry-run", "--now", "+32d")
    assert dry["blocks"] > 0 and dry["plain_bytes"] >= 4 * MiB + 4 * MiB
    r = fs.check("cloudfs", "gc", m, "--now", "+32d")
    assert r.stdout.startswith(f"freed {dry['blocks']} blocks: ")
    assert fs.store_block_bytes() <= with_removed - 8 * MiB
    assert _json(fs, "gc", m, "--now", "+32d")["blocks"] == 0
    fs.check("cloudfs", "drop-cache", m)
    assert (m / "doc").read_bytes() == contents[-1]
    assert (m / ".cloudfs" / "versions" / "doc" / "3").read_bytes() == contents[-1]

    # without a trash, an unlink frees at once
    assert fs.check("cloudfs", "retention", m, "trash=0").stdout.strip() == (
        "keep-all=1d,hourly=1w,daily=30d,trash=0s"
    )
    (m / "tmp").write_bytes(b"temporary")
    os.unlink(m / "tmp")
    assert _json(fs, "trash", "list", m) == []
    r = fs.run("cloudfs", "retention", m, "hourly=forever,daily=2d")
    assert r.returncode != 0 and "keep-all <= hourly <= daily" in r.stderr
    fs.remount()
    assert (m / "doc").read_bytes() == contents[-1]


def test_the_daemon_applies_retention_in_the_background(fs: CloudFS) -> None:
    m = fs.mnt
    fs.check("cloudfs", "retention", m, "trash=1d")
    (m / "gone").write_bytes(os.urandom(3 * MiB))
    (m / "kept").write_bytes(b"kept" * 1000)
    fs.flush()
    before = fs.store_block_bytes()
    os.unlink(m / "gone")
    fs.unmount()
    fs.kill_daemon()
    env = {**fs.env, "CLOUDFS_TEST_CLOCK_OFFSET_S": str(2 * DAY),
           "CLOUDFS_REMOVER_INTERVAL_S": "0.5", "CLOUDFS_GC_GRACE_S": "0"}  # fmt: skip
    fs.mount(env=env)
    wait_for(lambda: fs.store_block_bytes() <= before - 3 * MiB, timeout=60,
             what="the removed file's blocks leave the store")  # fmt: skip
    assert _json(fs, "trash", "list", m) == []
    status = fs.stat_json()["daemon"]
    assert status["remover_rounds"] >= 1
    assert (m / "kept").read_bytes() == b"kept" * 1000
    time.sleep(1)
    fs.check("cloudfs", "drop-cache", m)
    assert (m / "kept").read_bytes() == b"kept" * 1000


def test_mkfs_takes_a_policy(make_fs) -> None:  # type: ignore[no-untyped-def]
    fs = make_fs(mkfs=False, mount=False)
    r = fs.run("mkfs.cloudfs", fs.storage_url, "--cachedir", fs.cache, "--retention", "trash=x")
    assert r.returncode != 0 and "not a duration" in r.stderr
    assert not (fs.store / "superblock").exists()
    fs.mkfs("--retention", "keep-all=2h,hourly=2d,daily=forever,trash=7d")
    fs.mount()
    assert fs.check("cloudfs", "retention", fs.mnt).stdout.strip() == (
        "keep-all=2h,hourly=2d,daily=forever,trash=1w"
    )


def test_the_daemons_purge_leaves_a_file_the_mount_has_open(fs: CloudFS) -> None:
    """The daemon purges the trash outside the mount: an unlinked file still open
    there keeps its data (open_inodes) until its last close, then is freed."""
    m = fs.mnt
    fs.check("cloudfs", "retention", m, "trash=1d")
    fs.unmount()
    fs.kill_daemon()
    env = {**fs.env, "CLOUDFS_TEST_CLOCK_OFFSET_S": str(2 * DAY),
           "CLOUDFS_REMOVER_INTERVAL_S": "0.5", "CLOUDFS_GC_GRACE_S": "0"}  # fmt: skip
    fs.mount(env=env)
    data = os.urandom(3 * MiB)
    (m / "open").write_bytes(data)
    fs.flush()
    before = fs.store_block_bytes()
    with open(m / "open", "rb") as f:
        os.unlink(m / "open")
        wait_for(lambda: _json(fs, "trash", "list", m) == [], timeout=120,
                 what="the daemon purges the trash")  # fmt: skip
        rounds = fs.stat_json()["daemon"]["remover_rounds"]
        wait_for(lambda: fs.stat_json()["daemon"]["remover_rounds"] >= rounds + 2,
                 timeout=120, what="two more rounds of the remover")  # fmt: skip
        assert fs.store_block_bytes() == before, "the open file's blocks were collected"
        fs.check("cloudfs", "drop-cache", m)
        assert f.read() == data
    wait_for(lambda: fs.store_block_bytes() <= before - 3 * MiB, timeout=120,
             what="the closed file's blocks leave the store")  # fmt: skip
