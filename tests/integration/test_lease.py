"""The mount lease: one machine at a time mounts a filesystem whose metadata is SQLite.
"Another machine" is a second cache dir on the same store (with a copy of the first
one's metadata, as a restore would give it): it is refused with a line naming the
holder, until the holder unmounts, or it takes over with --force after a crash."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # the fixtures' type; conftest is not importable as a module
    from conftest import CloudFS

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.sqlite_only(
        "the mount lease guards SQLite metadata; MySQL is made for several mounts"
    ),
]


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


def pending_block_ids(fs: CloudFS) -> list[str]:
    db = sqlite3.connect(f"file:{fs.cache / 'meta.db'}?mode=ro", uri=True)
    try:
        return [bytes(r[0]).hex() for r in db.execute("SELECT id FROM blocks WHERE state = 0")]
    finally:
        db.close()


def wait_for(what: str, condition: Callable[[], object], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.1)


@pytest.mark.log_errors_expected(r"CRITICAL cloudfs.mount: the mount lease was taken over by")
def test_a_mount_whose_lease_was_taken_stops_writing(make_fs: Callable[..., CloudFS]) -> None:
    """Machine b takes the lease with --force while a still runs: a logs one CRITICAL
    line saying why, every change gets EROFS while reads go on, it seals and backs up
    nothing more, and no daemon of a's cache dir uploads for it any more: not the one
    that was running, nor one started after the takeover."""
    a = make_fs("a", mount=False)
    a.env["CLOUDFS_TEST_LEASE_RENEW_S"] = "0.5"
    a.mount()
    kept = os.urandom(3 << 20)
    (a.mnt / "kept").write_bytes(kept)
    (a.mnt / "dir").mkdir()
    a.flush()
    log = a.cache / "mount.log"

    # blocks still to upload at the takeover: sealed while a's daemon is stopped; it
    # stays stopped until a has noticed, then it dies and the mount starts another
    daemon = a.daemon_pid()
    assert daemon is not None
    os.kill(daemon, signal.SIGSTOP)
    held = os.open(a.mnt / "held", os.O_WRONLY | os.O_CREAT, 0o644)
    stop_writing = threading.Event()
    try:
        (a.mnt / "late").write_bytes(os.urandom(2 << 20))
        wait_for("the last close sealed `late`", lambda: pending_block_ids(a))
        pending = pending_block_ids(a)

        def keep_writing() -> None:
            """Unsealed writes on `held` across the takeover (never idle: not sealed)."""
            while not stop_writing.is_set():
                try:
                    os.write(held, b"written before the takeover\n")
                except OSError:
                    return  # EROFS: a noticed
                time.sleep(0.2)

        writer = threading.Thread(target=keep_writing, daemon=True)
        writer.start()

        b = second_machine(a, make_fs)
        b.mount("--force")
        wait_for("a notices", lambda: "CRITICAL" in log.read_text())
        wait_for("a tells its cache dir", (a.cache / "fenced").exists)
        os.kill(daemon, signal.SIGKILL)
        os.kill(daemon, signal.SIGCONT)
        a.wait_exit(daemon, 30)
        wait_for("a's new daemon is fenced",
                 lambda: (a.stat_json()["daemon"] or {}).get("fenced"))  # fmt: skip
        writer.join(30)
        assert not writer.is_alive()

        critical = [ln for ln in log.read_text().splitlines() if " CRITICAL " in ln]
        assert len(critical) == 1, critical
        assert "the mount lease was taken over by another machine" in critical[0]
        assert f"cache dir {b.cache}" in critical[0] and "read-only" in critical[0]

        # every change: EROFS
        m = a.mnt
        changes: list[tuple[str, Callable[[], object]]] = [
            ("create", lambda: open(m / "new", "wb").close()),
            ("open for writing", lambda: open(m / "kept", "r+b").close()),
            ("write on an open handle", lambda: os.write(held, b"more")),
            ("fsync of unsealed writes", lambda: os.fsync(held)),
            ("truncate", lambda: os.truncate(m / "kept", 1)),
            ("mkdir", lambda: os.mkdir(m / "newdir")),
            ("unlink", lambda: os.unlink(m / "kept")),
            ("rmdir", lambda: os.rmdir(m / "dir")),
            ("rename", lambda: os.rename(m / "kept", m / "moved")),
            ("chmod", lambda: os.chmod(m / "kept", 0o600)),
            ("utime", lambda: os.utime(m / "kept", (1, 1))),
            ("symlink", lambda: os.symlink("kept", m / "link")),
            ("link", lambda: os.link(m / "kept", m / "hard")),
            ("setxattr", lambda: os.setxattr(m / "kept", "user.k", b"v")),
        ]
        wrong = []
        for what, change in changes:
            try:
                change()
            except OSError as exc:
                if exc.errno != errno.EROFS:
                    wrong.append(f"{what}: {errno.errorcode.get(exc.errno or 0)}")
            else:
                wrong.append(f"{what}: succeeded")
        assert not wrong, wrong

        # reads go on
        assert (m / "kept").read_bytes() == kept
        assert sorted(os.listdir(m)) == ["dir", "held", "kept", "late"]
        # `cloudfs flush` cannot succeed here: it says why instead of waiting forever
        r = a.run("cloudfs", "flush", m, timeout=120)
        assert r.returncode == 13, (r.returncode, r.stderr)
        assert r.stderr.startswith("cloudfs: ") and len(r.stderr.strip().splitlines()) == 1
        assert "taken over by another machine" in r.stderr, r.stderr

        # the pending blocks stay pending: no daemon uploaded them
        time.sleep(3)  # several upload scans of the new daemon
        assert pending_block_ids(a) == pending
        stored = {str(k).rsplit("/", 1)[-1] for k in a.block_objects()}
        assert not stored & set(pending), "a's daemon uploaded after the takeover"
    finally:
        stop_writing.set()
        try:
            os.kill(daemon, signal.SIGCONT)
        except ProcessLookupError:
            pass
        try:
            os.close(held)
        except OSError:
            pass
    backups_before = sorted(k for k in a.store_objects() if k.startswith("meta/"))
    a.unmount()
    # no backup of a's (now stale) metadata at its unmount
    assert sorted(k for k in a.store_objects() if k.startswith("meta/")) == backups_before
    assert "metadata backed up" not in log.read_text()
    # b carries on
    assert (b.mnt / "kept").read_bytes() == kept
    (b.mnt / "on-b").write_bytes(b"b writes")
    b.unmount()
    assert lease(a) is None
