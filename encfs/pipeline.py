"""Bounded background calls: a writer hands each block's write (or upload) to another thread
and goes on encrypting the next block, so that encryption and I/O overlap.

At most ``depth`` calls are waiting or running, so the caller knows which of its buffers are
still in use (with ``depth=1`` and two buffers, the one it fills next is never the one being
written). ``ordered``: the calls run one at a time, in the order given, on a thread of this
pipeline's own (started on the first ``put``: small files never start one); otherwise on the
I/O pool, several at once (S3 parts). A failed call is raised by the next ``put`` or by
``drain``.
"""

from __future__ import annotations

import contextlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from .remote import finish, submit

T = TypeVar("T")


class Pipeline:
    def __init__(self, depth: int = 1, name: str = "encfs-pipeline", ordered: bool = True):
        self.depth = max(1, depth)
        self.name, self.ordered = name, ordered
        self._pending: deque[Future[Any]] = deque()
        self._thread: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def put(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(*args)`` after the calls already put; first wait until fewer than ``depth``
        are pending, raising the failure of any that finished."""
        while self._pending and (self._pending[0].done() or len(self._pending) >= self.depth):
            finish([self._pending[0]])
            self._pending.popleft().result()
        if not self.ordered:
            fut = submit(fn, *args)
        else:
            if self._thread is None:
                self._thread = ThreadPoolExecutor(1, thread_name_prefix=self.name)
            fut = self._thread.submit(fn, *args)
        self._pending.append(fut)
        return fut

    def drain(self) -> None:
        """Wait for every call put; raise the first failure. The thread stops."""
        try:
            finish(list(self._pending))
            for fut in self._pending:
                fut.result()
        finally:
            self._pending.clear()
            if self._thread is not None:
                self._thread.shutdown(wait=False)
                self._thread = None

    def abandon(self) -> None:
        """``drain`` for a caller already failing: waits the same, raises only interrupts."""
        with contextlib.suppress(Exception):
            self.drain()
