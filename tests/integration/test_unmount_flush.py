"""After an unmount the daemon finishes the uploads on its own and then exits; `cloudfs
status` is `cloudfs stat`; `cloudfs flush` shows the uploads going down on a terminal
and prints nothing otherwise."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # the fixtures' type
    from conftest import CloudFS

pytestmark = [pytest.mark.timeout(300), pytest.mark.store_kinds("local", "s3")]

MiB = 1 << 20


def pending_blocks(fs: CloudFS) -> int:
    """Pending blocks per the metadata (read directly: the daemon may be stopped)."""
    with fs.metadata_db() as db:
        return int(db.execute("SELECT COUNT(*) FROM blocks WHERE state = 0").fetchone()[0])


def test_unmount_returns_while_the_daemon_uploads(fs: CloudFS) -> None:
    files = {f"f{i}": os.urandom(8 * MiB) for i in range(6)}
    daemon = fs.daemon_pid()
    assert daemon is not None
    os.kill(daemon, signal.SIGSTOP)  # the uploads wait until after the unmount
    try:
        for name, data in files.items():
            (fs.mnt / name).write_bytes(data)
        started = time.monotonic()
        assert fs.unmount() in (0, None)  # waits until the mount process exited
        unmount_s = time.monotonic() - started
        pending = pending_blocks(fs)
    finally:
        os.kill(daemon, signal.SIGCONT)
    assert pending >= 12, "the uploads were done before the unmount"
    assert unmount_s < 20, f"the mount process took {unmount_s:.1f} s to exit"
    # the daemon uploads everything, then exits: no mount uses it and nothing is left
    fs.wait_daemon_gone(90)
    assert pending_blocks(fs) == 0
    assert not (fs.cache / "daemon.sock").exists()
    assert "idle for" in (fs.cache / "daemon.log").read_text()
    fs.drop_cached_blocks()
    fs.mount()
    for name, data in files.items():
        assert (fs.mnt / name).read_bytes() == data


@pytest.mark.store_kinds("local")  # store-independent: the mount's own logic
def test_status_is_stat(fs: CloudFS) -> None:
    (fs.mnt / "f").write_bytes(b"x" * 5000)
    fs.flush()
    stat = json.loads(fs.check("cloudfs", "stat", "--json", fs.mnt).stdout)
    status = json.loads(fs.check("cloudfs", "status", "--json", fs.mnt).stdout)
    for report in (stat, status):
        report.pop("daemon")
    assert status == stat and status["files"] == 1 and status["pending_uploads"] == 0
    text = fs.check("cloudfs", "status", fs.mnt).stdout
    assert re.search(r"^pending uploads +0 blocks", text, re.MULTILINE), text


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _wait_until_idle(pid: int, timeout: float) -> None:
    """Until process `pid` has started (used some CPU) and then used none for half a
    second: it waits for something (here: the stopped daemon's answer)."""
    deadline = time.monotonic() + timeout
    last, quiet = _cpu_ticks(pid), 0
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = _cpu_ticks(pid)
        quiet = quiet + 1 if now == last and now >= 10 else 0
        if quiet >= 2:
            return
        last = now
    raise AssertionError(f"process {pid} did not settle within {timeout:.0f} s")


def test_flush_progress_on_a_terminal(fs: CloudFS) -> None:
    daemon = fs.daemon_pid()
    assert daemon is not None
    os.kill(daemon, signal.SIGSTOP)  # until the flush has begun: it sees it all go up
    try:
        for i in range(6):
            (fs.mnt / f"f{i}").write_bytes(os.urandom(25 * MiB))
    except BaseException:
        os.kill(daemon, signal.SIGCONT)
        raise
    master, slave = pty.openpty()
    cloudfs = str(Path(sys.executable).parent / "cloudfs")
    proc = subprocess.Popen([cloudfs, "flush", str(fs.mnt)], env=fs.env,
                            stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)  # fmt: skip
    os.close(slave)
    shown = b""
    try:
        # the daemon goes on once the flush waits for it (started, then idle), and
        # is paused again whenever the bar shows a new count, until it showed a few:
        # a loaded machine must not let it upload everything between two frames
        _wait_until_idle(proc.pid, timeout=120)
        os.kill(daemon, signal.SIGCONT)
        paused_at: list[bytes] = []
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if select.select([master], [], [], 0.05)[0]:
                try:
                    shown += os.read(master, 65536)
                except OSError:
                    break
                counts = re.findall(rb"\] (\d+) blocks", shown)
                if counts and len(paused_at) < 3 and counts[-1] not in paused_at:
                    paused_at.append(counts[-1])
                    os.kill(daemon, signal.SIGSTOP)
                    time.sleep(0.3)
                    os.kill(daemon, signal.SIGCONT)
        out, _ = proc.communicate(timeout=60)
    finally:
        os.kill(daemon, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert proc.returncode == 0 and out == b""
    frames = re.findall(rb"\r\x1b\[Kflush \[([#.]{30})\] (\d+) blocks \(([^)]*)\) to upload", shown)
    assert len(frames) >= 2, shown
    counts = [int(n) for _bar, n, _bytes in frames]
    assert counts[0] > counts[-1] and counts == sorted(counts, reverse=True), counts
    assert frames[0][0].count(b"#") < frames[-1][0].count(b"#")
    assert shown.endswith(b"\r\x1b[K")  # the line is cleared at the end
    assert fs.stat_json()["pending_uploads"] == 0
    # not a terminal: nothing at all
    (fs.mnt / "g").write_bytes(os.urandom(MiB))
    r = fs.check("cloudfs", "flush", fs.mnt)
    assert r.stdout == "" and r.stderr == ""
