"""Extended attributes on a real mount (issue 3): set/get/list/remove, XATTR_CREATE and
XATTR_REPLACE, ENODATA, ERANGE, size limits, 64 KiB values, and `cp -a` / `tar
--xattrs` keeping them."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from posixutil import expect_errno, getxattr_size, listxattr_size

if TYPE_CHECKING:
    from conftest import CloudFS


def _xattrs(p: Path) -> dict[str, bytes]:
    return {
        n: os.getxattr(p, n, follow_symlinks=False) for n in os.listxattr(p, follow_symlinks=False)
    }


def test_set_get_list_remove(fs: CloudFS) -> None:
    m = fs.mnt
    p = m / "f"
    p.write_bytes(b"x")
    (m / "d").mkdir()
    os.mkfifo(m / "fifo")

    os.setxattr(p, "user.plain", b"value")
    os.setxattr(p, "user.empty", b"")
    os.setxattr(p, "user.binary", bytes(range(256)) + b"\0\0")
    os.setxattr(p, "trusted.root-only", b"t")
    os.setxattr(p, "security.label", b"s")
    os.setxattr(m / "d", "user.on-dir", b"dir")
    os.setxattr(m / "fifo", "trusted.on-fifo", b"fifo")
    expected = {
        "user.plain": b"value",
        "user.empty": b"",
        "user.binary": bytes(range(256)) + b"\0\0",
        "trusted.root-only": b"t",
        "security.label": b"s",
    }
    assert _xattrs(p) == expected

    # create / replace flags
    expect_errno(errno.EEXIST, os.setxattr, p, "user.plain", b"new", os.XATTR_CREATE)
    expect_errno(errno.ENODATA, os.setxattr, p, "user.none", b"new", os.XATTR_REPLACE)
    os.setxattr(p, "user.plain", b"replaced", os.XATTR_REPLACE)
    os.setxattr(p, "user.created", b"c", os.XATTR_CREATE)
    expected.update({"user.plain": b"replaced", "user.created": b"c"})
    expect_errno(errno.ENODATA, os.getxattr, p, "user.none")
    expect_errno(errno.ENODATA, os.removexattr, p, "user.none")
    # user.* is for regular files and directories only
    expect_errno(errno.EPERM, os.setxattr, m / "fifo", "user.x", b"1")
    expect_errno(errno.EOPNOTSUPP, os.setxattr, p, "bogus.namespace", b"1")

    # sizes: a buffer too small is ERANGE, size 0 asks for the size
    assert getxattr_size(p, "user.plain", 0) == (8, b"")
    assert getxattr_size(p, "user.plain", 8) == (8, b"replaced")
    expect_errno(errno.ERANGE, getxattr_size, p, "user.plain", 7)
    length, names = listxattr_size(p, 4096)
    assert sorted(names.rstrip(b"\0").split(b"\0")) == sorted(n.encode() for n in expected)
    assert listxattr_size(p, 0) == (length, b"")
    expect_errno(errno.ERANGE, listxattr_size, p, length - 1)

    fs.remount()
    assert _xattrs(p) == expected
    assert os.getxattr(m / "d", "user.on-dir") == b"dir"
    assert os.getxattr(m / "fifo", "trusted.on-fifo") == b"fifo"
    os.removexattr(p, "user.plain")
    del expected["user.plain"]
    assert _xattrs(p) == expected
    # they go with the inode: a hard link shares them, a new file has none
    os.link(p, m / "hard")
    assert _xattrs(m / "hard") == expected
    os.unlink(p)
    p.write_bytes(b"new")
    assert _xattrs(p) == {}


def test_size_limits(fs: CloudFS) -> None:
    m = fs.mnt
    p = m / "f"
    p.write_bytes(b"")
    big = os.urandom(65536)
    os.setxattr(p, "user.big", big)
    assert os.getxattr(p, "user.big") == big
    expect_errno(errno.E2BIG, os.setxattr, p, "user.too-big", big + b"x")
    longest = "user." + "n" * 250  # 255 bytes
    os.setxattr(p, longest, b"long name")
    expect_errno(errno.ERANGE, os.setxattr, p, longest + "n", b"x")
    expect_errno(errno.ERANGE, os.getxattr, p, longest + "n")
    # many attributes on one file
    for i in range(200):
        os.setxattr(p, f"user.many.{i:03d}", str(i).encode() * 10)
    fs.remount()
    assert os.getxattr(p, "user.big") == big
    assert os.getxattr(p, longest) == b"long name"
    assert len(os.listxattr(p)) == 202
    assert os.getxattr(p, "user.many.123") == b"123" * 10


#: the local disk (ext4 without ea_inode) keeps values up to about one block
LOCAL_BIG = b"L" * 2000
BIG = b"B" * 65536


def _tree_with_xattrs(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "file").write_bytes(b"content")
    (root / "top").write_bytes(b"top")
    os.setxattr(root / "sub" / "file", "user.note", b"in a subdirectory")
    os.setxattr(root / "sub", "user.dirnote", b"on the directory")
    os.setxattr(root / "top", "user.big", LOCAL_BIG)
    os.setxattr(root / "top", "trusted.t", b"\0binary\xff")


def _check_tree(root: Path, big: bytes = LOCAL_BIG) -> None:
    assert os.getxattr(root / "sub" / "file", "user.note") == b"in a subdirectory"
    assert os.getxattr(root / "sub", "user.dirnote") == b"on the directory"
    assert os.getxattr(root / "top", "user.big") == big
    assert os.getxattr(root / "top", "trusted.t") == b"\0binary\xff"
    assert (root / "sub" / "file").read_bytes() == b"content"


def _tar(*args: str | Path) -> None:
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", *map(str, args)], check=True)


def test_cp_a_and_tar_keep_xattrs(fs: CloudFS, tmp_path: Path) -> None:
    m = fs.mnt
    local = tmp_path / "local"
    _tree_with_xattrs(local)
    # local -> mount, mount -> local
    subprocess.run(["cp", "-a", str(local), str(m / "copy1")], check=True)
    _check_tree(m / "copy1")
    subprocess.run(["cp", "-a", str(m / "copy1"), str(tmp_path / "back")], check=True)
    _check_tree(tmp_path / "back")
    # mount -> mount, with a 64 KiB value
    os.setxattr(m / "copy1" / "top", "user.big", BIG)
    subprocess.run(["cp", "-a", str(m / "copy1"), str(m / "copy2")], check=True)
    _check_tree(m / "copy2", BIG)

    # tar --xattrs: from the local disk and from the mount, extracted on the mount
    _tar("-cf", m / "local.tar", "-C", local, ".")
    _tar("-cf", m / "mount.tar", "-C", m / "copy2", ".")
    for name in ("local", "mount"):
        (m / f"untar-{name}").mkdir()
        _tar("-xf", m / f"{name}.tar", "-C", m / f"untar-{name}")
    _check_tree(m / "untar-local")
    _check_tree(m / "untar-mount", BIG)
    fs.remount()
    _check_tree(m / "copy1", BIG)
    _check_tree(m / "copy2", BIG)
    _check_tree(m / "untar-local")
    _check_tree(m / "untar-mount", BIG)


def test_write_drops_capability_set_while_open(fs: CloudFS) -> None:
    """The kernel asks for security.capability before each write (to drop it); the
    mount answers "none" from memory while a file stays open, so a capability set
    meanwhile must still be seen, and dropped by the next write as on ext4."""
    p = fs.mnt / "prog"
    # vfs_cap_data revision 2, effective, permitted = CAP_NET_RAW
    cap = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o755)
    try:
        os.write(fd, b"a" * 4096)
        os.write(fd, b"b" * 4096)  # the answer "no capability" is remembered now
        os.setxattr(p, "security.capability", cap)
        assert os.getxattr(p, "security.capability") == cap
        os.write(fd, b"c" * 4096)
        expect_errno(errno.ENODATA, os.getxattr, p, "security.capability")
        os.setxattr(p, "security.capability", cap)
    finally:
        os.close(fd)
    # a new open asks again: set while closed, a write drops it too
    with open(p, "r+b", buffering=0) as f:
        f.write(b"d")
    expect_errno(errno.ENODATA, os.getxattr, p, "security.capability")
    assert p.read_bytes() == b"d" + b"a" * 4095 + b"b" * 4096 + b"c" * 4096
