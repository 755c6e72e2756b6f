"""Passphrase recipients: Argon2id (pyca/cryptography) derives the wrap key; its salt and
cost parameters travel in the stanza. A reader must run Argon2id before anything in the file
can be authenticated, so the cost a file may ask for is bounded on read: by default to what
writers use by default (``DEFAULT_PARAMS``: 64 MiB, 3 passes), so a hostile file costs at most
one ordinary unlock. Files written with stronger parameters need the bound raised:
``Passphrase(..., max_params=...)`` or ``$ENCFS_ARGON2_MAX_MEMORY_KIB``. The format's own
limits (``check``) still cap what any reader accepts.

**Cost per passphrase, not per file.** One ``Passphrase`` (one per key reference per
filesystem) runs Argon2id once per (salt, parameters) in its lifetime, not once per file:

* As a *writer* it draws one random salt and derives one wrap key on first use, and wraps
  every file key it is given under that wrap key (rotating to a fresh salt after
  ``MAX_WRAPS_PER_KEY`` wraps). Every stanza still carries the salt and parameters, so the
  format is unchanged and any reader derives the same key from the stanza alone.
* As a *reader* it keeps the wrap keys it derived, by (salt, memory, iterations, lanes), in
  locked memory (``SecretBytes``), at most ``CACHE_SIZE`` of them (least recently used
  evicted and wiped). ``wipe()`` wipes them all with the passphrase.

Why reusing one wrap key across files is sound: the wrap key is a deterministic function of
the passphrase, salt and parameters, so reusing it makes it an ordinary long-term symmetric
key under which only random 32-byte file keys are ever sealed (docs/FORMAT.md §1.2). Each
wrap draws a fresh random 96-bit nonce, and AES-GCM with random nonces is safe for up to
2**32 messages per key (NIST SP 800-38D); a writer rotates long before (``MAX_WRAPS_PER_KEY``).
Each wrap binds the file's context (magic, version, suite, random file id) and the stanza's
fields as AAD, so a stanza cannot be moved to another file or given other parameters. An
offline guesser gains nothing: recovering the passphrase from any one file already cost one
Argon2id run per guess, and the salt is still random per writer, so nothing can be
precomputed across writers or users. What does change: the files one writer wrote share a
salt, so a reader of the ciphertexts can tell they came from the same writer session; and
the wrap key in memory opens all of them, as the passphrase held beside it always could.

On read, a cached key is only a faster way to the same key: the AES-GCM tag still decides,
so a wrong passphrase caches wrong keys that open nothing (``NoMatchingKeyError``), at one
Argon2id run per distinct salt. The read bound is checked before the cache is consulted and
before any run; a stanza over it is refused and nothing is derived or cached for it.

Threads: one lock per ``Passphrase`` is held around the cache and the Argon2id run, so
threads opening files concurrently (DataLoader threads) derive each key once, and at most one
Argon2id run (its memory) is in flight per passphrase. After ``fork()`` the child gets a new
lock (``ForkLocal``) and keeps the cache: its keys sit in the secret arena, which encfs locks
again in the child (encfs/forking.py), and a DataLoader worker then opens files without
running Argon2id again. ``seal_stanza``/``open_stanza`` wipe the key they are given, so they
are handed a copy of the cached key, never the cached one."""

from __future__ import annotations

import getpass
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass

from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from ..env import ARGON2_MAX_MEMORY_KIB, env_int
from ..errors import FormatError, KeyReferenceError
from ..forking import ForkLocal
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
CACHE_SIZE = 64  # derived wrap keys a reader keeps (LRU)
MAX_WRAPS_PER_KEY = 1 << 20  # a writer draws a fresh salt after this many wraps (random nonces)
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
    """A passphrase recipient and identity. Argon2id runs once per (salt, parameters) for the
    life of the object (module docstring): one salt and wrap key for everything it writes, a
    bounded cache of the wrap keys it derived for reading; ``wipe()`` wipes them all."""

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
        self._lock: ForkLocal[threading.RLock] = ForkLocal(threading.RLock, initial=threading.RLock())
        self._cache: OrderedDict[tuple[bytes, Argon2Params], SecretBytes] = OrderedDict()
        self._writing: tuple[bytes, Argon2Params, SecretBytes] | None = None  # salt, params, wrap key
        self._wraps = 0  # under the writer's current salt

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
        """One Argon2id run (the caller holds the lock). Refuses once ``wipe()`` has run, even
        if it ran during the derivation (then the result is wiped, never kept)."""
        p.check()
        kdf = Argon2id(salt=salt, length=32, iterations=p.iterations, lanes=p.lanes, memory_cost=p.memory_kib)
        key = derive_secret(kdf, self._pass.view(), 32)
        if self._pass.wiped:
            key.wipe()
            raise ValueError("secret already wiped")
        return key

    def _read_key(self, salt: bytes, p: Argon2Params) -> SecretBytes:
        """A copy (the caller's to wipe) of the wrap key for ``salt`` and ``p``: the writer's
        own or a cached one if there is one, else derived once and cached."""
        with self._lock.get():
            w = self._writing
            if w is not None and w[0] == salt and w[1] == p:
                return SecretBytes(w[2].view())
            key = self._cache.get((salt, p))
            if key is None:
                key = self._derive(salt, p)
                self._cache[(salt, p)] = key
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)[1].wipe()
            else:
                self._cache.move_to_end((salt, p))
            return SecretBytes(key.view())

    def _write_key(self) -> tuple[bytes, Argon2Params, SecretBytes]:
        """This writer's salt, parameters and a copy of its wrap key: drawn and derived on
        first use, again when ``params`` changed or after ``MAX_WRAPS_PER_KEY`` wraps."""
        with self._lock.get():
            w, p = self._writing, self.params
            if w is None or w[1] != p or self._wraps >= MAX_WRAPS_PER_KEY:
                salt = os.urandom(SALT_SIZE)
                w, self._wraps = (salt, p, self._derive(salt, p)), 0
                if self._writing is not None:
                    self._writing[2].wipe()
                self._writing = w
            self._wraps += 1
            return w[0], w[1], SecretBytes(w[2].view())

    def wrap(self, file_key: SecretBytes, context: bytes) -> Stanza:
        salt, p, wrap_key = self._write_key()
        return seal_stanza(TYPE, b"", _PARAMS.pack(salt, p.memory_kib, p.iterations, p.lanes), wrap_key, file_key, context)

    def matches(self, stanza: Stanza) -> bool:
        return stanza.type == TYPE

    def unwrap(self, stanza: Stanza, context: bytes) -> SecretBytes | None:
        salt, p = _salt_and_params(stanza)
        self._check_affordable(p)
        return open_stanza(stanza, self._read_key(salt, p), context)

    def cached_keys(self) -> int:
        """How many derived wrap keys this passphrase holds (its writer's included)."""
        with self._lock.get():
            return len(self._cache) + (self._writing is not None)

    def wipe(self) -> None:
        """Wipe the passphrase and every wrap key derived from it."""
        self._pass.wipe()
        with self._lock.get():
            keys = list(self._cache.values()) + ([self._writing[2]] if self._writing is not None else [])
            self._cache.clear()
            self._writing = None
        for key in keys:
            key.wipe()

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
