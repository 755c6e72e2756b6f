"""The chunk reader: an opened encrypted file with random access by chunk range.

Opening reads and authenticates the header (``header.open_header``) and then the final
chunk, so that no size is trusted and no byte returned before the file is known whole (a
file cut at a chunk boundary fails here, as age's reader does). After that, ``read_chunks``
opens any chunk range into a caller's buffer; nothing is released from a chunk whose tag
fails. How a range is read is decided once, when the reader is built: local files with a
backend that reads files itself go straight from the descriptor into the destination (the
native ``pread`` path) for spans long enough; everything else is fetched into a ciphertext
buffer and decrypted, and on remote targets a sequential stream's next span is fetched in
the background while this one decrypts (``ReadAhead``, owned by the stream).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import BinaryIO, Callable

from . import cobblestone as cs
from .backend import CipherBackend, get_backend, pread_min_chunks
from .errors import IntegrityError, naming
from .forking import ForkLocal
from .header import open_header
from .keys import KeyRing
from .securemem import cleanse
from .target import Target


class ChunkReader:
    def __init__(
        self,
        raw: BinaryIO,
        ciphertext_size: int,
        keyring: KeyRing,
        backend: CipherBackend | None = None,
        name: str = "<file>",
        reopen: Callable[[], BinaryIO] | None = None,
    ):
        self.name = name
        self._usage: ForkLocal[_Usage] = ForkLocal(_Usage)
        self._closed = False
        self._target = Target(raw, reopen)
        self.ciphertext_size = ciphertext_size
        backend = backend or get_backend()
        with naming(name):
            opened = open_header(self._target.read_at, ciphertext_size, keyring)
        self.header, self._keys, self.size = opened.header, opened.keys, opened.size
        self.header_length = self.header.length
        self.chunks = cs.chunk_count(self.size)
        self._cipher = backend.chunk_cipher(self._keys.key.view(), self._keys.base_nonce)
        self._pread_min = pread_min_chunks(backend) if self._target.fd is not None else None
        try:
            with naming(name):
                self._authenticate_final_chunk(opened.head)
        except BaseException:
            self.close()
            raise

    @property
    def local(self) -> bool:
        """True when reads are positional reads of a local file descriptor."""
        return self._target.fd is not None

    def _authenticate_final_chunk(self, head: bytes) -> None:
        """Small files are already in ``head``; others cost one read of at most one chunk."""
        last = self.chunks - 1
        offset, ct_len = self._ct_range(last, 1)
        ct = head[offset : offset + ct_len] if offset + ct_len <= len(head) else self._target.read_at(offset, ct_len)
        scratch = bytearray(ct_len - cs.TAG_SIZE)
        try:
            self._cipher.decrypt_into(last, memoryview(ct), memoryview(scratch))
        except IntegrityError:
            raise IntegrityError(
                f"final chunk {last} failed authentication: the file is truncated or was modified", chunk_index=last
            ) from None
        finally:
            cleanse(scratch)

    def span(self, first: int, count: int) -> tuple[int, int]:
        """(ciphertext bytes, plaintext bytes) of chunks ``first .. first+count-1``."""
        last = first + count - 1
        if not (0 <= first and count > 0 and last < self.chunks):
            raise ValueError(f"chunk range {first}+{count} outside 0..{self.chunks - 1}")
        pt_start = first * cs.CHUNK_SIZE
        pt = min(count * cs.CHUNK_SIZE, self.size - pt_start)
        return pt + count * cs.TAG_SIZE, pt

    def _ct_range(self, first: int, count: int) -> tuple[int, int]:
        """(file offset, length) of the ciphertext of chunks ``first .. first+count-1``."""
        return self.header_length + cs.chunk_offset(first), self.span(first, count)[0]

    def read_chunks(self, first: int, count: int, out: memoryview, ahead: ReadAhead | None = None, sequential: bool = False) -> int:
        """Open chunks ``first .. first+count-1`` into ``out``; return the plaintext bytes (all
        verified). A failed chunk raises ``IntegrityError`` (its ``offset`` is the absolute
        plaintext offset where verified data ends; ``out`` is zeroed from there on).

        Safe to call from several threads at once. A caller reading a stream (a file object,
        under its own lock) passes its ``ReadAhead``: ciphertext buffers are reused, and with
        ``sequential`` a remote target's next span is fetched in the background."""
        with naming(self.name), self._in_use():
            offset, ct_len = self._ct_range(first, count)
            if self._pread_min is not None and count >= self._pread_min:
                fd = self._target.fd
                assert fd is not None
                return self._cipher.pread_decrypt_into(fd, offset, first, ct_len, out)
            return self._cipher.decrypt_into(first, self._fetch(first, count, ahead, sequential), out)

    @contextlib.contextmanager
    def _in_use(self) -> Iterator[None]:
        """A read in progress: ``close()`` waits for it (its descriptor must not be closed, or
        reused by another file, under it); reads after ``close()`` raise ValueError."""
        usage = self._usage.get()
        with usage.cond:
            if self._closed:
                raise ValueError("I/O operation on a closed chunk reader")
            usage.readers += 1
        try:
            yield
        finally:
            with usage.cond:
                usage.readers -= 1
                if not usage.readers:
                    usage.cond.notify_all()

    def _fetch(self, first: int, count: int, ahead: ReadAhead | None, sequential: bool) -> memoryview:
        if ahead is None:
            return self.fetch_into(first, count, bytearray(self.span(first, count)[0]))
        ct = ahead.take(first, count)
        if ct is None:
            ct = self.fetch_into(first, count, ahead.buffer(0, count * cs.CT_CHUNK_SIZE))
        nxt = min(count, self.chunks - first - count)
        if sequential and nxt > 0 and not self.local:
            spare = ahead.buffer(1 if ct.obj is ahead.buffers[0] else 0, nxt * cs.CT_CHUNK_SIZE)
            ahead.start(first + count, nxt, lambda: self.fetch_into(first + count, nxt, spare))
        return ct

    def fetch_into(self, first: int, count: int, buf: bytearray) -> memoryview:
        """The ciphertext of chunks ``first..+count``, read into ``buf``."""
        offset, ct_len = self._ct_range(first, count)
        view = memoryview(buf)[:ct_len]
        self._target.read_into(offset, view)
        return view

    def close(self) -> None:
        usage = self._usage.get()
        with usage.cond:
            self._closed = True
            usage.cond.wait_for(lambda: not usage.readers)
        self._cipher.close()
        self._keys.wipe()
        self._target.close()


class _Usage:
    """Reads in progress in this process (a child after fork starts with none)."""

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.readers = 0


class ReadAhead:
    """A stream's ciphertext buffers and at most one background fetch (one thread, made on
    the first remote sequential read): one buffer is decrypted while the other fills. Used by
    one thread at a time (a file object's, under its lock)."""

    def __init__(self) -> None:
        self.buffers: list[bytearray] = []
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[int, int, Future[memoryview]] | None = None

    def buffer(self, i: int, nbytes: int) -> bytearray:
        while len(self.buffers) <= i:
            self.buffers.append(bytearray())
        if len(self.buffers[i]) < nbytes:
            self.buffers[i] = bytearray(nbytes)
        return self.buffers[i]

    def start(self, first: int, count: int, fetch: Callable[[], memoryview]) -> None:
        self._pool = self._pool or ThreadPoolExecutor(1, thread_name_prefix="encfs-readahead")
        self._pending = (first, count, self._pool.submit(fetch))

    @property
    def pending(self) -> tuple[int, int] | None:
        return self._pending[:2] if self._pending else None

    @property
    def started(self) -> bool:
        return self._pool is not None

    def take(self, first: int, count: int) -> memoryview | None:
        """The fetched span if it is the one asked for; else drop what is pending."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        if pending[:2] == (first, count):
            return pending[2].result()
        if not pending[2].cancel():
            wait([pending[2]])
        return None

    def close(self) -> None:
        self.take(-1, 0)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
