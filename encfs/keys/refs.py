"""Key references: short strings that name a key without containing it, so they fit URLs,
CLIs, environment variables and pickles. The grammar (docs/KEYS.md)::

    keyfile:PATH            a key file: symmetric key or X25519 identity
    env:NAME                an environment variable holding a key file's text
    passphrase:env:NAME     a passphrase read from an environment variable
    passphrase:file:PATH    a passphrase: the first line of a file
    passphrase:prompt       ask on the terminal (interactive CLI use)
    x25519:PUBLIC           an X25519 public key (encrypt only)

Each scheme's loader is registered (registry.py): ``keyfile:`` and ``env:`` here, as they hold
key files of any type with a key-file prefix; the others by their recipient type's module.
"""

from __future__ import annotations

import copy
import threading
from typing import Any, Iterable, Union

from .. import audit, env
from ..errors import KeyReferenceError, NoMatchingKeyError
from ..forking import ForkLocal
from ..format import Header
from ..secret import SecretBytes
from . import registry, sig
from .base import Identity, Recipient
from .sources import MAX_KEY_FILE_BYTES, b64encode, env_bytes, read_secret_file, wipe
from .symmetric import KEY_FILE_PREFIX as KEY_PREFIX
from .symmetric import SymmetricKey
from .x25519 import KEY_FILE_PREFIX as IDENTITY_PREFIX
from .x25519 import X25519Identity, public_reference

__all__ = [
    "IDENTITY_PREFIX", "KEY_PREFIX", "MAX_KEY_FILE_BYTES", "KeyObject", "KeyRing", "KeySpec",
    "key_file_text", "load_reference", "parse_key_text", "public_reference",
]


KeyObject = Union[Recipient, Identity]
"""A loaded key of any registered type (``registry.is_key_object``)."""
KeySpec = Union[str, KeyObject, Iterable[Union[str, KeyObject]], None]


def key_file_text(key: SymmetricKey | X25519Identity) -> str:
    """The text of a key file (what ``encfs keygen`` writes)."""
    if isinstance(key, X25519Identity):
        return (
            "# encfs X25519 identity (private key). Keep secret.\n"
            f"# public key: {public_reference(key.recipient.public)}\n"
            f"{IDENTITY_PREFIX}{b64encode(key.secret.view())}\n"
        )
    return f"# encfs symmetric key. Keep secret.\n{KEY_PREFIX}{b64encode(key.secret.view())}\n"


_B64URL_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_B64URL_VALUE = [-1] * 256
for _i, _c in enumerate(_B64URL_ALPHABET):
    _B64URL_VALUE[_c] = _i
del _i, _c
_BLANK = frozenset(b" \t\x0b\x0c")
_EOL = frozenset(b"\r\n")


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
        wipe(out)
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


def _parse_key_buffer(buf: bytearray, source: str) -> KeyObject:
    """Parse key-file bytes (docs/FORMAT.md §5): one line ``PREFIX<base64url>``, the prefix of
    a registered type (``RecipientType.key_file_prefix``). The caller owns and wipes ``buf``.

    Errors are raised only after the decoded key buffer is wiped, outside any ``except``
    block (no ``__context__``), and name ``source``, never content."""
    problem = ""
    raw = bytearray(32)
    rtype = None
    try:
        lines, bad_line, why = _content_lines(buf)
        if bad_line:
            problem = f"not an encfs key file: line {bad_line} {why}"
        elif len(lines) != 1:
            problem = f"expected exactly one key line, found {len(lines)}"
        else:
            s, e = lines[0]
            types = registry.key_file_types()
            for t in types:
                prefix = t.key_file_prefix.encode("ascii")
                if buf.startswith(prefix, s, e):
                    rtype, s = t, s + len(prefix)
                    break
            else:
                expected = " or ".join(f"'{t.key_file_prefix}...'" for t in types)
                problem = f"not an encfs key file (expected {expected})"
            if rtype is not None and not _b64url32_into(buf, s, e, raw):
                problem = f"{rtype.key_file_prefix}... must be 43 characters of canonical unpadded base64url (32 bytes)"
        if not problem:
            return rtype.from_secret(SecretBytes.take(raw), source)  # type: ignore[union-attr,misc]
    finally:
        wipe(raw)
    raise KeyReferenceError(f"{source}: {problem}")


def _load_key_file(buf: bytearray, source: str) -> KeyObject:
    """Parse key-file bytes and wipe ``buf``, whatever happens."""
    try:
        return _parse_key_buffer(buf, source)
    finally:
        wipe(buf)


def parse_key_text(text: str, source: str) -> KeyObject:
    """Parse the text of a key file; ``source`` names it in errors (never its content)."""
    return _load_key_file(bytearray(text, "utf-8"), source)


def _load_keyfile_reference(path: str, ref: str) -> KeyObject:
    if path.startswith(tuple(t.key_file_prefix for t in registry.key_file_types())):
        raise KeyReferenceError("keyfile: takes a path, and this looks like key material; never put keys in references")
    return _load_key_file(read_secret_file(path, ref), ref)


def _load_env_reference(name: str, ref: str) -> KeyObject:
    return _load_key_file(env_bytes(name, ref), ref)


registry.register_scheme("keyfile", _load_keyfile_reference)
registry.register_scheme("env", _load_env_reference)


def load_reference(ref: str) -> KeyObject:
    """Load the key a reference names, by its scheme's registered loader. Errors name the
    reference, never key material."""
    if not isinstance(ref, str):
        raise KeyReferenceError(f"a key reference is a string, got {type(ref).__name__}")
    scheme, sep, rest = ref.partition(":")
    known = ", ".join(f"{s}:" for s in registry.schemes())
    if not sep or not rest or not registry.is_scheme(scheme):
        raise KeyReferenceError(f"malformed key reference: expected SCHEME:VALUE ({known}), see docs/KEYS.md")
    load = registry.loader(scheme)
    if load is None:
        raise KeyReferenceError(f"unknown key reference scheme {scheme!r}; expected one of {known}")
    return load(rest, ref)


def _split(spec: KeySpec) -> list[str | KeyObject]:
    if spec is None:
        return []
    if isinstance(spec, str):
        return [s.strip() for s in spec.split(",") if s.strip()]
    if registry.is_key_object(spec):
        return [spec]
    try:
        items = iter(spec)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"a key is a reference string or a key object of a registered type, got {type(spec).__name__}") from None
    out: list[str | KeyObject] = []
    for item in items:
        out.extend(_split(item))
    return out


class KeyRing:
    """The keys a filesystem writes to (recipients) and reads with (identities).

    ``key`` serves both; ``recipients`` / ``identities`` override either side, which is how
    an encrypt-only host is configured (public keys only). With nothing given, ``$ENCFS_KEY``
    (comma-separated references) is used. Keys load lazily and are wiped by ``wipe()``.
    """

    def __init__(
        self, key: KeySpec = None, recipients: KeySpec = None, identities: KeySpec = None, signers: Any = None, sign_with: Any = None
    ):
        if key is None and recipients is None and identities is None:
            key = env.default_key()
        self._key = _split(key)
        self._recipients = _split(recipients) if recipients is not None else self._key
        self._identities = _split(identities) if identities is not None else self._key
        self.signers = _trusted_signers(signers if signers is not None else env.default_signers())
        self._sign_with = sign_with
        self._signing_key: Any = None
        self._loaded: dict[str, KeyObject] = {}
        self._loading: ForkLocal[threading.RLock] = ForkLocal(threading.RLock, initial=threading.RLock())

    def _load(self, item: str | KeyObject) -> KeyObject:
        if not isinstance(item, str):
            return item
        with self._loading.get():  # threads opening files at once share one loaded key (and its caches)
            if item not in self._loaded:
                self._loaded[item] = load_reference(item)
            return self._loaded[item]

    def recipients(self) -> list[Recipient]:
        out = [self._load(i) for i in self._recipients]
        if not out:
            raise NoMatchingKeyError("no encryption key configured: pass key= or recipients= (or set $ENCFS_KEY)")
        registry.check_per_header((k.type for k in out), KeyReferenceError, "recipient")
        return out  # type: ignore[return-value]

    def identities(self) -> list[Identity]:
        return [k for k in (self._load(i) for i in self._identities) if hasattr(k, "unwrap")]  # type: ignore[misc]

    def signing_key(self) -> Any:
        """The ``encfs.signing.SigningKey`` whose ``sig`` stanza every file written gets, or None."""
        if self._sign_with is None:
            return None
        with self._loading.get():
            if self._signing_key is None:
                from ..signing import SigningKey

                spec = self._sign_with
                self._signing_key = spec if isinstance(spec, SigningKey) else SigningKey.load(str(spec))
            return self._signing_key

    def check_signature(self, header: Header, commitment: bytes) -> None:
        """With trusted ``signers``: ``SignatureError`` unless the header carries a valid
        signature by one of them over its context and ``commitment`` (the stored one; the reader
        then checks it against the keys it derives). Without: nothing, as before signatures."""
        check_stanzas(header)
        if self.signers:
            sig.check(header.stanzas, header.context, commitment, self.signers)

    def unwrap(self, header: Header) -> SecretBytes:
        """The file key, from the first stanza an identity matches by key id. With the audit log
        on, each call is one ``unwrap`` event (the stanza that opened the file, or ``failed``);
        a line that cannot be written wipes the key and fails the call (``AuditError``)."""
        try:
            file_key, label = self._unwrap(header)
        except Exception as e:
            audit.record(audit.UNWRAP, outcome=audit.FAILED, file_id=header.file_id, stanzas=header.labels(), **audit.error_fields(e))
            raise
        try:
            audit.record(audit.UNWRAP, key=label, file_id=header.file_id)
        except BaseException:
            file_key.wipe()
            raise
        return file_key

    def _unwrap(self, header: Header) -> tuple[SecretBytes, str]:
        check_stanzas(header)
        identities = self.identities()
        present = [s.label for s in header.stanzas if not sig.is_signature(s)]
        tried = []
        for stanza in header.stanzas:
            for ident in identities:
                if ident.matches(stanza):
                    tried.append(stanza.label)
                    file_key = ident.unwrap(stanza, header.context)
                    if file_key is not None:
                        return file_key, stanza.label
        mine = [_label(i) for i in identities]
        why = f"; {', '.join(tried)} matched but did not unwrap (wrong passphrase or tampered stanza)" if tried else ""
        raise NoMatchingKeyError(
            f"no configured key can open this file: it is encrypted to {present}, configured keys are {mine or 'none'}{why}",
            key_ids=present,
        )

    def without_signers(self) -> "KeyRing":
        """The same keys (shared, not reloaded) with no signer check: for files that carry a
        signature of their own (a manifest), read by a filesystem that checks writer signatures."""
        other = copy.copy(self)
        other.signers = ()
        return other

    def wipe(self) -> None:
        with self._loading.get():
            self._signing_key = None
            for k in self._loaded.values():
                wipe_key = getattr(k, "wipe", None)
                if wipe_key:
                    wipe_key()
            self._loaded.clear()

    def __repr__(self) -> str:
        return f"<KeyRing recipients={len(self._recipients)} identities={len(self._identities)} signers={len(self.signers)}>"


def check_stanzas(header: Header) -> None:
    """docs/FORMAT.md §1.4 step 3: every stanza type known, the per-header limits kept, at least
    one recipient, and every ``sig`` stanza well formed (signers configured or not)."""
    types = [s.type for s in header.stanzas]
    registry.check_known(types)
    registry.check_per_header(types)
    for s in header.stanzas:
        if sig.is_signature(s):
            sig.check_stanza(s)


def _trusted_signers(spec: Any) -> tuple:
    """``signers=``: Ed25519 public keys (``ed25519:...`` references, files holding one, comma
    separated, or ``VerifyKey`` objects), parsed now so that a bad one fails at configuration.
    An empty list is an error rather than "trust nobody" or "check nothing"."""
    if spec is None:
        return ()
    from ..signing import VerifyKey

    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec) if isinstance(spec, (list, tuple, set, frozenset)) else [spec]
    keys = tuple(VerifyKey.parse(i) for i in items if not (isinstance(i, str) and not i))
    if not keys:
        raise KeyReferenceError("signers= names no key; leave it out to read without signature checks")
    return keys


def _label(ident: object) -> str:
    kid = getattr(ident, "key_id", b"")
    t = getattr(ident, "type", "?")
    return f"{t}:{kid.hex()}" if kid else t
