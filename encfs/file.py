"""File objects: ``EncryptedReader`` (random access, read-ahead) and ``EncryptedWriter``.

Reads are served from a window of decrypted chunks, held in locked memory (``SecureBuffer``:
mlock'd, kept out of core dumps, zeroed on close). A read that continues where the last one
ended is sequential: the window grows to ``readahead`` chunks and, on remote targets, the
next window's ciphertext is fetched in the background while this one decrypts. Local files
opened by the native backend need no ciphertext buffer at all: its threads read each group
of chunks straight into the destination and open it from there through per-thread scratch
(the kernel does the read-ahead;
an extra thread only competed with the decrypting ones: benchmarks/RESULTS.md). Any other
read decrypts only the chunks it touches. A chunk-aligned ``readinto`` of whole chunks
decrypts straight into the caller's buffer. A read never comes back short because a chunk
failed (callers take a short read for end of file): it raises ``IntegrityError``, whose
``verified_bytes`` says how much of a ``readinto`` buffer holds verified plaintext (the rest
is zeroed), and the position moves past those bytes only. The final chunk is authenticated
when the file is opened (``ChunkReader``), so no size or end of file is reported for a file
truncated at a chunk boundary.

One reader may be shared by threads: reads, seeks and close take the reader's lock in turn,
as Python's own buffered files do, so no thread ever sees the window while another fills it.
"""

from __future__ import annotations

import ctypes
import io
import operator
import os
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from . import cobblestone as cs
from .errors import EncfsError, IntegrityError
from .reader import ChunkReader
from .securemem import SecureBuffer
from .writer import PayloadWriter

DEFAULT_READAHEAD = 256
PEEK_MAX = 8192

if sys.implementation.name == "cpython":
    _new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
    _new_bytes.restype = ctypes.py_object
    _new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
    _memory_view = ctypes.pythonapi.PyMemoryView_FromMemory
    _memory_view.restype = ctypes.py_object
    _memory_view.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
    _PyBUF_WRITE = 0x200
    _BYTES_DATA = bytes.__basicsize__ - 1

    def _fresh_bytes(n: int) -> tuple[bytes, memoryview]:
        """A new ``bytes`` of length ``n`` > 0 and a writable view of it, to fill before anyone
        else sees it: ``read()`` decrypts straight into the object it returns (no temporary
        plaintext copy to allocate, copy out of and wipe). ``n`` must be positive: CPython
        hands out a shared singleton for empty bytes."""
        if n <= 0:
            raise ValueError("n must be positive")
        out = _new_bytes(None, n)
        return out, _memory_view(id(out) + _BYTES_DATA, n, _PyBUF_WRITE)

else:  # pragma: no cover

    def _fresh_bytes(n: int) -> tuple[bytearray, memoryview]:
        buf = bytearray(n)
        return buf, memoryview(buf)


class EncryptedReader(io.BufferedIOBase):
    def __init__(self, fs: Any, path: str, reader: ChunkReader, readahead: int = DEFAULT_READAHEAD):
        self.fs, self.path, self.mode = fs, path, "rb"
        self._r = reader
        self.size = reader.size
        self.readahead = max(1, readahead)
        self.loc = 0
        self._win: SecureBuffer | bytearray = bytearray()
        self._win_start = 0
        self._win_len = 0
        self._seq_next: int | None = 0
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = os.getpid()
        self._prefetch: tuple[int, int, Future[memoryview]] | None = None
        self._ct_bufs: list[bytearray] = []
        self._lock = threading.RLock()
        self._lock_pid = os.getpid()

    def _locked(self) -> threading.RLock:
        """This reader's lock; a fresh one in a forked child (a parent thread may hold the old)."""
        if self._lock_pid != os.getpid():
            self._lock, self._lock_pid = threading.RLock(), os.getpid()
        return self._lock

    @property
    def header(self):
        return self._r.header

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.loc

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        with self._locked():
            return self._seek(offset, whence)

    def _seek(self, offset: int, whence: int) -> int:
        self._check_open()
        offset = operator.index(offset)
        if whence == io.SEEK_SET:
            loc = offset
        elif whence == io.SEEK_CUR:
            loc = self.loc + offset
        elif whence == io.SEEK_END:
            loc = self.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if loc < 0:
            raise ValueError("negative seek position")
        self.loc = loc
        return loc

    def read(self, size: int | None = -1) -> bytes:
        with self._locked():
            return self._read(size)

    def _read(self, size: int | None) -> bytes:
        self._check_open()
        n = self.size - self.loc if size is None or size < 0 else min(size, max(0, self.size - self.loc))
        if n <= 0:
            return b""
        out, view = _fresh_bytes(n)
        try:
            got = self._readinto(view)
        except BaseException:
            view[:] = bytes(n)
            raise
        finally:
            view.release()
        out = out if got == n else out[:got]
        return out if isinstance(out, bytes) else bytes(out)

    read1 = read

    def peek(self, size: int = 1) -> bytes:
        """Up to ``PEEK_MAX`` bytes from the current position without moving it (at least one
        unless at end of file): what ``readline`` and iteration scan for line ends."""
        with self._locked():
            self._check_open()
            if self.loc >= self.size:
                return b""
            if not self._win_start <= self.loc < self._win_start + self._win_len:
                self._fill(self.loc, max(1, size))
            off = self.loc - self._win_start
            n = min(max(1, size, PEEK_MAX), self._win_len - off)
            return bytes(memoryview(self._win)[off : off + n])

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, b: Any) -> int:
        with self._locked():
            return self._readinto(b)

    def _readinto(self, b: Any) -> int:
        self._check_open()
        out = memoryview(b).cast("B")
        n = min(len(out), max(0, self.size - self.loc))
        done = 0
        try:
            while done < n:
                done += self._serve(self.loc + done, out[done:n])
        except IntegrityError as e:
            out[done:n] = bytes(n - done)
            e.verified_bytes = done
            raise
        finally:
            self.loc += done
        return done

    readinto1 = readinto

    def _serve(self, pos: int, out: memoryview) -> int:
        """Copy plaintext at ``pos`` into ``out``; return bytes served (> 0)."""
        if self._win_start <= pos < self._win_start + self._win_len:
            k = min(len(out), self._win_start + self._win_len - pos)
            off = pos - self._win_start
            out[:k] = memoryview(self._win)[off : off + k]
            return k
        first = pos // cs.CHUNK_SIZE
        if pos % cs.CHUNK_SIZE == 0 and len(out) >= cs.CHUNK_SIZE:
            count = min(len(out) // cs.CHUNK_SIZE, self._r.chunks - first, self.readahead)
            _, pt = self._r.span(first, count)
            if pt <= len(out):
                sequential = pos == self._seq_next
                self._seq_next = pos + pt
                try:
                    return self._open_chunks(first, count, out[:pt], sequential)
                except IntegrityError as e:
                    if e.verified_bytes:
                        return e.verified_bytes
                    raise
        self._fill(pos, len(out))
        return self._serve(pos, out)

    def _fill(self, pos: int, want: int) -> None:
        first = pos // cs.CHUNK_SIZE
        last = min((pos + want - 1) // cs.CHUNK_SIZE, self._r.chunks - 1)
        sequential = pos == self._seq_next
        count = max(last - first + 1, self.readahead if sequential else 1)
        count = min(count, self._r.chunks - first, self.readahead)
        _, pt = self._r.span(first, count)
        if len(self._win) < pt:
            self._release_window()
            self._win = SecureBuffer(pt)
        self._win_start, self._win_len = first * cs.CHUNK_SIZE, 0
        try:
            self._win_len = self._open_chunks(first, count, memoryview(self._win)[:pt], sequential)
        except IntegrityError as e:
            self._win_len = e.verified_bytes
            if pos >= self._win_start + self._win_len:
                raise
        self._seq_next = self._win_start + self._win_len

    def _open_chunks(self, first: int, count: int, out: memoryview, sequential: bool) -> int:
        """Decrypt chunks ``first..+count`` into ``out``, noting when the final chunk verified:
        in one call that reads straight into ``out`` where the reader and backend can (local
        files, long spans), else from ciphertext fetched (and read ahead) here."""
        got = self._r.open_direct(first, count, out)
        if got is None:
            got = self._r.decrypt_into(first, self._fetch_pipelined(first, count, sequential), out)
        return got

    def _forget_inherited_pool(self) -> None:
        """After fork() the read-ahead thread and its pending fetch belong to the parent."""
        if self._pool_pid != os.getpid():
            self._pool, self._prefetch, self._pool_pid = None, None, os.getpid()

    def _fetch_pipelined(self, first: int, count: int, sequential: bool) -> memoryview:
        """Ciphertext of chunks ``first..+count``; when reading sequentially, start fetching
        the next run of the same length in the background before returning. Two ciphertext
        buffers alternate: one being decrypted, one being filled."""
        self._forget_inherited_pool()
        ct = self._take_prefetch(first, count)
        nxt = min(count, self._r.chunks - first - count)
        if sequential and nxt > 0 and not self._r.local:
            spare = self._ct_buffer(1 if ct.obj is self._ct_bufs[0] else 0, nxt)
            self._pool = self._pool or ThreadPoolExecutor(1, thread_name_prefix="encfs-readahead")
            self._prefetch = (first + count, nxt, self._pool.submit(self._r.fetch_into, first + count, nxt, spare))
        return ct

    def _ct_buffer(self, i: int, count: int) -> bytearray:
        """Ciphertext buffer ``i`` (0 or 1), grown to hold ``count`` chunks; allocated on demand
        (random reads need one chunk's worth; only remote sequential reads need two buffers)."""
        while len(self._ct_bufs) <= i:
            self._ct_bufs.append(bytearray())
        need = count * cs.CT_CHUNK_SIZE
        if len(self._ct_bufs[i]) < need:
            self._ct_bufs[i] = bytearray(need)
        return self._ct_bufs[i]

    def _take_prefetch(self, first: int, count: int) -> memoryview:
        if self._prefetch and self._prefetch[:2] == (first, count):
            fut = self._prefetch[2]
            try:
                result = fut.result()
            except Exception:
                self._prefetch = None
                raise
            self._prefetch = None
            return result
        self._drop_prefetch()
        return self._r.fetch_into(first, count, self._ct_buffer(0, count))

    def _drop_prefetch(self) -> None:
        self._forget_inherited_pool()
        if self._prefetch:
            fut = self._prefetch[2]
            if not fut.cancel():
                wait([fut])
            self._prefetch = None

    def _release_window(self) -> None:
        """Zero the decrypted window and give its locked pages back."""
        if isinstance(self._win, SecureBuffer):
            self._win.release()
        self._win = bytearray()
        self._win_len = 0

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file")

    def info(self) -> dict:
        return self.fs.info(self.path)

    def close(self) -> None:
        with self._locked():
            self._close()

    def _close(self) -> None:
        if self.closed:
            return
        try:
            self._drop_prefetch()
            if self._pool:
                self._pool.shutdown(wait=True)
            self._release_window()
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


class EncryptedWriter(io.BufferedIOBase):
    """Streams plaintext into an encrypted file. The destination appears only on a clean
    ``close()`` (or, with ``autocommit=False``, on ``commit()``, as fsspec transactions do).

    A failed ``with`` block that owns the file discards it, so a failed write never replaces
    the old file: this writer's own ``with``, and the ``with`` of a wrapper holding it
    (``fsspec.open``, a text wrapper, pandas' handles), whose ``__exit__`` closes it while an
    exception unwinds. Every other ``close()`` commits, also inside ``except`` and ``finally``
    blocks (an emergency checkpoint written while handling an error is kept). A write that
    failed poisons the writer: ``close()`` then raises and nothing appears. ``discard()``
    throws a file away explicitly."""

    def __init__(self, fs: Any, path: str, writer: PayloadWriter, mode: str = "wb", autocommit: bool = True):
        self.fs, self.path, self.mode = fs, path, mode
        self.autocommit = autocommit
        self._w = writer
        self.discarded = False

    @property
    def header(self):
        return self._w.header

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._w.plaintext_written

    def write(self, data: Any) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        return self._w.write(data)

    def flush(self) -> None:
        """No-op: ciphertext is written in whole chunks; the tail is sealed on close()."""

    def close(self) -> None:
        if self.closed:
            return
        if sys.exc_info()[1] is not None and _closed_by_failing_owner(self):
            self.discard()
            return
        try:
            self._w.finish()
            if self.autocommit:
                self._w.commit()
        finally:
            super().close()
            self.fs.invalidate_cache(self.path)

    def commit(self) -> None:
        """Make a file written with ``autocommit=False`` appear (after ``close()``)."""
        if not self.closed:
            self.close()
        if self.discarded:
            raise EncfsError(f"{self.path}: cannot commit, the file was discarded (its write failed or was abandoned)")
        if not self.autocommit:
            self._w.commit()
            self.fs.invalidate_cache(self.path)

    def discard(self) -> None:
        """Throw the file away: nothing appears at the destination."""
        self.discarded = True
        try:
            self._w.abort()
        finally:
            if not self.closed:
                super().close()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()
        else:
            self.close()

    def __del__(self) -> None:
        if not self.closed:
            self.discard()

    def __reduce__(self):
        raise TypeError("an open encrypted writer cannot be pickled")

    def __repr__(self) -> str:
        return f"<EncryptedWriter {self.path!r}>"


_CO_VARARGS = 0x04
_OWNER_ATTRS = ("buffer", "raw", "f", "fobjects", "handle", "created_handles")


def _closed_by_failing_owner(target: Any, max_frames: int = 24) -> bool:
    """Whether this ``close()`` runs inside the ``__exit__`` of a ``with`` block that holds
    ``target`` (or a wrapper of it) and is unwinding an exception: the nearest such frame on
    the stack decides. An ``except`` or ``finally`` block of the caller's is no ``__exit__``."""
    frame = sys._getframe(2)
    for _ in range(max_frames):
        if frame is None:
            return False
        if frame.f_code.co_name == "__exit__" and _holds(frame.f_locals.get("self"), target, 3):
            return any(_is_exception(a) for a in _exit_arguments(frame))
        frame = frame.f_back
    return False


def _exit_arguments(frame: Any) -> list[Any]:
    code, local = frame.f_code, frame.f_locals
    names = list(code.co_varnames[1 : code.co_argcount])
    values = [local.get(n) for n in names]
    if code.co_flags & _CO_VARARGS:
        values += list(local.get(code.co_varnames[code.co_argcount + code.co_kwonlyargcount], ()))
    return values


def _is_exception(value: Any) -> bool:
    return isinstance(value, BaseException) or (isinstance(value, type) and issubclass(value, BaseException))


def _holds(obj: Any, target: Any, depth: int) -> bool:
    """``obj`` is ``target`` or wraps it within ``depth`` steps (attributes, lists of files)."""
    if obj is target:
        return True
    if depth == 0 or obj is None or isinstance(obj, (str, bytes, int, float)):
        return False
    if isinstance(obj, (list, tuple)):
        return any(_holds(o, target, depth - 1) for o in obj[:16])
    inner = [getattr(obj, a, None) for a in _OWNER_ATTRS]
    return any(_holds(o, target, depth - 1) for o in inner if o is not None)


class EncryptedTextWriter(io.TextIOWrapper):
    """Text mode over an ``EncryptedWriter`` whose ``with`` discards the file when it fails
    (``io.TextIOWrapper``'s own ``__exit__`` would flush and commit)."""

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None and isinstance(self.buffer, EncryptedWriter):
            self.buffer.discard()
        super().__exit__(exc_type, exc, tb)
