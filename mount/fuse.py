"""Which request loop serves the mount: cloudfs's own (`kernel.py`, straight on
/dev/fuse) or pyfuse3's (libfuse). Both call the same `Operations` handlers with the
same arguments and take the same reply types; this module is the one place that
knows which loop runs (`-o fuse_loop=`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pyfuse3
import trio

from . import kernel, spin

LOOPS = ("direct", "pyfuse3")
DEFAULT_LOOP = "direct"

_session: kernel.Session | None = None


def init(
    operations: Any, mountpoint: str, options: Iterable[str], loop: str = DEFAULT_LOOP
) -> None:
    """Mount; the kernel's requests are answered once `main` runs."""
    global _session
    if loop not in LOOPS:
        raise ValueError(f"unknown FUSE loop {loop!r}")
    if loop == "direct":
        session = kernel.Session(operations, mountpoint, options)
        session.mount()
        _session = session
    else:
        _session = None
        pyfuse3.init(operations, mountpoint, set(options))


async def main(poll_s: float = 0.0) -> None:
    """Answer the kernel until unmounted or `terminate`d. `poll_s`: how long the loop
    polls the device before it sleeps while requests come back to back (spin.py)."""
    if _session is not None:
        _session.spin_s = poll_s
        await _session.serve()
        return
    poller = spin.install(poll_s)
    try:
        await pyfuse3.main()
    finally:
        if poller is not None:
            trio.lowlevel.remove_instrument(poller)


def terminate() -> None:
    if _session is not None:
        _session.terminate()
    else:
        pyfuse3.terminate()


def close(unmount: bool = True) -> None:
    global _session
    if _session is not None:
        try:
            _session.close(unmount=unmount)
        finally:
            _session = None
    else:
        pyfuse3.close(unmount=unmount)


def invalidate_inode(inode: int, attr_only: bool = False) -> None:
    """Drop what the kernel caches of an inode (attributes only, or data too).
    Raises OSError if the kernel does not know it."""
    if _session is not None:
        _session.invalidate_inode(inode, attr_only)
    else:
        pyfuse3.invalidate_inode(inode, attr_only)


def invalidate_entry(parent: int, name: bytes, deleted: int = 0) -> None:
    if _session is not None:
        _session.invalidate_entry(parent, name, deleted)
    else:
        pyfuse3.invalidate_entry(parent, name, deleted)


def readdir_reply(token: Any, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
    if isinstance(token, kernel.ReaddirToken):
        return kernel.readdir_reply(token, name, attr, next_id)
    return bool(pyfuse3.readdir_reply(token, name, attr, next_id))
