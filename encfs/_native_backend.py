"""The ``native`` cipher backend: Cobblestone-256 chunk batches in C (encfs._native, cffi API
mode, OpenSSL 3 EVP AES-256-GCM), with the GIL released and chunks spread over threads.

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
from .cobblestone import CHUNK_SIZE, KEY_SIZE, NONCE_SIZE, span_chunk_count
from .errors import EncfsError, FormatError, IntegrityError
from .secret import SecretBytes

__all__ = ["NativeBackend", "NativeChunkCipher", "native_status"]

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
    return EncfsError(f"{what}: OpenSSL error (code {rc})")


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
    """Seals and opens runs of chunks under one chunk key (kept in locked memory until close).

    Every call holds the cipher in use for its duration (the C code reads the key from the
    pool's threads with the GIL released); ``close()`` refuses new calls at once and wipes the
    key only once the running ones have returned, so no thread ever keys a context from wiped
    or reused memory. SecureBuffers behind the input and output are pinned for the call (see
    ``securemem``), so releasing one mid-call waits instead of wiping under the writes."""

    __slots__ = ("_key", "_key_ptr", "_nonce", "_threads", "_min_chunks", "_inuse", "__weakref__")

    def __init__(self, key: memoryview | bytes, base_nonce: bytes, threads: int, min_chunks_per_thread: int):
        if len(key) != KEY_SIZE:
            raise ValueError("chunk key must be 32 bytes")
        if len(base_nonce) != NONCE_SIZE:
            raise ValueError("base nonce must be 12 bytes")
        self._inuse = 0
        self._key: SecretBytes | None = SecretBytes(key)
        self._key_ptr: Any = ffi.from_buffer("uint8_t[]", self._key.view())
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
                rc = lib.encfs_decrypt_chunks(
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
                rc = lib.encfs_pread_decrypt_chunks(
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
                rc = lib.encfs_encrypt_chunks(
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
        return f"<NativeChunkCipher threads={self._threads} {'closed' if self._key is None else 'open'}>"


class NativeBackend:
    """AES-256-GCM in C over OpenSSL.

    ``threads`` (default ``default_threads()``) caps the threads one batch uses; a batch gets
    one thread per ``min_chunks_per_thread`` chunks, so small spans never start threads.
    """

    name = "native"

    def __init__(self, threads: int | None = None, min_chunks_per_thread: int = MIN_CHUNKS_PER_THREAD):
        if threads is not None and threads < 1:
            raise ValueError("threads must be >= 1")
        if min_chunks_per_thread < 1:
            raise ValueError("min_chunks_per_thread must be >= 1")
        self.threads = min(threads, lib.ENCFS_MAX_THREADS) if threads else default_threads()
        self.min_chunks_per_thread = min_chunks_per_thread

    def chunk_cipher(self, key: memoryview, base_nonce: bytes) -> NativeChunkCipher:
        return NativeChunkCipher(key, base_nonce, self.threads, self.min_chunks_per_thread)


def native_status() -> dict[str, Any]:
    """What the native extension offers here: OpenSSL version, threads, memory locking."""
    return {
        "built": True,
        "openssl_version": ffi.string(lib.encfs_openssl_version()).decode(),
        "threads": default_threads(),
        "mlock_ok": bool(lib.encfs_mlock_probe()),
        "mlock_fallbacks": securemem.mlock_fallbacks(),
        "locked_bytes": securemem.locked_bytes(),
    }
