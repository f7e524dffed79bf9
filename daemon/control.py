"""The daemon's control socket: the newline-delimited JSON protocol, its server (in
cloudfsd) and its client (`DaemonClient`, used by the mount and the tools), and
`ensure_daemon`, which starts a daemon for a cache dir unless one answers.

One JSON object per line each way. A request may carry "id"; its reply echoes it, and
the server handles the requests of one connection concurrently, so replies can come
back in any order::

    {"op":"hello","role":"mount","pid":N}  a mount's connection: the daemon does not
                                           exit while one is open
    {"op":"kick"}                          new pending blocks exist: upload now
    {"op":"fetch","blocks":[hex,...],"prefetch":[hex,...]}
                                           reply once every block is in cache/blocks;
                                           "prefetch" (optional) blocks are fetched
                                           too, not waited for, failures ignored
    {"op":"flush"} / {"op":"flush","blocks":[hex,...]}
                                           reply once no (listed) block is pending
    {"op":"store","blocks":[hex,...],"sizes":[n,...]}
                                           read, check, seal and PUT these cached
                                           blocks now (they need no row): reply
                                           "stored_sizes":[n,...] once all are in the
                                           store, else the first error
    {"op":"finish_collection"}             finish what an interrupted garbage
                                           collection pass left claimed, unless a
                                           pass runs: "collected": its report
    {"op":"status"}                        pending, pending_bytes, uploading, uploaded,
                                           errors, ...
    {"op":"drop_cache"}                    delete the cache copies of stored blocks
                                           (never pending ones): dropped, dropped_bytes
    {"op":"backup"}                        back the metadata up now: key (None when
                                           the metadata is not SQLite or it failed)
    {"op":"shutdown"}                      exit cleanly (after the reply)

A reply is {"ok": true, ...} or {"ok": false, "error": message, "kind": error class
name from cloudfs.errors, "detail": ...}; the client raises that class again.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, Self

import trio

from cloudfs import errors
from cloudfs.cache import CacheDir
from cloudfs.errors import CloudfsError, DaemonError

log = logging.getLogger(__name__)

#: a line longer than this is a protocol error (a fetch of 10,000 blocks is ~700 KB)
MAX_LINE = 8 * 1024 * 1024
#: how long a client waits for the daemon to take a request line; the daemon reads
#: continuously, so only a hung daemon makes this expire
SEND_TIMEOUT_S = 30.0
#: how long connect() waits for the hello reply
HELLO_TIMEOUT_S = 10.0
#: how long ensure_daemon waits for a new daemon to answer
START_TIMEOUT_S = 60.0

_Json = dict[str, Any]


# --- framing --------------------------------------------------------------------------


class _LineReader:
    """Lines from a byte stream. Cancel-safe: a partial line stays in the buffer."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buf = bytearray()
        self._scan_from = 0

    async def receive_line(self) -> bytes | None:
        """The next line without its newline; None at end of stream."""
        while True:
            nl = self._buf.find(b"\n", self._scan_from)
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                self._scan_from = 0
                return line
            self._scan_from = len(self._buf)
            if len(self._buf) > MAX_LINE:
                raise ValueError(f"protocol line longer than {MAX_LINE} bytes")
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                return None
            self._buf += chunk


def _encode(msg: _Json) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode("utf-8") + b"\n"


def error_reply(exc: BaseException) -> _Json:
    """The reply that carries `exc` to the client."""
    if isinstance(exc, CloudfsError):
        return {"ok": False, "error": exc.message, "kind": type(exc).__name__, "detail": exc.detail}
    return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "kind": "DaemonError",
            "detail": f"{type(exc).__name__}: {exc}"}  # fmt: skip


def error_from_reply(reply: _Json) -> CloudfsError:
    """The exception an error reply stands for: the class named by "kind" when it is a
    plain CloudfsError subclass, else DaemonError."""
    kind = reply.get("kind")
    detail = reply.get("detail")
    if not isinstance(detail, str):
        detail = str(reply.get("error") or "") or None
    cls = getattr(errors, kind, None) if isinstance(kind, str) else None
    if (
        isinstance(cls, type)
        and issubclass(cls, CloudfsError)
        and not issubclass(cls, errors.FSOpError)  # takes an errno first
    ):
        return cls(detail)
    return DaemonError(detail)


@dataclass
class SocketPath:
    """A usable address for a possibly long unix socket path; close() after use."""

    address: str
    dir_fd: int = -1

    @classmethod
    def open(cls, path: os.PathLike[str] | str) -> SocketPath:
        p = os.fspath(path)
        if len(os.fsencode(p)) < 100:
            return cls(p)
        dir_fd = os.open(os.path.dirname(p) or ".", os.O_RDONLY | os.O_DIRECTORY)
        return cls(f"/proc/self/fd/{dir_fd}/{os.path.basename(p)}", dir_fd)

    def close(self) -> None:
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1


# --- server ---------------------------------------------------------------------------


class DaemonOps(Protocol):
    """What the control server asks the daemon to do (implemented by the service)."""

    def mount_connected(self, pid: int | None) -> None: ...
    def mount_disconnected(self, pid: int | None) -> None: ...
    def touch(self) -> None:
        """A request arrived: the daemon is not idle."""

    def kick(self) -> None: ...
    async def fetch(self, block_ids: list[bytes], prefetch: list[bytes]) -> _Json: ...
    async def flush(self, block_ids: list[bytes] | None) -> _Json: ...
    async def store_blocks(self, blocks: list[tuple[bytes, int]]) -> _Json: ...
    async def finish_collection(self) -> _Json: ...
    async def status(self) -> _Json: ...
    async def drop_cache(self) -> _Json: ...
    async def backup(self) -> _Json: ...
    def fence(self, reason: str | None) -> None: ...
    def shutdown(self) -> None: ...


def _block_ids(msg: _Json, name: str = "blocks") -> list[bytes] | None:
    raw = msg.get(name)
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise errors.UsageError(f'"{name}" must be a list of hex block ids')
    try:
        ids = [bytes.fromhex(h) for h in raw]
    except (TypeError, ValueError):
        raise errors.UsageError(f'"{name}" must be a list of hex block ids') from None
    if any(len(i) != 32 for i in ids):
        raise errors.UsageError("a block id has 32 bytes")
    return ids


def _sized_blocks(msg: _Json) -> list[tuple[bytes, int]]:
    """The "blocks" of a store request with their "sizes"."""
    ids = _block_ids(msg) or []
    sizes = msg.get("sizes")
    if (
        not isinstance(sizes, list)
        or len(sizes) != len(ids)
        or not all(type(n) is int and n >= 0 for n in sizes)
    ):
        raise errors.UsageError('"sizes" must list the size of each block')
    return list(zip(ids, sizes, strict=True))


class ControlServer:
    """Serves the protocol on a listening unix socket; requests go to `ops`."""

    def __init__(self, ops: DaemonOps) -> None:
        self.ops = ops
        self.connections = 0
        self._accepting = trio.CancelScope()

    async def serve(self, listener: trio.SocketListener) -> None:
        """Accept connections (one task each) until `stop_accepting`, then keep serving
        the open connections until cancelled."""
        async with trio.open_nursery() as nursery:
            with self._accepting:
                while True:
                    try:
                        stream = await listener.accept()
                    except trio.ClosedResourceError:
                        break
                    except OSError as exc:
                        # EMFILE and friends: back off instead of spinning
                        log.warning("control socket accept failed: %s", exc)
                        await trio.sleep(0.5)
                        continue
                    nursery.start_soon(self._serve_connection, stream)
            await trio.sleep_forever()

    def stop_accepting(self) -> None:
        """Take no new connection (the listener may be closed after this)."""
        self._accepting.cancel()

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        mount_pid: int | None = None
        is_mount = False
        send_lock = trio.Lock()

        async def reply(msg: _Json) -> None:
            try:
                async with send_lock:
                    await stream.send_all(_encode(msg))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client went away; its requests die with the connection

        try:
            reader = _LineReader(stream)
            async with trio.open_nursery() as requests:
                while True:
                    try:
                        line = await reader.receive_line()
                    except (ValueError, trio.BrokenResourceError, OSError) as exc:
                        log.warning("control connection dropped: %s", exc)
                        line = None
                    if line is None:
                        break
                    if not line.strip():
                        continue
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        msg = None
                    if not isinstance(msg, dict):
                        await reply(error_reply(errors.UsageError("request is not a JSON object")))
                        continue
                    if msg.get("op") == "hello":
                        # handled inline, so the mount is counted before it sees the reply
                        if msg.get("role") == "mount" and not is_mount:
                            is_mount = True
                            pid = msg.get("pid")
                            mount_pid = pid if isinstance(pid, int) else None
                            self.ops.mount_connected(mount_pid)
                        await reply(self._with_id(msg, {"ok": True, "pid": os.getpid()}))
                        continue
                    requests.start_soon(self._handle, msg, reply)
                # the client closed its side: nobody is left to read the replies
                requests.cancel_scope.cancel()
        finally:
            self.connections -= 1
            if is_mount:
                self.ops.mount_disconnected(mount_pid)
            with trio.CancelScope(shield=True):
                await stream.aclose()

    @staticmethod
    def _with_id(request: _Json, msg: _Json) -> _Json:
        if "id" in request:
            msg["id"] = request["id"]
        return msg

    async def _handle(self, msg: _Json, reply: Callable[[_Json], Awaitable[None]]) -> None:
        op = msg.get("op")
        self.ops.touch()
        try:
            if op == "kick":
                self.ops.kick()
                result: _Json = {}
            elif op == "fetch":
                result = await self.ops.fetch(
                    _block_ids(msg) or [], _block_ids(msg, "prefetch") or []
                )
            elif op == "flush":
                result = await self.ops.flush(_block_ids(msg))
            elif op == "store":
                result = await self.ops.store_blocks(_sized_blocks(msg))
            elif op == "finish_collection":
                result = await self.ops.finish_collection()
            elif op == "status":
                result = await self.ops.status()
            elif op == "drop_cache":
                result = await self.ops.drop_cache()
            elif op == "backup":
                result = await self.ops.backup()
            elif op == "fence":
                reason = msg.get("reason")
                self.ops.fence(reason if isinstance(reason, str) else None)
                result = {}
            elif op == "shutdown":
                result = {}
            else:
                raise errors.UsageError(f"unknown op {op!r}")
        except Exception as exc:
            if not isinstance(exc, CloudfsError):
                log.exception("control request %r failed", op)
            await reply(self._with_id(msg, error_reply(exc)))
            return
        await reply(self._with_id(msg, {"ok": True, **result}))
        if op == "shutdown":
            self.ops.shutdown()


# --- client ---------------------------------------------------------------------------


@dataclass
class _Waiter:
    """A request waiting for its reply."""

    reply: _Json | None = None
    wake: trio.Event = field(default_factory=trio.Event)


class DaemonClient:
    """A connection to the cache dir's daemon. Requests may run concurrently from many
    tasks; the connection needs no background task: a task waiting for its reply reads
    the socket on behalf of all waiters while no other task does (and hands that role
    on when its own reply has come).

    Errors: a failed request raises the error class the daemon names (CorruptBlock,
    StoreError, ...); a lost connection raises DaemonError, and so does every later
    request on this client: connect a new one (after `ensure_daemon`)."""

    def __init__(self, stream: trio.SocketStream, cache: CacheDir) -> None:
        self.cache = cache
        self.daemon_pid: int | None = None
        self._stream = stream
        self._lines = _LineReader(stream)
        self._send_lock = trio.Lock()
        self._next_id = 1
        self._waiting: dict[int, _Waiter] = {}
        self._reading = False
        self._broken: str | None = None

    @classmethod
    async def connect(cls, cache: CacheDir, role: str = "mount") -> DaemonClient:
        """Connect and say hello. `role="mount"` keeps the daemon alive while this
        connection is open; tools use another role. DaemonError if nothing answers."""
        sock_path = SocketPath.open(cache.socket_path)
        try:
            stream = await trio.open_unix_socket(sock_path.address)
        except OSError as exc:
            raise DaemonError(
                f"no daemon answers on {cache.socket_path} ({exc.strerror})"
            ) from None
        finally:
            sock_path.close()
        client = cls(stream, cache)
        try:
            with trio.fail_after(HELLO_TIMEOUT_S):
                reply = await client._request("hello", role=role, pid=os.getpid())
        except trio.TooSlowError:
            await client.aclose()
            raise DaemonError(f"the daemon on {cache.socket_path} does not answer") from None
        except BaseException:
            await client.aclose()
            raise
        pid = reply.get("pid")
        client.daemon_pid = pid if isinstance(pid, int) else None
        return client

    async def fetch(self, block_ids: Sequence[bytes], prefetch: Sequence[bytes] = ()) -> None:
        """Return once every block of `block_ids` is in the cache dir. CorruptBlock
        when a stored block fails verification; StoreError (ObjectNotFound, ...) when
        it cannot be read; the failing block is named in the message (a corrupt one
        first). `prefetch`: read-ahead blocks, fetched in the background: not waited
        for, their failures never raise here."""
        if block_ids or prefetch:
            fields: dict[str, Any] = {"blocks": [b.hex() for b in block_ids]}
            if prefetch:
                fields["prefetch"] = [b.hex() for b in prefetch]
            await self._request("fetch", **fields)

    async def kick(self) -> None:
        """Tell the uploader that new pending blocks exist."""
        await self._request("kick")

    async def flush(self, block_ids: Sequence[bytes] | None = None) -> None:
        """Return once no block (of `block_ids`, if given) is pending. StoreError when
        every block still pending failed to upload since the flush began."""
        if block_ids is None:
            await self._request("flush")
        elif block_ids:
            await self._request("flush", blocks=[b.hex() for b in block_ids])

    async def store(self, blocks: Sequence[tuple[bytes, int]]) -> list[int]:
        """Have the daemon read, check, seal and PUT these cached blocks (id, plaintext
        size) now, rows or not; returns each object's stored size, in order.
        StoreError (or LeaseLost) when one of them could not be stored."""
        if not blocks:
            return []
        reply = await self._request(
            "store", blocks=[b.hex() for b, _n in blocks], sizes=[n for _b, n in blocks]
        )
        sizes = reply.get("stored_sizes")
        if not isinstance(sizes, list) or len(sizes) != len(blocks):
            raise DaemonError("the daemon's reply to store has no stored_sizes")
        return [int(n) for n in sizes]

    async def finish_collection(self) -> _Json:
        """Have the daemon finish what an interrupted garbage collection pass left
        claimed, unless a pass runs: the pass's report (`skipped` says why not)."""
        reply = await self._request("finish_collection")
        report = reply.get("collected")
        if not isinstance(report, dict):
            raise DaemonError("the daemon's reply to finish_collection has no report")
        return report

    async def status(self) -> _Json:
        """{"pending", "pending_bytes", "uploading", "uploaded", "errors", ...}."""
        reply = await self._request("status")
        reply.pop("ok", None)
        reply.pop("id", None)
        return reply

    async def drop_cache(self) -> _Json:
        """Delete the cache copies of every stored block (pending ones stay), so later
        reads fetch from the object store: {"dropped": blocks, "dropped_bytes": n}."""
        reply = await self._request("drop_cache")
        return {k: reply[k] for k in ("dropped", "dropped_bytes")}

    async def backup(self) -> str | None:
        """Back the metadata up now; the backup's object key (None: not SQLite, or the
        backup failed: see the daemon's log)."""
        key = (await self._request("backup")).get("key")
        return key if isinstance(key, str) else None

    async def fence(self, reason: str | None) -> None:
        """With a reason: upload, remove and back up nothing more for this cache dir
        (its mount lost the lease to another machine); flushes fail with LeaseLost.
        None lifts that (a mount holds the lease again)."""
        await self._request("fence", reason=reason)

    async def shutdown(self) -> None:
        """Ask the daemon to exit (it finishes the bookkeeping of running uploads)."""
        await self._request("shutdown")

    async def aclose(self) -> None:
        self._break("client closed")
        with trio.CancelScope(shield=True):
            await self._stream.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --- request machinery ----------------------------------------------------------

    def _break(self, why: str) -> None:
        if self._broken is None:
            self._broken = why
        for waiter in self._waiting.values():
            waiter.wake.set()

    async def _send(self, msg: _Json) -> None:
        line = _encode(msg)
        # Shielded: a request cancelled halfway through its line would leave the
        # stream unusable for every other request on this connection.
        with trio.CancelScope(shield=True):
            async with self._send_lock:
                if self._broken is not None:
                    raise DaemonError(f"connection to the daemon lost ({self._broken})")
                try:
                    with trio.fail_after(SEND_TIMEOUT_S):
                        await self._stream.send_all(line)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self._break(str(exc) or type(exc).__name__)
                    raise DaemonError(f"connection to the daemon lost ({exc})") from None
                except trio.TooSlowError:
                    self._break("send timed out")
                    raise DaemonError("the daemon does not take requests") from None

    async def _request(self, op: str, **fields: Any) -> _Json:
        rid = self._next_id
        self._next_id += 1
        waiter = _Waiter()
        self._waiting[rid] = waiter
        try:
            await self._send({"id": rid, "op": op, **fields})
            while waiter.reply is None:
                if self._broken is not None:
                    raise DaemonError(f"connection to the daemon lost ({self._broken})")
                if self._reading:
                    waiter.wake = trio.Event()
                    await waiter.wake.wait()
                else:
                    await self._read_until(waiter)
        finally:
            del self._waiting[rid]
        reply = waiter.reply
        if not reply.get("ok"):
            raise error_from_reply(reply)
        return reply

    async def _read_until(self, mine: _Waiter) -> None:
        """Read replies, handing each to its waiter, until `mine` has come."""
        self._reading = True
        try:
            while mine.reply is None:
                try:
                    line = await self._lines.receive_line()
                except (
                    trio.BrokenResourceError,
                    trio.ClosedResourceError,
                    OSError,
                    ValueError,
                ) as exc:
                    self._break(str(exc) or type(exc).__name__)
                    return
                if line is None:
                    self._break("the daemon closed the connection")
                    return
                try:
                    msg = json.loads(line)
                except ValueError:
                    self._break("the daemon sent a line that is not JSON")
                    return
                rid = msg.get("id") if isinstance(msg, dict) else None
                waiter = self._waiting.get(rid) if isinstance(rid, int) else None
                if waiter is not None:  # else: its request was cancelled meanwhile
                    waiter.reply = msg
                    waiter.wake.set()
        finally:
            self._reading = False
            # hand the reader role to one task still waiting (or to all on failure)
            for waiter in self._waiting.values():
                if waiter is not mine and waiter.reply is None:
                    waiter.wake.set()
                    if self._broken is None:
                        break


# --- starting the daemon --------------------------------------------------------------


def _last_log_line(cache: CacheDir) -> str | None:
    try:
        with open(cache.log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return None
    return lines[-1] if lines else None


async def answers(cache: CacheDir) -> bool:
    """True when a daemon answers a hello on the cache dir's socket."""
    try:
        client = await DaemonClient.connect(cache, role="probe")
    except DaemonError:
        return False
    await client.aclose()
    return True


async def ensure_daemon(
    cache: CacheDir,
    master_key: bytes,
    *,
    timeout: float = START_TIMEOUT_S,
    extra_args: Sequence[str] = (),
    meta_password: str | None = None,
) -> None:
    """Return once a daemon answers on the cache dir's socket, starting one if none
    does: `python -m cloudfs.daemon.main --cachedir DIR --key-stdin` in a new session,
    the master key hex-encoded on its stdin (never in its argv or environment), and
    the MySQL password of the metadata database, if any, on a second line.
    DaemonError, with the daemon's last words, when none answers within `timeout`."""
    if await answers(cache):
        return
    cmd = [sys.executable, "-m", "cloudfs.daemon.main", "--cachedir", str(cache.root),
           "--key-stdin", *extra_args]  # fmt: skip
    stdin = master_key.hex().encode("ascii") + b"\n"
    if meta_password is not None:
        cmd.append("--metadata-password-stdin")
        stdin += meta_password.encode("utf-8").hex().encode("ascii") + b"\n"
    # Neither the passphrase nor the MySQL password may reach the daemon's environment.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CLOUDFS_PASSPHRASE", "CLOUDFS_MYSQL_PASSWORD")
    }
    last_error: str | None = None
    with trio.move_on_after(timeout) as scope:
        while True:
            # The launcher returns once its detached daemon listens, exits 0 at once
            # when another daemon holds the lock, or prints one line and fails.
            result = await trio.run_process(
                cmd,
                stdin=stdin,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                start_new_session=True,
                env=env,
            )
            if result.returncode != 0:
                lines = result.stderr.decode("utf-8", "replace").strip().splitlines()
                last_error = (
                    lines[-1] if lines else f"cloudfsd exited with status {result.returncode}"
                )
                break
            # Another daemon may still be starting, or be exiting (it holds the lock
            # until then): poll, and launch again if it went away.
            for _ in range(20):
                if await answers(cache):
                    return
                await trio.sleep(0.1)
    if scope.cancelled_caught:
        last_error = f"no answer within {timeout:g} s"
    log_line = _last_log_line(cache)
    detail = last_error or "cloudfsd failed to start"
    if log_line and log_line not in detail:
        detail += f" (last log line: {log_line})"
    raise DaemonError(detail)


__all__ = [
    "ControlServer",
    "DaemonClient",
    "DaemonOps",
    "SocketPath",
    "answers",
    "ensure_daemon",
    "error_from_reply",
    "error_reply",
]
