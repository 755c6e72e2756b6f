"""Regenerate tests/vectors/encfs_v1.json: whole encfs files with the keys that open them,
and negative cases with the error class a reader must raise. Run from the repo root:
``python tests/vectors/make_vectors.py``. Output is random (salts, ids, nonces) but every
file in it is valid (or invalid) as labelled; tests check both encfs and an independent reader."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import fsspec

from encfs.filesystem import EncFileSystem
from encfs.format import Stanza, parse
from encfs.keys import Argon2Params, Passphrase, SymmetricKey, X25519Identity, key_file_text
from encfs.secret import SecretBytes

SIZES = [0, 1, 16383, 16384, 16385, 40000]
PASSPHRASE = "correct horse battery staple"
LOW_COST = Argon2Params(memory_kib=1024, iterations=1, lanes=1)


def pattern(n: int, seed: int) -> bytes:
    return bytes((j * 7 + seed) % 256 for j in range(n))


def main() -> None:
    sym = SymmetricKey.generate()
    ident = X25519Identity.generate()
    pw = Passphrase(SecretBytes(PASSPHRASE.encode()), params=LOW_COST)
    mem = fsspec.filesystem("memory")
    cases = []
    for seed, (kind, key) in enumerate((("key", sym), ("x25519", ident.recipient), ("passphrase", pw))):
        fs = EncFileSystem(fs=mem, key=[key])
        for n in SIZES:
            path = f"/vectors/{kind}-{n}.enc"
            fs.pipe_file(path, pattern(n, seed))
            cases.append({"name": f"{kind}-{n}", "recipient": kind, "plaintext_len": n,
                          "plaintext_pattern": f"bytes((j * 7 + {seed}) % 256 for j in range(plaintext_len))",
                          "file": mem.cat_file(path).hex(), "valid": True})
    multi = EncFileSystem(fs=mem, key=[sym, ident.recipient, pw])
    multi.pipe_file("/vectors/multi.enc", pattern(20000, 9))
    cases.append({"name": "three-recipients-20000", "recipient": "key", "plaintext_len": 20000,
                  "plaintext_pattern": "bytes((j * 7 + 9) % 256 for j in range(plaintext_len))",
                  "file": mem.cat_file("/vectors/multi.enc").hex(), "valid": True})
    base = bytes.fromhex(next(c for c in cases if c["name"] == "key-40000")["file"])
    hl = struct.unpack(">I", base[28:32])[0]
    mac_at = len(parse(base).signed)

    def bad(name: str, data: bytes, error: str, note: str) -> None:
        cases.append({"name": name, "recipient": "key", "file": data.hex(), "valid": False, "error": error, "note": note})

    flip = lambda b, i: b[:i] + bytes([b[i] ^ 1]) + b[i + 1:]
    bad("bad-magic", flip(base, 1), "FormatError", "magic byte changed")
    bad("bad-version", base[:8] + b"\x02" + base[9:], "FormatError", "version 2")
    bad("bad-suite", base[:9] + b"\x07" + base[10:], "FormatError", "suite 7")
    bad("bad-flags", base[:11] + b"\x01" + base[12:], "FormatError", "flags 0x0001")
    bad("file-id-flipped", flip(base, 20), "NoMatchingKeyError", "file id is bound into the wrapped key (AAD)")
    bad("header-length-huge", base[:28] + struct.pack(">I", 1 << 21) + base[32:], "FormatError", "H > 1 MiB")
    bad("stanza-count-zero", base[:32] + b"\x00\x00" + base[34:], "FormatError", "no stanzas")
    bad("mac-flipped", flip(base, mac_at + 5), "IntegrityError", "a byte of the header MAC")
    bad("padding-nonzero", base[:hl - 1] + b"\x01" + base[hl:], "FormatError", "last padding byte nonzero")
    bad("commitment-flipped", flip(base, hl + 30), "IntegrityError", "commitment byte")
    bad("chunk-data-flipped", flip(base, hl + 56 + 100), "IntegrityError", "chunk 0 data")
    bad("chunk-tag-flipped", flip(base, hl + 56 + 16399), "IntegrityError", "chunk 0 tag")
    bad("truncated-boundary", base[: hl + 56 + 2 * 16400], "FormatError", "ends after two full chunks: final chunk missing")
    bad("truncated-mid-chunk", base[:-10], "IntegrityError", "final chunk cut short")
    bad("trailing-garbage", base + b"\x00" * 7, "IntegrityError", "7 bytes after the final chunk")
    bad("chunks-swapped", base[: hl + 56] + base[hl + 56 + 16400: hl + 56 + 32800] + base[hl + 56: hl + 56 + 16400] + base[hl + 56 + 32800:], "IntegrityError", "chunks 0 and 1 swapped")
    other = bytes.fromhex(next(c for c in cases if c["name"] == "key-16385")["file"])
    ohl = struct.unpack(">I", other[28:32])[0]
    bad("payload-under-other-header", other[:ohl] + base[hl:], "IntegrityError", "payload of key-40000 under key-16385's header: commitment fails")
    bad("not-encfs", b"PAR1" + bytes(200), "FormatError", "a plaintext file")
    bad("header-beyond-file", base[:28] + struct.pack(">I", len(base) + 512) + base[32:], "FormatError", "H larger than the file")
    xbase = bytes.fromhex(next(c for c in cases if c["name"] == "x25519-1")["file"])

    def restanza(raw: bytes, change) -> bytes:
        h = parse(raw)
        stanzas = [change(st) for st in h.stanzas]
        body = struct.pack(">H", len(stanzas)) + b"".join(st.encode() for st in stanzas)
        head = raw[:32] + body + h.mac
        return head + bytes(h.length - len(head)) + raw[h.length:]

    bad("unknown-stanza-type", restanza(base, lambda st: Stanza("zzz", st.key_id, st.params, st.body)), "FormatError", "recipient type 'zzz' is unknown")
    bad("stanza-body-59", restanza(base, lambda st: Stanza(st.type, st.key_id, st.params, st.body[:59])), "FormatError", "wrapped key body must be 60 bytes")
    bad("x25519-low-order-share", restanza(xbase, lambda st: Stanza(st.type, st.key_id, bytes(32), st.body)), "FormatError", "ephemeral share 0: all-zero shared secret")
    bad("x25519-params-31", restanza(xbase, lambda st: Stanza(st.type, st.key_id, st.params[:31], st.body)), "FormatError", "x25519 params must be 32 bytes")
    for c in cases[-4:]:
        if c["name"].startswith("x25519"):
            c["recipient"] = "x25519"
    out = {
        "format": "encfs v1 (docs/FORMAT.md)",
        "keys": {"key": key_file_text(sym), "x25519": key_file_text(ident), "passphrase": PASSPHRASE},
        "cases": cases,
    }
    Path(__file__).with_name("encfs_v1.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {len(cases)} cases")


if __name__ == "__main__":
    main()
