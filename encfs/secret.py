"""Key material held in a mutable buffer that is overwritten when released."""

from __future__ import annotations

import atexit
import weakref


class SecretBytes:
    """Fixed-size secret in a ``bytearray``; redacted repr, not picklable, wiped on ``wipe()``.

    Python cannot promise that no copy of a secret ever exists (the ``cryptography`` objects keep
    their own), but the buffers encfs owns are zeroed when a file or filesystem closes and at exit.
    """

    __slots__ = ("_buf", "_wiped", "__weakref__")
    _live: "weakref.WeakSet[SecretBytes]" = weakref.WeakSet()

    def __init__(self, data: bytes | bytearray | memoryview):
        self._buf = bytearray(data)
        self._wiped = False
        SecretBytes._live.add(self)

    @classmethod
    def take(cls, buf: bytearray) -> "SecretBytes":
        """Wrap ``buf`` and zero the caller's copy."""
        out = cls(buf)
        buf[:] = bytes(len(buf))
        return out

    def __len__(self) -> int:
        return len(self._buf)

    @property
    def wiped(self) -> bool:
        return self._wiped and not any(self._buf)

    def view(self) -> memoryview:
        if self._wiped:
            raise ValueError("secret already wiped")
        return memoryview(self._buf)

    def bytes(self) -> bytes:
        """An immutable copy, for APIs that insist on ``bytes``. Prefer ``view()``."""
        return bytes(self.view())

    def wipe(self) -> None:
        """Zero in place (views handed out see zeros; the buffer is never resized)."""
        self._buf[:] = bytes(len(self._buf))
        self._wiped = True

    def __repr__(self) -> str:
        return f"<SecretBytes len={len(self._buf)} [redacted]>"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("key material is not picklable; pass a key reference (e.g. 'keyfile:/path')")

    def __del__(self) -> None:
        try:
            self.wipe()
        except Exception:
            pass


@atexit.register
def _wipe_all() -> None:
    for s in list(SecretBytes._live):
        s.wipe()
