"""Rewrapping: change who can open a file without touching its payload.

The file key, file id and payload stay as they are; only the stanzas and the header MAC
change. On local disk the file is opened once and locked (``flock``) for the whole
operation; when the new header fits the reserved header length it is written in place (one
``pwrite`` at offset 0, then ``fsync``), otherwise the file is rewritten as new header + the
same payload bytes to a temporary file and renamed over the original. On other filesystems
the rewrite always goes through an atomic sink, reading header and payload from one handle.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from . import format as fmt
from .errors import EncfsError
from .keys import KeyRing, Recipient
from .reader import pread_exact
from .sink import LocalSink, Sink, fill_atomically, open_sink

COPY_BLOCK = 4 << 20


@dataclass
class RewrapResult:
    header: fmt.Header
    in_place: bool
    removed: list[str]
    added: list[str]


def _read_header(read_at: Callable[[int, int], bytes], size: int) -> fmt.Header:
    head = read_at(0, min(size, 4096))
    length = fmt.parse_prefix(head)
    if len(head) < length:
        head += read_at(len(head), length - len(head))
    fmt.plaintext_size(size, length)
    return fmt.parse(head)


def _reheader(header: fmt.Header, keyring: KeyRing, add: Sequence[Recipient], remove: Sequence[str]) -> tuple[bytes, RewrapResult]:
    """The new header bytes (in the old length when they fit) and what changed."""
    file_key = keyring.unwrap(header)
    try:
        fmt.verify(header, file_key)
        keep, removed = [], []
        for s in header.stanzas:
            (removed if s.label in remove or s.key_id.hex() in remove else keep).append(s)
        missing = set(remove) - {s.label for s in removed} - {s.key_id.hex() for s in removed}
        if missing:
            raise EncfsError(f"no stanza matches {sorted(missing)}; the file has {header.labels()}")
        new = [r.wrap(file_key, header.context) for r in add]
        if not keep + new:
            raise EncfsError("refusing to remove every recipient: nobody could open the file")
        out = fmt.Header(header.file_id, keep + new)
        try:
            head = fmt.seal(out, file_key, length=header.length)
        except fmt.FormatError:
            head = fmt.seal(out, file_key)
    finally:
        file_key.wipe()
    return head, RewrapResult(out, out.length == header.length, [s.label for s in removed], [s.label for s in new])


def _copy_payload(read_at: Callable[[int, int], bytes], start: int, size: int, sink: Sink) -> None:
    pos = start
    while pos < size:
        block = read_at(pos, min(COPY_BLOCK, size - pos))
        if not block:
            raise EncfsError("file shrank during rewrap; nothing was changed")
        sink.write(block)
        pos += len(block)


def _write_header_in_place(path: str, ino: int, head: bytes) -> bool:
    """One positional write of the new header at offset 0, then fsync; False if the file
    cannot be opened for writing (the caller falls back to rewriting it)."""
    try:
        wfd = os.open(path, os.O_WRONLY)
    except PermissionError:
        return False
    try:
        if os.fstat(wfd).st_ino != ino:
            raise EncfsError(f"{path} was replaced while it was being rewrapped; run rewrap again")
        view, pos = memoryview(head), 0
        while pos < len(view):
            pos += os.pwrite(wfd, view[pos:], pos)
        os.fsync(wfd)
    finally:
        os.close(wfd)
    if os.stat(path).st_ino != ino:
        raise EncfsError(f"{path} was replaced while it was being rewrapped; run rewrap again")
    return True


def _rewrap_local(path: str, keyring: KeyRing, add: Sequence[Recipient], remove: Sequence[str], in_place: bool) -> RewrapResult:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        st = os.fstat(fd)
        read_at = lambda off, n: pread_exact(fd, off, n)  # noqa: E731
        header = _read_header(read_at, st.st_size)
        head, res = _reheader(header, keyring, add, remove)
        if in_place and res.in_place and _write_header_in_place(path, st.st_ino, head):
            return res
        def fill(sink: Sink) -> None:
            sink.write(head)
            _copy_payload(read_at, header.length, st.st_size, sink)
            if os.fstat(fd).st_size != st.st_size or os.stat(path).st_ino != st.st_ino:
                raise EncfsError(f"{path} changed while it was being rewrapped; nothing was changed")

        fill_atomically(LocalSink(path), fill)
        res.in_place = False
        return res
    finally:
        os.close(fd)


def rewrap(
    fs: AbstractFileSystem,
    path: str,
    keyring: KeyRing,
    add: Sequence[Recipient] = (),
    remove: Sequence[str] = (),
    in_place: bool = True,
) -> RewrapResult:
    """Add recipients and/or remove stanzas (by label ``type:keyidhex`` or key id hex)."""
    if isinstance(fs, LocalFileSystem):
        return _rewrap_local(fs._strip_protocol(path), keyring, add, remove, in_place)
    with fs.open(path, "rb") as src:
        size = src.seek(0, os.SEEK_END)

        def read_at(off: int, n: int) -> Any:
            src.seek(off)
            return src.read(n)

        header = _read_header(read_at, size)
        head, res = _reheader(header, keyring, add, remove)

        def fill(sink: Sink) -> None:
            sink.write(head)
            _copy_payload(read_at, header.length, size, sink)

        fill_atomically(open_sink(fs, path), fill)
    res.in_place = False
    return res
