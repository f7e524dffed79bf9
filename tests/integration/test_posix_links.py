"""Symlinks, hard links and special files (mknod) on a real mount (issue 3)."""

from __future__ import annotations

import errno
import os
import socket
import stat
import threading
from typing import TYPE_CHECKING

from posixutil import MiB, block_refcounts, expect_errno, fill, wait_for

if TYPE_CHECKING:
    from conftest import CloudFS


def test_symlinks(fs: CloudFS) -> None:
    m = fs.mnt
    (m / "dir").mkdir()
    (m / "dir" / "file").write_bytes(b"content")
    os.symlink("dir/file", m / "rel")
    os.symlink(str(m / "dir"), m / "abs")
    os.symlink("nowhere", m / "dangling")
    target = b"\xff\xfe/not-utf8/" + b"x" * 100
    os.symlink(target, os.fsencode(m / "binary"))
    long_target = "t" * 4095
    os.symlink(long_target, m / "long")

    def check() -> None:
        assert os.readlink(m / "rel") == "dir/file"
        assert (m / "rel").read_bytes() == b"content"
        assert os.listdir(m / "abs") == ["file"]
        assert os.readlink(os.fsencode(m / "binary")) == target
        assert os.readlink(m / "long") == long_target
        for name, length in (("rel", 8), ("binary", len(target)), ("long", 4095)):
            st = os.lstat(m / name)
            assert stat.S_ISLNK(st.st_mode), name
            assert stat.S_IMODE(st.st_mode) == 0o777
            assert st.st_size == length, f"lstat({name}).st_size {st.st_size}, expected {length}"
        # stat follows the link, lstat does not
        assert os.stat(m / "rel").st_ino == os.stat(m / "dir" / "file").st_ino
        assert os.stat(m / "rel").st_size == 7
        assert os.lstat(m / "dangling")
        expect_errno(errno.ENOENT, os.stat, m / "dangling")
        expect_errno(errno.EINVAL, os.readlink, m / "dir" / "file")
        expect_errno(errno.EINVAL, os.readlink, m / "dir")

    check()
    fs.remount()
    check()

    os.symlink("loop2", m / "loop1")
    os.symlink("loop1", m / "loop2")
    expect_errno(errno.ELOOP, os.stat, m / "loop1")
    expect_errno(errno.ENAMETOOLONG, os.symlink, "t" * 4096, m / "too-long")
    # a symlink's own owner changes with lchown, not its target's
    os.chown(m / "rel", 1234, 5678, follow_symlinks=False)
    assert (os.lstat(m / "rel").st_uid, os.lstat(m / "rel").st_gid) == (1234, 5678)
    assert os.stat(m / "dir" / "file").st_uid == 0
    # removing the link leaves the target
    os.unlink(m / "rel")
    assert (m / "dir" / "file").read_bytes() == b"content"
    expect_errno(errno.EEXIST, os.symlink, "x", m / "abs")


def test_hard_links_share_data_and_count(fs: CloudFS) -> None:
    m = fs.mnt
    (m / "a").mkdir()
    data = fill(3 * MiB, 1)
    (m / "a" / "one").write_bytes(data)
    ctime_before = os.stat(m / "a" / "one").st_ctime_ns
    os.link(m / "a" / "one", m / "two")
    os.link(m / "two", m / "a" / "three")
    st = os.stat(m / "a" / "one")
    assert st.st_nlink == 3
    assert st.st_ctime_ns > ctime_before, "link must change the inode's ctime"
    assert {os.stat(m / p).st_ino for p in ("a/one", "two", "a/three")} == {st.st_ino}

    # data written through one name is seen through the others, also after a remount
    with open(m / "two", "r+b") as f:
        f.seek(MiB)
        f.write(b"written through two")
    expected = bytearray(data)
    expected[MiB : MiB + 19] = b"written through two"
    assert (m / "a" / "three").read_bytes() == expected
    fs.remount()
    assert os.stat(m / "a" / "one").st_nlink == 3
    assert (m / "a" / "one").read_bytes() == expected

    fs.flush()
    referenced_before = fs.stat_json()["referenced_bytes"]
    assert referenced_before >= len(data)
    os.unlink(m / "a" / "one")
    assert os.stat(m / "two").st_nlink == 2
    os.unlink(m / "two")
    assert os.stat(m / "a" / "three").st_nlink == 1
    assert (m / "a" / "three").read_bytes() == expected
    assert fs.stat_json()["referenced_bytes"] == referenced_before

    # the last unlink puts the inode in the trash; purged from there, it is freed and
    # its blocks (all versions) are released
    os.unlink(m / "a" / "three")
    fs.check("cloudfs", "trash", "purge", fs.mnt)  # unlinked files are kept in the trash
    wait_for(lambda: fs.stat_json()["referenced_bytes"] == 0, what="blocks released")
    report = fs.stat_json()
    assert report["files"] == 0
    assert all(n == 0 for n in block_refcounts(fs).values())

    # links to directories are refused; a directory's nlink counts its subdirectories
    expect_errno(errno.EPERM, os.link, m / "a", m / "alink")
    assert os.stat(m / "a").st_nlink == 2
    (m / "a" / "sub1").mkdir()
    (m / "a" / "sub2").mkdir()
    (m / "a" / "file").write_bytes(b"")
    assert os.stat(m / "a").st_nlink == 4
    os.rmdir(m / "a" / "sub1")
    assert os.stat(m / "a").st_nlink == 3
    expect_errno(errno.EEXIST, os.link, m / "a" / "file", m / "a" / "sub2")
    expect_errno(errno.ENOENT, os.link, m / "a" / "missing", m / "a" / "x")


def test_fifo_socket_and_device_nodes(fs: CloudFS) -> None:
    m = fs.mnt
    os.mkfifo(m / "fifo", 0o640)
    os.mknod(m / "chr", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mknod(m / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    os.mknod(m / "reg", stat.S_IFREG | 0o644)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(m / "sock"))

    def check() -> None:
        assert stat.S_ISFIFO(os.stat(m / "fifo").st_mode)
        assert stat.S_IMODE(os.stat(m / "fifo").st_mode) == 0o640
        st = os.stat(m / "chr")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
        st = os.stat(m / "blk")
        assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(7, 0)
        assert stat.S_ISREG(os.stat(m / "reg").st_mode)
        assert os.stat(m / "reg").st_size == 0
        assert stat.S_ISSOCK(os.stat(m / "sock").st_mode)

    check()

    # the FIFO carries data between a writer and a reader
    received: list[bytes] = []

    def reader() -> None:
        with open(m / "fifo", "rb") as f:
            received.append(f.read())

    t = threading.Thread(target=reader)
    t.start()
    with open(m / "fifo", "wb") as f:
        f.write(b"through the fifo")
    t.join(10)
    assert received == [b"through the fifo"]

    # the socket accepts a connection
    sock.listen(1)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(m / "sock"))
    conn, _ = sock.accept()
    client.sendall(b"ping")
    assert conn.recv(4) == b"ping"
    for s in (conn, client, sock):
        s.close()

    # the mount is nodev: device nodes exist but cannot be opened
    expect_errno(errno.EACCES, os.open, m / "chr", os.O_RDONLY)

    fs.remount()
    check()
    for name in ("fifo", "chr", "blk", "reg", "sock"):
        os.unlink(m / name)
    assert os.listdir(m) == []
