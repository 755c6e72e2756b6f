"""Atomic destinations: a ciphertext appears at its path whole, or not at all.

Local disk: a hidden temporary file beside the destination, fsync, ``os.replace``.
Object stores with transactional uploads (S3, GCS, Azure): ``autocommit=False`` and an
explicit commit; on error the multipart upload is aborted. Anything else: a temporary
object beside the destination, then ``mv``.
"""

from __future__ import annotations

import os
import posixpath
import secrets
from typing import Callable, Protocol

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

TEMP_MARK = ".encfs-tmp-"
_TRANSACTIONAL = {"s3", "s3a", "gs", "gcs", "abfs", "az", "adl", "abfss"}


class Sink(Protocol):
    def write(self, data: bytes | memoryview) -> int: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


def is_temp_name(path: str) -> bool:
    return TEMP_MARK in posixpath.basename(path)


def temp_name(path: str) -> str:
    parent, name = posixpath.split(path)
    return posixpath.join(parent, f".{name}{TEMP_MARK}{secrets.token_hex(6)}")


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


class LocalSink:
    """Temporary file beside the destination, then an atomic rename (or, for ``exclusive``,
    a hard link that fails if the destination exists).

    The temporary file is created private (0600); at commit it takes ``mode``, else an
    existing destination's permission bits, else the umask default. A destination that is a
    symlink owned by the current user is written at its target; anyone else's symlink is
    replaced, never followed (a planted link must not redirect a write)."""

    def __init__(self, path: str, exclusive: bool = False, mode: int | None = None):
        if os.path.islink(path) and os.lstat(path).st_uid == os.getuid():
            path = os.path.realpath(path)
        self.path = os.path.abspath(path)
        self.exclusive = exclusive
        if exclusive and os.path.lexists(self.path):
            raise FileExistsError(self.path)
        if mode is None:
            try:
                mode = os.stat(self.path, follow_symlinks=False).st_mode & 0o7777
            except FileNotFoundError:
                mode = 0o666 & ~_umask()
        self.mode = mode
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self.tmp = temp_name(self.path)
        self._f = os.fdopen(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")

    def write(self, data: bytes | memoryview) -> int:
        return self._f.write(data)

    def commit(self) -> None:
        self._f.flush()
        os.fchmod(self._f.fileno(), self.mode)
        os.fsync(self._f.fileno())
        self._f.close()
        if self.exclusive:
            self._link_exclusive()
        else:
            os.replace(self.tmp, self.path)
        try:
            dfd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _link_exclusive(self) -> None:
        """Publish only if the destination is still absent: ``link`` fails if it exists. Where
        the filesystem has no hard links, fall back to a check then rename (not race-free)."""
        try:
            os.link(self.tmp, self.path)
        except FileExistsError:
            os.unlink(self.tmp)
            raise
        except OSError:
            if os.path.lexists(self.path):
                os.unlink(self.tmp)
                raise FileExistsError(self.path) from None
            os.replace(self.tmp, self.path)
        else:
            os.unlink(self.tmp)

    def abort(self) -> None:
        self._f.close()
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


class UploadSink:
    """An upload committed explicitly; ``abort`` discards it (aborts the multipart upload)."""

    def __init__(self, fs: AbstractFileSystem, path: str, block_size: int | None):
        kw = {"block_size": block_size} if block_size else {}
        self._f = fs.open(path, "wb", autocommit=False, **kw)

    def write(self, data: bytes | memoryview) -> int:
        return self._f.write(data)

    def commit(self) -> None:
        self._f.close()
        self._f.commit()

    def abort(self) -> None:
        try:
            self._f.discard()
        finally:
            self._f.closed = True


class RenameSink:
    def __init__(self, fs: AbstractFileSystem, path: str):
        self.fs, self.path, self.tmp = fs, path, temp_name(path)
        self._f = fs.open(self.tmp, "wb")

    def write(self, data: bytes | memoryview) -> int:
        return self._f.write(bytes(data))

    def commit(self) -> None:
        self._f.close()
        self.fs.mv(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self._f.close()
        finally:
            if self.fs.exists(self.tmp):
                self.fs.rm(self.tmp)


def fill_atomically(sink: Sink, fill: Callable[[Sink], None]) -> None:
    """Run ``fill(sink)`` then commit; on any error (or interrupt) abort, so nothing appears."""
    try:
        fill(sink)
        sink.commit()
    except BaseException:
        sink.abort()
        raise


def open_sink(fs: AbstractFileSystem, path: str, block_size: int | None = None, exclusive: bool = False) -> Sink:
    """An atomic sink for ``path``. ``exclusive`` refuses an existing destination: atomically
    on local disk, by an up-front check elsewhere (object stores have no portable create-if-absent)."""
    if isinstance(fs, LocalFileSystem):
        return LocalSink(fs._strip_protocol(path), exclusive)
    if exclusive and fs.exists(path):
        raise FileExistsError(path)
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & _TRANSACTIONAL:
        return UploadSink(fs, path, block_size)
    return RenameSink(fs, path)
