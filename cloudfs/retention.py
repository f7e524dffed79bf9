"""The retention policy: how long versions and the trash are kept, and the pruning
that applies it.

Policy (meta_info "retention", JSON; set at mkfs, changed with `cloudfs retention`):
    keep_all  every version younger than this is kept            (default 1 day)
    hourly    then the newest version of each hour, until this    (default 7 days)
    daily     then the newest version of each day, until this     (default 30 days)
    trash     unlinked files and removed trees are kept this long (default 30 days)
Older versions are pruned; the newest version of a file is always kept (it is the
file's contents). A trash of 0 frees unlinked files at once. Durations are seconds;
None means forever.
"""

from __future__ import annotations

import bisect
import json
import logging
import re
from dataclasses import asdict, dataclass, fields

from cloudfs.errors import UsageError
from cloudfs.meta.base import MetaStore, Txn
from cloudfs.meta.schema import LIVE

log = logging.getLogger(__name__)

DAY = 86400.0
INFO_KEY = "retention"


@dataclass(frozen=True)
class Policy:
    keep_all: float | None = DAY
    hourly: float | None = 7 * DAY
    daily: float | None = 30 * DAY
    trash: float | None = 30 * DAY

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Policy:
        data = json.loads(text)
        return cls(**{f.name: data.get(f.name, getattr(cls, f.name)) for f in fields(cls)})

    def describe(self) -> str:
        return ",".join(f"{f.name.replace('_', '-')}={format_duration(getattr(self, f.name))}"
                        for f in fields(self))  # fmt: skip


DEFAULT = Policy()

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw]?)$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": DAY, "w": 7 * DAY}


def parse_duration(text: str) -> float | None:
    """Seconds of `30d`, `12h`, `90m`, `45s`, `2w`, a plain number of seconds, or None
    for `forever`."""
    t = text.strip().lower()
    if t in ("forever", "inf", "never"):
        return None
    m = _DURATION.match(t)
    if m is None:
        raise UsageError(f"not a duration: {text!r} (examples: 30d, 12h, 90m, 0, forever)")
    return float(m.group(1)) * _UNIT[m.group(2)]


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "forever"
    for unit, size in (("w", 7 * DAY), ("d", DAY), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def parse_policy(spec: str, base: Policy = DEFAULT) -> Policy:
    """`keep-all=1d,hourly=7d,daily=30d,trash=30d` (any subset) over `base`."""
    names = {f.name.replace("_", "-"): f.name for f in fields(Policy)}
    changes: dict[str, float | None] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in names:
            raise UsageError(
                f"retention: {part!r} is not NAME=DURATION with NAME one of {', '.join(names)}"
            )
        changes[names[key.strip()]] = parse_duration(value)
    policy = Policy(**{**asdict(base), **changes})
    check(policy)
    return policy


def check(policy: Policy) -> None:
    """The thinning stages must be in order: keep-all <= hourly <= daily."""
    stages = [policy.keep_all, policy.hourly, policy.daily]
    limits = [float("inf") if s is None else s for s in stages]
    if limits != sorted(limits):
        raise UsageError(f"retention: keep-all <= hourly <= daily is needed ({policy.describe()})")


async def load(tx: Txn) -> Policy:
    return of_info(await tx.get_info(INFO_KEY))


def of_info(text: str | None) -> Policy:
    """The policy stored as `text` under INFO_KEY (None: never set, the default)."""
    return DEFAULT if text is None else Policy.from_json(text)


async def save(tx: Txn, policy: Policy) -> None:
    check(policy)
    await tx.set_info(INFO_KEY, policy.to_json())


# --- pruning ---------------------------------------------------------------------------------

HOUR_NS = 3600 * 10**9
DAY_NS = 86400 * 10**9
#: files per pruning transaction
PRUNE_BATCH = 100


@dataclass
class PruneReport:
    """What a pruning run did (or, dry, would do)."""

    versions: int = 0  # version rows dropped
    extents: int = 0  # history extent rows dropped
    files: int = 0  # files that lost versions
    trash: int = 0  # trash entries purged

    def to_json(self) -> dict[str, int]:
        return asdict(self)


def kept_versions(versions: list[tuple[int, int]], now_ns: int, policy: Policy) -> set[int]:
    """Of a file's published versions [(version, committed_ns)], those the policy keeps
    at `now_ns`: the newest always; every one younger than keep-all; then the newest
    of each hour until `hourly`, of each day until `daily`."""
    if not versions:
        return set()
    keep = {max(v for v, _c in versions)}
    buckets: dict[tuple[str, int], tuple[int, int]] = {}
    stages = [("all", policy.keep_all), ("hour", policy.hourly), ("day", policy.daily)]
    for version, committed in versions:
        age = (now_ns - committed) / 1e9
        for stage, limit in stages:
            if limit is None or age < limit:
                if stage == "all":
                    keep.add(version)
                else:
                    key = (stage, committed // (HOUR_NS if stage == "hour" else DAY_NS))
                    best = buckets.get(key)
                    if best is None or (committed, version) > best:
                        buckets[key] = (committed, version)
                break
    keep.update(v for _c, v in buckets.values())
    return keep


async def prune_file(
    tx: Txn, ino: int, now_ns: int, policy: Policy, *, dry_run: bool
) -> tuple[int, int]:
    """Drop the versions of `ino` the policy does not keep, and the history extent rows
    no kept version needs (their blocks lose a reference). Live rows are never
    touched. Returns (versions dropped, extent rows dropped)."""
    rows = await tx.conn.query("SELECT version, committed_ns FROM versions WHERE inode = ?", (ino,))
    versions = [(int(v), int(c)) for v, c in rows]
    keep = sorted(kept_versions(versions, now_ns, policy))
    dropped = [v for v, _c in versions if v not in set(keep)]
    if not dropped:
        return 0, 0
    history = await tx.conn.query(
        "SELECT v_to, file_offset, v_from, block FROM extents WHERE inode = ? AND v_to <> ?",
        (ino, LIVE),
    )
    unneeded = []
    for v_to, offset, v_from, block in history:
        i = bisect.bisect_left(keep, v_from)
        if not (i < len(keep) and keep[i] < v_to):
            unneeded.append((int(v_to), int(offset), bytes(block)))
    if not dry_run:
        await tx.conn.executemany(
            "DELETE FROM versions WHERE inode = ? AND version = ?", [(ino, v) for v in dropped]
        )
        await tx.conn.executemany(
            "DELETE FROM extents WHERE inode = ? AND v_to = ? AND file_offset = ?",
            [(ino, v_to, off) for v_to, off, _b in unneeded],
        )
        await tx.unref_blocks([b for _v, _o, b in unneeded], now_ns)
    return len(dropped), len(unneeded)


async def prune(
    meta: MetaStore, now_ns: int, *, dry_run: bool = False, trash: bool = True
) -> PruneReport:
    """Apply the filesystem's policy at `now_ns` to every file's versions, and (with
    `trash`) purge the trash entries older than the policy's trash period."""
    report = PruneReport()
    async with meta.reading() as tx:
        policy = await load(tx)
    if policy.keep_all is not None:
        cutoff = now_ns - int(policy.keep_all * 1e9)
        after = 0
        while True:
            async with meta.reading() as tx:
                rows = await tx.conn.query(
                    "SELECT DISTINCT inode FROM versions WHERE committed_ns < ? AND inode > ?"
                    " ORDER BY inode LIMIT ?",
                    (cutoff, after, PRUNE_BATCH),
                )
            inodes = [int(r[0]) for r in rows]
            if not inodes:
                break

            async def batch(inodes: list[int] = inodes) -> list[tuple[int, int]]:
                async with meta.transaction(write=not dry_run) as tx:
                    return [
                        await prune_file(tx, ino, now_ns, policy, dry_run=dry_run) for ino in inodes
                    ]

            for versions, extents in await meta.run(batch):
                report.versions += versions
                report.extents += extents
                report.files += 1 if versions else 0
            after = inodes[-1]
    if trash and policy.trash is not None:
        from cloudfs import trash as trash_mod

        before = now_ns - int(policy.trash * 1e9)
        if dry_run:
            async with meta.reading() as tx:
                report.trash = len(
                    [e for e in await trash_mod.entries(tx) if e.deleted_ns < before]
                )
        else:
            while True:

                async def purge() -> int:
                    async with meta.transaction() as tx:
                        return await trash_mod.purge_older(tx, before, now_ns)

                purged = await meta.run(purge)
                report.trash += purged
                if purged == 0:
                    break
    if report.versions or report.trash:
        log.info("retention: dropped %d versions of %d files (%d extent rows), purged %d "
                 "trash entries", report.versions, report.files, report.extents, report.trash)  # fmt: skip
    return report
