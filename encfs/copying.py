"""One copy loop for every copy encfs makes (encrypting, decrypting, rewrapping): a reused
buffer, zeroed afterwards since it may have held plaintext."""

from __future__ import annotations

from typing import Any, Callable

from .securemem import cleanse

COPY_BLOCK = 4 << 20


def copy_stream(src: Any, dst: Any, progress: Callable[[int], Any] = lambda n: None) -> int:
    """Copy ``src`` (anything with ``readinto``) to ``dst`` (anything with ``write``); return
    the bytes copied."""
    buf = bytearray(COPY_BLOCK)
    mv = memoryview(buf)
    total = used = 0
    try:
        while True:
            n = src.readinto(mv)
            if not n:
                return total
            used = max(used, n)
            write_all(dst, mv[:n])
            total += n
            progress(n)
    finally:
        cleanse(mv[:used])


def write_all(dst: Any, data: memoryview) -> None:
    """``dst.write`` until all of ``data`` is written. A buffered stream may accept only part of
    a large write and drop the error that stopped it (stdout to a pipe that closed): writing
    the rest raises it, so output is never cut short silently."""
    while len(data):
        n = dst.write(data)
        if n is None:
            return
        if n <= 0:
            raise OSError(f"write accepted {n} of {len(data)} bytes")
        data = data[n:]


class RangeReader:
    """``readinto`` over bytes ``start..end`` of something read by position
    (``read_into(offset, view)`` filling ``view`` exactly), for ``copy_stream``."""

    def __init__(self, read_into: Callable[[int, memoryview], None], start: int, end: int):
        self._read_into, self._pos, self._end = read_into, start, end

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")[: max(0, self._end - self._pos)]
        if len(view):
            self._read_into(self._pos, view)
            self._pos += len(view)
        return len(view)
