"""Passphrase recipients: Argon2id (pyca/cryptography) derives the wrap key; its salt and
cost parameters travel in the stanza. A reader must run Argon2id before anything in the file
can be authenticated, so the cost a file may ask for is bounded on read: by default to what
writers use by default (``DEFAULT_PARAMS``: 64 MiB, 3 passes), so a hostile file costs at most
one ordinary unlock. Files written with stronger parameters need the bound raised:
``Passphrase(..., max_params=...)`` or ``$ENCFS_ARGON2_MAX_MEMORY_KIB``. The format's own
limits (``check``) still cap what any reader accepts."""

from __future__ import annotations

import getpass
import os
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from ..env import ARGON2_MAX_MEMORY_KIB, env_int
from ..errors import FormatError, KeyReferenceError
from ..format import Stanza
from ..kdf import derive_secret
from ..secret import SecretBytes
from .base import check_shape, open_stanza, seal_stanza
from .registry import RecipientType, register
from .sources import env_bytes, read_secret_file, wipe

TYPE = "passphrase"
SCHEME = "passphrase"
SALT_SIZE = 16
MAX_LANES = 16
MAX_ITERATIONS = 10
MAX_MEMORY_KIB = 1 << 20
MAX_WORK_KIB = 4 << 20
_PARAMS = struct.Struct(">16sIII")


@dataclass(frozen=True)
class Argon2Params:
    """RFC 9106's second recommended option by default: 64 MiB, 3 passes, 4 lanes."""

    memory_kib: int = 64 * 1024
    iterations: int = 3
    lanes: int = 4

    def check(self) -> None:
        """Bounds from docs/FORMAT.md: a hostile header must not buy unbounded memory or time."""
        if not 1 <= self.lanes <= MAX_LANES:
            raise FormatError(f"argon2 lanes {self.lanes} out of range [1, {MAX_LANES}]")
        if not 1 <= self.iterations <= MAX_ITERATIONS:
            raise FormatError(f"argon2 iterations {self.iterations} out of range [1, {MAX_ITERATIONS}]")
        if not 8 * self.lanes <= self.memory_kib <= MAX_MEMORY_KIB:
            raise FormatError(f"argon2 memory {self.memory_kib} KiB out of range [8*lanes, {MAX_MEMORY_KIB}]")
        if self.memory_kib * self.iterations > MAX_WORK_KIB:
            raise FormatError(f"argon2 memory x iterations {self.memory_kib * self.iterations} exceeds {MAX_WORK_KIB}")


DEFAULT_PARAMS = Argon2Params()


def _salt_and_params(stanza: Stanza) -> tuple[bytes, Argon2Params]:
    check_shape(stanza, 0, _PARAMS.size, f"empty key id and {_PARAMS.size} bytes of params")
    salt, m, t, lanes = _PARAMS.unpack(stanza.params)
    p = Argon2Params(m, t, lanes)
    p.check()
    return salt, p


def check_stanza(stanza: Stanza) -> None:
    """Empty key id, 28 bytes of params, Argon2id cost within the format's limits."""
    _salt_and_params(stanza)


class Passphrase:
    type = TYPE

    def __init__(
        self,
        passphrase: SecretBytes,
        source: str = "<memory>",
        params: Argon2Params | None = None,
        max_params: Argon2Params | None = None,
    ):
        if not len(passphrase):
            raise ValueError("empty passphrase")
        self._pass = passphrase
        self.source = source
        self.params = params or DEFAULT_PARAMS
        self.max_params = max_params

    def read_bound(self) -> Argon2Params:
        """The most a file may ask of this reader: ``max_params`` if given, else the larger of
        the writers' default and this passphrase's own write parameters, raised in memory by
        ``$ENCFS_ARGON2_MAX_MEMORY_KIB``."""
        if self.max_params is not None:
            return self.max_params
        d, own = DEFAULT_PARAMS, self.params
        memory = max(d.memory_kib, own.memory_kib, env_int(ARGON2_MAX_MEMORY_KIB, 0, 8))
        return Argon2Params(memory, max(d.iterations, own.iterations), max(d.lanes, own.lanes))

    def _check_affordable(self, p: Argon2Params) -> None:
        bound = self.read_bound()
        work = bound.memory_kib * bound.iterations
        if p.memory_kib > bound.memory_kib or p.memory_kib * p.iterations > work or p.lanes > bound.lanes:
            raise FormatError(
                f"passphrase stanza asks for Argon2id memory {p.memory_kib} KiB x {p.iterations} passes, "
                f"{p.lanes} lanes: more than this reader allows ({bound.memory_kib} KiB, {work} KiB x passes, "
                f"{bound.lanes} lanes); if the file is yours, raise the bound with max_params= or "
                f"${ARGON2_MAX_MEMORY_KIB}"
            )

    def _derive(self, salt: bytes, p: Argon2Params) -> SecretBytes:
        p.check()
        kdf = Argon2id(salt=salt, length=32, iterations=p.iterations, lanes=p.lanes, memory_cost=p.memory_kib)
        return derive_secret(kdf, self._pass.view(), 32)

    def wrap(self, file_key: SecretBytes, context: bytes) -> Stanza:
        salt = os.urandom(SALT_SIZE)
        p = self.params
        return seal_stanza(TYPE, b"", _PARAMS.pack(salt, p.memory_kib, p.iterations, p.lanes), self._derive(salt, p), file_key, context)

    def matches(self, stanza: Stanza) -> bool:
        return stanza.type == TYPE

    def unwrap(self, stanza: Stanza, context: bytes) -> SecretBytes | None:
        salt, p = _salt_and_params(stanza)
        self._check_affordable(p)
        return open_stanza(stanza, self._derive(salt, p), context)

    def wipe(self) -> None:
        self._pass.wipe()

    def __repr__(self) -> str:
        return f"<Passphrase #{id(self):x} from {self.source}>"


def _checked_passphrase(buf: bytearray, source: str) -> bytearray:
    """``buf`` if it is UTF-8 text (as a typed passphrase is); else wipe it and refuse."""
    valid = True
    try:
        str(buf, "utf-8")
    except UnicodeDecodeError:
        valid = False
    if valid:
        return buf
    wipe(buf)
    raise KeyReferenceError(f"{source}: passphrase is not UTF-8 text")


def _first_line_passphrase(buf: bytearray, source: str) -> bytearray:
    """The first line of ``buf`` (without its line break) as a new bytearray; ``buf`` is
    wiped. Refuses text that is not UTF-8 (it would not match a typed passphrase)."""
    problem = ""
    try:
        end = buf.find(b"\n")
        end = len(buf) if end < 0 else end
        if end and buf[end - 1] == 0x0D:
            end -= 1
        valid = True
        try:
            str(memoryview(buf)[:end], "utf-8")
        except UnicodeDecodeError:
            valid = False
        if not valid:
            problem = "passphrase is not UTF-8 text"
        else:
            return buf[:end]
    finally:
        wipe(buf)
    raise KeyReferenceError(f"{source}: {problem}")


def load_passphrase(value: str, ref: str) -> Passphrase:
    """``passphrase:env:NAME``, ``passphrase:file:PATH`` (first line) or ``passphrase:prompt``."""
    kind, _, arg = value.partition(":")
    if kind == "env":
        raw = _checked_passphrase(env_bytes(arg, ref), ref)
    elif kind == "file":
        raw = _first_line_passphrase(read_secret_file(arg, ref, "passphrase file"), ref)
    elif kind == "prompt" and not arg:
        raw = bytearray(getpass.getpass("encfs passphrase: ").encode("utf-8"))
    else:
        raise KeyReferenceError("malformed passphrase reference: use passphrase:env:NAME, passphrase:file:PATH or passphrase:prompt")
    if not raw:
        raise KeyReferenceError(f"{ref}: empty passphrase")
    return Passphrase(SecretBytes.take(raw), ref)


# At most one per header: a hostile header must not make a reader run Argon2id twice.
register(RecipientType(TYPE, (Passphrase,), check_stanza, schemes={SCHEME: load_passphrase}, max_per_header=1))
