"""The encfs header: magic, version, suite, file id, recipient stanzas, MAC, reserved room.

Layout (all integers big-endian; see docs/FORMAT.md for the normative text)::

    0   8  magic  89 45 4E 43 46 53 0D 0A   ("\\x89ENCFS\\r\\n")
    8   1  version = 1
    9   1  suite   = 1 (Cobblestone-256)
    10  2  flags   = 0
    12 16  file id (random)                  -- bytes 0..28 are the Cobblestone context
    28  4  header length H (payload starts at H)
    32  2  stanza count N
    34     N stanzas: u8 len+type, u8 len+key id, u16 len+params, u16 len+body
    M  32  HMAC-SHA-256(mac key, bytes 0..M)
    M+32   zero padding up to H (room for rewrapping in place)
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import cobblestone
from .errors import ConfigError, FormatError, HeaderFullError, IntegrityError
from .kdf import derive_secret
from .secret import SecretBytes

MAGIC = b"\x89ENCFS\r\n"
VERSION = 1
SUITE_COBBLESTONE256 = 1
SUITES = {SUITE_COBBLESTONE256: "cobblestone-256"}
FILE_ID_SIZE = 16
CONTEXT_SIZE = 28
FIXED_FIELDS_SIZE = 32
MAC_SIZE = 32
MIN_HEADER = FIXED_FIELDS_SIZE + 2 + MAC_SIZE
MAX_HEADER = 1 << 20
MAX_STANZAS = 64
MAX_TYPE = 32
MAX_KEY_ID = 64
MAX_PARAMS = 1024
MAX_BODY = 1024
HEADER_ALIGN = 512
STANDARD_HEADER = 1024
"""The header length writers use unless told otherwise (docs/FORMAT.md §4): one length for every
file lets a listing give plaintext sizes from object sizes alone, without reading headers."""
_TYPE_RE = re.compile(rb"^[a-z0-9][a-z0-9-]*\Z")
_MAC_INFO = b"encfs/v1 header-mac"


@dataclass(frozen=True)
class Stanza:
    """One recipient's copy of the file key: ``type`` picks the unwrapping rule."""

    type: str
    key_id: bytes
    params: bytes
    body: bytes

    def encode(self) -> bytes:
        t = self.type.encode("ascii")
        _check_stanza_fields(t, self.key_id, self.params, self.body)
        return (
            struct.pack(">B", len(t)) + t
            + struct.pack(">B", len(self.key_id)) + self.key_id
            + struct.pack(">H", len(self.params)) + self.params
            + struct.pack(">H", len(self.body)) + self.body
        )

    def aad(self, context: bytes) -> bytes:
        """What the wrapped key is bound to: this file and this stanza's public fields."""
        return context + self.encode()[: -len(self.body) - 2]

    @property
    def label(self) -> str:
        return f"{self.type}:{self.key_id.hex()}" if self.key_id else self.type


@dataclass
class Header:
    file_id: bytes
    stanzas: list[Stanza]
    length: int = 0
    version: int = VERSION
    suite: int = SUITE_COBBLESTONE256
    mac: bytes = b""
    signed: bytes = field(default=b"", repr=False)

    @property
    def context(self) -> bytes:
        return MAGIC + struct.pack(">BBH", self.version, self.suite, 0) + self.file_id

    def labels(self) -> list[str]:
        return [s.label for s in self.stanzas]


def new_file_id() -> bytes:
    return os.urandom(FILE_ID_SIZE)


def mac_key(file_key: SecretBytes, file_id: bytes) -> SecretBytes:
    return derive_secret(HKDF(hashes.SHA256(), 32, salt=file_id, info=_MAC_INFO), file_key.view(), 32)


def _hmac(key: SecretBytes, data: bytes) -> crypto_hmac.HMAC:
    h = crypto_hmac.HMAC(key.view(), hashes.SHA256())
    h.update(data)
    return h


def _check_stanza_fields(t: bytes, key_id: bytes, params: bytes, body: bytes) -> None:
    if not (1 <= len(t) <= MAX_TYPE and _TYPE_RE.match(t)):
        raise FormatError("stanza type must be 1-32 chars of [a-z0-9-]")
    if len(key_id) > MAX_KEY_ID:
        raise FormatError(f"stanza key id longer than {MAX_KEY_ID} bytes")
    if len(params) > MAX_PARAMS:
        raise FormatError(f"stanza params longer than {MAX_PARAMS} bytes")
    if not 1 <= len(body) <= MAX_BODY:
        raise FormatError(f"stanza body must be 1..{MAX_BODY} bytes")


def check_header_length(length: int) -> int:
    """A header length a writer may be given: a multiple of 512 from 1024 to 1 MiB."""
    if isinstance(length, bool) or not isinstance(length, int) or length % HEADER_ALIGN or not STANDARD_HEADER <= length <= MAX_HEADER:
        raise ConfigError(f"header_length must be a multiple of {HEADER_ALIGN} from {STANDARD_HEADER} to {MAX_HEADER}, not {length!r}")
    return length


def seal(header: Header, file_key: SecretBytes, length: int = STANDARD_HEADER) -> bytes:
    """Encode and MAC ``header``, padded to ``length``. Sets header.length."""
    if not 1 <= len(header.stanzas) <= MAX_STANZAS:
        raise FormatError(f"a header holds 1..{MAX_STANZAS} stanzas")
    from .keys.registry import check_per_header  # imported here: the key types import this module

    check_per_header(s.type for s in header.stanzas)
    body = struct.pack(">H", len(header.stanzas)) + b"".join(s.encode() for s in header.stanzas)
    needed = FIXED_FIELDS_SIZE + len(body) + MAC_SIZE
    if length < needed:
        fits = max(STANDARD_HEADER, -(-needed // HEADER_ALIGN) * HEADER_ALIGN)
        raise HeaderFullError(
            f"{len(header.stanzas)} recipient stanzas need a {needed}-byte header; this one is {length} bytes. "
            f"Pass header_length={fits} (or more) to the writing filesystem, and the same to filesystems that "
            "list these files, so that listed sizes stay exact (docs/FORMAT.md §4)"
        )
    if length > MAX_HEADER:
        raise FormatError(f"header of {length} bytes exceeds the {MAX_HEADER}-byte limit")
    signed = header.context + struct.pack(">I", length) + body
    key = mac_key(file_key, header.file_id)
    try:
        mac = _hmac(key, signed).finalize()
    finally:
        key.wipe()
    header.length, header.mac, header.signed = length, mac, signed
    return signed + mac + bytes(length - needed)


def parse_fixed_fields(prefix: bytes) -> int:
    """Check magic, version, suite and flags of the first 32 bytes; return the header length."""
    if len(prefix) < FIXED_FIELDS_SIZE or prefix[:8] != MAGIC:
        raise FormatError("not an encfs file (bad magic)")
    version, suite, flags = struct.unpack_from(">BBH", prefix, 8)
    if version != VERSION:
        raise FormatError(f"unsupported encfs format version {version} (this reader knows {VERSION})")
    if suite not in SUITES:
        raise FormatError(f"unknown cipher suite id {suite}")
    if flags != 0:
        raise FormatError(f"unknown header flags 0x{flags:04x}")
    (length,) = struct.unpack_from(">I", prefix, 28)
    if not MIN_HEADER <= length <= MAX_HEADER:
        raise FormatError(f"header length {length} out of range [{MIN_HEADER}, {MAX_HEADER}]")
    return length


def parse(buf: bytes) -> Header:
    """Parse a whole header (``buf`` holds at least its H bytes). Does not check the MAC."""
    length = parse_fixed_fields(buf)
    if len(buf) < length:
        raise FormatError(f"file too short for its {length}-byte header (truncated)")
    buf = bytes(buf[:length])
    pos = FIXED_FIELDS_SIZE

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if pos + n > length - MAC_SIZE:
            raise FormatError(f"header field {what} runs past the header")
        out = buf[pos : pos + n]
        pos += n
        return out

    (count,) = struct.unpack(">H", take(2, "stanza count"))
    if not 1 <= count <= MAX_STANZAS:
        raise FormatError(f"stanza count {count} out of range [1, {MAX_STANZAS}]")
    stanzas = []
    for i in range(count):
        t = take(take(1, "type length")[0], "type")
        key_id = take(take(1, "key id length")[0], "key id")
        params = take(struct.unpack(">H", take(2, "params length"))[0], "params")
        body = take(struct.unpack(">H", take(2, "body length"))[0], "body")
        try:
            _check_stanza_fields(t, key_id, params, body)
        except FormatError as e:
            raise FormatError(f"stanza {i}: {e}") from None
        stanzas.append(Stanza(t.decode("ascii"), key_id, params, body))
    mac = buf[pos : pos + MAC_SIZE]
    if any(buf[pos + MAC_SIZE :]):
        raise FormatError("header padding is not zero")
    return Header(
        file_id=buf[12:CONTEXT_SIZE],
        stanzas=stanzas,
        length=length,
        version=buf[8],
        suite=buf[9],
        mac=mac,
        signed=buf[:pos],
    )


def verify(header: Header, file_key: SecretBytes) -> None:
    key = mac_key(file_key, header.file_id)
    try:
        _hmac(key, header.signed).verify(header.mac)
    except InvalidSignature:
        raise IntegrityError("header MAC mismatch: the header was modified") from None
    finally:
        key.wipe()


def plaintext_size(ciphertext_size: int, header_length: int) -> int:
    """Plaintext size from the ciphertext size and header length alone."""
    if ciphertext_size < header_length:
        raise FormatError("file shorter than its header (truncated)")
    return cobblestone.plaintext_size(ciphertext_size - header_length)
