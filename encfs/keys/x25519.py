"""X25519 public-key recipients: whoever holds only the public key can encrypt; reading needs
the identity (private key). An ephemeral X25519 exchange per stanza, HKDF-SHA-256 over the
shared secret bound to both public keys, then the common AES-GCM wrap (the shape of age's
X25519 recipient)."""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from ..errors import FormatError
from ..format import Stanza
from ..secret import SecretBytes
from .base import check_shape, hkdf32, open_stanza, seal_stanza
from .registry import RecipientType, register
from .sources import b64decode32, b64encode

TYPE = "x25519"
SCHEME = "x25519"
KEY_FILE_PREFIX = "encfs-x25519-identity-v1:"
_INFO = b"encfs/v1 x25519-wrap"


def _raw_public(pk: X25519PublicKey) -> bytes:
    return pk.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(public: bytes) -> bytes:
    return hashlib.sha256(b"encfs/v1 x25519-key-id" + public).digest()[:8]


def public_reference(public: bytes) -> str:
    """``x25519:PUBLIC``, the reference an encrypt-only host writes with."""
    return f"{SCHEME}:{b64encode(public)}"


def check_stanza(stanza: Stanza) -> None:
    check_shape(stanza, 8, 32, "8-byte key id and 32-byte ephemeral share")


class X25519Recipient:
    type = TYPE

    def __init__(self, public: bytes, source: str = "<memory>"):
        if len(public) != 32:
            raise ValueError("an X25519 public key is 32 bytes")
        self.public = public
        self.key_id = key_id(public)
        self.source = source

    def wrap(self, file_key: SecretBytes, context: bytes) -> Stanza:
        eph = X25519PrivateKey.generate()
        eph_pub = _raw_public(eph.public_key())
        shared = SecretBytes(eph.exchange(X25519PublicKey.from_public_bytes(self.public)))
        wk = hkdf32(shared.view(), eph_pub + self.public, _INFO)
        shared.wipe()
        return seal_stanza(TYPE, self.key_id, eph_pub, wk, file_key, context)

    def __repr__(self) -> str:
        return f"<X25519Recipient id={self.key_id.hex()}>"


class X25519Identity:
    type = TYPE

    def __init__(self, secret: SecretBytes, source: str = "<memory>"):
        if len(secret) != 32:
            raise ValueError("an X25519 private key is 32 bytes")
        self._secret = secret
        self.source = source
        self.recipient = X25519Recipient(_raw_public(self._private().public_key()), source)
        self.key_id = self.recipient.key_id

    @classmethod
    def generate(cls) -> "X25519Identity":
        raw = X25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return cls(SecretBytes(raw))

    @property
    def secret(self) -> SecretBytes:
        return self._secret

    def _private(self) -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(self._secret.view())

    def wrap(self, file_key: SecretBytes, context: bytes) -> Stanza:
        return self.recipient.wrap(file_key, context)

    def matches(self, stanza: Stanza) -> bool:
        return stanza.type == TYPE and hmac.compare_digest(stanza.key_id, self.key_id)

    def unwrap(self, stanza: Stanza, context: bytes) -> SecretBytes | None:
        check_stanza(stanza)
        try:
            shared = SecretBytes(self._private().exchange(X25519PublicKey.from_public_bytes(stanza.params)))
        except ValueError:
            raise FormatError("x25519 stanza has a low-order ephemeral share") from None
        wk = hkdf32(shared.view(), stanza.params + self.recipient.public, _INFO)
        shared.wipe()
        return open_stanza(stanza, wk, context)

    def wipe(self) -> None:
        self._secret.wipe()

    def __repr__(self) -> str:
        return f"<X25519Identity id={self.key_id.hex()} from {self.source}>"


def load_public(value: str, ref: str) -> X25519Recipient:
    """``x25519:PUBLIC``: a public key, which encrypts only."""
    return X25519Recipient(bytes(b64decode32(value, "x25519: public key")), ref)


register(RecipientType(
    TYPE, (X25519Recipient, X25519Identity), check_stanza, schemes={SCHEME: load_public},
    key_file_prefix=KEY_FILE_PREFIX, from_secret=X25519Identity,
))
