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

import json
import re
from dataclasses import asdict, dataclass, fields

from cloudfs.errors import UsageError
from cloudfs.meta.base import Txn

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
    text = await tx.get_info(INFO_KEY)
    return DEFAULT if text is None else Policy.from_json(text)


async def save(tx: Txn, policy: Policy) -> None:
    check(policy)
    await tx.set_info(INFO_KEY, policy.to_json())
