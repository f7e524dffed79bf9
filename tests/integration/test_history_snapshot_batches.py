"""`cloudfs snapshot create` writes its copy in batches (issue 6): the mount is made to
use batches of 20 inodes, so that the small trees here take many write transactions.
A copy taken while another process keeps changing the source still shows the source
at one instant, and on a terminal the command shows a progress bar."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from historyutil import on_a_terminal

if TYPE_CHECKING:
    from conftest import CloudFS

pytestmark = pytest.mark.timeout(300)

#: inodes per write transaction of a copy, for the mounts of these tests
BATCH = 20
#: directories of the source the writer cycles through
DIRS = 10
V_SIZE = 4096

#: the other process: step n writes n into d<n % DIRS>/v in place (fsync: committed
#: before step n+1 begins), then renames the one `token` file into that directory.
#: Stops when `stop` appears; prints how many steps it made.
WRITER = textwrap.dedent(
    """
    import os, sys
    src, stop, started = sys.argv[1], sys.argv[2], sys.argv[3]
    DIRS, SIZE = %d, %d
    n = DIRS
    while not os.path.exists(stop):
        d = n %% DIRS
        fd = os.open(f"{src}/d{d:02d}/v", os.O_WRONLY)
        os.write(fd, b"%%-16d" %% n * (SIZE // 16))
        os.fsync(fd)
        os.close(fd)
        os.rename(f"{src}/d{(n - 1) %% DIRS:02d}/token", f"{src}/d{d:02d}/token")
        if n == DIRS:
            open(started, "w").close()
        n += 1
    print(n - DIRS)
    """
    % (DIRS, V_SIZE)
)


def _mount_with_small_batches(make_fs: Callable[..., CloudFS], pause_s: float) -> CloudFS:
    """A mount that copies BATCH inodes per transaction and waits `pause_s` between two."""
    fs = make_fs(mount=False)
    env = {"CLOUDFS_TEST_SNAPSHOT_BATCH": str(BATCH), "CLOUDFS_TEST_SNAPSHOT_PAUSE_S": str(pause_s)}
    fs.mount(env={**fs.env, **env})
    return fs


def _newest(src: Path) -> int:
    """About how many steps the writer has made (racy: for the test's log only)."""
    return max(int((src / f"d{d:02d}" / "v").read_bytes()[:16] or b"0") for d in range(DIRS))


def _source(src: Path, files_per_dir: int) -> int:
    """d00..d09, each with `files_per_dir` small files and a file v holding its number;
    the token in the last directory. The number of entries below `src`."""
    for d in range(DIRS):
        sub = src / f"d{d:02d}"
        sub.mkdir(parents=True)
        (sub / "v").write_bytes(b"%-16d" % d * (V_SIZE // 16))
        for i in range(files_per_dir):
            (sub / f"f{i:03d}").write_bytes(b"%d/%d\n" % (d, i))
    (src / f"d{DIRS - 1:02d}" / "token").write_bytes(b"token")
    return DIRS * (files_per_dir + 2) + 2  # with src itself


def _check_one_instant(copy: Path) -> tuple[int, int]:
    """The writer's invariants hold in `copy`; (lowest, highest) value of the v files."""
    values = {}
    for d in range(DIRS):
        data = (copy / f"d{d:02d}" / "v").read_bytes()
        assert len(data) == V_SIZE, f"d{d:02d}/v has {len(data)} bytes"
        n = int(data[:16])
        assert data == b"%-16d" % n * (V_SIZE // 16), f"d{d:02d}/v mixes two writes"
        assert n % DIRS == d
        values[d] = n
    low, high = min(values.values()), max(values.values())
    # at one instant the files hold the last DIRS steps made (one may be under way)
    assert sorted(values.values()) == list(range(low, low + DIRS)), values
    tokens = [d for d in range(DIRS) if (copy / f"d{d:02d}" / "token").exists()]
    # the token follows the newest write, or is about to
    assert len(tokens) == 1 and tokens[0] in (high % DIRS, (high - 1) % DIRS), (tokens, high)
    return low, high


def test_a_copy_taken_while_the_source_changes_is_one_instant(
    make_fs: Callable[..., CloudFS],
) -> None:
    # each copy lasts at least 12 * 0.05 s, long enough for the writer to make steps
    fs = _mount_with_small_batches(make_fs, pause_s=0.05)
    m = fs.mnt
    entries = _source(m / "src", files_per_dir=20)  # 222 entries: 12 batches
    stop, started = fs.root / "stop-writer", fs.root / "writer-started"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(m / "src"), str(stop), str(started)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert writer.poll() is None, "the writer ended early"
            assert time.monotonic() < deadline, "the writer made no step in 120 s"
            time.sleep(0.05)
        highs = []
        for k in range(3):
            before = _newest(m / "src")
            r = fs.check("cloudfs", "snapshot", "create", m / "src", m / f"copy{k}")
            assert f"{entries} entries" in r.stdout, r.stdout
            # not asserted (timing): the writer's steps while the copy was made
            print(f"copy{k}: the writer went from about {before} to {_newest(m / 'src')}")
            highs.append(_check_one_instant(m / f"copy{k}")[1])
    finally:
        stop.touch()
        try:
            out, _ = writer.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            writer.kill()
            writer.communicate()
            raise
    assert writer.returncode == 0
    steps = int(out)
    assert steps >= 1
    # the source went on changing after the copies, and the copies did not follow it
    final = _check_one_instant(m / "src")[1]
    assert final >= max(highs)
    assert [_check_one_instant(m / f"copy{k}")[1] for k in range(3)] == highs
    # the files not touched by the writer are in every copy, and the copy is whole
    for k in range(3):
        names = sorted(p.name for p in (m / f"copy{k}" / "d03").iterdir())
        assert names == sorted(["v", *(f"f{i:03d}" for i in range(20))] + (
            ["token"] if (m / f"copy{k}" / "d03" / "token").exists() else []
        ))
        assert (m / f"copy{k}" / "d07" / "f019").read_bytes() == b"7/19\n"


def test_snapshot_progress_baron_a_terminal(make_fs: Callable[..., CloudFS]) -> None:
    # a copy lasts at least 7 * 0.2 s: the command looks at its progress every 0.25 s
    fs = _mount_with_small_batches(make_fs, pause_s=0.2)
    m = fs.mnt
    entries = _source(m / "src", files_per_dir=10)  # 122 entries: 7 batches
    shown = on_a_terminal(fs, "snapshot", "create", m / "src", m / "copy")
    assert f"snapshot: [{'#' * 30}] {entries}/{entries} (100%)" in shown, shown
    # the bar moved while the copy was made: a batch of BATCH inodes at a time
    midway = {int(n) for n in re.findall(r"snapshot: \[[# ]+\] (\d+)/%d " % entries, shown)}
    assert midway - {entries}, shown
    assert all(n % BATCH == 0 for n in midway - {entries}), shown
    assert (m / "copy" / "d05" / "f009").read_bytes() == b"5/9\n"
    shown = on_a_terminal(fs, "snapshot", "create", m / "src", "named")
    assert f"{entries}/{entries} (100%)" in shown, shown
    assert (m / ".cloudfs" / "snapshots" / "named" / "d05" / "f009").read_bytes() == b"5/9\n"
    # not on a terminal: no bar, and the same copy
    r = fs.check("cloudfs", "snapshot", "create", m / "src", m / "copy2")
    assert "[" not in r.stderr and f"{entries} entries" in r.stdout
    assert (m / "copy2" / "d05" / "f009").read_bytes() == b"5/9\n"
