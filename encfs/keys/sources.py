"""Where key references find their secret bytes: files and environment variables, read into
buffers the caller wipes, plus the base64url helpers key texts use. Shared by the key-file
schemes (``keyfile:``, ``env:``, in refs.py) and by recipient types whose references read
secrets themselves (``passphrase:file:``, ``passphrase:env:``).

Every failure is a ``KeyReferenceError`` that names the reference (``source``), never its
content, raised outside any ``except`` block so that it chains nothing."""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat

from ..errors import KeyReferenceError
from ..securemem import cleanse

MAX_KEY_FILE_BYTES = 64 * 1024
"""Key files and passphrase files larger than this are refused (a key file is ~100 bytes)."""

_B64URL = re.compile(r"[A-Za-z0-9_-]{43}")
_B64URL_ANY = re.compile(r"[A-Za-z0-9_-]*")


def wipe(buf: bytearray | None) -> None:
    """Zero ``buf`` in place (None is allowed, for buffers not yet made)."""
    if buf is not None:
        cleanse(buf)


def b64encode(raw: bytes | memoryview) -> str:
    return base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode("ascii")


def b64decode(text: object) -> bytes:
    """Unpadded base64url in its one canonical spelling (``ValueError`` otherwise): a signature
    or digest that could be written two ways would give one entry two byte strings."""
    if not isinstance(text, str) or not _B64URL_ANY.fullmatch(text):
        raise ValueError("not unpadded base64url")
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not unpadded base64url") from None
    if b64encode(raw) != text:
        raise ValueError("not the canonical base64url spelling")
    return raw


def b64decode32(text: str, what: str) -> bytearray:
    """Exactly 43 characters of canonical unpadded base64url, encoding 32 bytes."""
    if len(text) != 43 or not _B64URL.fullmatch(text):
        raise KeyReferenceError(f"{what} must be 43 characters of unpadded base64url (32 bytes)")
    try:
        raw = bytearray(base64.b64decode(text + "=", altchars=b"-_", validate=True))
    except (binascii.Error, ValueError):
        raise KeyReferenceError(f"{what} is not valid base64url") from None
    if len(raw) != 32 or b64encode(raw) != text:
        wipe(raw)
        raise KeyReferenceError(f"{what} is not canonical base64url")
    return raw


def read_secret_file(path: str, source: str, what: str = "key file") -> bytearray:
    """The bytes of a key or passphrase file, at most ``MAX_KEY_FILE_BYTES``, in a bytearray
    the caller wipes. Every failure is a ``KeyReferenceError`` naming ``source``: unknown
    ``~user``, missing file, a directory, unreadable, too large."""
    problem = ""
    expanded = os.path.expanduser(path)
    if expanded.startswith("~"):
        problem = f"cannot expand {expanded.split('/', 1)[0]!r} (no such user or no home directory)"
    fd = -1
    if not problem:
        try:
            fd = os.open(expanded, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            problem = f"cannot read {what}: {e.strerror or type(e).__name__}"
    if problem:
        raise KeyReferenceError(f"{source}: {problem}")
    buf = bytearray(MAX_KEY_FILE_BYTES + 1)
    n = 0
    try:
        try:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                problem = f"cannot read {what}: it is a directory"
            else:
                with memoryview(buf) as mv:
                    while n < len(buf):
                        got = os.readv(fd, [mv[n:]])
                        if not got:
                            break
                        n += got
        except OSError as e:
            problem = f"cannot read {what}: {e.strerror or type(e).__name__}"
        finally:
            os.close(fd)
        if not problem and n > MAX_KEY_FILE_BYTES:
            problem = f"larger than {MAX_KEY_FILE_BYTES // 1024} KiB, the limit for a {what}"
        if not problem:
            return buf[:n]
    finally:
        wipe(buf)
    raise KeyReferenceError(f"{source}: {problem}")


def env_bytes(name: str, source: str) -> bytearray:
    """The value of environment variable ``name`` as a bytearray the caller wipes."""
    value = None
    if name and "=" not in name and "\0" not in name:
        environb = getattr(os, "environb", None)
        if environb is not None:
            value = environb.get(os.fsencode(name))
        else:  # pragma: no cover - Windows has no os.environb
            text = os.environ.get(name)
            value = None if text is None else text.encode("utf-8")
    if value is None:
        raise KeyReferenceError(f"{source}: environment variable {name!r} is not set")
    return bytearray(value)
