"""A latency-injecting HTTP/1.1 proxy on loopback, to put in front of the moto server.

moto answers in tens of ms of Python with no network in between; real S3 has a first-byte
latency and per-connection bandwidth limits. Benchmarks and request-counting tests point s3fs
at this proxy to see that behaviour, count the requests it makes and inject S3-like faults.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

SLICE = 64 * 1024
FAULTS = ("503", "reset", "truncate", "stall")
_LIMIT = 1 << 20
_NETWORK_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)


@dataclass
class Request:
    """One request seen by the proxy: status 0 when no response was sent; bytes_out is the
    response body length the proxy sent or set out to send (half of it under "truncate")."""

    method: str
    path: str
    query: str
    range: str | None
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    started: float = 0.0
    finished: float = 0.0
    target: str | None = None
    """The ``X-Amz-Target`` header: the operation of a JSON API such as KMS (``TrentService.Decrypt``)."""


@dataclass
class _Fault:
    kind: str
    when: Callable[[Request], bool]
    left: int


@dataclass
class _Message:
    """A parsed request or response: raw head (forwarded unchanged), raw body, payload size."""

    lines: list[bytes]
    headers: dict[str, str]
    body: bytes = b""
    size: int = 0

    @property
    def head(self) -> bytes:
        return b"\r\n".join(self.lines) + b"\r\n\r\n"


class _Pacer:
    """Holds one transfer to at most ``rate`` bytes/s by sleeping whenever it runs ahead."""

    def __init__(self, rate: float | None) -> None:
        self.rate, self.start, self.done = rate, time.monotonic(), 0

    async def __call__(self, n: int) -> None:
        if self.rate:
            self.done += n
            delay = self.start + self.done / self.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)


async def _read_exact(reader: asyncio.StreamReader, n: int, pacer: _Pacer) -> bytes:
    out = bytearray()
    while len(out) < n:
        piece = await reader.readexactly(min(SLICE, n - len(out)))
        out += piece
        await pacer(len(piece))
    return bytes(out)


async def _read_head(reader: asyncio.StreamReader) -> _Message | None:
    """The next head, or None on a clean EOF before its first byte."""
    try:
        data = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise
        return None
    lines = data.lstrip(b"\r\n")[:-4].split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return _Message(lines, headers)


async def _read_body(reader: asyncio.StreamReader, msg: _Message, pacer: _Pacer) -> None:
    """Read a body framed by chunked encoding or Content-Length, keeping the framing bytes."""
    if "chunked" in msg.headers.get("transfer-encoding", "").lower():
        raw = bytearray()
        while True:
            line = await reader.readuntil(b"\r\n")
            raw += line
            n = int(line.split(b";")[0].strip(), 16)
            if n == 0:
                break
            raw += await _read_exact(reader, n + 2, pacer)
            msg.size += n
        while line != b"\r\n":
            line = await reader.readuntil(b"\r\n")
            raw += line
        msg.body = bytes(raw)
    else:
        msg.size = int(msg.headers.get("content-length", "0"))
        msg.body = await _read_exact(reader, msg.size, pacer)


def _error(status: int, reason: str, code: str, method: str) -> _Message:
    """An S3-style XML error response, made up by the proxy."""
    rid = uuid.uuid4().hex[:16].upper()
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        f"<Message>{reason}</Message><RequestId>{rid}</RequestId><HostId>latency-proxy</HostId></Error>"
    ).encode()
    lines = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/xml", f"Content-Length: {len(body)}", f"x-amz-request-id: {rid}"]
    body = b"" if method == "HEAD" else body
    return _Message([x.encode() for x in lines], {}, body, len(body))


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a dropped connection looks to the client."""
    sock = writer.get_extra_info("socket")
    try:
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    writer.transport.abort()


class LatencyProxy:
    """HTTP/1.1 proxy to ``upstream`` that delays, paces, counts and breaks requests.

    Each response's first byte leaves no sooner than ``latency`` seconds after its request
    was read (upstream time counts towards it); with ``bandwidth``, request and response
    bodies move at most that many bytes/s per connection. One upstream connection per client
    connection, requests handled one at a time on each, on an event loop in a daemon thread.
    """

    def __init__(self, upstream: str, latency: float = 0.02, bandwidth: float | None = None,
                 host: str = "127.0.0.1", port: int = 0, stall: float = 2.0) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.latency, self.bandwidth, self.stall = latency, bandwidth, stall
        self.host, self.port = host, port
        self._lock = threading.RLock()
        self._requests: list[Request] = []
        self._faults: list[_Fault] = []
        self._tasks: set[asyncio.Task] = set()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def requests(self) -> list[Request]:
        """A snapshot of the requests seen so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()

    def count(self, method: str | None = None) -> int:
        """How many requests were seen, of ``method`` if given."""
        return sum(1 for r in self.requests if method is None or r.method == method.upper())

    def max_in_flight(self) -> int:
        """The most requests that were being answered at one time (from each request's arrival
        to its last response byte): how concurrent a client was."""
        events = sorted(e for r in self.requests if r.finished for e in ((r.started, 1), (r.finished, -1)))
        most = now = 0
        for _, step in events:
            now += step
            most = max(most, now)
        return most

    def inject(self, fault: str, when: Callable[[Request], bool] = lambda r: True, times: int = 1) -> None:
        """Apply ``fault`` to the next ``times`` requests for which ``when`` is true."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; one of {FAULTS}")
        with self._lock:
            self._faults.append(_Fault(fault, when, times))

    def _take_fault(self, rec: Request) -> str | None:
        with self._lock:
            for fault in self._faults:
                if fault.when(rec):
                    fault.left -= 1
                    if fault.left <= 0:
                        self._faults.remove(fault)
                    return fault.kind
        return None

    def start(self) -> str:
        """Start serving; returns the proxy URL."""
        if self._thread is None:
            ready = threading.Event()
            self._thread = threading.Thread(target=self._run, args=(ready,), name="latency-proxy", daemon=True)
            self._thread.start()
            if not ready.wait(10) or self._error is not None:
                raise RuntimeError(f"latency proxy did not start: {self._error!r}")
        return self.url

    def stop(self) -> None:
        """Drop every connection and join the thread."""
        if self._loop is not None and self._stopping is not None:
            try:
                self._loop.call_soon_threadsafe(self._stopping.set)
            except RuntimeError:
                pass
        if self._thread is not None:
            self._thread.join(5)
        self._thread = None

    def __enter__(self) -> LatencyProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, ready: threading.Event) -> None:
        loop = self._loop = asyncio.new_event_loop()
        loop.set_exception_handler(lambda _loop, _context: None)
        try:
            loop.run_until_complete(self._main(ready))
        except BaseException as exc:
            self._error = exc
        finally:
            ready.set()
            loop.close()

    async def _main(self, ready: threading.Event) -> None:
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._serve, self.host, self.port, limit=_LIMIT)
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        await self._stopping.wait()
        server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.sleep(0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        up: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                req = await _read_head(reader)
                if req is None:
                    break
                method, target = req.lines[0].decode("latin-1").split(" ")[:2]
                path, _, query = target.partition("#")[0].partition("?")
                if req.headers.get("expect", "").lower() == "100-continue":
                    req.lines = [x for x in req.lines if not x.lower().startswith(b"expect:")]
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                await _read_body(reader, req, _Pacer(self.bandwidth))
                ready_at = time.monotonic()
                rec = Request(
                    method, urlsplit(path).path or path, query, req.headers.get("range"), bytes_in=req.size, started=ready_at,
                    target=req.headers.get("x-amz-target"),
                )
                fault = self._take_fault(rec)
                with self._lock:
                    self._requests.append(rec)
                if fault == "reset":
                    _abort(writer)
                    break
                if fault == "stall":
                    await asyncio.sleep(self.stall)
                if fault == "503":
                    resp, close = _error(503, "Please reduce your request rate.", "SlowDown", method), False
                else:
                    try:
                        up, resp, close = await self._forward(up, method, req)
                    except _NETWORK_ERRORS:
                        up, close = None, False
                        resp = _error(502, "Upstream failed.", "BadGateway", method)
                rec.status = int(resp.lines[0].split()[1])
                close = close or req.headers.get("connection", "").lower() == "close"
                body = resp.body[: len(resp.body) // 2] if fault == "truncate" else resp.body
                rec.bytes_out = len(body) if fault == "truncate" else resp.size
                await asyncio.sleep(max(0.0, ready_at + self.latency - time.monotonic()))
                await self._send(writer, resp.head, body)
                rec.finished = time.monotonic()
                if close or fault == "truncate":
                    break
        except _NETWORK_ERRORS:
            pass
        finally:
            self._tasks.discard(task)
            for w in (writer, up[1] if up else None):
                if w is not None and not w.is_closing():
                    w.close()

    async def _forward(self, up: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None, method: str,
                       req: _Message) -> tuple[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None, _Message, bool]:
        """Send ``req`` upstream, reconnecting once if a kept-alive connection went stale."""
        while True:
            fresh = up is None
            if up is None:
                up = await asyncio.open_connection(*self.upstream, limit=_LIMIT)
            try:
                up[1].write(req.head + req.body)
                await up[1].drain()
                resp, close = await self._response(up[0], method)
            except _NETWORK_ERRORS:
                up[1].close()
                up = None
                if fresh:
                    raise
                continue
            if close:
                up[1].close()
                up = None
            return up, resp, close

    async def _response(self, reader: asyncio.StreamReader, method: str) -> tuple[_Message, bool]:
        """Read one upstream response (skipping 1xx); also whether the connection ends after it."""
        while True:
            resp = await _read_head(reader)
            if resp is None:
                raise asyncio.IncompleteReadError(b"", None)
            status = int(resp.lines[0].split()[1])
            if status >= 200:
                break
        close = resp.headers.get("connection", "").lower() == "close"
        if method == "HEAD" or status in (204, 304):
            pass
        elif "chunked" in resp.headers.get("transfer-encoding", "").lower() or "content-length" in resp.headers:
            await _read_body(reader, resp, _Pacer(None))
        else:
            resp.body = await reader.read()
            resp.size, close = len(resp.body), True
        return resp, close

    async def _send(self, writer: asyncio.StreamWriter, head: bytes, body: bytes) -> None:
        writer.write(head)
        pacer = _Pacer(self.bandwidth)
        view = memoryview(body)
        for i in range(0, len(view), SLICE):
            piece = view[i : i + SLICE]
            await pacer(len(piece))
            writer.write(piece)
            await writer.drain()
        await writer.drain()
