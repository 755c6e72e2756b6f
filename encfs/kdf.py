"""Key derivation into locked memory: pyca/cryptography's ``derive_into`` writes the output
straight into a ``SecretBytes``, so no ``bytes`` copy of a derived key is left for the
garbage collector (which never wipes)."""

from __future__ import annotations

from typing import Any

from .secret import SecretBytes


def derive_secret(kdf: Any, key_material: memoryview | bytes, length: int) -> SecretBytes:
    """``kdf`` (HKDF, HKDFExpand, Argon2id: any with ``derive_into``) run into fresh locked memory."""
    out = SecretBytes(bytes(length))
    try:
        kdf.derive_into(key_material, out.view())
    except BaseException:
        out.wipe()
        raise
    return out
