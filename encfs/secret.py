"""Key material held in page-locked memory that is overwritten when released."""

from __future__ import annotations

import atexit
import ctypes
import sys
import threading
import weakref
from typing import Tuple

from . import forking, securemem

_SIZE_CLASSES = (16, 32, 64, 128, 256, 512, 1024, 2048)
_SLAB_BYTES = 16384

_Array = ctypes.Array  # a c_ubyte array laid over one slot: the object that exports a secret's views
_Slot = Tuple[securemem.SecureBuffer, int, int]  # (buffer, offset, size class; 0: a buffer of its own)


def _refs(arr: object) -> int:
    return sys.getrefcount(arr)


def _calibrate() -> int:
    """References to a slot array held by exactly one local variable of the caller."""
    arr = (ctypes.c_ubyte * 1).from_buffer(bytearray(1))
    return _refs(arr)


_BASE_REFS = _calibrate()


class _Arena:
    """Slab allocator for secrets inside a few SecureBuffers (one mmap+mlock per 16 KiB slab,
    not per secret; secrets over 2 KiB get a buffer of their own).

    The slabs are ordinary live SecureBuffers, so a child after fork() locks them again
    (``securemem``: mlock is not inherited), which keeps keys in DataLoader workers locked.

    Each secret's memory is exported through its own ctypes array, and every view handed out
    holds a reference to that array. A wiped slot is reused only once no view of it is left
    (its array is back to one reference); until then it sits in quarantine, so a stale view
    can only ever read zeros, never a later secret.
    """

    def __init__(self) -> None:
        self._mutex = threading.RLock()
        self._free: dict[int, list[tuple[securemem.SecureBuffer, int]]] = {c: [] for c in _SIZE_CLASSES}
        self._quarantine: list[tuple[_Array, _Slot]] = []
        self._slabs: list[securemem.SecureBuffer] = []

    def renew_mutex(self) -> None:
        """A fresh mutex (in a child after fork(): the parent's may be held by a thread that
        does not exist there)."""
        self._mutex = threading.RLock()

    def alloc(self, n: int) -> tuple[_Array, _Slot]:
        size = next((c for c in _SIZE_CLASSES if c >= n), 0)
        if not size:
            buf = securemem.SecureBuffer(n)
            return (ctypes.c_ubyte * n).from_buffer(buf), (buf, 0, 0)
        with self._mutex:
            if self._quarantine:
                self._reap()
            free = self._free[size]
            if not free:
                slab = securemem.SecureBuffer(_SLAB_BYTES)
                self._slabs.append(slab)
                free.extend((slab, off) for off in range(_SLAB_BYTES - size, -1, -size))
            buf, off = free.pop()
        return (ctypes.c_ubyte * n).from_buffer(buf, off), (buf, off, size)

    def free(self, arr: _Array, slot: _Slot) -> None:
        """Zero a secret's memory; recycle its slot unless views of it are alive."""
        buf, off, size = slot
        if not size:
            buf.release()
            return
        securemem.cleanse(arr)
        with self._mutex:
            if _refs(arr) > _BASE_REFS + 1:  # +1: the caller's local, then our parameter
                self._quarantine.append((arr, slot))
            else:
                self._free[size].append((buf, off))

    def _reap(self) -> None:
        pending, self._quarantine = self._quarantine, []
        while pending:
            arr, slot = pending.pop()
            self.free(arr, slot)


_arena = _Arena()


@forking.after_fork_in_child
def _renew_after_fork() -> None:
    """The arena's mutex renewed in a child (after securemem's action: this module imports it
    first). Its slabs are SecureBuffers, which securemem has locked again by then."""
    _arena.renew_mutex()


class SecretBytes:
    """Fixed-size secret in locked memory; redacted repr, not picklable, wiped on ``wipe()``.

    The bytes live in a page-locked, dump-excluded slab (``encfs.securemem``), or in a
    ``bytearray`` when no such memory can be mapped. Python cannot promise that no copy of a
    secret ever exists (the ``cryptography`` objects keep their own), but the buffers encfs
    owns are zeroed when a file or filesystem closes and at exit.
    """

    __slots__ = ("_arr", "_slot", "_len", "_wiped", "__weakref__")
    _live: "weakref.WeakSet[SecretBytes]" = weakref.WeakSet()

    def __init__(self, data: bytes | bytearray | memoryview):
        src = memoryview(data).cast("B")
        self._len = n = src.nbytes
        self._wiped = False
        self._arr: _Array | bytearray = bytearray()
        self._slot: _Slot | None = None
        if n:
            try:
                self._arr, self._slot = _arena.alloc(n)
            except OSError:  # no memory could be mapped: keep the secret on the heap
                self._arr = bytearray(n)
            memoryview(self._arr).cast("B")[:] = src
        SecretBytes._live.add(self)

    @classmethod
    def take(cls, buf: bytearray) -> "SecretBytes":
        """Wrap ``buf`` and zero the caller's copy."""
        out = cls(buf)
        securemem.cleanse(buf)
        return out

    def __len__(self) -> int:
        return self._len

    @property
    def wiped(self) -> bool:
        return self._wiped

    def view(self) -> memoryview:
        if self._wiped:
            raise ValueError("secret already wiped")
        return memoryview(self._arr).cast("B")

    def bytes(self) -> bytes:
        """An immutable copy, for APIs that insist on ``bytes``. Prefer ``view()``."""
        return bytes(self.view())

    def wipe(self) -> None:
        """Zero in place; views handed out see zeros (their memory is never reused while they live)."""
        if self._wiped:
            return
        self._wiped = True
        arr, slot = self._arr, self._slot
        self._arr, self._slot = bytearray(), None
        if slot is None:
            securemem.cleanse(arr)
        else:
            _arena.free(arr, slot)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"<SecretBytes len={self._len} [redacted]>"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("key material is not picklable; pass a key reference (e.g. 'keyfile:/path')")

    def __del__(self) -> None:
        try:
            self.wipe()
        except Exception:
            pass


@atexit.register
def _wipe_all() -> None:
    for s in list(SecretBytes._live):
        s.wipe()
