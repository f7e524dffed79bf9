"""The cache directory: its layout, block files, the per-mount configuration, and the
accounting of its size (the limit, what may be evicted, and the order of eviction).

Layout (one cache dir per filesystem and machine):
    config.json          storage URL, metadata URL, fs uuid (never secrets)
    meta.db              SQLite metadata (the default engine)
    blocks/ab/<64 hex>   plaintext of one block: complete and immutable
    tmp/                 temporary files, renamed into place when complete
    dirty/<ino>          dirty overlays of the mount (sparse files)
    holds/<64 hex>.<pid>.<n>  hard links to block files a seal re-uses: the plaintext
                         stays while the seal commits (see FileStore._commit)
    daemon.sock, daemon.lock, daemon.pid, daemon.log

A block file is written to tmp/, (fsynced,) and renamed: a reader never sees a partial
block. Only the daemon deletes block files, and only blocks that are stored.

Size limit: block files and dirty overlays together stay under the cache size. The
daemon's evictor deletes the files of stored blocks, least recently used first: a
block file's mtime is its last use (the fetcher writes it, the mount touches it when
it reads it), so the order survives restarts. Pending blocks and dirty overlays are
never evicted; when they alone fill the cache, the mount's writers wait for uploads
(`CacheSpace`) and get ENOSPC if none come.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import itertools
import json
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from cloudfs.errors import FSOpError, MetadataMissing

log = logging.getLogger(__name__)

GiB = 1 << 30
#: the default cache size is this share of the filesystem holding the cache dir ...
DEFAULT_SHARE_OF_DISK = 0.10
#: ... but at most this share of the space free for it (free space plus the cache's
#: own files), so a nearly full disk is not filled up ...
DEFAULT_SHARE_OF_FREE = 0.50
#: ... and at least this much (a smaller cache would thrash on one big file)
DEFAULT_MIN = 1 * GiB
#: how long a write waits for cache space before it fails with ENOSPC
DEFAULT_FULL_WAIT_S = 60.0
#: writers wait once data not uploaded fills this share of the cache: the rest is room
#: for blocks being read and for uploaded ones on their way out (the evictor's LOW_WATER)
UNUPLOADED_SHARE = 0.8
#: sync_file_range(2)'s "start writing these pages back now, do not wait"
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int], None] | None:
    """sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE) through libc (Python has no
    binding), or None where libc lacks it. ctypes drops the GIL around the call."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def start_writeback(fd: int) -> None:
        fn(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # best effort: fsync later is what counts

    return start_writeback


#: start the disk write of a file's dirty pages without waiting (None: unsupported)
start_writeback = _load_sync_file_range()

#: fsyncs run at once by CacheDir.sync_blocks
SYNC_THREADS = 8


class ThreadPool:
    """A thread pool made on first use, and made again in a forked child (whose copy
    has no threads: mount.cloudfs forks after preparing the mount)."""

    def __init__(self, threads: int, name: str) -> None:
        self.threads = threads
        self.name = name
        self._pool: ThreadPoolExecutor | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def get(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix=self.name)
                self._pid = os.getpid()
            return self._pool


_sync_pool = ThreadPool(SYNC_THREADS, "cloudfs-fsync")

#: empty temporary files `SpareFiles` keeps ready, and the count that has it make more
SPARE_FILES = 64
SPARE_LOW = 32


class SpareFiles:
    """Empty temporary files, made ahead on a thread of their own, for the block files
    of seals (`CacheDir.write_block`). Making a file (an inode) is the costliest step
    of writing a small block, and on some ext4 disks it costs far more than the rest
    (0.8 ms in some directories of this test machine's disk against 15 us in others):
    the seal of a closed small file runs on the mount's event loop, which meanwhile
    answers nothing. Taken here, the file only needs opening.

    The files live in the cache dir's tmp/ and are named `spare.<pid>.<n>`, so the
    cleanup of a crashed process's temporary files (`clear_stale_tmp`) removes them
    too; `close` removes those left at unmount. Made again in a forked child."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._files: deque[str] = deque()
        self._wanted = threading.Event()
        self._pid = 0
        self._closed = False
        self._lock = threading.Lock()
        self._numbers = itertools.count()

    def take(self) -> str | None:
        """An empty file to write (the caller renames or removes it), or None (write a
        file of your own) when none is ready."""
        if self._pid != os.getpid():
            self._start()
        try:
            path: str | None = self._files.popleft()
        except IndexError:
            path = None
        if len(self._files) < SPARE_LOW:
            self._wanted.set()
        return path

    def _start(self) -> None:
        with self._lock:
            if self._pid == os.getpid() or self._closed:
                return
            self._files = deque()  # a forked child's copy names its parent's files
            self._wanted = threading.Event()
            self._pid = os.getpid()
            threading.Thread(target=self._make, name="cloudfs-spare-files", daemon=True).start()

    def _make(self) -> None:
        pid, files, wanted = self._pid, self._files, self._wanted
        while not self._closed:
            wanted.wait()
            wanted.clear()
            while len(files) < SPARE_FILES and not self._closed:
                path = f"{self._prefix}spare.{pid}.{next(self._numbers)}"
                try:
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                except FileNotFoundError:
                    return  # the cache dir went (a test's): nothing to make files for
                except OSError as exc:  # a full disk, say: the seals make their own
                    log.warning("cannot make spare temporary files: %s", exc)
                    return
                files.append(path)
                if self._closed:  # `close` may have emptied `files` before this one
                    self.close()

    def close(self) -> None:
        """Remove the files not taken; no more are made."""
        self._closed = True
        self._wanted.set()  # the maker thread ends
        if self._pid != os.getpid():
            return
        while True:
            try:
                path = self._files.popleft()
            except IndexError:
                return
            Path(path).unlink(missing_ok=True)


def _fsync_path(path: Path) -> None:
    """fsync a block file or a directory of them; a block file that went (uploaded and
    evicted meanwhile) is in the store and needs nothing."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        if len(path.name) == 2:
            raise  # a directory of block files is never removed
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: the mount touches (sets the mtime of) a block file it reads at most this often
TOUCH_INTERVAL_S = 10.0


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
    #: the cache size limit in bytes (block files and dirty overlays); None: the
    #: default, `default_cache_size`
    cache_size: int | None = None
    #: seconds between periodic metadata backups; None: the default (an hour)
    backup_interval: float | None = None
    #: metadata backups kept in the store; None: the default (10)
    backup_keep: int | None = None
    #: shared mode: the Redis URL of change notifications (without its password)
    redis: str | None = None
    #: the file holding its password, if one was named
    redis_password_file: str | None = None


@dataclass(frozen=True)
class CachedBlock:
    """A block file found in the cache dir."""

    id: bytes
    size: int
    mtime_ns: int  # its last use


def default_cache_size(root: Path, cache_bytes: int) -> int:
    """The cache size when none is set: 10% of the filesystem holding the cache dir,
    at most half of the space free for the cache (free space plus the `cache_bytes` it
    already holds), at least 1 GiB. On a 500 GB disk with 200 GB free: 50 GB."""
    st = os.statvfs(root)
    total = st.f_blocks * st.f_frsize
    free = st.f_bavail * st.f_frsize + cache_bytes
    return max(
        DEFAULT_MIN, min(int(total * DEFAULT_SHARE_OF_DISK), int(free * DEFAULT_SHARE_OF_FREE))
    )


_hold_numbers = itertools.count()
#: block files smaller than this are not handed to writeback at once (`write_block`)
SYNC_SOON_MIN = 64 << 10


class CacheDir:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).absolute()
        self.blocks = self.root / "blocks"
        self._blocks_prefix = f"{self.blocks}/"
        self.tmp = self.root / "tmp"
        self.dirty = self.root / "dirty"
        self.holds = self.root / "holds"
        self._tmp_prefix = f"{self.tmp}/"
        self._holds_prefix = f"{self.holds}/"
        #: empty files for the block files of seals (`write_block` with sync_soon)
        self.spares = SpareFiles(self._tmp_prefix)
        self.config_path = self.root / "config.json"
        self.meta_path = self.root / "meta.db"
        self.socket_path = self.root / "daemon.sock"
        self.lock_path = self.root / "daemon.lock"
        self.pid_path = self.root / "daemon.pid"
        #: present while the mount lease of this cache dir's mount was taken over by
        #: another machine: it holds why; no daemon uploads for this cache dir then
        self.fence_path = self.root / "fenced"
        self.log_path = self.root / "daemon.log"

    def create(self) -> None:
        for d in (self.root, self.blocks, self.tmp, self.dirty, self.holds):
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

    def block_file(self, block_id: bytes) -> str:
        """`block_path` as a string: without pathlib's parsing, for the read path,
        which asks for every block a reader starts and the window ahead of it."""
        h = block_id.hex()
        return f"{self._blocks_prefix}{h[:2]}/{h}"

    def has_block(self, block_id: bytes) -> bool:
        return os.path.exists(self.block_file(block_id))

    def write_block(
        self,
        block_id: bytes,
        data: bytes | bytearray | memoryview,
        *,
        durable: bool,
        sync_soon: bool = False,
        spare: bool = True,
    ) -> None:
        """Put a block's plaintext in place atomically (blocking; call from a thread).

        `durable`: fsync the file before it is renamed into place (the caller syncs the
        directories with `sync_blocks`). `sync_soon` (a seal's block file, which an
        fsync may have to make durable): its writeback to disk is started at once
        (sync_file_range), so that the fsync that `sync_blocks` does later mostly
        finds it done: the disk writes overlap the writes still coming in, instead of a
        whole file's worth waiting for the fsync (the kernel alone would start only
        when 10% of memory is dirty). Not for a block under SYNC_SOON_MIN bytes (a small
        file, the tail of a big one): starting its writeback cost about as much CPU as
        the rest of writing it, and the fsync that may follow waits for little.
        `sync_soon` writes also take their temporary file from `spares`, unless `spare`
        is False (the daemon, which makes none)."""
        path = self.block_file(block_id)
        spare_file = self.spares.take() if sync_soon and spare else None
        fd = -1
        if spare_file is not None:
            try:
                fd = os.open(spare_file, os.O_WRONLY | os.O_TRUNC)
            except FileNotFoundError:
                pass  # removed meanwhile (by hand, say): make one
        if spare_file is not None and fd >= 0:
            tmp = spare_file
        else:
            tmp = f"{self._tmp_prefix}{block_id.hex()}.{os.getpid()}.{id(data):x}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            size = view.nbytes
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if durable:
                os.fsync(fd)
            elif sync_soon and start_writeback is not None and size >= SYNC_SOON_MIN:
                start_writeback(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def sync_blocks(self, unsynced: list[bytes], renamed: list[bytes]) -> None:
        """Make block files durable: fsync the `unsynced` ones (written without fsync),
        and the directories that they and the `renamed` ones (already fsynced) were
        renamed into. Blocking: call from a thread.

        Many files are synced on SYNC_THREADS threads at once: each fsync ends with a
        flush of the disk's cache, which takes about a millisecond even when the data is
        already written (sync_soon), and the block layer merges flushes that wait
        together (1,000 block files: ~0.7 s one by one, a tenth of that in parallel)."""
        paths = [self.block_path(b) for b in unsynced]
        paths += [self.blocks / sub for sub in sorted({b.hex()[:2] for b in (*unsynced, *renamed)})]
        if len(paths) <= 2:
            for path in paths:
                _fsync_path(path)
            return
        for _ in _sync_pool.get().map(_fsync_path, paths):
            pass  # the first failure is raised here, after all have run

    def drop_pages(self, block_id: bytes) -> None:
        """Let the kernel free the pages of a block file in its page cache, where the
        file's data has another copy (blocking: call from a thread). Dirty pages stay:
        call it once the file was written back (`sync_soon`, some time ago).

        A fetched block, once its reader has read it, is in the kernel's page cache of
        the file it belongs to; its block file is read again only when that page cache
        misses. The second copy cost more than memory: the page cache kept growing
        into pages not touched before, and on this test machine (a virtual machine;
        likely the host's page faults) the kernel's copy of written data into such
        pages took 75% of a plain write's system CPU (perf: copy_folio_from_iter_atomic),
        where pages just freed take the copy several times faster. Freed block by
        block, the pages of one block file are there for the next."""
        try:
            fd = os.open(self.block_file(block_id), os.O_RDONLY)
        except OSError:
            return  # evicted or collected meanwhile: nothing to free
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def hold_block(self, block_id: bytes) -> Path | None:
        """Hold on to a cached block's plaintext with a hard link in holds/, so that it
        outlives a deletion of the block file (eviction, gc); None when the block is
        not cached. Blocking: call from a thread (or for one block)."""
        hold = f"{self._holds_prefix}{block_id.hex()}.{os.getpid()}.{next(_hold_numbers)}"
        try:
            # strings, not paths: a seal asks this for every block it cuts, and for a
            # new block it fails
            os.link(self.block_file(block_id), hold)
        except FileNotFoundError:
            return None
        return Path(hold)

    def restore_held(self, block_id: bytes, hold: Path) -> bool:
        """Put a held block file back in place if it went; False if the hold is gone."""
        try:
            os.link(hold, self.block_path(block_id))
        except FileExistsError:
            pass
        except FileNotFoundError:
            return False
        return True

    @staticmethod
    def release_holds(holds: list[Path]) -> None:
        for hold in holds:
            hold.unlink(missing_ok=True)

    def clear_holds(self) -> None:
        """Remove the holds of a mount that died (one mount per cache dir)."""
        if self.holds.exists():
            for p in self.holds.iterdir():
                p.unlink(missing_ok=True)

    def remove_block(self, block_id: bytes) -> int:
        """Delete a block file; return the bytes freed (0 if it was not there)."""
        path = self.block_path(block_id)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size

    def scan_blocks(self) -> list[CachedBlock]:
        """Every block file with its size and last use (blocking; call from a thread)."""
        found: list[CachedBlock] = []
        for sub in sorted(self.blocks.iterdir()):
            for entry in os.scandir(sub):
                if len(entry.name) != 64:
                    continue
                try:
                    block_id = bytes.fromhex(entry.name)
                    st = entry.stat(follow_symlinks=False)
                except ValueError:
                    continue  # not a block file
                except FileNotFoundError:
                    continue  # evicted while we looked
                found.append(CachedBlock(block_id, st.st_size, st.st_mtime_ns))
        return found

    def dirty_bytes(self) -> int:
        """Disk space the dirty overlays take (they are sparse: allocated blocks count)."""
        total = 0
        for entry in os.scandir(self.dirty):
            try:
                total += entry.stat(follow_symlinks=False).st_blocks * 512
            except FileNotFoundError:
                continue
        return total

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

    def clear_stale_tmp(self) -> int:
        """Remove the temporary files of processes that are gone (a crash while a block
        file was being written: its name ends in .<pid>.<hex>). Returns how many."""
        removed = 0
        for p in self.tmp.iterdir():
            parts = p.name.split(".")
            if len(parts) < 3 or not parts[-2].isdigit():
                continue
            if not os.path.exists(f"/proc/{parts[-2]}"):
                p.unlink(missing_ok=True)
                removed += 1
        return removed

    def clear_tmp(self) -> None:
        for p in self.tmp.iterdir():
            if p.name != "config.json":
                p.unlink(missing_ok=True)


class BlockFiles:
    """Open file descriptors of cached blocks, least recently used closed first.

    Blocks never change, so a descriptor stays valid even after the daemon evicts the
    file: reads of it keep working until it is closed (`close_evicted` closes such
    descriptors, whose disk space is not free until then). A read marks the block
    file as used (its mtime, at most every TOUCH_INTERVAL_S): the evictor's LRU order."""

    def __init__(self, cache: CacheDir, max_open: int = 256) -> None:
        self.cache = cache
        self.max_open = max_open
        self._fds: OrderedDict[bytes, int] = OrderedDict()
        self._touched: dict[bytes, float] = {}  # monotonic time of the last touch
        self._lock = threading.Lock()  # the seal's worker thread reads blocks too

    def pread(self, block_id: bytes, length: int, offset: int) -> bytes:
        """Bytes of a cached block; FileNotFoundError when it is not in the cache."""
        with self._lock:
            # pread under the lock: another thread must not close this fd meanwhile
            return os.pread(self._fd(block_id), length, offset)

    def is_open(self, block_id: bytes) -> bool:
        """A descriptor of the block is open, so it reads without a fetch (no syscall:
        a reader asks this for every block of every read)."""
        return block_id in self._fds

    def preadinto(self, block_id: bytes, into: memoryview, offset: int) -> int:
        """Read a cached block's bytes at `offset` into `into`; how many were read (less
        only at the block's end). FileNotFoundError when it is not in the cache."""
        done = 0
        with self._lock:
            fd = self._fd(block_id)
            while done < len(into):
                n = os.preadv(fd, [into[done:]], offset + done)
                if n == 0:
                    break
                done += n
        return done

    def _fd(self, block_id: bytes) -> int:
        """An open descriptor of the block file (call with the lock held)."""
        fd = self._fds.get(block_id)
        if fd is None:
            fd = os.open(self.cache.block_file(block_id), os.O_RDONLY)
            self._fds[block_id] = fd
            if len(self._fds) > self.max_open:
                old_id, old = self._fds.popitem(last=False)
                self._touched.pop(old_id, None)
                os.close(old)
        else:
            self._fds.move_to_end(block_id)
        now = time.monotonic()
        if now - self._touched.get(block_id, -TOUCH_INTERVAL_S) >= TOUCH_INTERVAL_S:
            self._touched[block_id] = now
            os.utime(fd)  # used now: the evictor keeps it longer
        return fd

    def close_evicted(self) -> int:
        """Close the descriptors of block files the daemon evicted meanwhile (their
        disk space is freed only when nobody holds them open). Returns how many."""
        closed = 0
        with self._lock:
            for block_id, fd in list(self._fds.items()):
                if os.fstat(fd).st_nlink == 0:
                    del self._fds[block_id]
                    self._touched.pop(block_id, None)
                    os.close(fd)
                    closed += 1
        return closed

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._touched.clear()


class CacheSpace:
    """The mount's side of the cache size limit: backpressure on writers.

    Written data that is not uploaded yet (pending blocks, dirty overlays, append
    streams) cannot be evicted; when it alone would pass UNUPLOADED_SHARE of the
    limit, a write waits for the daemon to upload some (it is kicked), and fails with
    ENOSPC after `full_wait` seconds. An acknowledged write is never dropped: the data
    refused is the data the writer is told about.

    `unuploaded()` measures exactly (a metadata query and the mount's unsealed bytes);
    between two measurements the bytes admitted are added to the last one, so most
    writes cost no query."""

    #: a measurement is trusted this long while the cache is far from full
    REFRESH_S = 0.5
    #: how often a waiting writer measures again
    POLL_S = 0.2

    def __init__(
        self,
        limit: int,
        unuploaded: Callable[[], Awaitable[int]],
        kick: Callable[[], None],
        *,
        full_wait: float = DEFAULT_FULL_WAIT_S,
        make_room: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`make_room()` seals what the mount holds unsealed, so that the daemon can
        upload it (files being written are otherwise sealed only every 64 MiB)."""
        self.limit = limit
        self._make_room = make_room
        #: unuploaded bytes writers may fill
        self.allowed = int(limit * UNUPLOADED_SHARE)
        self.full_wait = full_wait
        self._unuploaded = unuploaded
        self._kick = kick
        self._estimate = 0
        self._measured_at = -1e9

    async def _measure(self) -> None:
        self._estimate = await self._unuploaded()
        self._measured_at = trio.current_time()

    async def admit(self, nbytes: int) -> None:
        """Return once `nbytes` more unuploaded bytes fit in the cache; FSOpError
        ENOSPC when they do not within `full_wait` seconds."""
        now = trio.current_time()
        stale = now - self._measured_at > self.REFRESH_S
        if stale or self._estimate + nbytes > self.allowed * 0.9:
            await self._measure()
        if self._estimate + nbytes <= self.allowed:
            self._estimate += nbytes
            return
        log.debug("cache full of unuploaded data (%d of %d bytes): writers wait",
                  self._estimate, self.allowed)  # fmt: skip
        deadline = now + self.full_wait
        if self._make_room is not None:
            await self._make_room()
        while True:
            self._kick()
            await trio.sleep(self.POLL_S)
            await self._measure()
            if self._estimate + nbytes <= self.allowed:
                self._estimate += nbytes
                return
            if trio.current_time() >= deadline:
                log.warning("no cache space for %.0f s (%d bytes not uploaded, limit %d): ENOSPC",
                            self.full_wait, self._estimate, self.allowed)  # fmt: skip
                raise FSOpError(errno.ENOSPC, "the cache is full of data not uploaded yet")
