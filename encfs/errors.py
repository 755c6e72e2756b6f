"""Typed errors. Messages never contain key bytes. An error raised while a file is read or
written names that file once, wherever it surfaces (pandas, pyarrow, the CLI, a DataLoader
worker): ``path`` holds it, and the message starts with it (``naming``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

CHUNK_SIZE = 16384  # plaintext bytes per chunk (cobblestone.CHUNK_SIZE; no import cycle)


class EncfsError(Exception):
    """Base class of every error encfs raises on purpose. ``path``: the file it concerns."""

    path: str | None = None


def with_path(error: EncfsError, path: str) -> EncfsError:
    """Name ``path`` in ``error`` unless it already names a file (set once, at the file's layer)."""
    if error.path is None and path:
        error.path = path
        if error.args and isinstance(error.args[0], str):
            error.args = (f"{path}: {error.args[0]}", *error.args[1:])
    return error


@contextlib.contextmanager
def naming(path: str) -> Iterator[None]:
    """Encfs errors raised inside the block name ``path``; so do its audit log lines."""
    from .audit import file_path  # here: encfs.audit imports this module

    with file_path(path):
        try:
            yield
        except EncfsError as e:
            raise with_path(e, path)


class FormatError(EncfsError, ValueError):
    """The bytes are not a well-formed encfs file (bad magic, version, suite, field, size)."""


class HeaderFullError(EncfsError, ValueError):
    """The recipients do not fit the header length a writer was given (docs/FORMAT.md §4)."""


class IntegrityError(EncfsError):
    """Authentication failed: a chunk, the commitment or the header MAC did not verify.

    ``chunk_index`` names the first chunk that failed (None for header/commitment) and
    ``offset`` the absolute plaintext offset where verified data ends (that chunk's start).
    ``verified_bytes`` is how many bytes of the failing call's own buffer hold verified
    plaintext (the rest is zeroed): set by the call the user made.
    """

    def __init__(self, message: str, *, chunk_index: int | None = None, verified_bytes: int = 0):
        super().__init__(message)
        self.chunk_index = chunk_index
        self.verified_bytes = verified_bytes

    @property
    def offset(self) -> int | None:
        return None if self.chunk_index is None else self.chunk_index * CHUNK_SIZE


class SignatureError(IntegrityError):
    """The reader trusts signer keys (``signers=``) and the file carries no valid signature by
    any of them (docs/FORMAT.md §1.5). ``signers``: the labels of the signatures it does carry."""

    def __init__(self, message: str, *, signers: list[str] | None = None):
        super().__init__(message)
        self.signers = list(signers or [])


class NoMatchingKeyError(EncfsError):
    """None of the configured identities can unwrap any stanza of the header."""

    def __init__(self, message: str, *, key_ids: list[str] | None = None):
        super().__init__(message)
        self.key_ids = list(key_ids or [])


class KeyReferenceError(EncfsError, ValueError):
    """A key reference string is malformed, or the key it names cannot be loaded."""


class ConfigError(EncfsError, ValueError):
    """A setting (an ``ENCFS_*`` environment variable, an option) has a value encfs cannot use."""


class TransactionError(EncfsError):
    """A commit inside ``fs.transaction`` failed: ``committed`` lists the files that appeared
    before it, ``failed`` the one that did not; it and every later file were discarded."""

    def __init__(self, message: str, *, committed: list[str], failed: str):
        super().__init__(message)
        self.committed = list(committed)
        self.failed = failed


class FileChangedError(EncfsError, OSError):
    """The file was replaced or rewritten while it was open for reading (an object store's
    version check failed); reopen it to read the new version."""


class AuditError(EncfsError):
    """The audit log is on (``$ENCFS_AUDIT_LOG``, ``encfs.audit.configure``) and the line for a key
    operation could not be written, so the operation failed (fail closed; see ``encfs.audit``)."""
