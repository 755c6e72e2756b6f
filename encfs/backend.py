"""Cipher backends: who runs AES-256-GCM over a run of Cobblestone chunks.

A backend turns a chunk key and base nonce into a ``ChunkCipher`` that seals or opens a
contiguous run of chunks, starting at any chunk index, straight into a caller's buffer.
``python`` uses pyca/cryptography; ``native`` (native/, cffi + OpenSSL) releases the GIL
and runs chunks in parallel. Both produce identical bytes. ``ENCFS_BACKEND`` picks one
(``auto``, the default, prefers native when it is built).
"""

from __future__ import annotations

import os
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .cobblestone import CHUNK_SIZE, CT_CHUNK_SIZE, TAG_SIZE, chunk_nonce, span_plaintext_size
from .errors import EncfsError, IntegrityError


class ChunkCipher(Protocol):
    def decrypt_into(self, first_index: int, ciphertext: memoryview, out: memoryview) -> int:
        """Open chunks ``first_index..`` cut from ``ciphertext`` at 16400-byte steps (the last
        may be short) into ``out``; return plaintext bytes written. On a failed tag: zero ``out``
        from that chunk on and raise IntegrityError(chunk_index, verified_bytes)."""

    def encrypt_into(self, first_index: int, plaintext: memoryview, out: memoryview, final: bool) -> int:
        """Seal ``plaintext`` as chunks ``first_index..`` into ``out``; return bytes written.
        ``final`` makes the last (short, maybe empty) piece the message's final chunk;
        otherwise ``plaintext`` must be whole chunks."""

    def close(self) -> None: ...


class CipherBackend(Protocol):
    name: str

    def chunk_cipher(self, key: memoryview, base_nonce: bytes) -> ChunkCipher: ...


def split_plaintext(n: int, final: bool) -> int:
    """Chunks that ``n`` plaintext bytes make; validates the whole-chunk rule."""
    if final:
        return n // CHUNK_SIZE + 1
    if n % CHUNK_SIZE:
        raise ValueError("non-final plaintext must be whole chunks")
    return n // CHUNK_SIZE


class _PyChunkCipher:
    def __init__(self, key: memoryview, base_nonce: bytes):
        self._aead: AESGCM | None = AESGCM(key)
        self._base_nonce = base_nonce

    def decrypt_into(self, first_index: int, ciphertext: memoryview, out: memoryview) -> int:
        total = span_plaintext_size(len(ciphertext))
        if len(out) < total:
            raise ValueError("output buffer too small")
        aead = self._live()
        pos = 0
        for j, start in enumerate(range(0, len(ciphertext), CT_CHUNK_SIZE)):
            piece = ciphertext[start : start + CT_CHUNK_SIZE]
            try:
                pt = aead.decrypt(chunk_nonce(self._base_nonce, first_index + j), piece, None)
            except InvalidTag:
                out[pos:total] = bytes(total - pos)
                raise IntegrityError(
                    f"chunk {first_index + j} failed authentication",
                    chunk_index=first_index + j,
                    verified_bytes=pos,
                ) from None
            out[pos : pos + len(pt)] = pt
            pos += len(pt)
        return pos

    def encrypt_into(self, first_index: int, plaintext: memoryview, out: memoryview, final: bool) -> int:
        n = split_plaintext(len(plaintext), final)
        if len(out) < len(plaintext) + n * TAG_SIZE:
            raise ValueError("output buffer too small")
        aead = self._live()
        pos = 0
        for j in range(n):
            piece = plaintext[j * CHUNK_SIZE : (j + 1) * CHUNK_SIZE]
            ct = aead.encrypt(chunk_nonce(self._base_nonce, first_index + j), piece, None)
            out[pos : pos + len(ct)] = ct
            pos += len(ct)
        return pos

    def _live(self) -> AESGCM:
        if self._aead is None:
            raise ValueError("cipher is closed")
        return self._aead

    def close(self) -> None:
        self._aead = None


class PythonBackend:
    """AES-256-GCM through pyca/cryptography, one chunk at a time (holds the GIL)."""

    name = "python"

    def chunk_cipher(self, key: memoryview, base_nonce: bytes) -> ChunkCipher:
        return _PyChunkCipher(key, base_nonce)


_BACKENDS: dict[str, CipherBackend] = {}


def native_backend() -> CipherBackend | None:
    """The native backend, or None when the extension is not built."""
    try:
        from ._native_backend import NativeBackend
    except ImportError:
        return None
    return NativeBackend()


def get_backend(name: str | None = None) -> CipherBackend:
    name = (name or os.environ.get("ENCFS_BACKEND") or "auto").lower()
    if name in _BACKENDS:
        return _BACKENDS[name]
    if name == "python":
        backend: CipherBackend | None = PythonBackend()
    elif name in ("native", "auto"):
        backend = native_backend()
        if backend is None:
            if name == "native":
                raise EncfsError("native backend requested but encfs._native is not built (see README: libssl-dev)")
            backend = PythonBackend()
    else:
        raise EncfsError(f"unknown cipher backend {name!r}; expected auto, native or python")
    _BACKENDS[name] = backend
    return backend
