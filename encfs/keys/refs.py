"""Key references: short strings that name a key without containing it, so they fit URLs,
CLIs, environment variables and pickles. The grammar (docs/KEYS.md)::

    keyfile:PATH            a key file: symmetric key or X25519 identity
    env:NAME                an environment variable holding a key file's text
    passphrase:env:NAME     a passphrase read from an environment variable
    passphrase:file:PATH    a passphrase: the first line of a file
    passphrase:prompt       ask on the terminal (interactive CLI use)
    x25519:PUBLIC           an X25519 public key (encrypt only)
"""

from __future__ import annotations

import base64
import binascii
import getpass
import os
import re
import stat
from typing import Iterable, Union

from ..errors import FormatError, KeyReferenceError, NoMatchingKeyError
from ..format import Header
from ..secret import SecretBytes
from .base import Identity, Recipient
from .passphrase import Passphrase
from .symmetric import SymmetricKey
from .x25519 import X25519Identity, X25519Recipient

KEY_PREFIX = "encfs-key-v1:"
IDENTITY_PREFIX = "encfs-x25519-identity-v1:"
PUBLIC_PREFIX = "x25519:"
KNOWN_STANZA_TYPES = {"key", "passphrase", "x25519"}
ENV_DEFAULT = "ENCFS_KEY"
_B64URL = re.compile(r"[A-Za-z0-9_-]{43}")
_SCHEME = re.compile(r"[a-z0-9-]{1,16}")

KeyObject = Union[SymmetricKey, X25519Identity, X25519Recipient, Passphrase]
KeySpec = Union[str, KeyObject, Iterable[Union[str, KeyObject]], None]


def b64encode(raw: bytes | memoryview) -> str:
    return base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode("ascii")


def b64decode32(text: str, what: str) -> bytearray:
    """Exactly 43 characters of canonical unpadded base64url, encoding 32 bytes."""
    if len(text) != 43 or not _B64URL.fullmatch(text):
        raise KeyReferenceError(f"{what} must be 43 characters of unpadded base64url (32 bytes)")
    try:
        raw = bytearray(base64.b64decode(text + "=", altchars=b"-_", validate=True))
    except (binascii.Error, ValueError):
        raise KeyReferenceError(f"{what} is not valid base64url") from None
    if len(raw) != 32 or b64encode(raw) != text:
        raw[:] = bytes(len(raw))
        raise KeyReferenceError(f"{what} is not canonical base64url")
    return raw


def public_reference(public: bytes) -> str:
    return PUBLIC_PREFIX + b64encode(public)


def key_file_text(key: SymmetricKey | X25519Identity) -> str:
    """The text of a key file (what ``encfs keygen`` writes)."""
    if isinstance(key, X25519Identity):
        return (
            "# encfs X25519 identity (private key). Keep secret.\n"
            f"# public key: {public_reference(key.recipient.public)}\n"
            f"{IDENTITY_PREFIX}{b64encode(key.secret.view())}\n"
        )
    return f"# encfs symmetric key. Keep secret.\n{KEY_PREFIX}{b64encode(key.secret.view())}\n"


MAX_KEY_FILE_BYTES = 64 * 1024
"""Key files and passphrase files larger than this are refused (a key file is ~100 bytes)."""

_KEY_PREFIX_B = KEY_PREFIX.encode("ascii")
_IDENTITY_PREFIX_B = IDENTITY_PREFIX.encode("ascii")
_B64URL_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_B64URL_VALUE = [-1] * 256
for _i, _c in enumerate(_B64URL_ALPHABET):
    _B64URL_VALUE[_c] = _i
del _i, _c
_BLANK = frozenset(b" \t\x0b\x0c")
_EOL = frozenset(b"\r\n")


def _wipe(buf: bytearray | None) -> None:
    if buf is not None:
        buf[:] = bytes(len(buf))


def _b64url32_into(buf: bytearray, start: int, end: int, out: bytearray) -> bool:
    """Decode ``buf[start:end]``, which must be 43 characters of canonical unpadded base64url,
    into the 32-byte ``out``, without making any immutable copy of the text or the key.
    Returns False (``out`` zeroed) when it is not; the caller raises, so no exception is
    created while key material is in scope here."""
    if end - start != 43 or len(out) != 32:
        return False
    acc = bits = j = 0
    ok = True
    for i in range(start, end):
        v = _B64URL_VALUE[buf[i]]
        if v < 0:
            ok = False
            break
        acc = ((acc << 6) | v) & 0xFFFF
        bits += 6
        if bits >= 8:
            bits -= 8
            out[j] = (acc >> bits) & 0xFF
            j += 1
    # 43 characters carry 258 bits: 32 bytes and 2 bits that canonical encoding leaves at zero.
    ok = ok and j == 32 and bits == 2 and acc & 0b11 == 0
    acc = v = 0
    if not ok:
        _wipe(out)
    return ok


def _content_lines(buf: bytearray) -> tuple[list[tuple[int, int]], int, str]:
    """``(start, end)`` of each line of ``buf`` that is neither blank nor a ``#`` comment,
    surrounding blanks stripped; plus the number and a description of the first line that is
    not text (0 and "" when all are). Only offsets leave this function, never bytes."""
    lines: list[tuple[int, int]] = []
    bad_line, why = 0, ""
    n, pos, lineno = len(buf), 0, 0
    while pos < n:
        end = pos
        while end < n and buf[end] not in _EOL:
            end += 1
        nxt = end + 1
        if buf[end:nxt] == b"\r" and buf[nxt:nxt + 1] == b"\n":
            nxt += 1
        lineno += 1
        s, e = pos, end
        while s < e and buf[s] in _BLANK:
            s += 1
        while e > s and buf[e - 1] in _BLANK:
            e -= 1
        pos = nxt
        if s == e:
            continue
        if buf[s] == 0x23:  # '#': a comment, which may be any UTF-8 text and holds no key
            valid = True
            try:
                str(memoryview(buf)[s:e], "utf-8")
            except UnicodeDecodeError:
                valid = False
            if not valid and not bad_line:
                bad_line, why = lineno, "is not UTF-8 text"
            continue
        if not bad_line and (0 in memoryview(buf)[s:e] or max(memoryview(buf)[s:e]) >= 0x80):
            bad_line, why = lineno, "holds binary or non-ASCII bytes"
        lines.append((s, e))
    return lines, bad_line, why


def _parse_key_buffer(buf: bytearray, source: str) -> SymmetricKey | X25519Identity:
    """Parse key-file bytes (docs/FORMAT.md §5). The caller owns and wipes ``buf``.

    Errors are raised only after the decoded key buffer is wiped, outside any ``except``
    block (no ``__context__``), and name ``source``, never content."""
    problem = ""
    raw = bytearray(32)
    kind = ""
    try:
        lines, bad_line, why = _content_lines(buf)
        if bad_line:
            problem = f"not an encfs key file: line {bad_line} {why}"
        elif len(lines) != 1:
            problem = f"expected exactly one key line, found {len(lines)}"
        else:
            s, e = lines[0]
            if buf.startswith(_KEY_PREFIX_B, s, e):
                kind, s = "key", s + len(_KEY_PREFIX_B)
            elif buf.startswith(_IDENTITY_PREFIX_B, s, e):
                kind, s = "identity", s + len(_IDENTITY_PREFIX_B)
            else:
                problem = f"not an encfs key file (expected '{KEY_PREFIX}...' or '{IDENTITY_PREFIX}...')"
            if kind and not _b64url32_into(buf, s, e, raw):
                problem = f"{kind} must be 43 characters of canonical unpadded base64url (32 bytes)"
        if not problem:
            secret = SecretBytes.take(raw)
            return SymmetricKey(secret, source) if kind == "key" else X25519Identity(secret, source)
    finally:
        _wipe(raw)
    raise KeyReferenceError(f"{source}: {problem}")


def parse_key_text(text: str, source: str) -> SymmetricKey | X25519Identity:
    """Parse the text of a key file; ``source`` names it in errors (never its content)."""
    buf = bytearray(text, "utf-8")
    try:
        return _parse_key_buffer(buf, source)
    finally:
        _wipe(buf)


def _read_secret_file(path: str, source: str, what: str = "key file") -> bytearray:
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
        _wipe(buf)
    raise KeyReferenceError(f"{source}: {problem}")


def _env_bytes(name: str, source: str) -> bytearray:
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


def _load_key_file(buf: bytearray, source: str) -> SymmetricKey | X25519Identity:
    try:
        return _parse_key_buffer(buf, source)
    finally:
        _wipe(buf)


def _checked_passphrase(buf: bytearray, source: str) -> bytearray:
    """``buf`` if it is UTF-8 text (as a typed passphrase is); else wipe it and refuse."""
    valid = True
    try:
        str(buf, "utf-8")
    except UnicodeDecodeError:
        valid = False
    if valid:
        return buf
    _wipe(buf)
    raise KeyReferenceError(f"{source}: passphrase is not UTF-8 text")


def _first_line_passphrase(buf: bytearray, source: str) -> bytearray:
    """The first line of ``buf`` (without its line break) as a new bytearray; ``buf`` is
    wiped. Refuses text that is not UTF-8 (it would not match a typed passphrase)."""
    problem = ""
    try:
        end = buf.find(b"\n")
        end = len(buf) if end < 0 else end
        if end and buf[end - 1] == 0x0D:
            end -= 1
        valid = True
        try:
            str(memoryview(buf)[:end], "utf-8")
        except UnicodeDecodeError:
            valid = False
        if not valid:
            problem = "passphrase is not UTF-8 text"
        else:
            return buf[:end]
    finally:
        _wipe(buf)
    raise KeyReferenceError(f"{source}: {problem}")


def load_reference(ref: str) -> KeyObject:
    """Load the key a reference names. Errors name the reference, never key material."""
    if not isinstance(ref, str):
        raise KeyReferenceError(f"a key reference is a string, got {type(ref).__name__}")
    scheme, sep, rest = ref.partition(":")
    if not sep or not rest or not _SCHEME.fullmatch(scheme):
        raise KeyReferenceError("malformed key reference: expected SCHEME:VALUE (keyfile:, env:, passphrase:, x25519:), see docs/KEYS.md")
    if scheme == "keyfile":
        if rest.startswith(("encfs-key-v1:", "encfs-x25519-identity-v1:")):
            raise KeyReferenceError("keyfile: takes a path, and this looks like key material; never put keys in references")
        return _load_key_file(_read_secret_file(rest, ref), ref)
    if scheme == "env":
        return _load_key_file(_env_bytes(rest, ref), ref)
    if scheme == "x25519":
        return X25519Recipient(bytes(b64decode32(rest, "x25519: public key")), ref)
    if scheme == "passphrase":
        kind, _, arg = rest.partition(":")
        if kind == "env":
            raw = _checked_passphrase(_env_bytes(arg, ref), ref)
        elif kind == "file":
            raw = _first_line_passphrase(_read_secret_file(arg, ref, "passphrase file"), ref)
        elif kind == "prompt" and not arg:
            raw = bytearray(getpass.getpass("encfs passphrase: ").encode("utf-8"))
        else:
            raise KeyReferenceError("malformed passphrase reference: use passphrase:env:NAME, passphrase:file:PATH or passphrase:prompt")
        if not raw:
            raise KeyReferenceError(f"{ref}: empty passphrase")
        return Passphrase(SecretBytes.take(raw), ref)
    raise KeyReferenceError(f"unknown key reference scheme {scheme!r}; expected keyfile:, env:, passphrase: or x25519:")


def _split(spec: KeySpec) -> list[str | KeyObject]:
    if spec is None:
        return []
    if isinstance(spec, str):
        return [s.strip() for s in spec.split(",") if s.strip()]
    if isinstance(spec, (SymmetricKey, X25519Identity, X25519Recipient, Passphrase)):
        return [spec]
    out: list[str | KeyObject] = []
    for item in spec:
        out.extend(_split(item))
    return out


class KeyRing:
    """The keys a filesystem writes to (recipients) and reads with (identities).

    ``key`` serves both; ``recipients`` / ``identities`` override either side, which is how
    an encrypt-only host is configured (public keys only). With nothing given, ``$ENCFS_KEY``
    (comma-separated references) is used. Keys load lazily and are wiped by ``wipe()``.
    """

    def __init__(self, key: KeySpec = None, recipients: KeySpec = None, identities: KeySpec = None):
        if key is None and recipients is None and identities is None and os.environ.get(ENV_DEFAULT):
            key = os.environ[ENV_DEFAULT]
        self._key = _split(key)
        self._recipients = _split(recipients) if recipients is not None else self._key
        self._identities = _split(identities) if identities is not None else self._key
        self._loaded: dict[str, KeyObject] = {}

    def references(self) -> dict[str, list[str]]:
        """The reference strings (for pickling); refuses in-memory key objects."""
        out = {}
        for name, items in (("key", self._key), ("recipients", self._recipients), ("identities", self._identities)):
            if any(not isinstance(i, str) for i in items):
                raise TypeError("a filesystem built from in-memory keys cannot be pickled; use key references")
            out[name] = list(items)
        return out

    def _load(self, item: str | KeyObject) -> KeyObject:
        if not isinstance(item, str):
            return item
        if item not in self._loaded:
            self._loaded[item] = load_reference(item)
        return self._loaded[item]

    def recipients(self) -> list[Recipient]:
        out = [self._load(i) for i in self._recipients]
        if not out:
            raise NoMatchingKeyError("no encryption key configured: pass key= or recipients= (or set $ENCFS_KEY)")
        if sum(getattr(k, "type", "") == "passphrase" for k in out) > 1:
            raise KeyReferenceError("at most one passphrase recipient per file (docs/FORMAT.md §1.2)")
        return out  # type: ignore[return-value]

    def identities(self) -> list[Identity]:
        return [k for k in (self._load(i) for i in self._identities) if hasattr(k, "unwrap")]  # type: ignore[misc]

    def unwrap(self, header: Header) -> SecretBytes:
        """The file key, from the first stanza an identity matches by key id."""
        unknown = [s.type for s in header.stanzas if s.type not in KNOWN_STANZA_TYPES]
        if unknown:
            raise FormatError(f"unknown recipient type(s) {sorted(set(unknown))} in header")
        if sum(s.type == "passphrase" for s in header.stanzas) > 1:
            raise FormatError("more than one passphrase stanza in header")
        identities = self.identities()
        present = header.labels()
        tried = []
        for stanza in header.stanzas:
            for ident in identities:
                if ident.matches(stanza):
                    tried.append(stanza.label)
                    file_key = ident.unwrap(stanza, header.context)
                    if file_key is not None:
                        return file_key
        mine = [_label(i) for i in identities]
        why = f"; {', '.join(tried)} matched but did not unwrap (wrong passphrase or tampered stanza)" if tried else ""
        raise NoMatchingKeyError(
            f"no configured key can open this file: it is encrypted to {present}, configured keys are {mine or 'none'}{why}",
            key_ids=present,
        )

    def wipe(self) -> None:
        for k in self._loaded.values():
            wipe = getattr(k, "wipe", None)
            if wipe:
                wipe()
        self._loaded.clear()

    def __repr__(self) -> str:
        return f"<KeyRing recipients={len(self._recipients)} identities={len(self._identities)}>"


def _label(ident: object) -> str:
    kid = getattr(ident, "key_id", b"")
    t = getattr(ident, "type", "?")
    return f"{t}:{kid.hex()}" if kid else t
