"""Atomic destinations: a ciphertext appears at its path whole, or not at all.

Local disk: a hidden temporary file beside the destination, fsync (unless not ``durable``),
``os.replace``.
S3: a multipart upload of our own, parts sent concurrently, completed on commit and aborted on
error. Other object stores with transactional uploads (GCS, Azure): ``autocommit=False`` and an
explicit commit; on error the upload is aborted. Anything else: a temporary
object beside the destination, then ``mv``.
"""

from __future__ import annotations

import fcntl
import os
import posixpath
import secrets
import stat
import threading
import time
from concurrent.futures import Future
from typing import Callable, Protocol

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from .copying import write_all
from .pipeline import Pipeline
from .remote import is_s3, part_size

TEMP_MARK = ".encfs-tmp-"
STALE_AFTER = 60.0
"""Seconds a temporary file must be untouched before it counts as stale (with a free lock)."""
_TRANSACTIONAL = {"s3", "s3a", "gs", "gcs", "abfs", "az", "adl", "abfss"}
S3_MIN_PART = 5 << 20
S3_MAX_PART = 5 << 30
S3_MAX_PARTS = 10_000


class Sink(Protocol):
    def write(self, data: bytes | memoryview) -> int: ...
    def commit(self) -> None: ...
    def discard(self) -> None: ...


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

    The temporary file is created private (0600) and held under ``flock`` while it is
    written, so that a later writer can tell one left by a killed process (its lock is gone)
    from one still being written, and remove it (``remove_stale_temporaries``, run once per
    directory and process on the first write there). At commit the file takes ``mode``, else
    the permission bits of the regular file it replaces, else the umask default; never a
    symlink's. A destination that is a symlink owned by the current user is written at its
    target; anyone else's symlink is replaced, never followed (a planted link must not
    redirect a write). ``hold=True`` keeps the lock after commit until ``release()``."""

    def __init__(self, path: str, exclusive: bool = False, mode: int | None = None, hold: bool = False, durable: bool = True):
        self._hold, self.durable = hold, durable
        if os.path.islink(path) and os.lstat(path).st_uid == os.getuid():
            path = os.path.realpath(path)
        self.path = os.path.abspath(path)
        self.exclusive = exclusive
        if exclusive and os.path.lexists(self.path):
            raise FileExistsError(self.path)
        self.mode = _replaced_mode(self.path) if mode is None else mode
        parent = os.path.dirname(self.path) or "."
        os.makedirs(parent, exist_ok=True)
        _clean_once(parent)
        self.tmp = temp_name(self.path)
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass  # no flock here (some network filesystems): only age then tells stale files
        self._f = os.fdopen(fd, "wb")

    def write(self, data: bytes | memoryview) -> int:
        write_all(self._f, memoryview(data))
        return len(data)

    def commit(self) -> None:
        self._f.flush()
        os.fchmod(self._f.fileno(), self.mode)
        if self.durable:
            os.fsync(self._f.fileno())
        if self.exclusive:
            self._link_exclusive()
        else:
            os.replace(self.tmp, self.path)
        if not self._hold:
            self._f.close()
        if not self.durable:
            return
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
            raise
        except OSError:
            if os.path.lexists(self.path):
                raise FileExistsError(self.path) from None
            os.replace(self.tmp, self.path)
        else:
            os.unlink(self.tmp)

    def release(self) -> None:
        """Drop the lock a ``hold=True`` sink keeps on its committed file (a staging file that
        must not look stale to another process's clean-up until it is renamed into place)."""
        self._f.close()

    def discard(self) -> None:
        """Remove the temporary file, even when closing it fails (a full disk fails the flush)."""
        try:
            self._f.close()
        except OSError:
            pass
        finally:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass


def _replaced_mode(path: str) -> int:
    """Permission bits for a new file at ``path``: those of the regular file it replaces,
    else the umask default (a symlink's 0777 or a device's bits are never copied)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISREG(st.st_mode):
        return st.st_mode & 0o777
    return 0o666 & ~_umask()


_cleaned: set[str] = set()
_cleaned_lock = threading.Lock()


def _clean_once(directory: str) -> None:
    with _cleaned_lock:
        if directory in _cleaned:
            return
        if len(_cleaned) > 10_000:
            _cleaned.clear()
        _cleaned.add(directory)
    try:
        remove_stale_temporaries(None, directory)
    except OSError:
        pass


def remove_stale_temporaries(fs: AbstractFileSystem | None, directory: str, older_than: float = STALE_AFTER) -> list[str]:
    """Delete encfs's own temporaries in ``directory`` that no live writer holds: on local
    disk, those whose ``flock`` is free (the writer was killed) and older than ``older_than``
    seconds; elsewhere (no locks), those older than ``older_than``. Returns what was removed.
    Files of any other name are never touched."""
    if fs is None or is_local(fs):
        return _remove_stale_local(directory if fs is None else fs._strip_protocol(directory), older_than)
    removed = []
    now = time.time()
    for entry in fs.ls(directory, detail=True):
        if entry.get("type") != "file" or not is_temp_name(entry["name"]):
            continue
        mtime = _mtime(entry)
        if mtime is not None and now - mtime >= older_than:
            fs.rm_file(entry["name"])
            removed.append(entry["name"])
    return removed


def _remove_stale_local(directory: str, older_than: float) -> list[str]:
    removed = []
    now = time.time()
    with os.scandir(directory) as it:
        names = [e.path for e in it if TEMP_MARK in e.name and e.is_file(follow_symlinks=False)]
    for path in names:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if now - os.fstat(fd).st_mtime < older_than:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer holds it
            except OSError:
                pass
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)
    return removed


def _mtime(entry: dict) -> float | None:
    for k in ("mtime", "LastModified", "last_modified", "created"):
        v = entry.get(k)
        if v is None:
            continue
        return v.timestamp() if hasattr(v, "timestamp") else float(v)
    return None


class UploadSink:
    """An upload committed explicitly (GCS, Azure: the target's ``autocommit=False`` file);
    ``discard`` aborts it. Blocks of ``part_size()`` go to the target file on a thread of their
    own, in order, while the writer encrypts the next ones (at most ``inflight`` blocks held):
    these stores take a resumable upload's pieces one after another, so upload and encryption
    overlap rather than the pieces. A failed block fails the next write, or the commit."""

    def __init__(self, fs: AbstractFileSystem, path: str, block_size: int | None, inflight: int = 2):
        kw = {"block_size": block_size} if block_size else {}
        self._f = fs.open(path, "wb", autocommit=False, **kw)
        self.block = max(block_size or 0, part_size())
        self._buf = bytearray()
        self._uploads = Pipeline(inflight, "encfs-upload")

    def write(self, data: bytes | memoryview) -> int:
        self._buf += data
        while len(self._buf) >= self.block:
            self._uploads.put(write_all, self._f, memoryview(bytes(self._buf[: self.block])))
            del self._buf[: self.block]
        return len(data)

    def commit(self) -> None:
        self._uploads.drain()
        write_all(self._f, memoryview(bytes(self._buf)))
        self._buf = bytearray()
        self._f.close()
        self._f.commit()

    def discard(self) -> None:
        self._buf = bytearray()
        try:
            self._uploads.abandon()
        finally:
            try:
                self._f.discard()
            finally:
                self._f.closed = True


class S3UploadSink:
    """An S3 object written as a multipart upload whose parts go up concurrently (on the I/O
    pool) while the writer encrypts the next ones; at most ``inflight`` parts are held in
    memory. Parts grow (twice as large every 1000) so that an object of any size S3 allows
    fits its 10,000 parts. Nothing is visible until ``commit`` completes the upload (a small
    object is one ``PutObject``); ``discard``, or any failure, aborts it: no object, no parts."""

    def __init__(self, fs: AbstractFileSystem, path: str, part: int | None = None, inflight: int = 8):
        self.fs, self.path = fs, path
        self.bucket, self.key, _ = fs.split_path(path)  # type: ignore[attr-defined]
        self.first_part = max(S3_MIN_PART, part or part_size())
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._parts: list[Future[dict]] = []
        self._uploads = Pipeline(inflight, ordered=False)

    @property
    def part(self) -> int:
        """The size of the next part."""
        return min(S3_MAX_PART, self.first_part << (len(self._parts) // 1000))

    def write(self, data: bytes | memoryview) -> int:
        self._buf += data
        while len(self._buf) >= self.part:
            n = self.part
            self._send(bytes(self._buf[:n]))
            del self._buf[:n]
        return len(data)

    def _send(self, body: bytes) -> None:
        if self._upload_id is None:
            self._upload_id = self.fs.call_s3("create_multipart_upload", Bucket=self.bucket, Key=self.key)["UploadId"]  # type: ignore[attr-defined]
        if len(self._parts) >= S3_MAX_PARTS:
            raise OSError(f"{self.path}: more than {S3_MAX_PARTS} parts; S3 refuses the object")
        self._parts.append(self._uploads.put(self._upload, len(self._parts) + 1, body))

    def _upload(self, number: int, body: bytes) -> dict:
        out = self.fs.call_s3(  # type: ignore[attr-defined]
            "upload_part", Bucket=self.bucket, Key=self.key, UploadId=self._upload_id, PartNumber=number, Body=body
        )
        return {"PartNumber": number, "ETag": out["ETag"]}

    def commit(self) -> None:
        if self._upload_id is None:
            self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=bytes(self._buf))  # type: ignore[attr-defined]
        else:
            if self._buf or not self._parts:
                self._send(bytes(self._buf))
            self._uploads.drain()
            parts = [f.result() for f in self._parts]
            self.fs.call_s3(  # type: ignore[attr-defined]
                "complete_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=self._upload_id, MultipartUpload={"Parts": parts}
            )
        self._buf = bytearray()
        self.fs.invalidate_cache(self.path)

    def discard(self) -> None:
        self._buf = bytearray()
        try:
            self._uploads.abandon()
        finally:
            if self._upload_id is not None:
                upload_id, self._upload_id = self._upload_id, None
                self.fs.call_s3("abort_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=upload_id)  # type: ignore[attr-defined]


class RenameSink:
    def __init__(self, fs: AbstractFileSystem, path: str):
        self.fs, self.path, self.tmp = fs, path, temp_name(path)
        self._f = fs.open(self.tmp, "wb")

    def write(self, data: bytes | memoryview) -> int:
        write_all(self._f, memoryview(bytes(data)))
        return len(data)

    def commit(self) -> None:
        self._f.close()
        self.fs.mv(self.tmp, self.path)

    def discard(self) -> None:
        try:
            self._f.close()
        finally:
            if self.fs.exists(self.tmp):
                self.fs.rm(self.tmp)


def fill_atomically(sink: Sink, fill: Callable[[Sink], None]) -> None:
    """Run ``fill(sink)`` then commit; on any error (or interrupt) discard, so nothing appears."""
    try:
        fill(sink)
        sink.commit()
    except BaseException:
        sink.discard()
        raise


def is_local(fs: AbstractFileSystem) -> bool:
    """Whether ``fs`` is local disk: paths are this machine's, renames are atomic, files have
    descriptors. The one place encfs decides it."""
    return isinstance(fs, LocalFileSystem)


def open_sink(fs: AbstractFileSystem, path: str, block_size: int | None = None, exclusive: bool = False, durable: bool = True) -> Sink:
    """An atomic sink for ``path``. ``exclusive`` refuses an existing destination: atomically
    on local disk, by an up-front check elsewhere (object stores have no portable create-if-absent).
    ``durable``: on local disk, fsync the file and its directory before it counts as written."""
    if is_local(fs):
        return LocalSink(fs._strip_protocol(path), exclusive, durable=durable)
    if exclusive and fs.exists(path):
        raise FileExistsError(path)
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if is_s3(fs):
        return S3UploadSink(fs, path, block_size)
    if protocols & _TRANSACTIONAL:
        return UploadSink(fs, path, block_size)
    return RenameSink(fs, path)
