"""The ciphertext file under a reader: exact positional reads, one handle per process.

A local file is read with ``pread``/``preadv`` on its descriptor (no shared offset, so threads
need no lock); any other file object (s3fs, memory, ...) with seek + read under a lock. After
``fork()`` the child's first read reopens the file (``forking.ForkLocal``): a parent's
descriptor offset or HTTP session is never shared. A file that ends early is a
``FormatError`` (truncated), and an object store's "changed since it was opened" (s3fs's
``FileExpired``) a ``FileChangedError``.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from collections.abc import Iterator
from typing import BinaryIO, Callable

from .errors import FileChangedError, FormatError
from .forking import ForkLocal


class _Handle:
    def __init__(self, raw: BinaryIO):
        try:
            fd: int | None = raw.fileno()
        except (AttributeError, OSError, io.UnsupportedOperation):
            fd = None
        self.raw, self.fd, self.lock = raw, fd, threading.Lock()


class Target:
    def __init__(self, raw: BinaryIO, reopen: Callable[[], BinaryIO] | None = None):
        self._reopen = reopen
        self._first = _Handle(raw)
        self._handle: ForkLocal[_Handle] = ForkLocal(self._reopened, initial=self._first)

    def _reopened(self) -> _Handle:
        if self._reopen is None:
            raise FormatError("reader inherited across fork() and cannot reopen its file")
        return _Handle(self._reopen())

    @property
    def fd(self) -> int | None:
        """This process's descriptor of a local file, else None."""
        return self._handle.get().fd

    def read_at(self, offset: int, n: int) -> bytes:
        """Exactly ``n`` bytes at ``offset``."""
        buf = bytearray(n)
        self.read_into(offset, memoryview(buf))
        return bytes(buf)

    def read_into(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` from ``offset`` exactly."""
        h = self._handle.get()
        got = 0
        if h.fd is not None:
            while got < len(view):
                n = os.preadv(h.fd, [view[got:]], offset + got)
                if not n:
                    break
                got += n
        else:
            with h.lock, changed_under_us():
                h.raw.seek(offset)
                while got < len(view):
                    data = h.raw.read(len(view) - got)
                    if not data:
                        break
                    view[got : got + len(data)] = data
                    got += len(data)
        if got != len(view):
            raise FormatError(f"file shrank while reading (truncated at {offset + got})")

    def close(self) -> None:
        mine = self._handle.peek()
        for h in {id(h): h for h in (self._first, mine) if h is not None}.values():
            h.raw.close()


@contextlib.contextmanager
def changed_under_us() -> Iterator[None]:
    try:
        yield
    except OSError as e:
        if type(e).__name__ != "FileExpired":
            raise
        raise FileChangedError("the file was replaced or rewritten while it was being read; open it again") from e
