"""The ``native`` cipher backend: Cobblestone-256 chunk batches in C (encfs._native, cffi API
mode), with the GIL released and chunks spread over threads.

AES-256-GCM runs on Intel IPsec-MB where the build linked it in and the CPU supports it, on
OpenSSL 3 EVP otherwise (identical bytes). ``ENCFS_AES`` (``auto``, ``openssl``, ``ipsec-mb``)
forces one; an unknown value is a ConfigError, and ``ipsec-mb`` where it cannot run an
EncfsError, never a silent fallback. Each chunk cipher expands its key once (IPsec-MB's
precompute) into locked memory that every thread reads and ``close()`` wipes; the raw key is
not kept beside it.

Threads come from a persistent native pool (native/encfs_native.c): the caller's thread and
pool helpers claim groups of 8 chunks until none are left. Short spans run on fewer threads
(one per ``min_chunks_per_thread`` chunks); the ``auto`` backend (encfs.backend) leaves the
shortest to pyca/cryptography. Measurements: benchmarks/RESULTS.md, native/bench_native.py.

After ``fork()`` (``encfs.forking``) a child renews the lock that guards the ciphers' in-use
counts and sets the counts to zero (the calls they counted ran on the parent's other threads).
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Iterator
from typing import Any

from . import env, forking, securemem
from ._native import ffi, lib
from .backend import AES_ENV, AES_NAMES
from .cobblestone import CHUNK_SIZE, KEY_SIZE, NONCE_SIZE, span_chunk_count
from .errors import ConfigError, EncfsError, FormatError, IntegrityError
from .secret import SecretBytes

__all__ = ["AES_ENV", "AES_NAMES", "NativeBackend", "NativeChunkCipher", "aes_available", "aes_describe", "aes_impl", "native_status"]

_AES_CODES = {"auto": lib.ENCFS_AES_AUTO, "openssl": lib.ENCFS_AES_OPENSSL, "ipsec-mb": lib.ENCFS_AES_IPSEC_MB}
_AES_BY_CODE = {code: name for name, code in _AES_CODES.items()}

MIN_CHUNKS_PER_THREAD = 8
"""A thread gets at least one group (8 chunks, 128 KiB), the unit threads claim work in."""


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under ``taskset`` or a container's
    cpuset), not all the machine has: more threads than that only wait for each other."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads() -> int:
    """``ENCFS_THREADS`` when set (an integer >= 1, else ConfigError), else ``usable_cpus()``;
    at most ENCFS_MAX_THREADS."""
    return min(env.env_int(env.THREADS, usable_cpus(), 1), lib.ENCFS_MAX_THREADS)


def aes_available() -> list[str]:
    """The AES-256-GCM implementations this build can run on this CPU, fastest first."""
    return [name for name in ("ipsec-mb", "openssl") if lib.encfs_aes_available(_AES_CODES[name])]


def aes_impl(name: str | None = None) -> str:
    """The implementation ``name`` (default ``$ENCFS_AES``, else ``auto``) runs on here:
    ``ipsec-mb`` or ``openssl``. ConfigError for an unknown name, EncfsError for one that
    this build or CPU cannot run."""
    if name is None:
        name = env.env_choice(AES_ENV, "auto", AES_NAMES)
    elif name not in AES_NAMES:
        raise ConfigError(f"unknown AES implementation {name!r}; expected {', '.join(AES_NAMES)}")
    if name == "auto":
        return aes_available()[0] if aes_available() else "openssl"
    if not lib.encfs_aes_available(_AES_CODES[name]):
        why = "not linked into this build (install libipsec-mb-dev and rebuild)" if name == "ipsec-mb" else "not usable"
        raise EncfsError(f"AES implementation {name!r} requested ({AES_ENV}) but it is {why}, or this CPU lacks AES-NI/PCLMULQDQ")
    return name


def aes_describe(name: str) -> str:
    """What ``name`` runs as here, e.g. ``ipsec-mb 1.3.0 avx (...)`` or ``openssl 3.0.17 EVP``."""
    return ffi.string(lib.encfs_aes_describe(_AES_CODES[name])).decode()


def _error(rc: int, what: str) -> Exception:
    """The exception for a negative return code other than ENCFS_E_AUTH."""
    if rc == lib.ENCFS_E_FORMAT:
        return FormatError(f"{what}: malformed span (a chunk shorter than its tag, or non-final plaintext not whole chunks)")
    if rc == lib.ENCFS_E_RANGE:
        return FormatError(f"{what}: chunk index out of range (Cobblestone-256 allows 2**38 chunks)")
    if rc == lib.ENCFS_E_SPACE:
        return ValueError(f"{what}: output buffer too small")
    if rc == lib.ENCFS_E_OVERLAP:
        return ValueError(f"{what}: input and output buffers overlap")
    if rc == lib.ENCFS_E_ARG:
        return ValueError(f"{what}: invalid argument")
    if rc == lib.ENCFS_E_TRUNCATED:
        return FormatError(f"{what}: file shrank while reading (truncated inside the chunk span)")
    if rc == lib.ENCFS_E_UNAVAILABLE:
        return EncfsError(f"{what}: the AES implementation asked for cannot run here")
    return EncfsError(f"{what}: crypto library error (code {rc})")


def _opened(rc: int, first_index: int, failed: Any, os_error: Any, what: str) -> int:
    """Plaintext bytes from a decrypt call's return code, or its exception."""
    if rc >= 0:
        return rc
    if rc == lib.ENCFS_E_AUTH:
        bad = failed[0]
        raise IntegrityError(f"chunk {bad} failed authentication", chunk_index=bad, verified_bytes=(bad - first_index) * CHUNK_SIZE)
    if rc == lib.ENCFS_E_IO and os_error is not None:
        raise OSError(os_error[0], os.strerror(os_error[0]))
    raise _error(rc, what)


def _writable(out: Any) -> Any:
    try:
        return ffi.from_buffer("uint8_t[]", out, require_writable=True)
    except BufferError:
        raise TypeError("output buffer is read-only") from None


def _drop_views(*cdata: Any) -> None:
    """End the buffer exports taken by ``ffi.from_buffer`` now, not when a frame kept alive by
    a traceback is collected (SecureBuffer.exported() stays true, and a cycle holding both the
    export and its memoryview can crash CPython's collector in memory_dealloc)."""
    for c in cdata:
        if c is not None:
            ffi.release(c)


def _index(first_index: int) -> int:
    if first_index < 0:
        raise FormatError(f"chunk index {first_index} out of range")
    return first_index


_use_cond = threading.Condition(threading.Lock())
"""Guards every cipher's in-use count (held for a few instructions per call, never across one)."""
_ciphers: "weakref.WeakSet[NativeChunkCipher]" = weakref.WeakSet()


@forking.after_fork_in_child
def _renew_after_fork() -> None:
    """In a child after fork(): calls that were running on the parent's other threads do not
    exist here; a fresh lock, and in-use counts back to zero so close() cannot wait for them.
    (Runs after securemem's and secret's actions: this module imports both first.)"""
    global _use_cond
    _use_cond = threading.Condition(threading.Lock())
    for cipher in list(_ciphers):
        cipher._inuse = 0


class NativeChunkCipher:
    """Seals and opens runs of chunks under one chunk key, expanded once for its AES
    implementation into locked memory (kept until close).

    Every call holds the cipher in use for its duration (the C code reads the key from the
    pool's threads with the GIL released); ``close()`` refuses new calls at once and wipes the
    key only once the running ones have returned, so no thread ever keys a context from wiped
    or reused memory. SecureBuffers behind the input and output are pinned for the call (see
    ``securemem``), so releasing one mid-call waits instead of wiping under the writes."""

    __slots__ = ("_key", "_key_ptr", "_nonce", "_threads", "_min_chunks", "_inuse", "aes", "__weakref__")

    def __init__(self, key: memoryview | bytes, base_nonce: bytes, threads: int, min_chunks_per_thread: int, aes: str = "auto"):
        if len(key) != KEY_SIZE:
            raise ValueError("chunk key must be 32 bytes")
        if len(base_nonce) != NONCE_SIZE:
            raise ValueError("base nonce must be 12 bytes")
        self._inuse = 0
        code = _AES_CODES[aes_impl(aes)]
        self._key: SecretBytes | None = SecretBytes(bytes(lib.encfs_aes_key_size()))
        self._key_ptr: Any = ffi.from_buffer("uint8_t[]", self._key.view())
        raw = ffi.from_buffer("uint8_t[]", key)
        try:
            rc = lib.encfs_aes_key_init(self._key_ptr, raw, code)
        finally:
            ffi.release(raw)
        if rc < 0:
            ffi.release(self._key_ptr)
            self._key.wipe()
            self._key = None
            raise _error(rc, "key schedule")
        self.aes: str = _AES_BY_CODE[rc]
        self._nonce = ffi.new("uint8_t[]", bytes(base_nonce))
        self._threads = threads
        self._min_chunks = min_chunks_per_thread
        _ciphers.add(self)

    def _threads_for(self, nchunks: int) -> int:
        return max(1, min(self._threads, nchunks // self._min_chunks))

    def _enter(self) -> Any:
        """Count a call in and return the key pointer; ValueError when closed (or closing)."""
        with _use_cond:
            if self._key is None:
                raise ValueError("cipher is closed")
            self._inuse += 1
            return self._key_ptr

    def _leave(self) -> None:
        with _use_cond:
            self._inuse -= 1
            if not self._inuse:
                _use_cond.notify_all()

    @contextlib.contextmanager
    def _calling(self, *buffers: Any) -> Iterator[Any]:
        """``with cipher._calling(src, out) as key_ptr:`` the cipher held in use and the
        SecureBuffers behind ``buffers`` pinned for the block (one C call)."""
        key = self._enter()
        try:
            with securemem.pinning(*buffers):
                yield key
        finally:
            self._leave()

    def decrypt_into(self, first_index: int, ciphertext: memoryview, out: memoryview) -> int:
        """Open chunks ``first_index..`` from ``ciphertext`` into ``out`` (see backend.ChunkCipher).

        Sizes, index range and overlap are checked in C before any work is done."""
        with self._calling(ciphertext, out) as key:
            ct = dst = None
            try:
                ct = ffi.from_buffer("uint8_t[]", ciphertext)
                dst = _writable(out)
                failed = ffi.new("int64_t *")
                rc = lib.encfs_decrypt_chunks_ks(
                    key, self._nonce, _index(first_index), ct, len(ct), dst, len(dst), self._threads_for(span_chunk_count(len(ct))), failed
                )
            finally:
                _drop_views(ct, dst)
        return _opened(rc, first_index, failed, None, "decrypt")

    def pread_decrypt_into(self, fd: int, offset: int, first_index: int, ct_len: int, out: memoryview) -> int:
        """Read ``ct_len`` bytes of ciphertext at ``offset`` of ``fd`` (chunks ``first_index..``)
        and open them into ``out`` (see backend.ChunkCipher): the ciphertext goes straight into
        ``out`` and each chunk is opened from there into per-thread scratch, then copied back
        once verified, one cache-sized group at a time."""
        with self._calling(out) as key:
            dst = None
            try:
                dst = _writable(out)
                failed = ffi.new("int64_t *")
                err = ffi.new("int *")
                rc = lib.encfs_pread_decrypt_chunks_ks(
                    fd, offset, key, self._nonce, _index(first_index), ct_len, dst, len(dst), self._threads_for(span_chunk_count(ct_len)), failed, err
                )
            finally:
                _drop_views(dst)
        return _opened(rc, first_index, failed, err, "read")

    def encrypt_into(self, first_index: int, plaintext: memoryview, out: memoryview, final: bool) -> int:
        """Seal ``plaintext`` as chunks ``first_index..`` into ``out`` (see backend.ChunkCipher)."""
        with self._calling(plaintext, out) as key:
            pt = dst = None
            try:
                pt = ffi.from_buffer("uint8_t[]", plaintext)
                dst = _writable(out)
                nchunks = len(pt) // CHUNK_SIZE + (1 if final else 0)
                rc = lib.encfs_encrypt_chunks_ks(
                    key, self._nonce, _index(first_index), pt, len(pt), int(bool(final)), dst, len(dst), self._threads_for(nchunks)
                )
            finally:
                _drop_views(pt, dst)
        if rc < 0:
            raise _error(rc, "encrypt")
        return rc

    def close(self) -> None:
        """Refuse new calls, wait for running ones to return, then wipe the key copy; later
        calls raise ValueError. Idempotent."""
        with _use_cond:
            key, self._key = self._key, None
            _use_cond.wait_for(lambda: not self._inuse)
        if key is not None:
            ffi.release(self._key_ptr)
            self._key_ptr = None
            key.wipe()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"<NativeChunkCipher aes={self.aes} threads={self._threads} {'closed' if self._key is None else 'open'}>"


class NativeBackend:
    """AES-256-GCM in C over IPsec-MB or OpenSSL.

    ``threads`` (default ``default_threads()``) caps the threads one batch uses; a batch gets
    one thread per ``min_chunks_per_thread`` chunks, so small spans never start threads.
    ``aes`` (default ``$ENCFS_AES``, else ``auto``) picks the AES implementation, resolved
    here once: ``self.aes`` is ``ipsec-mb`` or ``openssl``.
    """

    name = "native"

    def __init__(self, threads: int | None = None, min_chunks_per_thread: int = MIN_CHUNKS_PER_THREAD, aes: str | None = None):
        if threads is not None and threads < 1:
            raise ValueError("threads must be >= 1")
        if min_chunks_per_thread < 1:
            raise ValueError("min_chunks_per_thread must be >= 1")
        self.threads = min(threads, lib.ENCFS_MAX_THREADS) if threads else default_threads()
        self.min_chunks_per_thread = min_chunks_per_thread
        self.aes = aes_impl(aes)

    def chunk_cipher(self, key: memoryview, base_nonce: bytes) -> NativeChunkCipher:
        return NativeChunkCipher(key, base_nonce, self.threads, self.min_chunks_per_thread, self.aes)


def native_status() -> dict[str, Any]:
    """What the native extension offers here: the AES implementation ``$ENCFS_AES`` selects and
    those available, OpenSSL version, threads, memory locking."""
    try:
        active = aes_impl()
        aes = {"aes": active, "aes_code_path": aes_describe(active)}
    except EncfsError as e:  # ConfigError included: doctor reports it rather than failing
        aes = {"aes": None, "aes_error": str(e)}
    return {
        "built": True,
        **aes,
        "aes_available": {name: aes_describe(name) for name in aes_available()},
        "aes_setting": os.environ.get(AES_ENV, "").strip() or "auto",
        "openssl_version": ffi.string(lib.encfs_openssl_version()).decode(),
        "threads": default_threads(),
        "mlock_ok": bool(lib.encfs_mlock_probe()),
        "mlock_fallbacks": securemem.mlock_fallbacks(),
        "locked_bytes": securemem.locked_bytes(),
    }
