"""A per-process pool of locked batch buffers, wiped between uses.

Mapping, locking and wiping fresh memory for every batch was the main remaining cost of
``read_batch``/``read_records``. ``BufferPool`` keeps a few ``SecureBuffer``s per size class
(sizes rounded up to at most 1/8 more than asked, so a steady batch size always finds its
class) and hands them out again, under three rules:

- **Wiped when returned.** A buffer is zeroed (``cleanse``) the moment it comes back: when
  its batch is closed, or when the last view of it is garbage.
- **Never reused while a view may be alive.** Batches hand out their plaintext only through
  the array ``BufferPool.lease`` returns (a NumPy array over the buffer: NumPy views, memoryviews and tensors made
  from it with ``torch.from_numpy`` all keep it alive and hold a buffer export). When that
  array is garbage the buffer is wiped and *quarantined*; the pool takes it back only once
  ``SecureBuffer.exported()`` is False and nothing but the pool refers to it (a reference
  count). Caveat: ``torch.frombuffer(lease.buffer)`` made by hand holds a reference to the
  buffer but no export; the reference count still sees it, but a pointer kept outside
  Python (a C extension's raw ``data_ptr``) cannot be seen by anything: do not keep one past
  the batch.
- **Bounded, and within RLIMIT_MEMLOCK where it can.** Idle buffers total at most
  ``max_idle_bytes`` (64 MiB); beyond that a returned buffer is released (wiped, unlocked, pages
  given back). A fresh buffer is locked only when it fits in what ``RLIMIT_MEMLOCK`` leaves
  (minus a reserve for keys and read windows), idle locked buffers of other sizes released
  first to make room; a batch larger than that is used unlocked
  (still wiped and kept out of core dumps), counted in ``unlocked`` and warned about once.

One pool per process (``pool()``, a ``ForkLocal``): a forked DataLoader worker starts with an
empty pool of its own and never touches the parent's buffers.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import threading
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np

from encfs import forking, securemem
from encfs.forking import ForkLocal
from encfs.securemem import PAGE_SIZE, SecureBuffer

__all__ = ["BufferPool", "Lease", "pool", "size_class"]

MEMLOCK_RESERVE = 1 << 20
"""Locked bytes left to keys, key slabs and read windows when the pool decides to lock."""


def size_class(nbytes: int) -> int:
    """``nbytes`` rounded up to whole pages, then to one of 8 steps per power of two."""
    pages = max(1, -(-nbytes // PAGE_SIZE))
    if pages > 8:
        step = 1 << (pages.bit_length() - 4)  # 8 steps between 2^k and 2^(k+1) pages
        pages = -(-pages // step) * step
    return pages * PAGE_SIZE


def memlock_limit() -> int | None:
    """This process's soft RLIMIT_MEMLOCK in bytes, or None when unlimited/unknown."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    except (OSError, ValueError, AttributeError):
        return None
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _refcounts(items: list) -> list[int]:
    """Reference counts of ``items`` seen from here (one shape of call, calibrated below)."""
    return [sys.getrefcount(x) for x in items]


_HELD_BY_LIST_ONLY = _refcounts([object()])[0]
"""The count ``_refcounts`` reports for an object that only its list refers to."""


class Lease:
    """One buffer handed out by the pool (``buffer``, at least ``nbytes``), together with the
    uint8 array over its first ``nbytes`` that ``BufferPool.lease`` returns beside it. Hand out
    plaintext only through that array (or views of it): when the array and all its views are
    garbage, the buffer is wiped and goes back to the pool. ``wipe()`` zeroes it at once (views
    read zeros) and drops this lease's own reference to the buffer."""

    __slots__ = ("buffer", "nbytes", "_wiped")

    def __init__(self, buffer: SecureBuffer, nbytes: int):
        self.buffer: SecureBuffer | None = buffer
        self.nbytes = nbytes
        self._wiped = False

    def wipe(self) -> None:
        """Zero the buffer now; it returns to the pool once its views are gone."""
        buf, self.buffer = self.buffer, None
        if not self._wiped and buf is not None and not buf.released:
            buf.zero()
        self._wiped = True

    @property
    def wiped(self) -> bool:
        return self._wiped


class BufferPool:
    """Locked buffers by size class, reused once wiped and unreferenced (module docstring).

    ``max_idle_bytes``: most bytes kept idle for reuse (default 64 MiB; locked or not: what
    is locked is bounded by the lock decision, which leaves ``MEMLOCK_RESERVE`` of
    RLIMIT_MEMLOCK to keys and read windows). Counters:
    ``maps`` (fresh buffers made), ``reuses``, ``unlocked`` (fresh buffers that could not be
    locked within the limit), ``dropped`` (returned buffers released instead of kept)."""

    def __init__(self, max_idle_bytes: int | None = None, *, lock_limit: int | None = -1):
        limit = memlock_limit() if lock_limit == -1 else lock_limit
        self.lock_limit = limit
        self.max_idle_bytes = int(64 << 20 if max_idle_bytes is None else max_idle_bytes)
        self._free: dict[int, list[SecureBuffer]] = {}
        self._idle_bytes = 0
        self._quarantine: list[SecureBuffer] = []
        self._mutex = threading.RLock()  # a finalizer may run (cyclic GC) while this thread holds it
        self._generation = forking.generation()
        self._warned = False
        self._made: "weakref.WeakSet[SecureBuffer]" = weakref.WeakSet()
        self.maps = self.reuses = self.unlocked = self.dropped = 0

    # -- handing out ----------------------------------------------------------------------------

    def lease(self, nbytes: int) -> tuple[np.ndarray, Lease]:
        """A zeroed buffer of at least ``nbytes`` (reused when one of its class is free): the
        uint8 array over its first ``nbytes`` (the only handle to give out) and its ``Lease``."""
        n = max(1, int(nbytes))
        buf = self._take(n)
        lease = Lease(buf, n)
        array = np.frombuffer(buf, np.uint8, count=n)
        weakref.finalize(array, self._array_gone, buf, lease).atexit = False  # securemem wipes at exit
        return array, lease

    @contextlib.contextmanager
    def scratch(self, nbytes: int) -> Iterator[SecureBuffer]:
        """``with pool.scratch(n) as buf:`` a buffer for the block, wiped and returned after it.
        Views of it must not outlive the block (they would keep it out of reuse)."""
        buf = self._take(max(1, int(nbytes)))
        try:
            yield buf
        finally:
            self.give_back(buf)

    def _take(self, nbytes: int) -> SecureBuffer:
        size = size_class(nbytes)
        with self._mutex:
            self._drain_quarantine()
            free = self._free.get(size)
            while free:
                buf = free.pop()
                self._idle_bytes -= size
                if buf.released:  # released behind the pool's back (securemem's release of everything)
                    continue
                self.reuses += 1
                return buf
            lock = self._fits(size) or self._evict_locked(size)
            self.maps += 1
            if not lock:
                self.unlocked += 1
        if not lock:
            self._warn_unlocked(size)
        buf = SecureBuffer(size, lock=lock)
        self._made.add(buf)
        return buf

    def owns(self, buf: SecureBuffer) -> bool:
        """Whether ``buf`` was made by this pool (wipe it with ``zero()``, never ``release()``:
        it comes back by itself once its views are gone)."""
        return buf in self._made

    def _fits(self, size: int) -> bool:
        return self.lock_limit is None or securemem.locked_bytes() + size + MEMLOCK_RESERVE <= self.lock_limit

    def _evict_locked(self, size: int) -> bool:
        """Release idle locked buffers of other classes until ``size`` fits the lock limit;
        whether it fits then. Caller holds the mutex."""
        if self.lock_limit is None or size + MEMLOCK_RESERVE > self.lock_limit:
            return False
        for cls in sorted(self._free, reverse=True):
            free = self._free[cls]
            for buf in [b for b in free if b.locked]:
                if self._fits(size):
                    return True
                free.remove(buf)
                self._idle_bytes -= cls
                self.dropped += 1
                buf.release()
        return self._fits(size)

    def _warn_unlocked(self, size: int) -> None:
        if self._warned:
            return
        self._warned = True
        warnings.warn(
            f"encfs: a {size}-byte batch buffer does not fit in RLIMIT_MEMLOCK ({self.lock_limit} bytes, "
            f"{securemem.locked_bytes()} locked already); it is used unlocked (still wiped and kept out of "
            "core dumps). Raise 'ulimit -l' or use smaller batches to keep batches locked.",
            RuntimeWarning,
            stacklevel=4,
        )

    # -- taking back ----------------------------------------------------------------------------

    def give_back(self, buf: SecureBuffer) -> None:
        """Wipe ``buf`` now and take it back once nothing refers to it."""
        if not buf.released:
            buf.zero()
        if self._generation != forking.generation():
            return  # a parent's pool seen from a forked child: its lock may be held forever
        with self._mutex:
            self._quarantine.append(buf)
            self._drain_quarantine()

    def _array_gone(self, buf: SecureBuffer, lease: Lease) -> None:
        """Finalizer of a lease's array: wipe (unless already wiped) and quarantine. The dying
        array's export is dropped just after this runs, so the buffer waits for the next drain."""
        if not lease.wiped and not buf.released:
            buf.zero()
        if self._generation != forking.generation():
            return  # a parent's pool seen from a forked child: its lock may be held forever
        with self._mutex:
            self._quarantine.append(buf)

    def _drain_quarantine(self) -> None:
        """Move quarantined buffers nothing else refers to (no export, no reference) to the
        free lists, or release them when the idle budget is full. Caller holds the mutex."""
        if not self._quarantine:
            return
        waiting, self._quarantine = self._quarantine, []
        counts = _refcounts(waiting)
        for i in range(len(waiting)):
            buf = waiting[i]
            if buf.released:
                continue
            if counts[i] > _HELD_BY_LIST_ONLY or buf.exported():
                self._quarantine.append(buf)
                continue
            size = len(buf)
            if self._idle_bytes + size <= self.max_idle_bytes:
                self._free.setdefault(size, []).append(buf)
                self._idle_bytes += size
            else:
                self.dropped += 1
                buf.release()

    def trim(self) -> None:
        """Release every idle buffer (wiped, unlocked, pages given back)."""
        with self._mutex:
            self._drain_quarantine()
            bufs = [b for free in self._free.values() for b in free]
            self._free, self._idle_bytes = {}, 0
        for b in bufs:
            b.release()

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes

    def stats(self) -> dict[str, Any]:
        """Counters and sizes, for tests and benchmarks."""
        with self._mutex:
            self._drain_quarantine()
            return {
                "maps": self.maps,
                "reuses": self.reuses,
                "unlocked": self.unlocked,
                "dropped": self.dropped,
                "idle_bytes": self._idle_bytes,
                "quarantined": len(self._quarantine),
                "max_idle_bytes": self.max_idle_bytes,
                "lock_limit": self.lock_limit,
            }


_POOL: ForkLocal[BufferPool] = ForkLocal(BufferPool)


def pool() -> BufferPool:
    """This process's pool (a forked child gets a fresh, empty one on first use)."""
    return _POOL.get()
