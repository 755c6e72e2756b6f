"""Rewrapping: change who can open a file without touching its payload.

The file key, file id and payload stay as they are; only the stanzas and the header MAC
change. When the new header fits the reserved header length on local disk, it is written
in place (one write at offset 0, then fsync); otherwise the file is rewritten as new
header + the same payload bytes to a temporary file and renamed over the original.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from . import format as fmt
from .errors import EncfsError
from .keys import KeyRing, Recipient
from .sink import open_sink

COPY_BLOCK = 4 << 20


@dataclass
class RewrapResult:
    header: fmt.Header
    in_place: bool
    removed: list[str]
    added: list[str]


def _read_header(fs: AbstractFileSystem, path: str) -> tuple[fmt.Header, int]:
    size = fs.size(path)
    with fs.open(path, "rb") as f:
        head = f.read(min(size, 4096))
        length = fmt.parse_prefix(head)
        if len(head) < length:
            head += f.read(length - len(head))
    fmt.plaintext_size(size, length)
    return fmt.parse(head), size


def rewrap(
    fs: AbstractFileSystem,
    path: str,
    keyring: KeyRing,
    add: Sequence[Recipient] = (),
    remove: Sequence[str] = (),
    in_place: bool = True,
) -> RewrapResult:
    """Add recipients and/or remove stanzas (by label ``type:keyidhex`` or key id hex)."""
    header, size = _read_header(fs, path)
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
        stanzas = keep + new
        if not stanzas:
            raise EncfsError("refusing to remove every recipient: nobody could open the file")
        old_length = header.length
        out = fmt.Header(header.file_id, stanzas)
        try:
            head = fmt.seal(out, file_key, length=old_length)
        except fmt.FormatError:
            head = fmt.seal(out, file_key)
    finally:
        file_key.wipe()
    local = isinstance(fs, LocalFileSystem)
    if in_place and local and out.length == old_length:
        fd = os.open(fs._strip_protocol(path), os.O_WRONLY)
        try:
            os.pwrite(fd, head, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        done_in_place = True
    else:
        sink = open_sink(fs, path)
        try:
            sink.write(head)
            with fs.open(path, "rb") as src:
                src.seek(old_length)
                remaining = size - old_length
                while remaining:
                    block = src.read(min(COPY_BLOCK, remaining))
                    if not block:
                        raise EncfsError(f"{path} shrank during rewrap")
                    sink.write(block)
                    remaining -= len(block)
        except BaseException:
            sink.abort()
            raise
        sink.commit()
        done_in_place = False
    return RewrapResult(out, done_in_place, [s.label for s in removed], [s.label for s in new])
