"""The trash on a real mount (issue 6): unlinked files and removed trees stay
recoverable with their paths; `rm -rf` then `cloudfs trash restore` gives back the
identical tree; purging frees them."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from typing import TYPE_CHECKING

import pytest
from historyutil import MiB, make_tree, on_a_terminal, tree_state
from posixutil import block_refcounts, expect_errno, wait_for

if TYPE_CHECKING:
    from conftest import CloudFS

pytestmark = pytest.mark.timeout(600)


def _trash(fs: CloudFS) -> list[dict]:
    return json.loads(fs.check("cloudfs", "trash", "list", "--json", fs.mnt).stdout)


def test_rm_rf_then_restore_gives_the_identical_tree(fs: CloudFS) -> None:
    m = fs.mnt
    make_tree(m / "project", files=40, big=8 * MiB, hard_link=False)
    (m / "keep").write_bytes(b"not removed")
    before = tree_state(m / "project")
    subprocess.run(["rm", "-rf", m / "project"], check=True)
    assert not (m / "project").exists()
    listed = _trash(fs)
    assert len(listed) == len(before) + 1  # every file and directory, and the top
    assert {e["path"] for e in listed} == {"/project"} | {f"/project/{p}" for p in before}
    assert {e["type"] for e in listed} == {"dir", "file", "symlink"}
    table = fs.check("cloudfs", "trash", "list", m).stdout
    assert "/project/big.bin" in table and table.split()[:5] == [
        "ID",
        "DELETED",
        "TYPE",
        "SIZE",
        "PATH",
    ]
    below = json.loads(
        fs.check("cloudfs", "trash", "list", "--json", m / "project" / "docs").stdout
    )
    assert below and all(e["path"].startswith("/project/docs") for e in below)

    r = fs.check("cloudfs", "trash", "restore", m / "project")
    assert f"restored {len(before) + 1} entries" in r.stdout
    assert tree_state(m / "project") == before
    assert _trash(fs) == []
    fs.remount()
    assert tree_state(m / "project") == before
    assert (m / "keep").read_bytes() == b"not removed"


def _dir_mtimes(root: os.PathLike[str]) -> dict[str, int]:
    return {
        os.path.relpath(d, root): os.stat(d).st_mtime_ns for d, _dirs, _files in os.walk(root)
    }


def test_restore_gives_back_one_removal_with_links_and_directory_times(fs: CloudFS) -> None:
    """A hard-linked file comes back with all its names, directories with their
    mtimes, and a file deleted from the tree earlier (another command) stays out."""
    m = fs.mnt
    make_tree(m / "project", files=8, big=MiB)  # docs/f003.txt is also docs/deep/er/hard
    os.link(m / "project" / "docs" / "f005.txt", m / "outside")  # a name outside the tree
    os.unlink(m / "project" / "docs" / "f001.txt")  # earlier, by this process
    for n, (d, _dirs, _files) in enumerate(os.walk(m / "project")):
        os.utime(d, ns=(1_600_000_000_000_000_000 + n, 1_600_000_000_000_000_000 + n * 1000))
    before, mtimes = tree_state(m / "project"), _dir_mtimes(m / "project")
    assert before["docs/f003.txt"][3] == 2 and before["docs/f005.txt"][3] == 2
    subprocess.run(["rm", "-rf", m / "project"], check=True)

    r = fs.check("cloudfs", "trash", "restore", m / "project")
    assert f"restored {len(before) + 1} entries" in r.stdout  # every name, and the top
    assert tree_state(m / "project") == before
    assert _dir_mtimes(m / "project") == mtimes
    assert os.stat(m / "outside").st_nlink == 2
    assert [e["path"] for e in _trash(fs)] == ["/project/docs/f001.txt"]
    fs.remount()
    assert tree_state(m / "project") == before
    assert _dir_mtimes(m / "project") == mtimes
    fs.check("cloudfs", "trash", "restore", m / "project" / "docs" / "f001.txt")
    assert (m / "project" / "docs" / "f001.txt").stat().st_size == 1997


def test_unlinked_and_replaced_files_are_kept(fs: CloudFS) -> None:
    m = fs.mnt
    (m / "d").mkdir()
    (m / "d" / "a.txt").write_bytes(b"version one")
    (m / "d" / "a.txt").write_bytes(b"version two")
    os.unlink(m / "d" / "a.txt")
    (m / "d" / "a.txt").write_bytes(b"a new file of the same name")
    # a file replaced by a rename (an editor's save) goes to the trash too
    (m / "d" / "b.txt").write_bytes(b"before the save")
    (m / "d" / "b.txt.tmp").write_bytes(b"after the save")
    os.rename(m / "d" / "b.txt.tmp", m / "d" / "b.txt")
    # data written to an open file after its unlink is kept as well
    with open(m / "d" / "c.txt", "wb") as f:
        f.write(b"written before")
        os.unlink(m / "d" / "c.txt")
        f.write(b" and after the unlink")
    paths = [e["path"] for e in _trash(fs)]
    assert paths == ["/d/a.txt", "/d/b.txt", "/d/c.txt"]

    r = fs.run("cloudfs", "trash", "restore", m / "d" / "a.txt")
    assert r.returncode != 0 and "exists" in r.stderr
    fs.check("cloudfs", "trash", "restore", m / "d" / "a.txt", "--to", m / "d" / "a.old")
    assert (m / "d" / "a.old").read_bytes() == b"version two"
    # its versions came back with it
    versions = json.loads(fs.check("cloudfs", "versions", "--json", m / "d" / "a.old").stdout)
    assert [v["size"] for v in versions] == [11, 11]
    os.unlink(m / "d" / "b.txt")
    b_id = next(e["id"] for e in _trash(fs) if e["path"] == "/d/b.txt")  # the older one
    fs.check("cloudfs", "trash", "restore", m / "d" / "b.txt", "--id", str(b_id))
    assert (m / "d" / "b.txt").read_bytes() == b"before the save"
    fs.check("cloudfs", "trash", "restore", m / "d" / "b.txt", "--to", m / "b.saved")
    assert (m / "b.saved").read_bytes() == b"after the save"
    fs.check("cloudfs", "trash", "restore", m / "d" / "c.txt")
    assert (m / "d" / "c.txt").read_bytes() == b"written before and after the unlink"
    assert _trash(fs) == []

    r = fs.run("cloudfs", "trash", "restore", m / "d" / "never")
    assert r.returncode != 0 and "nothing in the trash" in r.stderr
    # the directories above come back when the trash holds them (only themselves)
    (m / "t" / "u").mkdir(parents=True)
    (m / "t" / "u" / "f").write_bytes(b"f")
    (m / "t" / "other").write_bytes(b"o")
    shutil.rmtree(m / "t")
    fs.check("cloudfs", "trash", "restore", m / "t" / "u" / "f")
    assert (m / "t" / "u" / "f").read_bytes() == b"f"
    assert sorted(os.listdir(m / "t")) == ["u"]
    fs.check("cloudfs", "trash", "restore", m / "t" / "other")
    assert sorted(os.listdir(m / "t")) == ["other", "u"]
    os.unlink(m / "t" / "other")
    r = fs.run("cloudfs", "trash", "restore", m / "t" / "other", "--to", m / "nowhere" / "x")
    assert r.returncode != 0 and "the directory /nowhere does not exist" in r.stderr
    expect_errno(errno.ENOENT, os.stat, m / "t" / "v")


def test_purge_frees(fs: CloudFS) -> None:
    m = fs.mnt
    (m / "big").write_bytes(os.urandom(6 * MiB))
    (m / "small").write_bytes(b"small")
    fs.flush()
    referenced = fs.stat_json()["referenced_bytes"]
    os.unlink(m / "big")
    stats = fs.stat_json()
    assert stats["referenced_bytes"] == referenced, "kept in the trash"
    assert (stats["trash_entries"], stats["trash_bytes"]) == (1, 6 * MiB)
    assert "1 entries (6.0 MiB of files)" in fs.check("cloudfs", "stat", m).stdout
    r = fs.check("cloudfs", "trash", "purge", m, "--older-than", "1h")
    assert "purged 0 entries" in r.stdout
    # an open file purged from the trash is freed at its last close
    with open(m / "small", "rb") as f:
        os.unlink(m / "small")
        r = fs.check("cloudfs", "trash", "purge", m)
        assert "purged 2 entries" in r.stdout
        assert f.read() == b"small"
    wait_for(lambda: fs.stat_json()["referenced_bytes"] == 0, what="blocks released")
    assert all(n == 0 for n in block_refcounts(fs).values())
    assert _trash(fs) == []
    assert fs.check("cloudfs", "trash", "list", m).stdout.strip() == "the trash is empty"
    assert (fs.stat_json()["trash_entries"], fs.stat_json()["trash_bytes"]) == (0, 0)


def test_progress_barson_a_terminal(fs: CloudFS) -> None:
    m = fs.mnt
    for i in range(3):
        (m / f"f{i}").write_bytes(os.urandom(1000) * (i + 1))
    fs.flush()
    for i in range(3):
        os.unlink(m / f"f{i}")
    assert "trash purge: [" in on_a_terminal(fs, "trash", "purge", m)
    assert _trash(fs) == []
    shown = on_a_terminal(fs, "gc", m, "--grace", "0")
    assert "gc: [" in shown and "3/3 (100%)" in shown
    # not on a terminal: no bar
    r = fs.check("cloudfs", "gc", m, "--grace", "0")
    assert "[" not in r.stderr
