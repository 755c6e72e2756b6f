"""Test-only code for the native library: single-shot AES-256-GCM through the C primitives
(``encfs_gcm_seal``/``encfs_gcm_open``, checked against Wycheproof; encfs itself only uses the
chunk functions), and a reader of a mapping's ``VmFlags``.

Importable without the extension (``ffi``/``lib`` are then None); tests that use the GCM
helpers call ``require_native()`` first. The sanitizer driver imports it after putting its own
build in ``sys.modules["encfs._native"]``, so the helpers call that build.
"""

from __future__ import annotations

from typing import Any

try:
    from encfs._native import ffi, lib
except ImportError:
    ffi = lib = None

KEY_SIZE, IV_SIZE, TAG_SIZE = 32, 12, 16


def _span(data: Any) -> tuple[Any, int]:
    """A byte pointer to ``data`` (no copy) and its size in bytes."""
    ptr = ffi.from_buffer("uint8_t[]", data)
    return ptr, len(ptr)


def _gcm_args(key: Any, iv: Any, tag_size: int, aad: Any) -> tuple[Any, ...]:
    """Pointer/length pairs of key, IV and AAD; anything but a 32/12/16-byte key/IV/tag is
    refused here, before the C primitive is called."""
    k, i = _span(key), _span(iv)
    if k[1] != KEY_SIZE:
        raise ValueError(f"AES-256-GCM needs a 32-byte key, not {k[1]} bytes")
    if i[1] != IV_SIZE:
        raise ValueError(f"only 12-byte IVs are supported, not {i[1]} bytes")
    if tag_size != TAG_SIZE:
        raise ValueError(f"only 16-byte tags are supported, not {tag_size} bytes")
    return (*k, *i, *_span(aad))


def _error(rc: int, what: str) -> Exception:
    from encfs._native_backend import _error as native_error

    return native_error(rc, what)


def aes256gcm_encrypt(key: Any, iv: Any, plaintext: Any, aad: Any = b"", tag_size: int = TAG_SIZE) -> bytes:
    """Single-shot AES-256-GCM seal in C: ``ciphertext || tag``. Only 32/12/16-byte key/IV/tag."""
    args = _gcm_args(key, iv, tag_size, aad)
    pt = _span(plaintext)
    out = ffi.new("uint8_t[]", pt[1] + TAG_SIZE)
    rc = lib.encfs_gcm_seal(*args, *pt, out, len(out))
    if rc < 0:
        raise _error(rc, "seal")
    return ffi.buffer(out, rc)[:]


def aes256gcm_decrypt(key: Any, iv: Any, ciphertext: Any, tag: Any, aad: Any = b"") -> bytes:
    """Single-shot AES-256-GCM open in C; IntegrityError when the tag does not verify."""
    from encfs.errors import IntegrityError

    args = _gcm_args(key, iv, _span(tag)[1], aad)
    ct_tag = bytes(ciphertext) + bytes(tag)
    out = ffi.new("uint8_t[]", max(1, len(ct_tag) - TAG_SIZE))
    rc = lib.encfs_gcm_open(*args, ct_tag, len(ct_tag), out, len(out))
    if rc == lib.ENCFS_E_AUTH:
        raise IntegrityError("AES-GCM tag did not verify")
    if rc < 0:
        raise _error(rc, "open")
    return ffi.buffer(out, rc)[:]


def vma_of(addr: int) -> dict[str, str] | None:
    """The /proc/self/smaps fields of the mapping that holds ``addr`` (up to ``VmFlags``), or
    None when no mapping holds it."""
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    found: dict[str, str] | None = None
    for line in lines:
        head = line.split()[0] if line else ""
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            found = {} if lo <= addr < hi else None
        elif found is not None and ":" in line:
            k, v = line.split(":", 1)
            found[k] = v.strip()
            if k == "VmFlags":
                return found
    return None


def vm_flags(addr: int) -> set[str]:
    """The VmFlags of the mapping that holds ``addr`` (``lo``: locked, ``dd``: left out of
    core dumps)."""
    vma = vma_of(addr)
    assert vma is not None, f"no mapping holds {addr:#x}"
    return set(vma["VmFlags"].split())
