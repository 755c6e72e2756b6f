"""Opening a header, in the order docs/FORMAT.md §1.4 gives: fixed fields, sizes, stanzas
(``read_header``); the writer's signature where signers are trusted (``read_signed_header``);
the file key unwrapped and the header MAC checked (``unlock``); the
payload keys derived and their commitment checked (``open_header``). The reader, ``encfs
inspect`` and rewrap all open headers here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import cobblestone as cs
from . import format as fmt
from .errors import FormatError
from .keys import KeyRing
from .secret import SecretBytes

FIRST_READ = 4096
"""Bytes read first: a whole header and payload prefix in the common case, and the whole of
a small file (whose final chunk then needs no second read)."""

ReadAt = Callable[[int, int], bytes]
"""``read_at(offset, n)``: exactly ``n`` bytes of the ciphertext file at ``offset``."""


@dataclass
class OpenedHeader:
    header: fmt.Header
    keys: cs.PayloadKeys
    head: bytes
    """The bytes read while opening: the header and payload prefix, maybe more."""
    size: int
    """Plaintext size, from the ciphertext size and header length alone."""


def read_header(read_at: ReadAt, ciphertext_size: int) -> tuple[fmt.Header, bytes]:
    """The parsed header (MAC not yet checked) and the bytes read, which hold at least the
    header and the payload prefix. Sizes are checked before the stanzas are parsed."""
    head = read_at(0, min(ciphertext_size, FIRST_READ))
    length = fmt.parse_fixed_fields(head)
    need = length + cs.PAYLOAD_PREFIX_SIZE
    if ciphertext_size < need:
        raise FormatError("file too short for its header and payload prefix (truncated)")
    if len(head) < need:
        head += read_at(len(head), need - len(head))
    fmt.plaintext_size(ciphertext_size, length)
    return fmt.parse(head), head


def stored_commitment(header: fmt.Header, head: bytes) -> bytes:
    """The key commitment the payload prefix holds (not yet checked against any key)."""
    return bytes(head[header.length + cs.SALT_SIZE : header.length + cs.PAYLOAD_PREFIX_SIZE])


def read_signed_header(read_at: ReadAt, ciphertext_size: int, keyring: KeyRing) -> tuple[fmt.Header, bytes]:
    """``read_header``, then the stanza rules and, where the keyring trusts signers, the writer's
    signature (docs/FORMAT.md §1.4 steps 3-4): before any key is tried, so a forged file costs
    no KMS call and is never rewrapped for anyone."""
    header, head = read_header(read_at, ciphertext_size)
    keyring.check_signature(header, stored_commitment(header, head))
    return header, head


def unlock(header: fmt.Header, keyring: KeyRing) -> SecretBytes:
    """The file key, unwrapped by a configured identity, with the header MAC verified under it."""
    file_key = keyring.unwrap(header)
    try:
        fmt.verify(header, file_key)
    except BaseException:
        file_key.wipe()
        raise
    return file_key


def open_header(read_at: ReadAt, ciphertext_size: int, keyring: KeyRing) -> OpenedHeader:
    """Everything up to the chunks: header read and its writer's signature checked
    (``read_signed_header``), header authenticated, payload keys derived and their commitment
    checked (the caller wipes ``keys``)."""
    header, head = read_signed_header(read_at, ciphertext_size, keyring)
    prefix = head[header.length : header.length + cs.PAYLOAD_PREFIX_SIZE]
    file_key = unlock(header, keyring)
    try:
        keys = cs.derive(file_key.view(), prefix[: cs.SALT_SIZE], header.context)
    finally:
        file_key.wipe()
    try:
        cs.check_commitment(keys, prefix[cs.SALT_SIZE :])
    except BaseException:
        keys.wipe()
        raise
    return OpenedHeader(header, keys, head, fmt.plaintext_size(ciphertext_size, header.length))
