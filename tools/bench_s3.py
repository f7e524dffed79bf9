"""Figures of cloudfs on S3, each beside what boto3 alone gets from the same server in
the same run: a measurement script, not a test.

    .venv/bin/python tools/bench_s3.py [--size 1G] [--objects 64] [--json]
    .venv/bin/python tools/bench_s3.py --endpoint http://127.0.0.1:9000 --bucket b ...

Without --endpoint it starts a private moto server on a loopback port (moto[server],
from the test extras) with fake credentials and stops it at the end; with one, it uses
that S3-compatible server and the AWS credentials of the environment, and an existing
empty bucket. It measures:

1. boto3 alone: PUT then GET of `--objects` objects of 4 MiB (cloudfs's largest
   block) and of as many bytes in 1 MiB objects (its average block), with one
   thread and with 8 (the daemon's default uploads in flight);
2. cloudfs on a fresh filesystem in the bucket (encrypted, default chunking), through
   a real mount: `cloudfs bench MNT --big-size SIZE` (incompressible and text-like
   writes until `cloudfs flush` semantics say stored, cold reads after drop-cache);
3. time to first byte of a cold file of SIZE: written, flushed, unmounted, the
   daemon stopped and every cached block copy deleted, mounted again; then open +
   the first read(128 KiB), and the rest read sequentially with 1 MiB reads.

MiB/s throughout (the `cloudfs bench` MB/s figures are converted).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

MiB = 1 << 20
MB = 1_000_000
BIN = Path(sys.executable).parent
#: the first read of the time-to-first-byte measurement (the kernel's usual read size)
FIRST_READ = 128 * 1024


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


# --- a private moto server ---------------------------------------------------------------


class Moto:
    def __init__(self, workdir: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        tmp = workdir / "moto-tmp"
        tmp.mkdir()
        env = {**os.environ, "TMPDIR": str(tmp), "MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(MiB)}
        self.log = open(workdir / "moto.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=2).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto did not start (see {workdir / 'moto.log'})")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


# --- 1. boto3 alone ----------------------------------------------------------------------


def raw_boto3(endpoint: str, bucket: str, count: int) -> dict[str, float]:
    """PUT and GET MiB/s of `count` 4 MiB objects (cloudfs's largest block), and of as
    many bytes in 1 MiB objects (its average block), with 1 thread and with 8."""
    client = boto3.session.Session().client(
        "s3", endpoint_url=endpoint, config=Config(max_pool_connections=16)
    )
    figures: dict[str, float] = {}
    for object_mib in (4, 1):
        n = count * 4 // object_mib
        bodies = [os.urandom(object_mib * MiB) for _ in range(8)]
        for threads in (1, 8):
            keys = [f"raw-{object_mib}m-{threads}/{i:05d}" for i in range(n)]

            def put(i: int, keys: list[str] = keys, bodies: list[bytes] = bodies) -> None:
                client.put_object(Bucket=bucket, Key=keys[i], Body=bodies[i % len(bodies)])

            def get(i: int, keys: list[str] = keys, size: int = object_mib * MiB) -> None:
                body = client.get_object(Bucket=bucket, Key=keys[i])["Body"].read()
                assert len(body) == size

            label = f"{object_mib}m_{threads}t"
            with ThreadPoolExecutor(threads) as pool:
                t0 = time.perf_counter()
                list(pool.map(put, range(n)))
                figures[f"boto3_put_mib_s_{label}"] = n * object_mib / (time.perf_counter() - t0)
                t0 = time.perf_counter()
                list(pool.map(get, range(n)))
                figures[f"boto3_get_mib_s_{label}"] = n * object_mib / (time.perf_counter() - t0)
            for i in range(0, n, 1000):
                client.delete_objects(
                    Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]]}
                )
    return figures


# --- 2 and 3. cloudfs --------------------------------------------------------------------


class Mounted:
    """mkfs + mount of a fresh filesystem at s3://bucket/<prefix> (unmounted and its
    daemon stopped by close(), whatever happened)."""

    def __init__(self, workdir: Path, endpoint: str, bucket: str) -> None:
        self.cache = workdir / "cache"
        self.mnt = workdir / "mnt"
        self.mnt.mkdir()
        self.url = f"s3://{bucket}/bench-{secrets.token_hex(4)}"
        self.storage = ["--s3-endpoint", endpoint]
        self.env = {**os.environ, "CLOUDFS_PASSPHRASE": secrets.token_hex(16)}
        self.run("mkfs.cloudfs", self.url, "--cachedir", str(self.cache), *self.storage)
        self.mount()

    def run(self, prog: str, *args: str) -> str:
        r = subprocess.run(
            [str(BIN / prog), *args], env=self.env, capture_output=True, text=True, check=False
        )
        if r.returncode:
            raise RuntimeError(f"{prog} {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
        return r.stdout

    def mount(self) -> None:
        self.run("mount.cloudfs", self.url, str(self.mnt), "--cachedir", str(self.cache),
                 *self.storage)  # fmt: skip

    def unmount(self) -> None:
        subprocess.run(["fusermount3", "-u", str(self.mnt)], check=True)
        deadline = time.monotonic() + 120
        while self._mount_pid() is not None:  # it seals what was open, then exits
            if time.monotonic() > deadline:
                raise RuntimeError("mount.cloudfs did not exit after the unmount")
            time.sleep(0.05)

    def _mount_pid(self) -> int | None:
        try:
            pid = int((self.cache / "mount.lock").read_text().split()[0])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            return None
        return pid if Path(f"/proc/{pid}").exists() and _alive(pid) else None

    def stop_daemon(self) -> None:
        try:
            pid = int((self.cache / "daemon.pid").read_text())
        except (OSError, ValueError):
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 30
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def drop_block_copies(self) -> int:
        removed = 0
        for path in (self.cache / "blocks").glob("*/*"):
            path.unlink()
            removed += 1
        return removed

    def close(self) -> None:
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-u", str(self.mnt)], check=False)
            if os.path.ismount(self.mnt):
                subprocess.run(["fusermount3", "-uz", str(self.mnt)], check=False)
        deadline = time.monotonic() + 60
        while self._mount_pid() is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        self.stop_daemon()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def cloudfs_bench(fs: Mounted, size: int) -> dict[str, float]:
    out = fs.run("cloudfs", "bench", str(fs.mnt), "--json", "--big-size", str(size),
                 "--edit-size", str(min(size, 64 * MiB)), "--small-count", "500")  # fmt: skip
    report: dict[str, Any] = json.loads(out)
    figures = report.get("figures", report)
    values = {k: (v.get("value") if isinstance(v, dict) else v) for k, v in figures.items()}
    mib = {
        "upload_random_mib_s": values.get("stored_mb_s"),
        "write_random_mib_s": values.get("write_mb_s"),
        "upload_text_mib_s": values.get("text_stored_mb_s"),
        "write_text_mib_s": values.get("text_write_mb_s"),
        "cold_read_bench_mib_s": values.get("cold_read_mb_s"),
        "warm_read_mib_s": values.get("warm_read_mb_s"),
    }
    result = {k: v * MB / MiB for k, v in mib.items() if isinstance(v, (int, float))}
    if isinstance(values.get("text_stored_ratio"), (int, float)):
        result["text_stored_ratio"] = values["text_stored_ratio"]
    return result


def cold_first_byte(fs: Mounted, size: int) -> dict[str, float]:
    path = fs.mnt / "cold"
    # random throughout: no block of it dedups with another, so all of it is fetched
    pieces = (os.urandom(min(16 * MiB, size - i)) for i in range(0, size, 16 * MiB))
    with open(path, "wb") as f:
        f.writelines(pieces)
    fs.run("cloudfs", "flush", str(fs.mnt))
    fs.unmount()
    fs.stop_daemon()
    dropped = fs.drop_block_copies()
    fs.mount()  # starts the daemon: nothing is cached, every block comes from S3
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        first = os.read(fd, FIRST_READ)
        ttfb = time.perf_counter() - t0
        total = len(first)
        t1 = time.perf_counter()
        while True:
            data = os.read(fd, MiB)
            if not data:
                break
            total += len(data)
        spent = time.perf_counter() - t1
    finally:
        os.close(fd)
    if total != size:
        raise RuntimeError(f"read {total} bytes of {size}")
    return {
        "cold_ttfb_ms": ttfb * 1000,
        "cold_seq_read_mib_s": (size - len(first)) / MiB / spent,
        "cache_copies_dropped": dropped,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=_size, default=1 << 30, help="big file size (1G)")
    p.add_argument("--objects", type=int, default=64, help="4 MiB objects for boto3 alone (64)")
    p.add_argument("--endpoint", help="an S3-compatible server (default: a private moto)")
    p.add_argument("--bucket", help="an empty bucket there (with --endpoint)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if bool(args.endpoint) != bool(args.bucket):
        p.error("--endpoint and --bucket go together")

    workdir = Path(tempfile.mkdtemp(prefix="cloudfs-bench-s3-"))
    moto: Moto | None = None
    fs: Mounted | None = None
    figures: dict[str, Any] = {}
    try:
        if args.endpoint:
            endpoint, bucket = args.endpoint, args.bucket
        else:
            os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                              AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
            moto = Moto(workdir)
            endpoint, bucket = moto.endpoint, "cloudfs-bench"
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        figures["server"] = "moto (loopback)" if moto else endpoint
        figures["size_mib"] = args.size / MiB
        figures.update(raw_boto3(endpoint, bucket, args.objects))
        fs = Mounted(workdir, endpoint, bucket)
        figures.update(cloudfs_bench(fs, args.size))
        figures.update(cold_first_byte(fs, args.size))
    finally:
        if fs is not None:
            fs.close()
        if moto is not None:
            moto.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        for key, value in figures.items():
            shown = f"{value:10.1f}" if isinstance(value, float) else f"{value!s:>10}"
            print(f"{key:28} {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
