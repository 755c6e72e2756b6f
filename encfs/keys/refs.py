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
from pathlib import Path
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


def parse_key_text(text: str, source: str) -> SymmetricKey | X25519Identity:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if len(lines) != 1:
        raise KeyReferenceError(f"{source}: expected exactly one key line, found {len(lines)}")
    line = lines[0]
    if line.startswith(KEY_PREFIX):
        return SymmetricKey(SecretBytes.take(b64decode32(line[len(KEY_PREFIX) :], f"{source}: key")), source)
    if line.startswith(IDENTITY_PREFIX):
        raw = b64decode32(line[len(IDENTITY_PREFIX) :], f"{source}: identity")
        return X25519Identity(SecretBytes.take(raw), source)
    raise KeyReferenceError(f"{source}: not an encfs key file (expected '{KEY_PREFIX}...' or '{IDENTITY_PREFIX}...')")


def _read_text(path: str, source: str) -> str:
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as e:
        raise KeyReferenceError(f"{source}: cannot read key file: {e.strerror or e}") from None


def _env(name: str, source: str) -> str:
    value = os.environ.get(name)
    if not name or value is None:
        raise KeyReferenceError(f"{source}: environment variable {name!r} is not set")
    return value


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
        return parse_key_text(_read_text(rest, ref), ref)
    if scheme == "env":
        return parse_key_text(_env(rest, ref), ref)
    if scheme == "x25519":
        return X25519Recipient(bytes(b64decode32(rest, "x25519: public key")), ref)
    if scheme == "passphrase":
        kind, _, arg = rest.partition(":")
        if kind == "env":
            text = _env(arg, ref)
        elif kind == "file":
            text = _read_text(arg, ref).split("\n", 1)[0].removesuffix("\r")
        elif kind == "prompt" and not arg:
            text = getpass.getpass("encfs passphrase: ")
        else:
            raise KeyReferenceError("malformed passphrase reference: use passphrase:env:NAME, passphrase:file:PATH or passphrase:prompt")
        raw = bytearray(text.encode("utf-8"))
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
