"""Model-based test of the POSIX semantics (issue 3): random programs of filesystem
operations run step by step on a cloudfs mount and on a plain directory of the local
disk (the model). After every step the two must agree: the result (return value or
errno), the tree (names, types, permission bits, nlink, size, owner, symlink targets,
xattrs), file contents, and which of mtime and ctime the step changed. A `remount`
step unmounts and mounts again, which must change nothing at all (times included).

Hypothesis shrinks a failing program to a minimal one; every bug found so far is kept
below as an `@example`. The run is bounded for CI (about a minute); set
CLOUDFS_MODEL_EXAMPLES=N to run N random programs instead of the fixed derandomized
set, e.g. CLOUDFS_MODEL_EXAMPLES=2000 for a long hunt.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import itertools
import os
import random
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from posixutil import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2

if TYPE_CHECKING:
    from conftest import CloudFS

MiB = 1 << 20
_LONG_RUN = os.environ.get("CLOUDFS_MODEL_EXAMPLES")
MAX_EXAMPLES = int(_LONG_RUN) if _LONG_RUN else 60
MAX_STEPS = 60

# --- programs ------------------------------------------------------------------------

#: every operation works on these names, relative to the run's root: files and
#: directories compete for them, so every errno case comes up
PATHS = ["a", "b", "d", "d/a", "d/b", "d/d", "d/d/a", "e", "e/a"]
SLOTS = 3  # open file handles per program
OPEN_FLAGS = [
    os.O_RDONLY,
    os.O_WRONLY,
    os.O_RDWR,
    os.O_RDWR | os.O_CREAT,
    os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    os.O_RDWR | os.O_APPEND,
    os.O_RDWR | os.O_CREAT | os.O_EXCL,
]
MODES = [0o644, 0o600, 0o755, 0o4755, 0o2775, 0o1777, 0o000]
XATTR_NAMES = ["user.a", "user.b", "trusted.t", "security.s", "bogus.b"]
OWNERS = [0, 1000, 2001]

paths = st.sampled_from(PATHS)
slots = st.integers(0, SLOTS - 1)
offsets = st.one_of(
    st.sampled_from([0, 1, 4095, 4096, 65536, 262144, MiB - 1, 3 * MiB + 5, 6 * MiB]),
    st.integers(0, 7 * MiB),
)
lengths = st.one_of(
    st.sampled_from([1, 100, 4096, 65539, 300_000, 1_200_000]), st.integers(1, 70_000)
)
sizes = st.one_of(st.sampled_from([0, 1, 4096, 262145, MiB, 5 * MiB + 3]), st.integers(0, 7 * MiB))
#: seed 0 writes zeros (holes once sealed), others incompressible data
seeds = st.integers(0, 5)
times_ns = st.integers(0, 2_000_000_000 * 10**9)

_writes = st.tuples(st.just("write"), slots, offsets, lengths, seeds)
op_strategy = st.one_of(
    st.tuples(st.just("open"), slots, paths, st.sampled_from(OPEN_FLAGS), st.sampled_from(MODES)),
    _writes,  # (twice: data changes matter most)
    st.tuples(st.just("close"), slots),
    st.tuples(st.just("reopen"), slots),
    st.tuples(st.just("write"), slots, offsets, lengths, seeds),
    st.tuples(st.just("read"), slots, offsets, lengths),
    st.tuples(st.just("ftruncate"), slots, sizes),
    st.tuples(st.just("fsync"), slots),
    st.tuples(st.just("create"), paths, lengths, seeds),
    st.tuples(st.just("truncate"), paths, sizes),
    st.tuples(
        st.just("rename"), paths, paths, st.sampled_from([0, RENAME_NOREPLACE, RENAME_EXCHANGE])
    ),
    st.tuples(st.just("link"), paths, paths),
    st.tuples(st.just("unlink"), paths),
    st.tuples(st.just("mkdir"), paths, st.sampled_from(MODES)),
    st.tuples(st.just("rmdir"), paths),
    st.tuples(st.just("chmod"), paths, st.sampled_from(MODES)),
    st.tuples(st.just("chown"), paths, st.sampled_from(OWNERS), st.sampled_from(OWNERS)),
    st.tuples(st.just("utime"), paths, times_ns, times_ns),
    st.tuples(
        st.just("setxattr"),
        paths,
        st.sampled_from(XATTR_NAMES),
        st.binary(max_size=300),
        st.sampled_from([0, os.XATTR_CREATE, os.XATTR_REPLACE]),
    ),
    st.tuples(st.just("removexattr"), paths, st.sampled_from(XATTR_NAMES)),
    st.tuples(st.just("symlink"), st.sampled_from(["a", "d/a", "../a", "nowhere", "d"]), paths),
    st.tuples(st.just("readlink"), paths),
    st.tuples(st.just("seal")),
    st.tuples(st.just("remount")),
)
programs = st.lists(op_strategy, min_size=10, max_size=MAX_STEPS)

#: every program starts from this tree and these open handles, so that most of its
#: steps find something to work on
SETUP: list[tuple[Any, ...]] = [
    ("mkdir", "d", 0o755),
    ("mkdir", "e", 0o755),
    ("create", "a", 300_000, 1),
    ("create", "d/a", 2 * MiB + 3, 2),
    ("create", "e/a", 5000, 3),
    ("open", 0, "a", os.O_RDWR, 0o644),
    ("open", 1, "d/a", os.O_RDWR, 0o644),
]

Op = tuple[Any, ...]


@functools.lru_cache(maxsize=64)
def _data(length: int, seed: int) -> bytes:
    return bytes(length) if seed == 0 else random.Random(seed * 7919 + length).randbytes(length)


# --- running a program on one side ----------------------------------------------------


@dataclass
class Side:
    """One of the two filesystems: its root for this program and its open handles."""

    name: str
    root: Path
    seal_root: Path | None = None  # the mount point, for the "seal" command
    fds: dict[int, int] = field(default_factory=dict)
    #: slot -> (path, flags) of the open, for reopen
    opened: dict[int, tuple[str, int]] = field(default_factory=dict)

    def p(self, rel: str) -> str:
        return str(self.root / rel)

    def close_all(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _apply(side: Side, op: Op) -> tuple[str, Any]:
    """Run `op` on `side`: ("ok", result) or ("err", errno name)."""
    try:
        return "ok", _run(side, op)
    except OSError as exc:
        return "err", errno.errorcode.get(exc.errno or 0, exc.errno)


def _run(side: Side, op: Op) -> Any:
    kind, args = op[0], op[1:]
    p = side.p
    if kind == "open":
        slot, path, flags, mode = args
        if slot in side.fds:
            os.close(side.fds.pop(slot))
        side.fds[slot] = os.open(p(path), flags, mode)
        side.opened[slot] = (path, flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC))
        return None
    if kind == "close":
        if args[0] in side.fds:
            os.close(side.fds.pop(args[0]))
        return None
    if kind == "reopen":
        (slot,) = args
        if slot in side.fds:
            os.close(side.fds.pop(slot))
            path, flags = side.opened[slot]
            side.fds[slot] = os.open(p(path), flags)
        return None
    if kind in ("write", "read", "ftruncate", "fsync"):
        fd = side.fds.get(args[0])
        if fd is None:
            return "no handle"
        if kind == "write":
            _, off, length, seed = args
            return os.pwrite(fd, _data(length, seed), off)  # (O_APPEND: at the end)
        if kind == "read":
            _, off, length = args
            return hashlib.sha256(os.pread(fd, length, off)).hexdigest()
        if kind == "ftruncate":
            os.ftruncate(fd, args[1])
            return None
        os.fsync(fd)
        return None
    if kind == "seal":
        # the mount seals every file now, open or not (as its idle timer would)
        if side.name == "mount":
            assert side.seal_root is not None
            os.setxattr(side.seal_root, "user.cloudfs.command", b"seal")
        return None
    if kind == "create":
        path, length, seed = args
        with open(p(path), "wb") as f:
            f.write(_data(length, seed))
        return None
    if kind == "truncate":
        os.truncate(p(args[0]), args[1])
    elif kind == "rename":
        src, dst, flags = args
        if flags:
            renameat2(p(src), p(dst), flags)
        else:
            os.rename(p(src), p(dst))
    elif kind == "link":
        os.link(p(args[0]), p(args[1]), follow_symlinks=False)
    elif kind == "unlink":
        os.unlink(p(args[0]))
    elif kind == "mkdir":
        os.mkdir(p(args[0]), args[1])
    elif kind == "rmdir":
        os.rmdir(p(args[0]))
    elif kind == "chmod":
        os.chmod(p(args[0]), args[1])
    elif kind == "chown":
        os.chown(p(args[0]), args[1], args[2], follow_symlinks=False)
    elif kind == "utime":
        os.utime(p(args[0]), ns=(args[1], args[2]), follow_symlinks=False)
    elif kind == "setxattr":
        path, name, value, flags = args
        os.setxattr(p(path), name, value, flags, follow_symlinks=False)
    elif kind == "removexattr":
        os.removexattr(p(args[0]), args[1], follow_symlinks=False)
    elif kind == "symlink":
        os.symlink(args[0], p(args[1]))
    elif kind == "readlink":
        return os.readlink(p(args[0]))
    else:
        raise AssertionError(f"unknown op {op}")
    return None


# --- comparing the two trees ----------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """What must agree about one path, and its times (compared as changed or not)."""

    kind: str
    mode: int
    nlink: int
    size: int | None
    uid: int
    gid: int
    target: str | None
    xattrs: tuple[tuple[str, bytes], ...]
    content: str | None
    ino: int
    mtime: int
    ctime: int

    def shape(self) -> tuple[Any, ...]:
        return (
            self.kind, self.mode, self.nlink, self.size, self.uid, self.gid, self.target,
            self.xattrs, self.content,
        )  # fmt: skip


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink")):
        if test(mode):
            return name
    return oct(stat.S_IFMT(mode))


def _walk(root: Path, rel: str = "") -> Iterator[tuple[str, os.DirEntry[str]]]:
    with os.scandir(root / rel if rel else root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        path = f"{rel}/{e.name}" if rel else e.name
        yield path, e
        if e.is_dir(follow_symlinks=False):
            yield from _walk(root, path)


def snapshot(root: Path, *, uncached: bool = False) -> dict[str, Entry]:
    """Everything the two sides must agree on, by path. `uncached`: read file contents
    past the kernel's page cache (from the filesystem itself)."""
    tree: dict[str, Entry] = {}
    for rel, e in _walk(root):
        st_ = e.stat(follow_symlinks=False)
        kind = _kind(st_.st_mode)
        full = root / rel
        xattrs: list[tuple[str, bytes]] = []
        if kind != "symlink":
            for name in sorted(os.listxattr(full, follow_symlinks=False)):
                xattrs.append((name, os.getxattr(full, name, follow_symlinks=False)))
        content = None
        if kind == "file":
            h = hashlib.sha256()
            with open(full, "rb") as f:
                if uncached:
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                while chunk := f.read(MiB):
                    h.update(chunk)
            content = h.hexdigest()
        tree[rel] = Entry(
            kind=kind,
            mode=stat.S_IMODE(st_.st_mode),
            nlink=st_.st_nlink,
            size=None if kind == "dir" else st_.st_size,  # ext4 counts directory blocks
            uid=st_.st_uid,
            gid=st_.st_gid,
            target=os.readlink(full) if kind == "symlink" else None,
            xattrs=tuple(xattrs),
            content=content,
            ino=st_.st_ino,
            mtime=st_.st_mtime_ns,
            ctime=st_.st_ctime_ns,
        )
    root_st = os.stat(root)
    tree["."] = Entry("dir", 0, root_st.st_nlink, None, 0, 0, None, (), None,
                      root_st.st_ino, root_st.st_mtime_ns, root_st.st_ctime_ns)  # fmt: skip
    return tree


def _time_changes(
    before: dict[str, Entry], after: dict[str, Entry]
) -> dict[str, tuple[bool, bool]]:
    """Per path that names the same inode before and after: (mtime changed, ctime
    changed)."""
    out = {}
    for path, new in after.items():
        old = before.get(path)
        if old is not None and old.ino == new.ino and old.kind == new.kind:
            out[path] = (new.mtime != old.mtime, new.ctime != old.ctime)
    return out


def diff_trees(model: dict[str, Entry], mount: dict[str, Entry]) -> list[str]:
    problems = []
    for path in sorted(set(model) | set(mount)):
        a, b = model.get(path), mount.get(path)
        if a is None or b is None:
            problems.append(
                f"{path}: {'only on the mount' if a is None else 'missing on the mount'}"
            )
        elif a.shape() != b.shape():
            fields_ = ("kind", "mode", "nlink", "size", "uid", "gid", "target", "xattrs", "content")
            for name, x, y in zip(fields_, a.shape(), b.shape()):
                if x != y:
                    problems.append(f"{path}: {name} model {x!r} mount {y!r}")
    return problems


# --- the test -----------------------------------------------------------------------------


_RUN_NUMBERS = itertools.count()


class Runner:
    def __init__(self, fs: CloudFS, local: Path) -> None:
        self.fs = fs
        self.local_base = local

    def run(self, program: list[Op]) -> None:
        name = f"run{next(_RUN_NUMBERS)}"
        model = Side("model", self.local_base / name)
        mount = Side("mount", self.fs.mnt / name, seal_root=self.fs.mnt)
        model.root.mkdir()
        mount.root.mkdir()
        log: list[str] = []
        try:
            before_model, before_mount = snapshot(model.root), snapshot(mount.root, uncached=True)
            for step, op in enumerate([*SETUP, *program], start=-len(SETUP)):
                log.append(f"{step}: {op!r}")
                if op[0] == "remount":
                    self._remount(model, mount, log)
                    before_model, before_mount = (
                        snapshot(model.root),
                        snapshot(mount.root, uncached=True),
                    )
                    continue
                got_model, got_mount = _apply(model, op), _apply(mount, op)
                after_model, after_mount = snapshot(model.root), snapshot(mount.root, uncached=True)
                problems = []
                if got_model != got_mount:
                    problems.append(f"result: model {got_model} mount {got_mount}")
                problems += diff_trees(after_model, after_mount)
                times_model = _time_changes(before_model, after_model)
                times_mount = _time_changes(before_mount, after_mount)
                for path in sorted(set(times_model) & set(times_mount)):
                    if times_model[path] != times_mount[path]:
                        problems.append(
                            f"{path}: (mtime, ctime) changed model {times_model[path]} "
                            f"mount {times_mount[path]}"
                        )
                if problems:
                    pytest.fail(
                        "cloudfs and the local disk disagree after step "
                        f"{step}:\n  "
                        + "\n  ".join(problems)
                        + "\nprogram:\n  "
                        + "\n  ".join(log),
                        pytrace=False,
                    )
                before_model, before_mount = after_model, after_mount
        finally:
            model.close_all()
            mount.close_all()

    def _remount(self, model: Side, mount: Side, log: list[str]) -> None:
        """Unmount and mount again: the mount's tree must not change at all."""
        model.close_all()
        mount.close_all()
        before = snapshot(mount.root, uncached=True)
        self.fs.remount()
        after = snapshot(mount.root, uncached=True)
        problems = diff_trees(before, after)
        for path in sorted(set(before) & set(after)):
            a, b = before[path], after[path]
            if (a.mtime, a.ctime) != (b.mtime, b.ctime):
                problems.append(f"{path}: times {(a.mtime, a.ctime)} became {(b.mtime, b.ctime)}")
        if problems:
            pytest.fail(
                "a remount changed the mount:\n  " + "\n  ".join(problems)
                + "\nprogram:\n  " + "\n  ".join(log),
                pytrace=False,
            )  # fmt: skip


def _settings() -> Callable[[Any], Any]:
    return settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=not _LONG_RUN,
        database=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
        ],
    )


@_settings()
@given(program=programs)
# bugs the model found, kept as regressions:
# open(O_TRUNC) of an existing empty file left mtime and ctime alone
@example(
    program=[
        ("open", 0, "b", os.O_RDWR | os.O_CREAT, 0o644),
        ("close", 0),
        ("open", 0, "b", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
    ]
)
# a truncate to the size the file already had left mtime alone (ext4 sets it)
@example(program=[("close", 0), ("truncate", "a", 300_000)])
# an xattr outside the user/trusted/security namespaces was stored (EOPNOTSUPP)
@example(program=[("setxattr", "a", "bogus.b", b"x", 0), ("removexattr", "a", "bogus.b")])
# MySQL: a stat right after the last close of a truncated file read the inode row on a
# worker thread before the seal committed and ended after the seal forgot the file's
# state; the kernel cached the size from before the seal (300000, not 817). Timing
# dependent here: tests/fs_api/test_files.py holds the read across the seal
@example(
    program=[
        ("seal",),
        ("write", 0, 207, 13855, 5),
        ("ftruncate", 0, 817),
        ("remount",),
    ]
)
def test_mount_behaves_like_the_local_disk(fs: CloudFS, tmp_path: Path, program: list[Op]) -> None:
    """(`fs` and `tmp_path` are made once for all the programs hypothesis runs; each
    program works in directories of its own.)"""
    Runner(fs, tmp_path).run(program)
