"""S3Store: an object store in an S3 bucket (AWS S3 or any S3-compatible server such as
MinIO, Ceph RGW, Cloudflare R2 or moto), through boto3.

Storage URL ``s3://bucket[/prefix]``; options (never in the URL): `endpoint_url`
(``--s3-endpoint``; else botocore's own AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / profile
setting, else AWS), `region`, `path_style` (path-style addressing, which most
self-hosted servers want) and `profile`. Credentials come only from boto3's standard
chain (environment, ~/.aws/credentials and config, AWS_PROFILE or `profile`, container
and instance roles): a URL or endpoint holding credentials is refused, and botocore's
request logging is capped at WARNING so signed headers never reach a log.

Each blocking boto3 call runs in a worker thread. A `trio.CapacityLimiter` bounds the
requests in flight, and the connection pool holds as many connections, so no request
waits for a connection and none is thrown away. One client serves every thread
(botocore clients are thread-safe).

Retries: botocore's own retries are off (one attempt per call). RetryStore around this
store does them instead, because (1) two retry layers multiply (botocore's 3 attempts
under RetryStore's 8 make 24, with two unrelated backoff schedules), (2) RetryStore's
full-jitter backoff and logging are the same for every backend, and (3) some temporary
failures only show after botocore has returned (a GET body cut short), which botocore
would not retry anyway. `is_temp_failure` says which failures are worth a retry; a
connect timeout of a few seconds keeps a dead endpoint from stalling any command.

Errors reach callers as cloudfs errors with one-line messages: ObjectNotFound,
BucketMissing, StoreAccessDenied, StoreUnreachable, StoreTemporaryError or
StorePermanentError.

Conditional writes (the mount lease) use If-None-Match: * and If-Match: <ETag>, which
AWS S3, MinIO and R2 honour, so they are atomic there. Each also checks first, so a
server that ignores those headers still gets a check followed by a write. A write whose
answer was lost and that is then retried finds its own bytes and reports success.

Cut connections: a GET body shorter than its Content-Length, an object answer without
Content-Length and a listing without its IsTruncated element are temporary failures,
never data. One case stays out of reach over plain http: a connection cut inside a
header line (say in the middle of a HEAD answer's Content-Length value) reads as a
complete answer to Python's http.client. Over https, TLS reports such a cut.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import http.client
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import boto3
import botocore.exceptions as bex
import trio
import urllib3.exceptions
from botocore.config import Config

from cloudfs.errors import (
    BadStorageURL,
    BucketMissing,
    CloudfsError,
    ObjectNotFound,
    StoreAccessDenied,
    StorePermanentError,
    StoreTemporaryError,
    StoreUnreachable,
    UsageError,
)
from cloudfs.objectstore.base import ObjectInfo, ObjectStore, check_key
from cloudfs.objectstore.prefix import PrefixStore

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: requests in flight per store (the daemon runs 8 uploads and 8 fetches by default)
DEFAULT_MAX_REQUESTS = 32
#: seconds to open a TCP connection: a dead endpoint fails fast
CONNECT_TIMEOUT_S = 5.0
#: seconds without a byte from the server before a request counts as failed
READ_TIMEOUT_S = 30.0
#: keys per DeleteObjects request (the S3 limit)
DELETE_BATCH = 1000

#: S3 error codes that mean "try again later" (beyond any 5xx, 408 and 429 status)
_TEMPORARY_CODES = frozenset({
    "BadDigest",  # the body was damaged on the way (Content-MD5 mismatch)
    "BandwidthLimitExceeded",
    "IncompleteBody",  # the server got less than Content-Length: a cut connection
    "InternalError",
    "OperationAborted",
    "PriorRequestNotComplete",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "RequestThrottled",
    "RequestThrottledException",
    "RequestTimeout",
    "RequestTimeoutException",
    "ServiceUnavailable",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "TooManyRequestsException",
    "XAmzContentSHA256Mismatch",  # damaged on the way, like BadDigest
})  # fmt: skip
#: S3 error codes that mean the credentials do not give access
_DENIED_CODES = frozenset({
    "403", "AccessDenied", "AccountProblem", "AllAccessDisabled", "ExpiredToken",
    "InvalidAccessKeyId", "InvalidClientTokenId", "InvalidToken", "SignatureDoesNotMatch",
    "TokenRefreshRequired",
})  # fmt: skip
#: S3 error codes that mean the bucket lives in another region
_REGION_CODES = frozenset({
    "AuthorizationHeaderMalformed", "IllegalLocationConstraintException", "PermanentRedirect",
})  # fmt: skip

_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")

# botocore logs whole requests (headers with the access key id and signature) at DEBUG;
# a mount or daemon run with --debug must not write them to its log (nor their INFO
# chatter to the one line a command-line tool prints).
for _name in ("botocore", "boto3", "urllib3", "s3transfer"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.WARNING)


class TruncatedBody(Exception):
    """A GET body ended before its Content-Length (the connection was cut)."""


def parse_url(url: str) -> tuple[str, str]:
    """(bucket, key prefix) of "s3://bucket[/prefix]"; the prefix is "" or ends in
    '/'. BadStorageURL for anything else, without repeating a URL that holds
    credentials."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "s3":
        raise BadStorageURL(f"{url}: not an s3:// URL")
    if "@" in parts.netloc:
        raise BadStorageURL(
            "an s3:// URL must not hold credentials: use the environment, "
            "~/.aws/credentials or a profile"
        )
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise BadStorageURL(f"{url}: an s3:// URL takes no query or fragment")
    bucket = parts.netloc
    if not _BUCKET_RE.match(bucket):
        raise BadStorageURL(f"{url}: {bucket!r} is not a bucket name")
    prefix = parts.path.strip("/")
    if prefix:
        try:
            check_key(prefix)
        except ValueError:
            raise BadStorageURL(f"{url}: invalid key prefix {prefix!r}") from None
        prefix += "/"
    return bucket, prefix


def _check_endpoint(endpoint_url: str) -> str:
    parts = urlsplit(endpoint_url)
    if "@" in parts.netloc:
        raise BadStorageURL(
            "the S3 endpoint URL must not hold credentials: use the environment, "
            "~/.aws/credentials or a profile"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadStorageURL(f"invalid S3 endpoint {endpoint_url!r} (use http(s)://host[:port])")
    return endpoint_url


def _code(exc: bex.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _one_line(text: str) -> str:
    """`text` with every run of whitespace (newlines too) as one space: error messages
    end up as the one line a command prints."""
    return " ".join(text.split())


def _reason(exc: BaseException) -> str:
    """A short reason for a network failure: the innermost OS error's text when there
    is one ("Connection refused"), else the exception's own message."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.strerror:
            return cur.strerror
        cur = cur.__cause__ or cur.__context__
    text = _one_line(str(exc))
    match = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    return match.group(1).strip() if match else text


class S3Store(ObjectStore):
    """The objects of one bucket (a prefix is a PrefixStore around this)."""

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        path_style: bool = False,
        profile: str | None = None,
        max_requests: int = DEFAULT_MAX_REQUESTS,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        read_timeout: float = READ_TIMEOUT_S,
    ) -> None:
        if max_requests < 1:
            raise ValueError("max_requests must be >= 1")
        self.bucket = bucket
        self.url = f"s3://{bucket}"
        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max_requests,
            # one attempt per call: RetryStore retries (see the module docstring)
            retries={"total_max_attempts": 1, "mode": "standard"},
            s3={"addressing_style": "path" if path_style else "auto"},
            # botocore >= 1.36 adds CRC32 checksums that several S3-compatible servers
            # reject; put() sends Content-MD5, which every S3 implementation checks.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            user_agent_extra="cloudfs",
        )
        try:
            session = boto3.session.Session(profile_name=profile)
            self._client = session.client(
                "s3",
                endpoint_url=_check_endpoint(endpoint_url) if endpoint_url else None,
                region_name=region,
                config=config,
            )
        except bex.ProfileNotFound:
            raise UsageError(f"AWS profile {profile!r} not found") from None
        except ValueError as exc:  # botocore: malformed endpoint or region
            raise BadStorageURL(f"S3 settings for {self.url}: {exc}") from None
        #: the endpoint requests go to (resolved by botocore), for messages
        self.endpoint: str = self._client.meta.endpoint_url
        self._limiter = trio.CapacityLimiter(max_requests)
        self._closed = False

    # --- running calls ------------------------------------------------------------------

    async def _run(self, op: str, key: str, fn: Callable[..., _T], *args: object) -> _T:
        """fn(*args) in a worker thread, its failure translated to a cloudfs error.
        Abandoned on cancellation: every call is idempotent, and the thread keeps
        its limiter slot (and so its connection) until it really ends."""
        try:
            return await trio.to_thread.run_sync(
                fn, *args, limiter=self._limiter, abandon_on_cancel=True, thread_name="s3"
            )
        except Exception as exc:
            translated = self.translate_error(exc, op, key)
            if translated is exc:
                raise
            raise translated from exc

    def translate_error(self, exc: BaseException, op: str = "", key: str = "") -> BaseException:
        """The cloudfs error a failure of boto3 call `op` on `key` means; `exc` itself
        when it is already one, or not a failure of the store (a bug)."""
        what = f"{op} {key}".strip() or "request"
        if isinstance(exc, CloudfsError):
            return exc
        if isinstance(exc, bex.ClientError):
            error = exc.response.get("Error", {})
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            return self._error_from_code(
                str(error.get("Code", "")),
                _one_line(str(error.get("Message", ""))),
                status,
                what,
                key,
                region=str(error.get("Region", "")),
            )
        if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError)):
            return StoreAccessDenied(
                "no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE, ~/.aws/credentials, or use an instance role)"
            )
        if isinstance(exc, bex.SSLError):  # a certificate problem does not pass
            return StorePermanentError(f"TLS with {self.endpoint} failed: {_reason(exc)}")
        if isinstance(exc, bex.ConnectTimeoutError):
            return StoreUnreachable(f"{self.endpoint} (no answer within the connect timeout)")
        if isinstance(exc, (bex.EndpointConnectionError, bex.ProxyConnectionError)):
            return StoreUnreachable(f"{self.endpoint} ({_reason(exc)})")
        if isinstance(exc, bex.ReadTimeoutError):
            return StoreTemporaryError(f"{what}: {self.endpoint} stopped answering (read timeout)")
        if isinstance(
            exc,
            (
                bex.HTTPClientError,  # ConnectionClosedError, ResponseStreamingError
                bex.IncompleteReadError,
                bex.ConnectionError,
                urllib3.exceptions.HTTPError,  # ProtocolError, IncompleteRead, timeouts
                http.client.HTTPException,
                ConnectionError,  # reset, aborted, broken pipe
                TimeoutError,
                TruncatedBody,
            ),
        ):
            return StoreTemporaryError(f"{what}: connection to {self.endpoint}: {_reason(exc)}")
        if isinstance(exc, bex.BotoCoreError):
            return StorePermanentError(f"{what}: {_one_line(str(exc))}")
        return exc

    def _error_from_code(
        self, code: str, message: str, status: int, what: str, key: str, *, region: str = ""
    ) -> CloudfsError:
        """The cloudfs error for an S3 error response (code as in the XML body, or the
        status as text for HEAD requests, which have no body)."""
        where = f"{self.url} at {self.endpoint}"
        if code.isdigit():  # a HEAD answer: no body, so no S3 error code
            code = f"HTTP {code}"
        if code == "NoSuchKey":
            return ObjectNotFound(key or what)
        if code == "NoSuchBucket":
            return BucketMissing(where)
        if code in _TEMPORARY_CODES or status >= 500 or status in (408, 429):
            return StoreTemporaryError(f"{what}: {code or status} {message}".strip())
        if code in _DENIED_CODES or status == 403:
            return StoreAccessDenied(f"{where}: {code or status}")
        if code in _REGION_CODES or status == 301:
            hint = f"--s3-region {region}" if region else "--s3-region"
            here = self._client.meta.region_name
            return StorePermanentError(f"{self.url} is in another region than {here}: use {hint}")
        return StorePermanentError(f"{what}: {code or status} {message}".strip())

    def is_temp_failure(self, exc: BaseException) -> bool:
        return isinstance(self.translate_error(exc), StoreTemporaryError)

    # --- ObjectStore --------------------------------------------------------------------

    async def get(self, key: str) -> bytes:
        return await self._run("get", key, self._get_sync, check_key(key), None)

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise ValueError("start and length must be >= 0")
        check_key(key)
        if length == 0:
            # S3 has no empty range; the call must still fail for a missing object
            if await self.head(key) is None:
                raise ObjectNotFound(key)
            return b""
        data = await self._run(
            "get", key, self._get_sync, key, f"bytes={start}-{start + length - 1}"
        )
        return data

    async def put(self, key: str, data: bytes) -> None:
        await self._run("put", key, self._put_sync, check_key(key), data)

    async def head(self, key: str) -> ObjectInfo | None:
        return await self._run("head", key, self._head_sync, check_key(key))

    async def delete_many(self, keys: Sequence[str]) -> None:
        keys = [check_key(key) for key in keys]
        for i in range(0, len(keys), DELETE_BATCH):
            batch = keys[i : i + DELETE_BATCH]
            await self._run("delete", f"({len(batch)} keys)", self._delete_sync, batch)

    async def list(
        self, prefix: str = "", start_after: str = "", limit: int = 1000
    ) -> list[ObjectInfo]:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        return await self._run(
            "list", prefix or "/", self._list_sync, prefix, start_after, min(limit, 1000)
        )

    #: If-None-Match / If-Match make put_new, replace_if and delete_if atomic
    conditional_writes = True

    async def put_new(self, key: str, data: bytes) -> bool:
        return await self._run("put", key, self._put_new_sync, check_key(key), data)

    async def replace_if(self, key: str, data: bytes, expected: bytes) -> bool:
        return await self._run("put", key, self._replace_if_sync, check_key(key), data, expected)

    async def delete_if(self, key: str, expected: bytes) -> bool:
        return await self._run("delete", key, self._delete_if_sync, check_key(key), expected)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._client.close()

    # --- blocking implementations (worker threads) --------------------------------------

    def _get_sync(self, key: str, byte_range: str | None) -> bytes:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if byte_range is not None:
            kwargs["Range"] = byte_range
        try:
            response = self._client.get_object(**kwargs)
        except bex.ClientError as exc:
            # a range that starts at or past the end: the object exists, the answer
            # is empty (the contract clips ranges to the object's end)
            if byte_range is not None and exc.response.get("Error", {}).get("Code") in (
                "InvalidRange",
                "416",
            ):
                return b""
            raise
        body = response["Body"]
        try:
            data: bytes = body.read()
        finally:
            body.close()
        # botocore checks this too, but only on some paths; a short body must never
        # pass for the object (the caller would see a damaged block). S3 always sends
        # Content-Length with an object: without it, the answer was cut in its headers.
        expected = response.get("ContentLength")
        if expected is None or len(data) != expected:
            raise TruncatedBody(f"got {len(data)} of {expected} bytes")
        if byte_range is not None and not response.get("ContentRange"):
            # a server that ignores Range sends the whole object
            start, _, end = byte_range.removeprefix("bytes=").partition("-")
            data = data[int(start) : int(end) + 1]
        return data

    def _put_sync(self, key: str, data: bytes, **condition: str) -> None:
        md5 = hashlib.md5(data, usedforsecurity=False).digest()
        self._client.put_object(
            Bucket=self.bucket,
            Key=key,
            Body=data,
            ContentLength=len(data),
            ContentMD5=base64.b64encode(md5).decode("ascii"),
            **condition,
        )

    def _current(self, key: str) -> tuple[bytes, str] | None:
        """(bytes, ETag) of the object, or None if there is none."""
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
        except bex.ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                return None
            raise
        body = response["Body"]
        try:
            data: bytes = body.read()
        finally:
            body.close()
        if response.get("ContentLength") is None or len(data) != response["ContentLength"]:
            raise TruncatedBody(f"got {len(data)} of {response.get('ContentLength')} bytes")
        return data, str(response["ETag"])

    def _refused(self, key: str, data: bytes) -> bool:
        """After a 412: True when the object holds `data` all the same (an earlier try
        of this very write succeeded, but its answer was lost)."""
        current = self._current(key)
        return current is not None and current[0] == data

    def _put_new_sync(self, key: str, data: bytes) -> bool:
        if self._head_sync(key) is not None:  # for servers that ignore If-None-Match
            return self._refused(key, data)
        try:
            self._put_sync(key, data, IfNoneMatch="*")
        except bex.ClientError as exc:
            if _code(exc) in ("PreconditionFailed", "412"):
                return self._refused(key, data)
            raise
        return True

    def _replace_if_sync(self, key: str, data: bytes, expected: bytes) -> bool:
        current = self._current(key)
        if current is None:
            return False
        if current[0] != expected:
            return current[0] == data
        try:
            self._put_sync(key, data, IfMatch=current[1])
        except bex.ClientError as exc:
            if _code(exc) in ("PreconditionFailed", "412", "NoSuchKey", "404"):
                return self._refused(key, data)
            raise
        return True

    def _delete_if_sync(self, key: str, expected: bytes) -> bool:
        current = self._current(key)
        if current is None or current[0] != expected:
            return False
        try:
            self._client.delete_object(Bucket=self.bucket, Key=key, IfMatch=current[1])
        except bex.ClientError as exc:
            if _code(exc) in ("PreconditionFailed", "412", "NoSuchKey", "404"):
                return False
            raise
        return True

    def _head_sync(self, key: str) -> ObjectInfo | None:
        try:
            response = self._client.head_object(Bucket=self.bucket, Key=key)
        except bex.ClientError as exc:
            # HEAD answers have no body: a missing key is just "404" (and so is a
            # missing bucket, which the next GET, PUT or list reports)
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                return None
            raise
        if "ContentLength" not in response:  # the answer was cut in its headers
            raise TruncatedBody("HEAD answer without Content-Length")
        return ObjectInfo(key, int(response["ContentLength"]))

    def _delete_sync(self, keys: builtins.list[str]) -> None:
        response = self._client.delete_objects(
            Bucket=self.bucket,
            Delete={"Objects": [{"Key": key} for key in keys], "Quiet": True},
        )
        for error in response.get("Errors", []):
            code = str(error.get("Code", ""))
            if code == "NoSuchKey":
                continue
            raise self._error_from_code(
                code,
                _one_line(str(error.get("Message", ""))),
                0,
                "delete",
                str(error.get("Key", "")),
            )

    def _list_sync(self, prefix: str, start_after: str, limit: int) -> builtins.list[ObjectInfo]:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": limit}
        if start_after:
            kwargs["StartAfter"] = start_after
        response = self._client.list_objects_v2(**kwargs)
        if "IsTruncated" not in response:
            # an empty body: the answer was cut before it (an empty listing still says
            # <IsTruncated>false</IsTruncated>), and must not pass for "no objects"
            raise TruncatedBody("listing without IsTruncated")
        return [ObjectInfo(obj["Key"], int(obj["Size"])) for obj in response.get("Contents", [])]


def from_url(
    url: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    path_style: bool = False,
    profile: str | None = None,
    max_requests: int = DEFAULT_MAX_REQUESTS,
    **unknown: object,
) -> ObjectStore:
    """The store for "s3://bucket[/prefix]" (the `open_store` hook of the s3 scheme):
    an S3Store, wrapped in a PrefixStore when the URL names a prefix."""
    if unknown:
        raise BadStorageURL(f"{url}: unknown options {', '.join(sorted(unknown))}")
    bucket, prefix = parse_url(url)
    store = S3Store(
        bucket,
        endpoint_url=endpoint_url or None,
        region=region or None,
        path_style=bool(path_style),
        profile=profile or None,
        max_requests=max_requests,
    )
    return PrefixStore(store, prefix) if prefix else store
