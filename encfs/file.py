"""``EncryptedReader``: the file object of an encrypted file open for reading.

It keeps the position and the API (``read``, ``readinto``, ``peek``, ``seek``; ``readline``
and iteration through ``peek``) and serves reads from its ``PlaintextWindow`` over the
file's ``ChunkReader``. A read never comes back short because a chunk failed (callers take a
short read for end of file): it raises ``IntegrityError``, whose ``verified_bytes`` says how
much of a ``readinto`` buffer holds verified plaintext (the rest is zeroed), and the position
moves past those bytes only. ``read()`` decrypts straight into the ``bytes`` it returns.

One reader may be shared by threads: reads, seeks and close take the reader's lock in turn,
as Python's own buffered files do, so no thread ever sees the window while another fills it.
"""

from __future__ import annotations

import io
import operator
import threading
from typing import Any

from .errors import IntegrityError
from .forking import ForkLocal
from .fresh_bytes import fresh_bytes
from .reader import ChunkReader
from .securemem import cleanse
from .window import PlaintextWindow

DEFAULT_READAHEAD = 256
"""Chunks (16 KiB each) decrypted per window on sequential reads: 4 MiB."""
PEEK_MAX = 8192


class EncryptedReader(io.BufferedIOBase):
    def __init__(self, fs: Any, path: str, reader: ChunkReader, readahead: int = DEFAULT_READAHEAD):
        self.fs, self.path, self.mode = fs, path, "rb"
        self._r = reader
        self.size = reader.size
        self.loc = 0
        self._window = PlaintextWindow(reader, readahead)
        self._lock: ForkLocal[threading.RLock] = ForkLocal(threading.RLock, initial=threading.RLock())

    @property
    def header(self):
        return self._r.header

    @property
    def commitment(self) -> bytes:
        """The payload's authenticated key commitment (``ChunkReader.commitment``)."""
        return self._r.commitment

    @property
    def readahead(self) -> int:
        return self._window.readahead

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.loc

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        with self._lock.get():
            self._check_open()
            offset = operator.index(offset)
            base = {io.SEEK_SET: 0, io.SEEK_CUR: self.loc, io.SEEK_END: self.size}.get(whence)
            if base is None:
                raise ValueError(f"invalid whence {whence}")
            if base + offset < 0:
                raise ValueError("negative seek position")
            self.loc = base + offset
            return self.loc

    def read(self, size: int | None = -1) -> bytes:
        with self._lock.get():
            self._check_open()
            left = max(0, self.size - self.loc)
            n = left if size is None or size < 0 else min(size, left)
            if n <= 0:
                return b""
            out, view = fresh_bytes(n)
            try:
                got = self._readinto(view)
            except BaseException:
                cleanse(view)
                raise
            finally:
                view.release()
            out = out if got == n else out[:got]
            return out if isinstance(out, bytes) else bytes(out)

    read1 = read

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, b: Any) -> int:
        with self._lock.get():
            self._check_open()
            return self._readinto(memoryview(b).cast("B"))

    readinto1 = readinto

    def _readinto(self, out: memoryview) -> int:
        n = min(len(out), max(0, self.size - self.loc))
        done = 0
        try:
            while done < n:
                done += self._window.serve(self.loc + done, out[done:n])
        except IntegrityError as e:
            cleanse(out[done:n])
            e.verified_bytes = done
            raise
        finally:
            self.loc += done
        return done

    def readline(self, size: int | None = -1) -> bytes:
        """One line, read under the lock as a whole (another thread's seek cannot splice in)."""
        with self._lock.get():
            return super().readline(-1 if size is None else size)

    def readlines(self, hint: int = -1) -> list[bytes]:
        with self._lock.get():
            return super().readlines(hint)

    def peek(self, size: int = 1) -> bytes:
        """Up to ``PEEK_MAX`` bytes from the current position without moving it (at least one
        unless at end of file): what ``readline`` and iteration scan for line ends."""
        with self._lock.get():
            self._check_open()
            if self.loc >= self.size:
                return b""
            return bytes(self._window.view(self.loc, max(1, size, PEEK_MAX)))

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file")

    def info(self) -> dict:
        return self.fs.info(self.path)

    def close(self) -> None:
        with self._lock.get():
            if self.closed:
                return
            try:
                self._window.close()
                self._r.close()
            finally:
                super().close()

    def __reduce__(self):
        return _reopen, (self.fs, self.path, self.loc)

    def __repr__(self) -> str:
        return f"<EncryptedReader {self.path!r} size={self.size}>"


def _reopen(fs: Any, path: str, loc: int) -> EncryptedReader:
    f = fs.open(path, "rb")
    f.seek(loc)
    return f
