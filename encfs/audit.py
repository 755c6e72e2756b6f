"""A tamper-evident audit log of key operations: one JSON line per wrap, unwrap and rewrap
(and per KMS call or cache hit, written by the key types that make them), hash-chained.

Off by default. On when ``$ENCFS_AUDIT_LOG`` names a file, or when code calls
``encfs.audit.configure(PATH)`` (which wins over the environment; ``configure(None)`` turns the
log off whatever the environment says, ``reset()`` goes back to the environment). Off, a
``record()`` costs one environment lookup and writes nothing.

Each line is one JSON object, ASCII only, fields in this order::

    {"seq":7,"ts":"2026-12-06T08:01:02.123456Z","host":"gpu-3","pid":4121,"user":"alice",
     "op":"unwrap","outcome":"ok","key":"key:1f2e3d4c5b6a7988","path":"data/train-0001.parquet",
     "file_id":"9c0f...","<extra fields>":...,"prev":"<64 hex>","hash":"<64 hex>"[,"mac":"<64 hex>"]}

``seq`` counts lines from 1; ``prev`` is the ``hash`` of the line before (the first line's is
``GENESIS``); ``hash`` is the SHA-256 of the line's exact bytes up to the ``,"hash"`` field
with ``}`` appended (``core``), so it covers every byte of the line but its own hash and mac.
With an audit key (``$ENCFS_AUDIT_KEY`` or ``configure(key=...)``: a reference to a symmetric
key file, ``keyfile:PATH`` as ``encfs keygen`` writes) each line also carries ``mac``:
HMAC-SHA-256 of ``core`` under a key derived from it (HKDF, info ``encfs/v1 audit-mac``).
``user`` is the OS user of the process; a caller that knows a better principal (a KMS caller's
IAM ARN) passes it as an extra field (``principal=``). Key bytes never reach a line: ``key``
is a stanza label (``type:keyid-hex``) or a KMS key ARN, ``file_id`` the file's public id, and
``record`` refuses bytes-like extras. ``path`` defaults to the path of the file being opened,
written or rewrapped: ``file_path(path)`` sets it for a block, and ``errors.naming`` (the
block every open, write and rewrap of a named file runs in) sets it for encfs's own calls.

What the chain proves, and what it does not
-------------------------------------------
``encfs audit verify LOG`` (``verify()``) re-computes every hash and checks ``seq`` and
``prev``: a line edited in place, a line dropped from the middle or the start, and lines
reordered or duplicated are each reported with the number of the first bad line. It cannot
see lines removed from the END (the shorter log is a valid chain), nor a log deleted and
started again: for that keep the head somewhere else: ``verify`` prints the last ``seq`` and
``hash``; record them (a ticket, another host, a write-once bucket) and later pass
``--expect-head HASH``, which fails unless a line with that hash is still in the log (and the
chain verifies from the start through it to the end). Without an audit key anyone who can
write the file can also rewrite it as a whole new valid chain; only an external anchor shows
that. With an audit key, a rewritten line needs the key to make its ``mac`` again, so a party
that can edit the log but cannot read the key file (a log shipped to shared storage, an
operator without the key) is caught line by line; the processes that write the log hold the
key, so a compromised writer host is not. Verify with the same key (``--key`` or
``$ENCFS_AUDIT_KEY``); without it the macs are reported as not checked.

Writers: one append per event, under an exclusive ``flock`` on the log file (read the last
line's seq and hash, then append), and under a per-process thread lock (``flock`` does not
separate the threads that share one descriptor), so threads, forked DataLoader workers and
spawned processes keep one linear chain. A forked child never uses its parent's descriptor
(``ForkLocal``: it opens its own, or the child and the parent would share one lock); a process
that finds the file grown since its own last line reads the new last line first. A log
renamed away (rotation) is noticed and a new file is started from ``GENESIS`` (anchor the old
one's head before rotating it). Lines are not ``fsync``-ed unless ``configure(..., fsync=True)``:
they survive a crash of the process, not of the machine.

Fail closed: when the log is on and a line cannot be written (the path cannot be opened, the
disk is full, the file ends in a half-written line, the audit key cannot be loaded), the key
operation fails with ``encfs.errors.AuditError``, and the file key is wiped (an open fails, a
write discards its file, a rewrap writes nothing). A key used without a line in the log is what
an audit log exists to rule out; an operator who prefers availability turns the log off.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import fcntl
import hashlib
import json
import os
import re
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import AuditError, ConfigError, EncfsError
from .forking import ForkLocal

LOG_ENV = "ENCFS_AUDIT_LOG"
KEY_ENV = "ENCFS_AUDIT_KEY"
GENESIS = hashlib.sha256(b"encfs audit log v1 genesis").hexdigest()
"""The ``prev`` of a log's first line."""

# Operations. ``KeyRing``, the writer and rewrap write the first three (one ``unwrap`` per file
# opened, whatever key type opened it); key types with remote calls or caches (encfs.keys.kms,
# encfs.agent) add their own, such as the last three, next to them. ``op`` is an open set.
WRAP, UNWRAP, REWRAP = "wrap", "unwrap", "rewrap"
KMS_GENERATE, UNWRAP_KMS, UNWRAP_CACHE = "kms-generate", "unwrap-kms", "unwrap-cache"
OK, FAILED = "ok", "failed"

_RESERVED = frozenset({"seq", "ts", "host", "pid", "user", "op", "outcome", "key", "path", "file_id", "prev", "hash", "mac"})
_TAIL = re.compile(rb',"hash":"([0-9a-f]{64})"(?:,"mac":"([0-9a-f]{64})")?\}\Z')
_MAC_INFO = b"encfs/v1 audit-mac"

_current_path: contextvars.ContextVar[str | None] = contextvars.ContextVar("encfs_audit_path", default=None)
_UNSET = object()
_configured: Any = _UNSET  # (path, key reference, fsync) from configure(); None: off; _UNSET: environment


# -- configuration -------------------------------------------------------------------------
def configure(path: str | os.PathLike | None, *, key: str | None = None, fsync: bool = False) -> None:
    """Log to ``path`` (``None``: off), whatever ``$ENCFS_AUDIT_LOG`` says, in this process and
    the processes it forks. ``key``: reference to a symmetric key file; each line gets a mac."""
    global _configured
    _configured = None if path is None else (os.fspath(path), key, bool(fsync))


def reset() -> None:
    """Back to the environment (``$ENCFS_AUDIT_LOG``, ``$ENCFS_AUDIT_KEY``)."""
    global _configured
    _configured = _UNSET


def _settings() -> tuple[str, str | None, bool] | None:
    if _configured is not _UNSET:
        return _configured
    path = os.environ.get(LOG_ENV)
    if not path:
        return None
    return path, os.environ.get(KEY_ENV) or None, False


def enabled() -> bool:
    """Whether key operations are logged now."""
    return _settings() is not None


@contextlib.contextmanager
def file_path(path: str | None) -> Iterator[None]:
    """Key operations inside the block are logged with ``path`` (unless they pass their own)."""
    token = _current_path.set(path)
    try:
        yield
    finally:
        _current_path.reset(token)


def current_path() -> str | None:
    return _current_path.get()


# -- writing -------------------------------------------------------------------------------
def record(
    op: str, *, outcome: str = OK, key: str | None = None, path: str | None = None, file_id: bytes | None = None, **extra: Any
) -> None:
    """Append one event when the log is on (else return at once). ``key``: a stanza label or
    KMS key ARN, never key bytes; ``path``: default the path of the file being opened
    (``file_path``); ``file_id``: the header's 16-byte file id; ``extra``: JSON values (str,
    numbers, bools, None, lists/dicts of them), no bytes. Raises ``AuditError`` when the line
    cannot be written."""
    settings = _settings()
    if settings is None:
        return
    fields: dict[str, Any] = {
        "op": op, "outcome": outcome, "key": key,
        "path": path if path is not None else _current_path.get(),
        "file_id": _file_id_hex(file_id),
    }
    for name, value in extra.items():
        if name in _RESERVED:
            raise TypeError(f"audit.record: {name!r} is a reserved field")
        fields[name] = _json_value(value, name)
    _log_for(settings).append(fields)


def error_fields(exc: BaseException) -> dict[str, str]:
    """What a ``failed`` event says about its exception: the type, and an encfs error's message
    (encfs messages never hold key bytes; other exceptions' messages are left out)."""
    out = {"error": type(exc).__name__}
    if isinstance(exc, EncfsError) and exc.args and isinstance(exc.args[0], str):
        out["reason"] = exc.args[0][:500]
    return out


def _file_id_hex(file_id: bytes | None) -> str | None:
    if file_id is None:
        return None
    if not isinstance(file_id, bytes) or len(file_id) != 16:
        raise TypeError("audit.record: file_id is a header's 16-byte file id")
    return file_id.hex()


def _json_value(value: Any, name: str) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v, name) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v, name) for k, v in value.items()}
    raise TypeError(f"audit.record: field {name!r} must be JSON text or numbers, not {type(value).__name__} (never bytes: key ids go in as hex)")


class _Log:
    """One process's appender to one log file."""

    def __init__(self, path: str, key_ref: str | None, fsync: bool):
        self.path = os.path.abspath(os.path.expanduser(path))
        self.key_ref = key_ref
        self.fsync = fsync
        self.lock = threading.Lock()
        self.fd: int | None = None
        self.ino = -1
        self.tail: tuple[int, int, str] | None = None  # (file size after our last line, its seq, its hash)
        self.host = socket.gethostname()
        self.user = _os_user()
        self.mac_key = None  # loaded on first append: a bad key reference fails the operation

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        self.close()

    def _open(self) -> int:
        """The descriptor, reopened when the path now names another file (rotation)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        if self.fd is not None and st is not None and st.st_ino == self.ino:
            return self.fd
        self.close()
        self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.ino, self.tail = os.fstat(self.fd).st_ino, None
        return self.fd

    def append(self, fields: dict[str, Any]) -> None:
        with self.lock:
            try:
                if self.key_ref is not None and self.mac_key is None:
                    self.mac_key = _load_mac_key(self.key_ref)
                fd = self._open()
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    self._append_locked(fd, fields)
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            except AuditError:
                raise
            except Exception as e:
                raise AuditError(f"cannot write the audit log {self.path}: {type(e).__name__}: {e}") from None

    def _append_locked(self, fd: int, fields: dict[str, Any]) -> None:
        size = os.fstat(fd).st_size
        if self.tail is not None and self.tail[0] == size:
            seq, prev = self.tail[1], self.tail[2]
        else:
            seq, prev = _last_line(fd, size, self.path)
        seq += 1
        core = {
            "seq": seq, "ts": _now(), "host": self.host, "pid": os.getpid(), "user": self.user,
            **fields, "prev": prev,
        }
        core_b = json.dumps(core, separators=(",", ":"), ensure_ascii=True).encode("ascii")
        digest = hashlib.sha256(core_b).hexdigest()
        line = core_b[:-1] + b',"hash":"' + digest.encode("ascii") + b'"'
        if self.mac_key is not None:
            line += b',"mac":"' + _mac(self.mac_key, core_b).encode("ascii") + b'"'
        line += b"}\n"
        try:
            view, done = memoryview(line), 0
            while done < len(line):
                done += os.write(fd, view[done:])
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)  # no half line left behind, when it can be helped
            self.tail = None
            raise
        self.tail = (size + len(line), seq, digest)


def _last_line(fd: int, size: int, path: str) -> tuple[int, str]:
    """Seq and hash of the log's last line (0 and GENESIS when empty)."""
    if size == 0:
        return 0, GENESIS
    block, end, buf = 4096, size, b""
    while True:
        start = max(0, end - block)
        buf = os.pread(fd, end - start, start) + buf
        end = start
        cut = buf.rfind(b"\n", 0, len(buf) - 1)
        if cut >= 0 or start == 0:
            break
        block = min(block * 2, 1 << 20)
    if not buf.endswith(b"\n"):
        raise AuditError(f"the audit log {path} ends in an incomplete line; run 'encfs audit verify' and repair or rotate it")
    last = buf[cut + 1 :]
    m = _TAIL.search(last[:-1])
    try:
        obj = json.loads(last)
        seq = obj["seq"]
        if m is None or not isinstance(seq, int):
            raise ValueError
    except ValueError:
        raise AuditError(f"the audit log {path} does not end in an encfs audit line; run 'encfs audit verify'") from None
    return seq, m.group(1).decode("ascii")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _os_user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError, OSError):
        return str(os.geteuid()) if hasattr(os, "geteuid") else "?"


def _load_mac_key(ref: str):
    """The MAC key derived from a symmetric key file's key (a ``SecretBytes``)."""
    from .keys.base import hkdf32
    from .keys.refs import load_reference

    key = load_reference(ref)
    secret = getattr(key, "secret", None)
    if getattr(key, "type", None) != "key" or secret is None:
        raise ConfigError(f"{KEY_ENV}: {ref} is not a symmetric key file (make one with 'encfs keygen')")
    try:
        return hkdf32(secret.view(), b"", _MAC_INFO)
    finally:
        key.wipe()


def _mac(mac_key: Any, data: bytes) -> str:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives import hmac as crypto_hmac

    h = crypto_hmac.HMAC(mac_key.view(), hashes.SHA256())
    h.update(data)
    return h.finalize().hex()


_logs: ForkLocal[dict] = ForkLocal(dict, initial={})
"""This process's appenders, by settings. A forked child starts with none: it never writes
through (or locks) its parent's descriptor."""


def _log_for(settings: tuple[str, str | None, bool]) -> _Log:
    logs = _logs.get()
    log = logs.get(settings)
    if log is None:
        log = logs.setdefault(settings, _Log(*settings))
    return log


# -- verifying -----------------------------------------------------------------------------
@dataclass
class Verification:
    log: str
    ok: bool
    lines: int
    head_seq: int
    head_hash: str
    bad_line: int | None = None
    reason: str | None = None
    macs: str = "none"
    """"checked" (every line's mac verified), "not checked" (lines carry macs, no key given), "none"."""
    anchor_line: int | None = None
    counts: dict[str, int] = field(default_factory=dict)
    """Events per operation (``op``)."""


def verify(log: str | os.PathLike, *, expect_head: str | None = None, key: str | None = None) -> Verification:
    """Check a log's chain line by line; the first bad line ends the check. ``expect_head``: a
    ``hash`` recorded earlier, which must still be in the log. ``key``: the audit key reference,
    to check every line's mac."""
    path = os.fspath(log)
    mac_key = _load_mac_key(key) if key else None
    seq, prev, n, macs_seen = 0, GENESIS, 0, False
    anchor = None
    counts: dict[str, int] = {}
    expect = expect_head.strip().lower() if expect_head else None

    def bad(line_no: int, why: str) -> Verification:
        return Verification(path, False, n, seq, prev, line_no, why, "checked" if mac_key else ("not checked" if macs_seen else "none"), anchor, counts)

    with open(path, "rb") as f:
        for raw in f:
            line_no = n + 1
            if not raw.endswith(b"\n"):
                return bad(line_no, "incomplete last line (a write was cut off, or the file was truncated inside a line)")
            body = raw[:-1]
            m = _TAIL.search(body)
            if m is None:
                return bad(line_no, "not an encfs audit line (no hash field at its end): edited")
            core = body[: m.start()] + b"}"
            digest = m.group(1).decode("ascii")
            if hashlib.sha256(core).hexdigest() != digest:
                return bad(line_no, "edited: hash mismatch (the line's content does not match its hash)")
            try:
                obj = json.loads(core)
                line_seq, line_prev = obj["seq"], obj["prev"]
            except (ValueError, KeyError, TypeError):
                return bad(line_no, "edited: not a JSON object with seq and prev")
            if m.group(2) is not None:
                macs_seen = True
            if mac_key is not None:
                if m.group(2) is None:
                    return bad(line_no, "no mac: written without the audit key, or edited")
                if _mac(mac_key, core) != m.group(2).decode("ascii"):
                    return bad(line_no, "mac mismatch: edited and re-hashed, or written with another key")
            if line_seq != seq + 1:
                what = "a line was dropped here, or lines were reordered" if isinstance(line_seq, int) and line_seq > seq + 1 else "lines were reordered or duplicated"
                return bad(line_no, f"seq gap: expected seq {seq + 1}, found {line_seq} ({what})")
            if line_prev != prev:
                return bad(line_no, "prev mismatch: does not chain to the line before it (that line was edited, or lines were dropped or reordered)")
            n, seq, prev = line_no, line_seq, digest
            op = obj.get("op")
            counts[str(op)] = counts.get(str(op), 0) + 1
            if expect is not None and digest == expect:
                anchor = line_no
    result = Verification(path, True, n, seq, prev, macs="checked" if mac_key else ("not checked" if macs_seen else "none"), anchor_line=anchor, counts=counts)
    if expect is not None and anchor is None and expect != GENESIS:
        result.ok, result.reason = False, f"expected head {expect} is not in the log: lines were removed from its end, or the log was replaced"
    return result


# -- command line --------------------------------------------------------------------------
def add_arguments(parser: Any) -> None:
    """The arguments of ``encfs audit verify``."""
    parser.add_argument("log", metavar="LOG", help="the audit log file")
    parser.add_argument(
        "--expect-head", metavar="HASH",
        help="a head hash recorded earlier (printed by an earlier verify): fail unless that line is still in the log",
    )
    parser.add_argument("--key", dest="audit_key", metavar="REFERENCE", help=f"the audit key, to check each line's mac (default ${KEY_ENV})")
    parser.add_argument("--json", action="store_true", help="one JSON object: ok, lines, head_seq, head_hash, bad_line, reason, ...")
    parser.set_defaults(func=cli_verify)


def add_subcommand(sub: Any, parents: list | None = None) -> None:
    """``encfs audit verify`` under the CLI's subparsers ``sub``."""
    sp = sub.add_parser("audit", parents=parents or [], help="the audit log of key operations: 'encfs audit verify LOG'")
    asub = sp.add_subparsers(dest="audit_cmd", required=True)
    vp = asub.add_parser("verify", parents=parents or [], help="check an audit log's hash chain and print its head (seq and hash)")
    add_arguments(vp)


def cli_verify(args: Any) -> int:
    """Exit 0 and print the line count and head when the log verifies; 1 naming the first bad
    line and why (or the missing anchor)."""
    key = getattr(args, "audit_key", None) or os.environ.get(KEY_ENV) or None
    res = verify(args.log, expect_head=getattr(args, "expect_head", None), key=key)
    if getattr(args, "json", False):
        print(json.dumps(asdict(res)))
        return 0 if res.ok else 1
    if res.ok:
        anchor = f"; expected head found at line {res.anchor_line}" if res.anchor_line else ""
        macs = {"checked": "; macs checked", "not checked": "; macs NOT checked (no --key)", "none": ""}[res.macs]
        print(f"{res.log}: ok, {res.lines} lines; head seq {res.head_seq} hash {res.head_hash}{anchor}{macs}")
        return 0
    where = f"line {res.bad_line}: " if res.bad_line else ""
    print(f"{res.log}: FAILED: {where}{res.reason}", file=sys.stderr)
    if res.bad_line:
        print(f"{res.log}: the {res.lines} lines before it verify; their head: seq {res.head_seq} hash {res.head_hash}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """``python -m encfs.audit verify LOG ...`` (the same as ``encfs audit verify``)."""
    import argparse

    p = argparse.ArgumentParser(prog="encfs audit")
    sub = p.add_subparsers(dest="audit_cmd", required=True)
    add_arguments(sub.add_parser("verify", help="check an audit log's hash chain"))
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except (OSError, EncfsError) as e:
        print(f"encfs: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
