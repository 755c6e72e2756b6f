"""The ``sig`` header stanza: a writer's Ed25519 signature over the file's context and the
payload's key commitment (docs/FORMAT.md §1.5).

With X25519 recipients anyone holding the public key can write a file the identity holder
opens as authentic. A reader given trusted signer keys (``signers=``) refuses every file that
does not carry a valid signature by one of them, before the file key is unwrapped. The
signature covers what a rewrap leaves alone (context and commitment), so it stays valid when
recipients change; the commitment pins the file key and salt, so a file written by someone
else (a new file key) cannot reuse it. What it cannot stop: a holder of *this* file's key
(any of its recipients) can seal new chunks under it; a signed manifest's digest catches that
(docs/MANIFESTS.md).

A ``sig`` stanza wraps no key: it is registered so that readers know the type (older readers
reject it as unknown, the rule for every new stanza type) and is never offered to identities.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from typing import Any, Iterable, Sequence

from ..errors import FormatError, SignatureError
from ..format import Stanza
from .registry import RecipientType, register

TYPE = "sig"
KEY_ID_SIZE = 8
PUBLIC_SIZE = 32
SIGNATURE_SIZE = 64
MAX_PER_HEADER = 4
SIGNED_PREFIX = b"encfs/v1 writer-signature"
_KEY_ID_INFO = b"encfs/v1 sig-key-id"


def key_id(public: bytes) -> bytes:
    return hashlib.sha256(_KEY_ID_INFO + public).digest()[:KEY_ID_SIZE]


def message(context: bytes, commitment: bytes) -> bytes:
    """What the writer signs: fixed-length fields after a domain-separating prefix."""
    if len(context) != 28 or len(commitment) != 32:
        raise ValueError("a writer signature covers a 28-byte context and a 32-byte commitment")
    return SIGNED_PREFIX + context + commitment


def check_stanza(stanza: Stanza) -> None:
    """``FormatError`` unless the stanza has the ``sig`` shape and its key id names its key."""
    if len(stanza.key_id) != KEY_ID_SIZE or len(stanza.params) != PUBLIC_SIZE or len(stanza.body) != SIGNATURE_SIZE:
        raise FormatError("malformed sig stanza: 8-byte key id, 32-byte public key and 64-byte signature expected")
    if not hmac.compare_digest(stanza.key_id, key_id(stanza.params)):
        raise FormatError("malformed sig stanza: its key id is not the id of its public key")


def sign(signing_key: Any, context: bytes, commitment: bytes) -> Stanza:
    """The stanza ``signing_key`` (an ``encfs.signing.SigningKey``) makes for this file."""
    public = signing_key.verify_key.raw
    return Stanza(TYPE, key_id(public), public, signing_key.sign(message(context, commitment)))


def is_signature(stanza: Stanza) -> bool:
    return stanza.type == TYPE


def check(stanzas: Iterable[Stanza], context: bytes, commitment: bytes, signers: Sequence[Any]) -> Any:
    """The trusted signer (an ``encfs.signing.VerifyKey``) whose valid signature the header
    carries; ``SignatureError`` when there is none. Only stanzas of trusted key ids are
    verified, and a trusted signer's signature that does not verify is an error even when
    another would: a header is either signed as it says or refused. The stanzas' shapes were
    checked with the header's other rules (``KeyRing.check_signature``)."""
    found = [s for s in stanzas if is_signature(s)]
    by_id = {key_id(k.raw): k for k in signers}
    signed = message(context, commitment)
    trusted = None
    for s in found:
        signer = by_id.get(s.key_id)
        if signer is None:
            continue
        if not hmac.compare_digest(signer.raw, s.params) or not _verifies(signer.raw, s.body, signed):
            raise SignatureError(f"the signature by trusted signer {signer.reference} does not verify: the file was altered or re-signed")
        trusted = trusted or signer
    if trusted is None:
        by = ", ".join(s.label for s in found)
        raise SignatureError(
            "not signed by a trusted signer: " + (f"signed by {by} only" if by else "the file carries no signature"),
            signers=[s.label for s in found],
        )
    return trusted


@functools.lru_cache(maxsize=4096)
def _verifies(public: bytes, signature: bytes, signed: bytes) -> bool:
    """Ed25519 verification, remembered: a loader opens the same files every epoch, and the
    answer for the same public key, signature and message never changes (none of them secret)."""
    from ..signing import VerifyKey

    return VerifyKey(public).verify(signature, signed)


register(RecipientType(TYPE, (), check_stanza, max_per_header=MAX_PER_HEADER))
