"""Recipients wrap a file key into a stanza; identities unwrap it. Wrapping is AES-256-GCM
under a per-stanza wrap key, with a random nonce, bound (as AAD) to the file's context and
the stanza's type, key id and params."""

from __future__ import annotations

import os
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import FormatError
from ..format import Stanza
from ..kdf import derive_secret
from ..secret import SecretBytes

FILE_KEY_SIZE = 32
_NONCE = 12
BODY_SIZE = _NONCE + FILE_KEY_SIZE + 16


class Recipient(Protocol):
    """Can wrap a file key (encrypt-side)."""

    type: str

    def wrap(self, file_key: SecretBytes, context: bytes) -> Stanza: ...


class Identity(Protocol):
    """Can unwrap the file key from stanzas addressed to it (decrypt-side)."""

    type: str

    def matches(self, stanza: Stanza) -> bool: ...

    def unwrap(self, stanza: Stanza, context: bytes) -> SecretBytes | None:
        """The file key, or None when this stanza is not for this identity (auth failed)."""


def check_shape(stanza: Stanza, key_id_size: int, params_size: int, expected: str) -> None:
    """``FormatError`` unless the stanza's key id and params have the sizes its type fixes."""
    if len(stanza.key_id) != key_id_size or len(stanza.params) != params_size:
        raise FormatError(f"malformed {stanza.type} stanza: {expected} expected")


def hkdf32(ikm: memoryview | bytes, salt: bytes, info: bytes) -> SecretBytes:
    return derive_secret(HKDF(hashes.SHA256(), 32, salt=salt, info=info), ikm, 32)


def seal_stanza(type_: str, key_id: bytes, params: bytes, wrap_key: SecretBytes, file_key: SecretBytes, context: bytes) -> Stanza:
    """Wrap ``file_key`` under ``wrap_key`` (which this call wipes)."""
    try:
        placeholder = Stanza(type_, key_id, params, b"\x00")
        nonce = os.urandom(_NONCE)
        body = nonce + AESGCM(wrap_key.view()).encrypt(nonce, file_key.view(), placeholder.aad(context))
        return Stanza(type_, key_id, params, body)
    finally:
        wrap_key.wipe()


def open_stanza(stanza: Stanza, wrap_key: SecretBytes, context: bytes) -> SecretBytes | None:
    """Unwrap with ``wrap_key`` (which this call wipes); None if the tag does not verify."""
    try:
        if len(stanza.body) != BODY_SIZE:
            raise FormatError(f"{stanza.type} stanza body must be {BODY_SIZE} bytes, got {len(stanza.body)}")
        key = SecretBytes(bytes(FILE_KEY_SIZE))
        try:
            AESGCM(wrap_key.view()).decrypt_into(stanza.body[:_NONCE], stanza.body[_NONCE:], stanza.aad(context), key.view())
        except InvalidTag:
            key.wipe()
            return None
        except BaseException:
            key.wipe()
            raise
        return key
    finally:
        wrap_key.wipe()


def key_label(key: object) -> str:
    """How a loaded key shows in a header (``Stanza.label``): ``type:keyid-hex``, or its type
    alone for a type without ids (passphrase)."""
    kid = getattr(key, "key_id", b"")
    kind = getattr(key, "type", "?")
    return f"{kind}:{kid.hex()}" if isinstance(kid, bytes) and kid else str(kind)


def new_file_key() -> SecretBytes:
    return SecretBytes(os.urandom(FILE_KEY_SIZE))
