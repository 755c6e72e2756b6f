"""The payload layer: C2SP chunked-encryption v1 instantiated as Cobblestone-256.

HKDF-Expand(SHA-512) derives a chunk key, a base nonce and a key commitment from the input
key, a random 24-byte salt and the caller's context; the message is cut into 16 KiB chunks,
each sealed with AES-256-GCM under ``base_nonce XOR index``. The final chunk is always shorter
than 16 KiB (possibly empty), so truncation at a chunk boundary is detectable, and every
offset is a pure function of the plaintext offset, which gives random access.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from .errors import FormatError, IntegrityError
from .kdf import derive_secret
from .secret import SecretBytes

CHUNK_SIZE = 16384
TAG_SIZE = 16
CT_CHUNK_SIZE = CHUNK_SIZE + TAG_SIZE
SALT_SIZE = 24
COMMITMENT_SIZE = 32
PAYLOAD_PREFIX_SIZE = SALT_SIZE + COMMITMENT_SIZE
KEY_SIZE = 32
NONCE_SIZE = 12
MAX_CHUNKS = 1 << 38
_INFO_PREFIX = b"c2sp.org/chunked-encryption@v1+AEAD_AES_256_GCM\x00"


@dataclass
class PayloadKeys:
    """What HKDF-Expand yields for one (input key, salt, context)."""

    key: SecretBytes
    base_nonce: bytes
    commitment: bytes

    def wipe(self) -> None:
        self.key.wipe()


def derive(input_key: memoryview | bytes, salt: bytes, context: bytes) -> PayloadKeys:
    if len(input_key) != KEY_SIZE:
        raise ValueError("input key must be 32 bytes")
    if len(salt) != SALT_SIZE:
        raise ValueError("salt must be 24 bytes")
    n = KEY_SIZE + NONCE_SIZE + COMMITMENT_SIZE
    okm = derive_secret(HKDFExpand(hashes.SHA512(), n, _INFO_PREFIX + salt + context), input_key, n)
    try:
        view = okm.view()
        return PayloadKeys(
            key=SecretBytes(view[:KEY_SIZE]),
            base_nonce=bytes(view[KEY_SIZE : KEY_SIZE + NONCE_SIZE]),  # public: as any GCM nonce
            commitment=bytes(view[KEY_SIZE + NONCE_SIZE :]),  # public: stored in the file
        )
    finally:
        okm.wipe()


def chunk_nonce(base_nonce: bytes, index: int) -> bytes:
    if not 0 <= index < MAX_CHUNKS:
        raise FormatError(f"chunk index {index} out of range")
    return (int.from_bytes(base_nonce, "big") ^ index).to_bytes(NONCE_SIZE, "big")


def chunk_count(plaintext_size: int) -> int:
    """Chunks in a message: full chunks plus one short (maybe empty) final chunk."""
    return plaintext_size // CHUNK_SIZE + 1


def payload_size(plaintext_size: int) -> int:
    return PAYLOAD_PREFIX_SIZE + plaintext_size + TAG_SIZE * chunk_count(plaintext_size)


def plaintext_size(payload_len: int) -> int:
    """Plaintext length implied by a payload length; a malformed length is a FormatError."""
    body = payload_len - PAYLOAD_PREFIX_SIZE
    if body < TAG_SIZE:
        raise FormatError(f"payload of {payload_len} bytes is too short to hold a final chunk (truncated file)")
    full, last = divmod(body, CT_CHUNK_SIZE)
    if last < TAG_SIZE:
        raise FormatError("payload ends on a chunk boundary: the final chunk is missing or full-size (truncated file)")
    if full + 1 > MAX_CHUNKS:
        raise FormatError("payload has more chunks than Cobblestone-256 allows")
    return full * CHUNK_SIZE + last - TAG_SIZE


def chunk_offset(index: int) -> int:
    """Offset of chunk ``index`` within the payload."""
    return PAYLOAD_PREFIX_SIZE + index * CT_CHUNK_SIZE


def span_chunk_count(ct_len: int) -> int:
    """Chunks in a run whose ciphertext is ``ct_len`` long (the last may be short)."""
    return -(-ct_len // CT_CHUNK_SIZE)


def span_plaintext_size(ct_len: int) -> int:
    """Plaintext bytes in a run of chunks whose ciphertext is ``ct_len`` long (last may be short)."""
    full, last = divmod(ct_len, CT_CHUNK_SIZE)
    if last and last < TAG_SIZE:
        raise FormatError("chunk shorter than its tag")
    return full * CHUNK_SIZE + (last - TAG_SIZE if last else 0)


def check_commitment(keys: PayloadKeys, commitment: bytes) -> None:
    if not hmac.compare_digest(keys.commitment, bytes(commitment)):
        raise IntegrityError("key commitment mismatch: wrong key, or header and payload do not belong together")


def encrypt(input_key: memoryview | bytes, plaintext: bytes, salt: bytes, context: bytes, backend=None) -> bytes:
    """One-shot encryption: ``salt || commitment || chunks``."""
    from .backend import get_backend

    keys = derive(input_key, salt, context)
    try:
        cipher = (backend or get_backend()).chunk_cipher(keys.key.view(), keys.base_nonce)
        out = bytearray(payload_size(len(plaintext)) - PAYLOAD_PREFIX_SIZE)
        try:
            cipher.encrypt_into(0, memoryview(plaintext), memoryview(out), final=True)
        finally:
            cipher.close()
        return salt + keys.commitment + bytes(out)
    finally:
        keys.wipe()


def decrypt(input_key: memoryview | bytes, payload: bytes, context: bytes, backend=None) -> bytes:
    """One-shot decryption of a whole payload; raises on any failed chunk."""
    from .backend import get_backend

    size = plaintext_size(len(payload))
    keys = derive(input_key, bytes(payload[:SALT_SIZE]), context)
    try:
        check_commitment(keys, payload[SALT_SIZE:PAYLOAD_PREFIX_SIZE])
        cipher = (backend or get_backend()).chunk_cipher(keys.key.view(), keys.base_nonce)
        out = bytearray(size)
        try:
            cipher.decrypt_into(0, memoryview(payload)[PAYLOAD_PREFIX_SIZE:], memoryview(out))
        finally:
            cipher.close()
        return bytes(out)
    finally:
        keys.wipe()
