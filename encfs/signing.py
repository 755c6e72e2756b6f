"""Ed25519 keys that sign dataset manifests (``encfs.manifest``).

A signing key lives in a text file made by ``encfs manifest keygen`` (mode 0600)::

    # encfs manifest signing key (Ed25519); keep it secret
    # public key: ed25519:<base64url>
    encfs-ed25519-signing-v1:<base64url of the 32-byte private seed>

(comments and blank lines ignored, exactly one other line, as for encfs key files, docs/FORMAT.md §5).
A public key, which is what readers are given to trust, is written ``ed25519:<base64url>``
(the raw 32-byte key, unpadded base64url). Key bytes never appear in an error, a log line or
a repr: errors name the file or the reference's kind only.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .errors import KeyReferenceError
from .keys.sources import b64decode32, b64encode, read_secret_file, wipe

SIGNING_PREFIX = "encfs-ed25519-signing-v1:"
PUBLIC_PREFIX = "ed25519:"
_SMALL_ORDER_Y = frozenset(
    bytes.fromhex(h)
    for h in (
        "00" * 32,  # order 4
        "01" + "00" * 31,  # the identity
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
        "ec" + "ff" * 30 + "7f",  # p - 1: order 2
        "ed" + "ff" * 30 + "7f",  # p (non-canonical 0)
        "ee" + "ff" * 30 + "7f",  # p + 1 (non-canonical 1)
    )
)
"""The y coordinates (sign bit cleared) of the Ed25519 points of small order, canonical and not:
under such a public key one signature verifies for a fraction of all messages, so it is refused
as a trusted key (the list libsodium blocks; tests/test_signatures.py checks each with pyca)."""


class VerifyKey:
    """A trusted Ed25519 public key, from its ``ed25519:<base64url>`` reference."""

    __slots__ = ("raw", "_key")

    def __init__(self, raw: bytes):
        if len(raw) != 32:
            raise KeyReferenceError("an Ed25519 public key is 32 bytes")
        if bytes(raw[:31]) + bytes([raw[31] & 0x7F]) in _SMALL_ORDER_Y:
            raise KeyReferenceError("a small-order Ed25519 public key: signatures under it can be forged, so it cannot be trusted")
        self.raw = bytes(raw)
        self._key = Ed25519PublicKey.from_public_bytes(self.raw)

    @classmethod
    def parse(cls, value: "str | VerifyKey") -> "VerifyKey":
        """``ed25519:<base64url>``, or the path of a file holding that line (a ``.pub`` file,
        or a signing key file, whose comment carries it)."""
        if isinstance(value, VerifyKey):
            return value
        if not isinstance(value, str):
            raise KeyReferenceError(f"a signer is an 'ed25519:<base64url>' reference, not {type(value).__name__}")
        text = value.strip()
        if text.startswith(PUBLIC_PREFIX):
            raw = b64decode32(text[len(PUBLIC_PREFIX):], "ed25519: public key")
            return cls(bytes(raw))
        if os.path.isfile(os.path.expanduser(text)):
            buf = read_secret_file(text, f"signer file {text}", "signer file")
            try:
                lines = [ln.strip() for ln in buf.decode("utf-8", "replace").splitlines()]
                is_signing_key = any(ln.startswith(SIGNING_PREFIX) for ln in lines)
            finally:
                wipe(buf)
            if is_signing_key:  # the key itself decides, never the comment beside it
                return SigningKey.load(text).verify_key
            for ln in lines:
                body = ln.lstrip("#").strip()
                if body.startswith("public key:"):
                    body = body[len("public key:"):].strip()
                if body.startswith(PUBLIC_PREFIX):
                    return cls.parse(body)
            raise KeyReferenceError(f"signer file {text}: no 'ed25519:' public key in it")
        raise KeyReferenceError("a signer must be 'ed25519:<base64url>' or the path of a file holding one")

    @property
    def reference(self) -> str:
        return PUBLIC_PREFIX + b64encode(self.raw)

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            self._key.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def __reduce__(self) -> tuple:
        return VerifyKey, (self.raw,)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"<VerifyKey {self.reference}>"


class SigningKey:
    """An Ed25519 private key loaded from a signing key file. ``repr`` shows the public key only."""

    __slots__ = ("_key", "verify_key", "source")

    def __init__(self, key: Ed25519PrivateKey, source: str = "<generated>"):
        self._key = key
        self.verify_key = VerifyKey(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
        self.source = source

    @classmethod
    def generate(cls) -> "SigningKey":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str) -> "SigningKey":
        """The key in file ``path``; every failure a ``KeyReferenceError`` naming the file, never its content."""
        source = f"signing key file {path}"
        buf = read_secret_file(path, source, "signing key file")
        seed = None
        try:
            try:
                text = buf.decode("ascii")
            except UnicodeDecodeError:
                raise KeyReferenceError(f"{source}: not a text key file") from None
            lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
            if len(lines) != 1 or not lines[0].startswith(SIGNING_PREFIX):
                raise KeyReferenceError(f"{source}: expected one line '{SIGNING_PREFIX}<base64url>' (make one with 'encfs manifest keygen')")
            seed = b64decode32(lines[0][len(SIGNING_PREFIX):], f"{source}: the key")
            del text, lines
            return cls(Ed25519PrivateKey.from_private_bytes(bytes(seed)), source=path)
        finally:
            wipe(buf)
            wipe(seed)

    @property
    def public(self) -> str:
        return self.verify_key.reference

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def file_text(self) -> str:
        """The key file's text (holds the private key: write it 0600, never log it)."""
        from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat

        seed = bytearray(self._key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))
        try:
            return (
                "# encfs manifest signing key (Ed25519); keep it secret\n"
                f"# public key: {self.public}\n"
                f"{SIGNING_PREFIX}{b64encode(seed)}\n"
            )
        finally:
            wipe(seed)

    def __repr__(self) -> str:
        return f"<SigningKey public={self.public}>"

    def __reduce__(self):
        raise TypeError("a SigningKey is not pickled (it would carry the private key)")


def write_signing_key(path: str, key: SigningKey, force: bool = False) -> None:
    """Write ``key`` to a new file ``path``, mode 0600, atomically (``force``: replace one)."""
    from .sink import LocalSink, fill_atomically

    try:
        sink = LocalSink(os.path.abspath(path), exclusive=not force, mode=0o600)
        fill_atomically(sink, lambda s: s.write(key.file_text().encode("ascii")))
    except FileExistsError:
        raise KeyReferenceError(f"{path} exists; use --force to overwrite a signing key file") from None
