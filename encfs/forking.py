"""What encfs does when a process forks (DataLoader workers use fork by default), in one place.

A child inherits the parent's memory but only the thread that called ``fork()``. So, in the
child, encfs must not wait on locks that another parent thread held, must not use threads,
pools or file offsets that belong to the parent, and must lock its key pages again (``mlock``
is not inherited). Two mechanisms, both here:

* **Eager actions**, run once in every child right after ``fork()``, in registration order
  (``after_fork_in_child``). Each module registers when first imported, and imports the
  modules it uses first, so what an action relies on is already renewed when it runs:

  1. this module: the lock behind ``ForkLocal`` renewed;
  2. ``encfs.securemem``: fresh locks (live buffers, pins, the lock-failure warning, the
     pure-Python memory's counters), pins of the parent's other threads dropped, every live
     locked SecureBuffer locked again (secret slabs and windows included);
  3. ``encfs.secret``: the secret arena's mutex renewed;
  4. ``encfs._native_backend`` (when built): the lock over native ciphers' in-use counts
     renewed, and the counts set to zero;
  5. ``encfs.backend``: the per-process backend cache emptied, so a child picks its own
     (with its own ``ENCFS_THREADS``: 1 in DataLoader workers by default).
* **A fork generation** (``generation()``), bumped in every child: objects that hold a
  per-process resource (an open file offset, a read-ahead thread, a lock shared by threads)
  remember the generation they were made in and rebuild the resource lazily, on first use in
  a newer one (``ForkLocal``): ``target.Target`` reopens its file, ``file.EncryptedReader``
  makes a fresh lock, ``window.PlaintextWindow`` a fresh read-ahead (the parent's pending
  fetch and its thread are dropped, never waited on).

The native library forgets its helper-thread pool in a child through its own
``pthread_atfork`` handler (native/encfs_native.c), since C code cannot call into this module.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Generic, TypeVar

T = TypeVar("T")

_actions: list[Callable[[], None]] = []
_generation = 0


def after_fork_in_child(action: Callable[[], None]) -> Callable[[], None]:
    """Run ``action`` in every child process right after ``fork()`` (usable as a decorator)."""
    _actions.append(action)
    return action


def generation() -> int:
    """How many forks separate this process from the one that imported encfs."""
    return _generation


def _in_child() -> None:
    global _generation
    _generation += 1
    for action in list(_actions):
        action()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_in_child)


class ForkLocal(Generic[T]):
    """A value made by ``factory`` once per process (``initial`` is this process's, if given):
    after a fork, the first ``get()`` in the child makes a new one (threads of the child wait
    for the first), and the parent's is dropped, never used."""

    def __init__(self, factory: Callable[[], T], initial: T | None = None):
        self._factory = factory
        self._value: T | None = initial
        self._gen = _generation if initial is not None else -1

    def get(self) -> T:
        if self._gen == _generation and self._value is not None:
            return self._value
        with _shared_lock:
            if self._gen != _generation or self._value is None:
                self._value, self._gen = self._factory(), _generation
            return self._value

    def peek(self) -> T | None:
        """The value if it belongs to this process, else None (nothing is made)."""
        return self._value if self._gen == _generation else None


_shared_lock = threading.RLock()  # re-entrant: a finalizer run by GC inside a factory may get() too


@after_fork_in_child
def _renew_shared_lock() -> None:
    global _shared_lock
    _shared_lock = threading.RLock()
