"""The history commands of `cloudfs`: versions, restore (later: snapshot, trash,
retention, prune, gc).

They work on a mounted filesystem. What only reads (listing versions, snapshots,
trash) reads the metadata database the mount uses; what changes the namespace or a
file's contents asks the mount process to do it, through the virtual extended
attribute `user.cloudfs.command` of the mount's root, so that the mount's in-memory
file state and the kernel's caches follow. The mount answers a command with an errno;
its result (JSON) is read back from `user.cloudfs.result` by the same thread.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from cloudfs.tools._cli import open_config_meta

from cloudfs.cache import CacheDir
from cloudfs.errors import CloudfsError, NotMounted, UsageError
from cloudfs.meta.base import MetaStore, VersionRow
from cloudfs.versions import CONFLICT, RESTORED, parse_time, version_at

#: the command's result, per calling thread, answered by the mount (never stored)
XATTR_RESULT = b"user.cloudfs.result"
#: trash entries one purge command of the mount frees
PURGE_BATCH = 500


class CommandFailed(CloudfsError):
    """the mount refused the command"""

    exit_code = 1


# --- finding the mount ------------------------------------------------------------------


@dataclass
class Mount:
    """A cloudfs mount that holds a path."""

    root: Path
    cache: CacheDir

    def meta(self) -> MetaStore:
        return open_config_meta(self.cache.read_config())


def find_mount(path: str | os.PathLike[str]) -> Mount:
    """The cloudfs mount holding `path` (which need not exist: its nearest existing
    ancestor decides). NotMounted when that is not in a cloudfs mount."""
    from cloudfs.tools.cloudfs import cache_of

    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    try:
        return Mount(p, cache_of(str(p)))
    except NotMounted:
        raise NotMounted(f"{path} is not in a cloudfs mount") from None


def _relative(mount: Mount, path: str | os.PathLike[str]) -> str:
    """`path` as a path from the mount's root, starting with '/'."""
    rel = os.path.relpath(os.path.abspath(path), mount.root)
    if rel == ".":
        return "/"
    if rel.startswith(".."):
        raise UsageError(f"{path} is not under {mount.root}")
    return "/" + rel


def _command_sync(root: Path, verb: str, args: dict[str, Any]) -> dict[str, Any]:
    from cloudfs.tools.cloudfs import XATTR_COMMAND

    value = verb.encode() + b" " + json.dumps(args).encode()
    try:
        os.setxattr(root, XATTR_COMMAND.decode(), value)
        failure: OSError | None = None
    except OSError as exc:
        failure = exc
    try:
        result = json.loads(os.getxattr(root, XATTR_RESULT.decode()) or b"{}")
    except (OSError, ValueError):
        result = {}
    if failure is not None:
        if failure.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM) and not result:
            raise NotMounted(f"{root}: the mount does not know the command {verb!r}")
        message = result.get("error") or os.strerror(failure.errno or errno.EIO)
        raise CommandFailed(message)
    return dict(result)


async def mount_command(mount: Mount, verb: str, **args: Any) -> dict[str, Any]:
    """Have the mount run `verb`; its result. CommandFailed with the mount's message."""
    # one thread for both calls: the mount keeps each caller's result by thread id
    return await trio.to_thread.run_sync(_command_sync, mount.root, verb, args)


# --- output -------------------------------------------------------------------------------


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def show_time(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))


def print_table(
    header: list[str], rows: list[list[str]], right: frozenset[int] = frozenset()
) -> None:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    for line in [header, *rows]:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())


# --- versions and restore -----------------------------------------------------------------


def _regular_file(path: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{path}: not a regular file")
    return st


async def _versions_of(mount: Mount, ino: int) -> tuple[list[VersionRow], int]:
    meta = mount.meta()
    try:
        async with meta.reading() as tx:
            attrs = await tx.get_inode(ino)
            rows = await tx.versions(ino)
    finally:
        await meta.close()
    return rows, attrs.version if attrs else 0


async def cmd_versions(args: argparse.Namespace) -> int:
    st = _regular_file(args.file)
    mount = find_mount(args.file)
    rows, current = await _versions_of(mount, st.st_ino)
    if args.json:
        print(json.dumps([
            {"version": v.version, "committed_ns": v.committed_ns, "mtime_ns": v.mtime_ns,
             "size": v.size, "origin": v.origin, "conflict": bool(v.flags & CONFLICT),
             "restored": bool(v.flags & RESTORED), "current": v.version == current}
            for v in rows
        ], indent=2))  # fmt: skip
        return 0
    if not rows:
        print(f"{args.file}: no versions yet")
        return 0
    table = []
    for v in rows:
        marks = []
        if v.version == current:
            marks.append("current")
        if v.flags & CONFLICT:
            marks.append("conflict")
        if v.flags & RESTORED:
            marks.append("restored")
        table.append(
            [str(v.version), show_time(v.committed_ns), human_size(v.size), v.origin,
             ", ".join(marks)]
        )  # fmt: skip
    print_table(["VERSION", "COMMITTED", "SIZE", "ORIGIN", ""], table, right=frozenset({0, 2}))
    return 0


async def cmd_restore(args: argparse.Namespace) -> int:
    st = _regular_file(args.file)
    mount = find_mount(args.file)
    rows, _current = await _versions_of(mount, st.st_ino)
    if args.version is not None:
        chosen = next((v for v in rows if v.version == args.version), None)
        if chosen is None:
            known = ", ".join(str(v.version) for v in rows) or "none"
            raise UsageError(f"{args.file} has no version {args.version} (versions: {known})")
    else:
        at = parse_time(args.at)
        chosen = version_at(rows, at)
        if chosen is None:
            raise UsageError(f"{args.file} has no version from {show_time(at)} or earlier")
    fields: dict[str, Any] = {"inode": st.st_ino, "version": chosen.version}
    if args.to is not None:
        if find_mount(args.to).root != mount.root:
            raise UsageError(f"{args.to} is not in the same cloudfs as {args.file}")
        if os.path.lexists(args.to):
            raise UsageError(f"{args.to} exists")
        parent = os.stat(os.path.dirname(os.path.abspath(args.to)))
        fields["parent"] = parent.st_ino
        fields["name"] = os.fsencode(os.path.basename(os.path.abspath(args.to))).hex()
    result = await mount_command(mount, "restore", **fields)
    where = args.to if args.to is not None else args.file
    print(
        f"restored version {chosen.version} of {args.file} ({human_size(result['size'])}) "
        f"as version {result['version']} of {where}"
    )
    return 0


# --- snapshots ----------------------------------------------------------------------------


def _lstat(path: str) -> os.stat_result:
    """lstat a path named on the command line; a missing one is a usage error."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file or directory") from None


async def cmd_snapshot_create(args: argparse.Namespace) -> int:
    src = _lstat(args.source)
    mount = find_mount(args.source)
    fields: dict[str, Any] = {"source": src.st_ino, "readonly": args.readonly}
    named = "/" not in args.target
    if named:
        fields["name"] = os.fsencode(args.target).hex()
        fields["path"] = _relative(mount, args.source)
    else:
        dst = os.path.abspath(args.target)
        if find_mount(dst).root != mount.root:
            raise UsageError(f"{args.target} is not in the same cloudfs as {args.source}")
        if os.path.lexists(dst):
            raise UsageError(f"{args.target} exists")
        try:
            fields["parent"] = os.stat(os.path.dirname(dst)).st_ino
        except FileNotFoundError:
            raise UsageError(f"{os.path.dirname(dst)}: no such directory") from None
        fields["dst"] = os.fsencode(os.path.basename(dst)).hex()
    result = await mount_command(mount, "snapshot", **fields)
    what = f"snapshot {args.target}" if named else args.target
    mode = " (read-only)" if named or args.readonly else ""
    print(
        f"{what}{mode}: {result['inodes']} entries of {args.source} copied in "
        f"{result['seconds']:.2f} s, no data copied"
    )
    return 0


async def cmd_snapshot_list(args: argparse.Namespace) -> int:
    from cloudfs.snapshots import list_snapshots

    mount = find_mount(args.mountpoint)
    meta = mount.meta()
    try:
        async with meta.reading() as tx:
            snaps = await list_snapshots(tx)
    finally:
        await meta.close()
    if args.json:
        print(json.dumps([
            {"name": os.fsdecode(s.name), "created_ns": s.created_ns,
             "source": os.fsdecode(s.source), "readonly": s.readonly}
            for s in snaps
        ], indent=2))  # fmt: skip
        return 0
    if not snaps:
        print("no snapshots")
        return 0
    rows = [[os.fsdecode(s.name), show_time(s.created_ns), os.fsdecode(s.source)] for s in snaps]
    print_table(["NAME", "CREATED", "SOURCE"], rows)
    return 0


async def cmd_snapshot_delete(args: argparse.Namespace) -> int:
    mount = find_mount(args.mountpoint)
    result = await mount_command(mount, "snapshot-delete", name=os.fsencode(args.name).hex())
    print(f"deleted snapshot {args.name} ({result['inodes']} entries)")
    return 0


async def cmd_snapshot_unlock(args: argparse.Namespace) -> int:
    st = _lstat(args.path)
    mount = find_mount(args.path)
    if _relative(mount, args.path).startswith("/.cloudfs/"):
        raise UsageError("the history view and named snapshots stay read-only; copy them")
    result = await mount_command(mount, "unlock", inode=st.st_ino)
    print(f"{args.path}: writable ({result['inodes']} entries were read-only)")
    return 0


# --- trash ---------------------------------------------------------------------------------


def _type_of(mode: int) -> str:
    return {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "symlink"}.get(
        stat.S_IFMT(mode), "special"
    )


async def cmd_trash_list(args: argparse.Namespace) -> int:
    from cloudfs.trash import entries

    mount = find_mount(args.path)
    under = os.fsencode(_relative(mount, args.path))
    meta = mount.meta()
    try:
        async with meta.reading() as tx:
            found = await entries(tx, None if under == b"/" else under)
    finally:
        await meta.close()
    if args.json:
        print(json.dumps([
            {"id": e.id, "path": os.fsdecode(e.path), "deleted_ns": e.deleted_ns,
             "type": _type_of(e.mode), "size": e.size}
            for e in found
        ], indent=2))  # fmt: skip
        return 0
    if not found:
        print("the trash is empty" if under == b"/" else "nothing in the trash there")
        return 0
    rows = [
        [str(e.id), show_time(e.deleted_ns), _type_of(e.mode),
         human_size(e.size) if stat.S_ISREG(e.mode) else "", os.fsdecode(e.path)]
        for e in found
    ]  # fmt: skip
    print_table(["ID", "DELETED", "TYPE", "SIZE", "PATH"], rows, right=frozenset({0, 3}))
    return 0


async def cmd_trash_restore(args: argparse.Namespace) -> int:
    mount = find_mount(args.path)
    fields: dict[str, Any] = {"path": os.fsencode(_relative(mount, args.path)).hex()}
    if args.id is not None:
        fields["id"] = args.id
    if args.to is not None:
        if find_mount(args.to).root != mount.root:
            raise UsageError(f"{args.to} is not in the same cloudfs")
        fields["to"] = os.fsencode(_relative(mount, args.to)).hex()
    result = await mount_command(mount, "trash-restore", **fields)
    restored = [os.fsdecode(bytes.fromhex(p)) for p in result["restored"]]
    print(f"restored {len(restored)} entr{'y' if len(restored) == 1 else 'ies'}: "
          f"{mount.root}{restored[0]}" + (" and below" if len(restored) > 1 else ""))  # fmt: skip
    return 0


async def cmd_trash_purge(args: argparse.Namespace) -> int:
    from cloudfs.retention import parse_duration

    from cloudfs.fsck.runner import Progress
    from cloudfs.trash import entries

    mount = find_mount(args.path)
    fields: dict[str, Any] = {}
    under = _relative(mount, args.path)
    if under != "/":
        fields["path"] = os.fsencode(under).hex()
    before = None
    if args.older_than is not None:
        age = parse_duration(args.older_than)
        if age is None:
            raise UsageError("--older-than forever purges nothing")
        before = fields["before_ns"] = int((time.time() - age) * 1e9)
    # in batches, so that no transaction of the mount holds a huge trash at once
    meta = mount.meta()
    try:
        async with meta.reading() as tx:
            found = await entries(tx, None if under == "/" else os.fsencode(under))
    finally:
        await meta.close()
    ids = [e.id for e in found if before is None or e.deleted_ns < before]
    progress, purged = Progress(), 0
    for start in range(0, len(ids), PURGE_BATCH):
        part = ids[start : start + PURGE_BATCH]
        result = await mount_command(mount, "trash-purge", **fields, ids=part)
        purged += result["entries"]
        progress("trash purge", start + len(part), len(ids))
    print(f"purged {purged} entries from the trash")
    return 0


# --- retention and garbage collection ------------------------------------------------------


async def cmd_retention(args: argparse.Namespace) -> int:
    from cloudfs import retention

    mount = find_mount(args.mountpoint)
    meta = mount.meta()
    try:
        if args.policy is None:
            async with meta.reading() as tx:
                policy = await retention.load(tx)
        else:
            async with meta.transaction() as tx:
                policy = retention.parse_policy(args.policy, await retention.load(tx))
                await retention.save(tx, policy)
    finally:
        await meta.close()
    print(policy.describe())
    return 0


def _now(args: argparse.Namespace) -> int:
    return parse_time(args.now) if args.now else time.time_ns()


async def cmd_prune(args: argparse.Namespace) -> int:
    from cloudfs import retention, trash

    mount = find_mount(args.mountpoint)
    now = _now(args)
    meta = mount.meta()
    try:
        report = await retention.prune(meta, now, dry_run=args.dry_run, trash=False)
        async with meta.reading() as tx:
            policy = await retention.load(tx)
            before = None if policy.trash is None else now - int(policy.trash * 1e9)
            if before is not None and args.dry_run:
                report.trash = len([e for e in await trash.entries(tx) if e.deleted_ns < before])
    finally:
        await meta.close()
    if before is not None and not args.dry_run:
        # through the mount: what it still has open is freed at the last close
        report.trash = (await mount_command(mount, "trash-purge", before_ns=before))["entries"]
    if args.json:
        print(json.dumps(report.to_json()))
        return 0
    verb = "would drop" if args.dry_run else "dropped"
    print(f"{verb} {report.versions} versions of {report.files} files "
          f"({report.extents} extent rows) and {report.trash} trash entries")  # fmt: skip
    return 0


async def cmd_gc(args: argparse.Namespace) -> int:
    from cloudfs.tools._cli import open_cli_store

    from cloudfs import gc
    from cloudfs.retention import parse_duration

    mount = find_mount(args.mountpoint)
    grace = parse_duration(args.grace) if args.grace is not None else gc.GRACE_S
    if grace is None:
        raise UsageError("--grace forever collects nothing")
    now = _now(args)
    from cloudfs.fsck.runner import Progress

    config = mount.cache.read_config()
    meta = mount.meta()
    try:
        if args.dry_run:
            report = await gc.collectable(meta, now, grace)
        else:
            progress = Progress()
            total = (await gc.collectable(meta, now, grace)).blocks if progress.tty else 0
            store = open_cli_store(config.storage, dict(config.options))
            try:
                report = await gc.collect(
                    meta, store, mount.cache, now_ns=now, grace_s=grace,
                    progress=lambda n: progress("gc", min(n, total), total),
                )  # fmt: skip
            finally:
                await store.aclose()
            if total:
                progress("gc", total, total)  # ends the line
    finally:
        await meta.close()
    if args.json:
        print(json.dumps(report.to_json()))
    elif report.skipped:
        print(f"nothing done: {report.skipped}")
    else:
        verb = "would free" if args.dry_run else "freed"
        print(f"{verb} {report.blocks} blocks: {human_size(report.stored_bytes)} in the store "
              f"({human_size(report.plain_bytes)} of data)")  # fmt: skip
    if report.errors:
        raise CommandFailed("; ".join(report.errors))
    return 0


def add_parser(sub: Any) -> None:
    v = sub.add_parser("versions", help="list the versions of a file")
    v.add_argument("file")
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.set_defaults(func=cmd_versions)

    r = sub.add_parser(
        "restore",
        help="bring back a version of a file as its newest version (or as a new file); "
        "no data is copied",
    )
    r.add_argument("file")
    which = r.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", type=int, metavar="N", help="version number (see versions)")
    which.add_argument("--at", metavar="TIME",
                       help="the newest version at TIME: '2024-05-01 12:30', @EPOCH, '2h ago'")  # fmt: skip
    r.add_argument("--to", metavar="NEWPATH", help="restore into a new file instead")
    r.set_defaults(func=cmd_restore)

    s = sub.add_parser("snapshot", help="copy-on-write copies of trees (metadata only)")
    ssub = s.add_subparsers(dest="snapshot_command", required=True)
    c = ssub.add_parser(
        "create",
        help="copy the tree SRC as a named read-only snapshot (NAME, seen under "
        "MOUNTPOINT/.cloudfs/snapshots/NAME) or to a path DST (anything with a '/')",
    )
    c.add_argument("source", metavar="SRC")
    c.add_argument("target", metavar="NAME|DST")
    c.add_argument("--readonly", action="store_true",
                   help="DST refuses every change (EROFS) until `snapshot unlock`")  # fmt: skip
    c.set_defaults(func=cmd_snapshot_create)
    ls = ssub.add_parser("list", help="the named snapshots of a mount")
    ls.add_argument("mountpoint")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_snapshot_list)
    d = ssub.add_parser("delete", help="delete a named snapshot")
    d.add_argument("mountpoint")
    d.add_argument("name")
    d.set_defaults(func=cmd_snapshot_delete)
    u = ssub.add_parser("unlock", help="make a read-only copy (made with --readonly) writable")
    u.add_argument("path")
    u.set_defaults(func=cmd_snapshot_unlock)

    t = sub.add_parser("trash", help="unlinked files and removed trees, kept for a while")
    tsub = t.add_subparsers(dest="trash_command", required=True)
    tl = tsub.add_parser("list", help="what the trash holds (of a mount, or below a path)")
    tl.add_argument("path", metavar="MOUNTPOINT|PATH")
    tl.add_argument("--json", action="store_true", help="machine-readable output")
    tl.set_defaults(func=cmd_trash_list)
    tr = tsub.add_parser(
        "restore", help="bring back what was deleted at PATH (a directory with its contents)"
    )
    tr.add_argument("path", metavar="PATH", help="the path it had (in the mount)")
    tr.add_argument("--id", type=int, help="the entry to restore (see trash list)")
    tr.add_argument("--to", metavar="NEWPATH", help="restore it at another path")
    tr.set_defaults(func=cmd_trash_restore)
    tp = tsub.add_parser("purge", help="free what the trash holds, for good")
    tp.add_argument("path", metavar="MOUNTPOINT|PATH")
    tp.add_argument("--older-than", metavar="DURATION", help="only entries deleted this long ago")
    tp.set_defaults(func=cmd_trash_purge)

    rt = sub.add_parser(
        "retention",
        help="show or change how long versions and the trash are kept "
        "(keep-all=1d,hourly=7d,daily=30d,trash=30d)",
    )
    rt.add_argument("mountpoint")
    rt.add_argument("policy", nargs="?", metavar="NAME=DURATION[,...]",
                    help="keep-all, hourly, daily, trash; durations like 30d, 12h, 0, forever")  # fmt: skip
    rt.set_defaults(func=cmd_retention)
    pr = sub.add_parser("prune", help="apply the retention policy now (the daemon does hourly)")
    pr.add_argument("mountpoint")
    pr.add_argument("--dry-run", action="store_true", help="only report what would go")
    pr.add_argument("--now", metavar="TIME", help="the time to apply it at (default: now)")
    pr.add_argument("--json", action="store_true", help="machine-readable output")
    pr.set_defaults(func=cmd_prune)
    g = sub.add_parser(
        "gc", help="delete from the store the blocks nothing references (the daemon does hourly)"
    )
    g.add_argument("mountpoint")
    g.add_argument("--dry-run", action="store_true", help="only report what would be freed")
    g.add_argument("--grace", metavar="DURATION",
                   help="how long a block stays unreferenced first (default 1h)")  # fmt: skip
    g.add_argument("--now", metavar="TIME", help="the time to run at (default: now)")
    g.add_argument("--json", action="store_true", help="machine-readable output")
    g.set_defaults(func=cmd_gc)


__all__ = ["XATTR_RESULT", "add_parser", "find_mount", "mount_command"]
