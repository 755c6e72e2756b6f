"""Writing an encrypted file: ``PayloadWriter`` seals a plaintext stream into ``header ||
payload`` on a sink; ``EncryptedWriter`` is its file object.

Memory is bounded by one block of plaintext and two of ciphertext whatever the file size.
Plaintext waiting for a whole block sits in locked memory that is wiped when the writer ends;
whole blocks written at once are sealed straight from the caller's buffer. A block's
ciphertext is written to the sink on a thread of its own while the next block is encrypted
(``pipeline.Pipeline``, one write in flight), so encryption and I/O overlap; a file of one
block is written here, with no thread.

One vocabulary from the file object down to the sink: ``commit`` makes the destination
appear, ``discard`` throws the file away (nothing appears). The writer's state is kept once,
in ``PayloadWriter.state``: a failure poisons it (the sink is discarded at once and every
later call raises), so a caller that ignores an error cannot commit a file with a hole in it.
A block written in the background fails the call that seals the next block, or ``seal``.
"""

from __future__ import annotations

import io
import os
import sys
from typing import Any

from . import audit
from . import cobblestone as cs
from . import format as fmt
from .backend import CipherBackend, get_backend, split_plaintext
from .errors import EncfsError, naming
from .keys import KeyRing, new_file_key, sig
from .owner import closed_by_failing_owner, stack_at_open
from .pipeline import Pipeline
from .securemem import SecureBuffer
from .sink import Sink

DEFAULT_BLOCK_CHUNKS = 256

OPEN, SEALED, COMMITTED, DISCARDED, FAILED = "open", "sealed", "committed", "discarded", "failed"


class PayloadWriter:
    def __init__(
        self,
        sink: Sink,
        keyring: KeyRing,
        backend: CipherBackend | None = None,
        block_chunks: int = DEFAULT_BLOCK_CHUNKS,
        header_length: int = fmt.STANDARD_HEADER,
    ):
        self._sink = sink
        self._index = 0
        self._block = block_chunks * cs.CHUNK_SIZE
        self._pending: SecureBuffer | None = None
        self._fill = 0
        self._outs: list[bytearray] = [bytearray(), bytearray()]  # sized on first use: a small file needs little
        self._blocks = 0
        self._writes = Pipeline(1, "encfs-write")
        self.plaintext_written = 0
        self.state = OPEN
        self._failure: BaseException | None = None
        try:
            file_key = new_file_key()
            try:
                header = fmt.Header(fmt.new_file_id(), [])
                salt = os.urandom(cs.SALT_SIZE)
                self._keys = cs.derive(file_key.view(), salt, header.context)
                try:
                    header.stanzas = [r.wrap(file_key, header.context) for r in keyring.recipients()]
                except Exception as e:
                    audit.record(audit.WRAP, outcome=audit.FAILED, file_id=header.file_id, **audit.error_fields(e))
                    raise
                signer = keyring.signing_key()
                if signer is not None:
                    header.stanzas.append(sig.sign(signer, header.context, self._keys.commitment))
                head = fmt.seal(header, file_key, header_length)
                for stanza in header.stanzas:  # audit log on: one line per recipient, or no file (AuditError)
                    if not sig.is_signature(stanza):
                        audit.record(audit.WRAP, key=stanza.label, file_id=header.file_id)
            finally:
                file_key.wipe()
            self.header = header
            self._cipher = (backend or get_backend()).chunk_cipher(self._keys.key.view(), self._keys.base_nonce)
            sink.write(head + salt + self._keys.commitment)
        except BaseException:
            keys = getattr(self, "_keys", None)
            if keys is not None:
                keys.wipe()
            sink.discard()
            raise

    @property
    def commitment(self) -> bytes:
        """The payload's key commitment, as stored in the file (it pins file key and salt):
        what manifests and the model version log record, known without reading the file back."""
        return self._keys.commitment

    def _check(self, allowed: str = OPEN) -> None:
        if self.state == allowed:
            return
        if self.state == DISCARDED:
            raise EncfsError("the file was discarded; nothing was written to the destination")
        if self.state == FAILED:
            raise EncfsError(f"an earlier write failed ({type(self._failure).__name__}); the file was discarded") from self._failure
        if self.state == SEALED and allowed == OPEN:
            raise ValueError("write after the final chunk was sealed")
        raise ValueError(f"the file is {self.state}")

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
                take = min(len(mv), self._block - self._fill)
                pending = self._pending_buffer(self._fill + take)
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

    def _pending_buffer(self, need: int) -> SecureBuffer:
        """The locked buffer of plaintext waiting for a whole block, at least ``need`` bytes:
        grown by doubling up to one block, so that a small file locks (and wipes) only what
        it holds, not a whole block."""
        have = 0 if self._pending is None else len(self._pending)
        if have < need:
            grown = SecureBuffer(min(self._block, max(need, 2 * have, 64 << 10)))
            if self._pending is not None:
                memoryview(grown)[: self._fill] = memoryview(self._pending)[: self._fill]
                self._pending.release()
            self._pending = grown
        return self._pending

    def _seal(self, plain: memoryview, final: bool) -> None:
        chunks = split_plaintext(len(plain), final)
        if self._index + chunks > cs.MAX_CHUNKS:
            raise ValueError("file too large for Cobblestone-256 (2**38 chunks)")
        buf = self._outs[self._blocks % 2]
        need = len(plain) + (chunks + 1) * cs.TAG_SIZE
        if len(buf) < need:
            buf.extend(bytes(need - len(buf)))  # (never while written: the other buffer is the one in flight)
        out = memoryview(buf)
        n = self._cipher.encrypt_into(self._index, plain, out, final)
        if final and not self._writes:
            self._sink.write(out[:n])
        else:
            self._writes.put(self._sink.write, out[:n])
        self._blocks += 1
        self._index += chunks
        if final:
            self._writes.drain()

    def seal(self) -> None:
        """Seal the final chunk; the destination appears only on ``commit()``."""
        self._check()
        try:
            tail = memoryview(self._pending)[: self._fill] if self._pending is not None else memoryview(b"")
            self._seal(tail, final=True)
            self.state = SEALED
        except BaseException as e:
            self._fail(e)
            raise
        finally:
            self._wipe()

    def commit(self) -> None:
        self._check(SEALED)
        try:
            self._sink.commit()
        except BaseException as e:
            self._fail(e)
            raise
        self.state = COMMITTED

    def discard(self) -> None:
        """Throw the file away; idempotent, and a no-op once committed."""
        if self.state in (COMMITTED, DISCARDED, FAILED):
            return
        self.state = DISCARDED
        self._end()

    def _fail(self, exc: BaseException) -> None:
        if self.state in (OPEN, SEALED):
            self.state, self._failure = FAILED, exc
            discarding(exc, self._end)

    def _end(self) -> None:
        try:
            self._writes.abandon()
        finally:
            try:
                self._sink.discard()
            finally:
                self._wipe()

    def _wipe(self) -> None:
        self._cipher.close()
        self._keys.wipe()
        if self._pending is not None:
            self._pending.release()
        self._fill = 0


def discarding(exc: BaseException | None, discard: Any) -> None:
    """Run ``discard`` while ``exc`` is on its way up: the caller's error stays the one raised,
    and a failed discard (a store that would not abort an upload) is a note on it, not a
    replacement for it."""
    try:
        discard()
    except Exception as e:
        if exc is None:
            raise
        exc.add_note(f"encfs: discarding the file also failed ({type(e).__name__}: {e}); nothing was committed")


class EncryptedWriter(io.BufferedIOBase):
    """The file object of an encrypted file open for writing. The destination appears only on
    a clean ``close()`` (or, with ``autocommit=False``, on ``commit()``, as fsspec transactions
    do). A failed ``with`` block that owns the file discards it (see ``encfs.owner``); every
    other ``close()`` commits, also inside ``except`` and ``finally`` blocks (an emergency
    checkpoint written while handling an error is kept). ``discard()`` throws a file away."""

    def __init__(self, fs: Any, path: str, writer: PayloadWriter, mode: str = "wb", autocommit: bool = True):
        self.fs, self.path, self.mode = fs, path, mode
        self.autocommit = autocommit
        self._w = writer
        self._opened_under = stack_at_open()

    @property
    def commitment(self) -> bytes:
        return self._w.commitment

    @property
    def header(self):
        return self._w.header

    @property
    def discarded(self) -> bool:
        return self._w.state in (DISCARDED, FAILED)

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._w.plaintext_written

    def write(self, data: Any) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        with naming(self.path):
            return self._w.write(data)

    def flush(self) -> None:
        """No-op: ciphertext is written in whole chunks; the tail is sealed on close()."""

    def close(self) -> None:
        if self.closed:
            return
        if sys.exc_info()[1] is not None and closed_by_failing_owner(self, self._opened_under):
            self.discard()
            return
        try:
            with naming(self.path):
                self._w.seal()
                if self.autocommit:
                    self._w.commit()
        finally:
            super().close()
            self.fs.invalidate_cache(self.path)

    def commit(self) -> None:
        """Make a file written with ``autocommit=False`` appear (after ``close()``)."""
        if not self.closed:
            self.close()
        with naming(self.path):
            if self._w.state == DISCARDED:
                raise EncfsError("cannot commit, the file was discarded (its write failed or was abandoned)")
            if not self.autocommit:
                self._w.commit()
                self.fs.invalidate_cache(self.path)

    def discard(self) -> None:
        """Throw the file away: nothing appears at the destination."""
        try:
            self._w.discard()
        finally:
            if not self.closed:
                super().close()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            discarding(exc, self.discard)
        else:
            self.close()

    def __del__(self) -> None:
        if not self.closed:
            self.discard()

    def __reduce__(self):
        raise TypeError("an open encrypted writer cannot be pickled")

    def __repr__(self) -> str:
        return f"<EncryptedWriter {self.path!r}>"


class EncryptedTextWriter(io.TextIOWrapper):
    """Text mode over an ``EncryptedWriter`` whose ``with`` discards the file when it fails
    (``io.TextIOWrapper``'s own ``__exit__`` would flush and commit)."""

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None and isinstance(self.buffer, EncryptedWriter):
            self.buffer.discard()
        super().__exit__(exc_type, exc, tb)
