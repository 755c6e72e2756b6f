"""Rewrapping: change who can open a file without touching its payload.

The file key, file id and payload stay as they are; only the stanzas and the header MAC
change. On local disk the file is opened once and locked (``flock``) for the whole
operation; when the new header fits the file's header length it is written in place (one
``pwrite`` at offset 0, then ``fsync``), otherwise the file is rewritten as new header + the
same payload bytes to a temporary file and renamed over the original. On other filesystems
the rewrite always goes through an atomic sink, reading header and payload from one handle;
on S3 a large object is rebuilt as the new header + its payload copied server-side (``s3copy``).
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from typing import Any, Sequence, Union

from fsspec import AbstractFileSystem

from . import audit
from . import format as fmt
from . import s3copy
from .copying import RangeReader, copy_stream
from .errors import EncfsError, naming
from .header import read_signed_header, unlock
from .keys import KeyRing, Recipient
from .keys.base import key_label
from .remote import is_s3
from .sink import LocalSink, Sink, fill_atomically, is_local, open_sink
from .target import Target


Removal = Union[str, Any]
"""What ``rewrap`` removes: a stanza label or key id hex, or a key object with ``owns(stanza)``."""


@dataclass
class RewrapResult:
    header: fmt.Header
    in_place: bool
    removed: list[str]
    added: list[str]


def _reheader(
    header: fmt.Header, keyring: KeyRing, add: Sequence[Recipient], remove: Sequence[Removal], header_length: int | None
) -> tuple[bytes, RewrapResult]:
    """The new header bytes and what changed. The header keeps its length (so the file keeps the
    length listings assume) unless a larger ``header_length`` is asked for; stanzas that do not
    fit are a ``HeaderFullError``. ``header`` comes from ``read_signed_header``: a keyring that
    trusts signers never gives a recipient a forged file."""
    file_key = unlock(header, keyring)
    try:
        keep, removed = [], []
        for s in header.stanzas:
            (removed if any(names(r, s) for r in remove) else keep).append(s)
        missing = sorted(getattr(r, "label", str(r)) for r in remove if not any(names(r, s) for s in header.stanzas))
        if missing:
            raise EncfsError(f"no stanza matches {missing}; the file has {header.labels()}")
        new = [r.wrap(file_key, header.context) for r in add if not has_recipient(keep, r)]  # (never the same recipient twice)
        if not keep + new:
            raise EncfsError("refusing to remove every recipient: nobody could open the file")
        out = fmt.Header(header.file_id, keep + new)
        head = fmt.seal(out, file_key, max(header.length, header_length or 0))
        # Logged before the new header is written: a rewrap never takes effect unlogged.
        audit.record(audit.REWRAP, file_id=header.file_id, added=[s.label for s in new], removed=[s.label for s in removed])
    finally:
        file_key.wipe()
    return head, RewrapResult(out, out.length == header.length, [s.label for s in removed], [s.label for s in new])


def has_recipient(stanzas: Sequence[fmt.Stanza], recipient: Any) -> bool:
    """Whether a header already holds a stanza for ``recipient`` (adding it again would only
    duplicate it): by type and key id, or, for a key whose stanzas carry no fixed id, ``owns``.
    A key with neither (a passphrase) is never taken as present: another passphrase is another
    recipient, and the header's own limits decide."""
    if hasattr(recipient, "owns"):
        return any(recipient.owns(s) for s in stanzas)
    kid = getattr(recipient, "key_id", b"")
    return bool(kid) and any(s.type == recipient.type and s.key_id == kid for s in stanzas)


def names(removal: Removal, stanza: fmt.Stanza) -> bool:
    """Whether a removal names ``stanza``: by label (``type:keyidhex``) or key id hex, or, for a
    key whose stanzas carry no fixed id (``kms``: one per session KEK), by the key's ``owns``."""
    if isinstance(removal, str):
        return removal in (stanza.label, stanza.key_id.hex())
    return removal.owns(stanza)


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


def _rewrap_local(
    path: str, keyring: KeyRing, add: Sequence[Recipient], remove: Sequence[Removal], in_place: bool, header_length: int | None
) -> RewrapResult:
    target = Target(open(path, "rb"))
    try:
        fd = target.fd
        assert fd is not None
        fcntl.flock(fd, fcntl.LOCK_EX)
        st = os.fstat(fd)
        header, _ = read_signed_header(target.read_at, st.st_size, keyring)
        head, res = _reheader(header, keyring, add, remove, header_length)
        if in_place and res.in_place and _write_header_in_place(path, st.st_ino, head):
            return res

        def fill(sink: Sink) -> None:
            sink.write(head)
            copy_stream(RangeReader(target.read_into, header.length, st.st_size), sink)
            if os.fstat(fd).st_size != st.st_size or os.stat(path).st_ino != st.st_ino:
                raise EncfsError(f"{path} changed while it was being rewrapped; nothing was changed")

        fill_atomically(LocalSink(path), fill)
        res.in_place = False
        return res
    finally:
        target.close()


def rewrap(
    fs: AbstractFileSystem,
    path: str,
    keyring: KeyRing,
    add: Sequence[Recipient] = (),
    remove: Sequence[Removal] = (),
    in_place: bool = True,
    header_length: int | None = None,
) -> RewrapResult:
    """Add recipients and/or remove stanzas (by label ``type:keyidhex`` or key id hex).
    ``header_length``: grow the header to this length (a rewrite) when the stanzas need it."""
    if header_length is not None:
        fmt.check_header_length(header_length)
    with naming(path), audit.file_path(path):
        try:
            if is_local(fs):
                return _rewrap_local(fs._strip_protocol(path), keyring, add, remove, in_place, header_length)
            if is_s3(fs):  # one version, named by its ETag in every read (s3fs's file would read ahead 50 MiB)
                target: Any = s3copy.open_source(fs, path)
                size = target.size
            else:
                raw = fs.open(path, "rb")
                target, size = Target(raw), raw.seek(0, os.SEEK_END)
            try:
                header, _ = read_signed_header(target.read_at, size, keyring)
                head, res = _reheader(header, keyring, add, remove, header_length)

                def fill(sink: Sink) -> None:
                    sink.write(head)
                    copy_stream(RangeReader(target.read_into, header.length, size), sink)

                if is_s3(fs) and s3copy.copies_tail(target, len(head), header.length):
                    fill_atomically(s3copy.TailCopySink(target, header.length), lambda sink: sink.write(head))
                else:
                    fill_atomically(open_sink(fs, path), fill)
            finally:
                target.close()
            res.in_place = False
            return res
        except Exception as e:
            added = [key_label(r) for r in add]
            audit.record(audit.REWRAP, outcome=audit.FAILED, added=added, removed=[getattr(r, 'label', str(r)) for r in remove], **audit.error_fields(e))
            raise
