"""The daemon's metadata backups (cloudfs.metabackup): every backup interval, when
the last mount leaves (a mount that crashed took no backup at its unmount), and
before the daemon exits idle (its uploads changed block states since the unmount) —
each time only if the SQLite database changed since the last backup.

With MySQL metadata the backup is a row dump of one consistent snapshot
(metabackup.put_rows_backup). Several machines' daemons share that database: the one
that claims a backup in it takes it, the others skip it while that claim is younger
than half the backup interval (or than the gap the caller names)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

import trio

from cloudfs.cache import CacheDir
from cloudfs.codec.crypto import Keys
from cloudfs.errors import CloudfsError
from cloudfs.meta.base import MetaStore
from cloudfs.metabackup import put_backup, put_rows_backup
from cloudfs.objectstore.base import ObjectStore

log = logging.getLogger(__name__)

#: a shared (MySQL) database is not backed up again within this many seconds of the
#: last backup claimed in it, unless asked (there is no cheap "unchanged" test there:
#: this keeps the occasions when a mount leaves or a daemon exits from piling up)
SHARED_MIN_GAP_S = 60.0


class Backups:
    """`settings()` gives (interval in seconds, backups to keep); they may change."""

    def __init__(
        self,
        cache: CacheDir,
        db_path: Path | None,
        store: ObjectStore,
        keys: Keys,
        *,
        encrypt: bool,
        level: int,
        settings: Callable[[], tuple[float, int]],
        shared_meta: MetaStore | None = None,
    ) -> None:
        """`db_path`: the SQLite database; else `shared_meta`, a MySQL one (row dumps);
        neither: no backups."""
        self.cache = cache
        self.db_path = db_path
        self.shared_meta = shared_meta if db_path is None else None
        self.store = store
        self.keys = keys
        self.encrypt = encrypt
        self.level = level
        self._settings = settings
        self._lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        #: backups put since the daemon started, and the last one's key
        self.taken = 0
        self.last: str | None = None
        self.failed = 0
        #: why no backup may be put any more (the mount lease was taken over: a backup
        #: of this database would now shadow the new holder's), or None
        self.fenced: str | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Take periodic backups, and host those asked for with `soon`."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                if self.db_path is None and self.shared_meta is None:
                    log.info("no metadata backups here")
                    await trio.sleep_forever()
                while True:
                    interval = self._settings()[0]
                    await trio.sleep(interval)
                    # shared database: another machine's daemon may have taken this
                    # period's backup
                    await self.backup("periodic", unless_within=interval / 2)
        finally:
            self._nursery = None  # stopping: nothing more starts

    def soon(self, reason: str, *, unless_within: float = 0.0) -> None:
        """Back up in the background (the caller does not wait); not while stopping."""
        if self._nursery is None or (self.db_path is None and self.shared_meta is None):
            return
        try:
            self._nursery.start_soon(
                functools.partial(self.backup, reason, unless_within=unless_within)
            )
        except RuntimeError:
            pass  # the nursery is closing: the daemon stops

    async def backup(
        self, reason: str, *, force: bool = False, unless_within: float = 0.0
    ) -> str | None:
        """Back up now if the database changed (or `force`), unless the last backup is
        less than `unless_within` seconds old; the new key, else None. A failure is
        logged and retried at the next occasion."""
        if self.fenced is not None:
            return None
        async with self._lock:
            try:
                if self.db_path is not None:
                    key = await put_backup(self.store, self.keys, self.cache, self.db_path,
                                           encrypt=self.encrypt, level=self.level,
                                           keep=self._settings()[1], force=force,
                                           unless_within=unless_within)  # fmt: skip
                elif self.shared_meta is not None:
                    key = await put_rows_backup(self.store, self.keys, self.cache,
                                                self.shared_meta, encrypt=self.encrypt,
                                                level=self.level, keep=self._settings()[1],
                                                force=force,
                                                unless_within=max(unless_within,
                                                                  SHARED_MIN_GAP_S))  # fmt: skip
                else:
                    return None
            except (CloudfsError, OSError) as exc:
                self.failed += 1
                message = exc.message if isinstance(exc, CloudfsError) else str(exc)
                log.warning("metadata backup (%s) failed: %s", reason, message)
                return None
        if key is not None:
            self.taken += 1
            self.last = key
            log.info("metadata backed up (%s): %s", reason, key)
        return key

    def status(self) -> dict[str, object]:
        return {"backups": self.taken, "last_backup": self.last, "backup_errors": self.failed}
