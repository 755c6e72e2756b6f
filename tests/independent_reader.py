"""An encfs v1 reader written from docs/FORMAT.md alone (plus the test vectors).

It shares no code with the encfs package on purpose: it exists to show that the
spec is enough to open every file encfs writes. Sections follow the spec:
key files, header (§1), stanzas (§1.1, §1.2), writer signatures (§1.5),
header MAC (§1.3, §1.4), sizes (§3) and payload (§2).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from hmac import compare_digest

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat


class FormatError(Exception):
    """The bytes are not a well-formed encfs v1 file."""


class IntegrityError(Exception):
    """A MAC, commitment or chunk tag did not verify."""


class NoMatchingKeyError(Exception):
    """No stanza could be unwrapped with the keys the reader holds."""


class SignatureError(IntegrityError):
    """§1.5: trusted signers were given and the file has no valid signature by one of them
    (or a signature by a trusted signer failed to verify). An integrity error."""


# ---------------------------------------------------------------------------
# Key files.  NOT specified by FORMAT.md; inferred from the test vectors:
#   '#' lines are comments, blank lines ignored, and exactly one line
#   "<prefix><base64url, no padding, 32 bytes>".
# ---------------------------------------------------------------------------

SYM_KEY_PREFIX = "encfs-key-v1:"
X25519_IDENTITY_PREFIX = "encfs-x25519-identity-v1:"


def _parse_key_file(text: str, prefix: str) -> bytes:
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if len(lines) != 1 or not lines[0].startswith(prefix):
        raise ValueError(f"expected exactly one {prefix!r} line")
    b64 = lines[0][len(prefix):]
    if len(b64) != 43 or "=" in b64:
        raise ValueError("expected 43 characters of unpadded base64url")
    key = base64.urlsafe_b64decode(b64 + "=")
    if base64.urlsafe_b64encode(key).rstrip(b"=").decode() != b64:
        raise ValueError("non-canonical base64url")
    return key


def parse_sym_key_file(text: str) -> bytes:
    return _parse_key_file(text, SYM_KEY_PREFIX)


def parse_x25519_identity_file(text: str) -> bytes:
    return _parse_key_file(text, X25519_IDENTITY_PREFIX)


# ---------------------------------------------------------------------------
# Small crypto helpers (all primitives from pyca/cryptography).
# ---------------------------------------------------------------------------

def _hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def _sha256(data: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA256())
    h.update(data)
    return h.finalize()


def _u16(b: bytes, off: int) -> int:
    return int.from_bytes(b[off:off + 2], "big")


def _u32(b: bytes, off: int) -> int:
    return int.from_bytes(b[off:off + 4], "big")


# ---------------------------------------------------------------------------
# §1 Header: fixed fields
# ---------------------------------------------------------------------------

MAGIC = b"\x89ENCFS\r\n"
MIN_H, MAX_H = 66, 1048576
MAX_STANZAS = 64
MAC_LEN = 32


@dataclass
class Stanza:
    type: str
    key_id: bytes
    params: bytes
    body: bytes
    fields: bytes  # stanza_fields: the encoding up to and including params


@dataclass
class Header:
    context: bytes   # bytes[0:28]
    file_id: bytes
    length: int      # H
    stanzas: list
    mac_input: bytes  # bytes[0:M]
    mac: bytes


def _parse_fixed_fields(data: bytes) -> int:
    if len(data) < 34:
        raise FormatError("file too short for an encfs header")
    if data[0:8] != MAGIC:
        raise FormatError("bad magic")
    if data[8] != 0x01:
        raise FormatError(f"unsupported version {data[8]}")
    if data[9] != 0x01:
        raise FormatError(f"unsupported suite {data[9]}")
    if _u16(data, 10) != 0:
        raise FormatError("nonzero flags")
    h = _u32(data, 28)
    if not MIN_H <= h <= MAX_H:
        raise FormatError(f"header length {h} out of range")
    if h > len(data):
        raise FormatError("file shorter than its header length")
    return h


# ---------------------------------------------------------------------------
# §1.1 Stanzas: encoding and per-type shape
# ---------------------------------------------------------------------------

KNOWN_TYPES = ("key", "passphrase", "x25519", "sig")  # `kms` is not supported: refused (§1.1)
RECIPIENT_TYPES = ("key", "passphrase", "x25519")
BODY_LEN = 12 + 32 + 16

# §1.5 `sig` stanza: 8-byte key id, params = the signer's Ed25519 public key A, 64-byte body.
SIG_TYPE = "sig"
SIG_KEY_ID_LEN, SIG_PUBLIC_LEN, SIG_BODY_LEN = 8, 32, 64
MAX_SIG_STANZAS = 4
SIG_MESSAGE_PREFIX = b"encfs/v1 writer-signature"


def sig_key_id(public: bytes) -> bytes:
    """§1.5: key_id = SHA-256("encfs/v1 sig-key-id" || A)[0:8]."""
    return _sha256(b"encfs/v1 sig-key-id" + bytes(public))[0:8]


class _Cursor:
    """Reads length-prefixed fields, never past `limit` (= H - 32)."""

    def __init__(self, data: bytes, pos: int, limit: int):
        self.data, self.pos, self.limit = data, pos, limit

    def take(self, n: int) -> bytes:
        if self.pos + n > self.limit:
            raise FormatError("stanza runs into the header MAC / past H")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out


def _valid_type(t: bytes) -> bool:
    first = b"abcdefghijklmnopqrstuvwxyz0123456789"
    rest = first + b"-"
    return 1 <= len(t) <= 32 and t[0] in first and all(c in rest for c in t)


def _parse_stanza(cur: _Cursor) -> Stanza:
    start = cur.pos
    type_b = cur.take(cur.take(1)[0])
    key_id = cur.take(cur.take(1)[0])
    params = cur.take(int.from_bytes(cur.take(2), "big"))
    fields = cur.data[start:cur.pos]
    body = cur.take(int.from_bytes(cur.take(2), "big"))

    if not _valid_type(type_b):
        raise FormatError("malformed stanza type")
    if len(key_id) > 64 or len(params) > 1024 or not 1 <= len(body) <= 1024:
        raise FormatError("stanza field length out of range")
    stype = type_b.decode("ascii")
    if stype not in KNOWN_TYPES:
        raise FormatError(f"unknown recipient type {stype!r}")
    if stype == SIG_TYPE:
        # §1.5: shape and key-id rule, checked up front for every `sig` stanza (the reader
        # checks every stanza's shape when it parses the header, §1.1 allows this).
        if (len(key_id), len(params), len(body)) != (SIG_KEY_ID_LEN, SIG_PUBLIC_LEN, SIG_BODY_LEN):
            raise FormatError("sig stanza has the wrong shape (want 8-byte key id, 32-byte params, 64-byte body)")
        if key_id != sig_key_id(params):
            raise FormatError("sig stanza: key id is not the id of its public key")
        return Stanza(stype, key_id, params, body, fields)
    if len(body) != BODY_LEN:
        raise FormatError("wrapped key body is not 60 bytes")
    # Per-type shapes from §1.2 (checked for every stanza, not just those we try).
    shape = {"key": (8, 0), "passphrase": (0, 28), "x25519": (8, 32)}[stype]
    if (len(key_id), len(params)) != shape:
        raise FormatError(f"{stype} stanza has wrong key_id/params length")
    return Stanza(stype, key_id, params, body, fields)


def parse_header(data: bytes) -> Header:
    h = _parse_fixed_fields(data)
    n = _u16(data, 32)
    if not 1 <= n <= MAX_STANZAS:
        raise FormatError(f"stanza count {n} out of range")
    cur = _Cursor(data, 34, h - MAC_LEN)
    stanzas = [_parse_stanza(cur) for _ in range(n)]
    m = cur.pos
    if any(data[m + MAC_LEN:h]):
        raise FormatError("header padding is not all zero")
    if sum(st.type == "passphrase" for st in stanzas) > 1:
        raise FormatError("at most one passphrase stanza")
    n_sig = sum(st.type == SIG_TYPE for st in stanzas)
    if n_sig > MAX_SIG_STANZAS:
        raise FormatError(f"{n_sig} sig stanzas; at most {MAX_SIG_STANZAS}")
    if not any(st.type in RECIPIENT_TYPES for st in stanzas):
        # §1.5 "and at least one recipient stanza besides" (no error class named there;
        # this reader treats it as a malformed header).
        raise FormatError("header holds only sig stanzas, no recipient stanza")
    return Header(
        context=data[0:28], file_id=data[12:28], length=h, stanzas=stanzas,
        mac_input=data[0:m], mac=data[m:m + MAC_LEN],
    )


# ---------------------------------------------------------------------------
# §1.2 Unwrapping the file key, one derivation per stanza type
# ---------------------------------------------------------------------------

def _sym_key_id(k: bytes) -> bytes:
    return _hkdf_sha256(k, b"", b"encfs/v1 key-id")[0:8]


def _x25519_key_id(public: bytes) -> bytes:
    return _sha256(b"encfs/v1 x25519-key-id" + public)[0:8]


def _wrap_key_sym(k: bytes, hdr: Header, st: Stanza) -> bytes:
    return _hkdf_sha256(k, hdr.file_id, b"encfs/v1 key-wrap")


def _wrap_key_passphrase(p: bytes, hdr: Header, st: Stanza) -> bytes:
    salt = st.params[0:16]
    memory_kib, iterations, lanes = _u32(st.params, 16), _u32(st.params, 20), _u32(st.params, 24)
    if not (1 <= lanes <= 16 and 1 <= iterations <= 10 and 8 * lanes <= memory_kib <= 1048576
            and memory_kib * iterations <= 4194304):
        raise FormatError("passphrase stanza: Argon2id parameters out of bounds")
    kdf = Argon2id(salt=salt, length=32, iterations=iterations, lanes=lanes, memory_cost=memory_kib)
    return kdf.derive(p)


def _wrap_key_x25519(private: bytes, hdr: Header, st: Stanza) -> bytes:
    r = X25519PrivateKey.from_private_bytes(private)
    r_pub = r.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    e_pub = st.params
    try:
        s = r.exchange(X25519PublicKey.from_public_bytes(e_pub))
    except ValueError:  # pyca refuses an all-zero shared secret
        raise FormatError("x25519 stanza: all-zero shared secret") from None
    if s == bytes(32):
        raise FormatError("x25519 stanza: all-zero shared secret")
    return _hkdf_sha256(s, e_pub + r_pub, b"encfs/v1 x25519-wrap")


def _unwrap(wk: bytes, hdr: Header, st: Stanza) -> bytes | None:
    nonce, sealed = st.body[:12], st.body[12:]
    try:
        return AESGCM(wk).decrypt(nonce, sealed, hdr.context + st.fields)
    except InvalidTag:
        return None


def _candidates(hdr: Header, sym_key, x25519_private, passphrase):
    """§1.4 step 2: (stanza, wrap-key function, secret) for stanzas matching a held key."""
    sym_id = _sym_key_id(sym_key) if sym_key is not None else None
    x_id = None
    if x25519_private is not None:
        pub = X25519PrivateKey.from_private_bytes(x25519_private).public_key()
        x_id = _x25519_key_id(pub.public_bytes(Encoding.Raw, PublicFormat.Raw))
    for st in hdr.stanzas:  # in file order: "the first stanza that verifies"
        if st.type == "key" and sym_id is not None and st.key_id == sym_id:
            yield st, _wrap_key_sym, sym_key
        elif st.type == "x25519" and x_id is not None and st.key_id == x_id:
            yield st, _wrap_key_x25519, x25519_private
        elif st.type == "passphrase" and passphrase is not None:
            yield st, _wrap_key_passphrase, passphrase


# ---------------------------------------------------------------------------
# §1.5 / §1.4 step 4 Writer signatures
# ---------------------------------------------------------------------------

def _trusted_by_id(trusted_signers) -> dict:
    if isinstance(trusted_signers, (bytes, bytearray, memoryview, str)):
        raise TypeError("trusted_signers is a list of 32-byte Ed25519 public keys")
    trusted = {}
    for pub in trusted_signers:
        pub = bytes(pub)
        if len(pub) != SIG_PUBLIC_LEN:
            raise ValueError("a trusted signer is a raw 32-byte Ed25519 public key")
        Ed25519PublicKey.from_public_bytes(pub)  # ValueError if pyca refuses the encoding
        trusted[sig_key_id(pub)] = pub
    if not trusted:
        raise ValueError("trusted_signers names no key; pass None to read without signature checks")
    return trusted


def check_signatures(hdr: Header, commitment: bytes, trusted_signers) -> None:
    """§1.4 step 4 / §1.5, before any key is tried. `commitment` is the stored one (offset H+24).

    Every `sig` stanza whose key id is a trusted key's id must verify, and at least one must
    exist; stanzas by untrusted keys are not verified. Signatures are verified with the
    *trusted* key itself, never with the stanza's params alone: a stanza whose key id equals a
    trusted key's id but whose public key differs (a 64-bit key id collision) is refused.
    """
    trusted = _trusted_by_id(trusted_signers)
    if len(commitment) != 32:
        raise FormatError("no room for the payload commitment")
    message = SIG_MESSAGE_PREFIX + hdr.context + bytes(commitment)
    sigs = [st for st in hdr.stanzas if st.type == SIG_TYPE]
    verified = 0
    for st in sigs:
        pub = trusted.get(st.key_id)
        if pub is None:
            continue  # not a trusted signer: not verified
        if not compare_digest(st.params, pub):
            raise SignatureError(f"sig:{st.key_id.hex()} has a trusted key id but another public key")
        try:
            Ed25519PublicKey.from_public_bytes(pub).verify(st.body, message)
        except InvalidSignature:
            raise SignatureError(f"signature sig:{st.key_id.hex()} by a trusted signer does not verify") from None
        verified += 1
    if verified == 0:
        if sigs:
            present = ", ".join(f"sig:{st.key_id.hex()}" for st in sigs)
            raise SignatureError(f"not signed by a trusted signer; signatures present: {present}")
        raise SignatureError("not signed by a trusted signer; the file carries no signature")


# ---------------------------------------------------------------------------
# §1.3 / §1.4 Opening a header
# ---------------------------------------------------------------------------

def open_header(hdr: Header, *, sym_key=None, x25519_private=None, passphrase=None,
                trusted_signers=None, commitment: bytes | None = None) -> bytes:
    """§1.4 steps 4-6. With `trusted_signers`, `commitment` (the stored payload commitment,
    file bytes H+24..H+56) is required and the signatures are checked before any key is tried."""
    if trusted_signers is not None:
        if commitment is None:
            raise ValueError("checking signatures needs the stored payload commitment")
        check_signatures(hdr, commitment, trusted_signers)
    file_key = None
    for st, wrap_key, secret in _candidates(hdr, sym_key, x25519_private, passphrase):
        file_key = _unwrap(wrap_key(secret, hdr, st), hdr, st)
        if file_key is not None:
            break
    if file_key is None:
        present = ", ".join(f"{s.type}:{s.key_id.hex()}" for s in hdr.stanzas)
        raise NoMatchingKeyError(f"no stanza matches the keys held; stanzas present: {present}")

    mac_key = _hkdf_sha256(file_key, hdr.file_id, b"encfs/v1 header-mac")
    mac = hmac.HMAC(mac_key, hashes.SHA256())
    mac.update(hdr.mac_input)
    try:
        mac.verify(hdr.mac)  # constant time
    except InvalidSignature:
        raise IntegrityError("header MAC mismatch") from None
    return file_key


# ---------------------------------------------------------------------------
# §3 Sizes
# ---------------------------------------------------------------------------

CHUNK_PLAIN = 16384
TAG = 16
CHUNK_SEALED = CHUNK_PLAIN + TAG
PAYLOAD_PREFIX = 24 + 32  # salt || commitment
MAX_CHUNKS = 2 ** 38


def chunk_layout(total: int, h: int) -> tuple[int, int]:
    """Returns (full, last): the number of full chunks and the sealed size of the final one."""
    body = total - h - PAYLOAD_PREFIX
    if body < TAG:
        raise FormatError("truncated: payload shorter than one empty chunk")
    full, last = divmod(body, CHUNK_SEALED)
    if last < TAG:
        raise FormatError("truncated: file ends on a chunk boundary (final chunk missing)")
    if full + 1 > MAX_CHUNKS:
        raise FormatError("too many chunks")
    return full, last


# ---------------------------------------------------------------------------
# §2 Payload: C2SP chunked-encryption v1, Cobblestone-256
# ---------------------------------------------------------------------------

def open_payload(payload: bytes, file_key: bytes, context: bytes, full: int, last: int) -> bytes:
    salt, stored_commitment = payload[0:24], payload[24:56]
    info = b"c2sp.org/chunked-encryption@v1+" + b"AEAD_AES_256_GCM" + b"\x00" + salt + context
    okm = HKDFExpand(algorithm=hashes.SHA512(), length=76, info=info).derive(file_key)
    k, base_nonce, commitment = okm[0:32], okm[32:44], okm[44:76]

    if not compare_digest(commitment, stored_commitment):  # constant time
        raise IntegrityError("payload commitment mismatch")

    aead = AESGCM(k)
    base = int.from_bytes(base_nonce, "big")
    out = []
    pos = PAYLOAD_PREFIX
    for i in range(full + 1):
        size = CHUNK_SEALED if i < full else last
        nonce = (base ^ i).to_bytes(12, "big")
        try:
            out.append(aead.decrypt(nonce, payload[pos:pos + size], None))
        except InvalidTag:
            raise IntegrityError(f"chunk {i} failed to authenticate") from None
        pos += size
    return b"".join(out)


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------

def open_encfs(data: bytes, *, sym_key: bytes | None = None,
               x25519_private: bytes | None = None,
               passphrase: bytes | None = None,
               trusted_signers=None) -> bytes:
    """Opens a whole file. `trusted_signers`: None (no signature check) or a non-empty list of
    raw 32-byte Ed25519 public keys; then a file without a valid signature by one of them
    raises SignatureError (an IntegrityError) before any key is tried (§1.4 step 4, §1.5)."""
    if trusted_signers is not None:
        _trusted_by_id(trusted_signers)            # a caller error, before reading anything
    hdr = parse_header(data)                       # §1, §1.1, §1.5 shape: format errors
    full, last = chunk_layout(len(data), hdr.length)  # §3: format errors, before any crypto
    commitment = data[hdr.length + 24:hdr.length + 56]  # stored commitment (§1.4 step 4)
    file_key = open_header(hdr, sym_key=sym_key, x25519_private=x25519_private,
                           passphrase=passphrase, trusted_signers=trusted_signers,
                           commitment=commitment)  # §1.2-§1.5
    return open_payload(data[hdr.length:], file_key, hdr.context, full, last)  # §2
