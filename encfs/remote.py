"""Ciphertext on an object store, read as independent ranged GETs, several in flight at once.

A remote file is not read through one file object (one request at a time, behind a lock) but
with ``fs.cat_file(path, start, end)``: each read is its own request, so reads from many
threads overlap, and a large span is split into parts fetched together (the way AWS's CRT
client and Mountpoint read). The calls run on a process-wide pool of I/O threads; fsspec's
async filesystems (s3fs, gcsfs, adlfs) serve them from their own event loop, which these
threads only wait on. After ``fork()`` a child gets its own pool (``ForkLocal``), and the
target filesystem its own client (fsspec renews it).

Bytes read while a file is opened (its header, its final chunk, or the whole of a small
object) are kept as ``pieces`` and served again without a request: to the reader that opened
them, and, through ``EncFileSystem``'s cache keyed by the object's version, to the next open.
"""

from __future__ import annotations

import errno
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

from .env import IO_THREADS, PART_SIZE, env_int
from .errors import FormatError
from .forking import ForkLocal
from .target import changed_under_us

DEFAULT_IO_THREADS = 32
DEFAULT_PART = 8 << 20
"""Ciphertext bytes per ranged GET when a span is split (big enough that per-request latency
is small against the transfer, small enough that a 4 MiB stream window is one request)."""
SMALL_OBJECT = 256 << 10
"""Objects up to this size are read whole by the first request that opens them."""

T = TypeVar("T")


_local = threading.local()


def _mark_io_thread() -> None:
    _local.io = True


def in_io_thread() -> bool:
    """Whether this thread is one of the I/O pool's: work it would hand to the pool runs here
    instead (a pool thread waiting on the pool could wait for ever once all of them do)."""
    return getattr(_local, "io", False)


def _make_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(env_int(IO_THREADS, DEFAULT_IO_THREADS, 1), thread_name_prefix="encfs-io", initializer=_mark_io_thread)


_pool: ForkLocal[ThreadPoolExecutor] = ForkLocal(_make_pool)


def io_pool() -> ThreadPoolExecutor:
    """This process's I/O threads (they wait on the network, so there are more than cores)."""
    return _pool.get()


def part_size() -> int:
    return env_int(PART_SIZE, DEFAULT_PART, 64 << 10)


_DEFAULT = object()


def run_all(tasks: Sequence[Callable[[], T]], on: Any = _DEFAULT) -> list[T]:
    """Run ``tasks`` on the I/O pool (``on=None``: one after another, here) and return their
    results in order. Every task has finished when this returns or raises (none is left
    writing into a caller's buffer); the first failure, in task order, is raised."""
    pool = io_pool() if on is _DEFAULT else on
    if pool is None or len(tasks) == 1 or in_io_thread():
        return [t() for t in tasks]
    futures: list[Future[T]] = [pool.submit(t) for t in tasks]
    wait(futures)
    for f in futures:
        if f.exception() is not None:
            raise f.exception()  # type: ignore[misc]
    return [f.result() for f in futures]


def parts(offset: int, length: int, size: int, align: int = 1) -> Iterator[tuple[int, int]]:
    """(offset, length) pieces of ``[offset, offset+length)``, each about ``size`` bytes and
    starting on a multiple of ``align`` from ``offset``."""
    step = max(align, size // align * align)
    for start in range(0, length, step):
        yield offset + start, min(step, length - start)


def _fresh(fs: Any) -> Any:
    """A new instance of ``fs`` with the same options (fsspec drops its instance cache in a
    forked child, so this does not hand back the parent's)."""
    func, args = fs.__reduce__()[:2]
    return func(*args)


class RemoteObject:
    """One object of a remote filesystem, read by ranges. ``fd`` is None (no local descriptor)."""

    fd = None

    def __init__(self, fs: Any, path: str, size: int, pieces: dict[int, bytes] | None = None, etag: str | None = None):
        self.path, self.size, self.etag = path, size, etag
        self.pieces: dict[int, bytes] = dict(pieces or {})
        self._fs: ForkLocal[Any] = ForkLocal(lambda: _fresh(fs), initial=fs)

    @property
    def fs(self) -> Any:
        """The target filesystem; in a forked child, a new instance of it (own client and loop)."""
        return self._fs.get()

    def read_at(self, offset: int, n: int) -> bytes:
        """Exactly ``n`` bytes at ``offset``: from a piece already read, else one request. A
        read at offset 0 of a small object reads all of it (kept as a piece)."""
        known = self._known(offset, n)
        if known is not None:
            return known
        if offset == 0 and self.size <= SMALL_OBJECT:
            self.pieces[0] = self._get(0, self.size)
            return self.pieces[0][:n]
        data = self._get(offset, n)
        if offset == 0 or offset + n == self.size:
            self.pieces[offset] = data
        return data

    def read_into(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` from ``offset`` exactly (one request unless already read)."""
        known = self._known(offset, len(view))
        view[:] = known if known is not None else self._get(offset, len(view))

    def _known(self, offset: int, n: int) -> bytes | None:
        for start, data in list(self.pieces.items()):
            if start <= offset and offset + n <= start + len(data):
                return data[offset - start : offset - start + n]
        return None

    def _get(self, offset: int, n: int) -> bytes:
        if n == 0:
            return b""
        with changed_under_us():
            data = _ranged_get(self.fs, self.path, offset, offset + n, self.etag)
        if len(data) != n:
            raise FormatError(f"object shorter than listed: {len(data)} of {n} bytes at {offset} (truncated or replaced)")
        return data

    def close(self) -> None:
        self.pieces.clear()


def _ranged_get(fs: Any, path: str, start: int, end: int, etag: str | None) -> bytes:
    """Bytes ``start..end`` of ``path``. On S3, with the ETag the object had when it was opened
    (``If-Match``), so that a replaced object is an error (s3fs's ``FileExpired``), as its own
    file objects make it; elsewhere ``cat_file``."""
    if etag is not None and type(fs).__name__ == "S3FileSystem":
        from s3fs.core import _fetch_range
        from s3fs.utils import FileExpired

        bucket, key, version = fs.split_path(path)
        try:
            return _fetch_range(fs, bucket, key, version, start, end, req_kw={"IfMatch": etag}, details={"name": path, "ETag": etag})
        except OSError as e:
            if e.args and e.args[0] == errno.EINVAL and "pre-conditions" in str(e.args[-1]):
                raise FileExpired(filename=path, e_tag=etag) from e
            raise
    return fs.cat_file(path, start=start, end=end)


class PieceCache:
    """What opening each object version read (header, final chunk, small objects whole), so
    that opening it again costs no request: ciphertext only, bounded in bytes, least recently
    used dropped first. Keyed by (path, size, version stamp)."""

    def __init__(self, max_bytes: int = 16 << 20):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, dict[int, bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, version: tuple | None) -> dict[int, bytes] | None:
        if version is None:
            return None
        with self._lock:
            pieces = self._items.get(version)
            if pieces is not None:
                self._items.move_to_end(version)
            return pieces

    def put(self, version: tuple, pieces: dict[int, bytes]) -> None:
        size = sum(len(p) for p in pieces.values())
        if not pieces or size > self.max_bytes // 4:
            return
        with self._lock:
            old = self._items.pop(version, None)
            self._bytes += size - (sum(len(p) for p in old.values()) if old else 0)
            self._items[version] = dict(pieces)
            while self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= sum(len(p) for p in dropped.values())

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
