"""Cipher backends: who runs AES-256-GCM over a run of Cobblestone chunks.

A backend turns a chunk key and base nonce into a ``ChunkCipher`` that seals or opens a
contiguous run of chunks, starting at any chunk index, straight into a caller's buffer.
``python`` uses pyca/cryptography; ``native`` (native/, cffi + OpenSSL) releases the GIL
and runs chunks in parallel. Both produce identical bytes. ``ENCFS_BACKEND`` picks one;
``auto``, the default, routes each call to whichever is faster for its length (below).
"""

from __future__ import annotations

from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import env, securemem
from .cobblestone import CHUNK_SIZE, CT_CHUNK_SIZE, TAG_SIZE, chunk_count, chunk_nonce, span_chunk_count, span_plaintext_size
from .errors import ConfigError, EncfsError, IntegrityError
from .forking import after_fork_in_child


class ChunkCipher(Protocol):
    def decrypt_into(self, first_index: int, ciphertext: memoryview, out: memoryview) -> int:
        """Open chunks ``first_index..`` cut from ``ciphertext`` at 16400-byte steps (the last
        may be short) into ``out``; return plaintext bytes written. On a failed tag: zero ``out``
        from that chunk on and raise IntegrityError(chunk_index, verified_bytes).

        Both backends open each chunk into private scratch and copy it to ``out`` only after
        its tag verified, so no reader of ``out`` (another thread, a shared array) ever sees a
        failed chunk's bytes, even while the call runs. A SecureBuffer behind ``out`` is
        pinned for the call (``securemem.pinning``): releasing it waits for the call."""

    def pread_decrypt_into(self, fd: int, offset: int, first_index: int, ct_len: int, out: memoryview) -> int | None:
        """Like ``decrypt_into``, reading the ``ct_len`` ciphertext bytes at ``offset`` of the
        file descriptor ``fd`` itself (the fd's position does not move). None: this cipher does
        not read files for spans this long, and the caller reads the ciphertext. A file that
        ends inside the span raises FormatError, a failed read OSError; either way ``out`` is
        zeroed."""

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
        return chunk_count(n)
    if n % CHUNK_SIZE:
        raise ValueError("non-final plaintext must be whole chunks")
    return n // CHUNK_SIZE


class _PyChunkCipher:
    """Opens each chunk into a private scratch buffer (one per call, so threads sharing a
    cipher never see each other's) and copies it to ``out`` only after its tag verified
    (``AESGCM.decrypt_into`` writes plaintext before it checks the tag)."""

    def __init__(self, key: memoryview, base_nonce: bytes):
        self._aead: AESGCM | None = AESGCM(key)
        self._base_nonce = base_nonce

    def decrypt_into(self, first_index: int, ciphertext: memoryview, out: memoryview) -> int:
        with securemem.pinning(ciphertext, out):
            return self._decrypt_into(first_index, ciphertext, out)

    def _decrypt_into(self, first_index: int, ciphertext: memoryview, out: memoryview) -> int:
        total = span_plaintext_size(len(ciphertext))
        if len(out) < total:
            raise ValueError("output buffer too small")
        aead = self._live()
        pos = 0
        buf = bytearray(min(CHUNK_SIZE, total))
        try:
            for j, start in enumerate(range(0, len(ciphertext), CT_CHUNK_SIZE)):
                piece = ciphertext[start : start + CT_CHUNK_SIZE]
                n = len(piece) - TAG_SIZE
                scratch = memoryview(buf)[:n]
                try:
                    aead.decrypt_into(chunk_nonce(self._base_nonce, first_index + j), piece, None, scratch)
                except InvalidTag:
                    out[pos:total] = bytes(total - pos)
                    raise IntegrityError(
                        f"chunk {first_index + j} failed authentication",
                        chunk_index=first_index + j,
                        verified_bytes=pos,
                    ) from None
                out[pos : pos + n] = scratch
                pos += n
        finally:
            securemem.cleanse(buf)
        return pos

    def pread_decrypt_into(self, fd: int, offset: int, first_index: int, ct_len: int, out: memoryview) -> None:
        return None

    def encrypt_into(self, first_index: int, plaintext: memoryview, out: memoryview, final: bool) -> int:
        with securemem.pinning(plaintext, out):
            return self._encrypt_into(first_index, plaintext, out, final)

    def _encrypt_into(self, first_index: int, plaintext: memoryview, out: memoryview, final: bool) -> int:
        n = split_plaintext(len(plaintext), final)
        if len(out) < len(plaintext) + n * TAG_SIZE:
            raise ValueError("output buffer too small")
        aead = self._live()
        pos = 0
        for j in range(n):
            piece = plaintext[j * CHUNK_SIZE : (j + 1) * CHUNK_SIZE]
            size = len(piece) + TAG_SIZE
            aead.encrypt_into(chunk_nonce(self._base_nonce, first_index + j), piece, None, out[pos : pos + size])
            pos += size
        return pos

    def _live(self) -> AESGCM:
        if self._aead is None:
            raise ValueError("cipher is closed")
        return self._aead

    def close(self) -> None:
        self._aead = None


class PythonBackend:
    """AES-256-GCM through pyca/cryptography, one chunk at a time, straight into the caller's
    buffer (``decrypt_into``; no transient plaintext objects). Holds the GIL."""

    name = "python"

    def chunk_cipher(self, key: memoryview, base_nonce: bytes) -> ChunkCipher:
        return _PyChunkCipher(key, base_nonce)


NATIVE_MIN_CHUNKS = 2
"""Spans this long (32 KiB) or longer go to the native backend under ``auto``, on any number of
threads: measured with native over IPsec-MB and over OpenSSL 3.0, one native thread beats the
python backend from 2 chunks on (a single chunk is a tie, left to python), and Python threads
over pyca/cryptography's GIL-releasing ``decrypt_into`` never win (benchmarks/RESULTS.md, "AES-256-GCM
implementations", backend routing; benchmarks/bench_aes.py)."""
BACKEND_NAMES = ("auto", "native", "python")
AES_ENV = env.AES
AES_NAMES = ("auto", "openssl", "ipsec-mb")
"""``ENCFS_AES`` picks the native backend's AES-256-GCM implementation (encfs._native_backend)."""


class _HybridCipher:
    """Routes each call to the backend that is faster for its length; identical bytes either way."""

    def __init__(self, small: ChunkCipher, large: ChunkCipher, min_chunks: int):
        self._small, self._large, self._min = small, large, min_chunks

    def decrypt_into(self, first_index: int, ciphertext: memoryview, out: memoryview) -> int:
        big = span_chunk_count(len(ciphertext)) >= self._min
        return (self._large if big else self._small).decrypt_into(first_index, ciphertext, out)

    def pread_decrypt_into(self, fd: int, offset: int, first_index: int, ct_len: int, out: memoryview) -> int | None:
        big = span_chunk_count(ct_len) >= self._min
        return (self._large if big else self._small).pread_decrypt_into(fd, offset, first_index, ct_len, out)

    def encrypt_into(self, first_index: int, plaintext: memoryview, out: memoryview, final: bool) -> int:
        big = len(plaintext) // CHUNK_SIZE >= self._min
        return (self._large if big else self._small).encrypt_into(first_index, plaintext, out, final)

    def close(self) -> None:
        self._small.close()
        self._large.close()


class AutoBackend:
    """``python`` for single chunks, ``native`` for longer spans (see NATIVE_MIN_CHUNKS)."""

    name = "auto"

    def __init__(self, native: CipherBackend, min_chunks: int = NATIVE_MIN_CHUNKS):
        self.native, self.python, self.min_chunks = native, PythonBackend(), min_chunks

    def chunk_cipher(self, key: memoryview, base_nonce: bytes) -> ChunkCipher:
        return _HybridCipher(self.python.chunk_cipher(key, base_nonce), self.native.chunk_cipher(key, base_nonce), self.min_chunks)

    def describe(self) -> str:
        return f"auto: native for spans >= {self.min_chunks} chunks, python below"


def pread_min_chunks(backend: CipherBackend) -> int | None:
    """The shortest span (in chunks) that ``backend`` reads from a file descriptor itself
    (``pread_decrypt_into``); None when it never does (the caller reads the ciphertext)."""
    if isinstance(backend, AutoBackend):
        return backend.min_chunks
    return 1 if backend.name == "native" else None


_BACKENDS: dict[tuple[str, str], CipherBackend] = {}
after_fork_in_child(_BACKENDS.clear)  # a child picks its own (its ENCFS_THREADS, e.g. 1 in DataLoader workers)


def native_backend() -> CipherBackend | None:
    """The native backend, or None when the extension is not built."""
    try:
        from ._native_backend import NativeBackend
    except ImportError:
        return None
    return NativeBackend()


def get_backend(name: str | None = None) -> CipherBackend:
    """The cipher backend ``name`` (default ``$ENCFS_BACKEND``, else ``auto``), made once per
    process and ``$ENCFS_AES`` setting. Bad ``ENCFS_BACKEND`` / ``ENCFS_NATIVE_MIN_CHUNKS`` /
    ``ENCFS_AES`` values are ``ConfigError``s (checked on every call, so a bad setting is
    reported, not silently ignored); ``ENCFS_AES=ipsec-mb`` where IPsec-MB cannot run is an
    EncfsError, not a fallback."""
    if name is None:
        name = env.env_choice(env.BACKEND, "auto", BACKEND_NAMES)
    else:
        name = str(name).strip().lower() or "auto"
        if name not in BACKEND_NAMES:
            raise ConfigError(f"unknown cipher backend {name!r}; expected {', '.join(BACKEND_NAMES)}")
    min_chunks = env.env_int(env.NATIVE_MIN_CHUNKS, NATIVE_MIN_CHUNKS, 0)
    aes = env.env_choice(AES_ENV, "auto", AES_NAMES)
    if (name, aes) in _BACKENDS:
        return _BACKENDS[(name, aes)]
    if name == "python":
        backend: CipherBackend | None = PythonBackend()
    else:
        native = native_backend()
        if native is None:
            if name == "native":
                raise EncfsError("native backend requested but encfs._native is not built (see README: libssl-dev)")
            backend = PythonBackend()
        elif name == "native" or min_chunks == 0:
            backend = native
        else:
            backend = AutoBackend(native, min_chunks)
    _BACKENDS[(name, aes)] = backend
    return backend
