"""Permissions on a mount with `-o allow_other,default_permissions`, checked as
non-root users (forked children with setresuid/setresgid): mode bits, supplementary
groups, chown/chmod rules, setuid/setgid clearing, sticky and setgid directories,
access() (issue 3)."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from posixutil import as_user, user_errno

if TYPE_CHECKING:
    from conftest import CloudFS

ALICE, BOB = 2001, 2002
STAFF, DEV, OTHER = 3001, 3002, 3003


@pytest.fixture
def shared(make_fs: Callable[..., CloudFS]) -> CloudFS:
    """A filesystem mounted for every user, the kernel checking permissions."""
    fs = make_fs(mount=False)
    fs.mount("-o", "allow_other,default_permissions")
    os.chmod(fs.mnt, 0o755)
    return fs


def alice(fn: Callable[..., Any], *args: Any, groups: tuple[int, ...] = (), **kw: Any) -> Any:
    return as_user(ALICE, STAFF, fn, *args, groups=groups, **kw)


def _read(p: str) -> bytes:
    with open(p, "rb") as f:
        return f.read()


def _write(p: str, data: bytes = b"w", flags: int = os.O_WRONLY) -> None:
    fd = os.open(p, flags, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_mode_bits_groups_and_access(shared: CloudFS) -> None:
    m = shared.mnt
    (m / "secret").write_bytes(b"secret")
    os.chmod(m / "secret", 0o640)
    (m / "public").write_bytes(b"public")
    os.chmod(m / "public", 0o644)
    (m / "team").write_bytes(b"team")
    os.chown(m / "team", 0, DEV)
    os.chmod(m / "team", 0o660)
    (m / "rodir").mkdir(0o755)
    (m / "rodir" / "f").write_bytes(b"f")
    (m / "xonly").mkdir(0o711)
    (m / "xonly" / "known").write_bytes(b"known")
    os.chmod(m / "xonly" / "known", 0o644)
    cwd = {"cwd": m}

    assert user_errno(ALICE, STAFF, _read, "secret", **cwd) == errno.EACCES
    assert alice(_read, "public", **cwd) == b"public"
    assert user_errno(ALICE, STAFF, _write, "public", **cwd) == errno.EACCES
    assert user_errno(ALICE, STAFF, _write, "rodir/new", b"", os.O_CREAT | os.O_WRONLY, **cwd) == (
        errno.EACCES
    )
    assert user_errno(ALICE, STAFF, os.unlink, "rodir/f", **cwd) == errno.EACCES
    assert user_errno(ALICE, STAFF, os.mkdir, "rodir/sub", **cwd) == errno.EACCES
    # search permission without read permission
    assert alice(_read, "xonly/known", **cwd) == b"known"
    assert user_errno(ALICE, STAFF, os.listdir, "xonly", **cwd) == errno.EACCES

    # group access through the primary group and through supplementary groups
    os.chown(m / "secret", 0, STAFF)
    assert alice(_read, "secret", **cwd) == b"secret"
    assert user_errno(ALICE, STAFF, _read, "team", **cwd) == errno.EACCES
    assert alice(_read, "team", groups=(DEV,), **cwd) == b"team"
    alice(_write, "team", b"T", groups=(OTHER, DEV), **cwd)
    assert (m / "team").read_bytes() == b"Team"

    # access() answers as the calls would
    def access_all(path: str) -> tuple[bool, bool, bool]:
        return tuple(os.access(path, mode) for mode in (os.R_OK, os.W_OK, os.X_OK))  # type: ignore[return-value]

    assert alice(access_all, "public", **cwd) == (True, False, False)
    assert alice(access_all, "team", **cwd) == (False, False, False)
    assert alice(access_all, "team", groups=(DEV,), **cwd) == (True, True, False)
    assert alice(access_all, "rodir", **cwd) == (True, False, True)
    assert alice(access_all, "xonly", **cwd) == (False, False, True)
    # root reads and writes anything, but executes only what has an x bit
    os.chmod(m / "secret", 0)
    assert (m / "secret").read_bytes() == b"secret"
    assert os.access(m / "secret", os.R_OK | os.W_OK)
    assert not os.access(m / "secret", os.X_OK)

    # files created by a user belong to the user and the user's group
    (m / "open").mkdir(0o777)
    os.chmod(m / "open", 0o777)
    alice(_write, "open/mine", b"x", os.O_CREAT | os.O_WRONLY, **cwd)
    st = os.stat(m / "open" / "mine")
    assert (st.st_uid, st.st_gid) == (ALICE, STAFF)
    assert stat.S_IMODE(st.st_mode) == 0o644

    # executing needs an x bit; a script with one runs for the user
    (m / "open" / "run.sh").write_text("#!/bin/sh\necho ran as $(id -u)\n")
    os.chmod(m / "open" / "run.sh", 0o755)
    out = alice(
        lambda: subprocess.run(["./run.sh"], capture_output=True, text=True, check=True).stdout,
        cwd=m / "open",
    )
    assert out == f"ran as {ALICE}\n"
    os.chmod(m / "open" / "run.sh", 0o644)
    assert user_errno(ALICE, STAFF, os.execv, "./run.sh", ["run.sh"], cwd=m / "open") == (
        errno.EACCES
    )


def test_chown_and_chmod_rules(shared: CloudFS) -> None:
    m = shared.mnt
    cwd = {"cwd": m}
    (m / "hers").write_bytes(b"x")
    os.chown(m / "hers", ALICE, STAFF)
    (m / "roots").write_bytes(b"x")

    # only root gives a file away; the owner may change the group to one of hers
    assert user_errno(ALICE, STAFF, os.chown, "hers", BOB, -1, **cwd) == errno.EPERM
    assert user_errno(ALICE, STAFF, os.chown, "hers", -1, OTHER, **cwd) == errno.EPERM
    alice(os.chown, "hers", -1, DEV, groups=(DEV,), **cwd)
    assert os.stat(m / "hers").st_gid == DEV
    alice(os.chown, "hers", ALICE, STAFF, **cwd)  # back to her primary group, "to herself"
    assert os.stat(m / "hers").st_gid == STAFF
    assert user_errno(BOB, STAFF, os.chown, "hers", -1, STAFF, **cwd) == errno.EPERM
    os.chown(m / "hers", BOB, OTHER)
    assert (os.stat(m / "hers").st_uid, os.stat(m / "hers").st_gid) == (BOB, OTHER)
    os.chown(m / "hers", ALICE, STAFF)

    # only the owner (or root) changes the mode
    alice(os.chmod, "hers", 0o600, **cwd)
    assert _mode(m / "hers") == 0o600
    assert user_errno(ALICE, STAFF, os.chmod, "roots", 0o666, **cwd) == errno.EPERM
    assert user_errno(BOB, OTHER, os.chmod, "hers", 0o666, **cwd) == errno.EPERM
    # setgid for a group she is not in is dropped silently
    os.chown(m / "hers", ALICE, OTHER)
    alice(os.chmod, "hers", 0o2755, **cwd)
    assert _mode(m / "hers") == 0o755
    alice(os.chmod, "hers", 0o2755, groups=(OTHER,), **cwd)
    assert _mode(m / "hers") == 0o2755

    # times: the owner sets any; others only "now", and only with write permission
    alice(lambda: os.utime("hers", ns=(1, 2)), **cwd)
    assert os.stat(m / "hers").st_mtime_ns == 2
    assert user_errno(BOB, OTHER, lambda: os.utime("hers", ns=(3, 4)), **cwd) == errno.EPERM
    assert user_errno(BOB, OTHER, os.utime, "hers", None, **cwd) == errno.EACCES
    os.chmod(m / "hers", 0o666)
    as_user(BOB, OTHER, os.utime, "hers", None, **cwd)
    assert os.stat(m / "hers").st_mtime_ns > 2


def test_setuid_and_setgid_are_cleared(shared: CloudFS) -> None:
    m = shared.mnt
    cwd = {"cwd": m}

    def prepared(name: str, mode: int, uid: int = ALICE, gid: int = STAFF) -> None:
        (m / name).write_bytes(b"original")
        os.chown(m / name, uid, gid)
        os.chmod(m / name, mode)
        assert _mode(m / name) == mode

    # a write by a user clears setuid, and setgid when the group may execute
    prepared("w1", 0o6755)
    alice(_write, "w1", b"X", os.O_WRONLY, **cwd)
    assert _mode(m / "w1") == 0o755
    assert (m / "w1").read_bytes() == b"Xriginal"
    prepared("w2", 0o2644)  # setgid without group-x: not a privilege, kept
    alice(_write, "w2", b"X", os.O_WRONLY, **cwd)
    assert _mode(m / "w2") == 0o2644
    prepared("w3", 0o4777)
    as_user(BOB, OTHER, _write, "w3", b"X", os.O_WRONLY, **cwd)  # by another user too
    assert _mode(m / "w3") == 0o777
    # ... and so does a truncate
    prepared("t1", 0o6755)
    alice(os.truncate, "t1", 3, **cwd)
    assert _mode(m / "t1") == 0o755
    prepared("t2", 0o4755)
    alice(_write, "t2", b"", os.O_WRONLY | os.O_TRUNC, **cwd)
    assert _mode(m / "t2") == 0o755
    assert os.stat(m / "t2").st_size == 0
    # root keeps them when writing (CAP_FSETID)
    prepared("r1", 0o6755)
    _write(str(m / "r1"), b"R")
    assert _mode(m / "r1") == 0o6755

    # chown clears setuid, and setgid when group-executable, even done by root
    prepared("c1", 0o6755)
    os.chown(m / "c1", BOB, -1)
    assert _mode(m / "c1") == 0o755
    prepared("c2", 0o6745)
    os.chown(m / "c2", -1, OTHER)
    assert _mode(m / "c2") == 0o2745
    prepared("c3", 0o4755)
    alice(os.chown, "c3", -1, DEV, groups=(DEV,), **cwd)
    assert _mode(m / "c3") == 0o755
    # directories keep their setgid bit
    (m / "sgdir").mkdir()
    os.chmod(m / "sgdir", 0o2775)
    os.chown(m / "sgdir", ALICE, OTHER)
    assert _mode(m / "sgdir") == 0o2775

    shared.remount()
    assert _mode(m / "w1") == 0o755 and _mode(m / "w2") == 0o2644
    assert _mode(m / "r1") == 0o6755 and _mode(m / "c2") == 0o2745


def test_sticky_and_setgid_directories(shared: CloudFS) -> None:
    m = shared.mnt
    cwd = {"cwd": m}
    (m / "tmp").mkdir()
    os.chmod(m / "tmp", 0o1777)
    alice(_write, "tmp/hers", b"h", os.O_CREAT | os.O_WRONLY, **cwd)
    alice(os.mkdir, "tmp/herdir", **cwd)
    as_user(BOB, OTHER, _write, "tmp/his", b"b", os.O_CREAT | os.O_WRONLY, **cwd)

    def bob(fn: Callable[..., Any], *args: Any) -> int:
        return user_errno(BOB, OTHER, fn, *args, **cwd)

    assert bob(os.unlink, "tmp/hers") == errno.EPERM
    assert bob(os.rename, "tmp/hers", "tmp/mine") == errno.EPERM
    assert bob(os.rename, "tmp/his", "tmp/hers") == errno.EPERM  # replacing hers
    assert bob(os.rmdir, "tmp/herdir") == errno.EPERM
    assert bob(os.rename, "tmp/his", "tmp/his2") == 0
    assert bob(os.unlink, "tmp/his2") == 0
    alice(os.rename, "tmp/hers", "tmp/hers2", **cwd)
    alice(os.unlink, "tmp/hers2", **cwd)
    os.rmdir(m / "tmp" / "herdir")  # root may
    assert os.listdir(m / "tmp") == []
    # without the sticky bit anyone with write permission may remove
    os.chmod(m / "tmp", 0o777)
    alice(_write, "tmp/hers", b"h", os.O_CREAT | os.O_WRONLY, **cwd)
    assert bob(os.unlink, "tmp/hers") == 0

    # a setgid directory hands its group (and, to subdirectories, the bit) down
    (m / "proj").mkdir()
    os.chown(m / "proj", 0, OTHER)
    os.chmod(m / "proj", 0o2777)
    alice(_write, "proj/f", b"", os.O_CREAT | os.O_WRONLY, **cwd)
    alice(os.mkdir, "proj/sub", 0o755, **cwd)
    (m / "proj" / "rootfile").write_bytes(b"")
    for name in ("f", "sub", "rootfile"):
        assert os.stat(m / "proj" / name).st_gid == OTHER, name
    assert _mode(m / "proj" / "sub") == 0o2755
    assert os.stat(m / "proj" / "f").st_uid == ALICE
    assert not _mode(m / "proj" / "f") & stat.S_ISGID
    shared.remount()
    assert _mode(m / "proj" / "sub") == 0o2755
    assert _mode(m / "tmp") == 0o777


def test_mount_without_allow_other_refuses_other_users(make_fs: Callable[..., CloudFS]) -> None:
    fs = make_fs()
    os.chmod(fs.mnt, 0o755)
    (fs.mnt / "f").write_bytes(b"x")
    os.chmod(fs.mnt / "f", 0o644)
    assert user_errno(ALICE, STAFF, os.stat, "f", cwd=fs.mnt) == errno.EACCES
    assert os.stat(fs.mnt / "f").st_size == 1
