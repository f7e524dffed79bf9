"""S3Store without a server: URL and option checks (credentials never accepted or
echoed), the endpoint botocore resolves, which failures count as temporary (RetryStore
retries only those) and the one-line errors the others become, and how a dead or
silent endpoint fails: fast, and as a temporary failure."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator

import botocore.exceptions as bex
import pytest
import urllib3.exceptions

from cloudfs.errors import (
    BadStorageURL,
    BucketMissing,
    ObjectNotFound,
    StoreAccessDenied,
    StorePermanentError,
    StoreTemporaryError,
    StoreUnreachable,
)
from cloudfs.objectstore import open_store
from cloudfs.objectstore.prefix import PrefixStore
from cloudfs.objectstore.s3 import S3Store, TruncatedBody, parse_url

ENDPOINT = "http://127.0.0.1:9"  # nothing is sent in most tests here


@pytest.fixture(autouse=True)
def _aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unit-test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unit-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def store() -> Iterator[S3Store]:
    s = S3Store("bucket-x", endpoint_url=ENDPOINT)
    yield s
    s._client.close()


def client_error(code: str, status: int, message: str = "msg") -> bex.ClientError:
    return bex.ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "GetObject",
    )


# --- URLs and options ---------------------------------------------------------------------


def test_parse_url() -> None:
    assert parse_url("s3://bucket-x") == ("bucket-x", "")
    assert parse_url("s3://bucket-x/") == ("bucket-x", "")
    assert parse_url("s3://bucket-x/fs1") == ("bucket-x", "fs1/")
    assert parse_url("s3://bucket-x/a/b/") == ("bucket-x", "a/b/")
    for bad in ("s3://", "s3://b", "s3://bucket-x/a//b", "s3://bucket-x/../x", "s3://bu?x=1"):
        with pytest.raises(BadStorageURL):
            parse_url(bad)


def test_credentials_in_urls_are_refused_and_not_repeated() -> None:
    secret = "wJalrXUtnFEMI-K7MDENG"
    with pytest.raises(BadStorageURL) as info:
        open_store(f"s3://AKIAEXAMPLE:{secret}@bucket-x/fs")
    assert secret not in info.value.message and "credentials" in info.value.message
    with pytest.raises(BadStorageURL) as info:
        open_store("s3://bucket-x", endpoint_url=f"http://key:{secret}@127.0.0.1:9000")
    assert secret not in info.value.message and "credentials" in info.value.message


def test_unknown_options_and_bad_endpoints() -> None:
    with pytest.raises(BadStorageURL, match="secret_key"):
        open_store("s3://bucket-x", secret_key="x")
    with pytest.raises(BadStorageURL, match="endpoint"):
        open_store("s3://bucket-x", endpoint_url="127.0.0.1:9000")


def test_prefix_url_is_a_prefix_store() -> None:
    s = open_store("s3://bucket-x/some/prefix", endpoint_url=ENDPOINT, path_style=True)
    assert isinstance(s, PrefixStore) and isinstance(s.inner, S3Store)
    assert s.url == "s3://bucket-x/some/prefix/"
    assert s.prefix == "some/prefix/"


def test_endpoint_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore's own AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL apply when no endpoint
    option is given; the option wins over both."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:7001")
    assert S3Store("bucket-x").endpoint == "http://127.0.0.1:7001"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:7002")
    assert S3Store("bucket-x").endpoint == "http://127.0.0.1:7002"
    assert S3Store("bucket-x", endpoint_url=ENDPOINT).endpoint == ENDPOINT


def test_unknown_profile_is_a_usage_error() -> None:
    with pytest.raises(Exception, match="profile 'nope' not found"):
        S3Store("bucket-x", profile="nope")


# --- classification ----------------------------------------------------------------------

TEMPORARY = [
    client_error("InternalError", 500),
    client_error("SlowDown", 503),
    client_error("503", 503),  # a HEAD answer has no body, only the status
    client_error("ServiceUnavailable", 503),
    client_error("Throttling", 400),
    client_error("ThrottlingException", 400),
    client_error("RequestTimeout", 400),
    client_error("TooManyRequests", 429),
    client_error("BadDigest", 400),
    client_error("IncompleteBody", 400),
    client_error("Whatever", 502),
    bex.EndpointConnectionError(endpoint_url=ENDPOINT),
    bex.ConnectTimeoutError(endpoint_url=ENDPOINT),
    bex.ConnectionClosedError(endpoint_url=ENDPOINT),
    bex.ReadTimeoutError(endpoint_url=ENDPOINT),
    bex.ResponseStreamingError(error="IncompleteRead(1 bytes read, 9 more expected)"),
    bex.IncompleteReadError(actual_bytes=1, expected_bytes=10),
    urllib3.exceptions.ProtocolError("Connection broken"),
    http.client.IncompleteRead(b"x", 10),
    ConnectionResetError(104, "Connection reset by peer"),
    TimeoutError("timed out"),
    TruncatedBody("got 1 of 10 bytes"),
]

PERMANENT = [
    client_error("AccessDenied", 403),
    client_error("403", 403),
    client_error("InvalidAccessKeyId", 403),
    client_error("SignatureDoesNotMatch", 403),
    client_error("NoSuchBucket", 404),
    client_error("NoSuchKey", 404),
    client_error("InvalidBucketName", 400),
    client_error("PermanentRedirect", 301),
    bex.NoCredentialsError(),
    bex.SSLError(endpoint_url=ENDPOINT, error="certificate verify failed"),
    bex.ParamValidationError(report="bad parameter"),
]


@pytest.mark.parametrize("exc", TEMPORARY, ids=lambda e: type(e).__name__ + str(e)[:30])
def test_temporary_failures(store: S3Store, exc: Exception) -> None:
    assert store.is_temp_failure(exc)
    translated = store.translate_error(exc, "get", "k")
    assert isinstance(translated, StoreTemporaryError)
    assert store.is_temp_failure(translated)


@pytest.mark.parametrize("exc", PERMANENT, ids=lambda e: type(e).__name__ + str(e)[:30])
def test_permanent_failures(store: S3Store, exc: Exception) -> None:
    assert not store.is_temp_failure(exc)
    translated = store.translate_error(exc, "get", "k")
    assert not store.is_temp_failure(translated)
    assert isinstance(translated, (StorePermanentError, ObjectNotFound))
    assert "\n" not in str(translated)


def test_messages_say_what_to_fix(store: S3Store) -> None:
    missing = store.translate_error(client_error("NoSuchBucket", 404), "get", "k")
    assert isinstance(missing, BucketMissing)
    assert missing.message == f"the bucket does not exist: s3://bucket-x at {ENDPOINT}"
    denied = store.translate_error(client_error("InvalidAccessKeyId", 403), "put", "k")
    assert isinstance(denied, StoreAccessDenied)
    assert "check the credentials" in denied.message and "InvalidAccessKeyId" in denied.message
    assert isinstance(
        store.translate_error(client_error("NoSuchKey", 404), "get", "k"), ObjectNotFound
    )
    nocreds = store.translate_error(bex.NoCredentialsError(), "get", "k")
    assert isinstance(nocreds, StoreAccessDenied) and "no AWS credentials" in nocreds.message
    region = store.translate_error(client_error("PermanentRedirect", 301), "get", "k")
    assert "--s3-region" in str(region)


def test_bugs_are_not_store_failures(store: S3Store) -> None:
    bug = TypeError("a bug")
    assert store.translate_error(bug) is bug
    assert not store.is_temp_failure(bug)


# --- dead and silent endpoints -------------------------------------------------------------


async def test_refused_connection_fails_fast_as_unreachable() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = S3Store("bucket-x", endpoint_url=f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(StoreUnreachable) as info:
        await store.get("superblock")
    assert time.monotonic() - started < 5
    assert (
        info.value.message
        == f"cannot reach the object store: http://127.0.0.1:{port} (Connection refused)"
    )
    assert store.is_temp_failure(info.value)
    await store.aclose()


async def test_silent_server_is_a_temporary_failure() -> None:
    """A server that accepts and never answers: the read timeout ends the request."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    store = S3Store("bucket-x", endpoint_url=f"http://127.0.0.1:{port}", read_timeout=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(StoreTemporaryError) as info:
            await store.head("k")
        assert time.monotonic() - started < 5
        assert "read timeout" in info.value.message
    finally:
        await store.aclose()
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()
