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
_PARAMS = struct.Struct(">16sIII")


@dataclass(frozen=True)
class Argon2Params:
    """RFC 9106's second recommended option by default: 64 MiB, 3 passes, 4 lanes."""

    memory_kib: int = 64 * 1024
    iterations: int = 3
    lanes: int = 4

    def check(self) -> None:
        if not 1 <= self.lanes <= 64:
            raise FormatError(f"argon2 lanes {self.lanes} out of range [1, 64]")
        if not 1 <= self.iterations <= 64:
            raise FormatError(f"argon2 iterations {self.iterations} out of range [1, 64]")
        if not 8 * self.lanes <= self.memory_kib <= 4 * 1024 * 1024:
            raise FormatError(f"argon2 memory {self.memory_kib} KiB out of range [8*lanes, 4 GiB]")


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
        return f"<Passphrase from {self.source}>"
