"""The payload writer: seals a plaintext stream into ``header || payload`` on a sink, with
memory bounded by one block of chunks whatever the file size. Plaintext waiting for a whole
block sits in locked memory that is wiped when the writer ends; whole blocks written at once
are sealed straight from the caller's buffer.

Any failure poisons the writer: the sink is aborted at once and every later call raises, so
a caller that ignores an error cannot go on to commit a file with a hole in it."""

from __future__ import annotations

import os

from . import cobblestone as cs
from . import format as fmt
from .backend import CipherBackend, get_backend, split_plaintext
from .errors import EncfsError
from .keys import KeyRing, new_file_key
from .securemem import SecureBuffer
from .sink import Sink

DEFAULT_BLOCK_CHUNKS = 256


class _Discarded(EncfsError):
    """Marks a writer thrown away on purpose (not a failed write)."""


class PayloadWriter:
    def __init__(self, sink: Sink, keyring: KeyRing, backend: CipherBackend | None = None, block_chunks: int = DEFAULT_BLOCK_CHUNKS):
        self._sink = sink
        self._index = 0
        self._block = block_chunks * cs.CHUNK_SIZE
        self._pending: SecureBuffer | None = None
        self._fill = 0
        self._out = bytearray(block_chunks * cs.CT_CHUNK_SIZE)
        self.plaintext_written = 0
        self._failed: BaseException | None = None
        self._sealed = False
        try:
            file_key = new_file_key()
            try:
                header = fmt.Header(fmt.new_file_id(), [])
                header.stanzas = [r.wrap(file_key, header.context) for r in keyring.recipients()]
                head = fmt.seal(header, file_key)
                salt = os.urandom(cs.SALT_SIZE)
                self._keys = cs.derive(file_key.view(), salt, header.context)
            finally:
                file_key.wipe()
            self.header = header
            self._cipher = (backend or get_backend()).chunk_cipher(self._keys.key.view(), self._keys.base_nonce)
            sink.write(head + salt + self._keys.commitment)
        except BaseException:
            sink.abort()
            raise

    def _check(self) -> None:
        if isinstance(self._failed, _Discarded):
            raise EncfsError("the file was discarded; nothing was written to the destination")
        if self._failed is not None:
            raise EncfsError(f"an earlier write failed ({type(self._failed).__name__}); the file was discarded") from self._failed
        if self._sealed:
            raise ValueError("write after the final chunk was sealed")

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._check()
        mv = memoryview(data).cast("B")
        n = len(mv)
        try:
            while mv:
                if self._fill == 0 and len(mv) >= self._block:
                    self._seal(mv[: self._block], final=False)
                    mv = mv[self._block :]
                    continue
                pending = self._pending_buffer()
                take = min(len(mv), self._block - self._fill)
                pending[self._fill : self._fill + take] = mv[:take]
                self._fill += take
                mv = mv[take:]
                if self._fill == self._block:
                    self._seal(memoryview(pending), final=False)
                    self._fill = 0
        except BaseException as e:
            self._fail(e)
            raise
        self.plaintext_written += n
        return n

    def _pending_buffer(self) -> SecureBuffer:
        if self._pending is None:
            self._pending = SecureBuffer(self._block)
        return self._pending

    def _seal(self, plain: memoryview, final: bool) -> None:
        chunks = split_plaintext(len(plain), final)
        if self._index + chunks > cs.MAX_CHUNKS:
            raise ValueError("file too large for Cobblestone-256 (2**38 chunks)")
        n = self._cipher.encrypt_into(self._index, plain, memoryview(self._out), final)
        self._sink.write(memoryview(self._out)[:n])
        self._index += chunks

    def finish(self) -> None:
        """Seal the final chunk; the destination appears only on ``commit()``."""
        self._check()
        try:
            tail = memoryview(self._pending)[: self._fill] if self._pending is not None else memoryview(b"")
            self._seal(tail, final=True)
            self._fill = 0
            self._sealed = True
        except BaseException as e:
            self._fail(e)
            raise
        finally:
            self._wipe()

    def commit(self) -> None:
        if self._failed is not None or not self._sealed:
            self._check()
            raise ValueError("commit before the final chunk was sealed")
        try:
            self._sink.commit()
        except BaseException as e:
            self._fail(e)
            raise

    def close(self) -> None:
        """Seal the final chunk and commit the destination."""
        self.finish()
        self.commit()

    def _fail(self, exc: BaseException) -> None:
        if self._failed is None:
            self._failed = exc
            self.abort()

    def abort(self) -> None:
        if self._failed is None:
            self._failed = _Discarded()
        try:
            self._sink.abort()
        finally:
            self._wipe()

    def _wipe(self) -> None:
        self._cipher.close()
        self._keys.wipe()
        if self._pending is not None:
            self._pending.release()
        self._fill = 0
