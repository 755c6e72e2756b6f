"""Passphrase recipients: Argon2id (pyca/cryptography) derives the wrap key; its salt and
cost parameters travel in the stanza, bounded on read so a hostile header cannot demand
unbounded memory or time."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from ..errors import FormatError
from ..format import Stanza
from ..secret import SecretBytes
from .base import open_stanza, seal_stanza

TYPE = "passphrase"
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


class Passphrase:
    type = TYPE

    def __init__(self, passphrase: SecretBytes, source: str = "<memory>", params: Argon2Params | None = None):
        if not len(passphrase):
            raise ValueError("empty passphrase")
        self._pass = passphrase
        self.source = source
        self.params = params or DEFAULT_PARAMS

    def _derive(self, salt: bytes, p: Argon2Params) -> SecretBytes:
        p.check()
        kdf = Argon2id(salt=salt, length=32, iterations=p.iterations, lanes=p.lanes, memory_cost=p.memory_kib)
        return SecretBytes(kdf.derive(self._pass.view()))

    def wrap(self, file_key: SecretBytes, context: bytes) -> Stanza:
        salt = os.urandom(SALT_SIZE)
        p = self.params
        return seal_stanza(TYPE, b"", _PARAMS.pack(salt, p.memory_kib, p.iterations, p.lanes), self._derive(salt, p), file_key, context)

    def matches(self, stanza: Stanza) -> bool:
        return stanza.type == TYPE

    def unwrap(self, stanza: Stanza, context: bytes) -> SecretBytes | None:
        if len(stanza.params) != _PARAMS.size or stanza.key_id:
            raise FormatError("malformed passphrase stanza")
        salt, m, t, lanes = _PARAMS.unpack(stanza.params)
        return open_stanza(stanza, self._derive(salt, Argon2Params(m, t, lanes)), context)

    def wipe(self) -> None:
        self._pass.wipe()

    def __repr__(self) -> str:
        return f"<Passphrase #{id(self):x} from {self.source}>"
