"""Page-locked buffers for key material and plaintext.

``SecureBuffer`` is an anonymous private mapping that is locked in RAM (``mlock``), left out of
core dumps (``MADV_DONTDUMP``) and wiped when released. It is an ``mmap.mmap``, so it exposes
the buffer protocol: ``memoryview(buf)``, ``numpy.frombuffer(buf, ...)`` and
``torch.frombuffer(buf, dtype=torch.uint8)`` all see the same memory, without copies.

*Release* has one meaning in this module: ``release()`` (also ``close()``, the context
manager's exit, and at exit for buffers still alive) wipes the bytes, unlocks them and hands
the pages back to the kernel (``MADV_DONTNEED``); a released buffer takes no new pins.

Release is safe while views are alive. The pages go back at once, but the address range
stays mapped until the object itself is garbage: every memoryview, NumPy array and tensor made
from the buffer holds a reference to it, so none can ever read unmapped memory; after release
they read zeros. (``torch.frombuffer`` holds a reference but no buffer export, which is why release never
unmaps eagerly.) Writes through such a view after release land in ordinary, unlocked memory.

Release is also safe while a call writes into the buffer. Whoever hands the buffer to code
that runs without the GIL (the native backend does, for every decrypt/encrypt into or out of
a SecureBuffer, found behind memoryviews and NumPy arrays by ``owner()``) pins it for the
call (``pin()``/``unpin()``, ``with buf.pinned():``). ``release()`` refuses new pins at once
(``pin()`` then raises ValueError) and waits for the pins held by other threads to drop before
it wipes, so no write can land after the wipe in pages that are no longer locked. A thread
that releases a buffer it has pinned itself does not wait (that would deadlock): the wipe
runs at its last unpin.

mlock is not inherited across ``fork()``: a child (a DataLoader worker) locks every live
locked buffer again, key slabs of ``encfs.secret`` included, and the locked-bytes count stays
what is locked there (a buffer that cannot be locked again leaves it and counts a fallback).

When locking fails (``RLIMIT_MEMLOCK`` too small) the memory is still used, unlocked; the
fallback is counted (``mlock_fallbacks()``) and warned about once per process. With the native
extension the locking, wiping and dump exclusion run in C (``OPENSSL_cleanse``); without it
(or with ``ENCFS_SECUREMEM=python``), through ``ctypes`` and libc, with the same API: the
memory backend (``_mem``) is the one place that does each.

After ``fork()`` this module's action (``encfs.forking``) runs before those of the modules
that use it: fresh locks, pins of the parent's other threads dropped, live locked buffers
locked again.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import mmap
import threading
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

from . import env, forking

PAGE_SIZE = mmap.PAGESIZE

__all__ = [
    "PAGE_SIZE",
    "SecureBuffer",
    "buffer_address",
    "cleanse",
    "locked_bytes",
    "mlock_fallbacks",
    "owner",
    "pin_all",
    "pinning",
    "unpin_all",
]


class _PyMemory:
    """Locking, wiping and dump exclusion through libc via ctypes, for when encfs._native is
    not built. The same methods as ``_NativeMemory``; addresses are page-aligned."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        for name in ("mlock", "munlock"):
            fn = getattr(self._libc, name)
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            fn.restype = ctypes.c_int
        self._libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self._libc.madvise.restype = ctypes.c_int
        self._mutex = threading.Lock()
        self.fallbacks = 0
        self.locked = 0

    def exclude_from_dumps(self, addr: int, n: int) -> None:
        """Leave the pages out of core dumps (``MADV_DONTDUMP``, where the OS has it)."""
        if hasattr(mmap, "MADV_DONTDUMP"):
            self._libc.madvise(addr, _page_round(n), mmap.MADV_DONTDUMP)

    def lock(self, addr: int, n: int) -> bool:
        """Exclude from core dumps and lock; False (a counted fallback) when mlock fails."""
        self.exclude_from_dumps(addr, n)
        ok = self._libc.mlock(addr, n) == 0
        with self._mutex:
            if ok:
                self.locked += _page_round(n)
            else:
                self.fallbacks += 1
        return ok

    def relock(self, addr: int, n: int) -> bool:
        """Lock pages the count already holds (a child after fork); on failure they leave it."""
        ok = self._libc.mlock(addr, n) == 0
        if not ok:
            with self._mutex:
                self.locked -= _page_round(n)
                self.fallbacks += 1
        return ok

    def wipe_and_unlock(self, addr: int, n: int, locked: bool) -> None:
        """Zero ``n`` bytes, then unlock them if they were locked."""
        ctypes.memset(addr, 0, n)
        if locked and self._libc.munlock(addr, n) == 0:
            with self._mutex:
                self.locked -= _page_round(n)

    def zero(self, addr: int, n: int) -> None:
        ctypes.memset(addr, 0, n)

    def mlock_fallbacks(self) -> int:
        return self.fallbacks

    def locked_bytes(self) -> int:
        return self.locked

    def renew_after_fork(self) -> None:
        self._mutex = threading.Lock()


class _NativeMemory:
    """Locking, wiping (``OPENSSL_cleanse``) and dump exclusion in encfs._native
    (native/encfs_native.c), whose counters are atomics in C."""

    def __init__(self, ffi: Any, lib: Any) -> None:
        self._ffi, self._lib = ffi, lib

    def _ptr(self, addr: int) -> Any:
        return self._ffi.cast("void *", addr)

    def exclude_from_dumps(self, addr: int, n: int) -> None:
        self._lib.encfs_exclude_from_dumps(self._ptr(addr), n)

    def lock(self, addr: int, n: int) -> bool:
        return bool(self._lib.encfs_secure_lock(self._ptr(addr), n))

    def relock(self, addr: int, n: int) -> bool:
        return bool(self._lib.encfs_secure_relock(self._ptr(addr), n))

    def wipe_and_unlock(self, addr: int, n: int, locked: bool) -> None:
        self._lib.encfs_secure_wipe_unlock(self._ptr(addr), n, int(locked))

    def zero(self, addr: int, n: int) -> None:
        self._lib.encfs_cleanse(self._ptr(addr), n)

    def mlock_fallbacks(self) -> int:
        return int(self._lib.encfs_mlock_fallbacks())

    def locked_bytes(self) -> int:
        return int(self._lib.encfs_locked_bytes())

    def renew_after_fork(self) -> None:
        pass  # the C counters are atomics, no lock to renew


def _page_round(n: int) -> int:
    return -(-n // PAGE_SIZE) * PAGE_SIZE


def _load_memory() -> _PyMemory | _NativeMemory:
    """The C helpers unless ``ENCFS_SECUREMEM=python`` (or the extension is not built); a value
    other than native/python is a ConfigError."""
    if env.env_choice(env.SECUREMEM, "native", ("native", "python")) == "native":
        try:
            from ._native import ffi, lib
        except ImportError:
            pass
        else:
            return _NativeMemory(ffi, lib)
    return _PyMemory()


_mem = _load_memory()
_warned = False
_warn_mutex = threading.Lock()


def _lock_failed() -> None:
    global _warned
    with _warn_mutex:
        if _warned:
            return
        _warned = True
    warnings.warn(
        "encfs: could not lock memory (mlock failed; RLIMIT_MEMLOCK too small?); secure buffers "
        "fall back to unlocked memory that may be swapped. Raise 'ulimit -l' to avoid this.",
        RuntimeWarning,
        stacklevel=3,
    )


def mlock_fallbacks() -> int:
    """How many times locking failed in this process and unlocked memory was used instead."""
    return _mem.mlock_fallbacks()


def locked_bytes() -> int:
    """Bytes encfs holds locked right now (whole pages)."""
    return _mem.locked_bytes()


def buffer_address(obj: Any) -> int:
    """Address of the first byte of a writable buffer (the export is dropped at once)."""
    anchor = ctypes.c_char.from_buffer(obj)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


def cleanse(obj: Any) -> None:
    """Zero a writable buffer in place (``OPENSSL_cleanse`` when the extension is built)."""
    n = memoryview(obj).nbytes
    if n:
        _mem.zero(buffer_address(obj), n)


class SecureBuffer(mmap.mmap):
    """``nbytes`` of page-aligned, zero-filled memory, locked and kept out of core dumps.

    Use as a context manager, or call ``release()`` (idempotent; also run at exit for buffers
    still alive). ``close()`` is the same as ``release()``. ``lock=False`` skips ``mlock`` (for
    large buffers that may exceed ``RLIMIT_MEMLOCK``) but still wipes and excludes from dumps.
    """

    __slots__ = ("_address", "_locked", "_released", "_pins_by_thread", "_release_at_last_unpin")

    def __new__(cls, nbytes: int, *, lock: bool = True) -> "SecureBuffer":
        if not isinstance(nbytes, int) or nbytes <= 0:
            raise ValueError("nbytes must be a positive int")
        self = super().__new__(cls, -1, nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._released = False  # release() was called: no new pins (the wipe may wait for old ones)
        self._locked = False  # the pages are mlocked and counted in locked_bytes()
        self._pins_by_thread: dict[int, int] = {}  # thread ident -> pins it holds
        self._release_at_last_unpin = False  # released by a thread that had pinned it
        self._address = buffer_address(self)
        if lock:
            self._locked = _mem.lock(self._address, nbytes)  # excluded from core dumps too
            if not self._locked:
                _lock_failed()
        else:
            _mem.exclude_from_dumps(self._address, nbytes)
        with _live_mutex:
            _live.add(self)
        return self

    @property
    def nbytes(self) -> int:
        return len(self)

    @property
    def locked(self) -> bool:
        return self._locked

    @property
    def released(self) -> bool:
        return self._released

    def zero(self) -> None:
        """Wipe the contents, keeping the buffer usable."""
        if not self._released:
            _mem.zero(self._address, len(self))

    def release(self) -> None:
        """Wipe, unlock and return the pages; views still alive read zeros from then on.

        Waits for pins held by other threads (calls writing into the buffer) to drop first;
        when this thread holds a pin itself, the wipe runs at its last unpin instead."""
        with _pin_cond:
            if self._released:
                return
            self._released = True  # no new pins from here on
            if self._pins_by_thread.get(threading.get_ident()):
                self._release_at_last_unpin = True
                return
            _pin_cond.wait_for(lambda: not self._pins_by_thread)
        self._wipe_unlock_return_pages()

    def _wipe_unlock_return_pages(self) -> None:
        """What ``release()`` does once no pin is left."""
        _mem.wipe_and_unlock(self._address, len(self), self._locked)
        self._locked = False
        with contextlib.suppress(OSError, ValueError, AttributeError):
            mmap.mmap.madvise(self, mmap.MADV_DONTNEED)
        with _live_mutex:
            _live.discard(self)

    def pin(self) -> None:
        """Mark the buffer in use by this thread (a call writing or reading it without the
        GIL); ``release()`` waits for it. ValueError once released. Pair with ``unpin()``."""
        me = threading.get_ident()
        with _pin_cond:
            if self._released:
                raise ValueError("SecureBuffer is released")
            self._pins_by_thread[me] = self._pins_by_thread.get(me, 0) + 1

    def unpin(self) -> None:
        """Drop one pin of this thread; the last one lets a waiting or deferred release wipe."""
        me = threading.get_ident()
        with _pin_cond:
            pins = self._pins_by_thread
            left = pins.get(me, 0) - 1
            if left < 0:
                raise ValueError("SecureBuffer is not pinned by this thread")
            if left:
                pins[me] = left
            else:
                del pins[me]
            release_now = self._release_at_last_unpin and not pins
            if release_now:
                self._release_at_last_unpin = False
            if not pins:
                _pin_cond.notify_all()
        if release_now:
            self._wipe_unlock_return_pages()

    @contextlib.contextmanager
    def pinned(self) -> Iterator["SecureBuffer"]:
        """``with buf.pinned():`` pin for the block (see ``pin``)."""
        self.pin()
        try:
            yield self
        finally:
            self.unpin()

    close = release

    def resize(self, newsize: int) -> None:
        raise TypeError("SecureBuffer cannot be resized")

    def exported(self) -> bool:
        """Whether buffer-protocol views (memoryview, NumPy) of this buffer are alive.

        ``torch.frombuffer`` tensors hold no export and are not seen here.
        """
        if self._released:
            return False
        try:
            mmap.mmap.resize(self, len(self))  # refuses with BufferError while exports exist
        except BufferError:
            return True
        except (OSError, SystemError, ValueError):
            pass
        return False

    def __enter__(self) -> "SecureBuffer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __reduce__(self) -> Any:
        raise TypeError("SecureBuffer is not picklable")

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "released" if self._released else ("locked" if self._locked else "unlocked")
        return f"<SecureBuffer nbytes={len(self)} {state}>"


_live: "weakref.WeakSet[SecureBuffer]" = weakref.WeakSet()
_live_mutex = threading.Lock()
_pin_cond = threading.Condition(threading.Lock())


def owner(obj: Any, depth: int = 8) -> SecureBuffer | None:
    """The SecureBuffer whose memory ``obj`` exposes, looking through memoryviews
    (``.obj``) and NumPy arrays (``.base``), nested up to ``depth`` deep; None if none.
    (A ``torch.frombuffer`` tensor keeps no such link and is not found.)"""
    for _ in range(depth):
        if isinstance(obj, SecureBuffer):
            return obj
        nxt = obj.obj if isinstance(obj, memoryview) else getattr(obj, "base", None)
        if nxt is None or nxt is obj:
            return None
        obj = nxt
    return None


def pin_all(*objs: Any) -> list[SecureBuffer]:
    """Pin the SecureBuffers behind ``objs`` (see ``owner``); give the list to ``unpin_all``.
    ValueError (nothing left pinned) when one of them is released."""
    pinned: list[SecureBuffer] = []
    try:
        for obj in objs:
            buf = owner(obj)
            if buf is not None:
                buf.pin()
                pinned.append(buf)
    except BaseException:
        unpin_all(pinned)
        raise
    return pinned


def unpin_all(bufs: list[SecureBuffer]) -> None:
    """Undo ``pin_all``."""
    for buf in bufs:
        buf.unpin()


@contextlib.contextmanager
def pinning(*objs: Any) -> Iterator[None]:
    """``with pinning(src, out):`` the SecureBuffers behind ``objs`` stay pinned (not
    released under a call that reads or writes them) for the block."""
    bufs = pin_all(*objs)
    try:
        yield
    finally:
        unpin_all(bufs)


@forking.after_fork_in_child
def _renew_after_fork() -> None:
    """In a child after fork(): fresh locks (one held by another thread at fork() would stay
    held forever), pins of threads that do not exist here dropped, and live locked buffers
    locked again (mlock is not inherited) so key pages stay out of swap in workers. Registered
    when encfs.securemem is first imported, so it runs before the actions of the modules that
    use it (encfs.secret, encfs._native_backend)."""
    global _live_mutex, _warn_mutex, _pin_cond
    _live_mutex, _warn_mutex = threading.Lock(), threading.Lock()
    _pin_cond = threading.Condition(threading.Lock())
    _mem.renew_after_fork()
    me = threading.get_ident()
    failed = False
    for buf in list(_live):
        mine = buf._pins_by_thread.get(me)
        buf._pins_by_thread = {me: mine} if mine else {}
        if buf._released:
            if buf._release_at_last_unpin and not mine:
                buf._release_at_last_unpin = False
                buf._wipe_unlock_return_pages()
            continue
        if buf._locked and not _mem.relock(buf._address, len(buf)):
            buf._locked = False
            failed = True
    if failed:
        _lock_failed()


@atexit.register
def _release_all() -> None:
    with _live_mutex:
        bufs = list(_live)
    for buf in bufs:
        buf.release()
