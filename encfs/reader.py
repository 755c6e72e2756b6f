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
from collections import deque
from concurrent.futures import Future
from typing import BinaryIO, Callable

from . import cobblestone as cs
from .backend import CipherBackend, get_backend, pread_min_chunks
from .errors import IntegrityError, naming
from .forking import ForkLocal
from .header import open_header
from .keys import KeyRing
from .remote import RemoteObject, in_io_thread, part_size, parts, run_all, submit
from .securemem import cleanse
from .target import Target

TAIL_CHUNKS = 5
"""Chunks read from a remote file's end when it opens: any 64 KiB before the end (a footer)."""
DEFAULT_AHEAD_BYTES = 64 << 20
"""Ciphertext a remote stream may have in flight ahead of its reads (16 windows of 4 MiB)."""


class ChunkReader:
    def __init__(
        self,
        raw: BinaryIO | RemoteObject,
        ciphertext_size: int,
        keyring: KeyRing,
        backend: CipherBackend | None = None,
        name: str = "<file>",
        reopen: Callable[[], BinaryIO] | None = None,
    ):
        self.name = name
        self._usage: ForkLocal[_Usage] = ForkLocal(_Usage)
        self._closed = False
        self._target = raw if isinstance(raw, RemoteObject) else Target(raw, reopen)
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
    def commitment(self) -> bytes:
        """The payload's key commitment: derived from the file key and checked against the stored
        one at open, so it is authenticated (manifests and the model version log record it)."""
        return self._keys.commitment

    @property
    def local(self) -> bool:
        """True when reads are positional reads of a local file descriptor."""
        return self._target.fd is not None

    def _authenticate_final_chunk(self, head: bytes) -> None:
        """Small files are already in ``head``; others cost one read of at most one chunk (on a
        remote target, of the last ``TAIL_CHUNKS``, which it keeps: a Parquet or zip reader's
        first read, the footer, then costs no request)."""
        last = self.chunks - 1
        offset, ct_len = self._ct_range(last, 1)
        if offset + ct_len <= len(head):
            ct = head[offset : offset + ct_len]
        elif self.remote:
            tail_at = self._ct_range(max(0, last - TAIL_CHUNKS + 1), 1)[0]
            ct = self._target.read_at(tail_at, offset + ct_len - tail_at)[offset - tail_at :]
        else:
            ct = self._target.read_at(offset, ct_len)
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

    def read_chunks(
        self, first: int, count: int, out: memoryview, ahead: ReadAhead | None = None, sequential: bool = False, head: memoryview | None = None
    ) -> int:
        """Open chunks ``first .. first+count-1`` into ``out``; return the plaintext bytes (all
        verified). A failed chunk raises ``IntegrityError`` (its ``offset`` is the absolute
        plaintext offset where verified data ends; ``out`` is zeroed from there on).

        Safe to call from several threads at once. A caller reading a stream (a file object,
        under its own lock) passes its ``ReadAhead``: ciphertext buffers are reused, and with
        ``sequential`` a remote target's next spans are fetched in the background. Without one,
        a long span of a remote target is fetched in concurrent parts, each opened as it lands.

        ``head`` (remote targets, no ``ahead``): chunk ``first`` is opened into ``head`` and the
        rest from the start of ``out``, all fetched as one span: a long read that starts inside
        a chunk costs no extra request for that chunk."""
        with naming(self.name), self._in_use():
            offset, ct_len = self._ct_range(first, count)
            if head is not None or (ahead is None and self.remote and ct_len > part_size()):
                return self._fetch_and_open(first, count, out, head)
            if self._pread_min is not None and count >= self._pread_min:
                fd = self._target.fd
                assert fd is not None
                return self._cipher.pread_decrypt_into(fd, offset, first, ct_len, out)
            return self._cipher.decrypt_into(first, self._fetch(first, count, ahead, sequential), out)

    @property
    def remote(self) -> bool:
        """True when reads are ranged requests to an object store (``remote.RemoteObject``)."""
        return isinstance(self._target, RemoteObject)

    def _fetch_and_open(self, first: int, count: int, out: memoryview, head: memoryview | None = None) -> int:
        """A long span of a remote file: its parts fetched concurrently, each opened into its
        place as it lands (chunk ``first`` into ``head`` if given, the others into ``out``).
        Every part has finished before this returns; from the first chunk that failed (in file
        order) on, ``out`` (and ``head``, if that chunk is the first) is zeroed."""
        if not self.remote:
            raise ValueError("a span with a separate head chunk is read from remote targets only")
        skip = 0 if head is None else 1

        def part(pfirst: int, pcount: int) -> int:
            offset, ct_len = self._ct_range(pfirst, pcount)
            ct = memoryview(self._target.get(offset, ct_len))
            got = 0
            if skip and pfirst == first:
                ct_one, pt_one = self.span(first, 1)
                got = self._cipher.decrypt_into(first, ct[:ct_one], head[:pt_one])
                ct, pfirst, pcount = ct[ct_one:], first + 1, pcount - 1
            if pcount:
                pt_off = (pfirst - first - skip) * cs.CHUNK_SIZE
                got += self._cipher.decrypt_into(pfirst, ct, out[pt_off : pt_off + self.span(pfirst, pcount)[1]])
            return got

        plan = parts(first, count, max(1, part_size() // cs.CT_CHUNK_SIZE))
        try:
            return sum(run_all([lambda pf=pf, pc=pc: part(pf, pc) for pf, pc in plan]))
        except IntegrityError as e:
            bad = first if e.chunk_index is None else e.chunk_index
            verified = max(0, bad - first - skip) * cs.CHUNK_SIZE
            cleanse(out[verified:])
            if head is not None and bad == first:
                cleanse(head)
            e.verified_bytes = verified
            raise
        except BaseException:
            cleanse(out)
            if head is not None:
                cleanse(head)
            raise

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
            ct = self.fetch_into(first, count, ahead.scratch(count * cs.CT_CHUNK_SIZE))
        if sequential and self.remote and not in_io_thread():
            ahead.extend(first + count, count, self.chunks, self.fetch_into)
        return ct

    def fetch_into(self, first: int, count: int, buf: bytearray) -> memoryview:
        """The ciphertext of chunks ``first..+count``, read into ``buf`` (in concurrent parts
        on a remote target when it is long)."""
        offset, ct_len = self._ct_range(first, count)
        view = memoryview(buf)[:ct_len]
        if self.remote and ct_len > part_size():
            run_all([lambda o=o, n=n: self._target.read_into(o, view[o - offset : o - offset + n]) for o, n in parts(offset, ct_len, part_size())])
        else:
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
    """A stream's ciphertext buffers and, on remote targets, the spans fetched ahead of it.

    While reads stay sequential the spans that follow are fetched in the background, one at
    first and twice as many after each sequential read, up to ``max_bytes`` of ciphertext in
    flight; a read anywhere else drops them (waiting for any still landing in a buffer) and
    starts over at one. Used by one thread at a time (a file object's, under its lock)."""

    def __init__(self, max_bytes: int = DEFAULT_AHEAD_BYTES) -> None:
        self.max_bytes = max_bytes
        self.depth = 1
        self._scratch = bytearray()
        self._spans: deque[tuple[int, int, bytearray, Future[memoryview]]] = deque()
        self._taken: bytearray | None = None
        self._free: list[bytearray] = []
        self.started = False

    @property
    def buffers(self) -> list[bytearray]:
        """Every ciphertext buffer this stream holds."""
        held = [self._scratch, *self._free, *(s[2] for s in self._spans)]
        return held + ([self._taken] if self._taken is not None else [])

    @property
    def pending(self) -> tuple[int, int] | None:
        """(first chunk, count) of the next span fetched ahead, if any."""
        return self._spans[0][:2] if self._spans else None

    def scratch(self, nbytes: int) -> bytearray:
        """The buffer of a fetch made now (reused while big enough)."""
        if len(self._scratch) < nbytes:
            self._scratch = bytearray(nbytes)
        return self._scratch

    def take(self, first: int, count: int) -> memoryview | None:
        """The span fetched ahead if it is the one asked for; else drop every span ahead."""
        self._recycle()
        if self._spans and self._spans[0][:2] == (first, count):
            _, _, buf, fut = self._spans.popleft()
            view = fut.result()  # if this raises, the buffer is left to its fetch, never reused
            self._taken = buf
            return view
        self.drop()
        return None

    def extend(self, first: int, count: int, end: int, fetch: Callable[[int, int, bytearray], memoryview]) -> None:
        """Fetch spans of ``count`` chunks from chunk ``first`` on (never past chunk ``end``)
        until ``depth`` are in flight, then double ``depth`` within ``max_bytes``. Buffers kept
        for reuse never outnumber the spans still to come."""
        self.started = True
        span_bytes = count * cs.CT_CHUNK_SIZE
        nxt = self._spans[-1][0] + self._spans[-1][1] if self._spans else first
        while len(self._spans) < self.depth and nxt < end:
            n = min(count, end - nxt)
            buf = self._buffer(n * cs.CT_CHUNK_SIZE)
            self._spans.append((nxt, n, buf, submit(fetch, nxt, n, buf)))
            nxt += n
        self.depth = max(1, min(self.depth * 2, self.max_bytes // span_bytes))
        del self._free[max(0, min(self.depth, -(-(end - nxt) // count)) - len(self._spans)) :]

    def _buffer(self, nbytes: int) -> bytearray:
        while self._free:
            buf = self._free.pop()
            if len(buf) >= nbytes:
                return buf
        return bytearray(nbytes)

    def _recycle(self) -> None:
        if self._taken is not None:
            self._free.append(self._taken)
            self._taken = None

    def drop(self) -> None:
        """Forget the spans ahead and fetch one at a time again. Fetches not started are
        cancelled and their buffers kept; those already running are left to finish into
        buffers this stream lets go of (nobody waits for a read nobody wants)."""
        spans, self._spans = list(self._spans), deque()
        self._free.extend(buf for _, _, buf, fut in spans if fut.cancel() or fut.done())
        self.depth = 1

    def close(self) -> None:
        self._recycle()
        self.drop()
        self._free.clear()
