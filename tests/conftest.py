"""Shared test setup: async tests run under trio, and new filesystems use cheap KDF
parameters so the suite stays fast."""

from __future__ import annotations

import functools
import inspect
import itertools
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pymysql
import pytest
import trio
from s3util import Bucket, MotoServer, fake_aws_environment, new_bucket

# Cheap Argon2id/scrypt parameters for every filesystem a test creates (also in the
# subprocesses tests start); see cloudfs.codec.crypto.
os.environ.setdefault("CLOUDFS_TEST_FAST_KDF", "1")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run `async def test_...` functions with trio.run (we do not use pytest-trio).
    Fixtures stay synchronous; an async resource a fixture yields is closed by the
    fixture with trio.run(resource.aclose)."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    kwargs = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    trio.run(functools.partial(pyfuncitem.obj, **kwargs))
    return True


# --- which metadata engine the integration filesystems use ------------------------------------


#: the metadata engines the integration suite runs on (`--metadata`, $CLOUDFS_TEST_METADATA)
METADATA_ENGINES = ("sqlite", "mysql")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--metadata",
        default=os.environ.get("CLOUDFS_TEST_METADATA", "sqlite"),
        help="metadata engine(s) of the filesystems the integration tests make: sqlite "
        "(a meta.db in the cache dir), mysql (a fresh database of the private MariaDB "
        "server per filesystem) or sqlite,mysql (each such test once per engine, ids "
        "ending in [sqlite] and [mysql]); default $CLOUDFS_TEST_METADATA or sqlite",
    )


# --- a private MariaDB server ---------------------------------------------------------------
#
# Started once per session, and only when a test asks for it: its own datadir under a
# temp dir, a free loopback port, `--no-defaults` (nothing of the machine's MariaDB
# configuration), and a user with a password, so that authentication is exercised. Each
# test gets a database of its own. The server dies with pytest (setpriv --pdeathsig) and is
# shut down at the end of the session, killed if it does not stop.

MARIADB_USER = "cloudfs"
MARIADB_PASSWORD = "mariadb test password 7c1e"


def _mariadb_binary(*names: str) -> str:
    for name in names:
        found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
        if found:
            return found
    pytest.fail(f"{names[0]} is not installed (apt-get install mariadb-server)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _dying_with_pytest() -> list[str]:
    """A command prefix that makes the server get SIGTERM (a clean shutdown) when
    pytest dies, so no mariadbd outlives a killed test run."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM"] if setpriv else []


class MariaDB:
    """A running private mariadbd; `root()` connects as root over its socket, `user`
    and `password` log in over TCP or the socket to any database named cloudfs_*."""

    user = MARIADB_USER
    password = MARIADB_PASSWORD

    def __init__(self, root: Path) -> None:
        self.dir = root
        self.datadir = root / "data"
        self.socket = root / "sock"
        self.log = root / "error.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._databases = itertools.count(1)
        self.start_seconds = 0.0

    def start(self) -> None:
        started = time.monotonic()
        # a test server, so speed over durability, and said here: no fsync at all (a
        # crash of the server loses nothing, one of the machine does: as SQLite's
        # synchronous=NORMAL for the SQLite tests, even less), no doublewrite buffer,
        # a buffer pool and redo log big enough that 100,000 rows need no early flush.
        # The users' figures (tests/stress/bench_mount_mariadb.sh) use durable settings.
        sizes = ["--innodb-buffer-pool-size=256M", "--innodb-log-file-size=128M"]
        relaxed = ["--innodb-flush-log-at-trx-commit=2", "--innodb-flush-method=nosync",
                   "--innodb-doublewrite=0"]
        as_root = ["--user=root"] if os.geteuid() == 0 else []
        install = [
            _mariadb_binary("mariadb-install-db", "mysql_install_db"), "--no-defaults",
            f"--datadir={self.datadir}", "--auth-root-authentication-method=normal",
            "--skip-test-db", *as_root, *relaxed, *sizes,
        ]  # fmt: skip
        for attempt in range(3):
            # seen once on a loaded machine: the bootstrap server failed; a second try
            # in a fresh datadir is cheap, and a persistent failure says why
            done = subprocess.run(install, capture_output=True, text=True, errors="replace")
            if done.returncode == 0:
                break
            (self.dir / f"install-failed-{attempt}.log").write_text(done.stdout + done.stderr)
            shutil.rmtree(self.datadir, ignore_errors=True)
            if attempt == 2:
                tail = " | ".join((done.stdout + done.stderr).splitlines()[-8:])
                pytest.fail(f"mariadb-install-db failed ({done.returncode}): {tail}")
            time.sleep(1.0)
        for _attempt in range(3):  # a free port may be taken before the server binds it
            self.port = _free_port()
            self.proc = subprocess.Popen(
                [*_dying_with_pytest(), _mariadb_binary("mariadbd", "mysqld"), "--no-defaults",
                 *as_root,
                 f"--datadir={self.datadir}", f"--socket={self.socket}", f"--port={self.port}",
                 "--bind-address=127.0.0.1", f"--pid-file={self.dir / 'mariadbd.pid'}",
                 f"--log-error={self.log}", "--skip-name-resolve", *relaxed, *sizes],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            if self._wait_ready(timeout=60.0):
                break
            self.stop()
        else:
            pytest.fail(f"mariadbd did not start: {self.log_tail()}")
        with self.root() as db, db.cursor() as cur:
            for host in ("127.0.0.1", "localhost"):
                cur.execute(
                    f"CREATE USER '{MARIADB_USER}'@'{host}' IDENTIFIED BY %s", (MARIADB_PASSWORD,)
                )
                cur.execute(f"GRANT ALL ON `cloudfs\\_%`.* TO '{MARIADB_USER}'@'{host}'")
        self.start_seconds = time.monotonic() - started

    def _wait_ready(self, timeout: float) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                self.root().close()
                return True
            except pymysql.Error:
                time.sleep(0.05)
        return False

    def root(self) -> pymysql.Connection:
        return pymysql.connect(unix_socket=str(self.socket), user="root", autocommit=True)

    def log_tail(self) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").splitlines()[-5:])
        except OSError:
            return "(no log)"

    def create_database(self) -> str:
        name = f"cloudfs_t{next(self._databases)}"
        with self.root() as db, db.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        with self.root() as db, db.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name}")

    def url(self, database: str) -> str:
        """The TCP URL of `database`, without the password."""
        return f"mysql://{MARIADB_USER}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            with self.root() as db, db.cursor() as cur:
                cur.execute("SHUTDOWN")
        except pymysql.Error:
            proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def mariadb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDB]:
    """The session's private MariaDB server (started on first use)."""
    root = tmp_path_factory.mktemp("mariadb")
    server = MariaDB(root)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def mysql_url(mariadb: MariaDB, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh, empty database of the private server, as a metadata URL without the
    password; the password is in $CLOUDFS_MYSQL_PASSWORD for the test's duration."""
    monkeypatch.setenv("CLOUDFS_MYSQL_PASSWORD", MARIADB_PASSWORD)
    name = mariadb.create_database()
    try:
        yield mariadb.url(name)
    finally:
        mariadb.drop_database(name)


# --- a private moto S3 server ---------------------------------------------------------------
#
# Started once per session, and only when a test asks for it (tests/s3util.py). From then on
# the test process and its children use fake AWS credentials and never the machine's own
# AWS configuration. Each test that asks for `s3_bucket` gets a reset server with one empty
# bucket.


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    with fake_aws_environment():
        server = MotoServer(tmp_path_factory.mktemp("moto"))
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(moto_server: MotoServer) -> Bucket:
    """An empty bucket in a freshly reset moto server."""
    return new_bucket(moto_server)
