"""Helpers of the history tests: what a user sees of a tree, and a tree to look at."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

MiB = 1 << 20


def tree_state(root: Path) -> dict[str, tuple]:
    """What a user sees of a tree: per relative path its type, mode, size, nlink, the
    sha256 of a file, the target of a symlink and its xattrs."""
    state: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                state[rel] = ("link", os.readlink(p))
                continue
            xattrs = tuple(sorted((n, os.getxattr(p, n)) for n in os.listxattr(p)))
            if stat.S_ISDIR(st.st_mode):
                state[rel] = ("dir", st.st_mode, st.st_nlink, st.st_uid, st.st_gid, xattrs)
            else:
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                state[rel] = ("file", st.st_mode, st.st_size, st.st_nlink, st.st_mtime_ns,
                              digest, xattrs)  # fmt: skip
    return state


def make_tree(root: Path, files: int = 60, big: int = 24 * MiB, *, hard_link: bool = True) -> None:
    """Directories (one empty), a big file, many small ones, an empty file with old
    times, a symlink, xattrs, and (unless not `hard_link`) two names of one file."""
    root.mkdir()
    (root / "docs" / "deep" / "er").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "big.bin").write_bytes(os.urandom(big))
    for i in range(files):
        d = root / "docs" if i % 2 else root / "docs" / "deep"
        (d / f"f{i:03d}.txt").write_bytes(os.urandom(1000 + 997 * i))
    (root / "empty").write_bytes(b"")
    os.chmod(root / "docs" / "f001.txt", 0o600)
    os.symlink("docs/f001.txt", root / "link")
    if hard_link:
        os.link(root / "docs" / "f003.txt", root / "docs" / "deep" / "er" / "hard")
    os.setxattr(root / "docs", "user.tag", b"directory tag")
    os.setxattr(root / "big.bin", "user.sum", b"\x00\xff binary")
    os.utime(root / "empty", ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
