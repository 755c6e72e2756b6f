"""A new ``bytes`` object filled in place: ``read()`` decrypts straight into the object it
returns, so no temporary plaintext copy is allocated, copied out of and wiped. CPython only
(through its C API); elsewhere a ``bytearray`` stands in."""

from __future__ import annotations

import ctypes
import sys

if sys.implementation.name == "cpython":
    _new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
    _new_bytes.restype = ctypes.py_object
    _new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
    _memory_view = ctypes.pythonapi.PyMemoryView_FromMemory
    _memory_view.restype = ctypes.py_object
    _memory_view.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
    _PyBUF_WRITE = 0x200
    _BYTES_DATA = bytes.__basicsize__ - 1

    def fresh_bytes(n: int) -> tuple[bytes, memoryview]:
        """A new ``bytes`` of length ``n`` > 0 and a writable view of it, to fill before anyone
        else sees it. ``n`` must be positive: CPython hands out a shared singleton for empty
        bytes."""
        if n <= 0:
            raise ValueError("n must be positive")
        out = _new_bytes(None, n)
        return out, _memory_view(id(out) + _BYTES_DATA, n, _PyBUF_WRITE)

else:  # pragma: no cover

    def fresh_bytes(n: int) -> tuple[bytearray, memoryview]:
        buf = bytearray(n)
        return buf, memoryview(buf)
