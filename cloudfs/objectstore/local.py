"""LocalStore: an object store in a local directory (the default storage, and what
tests use). Each object is one file; '/' in a key maps to subdirectories.

Atomic put: the data goes to a temporary file in <root>/.tmp, is fsynced, renamed over
the target and the directory is fsynced, so readers (also in other processes) see the
old object or the new one, and a crash leaves the old one or the new one.

Conditional writes (put_new, replace_if, delete_if) hold an flock on <root>/.tmp/lock
while they compare and write, so they are atomic against each other for every process
of the machine (not across machines sharing the directory over a network filesystem
whose flock is local).

Limitation against S3: a key cannot also be a "directory" of other keys ("a" and
"a/b" together), and the first key component ".tmp" is reserved. cloudfs never uses
such keys; put raises StorePermanentError / ValueError for them.
"""

from __future__ import annotations

import builtins
import errno
import fcntl
import os
import stat
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import trio

from cloudfs.errors import ObjectNotFound, StorePermanentError
from cloudfs.objectstore.base import ObjectInfo, ObjectStore, check_key

TMP_DIR = ".tmp"
#: the lock file of conditional writes, in TMP_DIR
LOCK_NAME = "lock"
# Temporary files older than this are leftovers of a crash (a put takes far less), so
# the first put of a store removes them.
_STALE_TMP_SECONDS = 24 * 3600
# A put retries its rename this often when a concurrent delete_many removes the
# (momentarily empty) parent directory between mkdir and rename.
_RENAME_ATTEMPTS = 10

_T = TypeVar("_T")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_all(fd: int, size: int) -> bytes:
    chunks = []
    while True:
        chunk = os.read(fd, max(size, 1 << 16))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


class LocalStore(ObjectStore):
    """Objects as files under `root` (created on the first put)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).absolute()
        self.url = f"local://{self.root}"
        self._tmpdir = self.root / TMP_DIR
        self._swept = False

    # --- key → path -------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        parts = check_key(key).split("/")
        if parts[0] == TMP_DIR:
            raise ValueError(f"invalid object key {key!r}: {TMP_DIR} is reserved")
        return self.root.joinpath(*parts)

    @staticmethod
    async def _run(fn: Callable[..., _T], *args: object) -> _T:
        return await trio.to_thread.run_sync(fn, *args)

    # --- ObjectStore ------------------------------------------------------------------

    async def get(self, key: str) -> bytes:
        return await self._run(self._get_sync, key, self._path(key))

    async def get_into(self, key: str, buffer: bytearray) -> memoryview:
        return await self._run(self._get_into_sync, key, self._path(key), buffer)

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise ValueError("start and length must be >= 0")
        return await self._run(self._get_range_sync, key, self._path(key), start, length)

    async def put(self, key: str, data: bytes) -> None:
        await self._run(self._put_sync, key, self._path(key), data)

    async def head(self, key: str) -> ObjectInfo | None:
        return await self._run(self._head_sync, key, self._path(key))

    async def delete_many(self, keys: Sequence[str]) -> None:
        paths = [(key, self._path(key)) for key in keys]
        if paths:
            await self._run(self._delete_sync, paths)

    conditional_writes = True

    async def put_new(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        return await self._run(self._locked, key, lambda current: current is None,
                               lambda: self._put_sync(key, path, data))  # fmt: skip

    async def replace_if(self, key: str, data: bytes, expected: bytes) -> bool:
        path = self._path(key)
        return await self._run(self._locked, key, lambda current: current == expected,
                               lambda: self._put_sync(key, path, data))  # fmt: skip

    async def delete_if(self, key: str, expected: bytes) -> bool:
        path = self._path(key)
        return await self._run(self._locked, key, lambda current: current == expected,
                               lambda: self._delete_sync([(key, path)]))  # fmt: skip

    async def list(
        self, prefix: str = "", start_after: str = "", limit: int = 1000
    ) -> list[ObjectInfo]:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        return await self._run(self._list_sync, prefix, start_after, limit)

    # --- blocking implementations (worker threads) ------------------------------------

    @staticmethod
    def _error(key: str, exc: OSError) -> StorePermanentError:
        return StorePermanentError(f"{key}: {exc.strerror or exc}")

    def _get_sync(self, key: str, path: Path) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectNotFound(key) from None
        except OSError as exc:
            raise self._error(key, exc) from exc

    def _get_into_sync(self, key: str, path: Path, buffer: bytearray) -> memoryview:
        try:
            fd = os.open(path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectNotFound(key) from None
        except OSError as exc:
            raise self._error(key, exc) from exc
        try:
            size = os.fstat(fd).st_size
            # an object never changes in place (a put renames a new file over it), so
            # this descriptor's file keeps the size fstat saw
            if size > len(buffer):
                return memoryview(_read_all(fd, size))
            view = memoryview(buffer)
            done = 0
            while done < size:
                n = os.readv(fd, [view[done:size]])
                if n == 0:
                    break
                done += n
            # read once into the cache dir's block file: the store's pages go, as
            # after a put (the pages just freed take the next object)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            return view[:done]
        except OSError as exc:
            raise self._error(key, exc) from exc
        finally:
            os.close(fd)

    def _get_range_sync(self, key: str, path: Path, start: int, length: int) -> bytes:
        try:
            fd = os.open(path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFound(key) from None
        except OSError as exc:
            raise self._error(key, exc) from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ObjectNotFound(key)
            chunks: builtins.list[bytes] = []
            while length > 0:
                chunk = os.pread(fd, length, start)
                if not chunk:
                    break
                chunks.append(chunk)
                start += len(chunk)
                length -= len(chunk)
            return b"".join(chunks)
        except OSError as exc:
            raise self._error(key, exc) from exc
        finally:
            os.close(fd)

    def _sweep_tmp(self) -> None:
        """Remove temporary files a crashed put left behind."""
        self._swept = True
        cutoff = time.time() - _STALE_TMP_SECONDS
        try:
            entries = list(os.scandir(self._tmpdir))
        except OSError:
            return
        for entry in entries:
            if entry.name == LOCK_NAME:
                continue  # held by conditional writes, never stale
            try:
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
            except OSError:
                pass

    def _makedirs(self, directory: Path) -> builtins.list[Path]:
        """Create `directory` and missing parents; the ones created, outermost first."""
        missing: builtins.list[Path] = []
        d = directory
        while d != self.root and not d.is_dir():
            missing.append(d)
            d = d.parent
        self.root.mkdir(parents=True, exist_ok=True)
        created: builtins.list[Path] = []
        for d in reversed(missing):
            try:
                d.mkdir()
                created.append(d)
            except FileExistsError:
                if not d.is_dir():
                    raise
        return created

    def _put_sync(self, key: str, path: Path, data: bytes) -> None:
        try:
            self._tmpdir.mkdir(parents=True, exist_ok=True)
            if not self._swept:
                self._sweep_tmp()
            fd, tmp = tempfile.mkstemp(dir=self._tmpdir, prefix="put-")
        except OSError as exc:
            raise self._error(key, exc) from exc
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                # The store is read only on a cache miss, and its pages are clean now:
                # drop them. Kept, every byte written would hold two copies in memory
                # (this and the cache dir's block file), and the page cache would keep
                # growing into fresh memory: on this test machine (a virtual machine,
                # likely the host's page faults) the kernel's copy of written data into
                # the page cache then took 40% of both processes' CPU (perf).
                # 1 GiB written and flushed, six alternating pairs on this test
                # machine's disk: the mount's system CPU 2.6-3.5 -> 1.7-2.1 s, the
                # daemon's 3.9-4.6 -> 2.6-2.9 s, write + fsync 154-193 -> 217-251 MB/s.
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            created: builtins.list[Path] = []
            for attempt in range(_RENAME_ATTEMPTS):
                try:
                    created += self._makedirs(path.parent)
                    os.replace(tmp, path)
                    break
                except FileNotFoundError:
                    if attempt == _RENAME_ATTEMPTS - 1:
                        raise
            # The rename and any new directories must reach the disk before put
            # returns: a caller may record the object as stored right after.
            _fsync_dir(path.parent)
            for d in {d.parent for d in created} - {path.parent}:
                _fsync_dir(d)
        except BaseException as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(exc, (NotADirectoryError, FileExistsError, IsADirectoryError)):
                raise StorePermanentError(
                    f"{key}: conflicts with an existing key (a local store cannot hold "
                    "both 'a' and 'a/b')"
                ) from exc
            if isinstance(exc, OSError):
                raise self._error(key, exc) from exc
            raise

    def _locked(
        self, key: str, wanted: Callable[[bytes | None], bool], write: Callable[[], None]
    ) -> bool:
        """Under the store's lock: if `wanted(current bytes or None)`, `write()` and
        return True; else False."""
        try:
            self._tmpdir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._tmpdir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise self._error(key, exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current: bytes | None = self._get_sync(key, self._path(key))
            except ObjectNotFound:
                current = None
            if not wanted(current):
                return False
            write()
            return True
        finally:
            os.close(fd)  # releases the lock

    def _head_sync(self, key: str, path: Path) -> ObjectInfo | None:
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise self._error(key, exc) from exc
        return ObjectInfo(key, st.st_size) if stat.S_ISREG(st.st_mode) else None

    def _delete_sync(self, paths: builtins.list[tuple[str, Path]]) -> None:
        parents: set[Path] = set()
        for key, path in paths:
            try:
                os.unlink(path)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                continue
            except OSError as exc:
                if exc.errno == errno.EPERM and path.is_dir():  # Linux: unlink(dir)
                    continue
                raise self._error(key, exc) from exc
            parents.add(path.parent)
        # Drop directories that became empty so a listing does not walk dead ones; a
        # concurrent put re-creates its directory (see _put_sync). rmdir only removes
        # an empty directory, so this never loses an object.
        for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            d = parent
            while d != self.root and self.root in d.parents:
                try:
                    os.rmdir(d)
                except OSError:
                    break
                d = d.parent

    def _list_sync(self, prefix: str, start_after: str, limit: int) -> builtins.list[ObjectInfo]:
        # Walk only below the deepest directory the prefix names.
        dir_key = prefix.rpartition("/")[0]
        if dir_key:
            try:
                parts = check_key(dir_key).split("/")
            except ValueError:
                return []  # no valid key starts with this prefix
            if parts[0] == TMP_DIR:
                return []
            top, top_prefix = self.root.joinpath(*parts), dir_key + "/"
        else:
            top, top_prefix = self.root, ""
        found: builtins.list[ObjectInfo] = []

        def walk(directory: Path, key_prefix: str) -> bool:
            """Append the matching objects below `directory` in key order; True once
            the page is full.

            Sorting a directory's entries by "name/" for subdirectories and "name" for
            files gives global key order: every key below subdirectory d starts with
            "d/", and no sibling's key can fall between two such keys."""
            try:
                entries = list(os.scandir(directory))
            except (FileNotFoundError, NotADirectoryError):
                return False
            items: builtins.list[tuple[str, bool, os.DirEntry[str]]] = []
            for entry in entries:
                if not key_prefix and entry.name == TMP_DIR:
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        items.append((key_prefix + entry.name + "/", True, entry))
                    elif entry.is_file(follow_symlinks=False):
                        items.append((key_prefix + entry.name, False, entry))
                except OSError:
                    continue
            items.sort(key=lambda item: item[0])
            for key, is_dir, entry in items:
                if is_dir:
                    if not (key.startswith(prefix) or prefix.startswith(key)):
                        continue
                    # Every key below starts with `key`: all sort before start_after
                    # unless start_after itself lies below.
                    if key < start_after and not start_after.startswith(key):
                        continue
                    if walk(Path(entry.path), key):
                        return True
                elif key > start_after and key.startswith(prefix):
                    try:
                        size = entry.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        continue  # deleted while we listed
                    found.append(ObjectInfo(key, size))
                    if len(found) >= limit:
                        return True
            return False

        try:
            walk(top, top_prefix)
        except OSError as exc:
            raise self._error(prefix or "/", exc) from exc
        return found


def from_url(url: str, **opts: object) -> LocalStore:
    """LocalStore for "local:///abs/path" (the `open_store` hook of the local scheme)."""
    from cloudfs.errors import BadStorageURL

    path = url.removeprefix("local://")
    if not path.startswith("/"):
        raise BadStorageURL(f"{url} (use local:///absolute/path or a plain path)")
    if opts:
        raise BadStorageURL(f"{url}: unknown options {', '.join(sorted(opts))}")
    return LocalStore(Path(path))
