"""A shared 32-byte key (``encfs keygen``): both recipient and identity."""

from __future__ import annotations

import hmac
import os

from ..format import Stanza
from ..secret import SecretBytes
from .base import check_shape, hkdf32, open_stanza, seal_stanza
from .registry import RecipientType, register

TYPE = "key"
KEY_ID_SIZE = 8
KEY_FILE_PREFIX = "encfs-key-v1:"


def check_stanza(stanza: Stanza) -> None:
    check_shape(stanza, KEY_ID_SIZE, 0, "8-byte key id and empty params")


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
        check_stanza(stanza)
        return open_stanza(stanza, self._wrap_key(context), context)

    def wipe(self) -> None:
        self._key.wipe()

    def __repr__(self) -> str:
        return f"<SymmetricKey id={self.key_id.hex()} from {self.source}>"


# Named by key files only (``keyfile:``, ``env:``), so no scheme of its own.
register(RecipientType(TYPE, (SymmetricKey,), check_stanza, key_file_prefix=KEY_FILE_PREFIX, from_secret=SymmetricKey))
