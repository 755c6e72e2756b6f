"""Ciphertext on an object store, read as independent ranged GETs, several in flight at once.

A remote file is not read through one file object (one request at a time, behind a lock) but
with ``fs.cat_file(path, start, end)``: each read is its own request, so reads from many
threads overlap, and a large span is split into parts fetched together (the way AWS's CRT
client and Mountpoint read). The calls run on a process-wide pool of I/O threads; fsspec's
async filesystems (s3fs, gcsfs, adlfs) serve them from their own event loop, which these
threads only wait on. After ``fork()`` a child gets its own pool (``ForkLocal``), and the
target filesystem its own client (fsspec renews it).

Bytes read while a file is opened (its header, its final chunk, or the whole of a small
object) are kept as ``pieces`` and served again, without a request, to the reader that opened
them; the header region alone is kept for the next open of the same version (``PieceCache``).
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


def submit(fn: Callable[..., T], *args: Any) -> Future[T]:
    """``fn(*args)`` on the I/O pool; run here when the pool cannot take work (the interpreter is
    shutting down: an ``atexit`` handler reading a file)."""
    try:
        return io_pool().submit(fn, *args)
    except RuntimeError:
        done: Future[T] = Future()
        try:
            done.set_result(fn(*args))
        except BaseException as e:
            done.set_exception(e)
        return done


def finish(futures: Sequence[Future[Any]]) -> None:
    """Wait until every one of ``futures`` has finished. An interrupt (Ctrl-C, a signal handler's
    exception) cancels those not started, still waits for the running ones, which may be
    writing into a caller's buffer, and is then raised."""
    interrupted: BaseException | None = None
    while True:
        try:
            wait(futures)
            break
        except BaseException as e:
            interrupted = interrupted or e
            for f in futures:
                f.cancel()
    if interrupted is not None:
        raise interrupted


def run_all(tasks: Sequence[Callable[[], T]], concurrent: bool = True) -> list[T]:
    """Run ``tasks`` on the I/O pool (``concurrent=False``: one after another, here) and return
    their results in order. Every task has finished when this returns or raises (none is left
    writing into a caller's buffer); the first failure, in task order, is raised."""
    if not concurrent or len(tasks) == 1 or in_io_thread():
        return [t() for t in tasks]
    futures = [submit(t) for t in tasks]
    finish(futures)
    for f in futures:
        if f.exception() is not None:
            raise f.exception()  # type: ignore[misc]
    return [f.result() for f in futures]


def parts(offset: int, length: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) pieces of ``[offset, offset+length)`` (in bytes, or in chunks): as few as
    can be at most ``size`` long, and as equal as they can be, so that concurrent parts finish
    together (10 MiB in 8 MiB parts is two of 5, not 8 and 2)."""
    if length <= 0:
        return
    count = -(-length // size)
    step = -(-length // count)
    for start in range(0, length, step):
        yield offset + start, min(step, length - start)


def is_s3(fs: Any) -> bool:
    """Whether ``fs`` is s3fs's filesystem, whose S3 calls encfs makes itself (ranged reads with
    ``If-Match``, concurrent multipart uploads). The one place encfs decides it."""
    return type(fs).__name__ == "S3FileSystem"


def fresh_instance(fs: Any) -> Any:
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
        self._fs: ForkLocal[Any] = ForkLocal(lambda: fresh_instance(fs), initial=fs)

    @property
    def fs(self) -> Any:
        """The target filesystem; in a forked child, a new instance of it (own client and loop)."""
        return self._fs.get()

    def read_at(self, offset: int, n: int) -> bytes:
        """Exactly ``n`` bytes at ``offset``: from a piece already read, else one request. A
        read at offset 0 of a small object reads all of it (kept as a piece)."""
        known = self.known(offset, n)
        if known is not None:
            return known
        if offset == 0 and self.size <= SMALL_OBJECT:
            self.pieces[0] = self._get(0, self.size)
            return self.pieces[0][:n]
        data = self._get(offset, n)
        if offset == 0 or offset + n == self.size:
            self.pieces[offset] = data
        return data

    def preload(self, head: int, tail: int) -> None:
        """Fetch the first ``head`` and last ``tail`` bytes together (two requests in flight at
        once: an open's header and final chunks cost one round trip), unless already known."""
        wanted = [(0, min(head, self.size)), (max(0, self.size - tail), min(tail, self.size))]
        wanted = [(o, n) for o, n in wanted if n and self.known(o, n) is None]
        if self.size <= SMALL_OBJECT or len(wanted) < 2:
            return
        for (o, _), data in zip(wanted, run_all([lambda o=o, n=n: self._get(o, n) for o, n in wanted])):
            self.pieces[o] = data

    def get(self, offset: int, n: int) -> bytes:
        """Exactly ``n`` bytes at ``offset``: a piece already read, else one request (not kept)."""
        known = self.known(offset, n)
        return known if known is not None else self._get(offset, n)

    def read_into(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` from ``offset`` exactly (one request unless already read)."""
        view[:] = self.get(offset, len(view))

    def known(self, offset: int, n: int) -> bytes | None:
        """Bytes ``offset..+n`` if already read, else None (no request)."""
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
    if etag is not None and is_s3(fs):
        from s3fs.core import _fetch_range
        from s3fs.utils import FileExpired

        bucket, key, version = fs.split_path(path)
        try:
            return _fetch_range(fs, bucket, key, version, start, end, req_kw={"IfMatch": etag}, details={"name": path, "ETag": etag})
        except OSError as e:
            if precondition_failed(e):
                raise FileExpired(filename=path, e_tag=etag) from e
            raise
    return fs.cat_file(path, start=start, end=end)


def precondition_failed(e: OSError) -> bool:
    """Whether s3fs's error is S3's 412 (an ``If-Match`` that no longer holds: the object was
    replaced)."""
    return bool(e.args) and e.args[0] == errno.EINVAL and "pre-conditions" in str(e.args[-1])


STRONG_STAMPS = ("ETag", "etag", "generation", "VersionId", "version_id")
"""Listing fields that name one version of an object exactly (s3fs, gcsfs, adlfs)."""


class PieceCache:
    """The header region (header and payload prefix) each object version had when it was opened,
    so that opening it again costs one request (its final chunk, which still proves the version
    on S3 by ``If-Match`` and is authenticated under this header's keys elsewhere). Only versions
    named by a strong validator (ETag, generation, version id) are kept: a modification time in
    whole seconds names two versions alike. Ciphertext only, bounded, least recently used dropped
    first; a forked child starts empty."""

    def __init__(self, max_entries: int = 4096):
        self.max_entries = max_entries
        self._state: ForkLocal[tuple[threading.Lock, OrderedDict[tuple, bytes]]] = ForkLocal(lambda: (threading.Lock(), OrderedDict()))

    @staticmethod
    def key(entry: dict) -> tuple | None:
        stamp = next((entry[k] for k in STRONG_STAMPS if entry.get(k)), None)
        return None if stamp is None else (entry["name"], entry["size"], str(stamp))

    def get(self, key: tuple | None) -> dict[int, bytes]:
        if key is None:
            return {}
        lock, items = self._state.get()
        with lock:
            head = items.get(key)
            if head is None:
                return {}
            items.move_to_end(key)
            return {0: head}

    def put(self, key: tuple | None, head: bytes) -> None:
        if key is None:
            return
        lock, items = self._state.get()
        with lock:
            items[key] = head
            items.move_to_end(key)
            while len(items) > self.max_entries:
                items.popitem(last=False)

    def clear(self) -> None:
        lock, items = self._state.get()
        with lock:
            items.clear()
