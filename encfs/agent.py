"""The key agent: one process per user and host that holds the KEKs KMS unwrapped, so that all
the user's processes (DataLoader workers, fork or spawn, several training jobs) open the files
of one writing session with one KMS ``Decrypt`` per cache lifetime, not one per process.

Like ``ssh-agent``: ``encfs agent start`` runs it in the background and prints
``ENCFS_AGENT_SOCK=...``; processes with that variable ask it over a Unix socket. The socket
lives in a directory only the user can enter (0700) and the agent answers only peers of its
own uid (``SO_PEERCRED``). A KEK never leaves the agent: a client sends a stanza's KMS
ciphertext and its file id and gets back that one file's wrap key (``HKDF(KEK, file id)``),
which opens that file's stanza and nothing else. KEKs sit in locked memory, are wiped after
``max_age`` seconds or ``max_uses`` files (or the stanza's own tighter limits) and on
``encfs agent clear``; the agent process is not dumpable (no core file, no ptrace by other
processes of the user). The agent calls KMS with its own AWS credentials.

A client whose agent is gone (no socket, refused, no answer within ``TIMEOUT``) warns once and
calls KMS itself; a KMS error the agent met is raised in the client as the same typed error.

Wire format (one request per connection): request = u32 length || JSON; reply = one status
byte, then 32 key bytes (``OK``), nothing (``NOT_FOR_KEY``) or u32 length || JSON (``ERROR``,
``INFO``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import socket
import socketserver
import stat
import struct
import subprocess
import sys
import threading
import time
import warnings
from typing import Any

from .errors import ConfigError, EncfsError
from .secret import SecretBytes

SOCK_ENV = "ENCFS_AGENT_SOCK"
TIMEOUT = 150.0
"""Seconds a client waits for one answer: more than the agent's own KMS calls may take
(``kms.deadline``: 5 attempts of 10 s each way, with backoff)."""
RETRY_AFTER = 30.0
"""Seconds a client that found its agent gone calls KMS itself before asking the agent again."""
REQUEST_DEADLINE = 10.0
"""Seconds the agent gives a client to send its request."""
MAX_CONNECTIONS = 128
OK, NOT_FOR_KEY, ERROR, INFO = 0, 1, 2, 3
UNAVAILABLE = object()
_MAX_REQUEST = 64 << 10


class AgentError(EncfsError):
    """The agent refused a request or could not be started or reached (where that is an error)."""


def default_socket() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return os.path.join(base, f"encfs-agent-{os.getuid()}", "agent.sock")


# -- client ---------------------------------------------------------------------------------


class Connection:
    def __init__(self, path: str):
        self.path = path

    def _ask(self, message: dict, timeout: float = TIMEOUT) -> tuple[int, bytes]:
        """One request and its reply, all within ``timeout`` seconds. The socket's directory must
        be private and the peer must run as this user (``SO_PEERCRED``): anything else is an
        ``AgentError``, never an answer believed."""
        _check_private_dir(self.path)
        body = json.dumps(message).encode()
        end = time.monotonic() + timeout
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            _connect(s, self.path)
            _, uid, _ = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            if uid != os.getuid():
                raise AgentError(f"{self.path} is served by uid {uid}, not this user: not asking it")
            s.sendall(struct.pack(">I", len(body)) + body)
            status = _recv_exact(s, 1, end)[0]
            if status == OK:
                buf = bytearray(32)
                _recv_into(s, buf, end)
                return status, buf  # type: ignore[return-value]
            if status in (ERROR, INFO):
                (n,) = struct.unpack(">I", _recv_exact(s, 4, end))
                return status, _recv_exact(s, n, end)
            return status, b""

    def request(self, message: dict) -> Any:
        """An ``INFO`` request (status, clear, stop): its JSON reply."""
        status, data = self._ask(message)
        if status == ERROR:
            raise _error_from(json.loads(data))
        return json.loads(data) if data else {}

    def wrap_key(self, opts: Any, p: Any, salt: bytes) -> Any:
        """The wrap key of the file whose id is ``salt``, None if the stanza is not for this key,
        or ``UNAVAILABLE`` (warned once; the agent is not asked again for ``RETRY_AFTER`` s)
        when the agent does not answer. The agent calls its own KMS endpoint: only the stanza
        and the reader's cache limits travel."""
        if _down_until.get(self.path, 0.0) > time.monotonic():
            return UNAVAILABLE
        message = {
            "op": "wrap_key", "arn": p.arn, "dataset": p.dataset, "blob": p.blob.hex(), "salt": salt.hex(),
            "max_age": opts.cache_max_age, "max_uses": opts.cache_max_uses,
        }
        try:
            status, data = self._ask(message)
        except OSError as e:
            _down_until[self.path] = time.monotonic() + RETRY_AFTER
            _warn_once(self.path, e)
            return UNAVAILABLE
        if status == OK:
            return SecretBytes.take(data)  # type: ignore[arg-type]
        if status == NOT_FOR_KEY:
            return None
        raise _error_from(json.loads(data))


_warned: set[str] = set()
_down_until: dict[str, float] = {}


def _warn_once(path: str, e: BaseException) -> None:
    if path not in _warned:
        _warned.add(path)
        warnings.warn(f"encfs agent at {path} is not answering ({type(e).__name__}: {e}); calling KMS directly", RuntimeWarning, stacklevel=4)


def connection() -> Connection | None:
    """The agent this process should use (``$ENCFS_AGENT_SOCK``), or None."""
    path = os.environ.get(SOCK_ENV)
    if not path or path == "off":
        return None
    return Connection(path)


def _error_from(info: dict) -> EncfsError:
    """The agent's error as the same typed error here (a KMS error, an audit or format error)."""
    from . import errors
    from .keys import kms

    name, message = str(info.get("type", "")), str(info.get("message", "the agent refused the request"))
    cls = getattr(kms, name, None)
    if isinstance(cls, type) and issubclass(cls, kms.KmsError):
        return cls(message, code=str(info.get("code", "")), key=str(info.get("key", "")))
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, EncfsError) and cls.__init__ is EncfsError.__init__:
        return cls(message)
    return AgentError(message)


def _check_private_dir(path: str) -> None:
    d = os.path.dirname(path) or "."
    try:
        st = os.lstat(d)
    except FileNotFoundError:
        return  # (connecting then fails as a missing agent)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise AgentError(f"{d} is not a private directory of this user (mode 0700): not asking the agent there")


def _connect(s: socket.socket, path: str, busy_for: float = 2.0) -> None:
    """Connect; while the agent's backlog is full (EAGAIN), retry for up to ``busy_for`` s."""
    deadline = time.monotonic() + busy_for
    delay = 0.001
    while True:
        try:
            s.connect(path)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


def _recv_exact(s: socket.socket, n: int, end: float | None = None) -> bytes:
    buf = bytearray(n)
    _recv_into(s, buf, end)
    return bytes(buf)


def _recv_into(s: socket.socket, buf: bytearray, end: float | None = None) -> None:
    """Fill ``buf``, by the monotonic time ``end`` at the latest (a peer sending a byte at a
    time cannot stretch it)."""
    view, got = memoryview(buf), 0
    while got < len(buf):
        if end is not None:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError("no complete answer in time")
            s.settimeout(left)
        k = s.recv_into(view[got:])
        if not k:
            raise ConnectionError("the connection closed")
        got += k


# -- server ---------------------------------------------------------------------------------


class Agent:
    """The agent's state: its KMS settings, its KEK cache and limits. KMS is called where the
    agent was told to (``--endpoint``, ``--region``, ``--profile``; else the stanza's region and
    AWS's endpoint), never where a client says: a client can ask for a file's wrap key, not
    point the agent's credentials anywhere."""

    def __init__(self, max_age: float, max_uses: int, endpoint: str | None = None, region: str | None = None,
                 profile: str | None = None, attempts: int = 5, timeout: float = 10.0):
        from .keys.kms import KekCache

        self.max_age, self.max_uses = max_age, max_uses
        self.endpoint, self.region, self.profile, self.attempts, self.timeout = endpoint, region, profile, attempts, timeout
        self.cache = KekCache()
        self.started = time.time()
        self.requests = 0

    def wrap_key(self, req: dict) -> SecretBytes | None:
        from .keys import kms

        arn, dataset, blob, salt = (_field(req, k, str) for k in ("arn", "dataset", "blob", "salt"))
        p = kms.KmsParams(arn, dataset, bytes.fromhex(blob))
        kms.KmsParams.decode(p.encode())  # the same checks a header's stanza gets
        salt_b = bytes.fromhex(salt)
        opts = kms.KmsOptions(key=arn, region=self.region or arn.split(":")[3] or None, endpoint=self.endpoint, profile=self.profile,
                              attempts=self.attempts, timeout=self.timeout)
        limits = (min(self.max_age, float(req.get("max_age", self.max_age))), min(self.max_uses, int(req.get("max_uses", self.max_uses))))
        wk, cached = self.cache.use(kms.cache_key(opts, p), limits, lambda: kms.decrypt_kek(opts, p), lambda kek: kms.wrap_key(kek, salt_b))
        kms._audit("agent-unwrap-cache" if cached else "agent-unwrap-kms", arn, kek_id=p.kek_id.hex(), file_id=salt_b,
                   outcome="ok" if wk is not None else "not-for-this-key")
        return wk

    def status(self) -> dict:
        from .keys import kms

        return {"pid": os.getpid(), "uptime_s": round(time.time() - self.started, 1), "keks": len(self.cache),
                "requests": self.requests, "kms_calls": kms.calls(), "max_age": self.max_age, "max_uses": self.max_uses,
                "endpoint": self.endpoint, "region": self.region}


def _field(req: dict, name: str, kind: type) -> Any:
    value = req.get(name)
    if not isinstance(value, kind):
        raise AgentError(f"bad request: {name} must be a {kind.__name__}")
    return value


class _Handler(socketserver.BaseRequestHandler):
    server: "_Server"

    def handle(self) -> None:
        s: socket.socket = self.request
        _, uid, _ = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        if uid != os.getuid():
            return  # another user: no answer at all
        if not self.server.slots.acquire(timeout=REQUEST_DEADLINE):
            return
        try:
            self._answer(s)
        finally:
            self.server.slots.release()

    def _answer(self, s: socket.socket) -> None:
        try:
            end = time.monotonic() + REQUEST_DEADLINE
            (n,) = struct.unpack(">I", _recv_exact(s, 4, end))
            if n > _MAX_REQUEST:
                raise AgentError(f"bad request: {n} bytes")
            req = json.loads(_recv_exact(s, n, end))
            if not isinstance(req, dict):
                raise AgentError("bad request: not a JSON object")
            s.settimeout(TIMEOUT)
            self.server.agent.requests += 1
            op = req.get("op")
            if op == "wrap_key":
                wk = self.server.agent.wrap_key(req)
                if wk is None:
                    s.sendall(bytes([NOT_FOR_KEY]))
                else:
                    try:
                        s.sendall(bytes([OK]) + wk.bytes())
                    finally:
                        wk.wipe()
                return
            if op == "status":
                info = self.server.agent.status()
            elif op == "clear":
                self.server.agent.cache.clear()
                info = {"cleared": True}
            elif op == "stop":
                info = {"stopping": True}
                threading.Thread(target=self.server.shutdown, daemon=True).start()
            else:
                raise AgentError(f"unknown request {op!r}")
            _send_json(s, INFO, info)
        except EncfsError as e:
            self._error(s, {"type": type(e).__name__, "message": str(e), "code": getattr(e, "code", ""), "key": getattr(e, "key", "")})
        except Exception as e:
            self._error(s, {"type": "AgentError", "message": f"bad request: {type(e).__name__}"})

    @staticmethod
    def _error(s: socket.socket, info: dict) -> None:
        try:
            _send_json(s, ERROR, info)
        except OSError:
            pass


def _send_json(s: socket.socket, status: int, obj: dict) -> None:
    body = json.dumps(obj).encode()
    s.sendall(bytes([status]) + struct.pack(">I", len(body)) + body)


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    request_queue_size = 256
    agent: Agent
    slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # (a client that went away: nothing to report, and no traceback on the agent's stderr)


def _private_dir(path: str) -> None:
    """The socket's directory: created 0700, and refused unless it is ours and private."""
    d = os.path.dirname(path)
    os.makedirs(d, mode=0o700, exist_ok=True)
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise AgentError(f"{d} must be a directory owned by this user with mode 0700")


def _not_dumpable() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
    except (OSError, AttributeError):
        pass


def serve(path: str, max_age: float = 3600.0, max_uses: int = 1_000_000, ready: threading.Event | None = None, **kms: Any) -> None:
    """Run the agent on ``path`` until stopped (``stop`` request, SIGTERM, SIGINT); ``kms``:
    ``endpoint``, ``region``, ``profile``, ``attempts``, ``timeout`` of its KMS calls."""
    _private_dir(path)
    _not_dumpable()
    if os.path.exists(path):
        try:
            Connection(path).request({"op": "status"})
        except OSError:
            os.unlink(path)  # a dead agent's socket
        else:
            raise AgentError(f"an agent is already running on {path}")
    old = os.umask(0o177)
    try:
        server = _Server(path, _Handler)
    finally:
        os.umask(old)
    server.agent = Agent(max_age, max_uses, **kms)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    if ready is not None:
        ready.set()
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.agent.cache.clear()
        server.server_close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def start(path: str, max_age: float, max_uses: int, wait: float = 10.0, **kms: Any) -> int:
    """Start an agent in the background on ``path``; return its pid once it (and not some other
    process listening there) answers."""
    cmd = [sys.executable, "-m", "encfs.agent", "serve", "--socket", path, "--max-age", str(max_age), "--max-uses", str(max_uses)]
    for name, value in kms.items():
        if value is not None:
            cmd += [f"--{name}", str(value)]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace").strip().splitlines() if proc.stderr else []
            raise AgentError(f"the agent exited at start: {err[-1] if err else proc.returncode}")
        try:
            pid = Connection(path).request({"op": "status"})["pid"]
        except (OSError, AgentError):
            time.sleep(0.05)
            continue
        if pid != proc.pid:
            proc.kill()
            raise AgentError(f"another process (pid {pid}) answers on {path}; not starting an agent there")
        if proc.stderr:
            proc.stderr.close()
        return pid
    proc.kill()
    raise AgentError(f"the agent did not answer on {path} within {wait:g} s")


# -- command line ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["start", "serve", "stop", "clear", "status"])
    parser.add_argument("--socket", default=None, help=f"socket path (default ${SOCK_ENV}, else {default_socket()})")
    parser.add_argument("--max-age", type=float, default=3600.0, help="seconds a KEK is kept (default 3600)")
    parser.add_argument("--max-uses", type=int, default=1_000_000, help="files a KEK opens before KMS is asked again")
    parser.add_argument("--endpoint", default=None, help="KMS endpoint the agent calls (a VPC endpoint, a test server); default AWS's")
    parser.add_argument("--region", default=None, help="KMS region (default: the one in each key's ARN)")
    parser.add_argument("--profile", default=None, help="AWS profile whose credentials the agent uses")


def cli(args: argparse.Namespace) -> int:
    path = args.socket or os.environ.get(SOCK_ENV) or default_socket()
    if args.max_age <= 0 or args.max_uses <= 0:
        raise ConfigError("--max-age and --max-uses must be positive")
    kms = {"endpoint": args.endpoint, "region": args.region, "profile": args.profile}
    if args.action == "serve":
        serve(path, args.max_age, args.max_uses, **kms)
        return 0
    if args.action == "start":
        pid = start(path, args.max_age, args.max_uses, **kms)
        print(f"{SOCK_ENV}={path}; export {SOCK_ENV}; echo encfs agent pid {pid};")
        return 0
    try:
        info = Connection(path).request({"op": args.action})
    except (OSError, AgentError) as e:
        print(f"encfs agent: no agent answers on {path} ({getattr(e, 'strerror', None) or e})", file=sys.stderr)
        return 1
    print(json.dumps(info, indent=2, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="encfs agent", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
