"""Keys: references, recipients (wrap a file key) and identities (unwrap it). Each recipient
type registers itself once (registry.py); importing this package registers the built-in ones."""

from .base import Identity, Recipient, new_file_key
from .passphrase import Argon2Params, Passphrase
from .refs import KeyRing, key_file_text, load_reference, public_reference
from .registry import RecipientType, register
from .symmetric import SymmetricKey
from .x25519 import X25519Identity, X25519Recipient
from . import kms  # noqa: F401  (registers the kms type; boto3 is imported when a kms key is used)
from . import sig  # noqa: F401  (registers the sig stanza: a writer's signature, no key)

__all__ = [
    "Argon2Params", "Identity", "KeyRing", "Passphrase", "Recipient", "RecipientType", "SymmetricKey",
    "X25519Identity", "X25519Recipient", "key_file_text", "load_reference", "new_file_key",
    "public_reference", "register",
]
