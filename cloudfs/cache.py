"""The cache directory: its layout, block files, and the per-mount configuration.

Layout (one cache dir per filesystem and machine):
    config.json          storage URL, metadata URL, fs uuid (never secrets)
    meta.db              SQLite metadata (the default engine)
    blocks/ab/<64 hex>   plaintext of one block: complete and immutable
    tmp/                 temporary files, renamed into place when complete
    dirty/<ino>          dirty overlays of the mount (sparse files)
    daemon.sock, daemon.lock, daemon.pid, daemon.log

A block file is written to tmp/, (fsynced,) and renamed: a reader never sees a partial
block. Only the daemon deletes block files, and only blocks that are stored.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cloudfs.errors import MetadataMissing


@dataclass
class CacheConfig:
    """What a cache dir serves: written by mkfs / first mount, read by every process."""

    storage: str
    metadata: str
    uuid: str
    #: options for `open_store(storage, **options)` (S3 endpoint, region, addressing
    #: style); never credentials: the stores accept no option that could hold one
    options: dict[str, Any] = field(default_factory=dict)
    #: the file holding the MySQL password of `metadata` (a URL kept without its
    #: password), if one was named; else the daemon gets it from the mount or the env
    metadata_password_file: str | None = None


class CacheDir:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).absolute()
        self.blocks = self.root / "blocks"
        self.tmp = self.root / "tmp"
        self.dirty = self.root / "dirty"
        self.config_path = self.root / "config.json"
        self.meta_path = self.root / "meta.db"
        self.socket_path = self.root / "daemon.sock"
        self.lock_path = self.root / "daemon.lock"
        self.pid_path = self.root / "daemon.pid"
        self.log_path = self.root / "daemon.log"

    def create(self) -> None:
        for d in (self.root, self.blocks, self.tmp, self.dirty):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        for i in range(256):
            (self.blocks / f"{i:02x}").mkdir(exist_ok=True)

    # --- config -------------------------------------------------------------------------

    def write_config(self, config: CacheConfig) -> None:
        self.create()
        tmp = self.tmp / "config.json"
        tmp.write_text(json.dumps(asdict(config), indent=2) + "\n")
        os.replace(tmp, self.config_path)

    def read_config(self) -> CacheConfig:
        try:
            data = json.loads(self.config_path.read_text())
        except FileNotFoundError:
            raise MetadataMissing(f"{self.root} is not a cloudfs cache dir") from None
        return CacheConfig(**data)

    # --- blocks -------------------------------------------------------------------------

    def block_path(self, block_id: bytes) -> Path:
        h = block_id.hex()
        return self.blocks / h[:2] / h

    def has_block(self, block_id: bytes) -> bool:
        return self.block_path(block_id).exists()

    def write_block(self, block_id: bytes, data: bytes | memoryview, *, durable: bool) -> None:
        """Put a block's plaintext in place atomically (blocking; call from a thread).

        `durable`: fsync the file before it is renamed into place (the caller syncs the
        directories with `sync_blocks`)."""
        path = self.block_path(block_id)
        tmp = self.tmp / f"{path.name}.{os.getpid()}.{id(data):x}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def sync_blocks(self, unsynced: list[bytes], renamed: list[bytes]) -> None:
        """Make block files durable: fsync the `unsynced` ones (written without fsync),
        then the directories that they and the `renamed` ones (already fsynced) were
        renamed into."""
        for block_id in unsynced:
            try:
                fd = os.open(self.block_path(block_id), os.O_RDONLY)
            except FileNotFoundError:
                continue  # uploaded and evicted meanwhile: it is in the store
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for sub in sorted({b.hex()[:2] for b in (*unsynced, *renamed)}):
            fd = os.open(self.blocks / sub, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def remove_block(self, block_id: bytes) -> int:
        """Delete a block file; return the bytes freed (0 if it was not there)."""
        path = self.block_path(block_id)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size

    def cached_block_ids(self) -> list[bytes]:
        """Ids of every block file in the cache dir (blocking; call from a thread)."""
        ids: list[bytes] = []
        for sub in self.blocks.iterdir():
            for entry in os.scandir(sub):
                if len(entry.name) == 64:
                    try:
                        ids.append(bytes.fromhex(entry.name))
                    except ValueError:
                        continue  # not a block file
        return ids

    def clear_tmp(self) -> None:
        for p in self.tmp.iterdir():
            if p.name != "config.json":
                p.unlink(missing_ok=True)


class BlockFiles:
    """Open file descriptors of cached blocks, least recently used closed first.

    Blocks never change, so a descriptor stays valid even after the daemon evicts the
    file: reads of it keep working until it is closed."""

    def __init__(self, cache: CacheDir, max_open: int = 256) -> None:
        self.cache = cache
        self.max_open = max_open
        self._fds: OrderedDict[bytes, int] = OrderedDict()
        self._lock = threading.Lock()  # the seal's worker thread reads blocks too

    def pread(self, block_id: bytes, length: int, offset: int) -> bytes:
        """Bytes of a cached block; FileNotFoundError when it is not in the cache."""
        with self._lock:
            fd = self._fds.get(block_id)
            if fd is None:
                fd = os.open(self.cache.block_path(block_id), os.O_RDONLY)
                self._fds[block_id] = fd
                if len(self._fds) > self.max_open:
                    _, old = self._fds.popitem(last=False)
                    os.close(old)
            else:
                self._fds.move_to_end(block_id)
            # pread under the lock: another thread must not close this fd meanwhile
            return os.pread(fd, length, offset)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
