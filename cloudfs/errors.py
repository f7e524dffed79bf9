"""The cloudfs error hierarchy: each error's docstring is its message, and each
error a command-line tool can end with carries the exit code it ends with."""

from __future__ import annotations

import errno as _errno


class CloudfsError(Exception):
    """cloudfs failed."""

    #: exit code of a command-line tool that ends with this error
    exit_code: int = 1
    #: errno the FUSE adapter answers with when this error reaches it
    errno: int = _errno.EIO

    def __init__(self, detail: str | None = None) -> None:
        self.detail = detail
        super().__init__(self.message)

    @property
    def message(self) -> str:
        base = (self.__doc__ or type(self).__name__).strip().splitlines()[0]
        return f"{base}: {self.detail}" if self.detail else base


# --- command line and configuration -------------------------------------------------


class UsageError(CloudfsError):
    """invalid arguments"""

    exit_code = 2


class BadStorageURL(UsageError):
    """invalid storage URL"""


class WrongPassphrase(CloudfsError):
    """wrong passphrase"""

    exit_code = 3


class NoFilesystem(CloudfsError):
    """no cloudfs filesystem in this storage"""

    exit_code = 4


class FilesystemExists(CloudfsError):
    """a cloudfs filesystem already exists in this storage (use --force to overwrite it)"""

    exit_code = 5


class UnsupportedFormat(CloudfsError):
    """the filesystem uses a format this version of cloudfs does not know; run `cloudfs upgrade` with a newer cloudfs"""

    exit_code = 6


class MountpointError(CloudfsError):
    """cannot mount here"""

    exit_code = 7


class MetadataMissing(CloudfsError):
    """no metadata database for this filesystem in the cache dir"""

    exit_code = 8


class NoMetadataBackup(CloudfsError):
    """the store holds no metadata backup"""

    exit_code = 8


class MetadataMismatch(CloudfsError):
    """the metadata database belongs to another filesystem"""

    exit_code = 8


class MetadataOutdated(CloudfsError):
    """the metadata database has an older schema; run `cloudfs upgrade` first"""

    exit_code = 6


class MetadataUnavailable(CloudfsError):
    """cannot use the metadata database"""

    exit_code = 12


class TransactionConflict(CloudfsError):
    """a metadata transaction conflicted with concurrent ones (deadlock or lock wait timeout)"""

    exit_code = 12
    #: set once a retry loop (MetaStore.run) gave up on it: outer loops do not retry it
    final: bool = False


class DaemonError(CloudfsError):
    """the block storage daemon (cloudfsd) failed"""

    exit_code = 9


class NotMounted(CloudfsError):
    """not a cloudfs mount point"""

    exit_code = 10


class LeaseHeld(CloudfsError):
    """the filesystem is mounted on another machine"""

    exit_code = 13


class LeaseLost(CloudfsError):
    """the mount lease was taken over by another machine"""

    exit_code = 13


# --- object store ---------------------------------------------------------------------


class StoreError(CloudfsError):
    """object store error"""

    exit_code = 11


class ObjectNotFound(StoreError):
    """object not found in the store"""


class StorePermanentError(StoreError):
    """the object store refused the request"""


class StoreTemporaryError(StoreError):
    """the object store failed for a passing reason (a retry may succeed)"""


class StoreUnreachable(StoreTemporaryError):
    """cannot reach the object store"""


class BucketMissing(StorePermanentError):
    """the bucket does not exist"""


class StoreAccessDenied(StorePermanentError):
    """access denied by the object store (check the credentials)"""


class CorruptBlock(StoreError):
    """a stored block failed verification (damaged, truncated, swapped, or wrong key)"""


class CorruptObject(StoreError):
    """a stored object failed verification"""


# --- filesystem operations (errno carriers used by the core) -------------------------


class FSOpError(CloudfsError):
    """filesystem operation failed"""

    exit_code = 1

    def __init__(self, err: int, detail: str | None = None) -> None:
        self.errno = err
        super().__init__(detail or _errno.errorcode.get(err, str(err)))
