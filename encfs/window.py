"""The decrypted window: a cache of plaintext chunks in locked memory, in the sense of
fsspec's ``caching.py``, between a file object and its chunk reader.

A read is served from the window when it can be. A miss decrypts the chunks under the read
into the window, or ``readahead`` chunks when the read continues where the last one ended
(sequential). A chunk-aligned read of whole chunks bypasses the window and decrypts straight
into the caller's buffer (on a remote target only a read of a whole window or more, so that
small reads still fetch whole windows, one request each; a longer one is fetched in concurrent
parts, up to 64 MiB per call, without read-ahead). The window lives in a ``SecureBuffer``
(locked, out of core dumps) and is wiped when the file closes; its ``ReadAhead`` (ciphertext
buffers, background fetch on remote targets) is this stream's, per process.
"""

from __future__ import annotations

from . import cobblestone as cs
from .errors import IntegrityError
from .forking import ForkLocal
from .reader import ChunkReader, ReadAhead
from .securemem import SecureBuffer


REMOTE_DIRECT = 4096
"""Chunks (64 MiB) a long read of a remote file decrypts per call, fetched in concurrent parts:
what bounds the ciphertext such a read holds at once."""


class PlaintextWindow:
    def __init__(self, reader: ChunkReader, readahead: int):
        self._r = reader
        self.readahead = max(1, readahead)
        self._buf: SecureBuffer | None = None
        self._start = 0
        self._len = 0
        self._next = 0  # where a sequential read would continue
        self._ahead: ForkLocal[ReadAhead] = ForkLocal(ReadAhead)

    def serve(self, pos: int, out: memoryview) -> int:
        """Copy plaintext at ``pos`` into ``out``; return the bytes served (> 0). A failed chunk
        raises ``IntegrityError`` once nothing before it is left to serve."""
        if self._holds(pos):
            return self._copy(pos, out)
        first = pos // cs.CHUNK_SIZE
        if self._r.remote and pos % cs.CHUNK_SIZE and len(out) > (2 * self.readahead + 1) * cs.CHUNK_SIZE:
            return self._split(pos, first, out)
        if pos % cs.CHUNK_SIZE == 0 and len(out) >= (self.readahead if self._r.remote else 1) * cs.CHUNK_SIZE:
            count = min(len(out) // cs.CHUNK_SIZE, self._r.chunks - first, REMOTE_DIRECT if self._r.remote else self.readahead)
            pt = self._r.span(first, count)[1]
            if pt <= len(out):
                return self._direct(pos, first, count, out[:pt])
        self._fill(pos, len(out))
        return self._copy(pos, out)

    def view(self, pos: int, n: int) -> memoryview:
        """Up to ``n`` (>= 1) bytes at ``pos`` as a view of the window, filling it if needed."""
        if not self._holds(pos):
            self._fill(pos, n)
        off = pos - self._start
        assert self._buf is not None
        return memoryview(self._buf)[off : off + min(n, self._len - off)]

    def _holds(self, pos: int) -> bool:
        return self._start <= pos < self._start + self._len

    def _copy(self, pos: int, out: memoryview) -> int:
        src = self.view(pos, len(out))
        out[: len(src)] = src
        return len(src)

    def _direct(self, pos: int, first: int, count: int, out: memoryview) -> int:
        ahead = None if count > self.readahead else self._ahead.get()  # (longer: concurrent parts, no read-ahead)
        try:
            got = self._r.read_chunks(first, count, out, ahead, sequential=pos == self._next)
        except IntegrityError as e:
            verified = (e.offset or pos) - pos
            if verified > 0:
                self._next = pos + verified
                return verified
            raise
        self._next = pos + got
        return got

    def _split(self, pos: int, first: int, out: memoryview) -> int:
        """A long unaligned read of a remote file: the chunk under ``pos`` and the whole chunks
        after it fetched as one span in concurrent parts, that chunk opened into the window and
        the others straight into ``out``. Nothing after a failed chunk is left in ``out``."""
        head = cs.CHUNK_SIZE - pos % cs.CHUNK_SIZE
        count = min((len(out) - head) // cs.CHUNK_SIZE, self._r.chunks - first - 1, REMOTE_DIRECT)
        window = self._claim(first, 1)
        tail = out[head : head + self._r.span(first + 1, count)[1]]
        try:
            self._r.read_chunks(first, count + 1, tail, head=window)
            rest = len(tail)
        except IntegrityError as e:
            if e.chunk_index in (None, first):
                raise
            rest = e.verified_bytes
        self._len = len(window)
        got = self._copy(pos, out[:head])
        self._next = pos + got + rest
        return got + rest

    def _claim(self, first: int, count: int) -> memoryview:
        """The window's buffer, emptied and placed at chunk ``first``, for ``count`` chunks."""
        pt = self._r.span(first, count)[1]
        if self._buf is None or len(self._buf) < pt:
            self._drop()
            self._buf = SecureBuffer(pt)
        self._start, self._len = first * cs.CHUNK_SIZE, 0
        return memoryview(self._buf)[:pt]

    def _fill(self, pos: int, want: int) -> None:
        first = pos // cs.CHUNK_SIZE
        last = min((pos + want - 1) // cs.CHUNK_SIZE, self._r.chunks - 1)
        sequential = pos == self._next
        count = max(last - first + 1, self.readahead if sequential else 1)
        count = min(count, self._r.chunks - first, self.readahead)
        window = self._claim(first, count)
        try:
            self._len = self._r.read_chunks(first, count, window, self._ahead.get(), sequential)
        except IntegrityError as e:
            self._len = max(0, (e.offset or 0) - self._start)
            if pos >= self._start + self._len:
                raise
        self._next = self._start + self._len

    @property
    def buffer(self) -> SecureBuffer | None:
        return self._buf

    @property
    def ahead(self) -> ReadAhead | None:
        return self._ahead.peek()

    def close(self) -> None:
        """Wipe the window, give its locked pages back, and stop reading ahead."""
        self._drop()
        ahead = self._ahead.peek()
        if ahead is not None:
            ahead.close()

    def _drop(self) -> None:
        if self._buf is not None:
            self._buf.release()
        self._buf, self._len = None, 0
