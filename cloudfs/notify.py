"""Change notifications between the mounts of shared mode, over Redis pub/sub.

After each commit a mount publishes the inodes and directory entries it changed on the
filesystem's channel; every other mount hears it and drops those from its kernel's
caches (pyfuse3.invalidate_inode / invalidate_entry), so `ls` and `cat` on one
machine reflect another's change at once instead of after the attribute timeout.

Notifications are a speed-up, never needed for correctness: metadata is read from
the database, and without Redis the kernel caches expire after the (short, shared
mode) attribute timeout. So Redis must never block or fail a file operation: a
change is put in a bounded queue (dropped when it is full) and published by a thread
whose socket calls time out quickly; while Redis is unreachable, changes are dropped
and the connection is tried again with growing pauses.

    redis://[[user]:password@]host[:port][/db]

The password is better given in a file (`--redis-password-file`) or the environment
(CLOUDFS_REDIS_PASSWORD) than in the URL, which `ps` shows; whatever is displayed,
logged or kept in config.json uses `redact_redis`.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from cloudfs.errors import CloudfsError, UsageError
from cloudfs.meta.url import password_of, read_password, without_password

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

REDIS_PASSWORD_ENV = "CLOUDFS_REDIS_PASSWORD"
REDIS_DEFAULT_PORT = 6379
#: socket timeouts of every Redis call: an outage costs a publisher this much at most
SOCKET_TIMEOUT_S = 1.0
#: changes waiting for the publisher; more are dropped
QUEUE_LIMIT = 10_000
#: longest pause between two attempts to reach Redis again
MAX_BACKOFF_S = 5.0


class RedisUnavailable(CloudfsError):
    """cannot use the Redis server"""

    exit_code = 12


@dataclass(frozen=True)
class RedisTarget:
    host: str
    port: int
    db: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def display(self) -> str:
        user = f"{self.username}@" if self.username else ""
        return f"redis://{user}{self.host}:{self.port}/{self.db}"

    def client(self) -> redis.Redis:
        # imported here: redis-py takes about 0.3 s to import, and only shared mounts
        # with --redis need it (every mount imports this module)
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        return redis.Redis(
            host=self.host, port=self.port, db=self.db, username=self.username,
            password=self.password, socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=SOCKET_TIMEOUT_S, health_check_interval=5,
            # no retries inside redis-py: the threads here pause and try again themselves
            retry=Retry(NoBackoff(), 0),
        )  # fmt: skip


def is_redis(url: str) -> bool:
    return url.startswith(("redis://", "unix://"))


def redact_redis(url: str) -> str:
    """`url` without its password."""
    return without_password(url)


def redis_url_password(url: str) -> str | None:
    return password_of(url)


def read_redis_password(password_file: str | None) -> str | None:
    """From `password_file` (first line), else $CLOUDFS_REDIS_PASSWORD, else None."""
    return read_password(password_file, REDIS_PASSWORD_ENV, "Redis")


def parse_redis_url(url: str, password: str | None = None) -> RedisTarget:
    """UsageError (without the password) for anything but redis://host[:port][/db]."""
    shown = redact_redis(url)
    parts = urlsplit(url)
    if parts.scheme != "redis" or not parts.hostname:
        raise UsageError(f"Redis URL {shown}: use redis://[:password@]host[:port][/db]")
    try:
        port = parts.port or REDIS_DEFAULT_PORT
    except ValueError:
        raise UsageError(f"invalid port in Redis URL {shown}") from None
    path = parts.path.strip("/") or "0"
    if not path.isdigit():
        raise UsageError(f"Redis URL {shown}: the database is a number (redis://host/0)")
    in_url = redis_url_password(url)
    if in_url is not None and password is not None:
        raise UsageError("the Redis password is given twice: in the URL and in a file")
    return RedisTarget(
        host=parts.hostname, port=port, db=int(path), username=unquote(parts.username or "") or None,
        password=in_url if in_url is not None else password,
    )  # fmt: skip


def check_redis(target: RedisTarget) -> None:
    """Log in and ping once (blocking); RedisUnavailable with the reason otherwise."""
    import redis

    client = target.client()
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        raise RedisUnavailable(f"{target.display()}: {exc} (check the password)") from None
    except redis.ResponseError as exc:  # NOAUTH, WRONGPASS, a bad db number
        raise RedisUnavailable(f"{target.display()}: {exc}") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise RedisUnavailable(f"{target.display()}: {exc}") from None
    finally:
        client.close()


def channel_of(fs_uuid: str) -> str:
    return f"cloudfs:{fs_uuid}:changes"


#: invalidate_inode(ino), invalidate_entry(parent, name): called on the subscriber thread
InvalidateInode = Callable[[int], None]
InvalidateEntry = Callable[[int, bytes], None]


class Notifier:
    """Publishes this mount's changes and applies the others' (two daemon threads)."""

    def __init__(
        self,
        target: RedisTarget,
        channel: str,
        client_id: int,
        invalidate_inode: InvalidateInode,
        invalidate_entry: InvalidateEntry,
    ) -> None:
        self.target = target
        self.channel = channel
        self.client_id = client_id
        self._invalidate_inode = invalidate_inode
        self._invalidate_entry = invalidate_entry
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=QUEUE_LIMIT)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.dropped = 0  # changes not published (queue full, Redis unreachable)
        self.published = 0
        self.applied = 0  # changes of other mounts applied here

    # --- publishing (any thread) ------------------------------------------------------------

    def changed(
        self, inodes: Sequence[int] = (), entries: Sequence[tuple[int, bytes]] = ()
    ) -> None:
        """Announce changed inodes and (parent, name) entries; never blocks."""
        message = json.dumps(
            {"c": self.client_id, "i": list(inodes), "e": [[p, n.hex()] for p, n in entries]}
        ).encode()
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            self.dropped += 1

    # --- threads ---------------------------------------------------------------------------

    def start(self) -> None:
        for target in (self._publish_loop, self._subscribe_loop):
            t = threading.Thread(target=target, name=f"cloudfs-{target.__name__}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _publish_loop(self) -> None:
        client: redis.Redis | None = None
        failures = 0
        retry_at = 0.0
        while not self._stop.is_set():
            message = self._queue.get()
            if message is None:
                break
            if time.monotonic() < retry_at:
                self.dropped += 1  # Redis is down: the others converge by timeouts
                continue
            try:
                if client is None:
                    client = self.target.client()
                client.publish(self.channel, message)
                self.published += 1
                if failures:
                    log.info("Redis %s reachable again: change notifications resume",
                             self.target.display())  # fmt: skip
                failures = 0
            except Exception as exc:  # noqa: BLE001 - whatever failed, the thread lives on
                self.dropped += 1
                if not failures:
                    log.warning("cannot publish changes to Redis %s (%s): other mounts see "
                                "them after the attribute timeout", self.target.display(), exc)  # fmt: skip
                failures += 1
                retry_at = time.monotonic() + min(MAX_BACKOFF_S, 0.1 * 2**failures)
                if client is not None:
                    client.close()
                client = None
        if client is not None:
            client.close()

    def _subscribe_loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            client = self.target.client()
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.channel)
                if failures:
                    log.info("subscribed to Redis %s again", self.target.display())
                failures = 0
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=0.5)
                    if msg is not None and msg.get("type") == "message":
                        self._apply(msg["data"])
            except Exception as exc:  # noqa: BLE001 - as above
                if not failures:
                    log.warning("lost the Redis subscription %s (%s); trying again",
                                self.target.display(), exc)  # fmt: skip
                failures += 1
                self._stop.wait(min(MAX_BACKOFF_S, 0.1 * 2**failures))
            finally:
                try:
                    pubsub.close()
                    client.close()
                except Exception:  # noqa: BLE001 - closing a broken connection
                    pass

    def _apply(self, data: bytes) -> None:
        try:
            change = json.loads(data)
            if change.get("c") == self.client_id:
                return  # our own
            inodes = [int(i) for i in change.get("i", [])]
            entries = [(int(p), bytes.fromhex(n)) for p, n in change.get("e", [])]
        except (ValueError, TypeError, AttributeError):
            log.warning("ignored a malformed change notification")
            return
        for parent, name in entries:
            self._invalidate_entry(parent, name)
        for ino in inodes:
            self._invalidate_inode(ino)
        self.applied += 1
