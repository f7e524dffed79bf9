"""`cloudfs bench` with tiny sizes on a plain directory, on a cloudfs mount (with the
plain directory as baseline) and on the bare passthrough filesystem
(tools/passthroughfs.py): every figure is reported with a sane value, the progress
display shows on a terminal only, and the bench leaves nothing behind."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # the fixtures' type; conftest is not importable as a module
    from conftest import CloudFS

pytestmark = pytest.mark.timeout(300)

MiB = 1 << 20
TINY = ["--big-size", "8M", "--small-count", "50"]

RATES = ["write_mb_s", "stored_mb_s", "warm_read_mb_s", "cold_read_mb_s", "copy_mb_s",
         "text_write_mb_s", "text_stored_mb_s", "create_per_s", "stat_per_s", "read_per_s",
         "rename_per_s", "unlink_per_s", "mkdir_per_s", "rmdir_per_s"]  # fmt: skip
FIGURES = [*RATES, "stored_s", "stored_ratio", "copy_stored_bytes", "text_stored_ratio",
           "text_zlib6_ratio", "edit_stored_bytes"]  # fmt: skip


def _cloudfs() -> str:
    return str(Path(sys.executable).parent / "cloudfs")


def bench(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`cloudfs bench ARGS`; `env`: a filesystem's (the MySQL password the user has)."""
    return subprocess.run(
        [_cloudfs(), "bench", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def bench_json(*args: str | Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    r = bench(*args, *TINY, "--json", env=env)
    assert r.returncode == 0, r.stderr + r.stdout
    assert r.stderr == ""  # no progress display when stderr is not a terminal
    return json.loads(r.stdout)


def check_figures(figures: dict[str, float | None], *, big: int = 8 * MiB) -> None:
    """Every figure is there with a value a working filesystem can give."""
    assert sorted(figures) == sorted(FIGURES)
    for key in RATES:
        assert isinstance(figures[key], float) and figures[key] > 0, key
    assert figures["stored_s"] > 0
    assert figures["stored_mb_s"] <= figures["write_mb_s"] * 1.0001
    assert 0.2 < figures["text_zlib6_ratio"] < 0.5  # text-like: zlib shrinks it 2-5x
    assert figures["stored_ratio"] > 0.95  # random data does not compress
    assert figures["copy_stored_bytes"] >= 0
    assert figures["edit_stored_bytes"] >= 0


def check_plain_figures(figures: dict[str, float | None]) -> None:
    check_figures(figures)
    # a plain directory stores every byte once more, whatever it is
    assert 0.99 < figures["stored_ratio"] < 1.2
    assert 0.99 < figures["text_stored_ratio"] < 1.2
    assert 8 * MiB <= figures["copy_stored_bytes"] < 10 * MiB
    assert 8 * MiB <= figures["edit_stored_bytes"] < 10 * MiB
    # on a plain directory fsync is storing
    assert figures["stored_mb_s"] == pytest.approx(figures["write_mb_s"], rel=1e-3)


def test_plain_directory(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    report = bench_json(plain)
    assert report["kind"] == "plain" and report["dir"] == str(plain)
    assert report["params"]["big_size"] == 8 * MiB and report["params"]["small_count"] == 50
    assert report["params"]["edit_size"] == 8 * MiB  # at most the big size
    assert report["cold_read"] in ("drop_caches", "fadvise")
    assert report["baseline"] is None and report["ratios"] is None
    check_plain_figures(report["figures"])
    assert list(plain.iterdir()) == []  # the bench removed its files

    # the table names every figure
    r = bench(plain, *TINY, "--threads", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"cloudfs bench: {plain} (plain, ")
    for label in ("big file write (1 MiB writes + fsync)", "cold read", "small files: create",
                  "text zlib-6 / logical (yardstick)", "rmdir"):  # fmt: skip
        assert label in r.stdout
    assert list(plain.iterdir()) == []


def test_progress_on_a_terminal(tmp_path: Path) -> None:
    """On a terminal, stderr shows a self-rewriting progress line; stdout stays the
    table."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [_cloudfs(), "bench", str(tmp_path), *TINY],
        stdout=subprocess.PIPE,
        stderr=slave,
        stdin=subprocess.DEVNULL,
    )
    os.close(slave)
    shown = b""
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    shown += os.read(master, 65536)
                except OSError:
                    break
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert proc.returncode == 0
    assert b"\r\x1b[K" in shown and b"big file: write" in shown and b"small files: read" in shown
    assert out.decode().startswith("cloudfs bench: ")


def test_bad_directory(tmp_path: Path) -> None:
    r = bench(tmp_path / "missing")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cloudfs: ")
    assert lines[0].endswith(f"{tmp_path / 'missing'} is not a directory")
    r = bench(tmp_path, "--big-size", "lots")
    assert r.returncode != 0 and r.stdout == ""


def test_cloudfs_mount_beside_a_plain_directory(fs: CloudFS, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (fs.mnt / "sub").mkdir()
    fetched = fs.stat_json()["daemon"]["fetched"]
    report = bench_json(fs.mnt / "sub", "--baseline", plain, env=fs.env)
    assert report["kind"] == "cloudfs" and report["fstype"] == "fuse.cloudfs"
    assert report["cold_read"].startswith("cloudfs drop-cache + ")
    f = report["figures"]
    check_figures(f)
    # random data costs its size (plus headers and tags); text compresses like zlib-6
    assert f["stored_ratio"] < 1.05
    assert f["text_stored_ratio"] < 0.5
    # dedup: a copy stores nothing new, an editor's save only the blocks around the edit
    assert f["copy_stored_bytes"] <= 1 * MiB
    assert f["edit_stored_bytes"] < 6 * MiB
    # the cold read really came from the store: the big file's blocks were fetched
    assert fs.stat_json()["daemon"]["fetched"] - fetched >= 2

    base = report["baseline"]
    assert base["kind"] == "plain" and base["dir"] == str(plain)
    check_plain_figures(base["figures"])
    assert sorted(report["ratios"]) == sorted(FIGURES)
    assert report["ratios"]["write_mb_s"] == pytest.approx(
        f["write_mb_s"] / base["figures"]["write_mb_s"]
    )
    assert list((fs.mnt / "sub").iterdir()) == [] and list(plain.iterdir()) == []
    assert fs.stat_json()["pending_uploads"] == 0


# --- the bare passthrough filesystem ----------------------------------------------------


@pytest.fixture
def passthrough(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """tools/passthroughfs.py serving tmp/under on tmp/pass; always unmounted."""
    under, mnt = tmp_path / "under", tmp_path / "pass"
    under.mkdir()
    mnt.mkdir()
    log = (tmp_path / "passthroughfs.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloudfs.tools.passthroughfs", str(under), str(mnt)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            assert proc.poll() is None, (tmp_path / "passthroughfs.log").read_text()
            assert time.monotonic() < deadline, "passthroughfs did not mount"
            time.sleep(0.05)
        yield under, mnt
    finally:
        if os.path.ismount(mnt):
            r = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, check=False)
            if r.returncode != 0:
                subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        log.close()
    assert code == 0, (tmp_path / "passthroughfs.log").read_text()


def test_passthrough_baseline(passthrough: tuple[Path, Path]) -> None:
    under, mnt = passthrough
    (mnt / "d").mkdir()
    (mnt / "d" / "f").write_bytes(b"through")
    os.rename(mnt / "d", mnt / "e")
    assert (under / "e" / "f").read_bytes() == b"through"
    assert (mnt / "e" / "f").read_bytes() == b"through"
    os.unlink(mnt / "e" / "f")
    os.rmdir(mnt / "e")

    report = bench_json(mnt)
    assert report["kind"] == "plain" and report["fstype"] == "fuse.passthroughfs"
    check_plain_figures(report["figures"])
    assert list(mnt.iterdir()) == [] and list(under.iterdir()) == []
