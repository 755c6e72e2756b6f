"""The chunk reader: an opened encrypted file with random access by chunk range.

Opening reads the header (one small ranged read), unwraps the file key with the key ring,
checks the header MAC and the payload's key commitment, and derives the chunk key. After
that, ``fetch`` reads the ciphertext of a chunk range and ``decrypt_into`` opens it straight
into a caller's buffer through the cipher backend. Nothing is released from a chunk whose
tag fails.

Reads are positional: ``os.pread`` where the target is a real file descriptor, else seek+read
under a lock. A reader inherited across ``fork()`` (DataLoader workers) reopens its target on
first use instead of sharing the parent's file offset.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from typing import BinaryIO, Callable, Iterator

from . import cobblestone as cs
from . import format as fmt
from .backend import CipherBackend, get_backend
from .errors import FileChangedError, FormatError, IntegrityError
from .keys import KeyRing
from .securemem import cleanse

FIRST_READ = 4096

_reopen_lock = threading.Lock()


def _new_reopen_lock() -> None:
    """A child gets a fresh lock: the parent's may have been held by a thread that isn't there."""
    global _reopen_lock
    _reopen_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_reopen_lock)


def pread_exact(fd: int, offset: int, n: int) -> bytes:
    """Up to ``n`` bytes at ``offset`` (fewer only at end of file), without moving the fd's offset."""
    data = os.pread(fd, n, offset)
    while len(data) < n:
        more = os.pread(fd, n - len(data), offset + len(data))
        if not more:
            break
        data += more
    return data


class ChunkReader:
    def __init__(
        self,
        raw: BinaryIO,
        ciphertext_size: int,
        keyring: KeyRing,
        backend: CipherBackend | None = None,
        name: str = "<file>",
        reopen: Callable[[], BinaryIO] | None = None,
    ):
        self.name = name
        self._reopen = reopen
        self._attach(raw)
        self.ciphertext_size = ciphertext_size
        head = self._pread(0, min(ciphertext_size, FIRST_READ))
        self.header_length = fmt.parse_prefix(head)
        need = self.header_length + cs.PREFIX_SIZE
        if ciphertext_size < need:
            raise FormatError(f"{name}: file too short for its header and payload prefix (truncated)")
        if len(head) < need:
            head += self._pread(len(head), need - len(head))
        self.size = fmt.plaintext_size(ciphertext_size, self.header_length)
        self.header = fmt.parse(head)
        file_key = keyring.unwrap(self.header)
        try:
            fmt.verify(self.header, file_key)
            prefix = head[self.header_length : need]
            self._keys = cs.derive(file_key.view(), prefix[: cs.SALT_SIZE], self.header.context)
        finally:
            file_key.wipe()
        cs.check_commitment(self._keys, prefix[cs.SALT_SIZE :])
        self.chunks = cs.chunk_count(self.size)
        self._cipher = (backend or get_backend()).chunk_cipher(self._keys.key.view(), self._keys.base_nonce)
        self._authenticate_final_chunk(head)

    def _authenticate_final_chunk(self, head: bytes) -> None:
        """Open the final chunk now, so that no size is trusted and no read returns anything
        before the file is known whole: a file cut at a chunk boundary (to a valid-looking
        shorter length, down to an empty payload) fails here, not at end of file. Small files
        are already in ``head``; others cost one read of at most one chunk."""
        last = self.chunks - 1
        offset, ct_len = self._ct_range(last, 1)
        ct = head[offset : offset + ct_len] if offset + ct_len <= len(head) else self.fetch(last, 1)
        scratch = bytearray(ct_len - cs.TAG_SIZE)
        try:
            self.decrypt_into(last, ct, memoryview(scratch))
        except IntegrityError:
            self.close()
            raise IntegrityError(
                f"{self.name}: final chunk {last} failed authentication: the file is truncated or was modified",
                chunk_index=last,
            ) from None
        except BaseException:
            self.close()
            raise
        finally:
            cleanse(scratch)

    def _attach(self, raw: BinaryIO) -> None:
        try:
            fd: int | None = raw.fileno()
        except (AttributeError, OSError, io.UnsupportedOperation):
            fd = None
        self._raw, self._fd, self._lock = raw, fd, threading.Lock()
        self._pid = os.getpid()  # last: a thread that sees this pid sees the fd that goes with it

    def _own_target(self) -> None:
        """After fork(), reopen the target once (threads of the child wait for the first)."""
        if self._pid == os.getpid():
            return
        if self._reopen is None:
            raise RuntimeError(f"{self.name}: reader inherited across fork() and cannot reopen its file")
        with _reopen_lock:
            if self._pid != os.getpid():
                self._attach(self._reopen())

    @property
    def local(self) -> bool:
        """True when reads are positional reads of a local file descriptor."""
        return self._fd is not None

    def _pread(self, offset: int, n: int) -> bytes:
        self._own_target()
        if self._fd is not None:
            data = pread_exact(self._fd, offset, n)
        else:
            with self._lock, self._changed_under_us():
                self._raw.seek(offset)
                data = self._raw.read(n)
        if len(data) != n:
            raise FormatError(f"{self.name}: file shrank while reading (truncated at {offset + len(data)})")
        return data

    @contextlib.contextmanager
    def _changed_under_us(self) -> Iterator[None]:
        """Turn an object store's "the object changed since it was opened" (s3fs's
        ``FileExpired``: its ETag no longer matches) into encfs's ``FileChangedError``."""
        try:
            yield
        except OSError as e:
            if type(e).__name__ != "FileExpired":
                raise
            raise FileChangedError(
                f"{self.name}: the file was replaced or rewritten while it was being read; open it again", path=self.name
            ) from e

    def span(self, first: int, count: int) -> tuple[int, int]:
        """(ciphertext bytes, plaintext bytes) of chunks ``first .. first+count-1``."""
        last = first + count - 1
        if not (0 <= first and count > 0 and last < self.chunks):
            raise ValueError(f"chunk range {first}+{count} outside 0..{self.chunks - 1}")
        pt_start = first * cs.CHUNK_SIZE
        pt = min(count * cs.CHUNK_SIZE, self.size - pt_start)
        ct = pt + count * cs.TAG_SIZE
        return ct, pt

    def _ct_range(self, first: int, count: int) -> tuple[int, int]:
        """(file offset, length) of the ciphertext of chunks ``first .. first+count-1``."""
        return self.header_length + cs.chunk_offset(first), self.span(first, count)[0]

    def fetch(self, first: int, count: int) -> bytes:
        return self._pread(*self._ct_range(first, count))

    def fetch_into(self, first: int, count: int, buf: bytearray) -> memoryview:
        """Like ``fetch``, into a reusable buffer (no allocation on the hot path)."""
        offset, ct_len = self._ct_range(first, count)
        if len(buf) < ct_len:
            raise ValueError("ciphertext buffer too small")
        view = memoryview(buf)[:ct_len]
        self._own_target()
        if self._fd is not None:
            got = 0
            while got < ct_len:
                n = os.preadv(self._fd, [view[got:]], offset + got)
                if not n:
                    break
                got += n
            if got != ct_len:
                raise FormatError(f"{self.name}: file shrank while reading (truncated at {offset + got})")
        else:
            view[:] = self._pread(offset, ct_len)
        return view

    def decrypt_into(self, first: int, ciphertext: bytes | memoryview, out: memoryview) -> int:
        return self._cipher.decrypt_into(first, memoryview(ciphertext), out)

    def open_direct(self, first: int, count: int, out: memoryview) -> int | None:
        """Read and open chunks ``first..+count`` into ``out`` in one backend call, the
        ciphertext going straight into ``out`` (local files, backends that do it); None when
        this reader or backend cannot, and the caller fetches the ciphertext itself."""
        self._own_target()
        if self._fd is None:
            return None
        offset, ct_len = self._ct_range(first, count)
        try:
            return self._cipher.pread_decrypt_into(self._fd, offset, first, ct_len, out)
        except FormatError as e:
            raise FormatError(f"{self.name}: {e}") from None
        except OSError as e:
            raise OSError(e.errno, e.strerror, self.name) from None

    def read_into(self, first: int, count: int, out: memoryview) -> int:
        got = self.open_direct(first, count, out)
        return self.decrypt_into(first, self.fetch(first, count), out) if got is None else got

    def close(self) -> None:
        self._cipher.close()
        self._keys.wipe()
        self._raw.close()
