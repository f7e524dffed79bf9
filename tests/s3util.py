"""A private moto S3 server for the tests: started on a free loopback port, reset
between tests, always stopped; and the fake AWS credentials the tests (and every
process they start) use with it.

moto keeps each object in a spooled temporary file: MOTO_S3_DEFAULT_KEY_BUFFER_SIZE
is small and TMPDIR points into pytest's tmp dir, so big test data goes to disk
there instead of into moto's memory.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

#: what the test process and its children use as AWS credentials (moto accepts any)
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "cloudfs-test-access-key",
    "AWS_SECRET_ACCESS_KEY": "cloudfs-test-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
    # never read the developer's own ~/.aws, never ask an instance metadata service
    "AWS_CONFIG_FILE": "/nonexistent/cloudfs-test/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/cloudfs-test/aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}
#: AWS variables that would send requests elsewhere or change the credentials
_AWS_ENV_REMOVED = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)

#: How the server is started: moto's own server, with one fix. moto computes an object's
#: ETag lazily by reading its data buffer without the object's lock, so a GET that races
#: with the first ETag computation (right after a PUT) can read from the wrong position
#: and answer 200 with an empty body. Real S3 has no such race; here the ETag
#: computation takes the object's lock, as reading its value does.
_MOTO_LAUNCHER = """
import sys
import moto.s3.models as models
_etag = models.FakeKey.etag.fget
def _locked_etag(self):
    with self.lock:
        return _etag(self)
models.FakeKey.etag = property(_locked_etag)
from moto.server import main
sys.exit(main(sys.argv[1:]))
"""

#: objects bigger than this go to moto's temporary files on disk
MOTO_KEY_BUFFER = 64 * 1024
START_TIMEOUT_S = 30.0


def _dying_with_pytest() -> list[str]:
    """A command prefix that sends the server SIGTERM when pytest dies, so no moto
    outlives a killed test run."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM"] if setpriv else []


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def fake_aws_environment() -> Iterator[None]:
    """FAKE_AWS_ENV in os.environ (inherited by every child process) while the block
    runs; the old environment afterwards."""
    saved = {k: os.environ.get(k) for k in (*FAKE_AWS_ENV, *_AWS_ENV_REMOVED)}
    for k in _AWS_ENV_REMOVED:
        os.environ.pop(k, None)
    os.environ.update(FAKE_AWS_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class MotoServer:
    """`python -m moto.server` on 127.0.0.1:<free port>, logging to `workdir`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.tmpdir = workdir / "tmp"
        self.log_path = workdir / "moto.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._client: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            **FAKE_AWS_ENV,
            "MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(MOTO_KEY_BUFFER),
            "TMPDIR": str(self.tmpdir),
        }
        last = ""
        for _attempt in range(3):  # the free port may be taken before moto binds it
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                server = ["-c", _MOTO_LAUNCHER, "-H", "127.0.0.1", "-p", str(self.port)]
                self.proc = subprocess.Popen(
                    [*_dying_with_pytest(), sys.executable, *server],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            deadline = time.monotonic() + START_TIMEOUT_S
            while self.proc.poll() is None and time.monotonic() < deadline:
                try:
                    self._post("/moto-api/reset")
                    return
                except (OSError, urllib.error.URLError):
                    time.sleep(0.1)
            last = self.log_path.read_text(errors="replace")[-2000:]
            self.stop()
        raise RuntimeError(f"moto server did not start; its log ends with:\n{last}")

    def _post(self, path: str, body: bytes = b"") -> bytes:
        # not a form content type: flask would swallow the body as form fields
        request = urllib.request.Request(
            self.endpoint + path, data=body, method="POST", headers={"Content-Type": "text/plain"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return bytes(response.read())

    def reset(self) -> None:
        """Forget every bucket and object, and accept any credentials again."""
        self._post("/moto-api/reset")
        self.set_auth(False)

    def set_auth(self, on: bool) -> None:
        """With `on`, moto checks credentials: requests signed with keys it never
        issued (like FAKE_AWS_ENV's) get 403 InvalidAccessKeyId."""
        self._post("/moto-api/reset-auth", b"0" if on else b"inf")

    def client(self) -> Any:
        """A boto3 S3 client of this server (for setting up and looking at buckets)."""
        if self._client is None:
            self._client = self._new_client()
        return self._client

    def _new_client(self) -> Any:
        return boto3.session.Session(
            aws_access_key_id=FAKE_AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        ).client(
            "s3",
            endpoint_url=self.endpoint,
            config=Config(s3={"addressing_style": "path"}),
        )

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


class Bucket:
    """A bucket in the moto server, and what a test needs to look into it."""

    def __init__(self, server: MotoServer, name: str) -> None:
        self.server = server
        self.name = name
        self.endpoint = server.endpoint
        self.client = server.client()

    @property
    def url(self) -> str:
        return f"s3://{self.name}"

    def objects(self, prefix: str = "") -> dict[str, int]:
        """Every object in the bucket under `prefix`: key -> size."""
        found: dict[str, int] = {}
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.name, Prefix=prefix):
            for obj in page.get("Contents", []):
                found[obj["Key"]] = int(obj["Size"])
        return found

    def read(self, key: str) -> bytes:
        return bytes(self.client.get_object(Bucket=self.name, Key=key)["Body"].read())

    def write(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=data)


def new_bucket(server: MotoServer, name: str = "cloudfs-test") -> Bucket:
    """Reset the server and make one empty bucket."""
    server.reset()
    bucket = Bucket(server, name)
    bucket.client.create_bucket(Bucket=name)
    return bucket
