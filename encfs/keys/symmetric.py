"""A shared 32-byte key (``encfs keygen``): both recipient and identity."""

from __future__ import annotations

import hmac
import os

from ..errors import FormatError
from ..format import Stanza
from ..secret import SecretBytes
from .base import hkdf32, open_stanza, seal_stanza

TYPE = "key"
KEY_ID_SIZE = 8


class SymmetricKey:
    type = TYPE

    def __init__(self, key: SecretBytes, source: str = "<memory>"):
        if len(key) != 32:
            raise ValueError("a symmetric key is 32 bytes")
        self._key = key
        self.source = source
        kid = hkdf32(key.view(), b"", b"encfs/v1 key-id")
        self.key_id = kid.bytes()[:KEY_ID_SIZE]
        kid.wipe()

    @classmethod
    def generate(cls) -> "SymmetricKey":
        return cls(SecretBytes(os.urandom(32)))

    @property
    def secret(self) -> SecretBytes:
        return self._key

    def _wrap_key(self, context: bytes) -> SecretBytes:
        return hkdf32(self._key.view(), context[12:28], b"encfs/v1 key-wrap")

    def wrap(self, file_key: SecretBytes, context: bytes) -> Stanza:
        return seal_stanza(TYPE, self.key_id, b"", self._wrap_key(context), file_key, context)

    def matches(self, stanza: Stanza) -> bool:
        return stanza.type == TYPE and hmac.compare_digest(stanza.key_id, self.key_id)

    def unwrap(self, stanza: Stanza, context: bytes) -> SecretBytes | None:
        if stanza.params or len(stanza.key_id) != KEY_ID_SIZE:
            raise FormatError("malformed key stanza: 8-byte key id and empty params expected")
        return open_stanza(stanza, self._wrap_key(context), context)

    def wipe(self) -> None:
        self._key.wipe()

    def __repr__(self) -> str:
        return f"<SymmetricKey id={self.key_id.hex()} from {self.source}>"
