"""Typed errors. Messages never contain key bytes."""

from __future__ import annotations


class EncfsError(Exception):
    """Base class of every error encfs raises on purpose."""


class FormatError(EncfsError, ValueError):
    """The bytes are not a well-formed encfs file (bad magic, version, suite, field, size)."""


class IntegrityError(EncfsError):
    """Authentication failed: a chunk, the commitment or the header MAC did not verify.

    ``chunk_index`` names the first chunk that failed (None for header/commitment);
    ``verified_bytes`` is how much plaintext before it was verified and released.
    """

    def __init__(self, message: str, *, chunk_index: int | None = None, verified_bytes: int = 0):
        super().__init__(message)
        self.chunk_index = chunk_index
        self.verified_bytes = verified_bytes


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

    def __init__(self, message: str, *, path: str = ""):
        super().__init__(message)
        self.path = path
