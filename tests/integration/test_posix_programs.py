"""Programs that lean on POSIX corners, run on a real mount (issue 3): git, tar, rsync,
cp -a and sqlite3 in WAL mode (shared memory through a mapped -shm file)."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from posixutil import MiB, fill

if TYPE_CHECKING:
    from conftest import CloudFS


def _run(*args: str | Path, cwd: Path | None = None) -> str:
    r = subprocess.run([str(a) for a in args], check=False, cwd=cwd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(map(str, args))} exited {r.returncode}:\n{r.stderr}"
    return r.stdout


def _sample_tree(root: Path) -> None:
    (root / "src" / "deep").mkdir(parents=True)
    (root / "src" / "big.bin").write_bytes(fill(3 * MiB, 1))
    (root / "src" / "deep" / "text.txt").write_text("line\n" * 1000)
    (root / "src" / "exec.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "src" / "exec.sh", 0o755)
    os.symlink("deep/text.txt", root / "src" / "link")
    os.link(root / "src" / "big.bin", root / "src" / "hard.bin")
    with open(root / "src" / "sparse", "wb") as f:
        f.seek(50 * MiB)
        f.write(b"end")
    os.mkfifo(root / "src" / "fifo")
    os.setxattr(root / "src" / "big.bin", "user.tag", b"kept")
    # times in the past, each its own: a copy must set them (rsync leaves a special
    # file's time alone when it already matches to the second)
    for i, p in enumerate(sorted(root.rglob("*"), reverse=True)):
        t = 1_500_000_000_123_456_789 + i * 1_000_000_007
        os.utime(p, ns=(t, t), follow_symlinks=False)


def _describe(root: Path) -> dict[str, tuple[object, ...]]:
    """What a faithful copy keeps: type, mode, size, mtime, link target, content, xattrs,
    and which names are hard links of each other."""
    out: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            first = inodes.setdefault(st.st_ino, rel) if st.st_nlink > 1 else rel
            kind = stat.S_IFMT(st.st_mode)
            content: object = None
            if stat.S_ISREG(st.st_mode):
                content = hash(p.read_bytes())
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(p)
            xattrs = () if stat.S_ISLNK(st.st_mode) else tuple(sorted(os.listxattr(p)))
            mtime = None if stat.S_ISDIR(st.st_mode) else st.st_mtime_ns
            size = None if stat.S_ISDIR(st.st_mode) else st.st_size
            out[rel] = (kind, stat.S_IMODE(st.st_mode), size, mtime, content, xattrs, first)
    return out


def test_tar_rsync_and_cp_round_trips(fs: CloudFS, tmp_path: Path) -> None:
    local = tmp_path / "local"
    _sample_tree(local)
    expected = _describe(local / "src")
    m = fs.mnt
    _run("tar", "--xattrs", "--xattrs-include=*", "-cSf", m / "a.tar", "-C", local, "src")
    (m / "untarred").mkdir()
    _run("tar", "--xattrs", "--xattrs-include=*", "-xSf", m / "a.tar", "-C", m / "untarred")
    _run("rsync", "-aHAXS", f"{local / 'src'}/", f"{m / 'rsynced'}/")
    _run("cp", "-a", local / "src", m / "copied")
    for name in ("untarred/src", "rsynced", "copied"):
        assert _describe(m / name) == expected, name
    # rsync finds nothing to do the second time, and back to the local disk is faithful
    out = _run("rsync", "-aHAXSi", "--checksum", f"{local / 'src'}/", f"{m / 'rsynced'}/")
    assert out == "", f"rsync saw differences:\n{out}"
    _run("rsync", "-aHAXS", f"{m / 'rsynced'}/", f"{tmp_path / 'back'}/")
    assert _describe(tmp_path / "back") == expected
    fs.remount()
    for name in ("untarred/src", "rsynced", "copied"):
        assert _describe(m / name) == expected, f"{name} after a remount"


def test_git(fs: CloudFS, tmp_path: Path) -> None:
    repo = fs.mnt / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "-c", "gc.auto=0"]
    _run(*git, "init", "-q", cwd=repo)
    for i in range(20):
        (repo / f"file{i}.txt").write_text(f"content {i}\n" * (i + 1))
    (repo / "bin").write_bytes(fill(MiB, 2))
    _run(*git, "add", "-A", cwd=repo)
    _run(*git, "commit", "-qm", "first", cwd=repo)
    for i in range(0, 20, 3):
        (repo / f"file{i}.txt").write_text("changed\n")
    os.rename(repo / "file1.txt", repo / "renamed.txt")
    _run(*git, "add", "-A", cwd=repo)
    _run(*git, "commit", "-qm", "second", cwd=repo)
    _run(*git, "gc", "-q", "--aggressive", cwd=repo)
    _run(*git, "fsck", "--strict", cwd=repo)
    assert _run(*git, "status", "--porcelain", cwd=repo) == ""
    _run(*git, "clone", "-q", repo, fs.mnt / "clone")
    _run(*git, "clone", "-q", repo, tmp_path / "local-clone")
    assert _run("git", "log", "--format=%s", cwd=fs.mnt / "clone") == "second\nfirst\n"
    assert (fs.mnt / "clone" / "bin").read_bytes() == fill(MiB, 2)
    fs.remount()
    _run(*git, "fsck", "--strict", cwd=repo)
    assert _run(*git, "status", "--porcelain", cwd=repo) == ""


def test_sqlite_wal(fs: CloudFS) -> None:
    path = fs.mnt / "db.sqlite"
    writer = sqlite3.connect(path)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)")
    reader = sqlite3.connect(path)
    for batch in range(10):
        with writer:
            writer.executemany(
                "INSERT INTO t (v) VALUES (?)", [(os.urandom(200),) for _ in range(500)]
            )
        # another connection sees each commit through the shared -shm mapping
        assert reader.execute("SELECT COUNT(*) FROM t").fetchone() == ((batch + 1) * 500,)
    writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert writer.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    reader.close()
    writer.close()
    fs.remount()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert db.execute("SELECT COUNT(*) FROM t").fetchone() == (5000,)
    db.close()
