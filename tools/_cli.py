"""What every cloudfs command line shares: errors become one line and an exit code."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from cloudfs.cache import CacheConfig
from cloudfs.errors import CloudfsError, UsageError
from cloudfs.meta import open_meta
from cloudfs.meta.base import MetaStore
from cloudfs.meta.url import MYSQL_PASSWORD_ENV, read_mysql_password, redact, url_password
from cloudfs.objectstore import ObjectStore, open_store
from cloudfs.objectstore.retry import RetryStore

log = logging.getLogger("cloudfs")


def run_cli(prog: str, body: Callable[[], int | None]) -> int:
    """Run a command's body; a cloudfs error prints `prog: message` and exits with its
    code, an interrupt exits 130. Nothing else is caught: a bug shows its traceback."""
    try:
        return body() or 0
    except CloudfsError as exc:
        print(f"{prog}: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1


def parse_args(
    parser: argparse.ArgumentParser, argv: list[str] | None, prog: str
) -> argparse.Namespace | None:
    """Parse a command line (sys.argv when `argv` is None); None after --help, and a
    UsageError (exit code 2) for a bad one, after argparse has said what is wrong."""
    try:
        return parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        if exc.code:
            raise UsageError(f"see {prog} --help") from None
        return None


def setup_logging(debug: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


# --- sizes ------------------------------------------------------------------------------

_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str, what: str = "size") -> int:
    """Bytes from "10G", "256M", "1.5T", "512MiB", "4096" (binary units; a trailing
    "B", "iB" is allowed); UsageError for anything else."""
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    unit = t[-1:] if t[-1:] in _SIZE_UNITS and t[-1:] else ""
    number = t[: len(t) - len(unit)]
    try:
        value = float(number)
    except ValueError:
        raise UsageError(f"{what} {text!r} is not a size (like 512M, 10G, 1T)") from None
    if not 0 < value < float("inf"):
        raise UsageError(f"{what} {text!r} must be more than 0")
    return int(value * _SIZE_UNITS[unit])


# --- storage options ----------------------------------------------------------------------


def add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    """--s3-endpoint, --s3-region, --s3-path-style (credentials never: they come from
    the AWS environment variables, ~/.aws/credentials, AWS_PROFILE or an instance role)."""
    group = parser.add_argument_group(
        "S3 storage (s3://bucket[/prefix]; credentials come from the AWS environment "
        "variables, ~/.aws/credentials, AWS_PROFILE or an instance role)"
    )
    group.add_argument("--s3-endpoint", metavar="URL",
                       help="S3-compatible endpoint (MinIO, Ceph, R2, ...); default: "
                       "$AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, else AWS")  # fmt: skip
    group.add_argument("--s3-region", metavar="REGION", help="region of the bucket")
    group.add_argument("--s3-path-style", action="store_true",
                       help="path-style requests (endpoint/bucket/key), as most "
                       "self-hosted servers want")  # fmt: skip


def storage_options(
    *, endpoint: str | None = None, region: str | None = None, path_style: bool = False
) -> dict[str, Any]:
    """The `open_store` options the storage arguments give (only those set, so a local
    store, which takes none, still opens when they are absent)."""
    options: dict[str, Any] = {}
    if endpoint:
        options["endpoint_url"] = endpoint
    if region:
        options["region"] = region
    if path_style:
        options["path_style"] = True
    return options


def storage_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return storage_options(
        endpoint=args.s3_endpoint, region=args.s3_region, path_style=args.s3_path_style
    )


def open_cli_store(url: str, options: dict[str, Any]) -> ObjectStore:
    """The store a command line works on: a few quick, quiet retries of temporary
    failures (a dead endpoint still fails within seconds, with one line)."""
    if options and not url.startswith("s3://"):
        raise UsageError("the --s3-* options are for s3:// storage only")
    return RetryStore(
        open_store(url, **options), attempts=3, base_delay=0.2, max_delay=1.0,
        log_level=logging.DEBUG,
    )  # fmt: skip


# --- metadata database ----------------------------------------------------------------------


def add_metadata_arguments(parser: argparse.ArgumentParser) -> None:
    """--metadata URL and --mysql-password-file F."""
    parser.add_argument("--metadata", metavar="URL",
                        help="metadata database: mysql://user@host[:port]/db or "
                        "mysql://user@localhost/db?unix_socket=PATH (default: SQLite in the "
                        "cache dir)")  # fmt: skip
    parser.add_argument("--mysql-password-file", metavar="F",
                        help=f"MySQL password file (else ${MYSQL_PASSWORD_ENV})")  # fmt: skip


def metadata_password(url: str, password_file: str | None) -> str | None:
    """The MySQL password of `url`: written in it, else from `password_file`, else from
    the environment (None for SQLite or a passwordless account)."""
    in_url = url_password(url)
    if in_url is not None:
        if password_file:
            raise UsageError("the MySQL password is given twice: in the URL and in a file")
        return in_url
    return read_mysql_password(password_file) if url.startswith("mysql://") else None


def open_config_meta(config: CacheConfig) -> MetaStore:
    """The metadata database a cache dir's config.json names, with its password."""
    return open_meta(
        config.metadata, password=metadata_password(config.metadata, config.metadata_password_file)
    )


def hide_url_password(
    module: str, argv: list[str], url: str | None, redis_url: str | None = None
) -> None:
    """When `url` (a MySQL URL on this process's command line) or `redis_url` holds a
    password, run the command again with the URLs shown without it: `ps` shows command
    lines to every user. The passwords move to $CLOUDFS_MYSQL_PASSWORD and
    $CLOUDFS_REDIS_PASSWORD, which only the user and root can read. The same console
    script runs again (so `ps` still names it), else `python -m module`. Returns only
    when there is nothing to hide."""
    from cloudfs.notify import REDIS_PASSWORD_ENV, redact_redis, redis_url_password

    hidden: list[tuple[str, str]] = []  # (url, shown)
    env = dict(os.environ)
    password = url_password(url) if url is not None else None
    if url is not None and password is not None:
        hidden.append((url, redact(url)))
        env[MYSQL_PASSWORD_ENV] = password
    redis_password = redis_url_password(redis_url) if redis_url is not None else None
    if redis_url is not None and redis_password is not None:
        hidden.append((redis_url, redact_redis(redis_url)))
        env[REDIS_PASSWORD_ENV] = redis_password
    if not hidden:
        return
    # a console script (mount.cloudfs) runs again as itself; a module's own file must
    # not (its folder would come first on sys.path: tools/cloudfs.py would be `cloudfs`)
    script = sys.argv[0]
    how = [script] if os.path.isfile(script) and not script.endswith(".py") else ["-m", module]
    args = list(argv)
    for secret, shown in hidden:
        args = [a.replace(secret, shown) for a in args]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *how, *args], env)
