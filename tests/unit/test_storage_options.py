"""Storage options on the command lines: mount.cloudfs (--s3-* and -o s3_*), cloudfsd and
the cache dir's config.json carry the S3 endpoint, region and addressing style, and
nothing else; an old config.json without options still loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cloudfs.daemon.main import parse_args as cloudfsd_args
from cloudfs.mount.options import parse as mount_args
from cloudfs.tools._cli import open_cli_store

from cloudfs.cache import CacheConfig, CacheDir
from cloudfs.errors import UsageError

ENDPOINT = "http://127.0.0.1:9000"


def test_mount_options() -> None:
    opts = mount_args(["s3://b1/fs", "/mnt", "--s3-endpoint", ENDPOINT, "--s3-region", "eu-1"])
    assert opts.storage_options == {"endpoint_url": ENDPOINT, "region": "eu-1"}
    opts = mount_args(["s3://b1/fs", "/mnt", "-o", f"s3_endpoint={ENDPOINT},s3_path_style,ro"])
    assert opts.storage_options == {"endpoint_url": ENDPOINT, "path_style": True}
    assert "ro" in opts.fuse_options
    assert mount_args(["/store", "/mnt"]).storage_options == {}


def test_cloudfsd_options() -> None:
    opts = cloudfsd_args(["--cachedir", "/c", "--s3-endpoint", ENDPOINT, "--s3-path-style"])
    assert opts.storage_options == {"endpoint_url": ENDPOINT, "path_style": True}
    assert cloudfsd_args(["--cachedir", "/c"]).storage_options == {}


def test_s3_options_only_for_s3_storage() -> None:
    with pytest.raises(UsageError, match="s3://"):
        open_cli_store("/some/dir", {"endpoint_url": ENDPOINT})


def test_config_options_round_trip(tmp_path: Path) -> None:
    cache = CacheDir(tmp_path / "cache")
    config = CacheConfig("s3://b1/fs/", "meta.db", "u-1", options={"endpoint_url": ENDPOINT})
    cache.write_config(config)
    assert cache.read_config() == config

    # written by a cloudfs before storage options existed
    cache.config_path.write_text(json.dumps({"storage": "/s", "metadata": "m", "uuid": "u"}))
    assert cache.read_config().options == {}


def test_attr_timeout_option() -> None:
    assert mount_args(["/s", "/m"]).attr_timeout is None  # the engine decides
    assert mount_args(["/s", "/m", "-o", "attr_timeout=0.5"]).attr_timeout == 0.5
    assert mount_args(["/s", "/m", "-o", "attr_timeout=0"]).attr_timeout == 0
    for bad in ("attr_timeout=soon", "attr_timeout=-1", "attr_timeout=inf", "attr_timeout=nan"):
        with pytest.raises(UsageError, match="attr_timeout"):
            mount_args(["/s", "/m", "-o", bad])
