"""A fault-injecting HTTP proxy for tests: it sits on a loopback port between an S3
client (boto3 in cloudfs) and an S3 server (moto) and, at random, answers a request
itself with 500 InternalError or 503 SlowDown, delays it, drops the connection before
forwarding it, or forwards it and cuts the answer short (in the headers or mid-body).

The random choices come from one seeded `random.Random`, so a test names its seed; the
order of requests from a concurrent client still varies from run to run. Each accepted
connection is served by its own thread. Requests go upstream one connection each, with
`Connection: close`, so the proxy only has to read an answer until the server closes;
the client's connection stays open across answers when the server allowed it.

    with FaultProxy("127.0.0.1", moto_port, FaultRates.uniform(0.05), seed=1) as proxy:
        use(proxy.endpoint)
        assert proxy.counts["503"] > 0
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO, Self

#: the faults a request may meet, in the order the random draw walks them
FAULTS = ("500", "503", "cut_request", "cut_response")


@dataclass
class FaultRates:
    """Probability of each fault per request (the four answers exclude each other;
    a delay comes on top of any of them)."""

    internal_error: float = 0.0  # answer 500 InternalError (the request is not forwarded)
    slow_down: float = 0.0  # answer 503 SlowDown (not forwarded)
    cut_request: float = 0.0  # close the connection without forwarding or answering
    cut_response: float = 0.0  # forward, then send part of the answer and close
    delay: float = 0.0  # wait up to max_delay_s, before forwarding or mid-answer
    max_delay_s: float = 0.3

    @classmethod
    def uniform(cls, rate: float, max_delay_s: float = 0.3) -> FaultRates:
        """Every fault with the same probability `rate`."""
        return cls(rate, rate, rate, rate, rate, max_delay_s)

    def thresholds(self) -> list[tuple[float, str]]:
        total = 0.0
        out = []
        for p, name in zip(
            (self.internal_error, self.slow_down, self.cut_request, self.cut_response),
            FAULTS,
            strict=True,
        ):
            total += p
            out.append((total, name))
        if total > 1.0:
            raise ValueError("fault probabilities add up to more than 1")
        return out


_ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>{code}</Code><Message>{message}</Message>"
    "<RequestId>faultproxy</RequestId></Error>"
)
_ERRORS = {
    "500": (500, "Internal Server Error", "InternalError", "We encountered an internal error."),
    "503": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
}


class _Closed(Exception):
    """The client closed its connection."""


def _read_head(f: BinaryIO) -> list[bytes]:
    """The request line and header lines of the next request (without CRLFs)."""
    lines: list[bytes] = []
    while True:
        line = f.readline(65536)
        if not line:
            raise _Closed
        if line in (b"\r\n", b"\n"):
            if not lines:
                continue  # stray CRLF between requests
            return lines
        lines.append(line.rstrip(b"\r\n"))


def _read_chunked(f: BinaryIO) -> bytes:
    """A chunked body, as raw bytes (it is forwarded as it came)."""
    raw = bytearray()
    while True:
        size_line = f.readline(1024)
        if not size_line:
            raise _Closed
        raw += size_line
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            while True:  # trailers up to the empty line
                line = f.readline(65536)
                if not line:
                    raise _Closed
                raw += line
                if line in (b"\r\n", b"\n"):
                    return bytes(raw)
        chunk = f.read(size + 2)
        if len(chunk) < size + 2:
            raise _Closed
        raw += chunk


class FaultProxy:
    """Listens on 127.0.0.1:<free port> and forwards to upstream_host:upstream_port."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        rates: FaultRates | None = None,
        *,
        seed: int = 0,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.rates = rates or FaultRates()
        #: faults are injected only while this is true
        self.enabled = True
        #: what happened: "forwarded", "delay", and the names in FAULTS
        self.counts: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- lifetime -----------------------------------------------------------------------

    def start(self) -> Self:
        thread = threading.Thread(target=self._accept_loop, name="faultproxy", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stopping.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- serving ------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self._lock:
                self._sockets.add(conn)
                self._threads = [t for t in self._threads if t.is_alive()]
                self._threads.append(thread)
            thread.start()

    def _draw(self) -> tuple[str, float, bool]:
        """(fault or "forward", delay in seconds, delay mid-answer?) for one request."""
        with self._lock:
            if not self.enabled:
                return "forward", 0.0, False
            r = self._rng.random()
            fault = next((name for bound, name in self.rates.thresholds() if r < bound), "forward")
            delay = 0.0
            mid = False
            if self._rng.random() < self.rates.delay:
                delay = self._rng.uniform(0, self.rates.max_delay_s)
                mid = self._rng.random() < 0.5
                self.counts["delay"] += 1
            self.counts[fault if fault != "forward" else "forwarded"] += 1
            return fault, delay, mid

    def _cut_point(self, answer: bytes) -> int:
        """Where to cut an answer: anywhere in its body, or at the start of one of its
        header lines (a cut inside a header line can look like a complete, shorter
        header to Python's http.client; see cloudfs.objectstore.s3)."""
        head_end = answer.find(b"\r\n\r\n")
        head_end = len(answer) if head_end < 0 else head_end + 4
        line_starts = [0] + [i + 2 for i in range(head_end - 2) if answer[i : i + 2] == b"\r\n"]
        with self._lock:
            if head_end < len(answer) and self._rng.random() < 0.5:
                return self._rng.randrange(head_end, len(answer))
            return self._rng.choice(line_starts[:-1] or [0])

    def _serve(self, conn: socket.socket) -> None:
        f = conn.makefile("rb")
        try:
            while not self._stopping.is_set():
                head = _read_head(f)
                if not self._handle(conn, f, head):
                    return
        except (_Closed, OSError, ValueError):
            return
        finally:
            with self._lock:
                self._sockets.discard(conn)
            f.close()
            conn.close()

    def _handle(self, conn: socket.socket, f: BinaryIO, head: list[bytes]) -> bool:
        """Serve one request; False when the client connection must close."""
        request_line, header_lines = head[0], head[1:]
        method = request_line.split(b" ", 1)[0].upper()
        headers: list[tuple[bytes, bytes]] = []
        for line in header_lines:
            name, _, value = line.partition(b":")
            headers.append((name.strip(), value.strip()))
        lower = {name.lower(): value for name, value in headers}
        if lower.get(b"expect", b"").lower() == b"100-continue":
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        if b"chunked" in lower.get(b"transfer-encoding", b"").lower():
            body = _read_chunked(f)
        else:
            length = int(lower.get(b"content-length", b"0"))
            body = f.read(length) if length else b""
            if len(body) < length:
                raise _Closed

        fault, delay, delay_mid_answer = self._draw()
        if delay and not delay_mid_answer:
            time.sleep(delay)
        if fault in _ERRORS:
            conn.sendall(self._error_answer(fault, method == b"HEAD"))
            return True
        if fault == "cut_request":
            return False

        forwarded = [request_line]
        for name, value in headers:
            if name.lower() not in (b"connection", b"expect", b"keep-alive"):
                forwarded.append(name + b": " + value)
        forwarded.append(b"Connection: close")
        answer = self._forward(b"\r\n".join(forwarded) + b"\r\n\r\n" + body)

        if fault == "cut_response":
            conn.sendall(answer[: self._cut_point(answer)])
            return False
        if delay and delay_mid_answer:
            half = len(answer) // 2
            conn.sendall(answer[:half])
            time.sleep(delay)
            answer = answer[half:]
        conn.sendall(answer)
        answer_head = answer.split(b"\r\n\r\n", 1)[0].lower()
        return b"connection: close" not in answer_head

    def _forward(self, request: bytes) -> bytes:
        with socket.create_connection(self.upstream, timeout=120) as up:
            up.sendall(request)
            parts = []
            while True:
                data = up.recv(1 << 20)
                if not data:
                    return b"".join(parts)
                parts.append(data)

    @staticmethod
    def _error_answer(fault: str, head_request: bool) -> bytes:
        status, reason, code, message = _ERRORS[fault]
        body = _ERROR_BODY.format(code=code, message=message).encode()
        head = (
            f"HTTP/1.1 {status} {reason}\r\n"
            "Content-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: keep-alive\r\n\r\n"
        ).encode()
        return head if head_request else head + body
