"""Real cloudfs filesystems for integration tests: made with `mkfs.cloudfs`, mounted
with `mount.cloudfs` as a subprocess, and always unmounted and stopped — mount
process and daemon — however the test ends.

Each filesystem lives in its own tmp dir (store/, cache/, mnt/). While a test runs,
pytest is a child subreaper (prctl PR_SET_CHILD_SUBREAPER), so the detached mount
process and its daemon become pytest's children: the fixtures can then wait for
them and see their exit status ("the mount process exits 0 after fusermount3 -u").

After a test, DIR/mount.log and DIR/daemon.log must hold no ERROR/CRITICAL line and
no Python traceback; a test that provokes one on purpose says so with
`@pytest.mark.log_errors_expected(regex, ...)`.

The metadata of every filesystem is SQLite (a meta.db in its cache dir) unless pytest
runs with `--metadata=mysql` (or CLOUDFS_TEST_METADATA=mysql): then mkfs gets
`--metadata mysql://...`, a fresh database of the session's private MariaDB server per
filesystem (tests/conftest.py), dropped at the end of the test. With
`--metadata=sqlite,mysql` every test that makes filesystems runs on both engines (ids
end in [sqlite] and [mysql]). A test whose subject only exists on SQLite (the mount
lease, the meta.db file) is marked `@pytest.mark.sqlite_only(reason)` and runs on
SQLite only.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pymysql
import pytest
from s3util import Bucket

#: the venv's console scripts sit next to the interpreter running pytest
BIN = Path(sys.executable).parent

PASSPHRASE = "integration test passphrase 8f3a"

#: how long a clean unmount may take (it seals every open file first)
UNMOUNT_TIMEOUT_S = 120.0
#: how long a daemon may take to stop on SIGTERM (it finishes running PUTs)
DAEMON_STOP_TIMEOUT_S = 20.0

_PR_SET_CHILD_SUBREAPER = 36

# a log line at ERROR or CRITICAL level (both processes put the level as a word of
# its own near the start of the line), or the start of a Python traceback
_LOG_ERROR_LEVEL = re.compile(r"^(?:\S+ ){1,4}(ERROR|CRITICAL)\b")
_TRACEBACK = re.compile(r"Traceback \(most recent call last\)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "log_errors_expected(*regex): ERROR lines in mount.log/daemon.log matching one "
        "of these patterns do not fail the test",
    )
    config.addinivalue_line(
        "markers",
        "sqlite_only(reason): the test is about SQLite metadata (meta.db, the mount lease) "
        "and is skipped when the suite runs with --metadata=mysql",
    )
    config.addinivalue_line(
        "markers",
        "store_kinds(*kinds): run each test of `fs`/`make_fs` once per object store kind "
        '("local", "s3"); see the store_kind fixture',
    )


#: the metadata engines (tests/conftest.py: `--metadata`)
METADATA_ENGINES = ("sqlite", "mysql")

#: the object store kinds a filesystem can live in
STORE_KINDS = ("local", "s3")


def metadata_engines(value: str) -> list[str]:
    """The engines of a `--metadata` value: "sqlite", "mysql" or "sqlite,mysql"."""
    engines = [e.strip() for e in value.split(",") if e.strip()]
    unknown = [e for e in engines if e not in METADATA_ENGINES]
    if not engines or unknown or len(set(engines)) != len(engines):
        raise pytest.UsageError(
            f"--metadata, CLOUDFS_TEST_METADATA: {value!r}: one or more of {METADATA_ENGINES},"
            " comma-separated"
        )
    return engines


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test (or module, via pytestmark) marked `store_kinds("local", "s3")` that uses
    a filesystem runs once per kind: its ids end in [local] and [s3].

    With several metadata engines (`--metadata sqlite,mysql`), a test that makes
    filesystems runs once per engine too (ids end in [sqlite] and [mysql]), except a
    test that names its MySQL database itself (`mysql_url`: it is the same run on
    either). The object store and the metadata engine are independent code paths, so a
    test run per store kind pairs the S3 store with the first engine only."""
    kinds: list[str] = []
    marker = metafunc.definition.get_closest_marker("store_kinds")
    if marker is not None and "store_kind" in metafunc.fixturenames:
        kinds = list(marker.args or STORE_KINDS)
        unknown = [k for k in kinds if k not in STORE_KINDS]
        if unknown:
            raise pytest.UsageError(f"store_kinds: unknown kind(s) {unknown}")
    engines = metadata_engines(str(metafunc.config.getoption("metadata")))
    if len(engines) < 2:
        engines = []  # the `metadata_engine` fixture gives the one engine
    elif metafunc.definition.get_closest_marker("sqlite_only") is not None:
        engines = ["sqlite"] if "sqlite" in engines else engines[:1]
    elif "make_fs" not in metafunc.fixturenames or "mysql_url" in metafunc.fixturenames:
        engines = []  # the first engine (the fixture)
    if kinds and engines:
        pairs = [(kinds[0], e) for e in engines] + [(k, engines[0]) for k in kinds[1:]]
        metafunc.parametrize(
            ("store_kind", "metadata_engine"), pairs, indirect=["store_kind"],
            ids=[f"{k}-{e}" for k, e in pairs],
        )  # fmt: skip
    elif kinds:
        metafunc.parametrize("store_kind", kinds, indirect=True)
    elif engines:
        metafunc.parametrize("metadata_engine", engines)


def tool(name: str) -> str:
    """Absolute path of a cloudfs console script (the venv's, else one on PATH)."""
    candidate = BIN / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (looked in {BIN} and on PATH)")
    return found


# --- processes -----------------------------------------------------------------------


def _set_subreaper(on: bool) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [os.fsdecode(a) for a in raw.split(b"\0") if a]


def _running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rpartition(")")[2].split()[0]
    return state not in ("Z", "X")


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _mount_processes(mountpoint: Path) -> list[int]:
    """Running mount.cloudfs processes serving `mountpoint`."""
    target = str(mountpoint)
    found = []
    for pid in _pids():
        args = _cmdline(pid)
        if target in args and any(a.endswith("mount.cloudfs") for a in args) and _running(pid):
            found.append(pid)
    return found


def _daemon_processes(cache: Path) -> list[int]:
    """Running cloudfsd processes serving the cache dir `cache`."""
    target = str(cache)
    found = []
    for pid in _pids():
        args = _cmdline(pid)
        if not any(a.endswith("cloudfsd") or a == "cloudfs.daemon.main" for a in args):
            continue
        serves = any(
            a == "--cachedir" and args[i + 1 : i + 2] == [target] for i, a in enumerate(args)
        )
        if serves and _running(pid):
            found.append(pid)
    return found


def wait_exit(pid: int, timeout: float) -> int | None:
    """Wait until `pid` has exited. Returns its exit code when it was our child (so
    we reaped it), None when it was not; raises TimeoutError if it is still running."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            if not _running(pid):
                return None
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} still running after {timeout:.0f} s")
        time.sleep(0.05)


def stop_process(
    pid: int, sig: int = signal.SIGTERM, timeout: float = DAEMON_STOP_TIMEOUT_S
) -> int | None:
    """Send `sig`, wait for the exit (SIGKILL after `timeout`); returns the exit code
    as `wait_exit` does."""
    try:
        os.kill(pid, sig)
        os.kill(pid, signal.SIGCONT)  # a stopped process would never see the signal
    except ProcessLookupError:
        pass
    try:
        return wait_exit(pid, timeout)
    except TimeoutError:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return wait_exit(pid, 10.0)


def _fuse_mounts_under(base: Path) -> list[Path]:
    """FUSE mount points at or below `base`, deepest first."""
    found = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        sep = fields.index("-")
        fstype = fields[sep + 1]
        # mountinfo escapes space, tab, newline and backslash as octal
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        if fstype.startswith("fuse") and (point == str(base) or point.startswith(str(base) + "/")):
            found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _fusermount(mountpoint: Path, *, lazy: bool = False) -> subprocess.CompletedProcess[str]:
    args = ["fusermount3", "-uz" if lazy else "-u", str(mountpoint)]
    return subprocess.run(args, check=False, capture_output=True, text=True, timeout=60)


# --- one filesystem --------------------------------------------------------------------


class MetadataSQL:
    """A plain connection to a filesystem's metadata: a SQLite file or a MySQL URL."""

    def __init__(self, where: Path | str, password: str | None) -> None:
        self.mysql = isinstance(where, str)
        if isinstance(where, str):
            url = urlsplit(where)
            self._conn: Any = pymysql.connect(
                host=url.hostname, port=url.port or 3306, user=url.username,
                password=password or "", database=url.path.strip("/"), autocommit=True,
            )  # fmt: skip
        else:
            self._conn = sqlite3.connect(where, isolation_level=None)

    def execute(self, sql: str, params: tuple | list = ()) -> Any:
        """Run `sql` (with `?` placeholders); returns a cursor (fetchone, fetchall)."""
        if not self.mysql:
            return self._conn.execute(sql, params)
        cur = self._conn.cursor()
        if params:
            cur.execute(sql.replace("%", "%%").replace("?", "%s"), tuple(params))
        else:
            cur.execute(sql)
        return cur

    def close(self) -> None:
        self._conn.close()


class CloudFS:
    """One cloudfs filesystem in `root`: store/, cache/, mnt/ and the commands on them."""

    def __init__(
        self,
        root: Path,
        *,
        encryption: bool = True,
        metadata: str | None = None,
        metadata_password: str | None = None,
    ) -> None:
        self.root = root
        self.store = root / "store"
        self.cache = root / "cache"
        self.mnt = root / "mnt"
        self.storage_url = f"local://{self.store}"
        #: storage options mkfs and mount get (an S3 endpoint)
        self.storage_args: list[str] = []
        self.encryption = encryption
        #: the MySQL URL (without password) mkfs puts the metadata in; None: SQLite
        self.metadata = metadata
        self.passphrase = PASSPHRASE
        self.env = {
            **os.environ,
            "CLOUDFS_PASSPHRASE": self.passphrase,
            "CLOUDFS_TEST_FAST_KDF": "1",
        }
        if metadata is not None:
            self.env["CLOUDFS_MYSQL_PASSWORD"] = metadata_password or ""
        #: mkfs was given --metadata by the test (which then chooses the upload mode)
        self.metadata_named_by_test = False
        #: the mount.cloudfs process serving mnt while mounted
        self.mount_pid: int | None = None
        #: exit codes of the mount processes that ended (None: not ours to reap)
        self.mount_exits: list[int | None] = []
        self.mnt.mkdir(parents=True, exist_ok=True)

    #: wait for a process (mount or daemon) to exit; see `wait_exit`
    wait_exit = staticmethod(wait_exit)

    # --- commands ---------------------------------------------------------------------

    def run(
        self,
        prog: str,
        *args: str | Path,
        env: dict[str, str] | None = None,
        timeout: float = 300.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a cloudfs command line; never raises on a non-zero exit."""
        return subprocess.run(
            [tool(prog), *map(str, args)],
            check=False,
            env=self.env if env is None else env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )

    def check(self, prog: str, *args: str | Path, **kw: object) -> subprocess.CompletedProcess[str]:
        """Run a command that must succeed."""
        r = self.run(prog, *args, **kw)  # type: ignore[arg-type]
        if r.returncode != 0:
            pytest.fail(
                f"{prog} {' '.join(map(str, args))} exited {r.returncode}:\n{r.stderr}{r.stdout}"
            )
        return r

    #: where `mkfs` keeps the filesystems it copies (set per session by a fixture)
    template_root: Path | None = None

    def mkfs(self, *extra: str) -> None:
        """mkfs.cloudfs STORE --cachedir CACHE. A plain one (local store, no options)
        is made once per session and kind by the real command, then copied: see
        `_copy_made_fs`."""
        if (
            not extra
            and type(self) is CloudFS
            and self.template_root is not None
            and self.metadata is None  # a MySQL database is made by the real command
        ):
            self._copy_made_fs()
            return
        args = [self.storage_url, "--cachedir", str(self.cache), *self.storage_args, *extra]
        if any(a.startswith("--metadata") for a in extra):
            self.metadata_named_by_test = True
        elif self.metadata is not None:
            args += ["--metadata", self.metadata]  # the cache dir remembers it for mount
        if not self.encryption:
            args.append("--no-encryption")
        self.check("mkfs.cloudfs", *args)

    def _copy_made_fs(self) -> None:
        """What `mkfs.cloudfs local://STORE --cachedir CACHE` writes is store/superblock,
        cache/meta.db and cache/config.json (which names the two paths). A session makes
        one such filesystem per passphrase and encryption setting with the real command
        and gives each test a copy with the paths in config.json rewritten: a test then
        pays a file copy instead of a Python start, mkfs's tests run the command itself.
        The copies share the uuid and master key, which nothing outside their own store
        and cache dir looks at (tests that mount without --cachedir run mkfs themselves)."""
        assert self.template_root is not None
        key = hashlib.sha256(
            f"{self.encryption}\0{self.env.get('CLOUDFS_PASSPHRASE')}\0"
            f"{self.env.get('CLOUDFS_TEST_FAST_KDF')}".encode()
        ).hexdigest()[:16]
        made = self.template_root / key
        if not made.exists():
            building = self.template_root / f"{key}.new"
            shutil.rmtree(building, ignore_errors=True)
            template = CloudFS(building, encryption=self.encryption)
            template.env = self.env
            template.template_root = None
            template.mkfs()
            building.rename(made)
        shutil.copytree(made / "store", self.store)
        shutil.copytree(made / "cache", self.cache)
        config_path = self.cache / "config.json"
        config = json.loads(config_path.read_text())
        config["storage"] = self.storage_url
        config["metadata"] = str(self.cache / "meta.db")
        config_path.write_text(json.dumps(config, indent=2) + "\n")

    def mount(
        self, *extra: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """mount.cloudfs STORE MNT --cachedir CACHE; returns once mounted (the command
        goes to the background only after the mount is up)."""
        assert not os.path.ismount(self.mnt), f"{self.mnt} is already mounted"
        if (
            self.metadata is not None
            and not self.metadata_named_by_test
            and not any("upload" in str(a) or "metadata" in str(a) for a in extra)
        ):
            # the same write-back as on SQLite, so each test checks the same thing on
            # both engines (MySQL's default is --upload=sync: test_shared, test_mysql
            # and test_durability cover it, and name their MySQL databases themselves)
            extra = ("--upload=async", *extra)
        r = self.check(
            "mount.cloudfs",
            self.storage_url,
            self.mnt,
            "--cachedir",
            self.cache,
            *self.storage_args,
            *extra,
            env=env,
            timeout=120,
        )
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.mnt):
            if time.monotonic() > deadline:
                pytest.fail(f"mount.cloudfs exited 0 but {self.mnt} is not mounted")
            time.sleep(0.05)
        pids = _mount_processes(self.mnt)
        assert len(pids) == 1, f"expected one mount.cloudfs process for {self.mnt}, found {pids}"
        self.mount_pid = pids[0]
        return r

    @property
    def mounted(self) -> bool:
        return os.path.ismount(self.mnt)

    def unmount(self) -> int | None:
        """fusermount3 -u (retried while busy); waits for the mount process and checks
        that it exits 0. Returns its exit code (None if it was not ours to reap)."""
        deadline = time.monotonic() + 10
        while True:
            r = _fusermount(self.mnt)
            if r.returncode == 0:
                break
            if "busy" not in r.stderr.lower() or time.monotonic() > deadline:
                pytest.fail(f"fusermount3 -u {self.mnt} failed: {r.stderr.strip()}")
            time.sleep(0.1)
        code = None
        if self.mount_pid is not None:
            pid, self.mount_pid = self.mount_pid, None
            try:
                code = wait_exit(pid, UNMOUNT_TIMEOUT_S)
            except TimeoutError:
                pytest.fail(
                    f"mount.cloudfs (pid {pid}) still running {UNMOUNT_TIMEOUT_S:.0f} s after unmount"
                )
            self.mount_exits.append(code)
            assert code in (0, None), (
                f"mount.cloudfs exited {code} after a clean unmount (see {self.cache}/mount.log)"
            )
        return code

    def remount(self) -> None:
        self.unmount()
        self.mount()

    def kill_mount(self, sig: int = signal.SIGKILL) -> None:
        """Crash the mount process (kill -9 by default) and wait until it is gone, then
        detach the dead FUSE mount point (`fusermount3 -uz`, as a user would after a
        crash: it answers ENOTCONN until then). The daemon is left alone."""
        pids = set(_mount_processes(self.mnt))
        if self.mount_pid is not None:
            pids.add(self.mount_pid)
        self.mount_pid = None
        for pid in pids:
            stop_process(pid, sig, 30.0)
        if _fuse_mounts_under(self.mnt):
            r = _fusermount(self.mnt, lazy=True)
            if r.returncode != 0:
                pytest.fail(f"fusermount3 -uz {self.mnt} failed: {r.stderr.strip()}")
        assert not _fuse_mounts_under(self.mnt), f"{self.mnt} is still mounted"

    def stat_json(self) -> dict:
        r = self.check("cloudfs", "stat", "--json", self.mnt, timeout=60)
        return json.loads(r.stdout)

    def flush(self, timeout: float = 600.0) -> None:
        """cloudfs flush: seal everything and wait until no upload is pending."""
        self.check("cloudfs", "flush", self.mnt, timeout=timeout)

    @contextlib.contextmanager
    def metadata_db(self) -> Iterator[MetadataSQL]:
        """The filesystem's metadata database, SQLite or MySQL, for looking at it or
        damaging it behind cloudfs's back (statements in SQLite's `?` style; autocommit)."""
        db = MetadataSQL(self.cache / "meta.db" if self.metadata is None else self.metadata,
                         self.env.get("CLOUDFS_MYSQL_PASSWORD"))  # fmt: skip
        try:
            yield db
        finally:
            db.close()

    # --- the daemon ---------------------------------------------------------------------

    def daemon_pid(self) -> int | None:
        """The running daemon's pid per DIR/daemon.pid, or None."""
        try:
            pid = int((self.cache / "daemon.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _running(pid) else None

    def kill_daemon(
        self, sig: int = signal.SIGTERM, timeout: float = DAEMON_STOP_TIMEOUT_S
    ) -> int | None:
        """Stop the cache dir's daemon with `sig` (SIGKILL after `timeout`) and wait
        until it is gone. Returns the pid it had, or None if none ran."""
        pids = set(_daemon_processes(self.cache))
        pid = self.daemon_pid()
        if pid is not None:
            pids.add(pid)
        for p in pids:
            stop_process(p, sig, timeout)
        return pid

    def wait_daemon_gone(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while _daemon_processes(self.cache):
            if time.monotonic() > deadline:
                pytest.fail(f"the daemon of {self.cache} still runs after {timeout:.0f} s")
            time.sleep(0.1)

    # --- looking at the cache and the store ---------------------------------------------

    def drop_cached_blocks(self) -> int:
        """Remove the plaintext block copies from the cache dir (unmounted, daemon
        stopped), so every read must fetch from the store. Returns how many."""
        assert not self.mounted, "drop_cached_blocks needs the filesystem unmounted"
        self.kill_daemon()
        removed = 0
        for path in (self.cache / "blocks").glob("*/*"):
            if path.is_file():
                path.unlink()
                removed += 1
        return removed

    def cached_blocks(self) -> list[Path]:
        return [p for p in (self.cache / "blocks").glob("*/*") if p.is_file()]

    def store_objects(self) -> dict[str, tuple[int, str]]:
        """Every file under the store: relative path -> (size, sha256)."""
        result: dict[str, tuple[int, str]] = {}
        if not self.store.exists():
            return result
        for path in sorted(self.store.rglob("*")):
            if path.is_file():
                data = path.read_bytes()
                result[str(path.relative_to(self.store))] = (
                    len(data),
                    hashlib.sha256(data).hexdigest(),
                )
        return result

    def store_contents(self) -> dict[str, bytes]:
        """Every object in the store: relative path (key) -> its bytes."""
        if not self.store.exists():
            return {}
        return {
            str(p.relative_to(self.store)): p.read_bytes()
            for p in sorted(self.store.rglob("*"))
            if p.is_file()
        }

    def block_objects(self) -> list[Path]:
        return sorted(p for p in (self.store / "blocks").glob("*/*") if p.is_file())

    def read_object(self, key: str) -> bytes:
        """The bytes of the object `key` (e.g. "blocks/ab/ab12...") in the store."""
        return (self.store / key).read_bytes()

    def write_object(self, key: str, data: bytes) -> None:
        """Put `data` as the object `key` in the store, behind cloudfs's back."""
        path = self.store / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def store_block_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.block_objects())

    def log_problems(self, allowed: list[re.Pattern[str]]) -> list[str]:
        """ERROR/CRITICAL lines and tracebacks in mount.log and daemon.log."""
        problems = []
        for name in ("mount.log", "daemon.log"):
            path = self.cache / name
            if not path.exists():
                continue
            lines = path.read_text(errors="replace").splitlines()
            for i, line in enumerate(lines):
                if not (_LOG_ERROR_LEVEL.search(line) or _TRACEBACK.search(line)):
                    continue
                if any(p.search(line) for p in allowed):
                    continue
                context = "\n    ".join(lines[i : i + 12])
                problems.append(f"{path}:{i + 1}:\n    {context}")
        return problems

    # --- cleanup ------------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        """Unmount and stop everything of this filesystem, whatever state it is in.
        Returns what went wrong (for the report); never raises."""
        notes: list[str] = []
        lazy = False
        try:
            if os.path.ismount(self.mnt):
                deadline = time.monotonic() + 5
                while os.path.ismount(self.mnt):
                    r = _fusermount(self.mnt)
                    if r.returncode == 0:
                        break
                    if time.monotonic() > deadline:
                        notes.append(
                            f"fusermount3 -u {self.mnt}: {r.stderr.strip()}; unmounting lazily"
                        )
                        _fusermount(self.mnt, lazy=True)
                        lazy = True
                        break
                    time.sleep(0.1)
            mount_pids = set(_mount_processes(self.mnt))
            if self.mount_pid is not None:
                mount_pids.add(self.mount_pid)
            for pid in mount_pids:
                code: int | None
                try:
                    # a lazily unmounted mount serves its open files until killed
                    code = wait_exit(pid, 2.0 if lazy else 30.0)
                except TimeoutError:
                    notes.append(f"mount.cloudfs {pid} did not exit after unmount; killed")
                    code = stop_process(pid, signal.SIGTERM, 10.0)
                if pid == self.mount_pid:
                    self.mount_exits.append(code)
            self.mount_pid = None
            if os.path.ismount(self.mnt):
                _fusermount(self.mnt, lazy=True)
            daemons = set(_daemon_processes(self.cache))
            pid_file = self.daemon_pid()
            if pid_file is not None:
                daemons.add(pid_file)
            for pid in daemons:
                stop_process(pid, signal.SIGTERM, DAEMON_STOP_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - cleanup must go on and report
            notes.append(f"cleanup of {self.root} failed: {type(exc).__name__}: {exc}")
        return notes


class S3CloudFS(CloudFS):
    """The same filesystem with its storage at s3://<bucket>/<name>/ in the private moto
    server (tests/s3util.py), reached at `endpoint`: the server itself, or a fault proxy
    in front of it. Only the store is elsewhere; the cache dir and mount are as above."""

    def __init__(
        self,
        root: Path,
        bucket: Bucket,
        *,
        endpoint: str | None = None,
        encryption: bool = True,
        metadata: str | None = None,
        metadata_password: str | None = None,
    ) -> None:
        super().__init__(
            root, encryption=encryption, metadata=metadata, metadata_password=metadata_password
        )
        self.bucket = bucket
        self.key_prefix = f"{root.name}/"
        self.storage_url = f"{bucket.url}/{root.name}"
        self.endpoint = endpoint or bucket.endpoint
        self.storage_args = ["--s3-endpoint", self.endpoint]

    def store_contents(self) -> dict[str, bytes]:
        n = len(self.key_prefix)
        return {key[n:]: self.bucket.read(key) for key in self.bucket.objects(self.key_prefix)}

    def store_objects(self) -> dict[str, tuple[int, str]]:
        return {
            key: (len(data), hashlib.sha256(data).hexdigest())
            for key, data in self.store_contents().items()
        }

    def block_objects(self) -> list[str]:  # type: ignore[override]
        return sorted(self.bucket.objects(self.key_prefix + "blocks/"))

    def read_object(self, key: str) -> bytes:
        return self.bucket.read(self.key_prefix + key)

    def write_object(self, key: str, data: bytes) -> None:
        self.bucket.write(self.key_prefix + key, data)

    def store_block_bytes(self) -> int:
        return sum(self.bucket.objects(self.key_prefix + "blocks/").values())


# --- fixtures ----------------------------------------------------------------------------


def _reap_children() -> None:
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


@pytest.fixture
def store_kind(request: pytest.FixtureRequest) -> str:
    """Where `fs` and `make_fs` put a filesystem by default: "local" (a store dir), or
    "s3" (a bucket in the session's moto server, reset for the test). "local" unless
    the test is marked `store_kinds(...)`, which runs it once per kind."""
    kind = getattr(request, "param", "local")
    assert kind in STORE_KINDS, kind
    return str(kind)




@pytest.fixture(scope="session")
def metadata_engine(pytestconfig: pytest.Config) -> str:
    """"sqlite" or "mysql": where `make_fs` puts the metadata (`--metadata`; with
    several engines, tests that make filesystems are parametrized over them instead:
    see `pytest_generate_tests`)."""
    return metadata_engines(str(pytestconfig.getoption("metadata")))[0]


@pytest.fixture(autouse=True)
def _skip_sqlite_only(request: pytest.FixtureRequest, metadata_engine: str) -> None:
    marker = request.node.get_closest_marker("sqlite_only")
    if marker is not None and metadata_engine != "sqlite":
        pytest.skip(f"SQLite only: {marker.args[0] if marker.args else 'no reason given'}")


@pytest.fixture
def make_fs(
    request: pytest.FixtureRequest, tmp_path: Path, store_kind: str, metadata_engine: str
) -> Iterator[Callable[..., CloudFS]]:
    """A factory: make_fs(name="fs", encryption=True, mkfs=True, mount=True) -> CloudFS,
    in the test's `store_kind` unless `store` ("local" or "s3") or `bucket` says
    otherwise, with its metadata in the session's `metadata_engine` (on MySQL a fresh
    database each). Every filesystem it made is unmounted and stopped at the end of the
    test, and its logs are checked for errors."""
    made: list[CloudFS] = []
    databases: list[str] = []
    subreaper = _set_subreaper(True)

    def new_database() -> dict[str, str]:
        """CloudFS arguments: a fresh MySQL database, or none (SQLite)."""
        if metadata_engine != "mysql":
            return {}
        server = request.getfixturevalue("mariadb")
        databases.append(server.create_database())
        return {"metadata": server.url(databases[-1]), "metadata_password": server.password}

    def make(
        name: str = "fs",
        *,
        encryption: bool = True,
        mkfs: bool = True,
        mount: bool = True,
        bucket: Bucket | None = None,
        endpoint: str | None = None,
        store: str | None = None,
    ) -> CloudFS:
        """With `bucket`, an S3CloudFS in it (see there)."""
        if bucket is None and (store or store_kind) == "s3":
            bucket = request.getfixturevalue("s3_bucket")
        metadata = new_database()
        fs = (
            CloudFS(tmp_path / name, encryption=encryption, **metadata)
            if bucket is None
            else S3CloudFS(tmp_path / name, bucket, endpoint=endpoint, encryption=encryption,
                           **metadata)
        )  # fmt: skip
        made.append(fs)
        if mkfs:
            fs.mkfs()
        if mount:
            fs.mount()
        return fs

    try:
        yield make
    finally:
        notes = []
        for fs in reversed(made):
            notes.extend(fs.cleanup())
        for name in databases:  # after every mount and daemon using it stopped
            request.getfixturevalue("mariadb").drop_database(name)
        if subreaper:
            _set_subreaper(False)
            _reap_children()
        marker = request.node.get_closest_marker("log_errors_expected")
        allowed = [re.compile(p) for p in (marker.args if marker else ())]
        problems = [p for fs in made for p in fs.log_problems(allowed)]
        crashed = [
            f"{fs.root}: mount.cloudfs exited {c}"
            for fs in made
            for c in fs.mount_exits
            if c not in (0, None)
        ]
        if notes:
            print("\n".join(notes), file=sys.stderr)
        if problems or crashed:
            pytest.fail(
                "errors reached the logs or a mount process failed:\n"
                + "\n".join(crashed + problems),
                pytrace=False,
            )


@pytest.fixture
def fs(request: pytest.FixtureRequest, make_fs: Callable[..., CloudFS]) -> CloudFS:
    """A fresh encrypted filesystem, mounted, in the test's `store_kind`; or in the
    kind a test names with `@pytest.mark.parametrize("fs", ["local", "s3"], indirect=True)`."""
    kind = getattr(request, "param", None)
    assert kind in (None, *STORE_KINDS), kind
    return make_fs(store=kind)


@pytest.fixture(scope="session", autouse=True)
def _mkfs_templates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The session's made filesystems that `CloudFS.mkfs` copies."""
    CloudFS.template_root = tmp_path_factory.mktemp("mkfs-made")
    yield
    CloudFS.template_root = None


@pytest.fixture(scope="session", autouse=True)
def _no_mounts_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Safety net: at the end of the session nothing stays mounted under pytest's tmp
    dirs and no cloudfs process serves them."""
    base = tmp_path_factory.getbasetemp()
    yield
    for point in _fuse_mounts_under(base):
        if _fusermount(point).returncode != 0:
            _fusermount(point, lazy=True)
        print(f"safety net: unmounted {point}", file=sys.stderr)
    prefix = str(base) + "/"
    for pid in _pids():
        args = _cmdline(pid)
        is_cloudfs = any(
            a.endswith(("mount.cloudfs", "cloudfsd")) or a == "cloudfs.daemon.main" for a in args
        )
        if is_cloudfs and any(a.startswith(prefix) for a in args) and _running(pid):
            print(f"safety net: stopping {pid} {' '.join(args)}", file=sys.stderr)
            stop_process(pid, signal.SIGTERM, 10.0)
