"""The payload writer: seals a plaintext stream into ``header || payload`` on a sink, with
memory bounded by one block of chunks whatever the file size."""

from __future__ import annotations

import os

from . import cobblestone as cs
from . import format as fmt
from .backend import CipherBackend, get_backend
from .keys import KeyRing, new_file_key
from .sink import Sink

DEFAULT_BLOCK_CHUNKS = 256


class PayloadWriter:
    def __init__(self, sink: Sink, keyring: KeyRing, backend: CipherBackend | None = None, block_chunks: int = DEFAULT_BLOCK_CHUNKS):
        self._sink = sink
        self._index = 0
        self._block = block_chunks * cs.CHUNK_SIZE
        self._pending = bytearray()
        self._out = bytearray(block_chunks * cs.CT_CHUNK_SIZE)
        self.plaintext_written = 0
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

    def write(self, data: bytes | bytearray | memoryview) -> int:
        mv = memoryview(data).cast("B")
        n = len(mv)
        while mv:
            take = min(len(mv), self._block - len(self._pending))
            self._pending += mv[:take]
            mv = mv[take:]
            if len(self._pending) == self._block:
                self._seal(final=False)
        self.plaintext_written += n
        return n

    def _seal(self, final: bool) -> None:
        plain = memoryview(self._pending)
        chunks = len(plain) // cs.CHUNK_SIZE + (1 if final else 0)
        if self._index + chunks > cs.MAX_CHUNKS:
            raise ValueError("file too large for Cobblestone-256 (2**38 chunks)")
        n = self._cipher.encrypt_into(self._index, plain, memoryview(self._out), final)
        plain.release()
        self._index += chunks
        self._sink.write(memoryview(self._out)[:n])
        self._pending[:] = bytes(len(self._pending))
        self._pending.clear()

    def close(self) -> None:
        """Seal the final chunk and commit the destination."""
        try:
            self._seal(final=True)
            self._sink.commit()
        except BaseException:
            self._sink.abort()
            raise
        finally:
            self._wipe()

    def abort(self) -> None:
        try:
            self._sink.abort()
        finally:
            self._wipe()

    def _wipe(self) -> None:
        self._cipher.close()
        self._keys.wipe()
        self._pending[:] = bytes(len(self._pending))
        self._out[:] = bytes(len(self._out))
