"""cloudfs on S3 end to end (the private moto server, tests/s3util.py): 300 MiB written
through a mount whose store sits behind a faulty network (tests/faultproxy.py) all
arrive and read back identical; options reach the daemon and credentials reach no
command line, config file or log; and bad input (dead endpoint, wrong credentials,
missing bucket, a bucket without a filesystem) ends in one clear line, a non-zero exit
and an untouched bucket."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest
from faultproxy import FAULTS, FaultProxy, FaultRates
from s3util import FAKE_AWS_ENV, Bucket, MotoServer, free_port

if TYPE_CHECKING:  # the fixtures' types; conftest is not importable as a module
    from conftest import CloudFS

KiB = 1024
MiB = 1024 * KiB

# 16 symbols: text-like bytes that zstd shrinks to about half
_TEXT = bytes.maketrans(bytes(range(256)), b"etaoinshrdlu \n.," * 16)


def one_line_failure(result: subprocess.CompletedProcess[str], prog: str) -> str:
    """A non-zero exit with exactly one line on stderr, naming the program."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0, f"{prog} succeeded: {result.stderr!r}"
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{prog}: "), lines[0]
    return lines[0]


def mixed_files(seed: int, total: int) -> dict[str, bytes]:
    """Files of mixed sizes (many small, some medium, a few large), half of them
    text-like and half random, `total` bytes in all."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {}
    size_left = total
    i = 0
    while size_left > 0:
        kind = rng.random()
        if kind < 0.6:
            size = rng.randrange(1, 64 * KiB)
        elif kind < 0.97:
            size = rng.randrange(256 * KiB, 4 * MiB)
        else:
            size = rng.randrange(12 * MiB, 40 * MiB)
        size = min(size, size_left)
        data = rng.randbytes(size)
        if i % 2:
            data = data.translate(_TEXT)
        files[f"d{i % 7}/f{i:04d}"] = data
        size_left -= size
        i += 1
    return files


@pytest.fixture
def faulty_network(s3_bucket: Bucket) -> Iterator[FaultProxy]:
    """A proxy in front of moto that fails about one request in ten and delays one in
    twenty; faults start disabled (mkfs and mount go through quietly)."""
    upstream = urlsplit(s3_bucket.endpoint)
    assert upstream.hostname and upstream.port
    rates = FaultRates(
        internal_error=0.02,
        slow_down=0.03,
        cut_request=0.02,
        cut_response=0.03,
        delay=0.05,
        max_delay_s=0.25,
    )
    with FaultProxy(upstream.hostname, upstream.port, rates, seed=4) as proxy:
        proxy.enabled = False
        yield proxy


# the daemon logs each retry as a warning; the test fails on ERROR lines only
def test_300_mib_through_a_faulty_network(
    s3_bucket: Bucket, faulty_network: FaultProxy, make_fs: Callable[..., CloudFS]
) -> None:
    proxy = faulty_network
    fs = make_fs(bucket=s3_bucket, endpoint=proxy.endpoint, mkfs=False, mount=False)
    # 512 KiB blocks (2 MiB by default): ~600 objects to read back, so each kind of
    # fault (2-3% of requests) surely comes again while reading (0.98^150 is 5%)
    fs.mkfs("--chunk-size", "512K")
    fs.mount()
    files = mixed_files(seed=300, total=300 * MiB)
    assert len(files) > 100

    proxy.enabled = True
    for name, data in files.items():
        path = fs.mnt / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
    fs.flush(timeout=600)
    stats = fs.stat_json()
    assert stats["pending_uploads"] == 0, stats
    assert stats["files"] == len(files) and stats["logical_bytes"] == 300 * MiB, stats
    # every block the metadata names is in the bucket, and nothing else is
    assert stats["blocks"] == len(fs.block_objects()), stats
    uploaded = dict(proxy.counts)

    proxy.enabled = False
    fs.unmount()
    assert fs.drop_cached_blocks() == stats["blocks"]
    fs.mount()
    proxy.enabled = True
    for name, data in files.items():
        got = (fs.mnt / name).read_bytes()
        assert len(got) == len(data) and got == data, f"{name} differs after the cache loss"
    assert len(fs.cached_blocks()) == stats["blocks"]

    # the network was bad while writing and while reading back
    for fault in (*FAULTS, "delay"):
        assert uploaded.get(fault, 0) >= 3, uploaded
        assert proxy.counts[fault] > uploaded[fault], proxy.counts


def test_options_reach_the_daemon_and_credentials_stay_out(
    s3_bucket: Bucket, make_fs: Callable[..., CloudFS]
) -> None:
    fs = make_fs(bucket=s3_bucket, mount=False)
    config = json.loads((fs.cache / "config.json").read_text())
    assert config["storage"] == fs.storage_url + "/"
    assert config["options"] == {"endpoint_url": s3_bucket.endpoint}

    # mount(8) style: the endpoint as -o s3_endpoint=..., the other options too
    fs.storage_args = []
    fs.mount("-o", f"s3_endpoint={s3_bucket.endpoint},s3_region=us-east-1,s3_path_style")
    data = os.urandom(6 * MiB)
    (fs.mnt / "f").write_bytes(data)
    fs.flush()
    assert len(fs.block_objects()) >= 2
    config = json.loads((fs.cache / "config.json").read_text())
    assert config["options"] == {
        "endpoint_url": s3_bucket.endpoint,
        "region": "us-east-1",
        "path_style": True,
    }

    secret = FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"].encode()
    daemon = fs.daemon_pid()
    assert daemon is not None and fs.mount_pid is not None
    for pid in (fs.mount_pid, daemon):
        assert secret not in Path(f"/proc/{pid}/cmdline").read_bytes()
    fs.unmount()
    fs.kill_daemon()

    # a remount needs no endpoint: the cache dir remembers it
    fs.mount()
    assert (fs.mnt / "f").read_bytes() == data
    fs.unmount()
    readable = [
        *(p for p in fs.cache.rglob("*") if p.is_file() and p.suffix in (".json", ".log")),
    ]
    assert any(p.name == "daemon.log" for p in readable)
    for path in readable:
        assert secret not in path.read_bytes(), f"the AWS secret key is in {path}"
    for key, stored in fs.store_contents().items():
        assert secret not in stored, f"the AWS secret key is in object {key}"


# --- bad input ---------------------------------------------------------------------------


def test_unreachable_endpoint(s3_bucket: Bucket, make_fs: Callable[..., CloudFS]) -> None:
    fs = make_fs(bucket=s3_bucket, mkfs=False, mount=False)
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    r = fs.run("mkfs.cloudfs", fs.storage_url, "--cachedir", fs.cache, "--s3-endpoint", dead)
    line = one_line_failure(r, "mkfs.cloudfs")
    assert line == f"mkfs.cloudfs: cannot reach the object store: {dead} (Connection refused)"
    assert time.monotonic() - started < 15
    assert not fs.cache.exists()
    assert s3_bucket.objects() == {}

    fs.mkfs()
    before = s3_bucket.objects()
    started = time.monotonic()
    r = fs.run("mount.cloudfs", fs.storage_url, fs.mnt, "--cachedir", fs.cache,
               "--s3-endpoint", dead)  # fmt: skip
    line = one_line_failure(r, "mount.cloudfs")
    assert "cannot reach the object store" in line and dead in line
    assert time.monotonic() - started < 15
    assert not fs.mounted and fs.daemon_pid() is None
    assert s3_bucket.objects() == before


def test_wrong_credentials(
    s3_bucket: Bucket, moto_server: MotoServer, make_fs: Callable[..., CloudFS]
) -> None:
    made = make_fs("made", bucket=s3_bucket, mount=False)
    fs = make_fs("new", bucket=s3_bucket, mkfs=False, mount=False)
    before = s3_bucket.objects()
    assert before

    moto_server.set_auth(True)
    try:
        r = fs.run("mkfs.cloudfs", fs.storage_url, "--cachedir", fs.cache, *fs.storage_args)
        mkfs_line = one_line_failure(r, "mkfs.cloudfs")
        r = made.run("mount.cloudfs", made.storage_url, made.mnt, "--cachedir", made.cache,
                     *made.storage_args)  # fmt: skip
        mount_line = one_line_failure(r, "mount.cloudfs")
    finally:
        moto_server.set_auth(False)
    for line in (mkfs_line, mount_line):
        assert "access denied by the object store (check the credentials)" in line, line
        assert FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"] not in line
    # mkfs starts with a HEAD, whose answer has no body to name the error
    assert mkfs_line.endswith(": HTTP 403"), mkfs_line
    assert mount_line.endswith(": InvalidAccessKeyId"), mount_line
    assert not fs.cache.exists()
    assert not made.mounted and made.daemon_pid() is None
    assert s3_bucket.objects() == before

    # no credentials anywhere (environment, files, instance role)
    bare = {k: v for k, v in fs.env.items() if not k.startswith("AWS_ACCESS_KEY_ID")}
    bare = {k: v for k, v in bare.items() if not k.startswith("AWS_SECRET_ACCESS_KEY")}
    r = fs.run("mkfs.cloudfs", fs.storage_url, "--cachedir", fs.cache, *fs.storage_args, env=bare)
    line = one_line_failure(r, "mkfs.cloudfs")
    assert "no AWS credentials found" in line, line
    assert not fs.cache.exists()
    assert s3_bucket.objects() == before


def test_missing_bucket(s3_bucket: Bucket, make_fs: Callable[..., CloudFS]) -> None:
    fs = make_fs(bucket=s3_bucket, mkfs=False, mount=False)
    url = "s3://no-such-bucket-here/fs"
    r = fs.run("mkfs.cloudfs", url, "--cachedir", fs.cache, *fs.storage_args)
    line = one_line_failure(r, "mkfs.cloudfs")
    assert line == (
        f"mkfs.cloudfs: the bucket does not exist: s3://no-such-bucket-here at {s3_bucket.endpoint}"
    )
    assert not fs.cache.exists()
    r = fs.run("mount.cloudfs", url, fs.mnt, "--cachedir", fs.cache, *fs.storage_args)
    line = one_line_failure(r, "mount.cloudfs")
    assert "the bucket does not exist: s3://no-such-bucket-here" in line
    assert not fs.mounted
    names = [b["Name"] for b in s3_bucket.client.list_buckets()["Buckets"]]
    assert names == [s3_bucket.name]


def test_bucket_without_a_filesystem(s3_bucket: Bucket, make_fs: Callable[..., CloudFS]) -> None:
    fs = make_fs(bucket=s3_bucket, mkfs=False, mount=False)
    s3_bucket.write("unrelated/object", b"not a cloudfs object")
    before = s3_bucket.objects()
    for url in (s3_bucket.url, fs.storage_url):
        r = fs.run("mount.cloudfs", url, fs.mnt, "--cachedir", fs.cache, *fs.storage_args)
        line = one_line_failure(r, "mount.cloudfs")
        assert line.startswith("mount.cloudfs: no cloudfs filesystem in this storage: s3://")
        assert not fs.mounted and fs.daemon_pid() is None
    assert s3_bucket.objects() == before
    assert (
        hashlib.sha256(s3_bucket.read("unrelated/object")).digest()
        == hashlib.sha256(b"not a cloudfs object").digest()
    )
