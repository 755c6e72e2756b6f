"""The ``encfs`` command: keygen, pubkey, encrypt, decrypt, inspect, rewrap, doctor."""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import sys
from typing import Any, Sequence

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from . import __version__
from . import cobblestone as cs
from . import format as fmt
from .backend import get_backend
from .errors import EncfsError
from .filesystem import EncFileSystem, copy_stream
from .keys import KeyRing, SymmetricKey, X25519Identity, key_file_text, load_reference, public_reference
from .rewrap import rewrap
from .sink import LocalSink, fill_atomically, open_sink


def _keyring(args: argparse.Namespace) -> KeyRing:
    return KeyRing(args.key or None, getattr(args, "recipient", None) or None, getattr(args, "identity", None) or None)


def _progress(total: int | None, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=None if enabled else True, leave=False)


def _pairs(src_fs: Any, src: str, dst: str) -> list[tuple[str, str]]:
    if src_fs.isdir(src):
        base = src.rstrip("/")
        return [(f, posixpath.join(dst, posixpath.relpath(f, base))) for f in sorted(src_fs.find(base))]
    return [(src, dst)]


def cmd_keygen(args: argparse.Namespace) -> int:
    key = X25519Identity.generate() if args.x25519 else SymmetricKey.generate()
    text = key_file_text(key)
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        try:
            sink = LocalSink(args.output, exclusive=not args.force, mode=0o600)
            fill_atomically(sink, lambda s: s.write(text.encode()))
        except FileExistsError:
            raise EncfsError(f"{args.output} exists; use --force to overwrite a key file") from None
        print(f"wrote {'X25519 identity' if args.x25519 else 'symmetric key'} to {args.output}", file=sys.stderr)
        print(f"reference: keyfile:{os.path.abspath(args.output)}", file=sys.stderr)
    if args.x25519:
        print(f"public key: {public_reference(key.recipient.public)}", file=sys.stderr)
    key.wipe()
    return 0


def cmd_pubkey(args: argparse.Namespace) -> int:
    key = load_reference(args.identity if ":" in args.identity else f"keyfile:{args.identity}")
    if not isinstance(key, X25519Identity):
        raise EncfsError("not an X25519 identity (symmetric keys have no public half)")
    print(public_reference(key.recipient.public))
    key.wipe()
    return 0


def cmd_encrypt(args: argparse.Namespace) -> int:
    dst_fs, dst = url_to_fs(args.dst)
    enc = EncFileSystem(fs=dst_fs, key=args.key or None, recipients=args.recipient or None)
    if args.src == "-":
        with enc.open(dst, "wb") as w, _progress(None, "encrypt", args.progress) as bar:
            copy_stream(sys.stdin.buffer, w, bar.update)
        return 0
    src_fs, src = url_to_fs(args.src)
    pairs = _pairs(src_fs, src, dst)
    total = sum(src_fs.size(s) for s, _ in pairs)
    with _progress(total, "encrypt", args.progress) as bar:
        for s, d in pairs:
            with src_fs.open(s, "rb") as r, enc.open(d, "wb") as w:
                copy_stream(r, w, bar.update)
    print(f"encrypted {len(pairs)} file(s), {total} bytes", file=sys.stderr)
    return 0


def cmd_decrypt(args: argparse.Namespace) -> int:
    src_fs, src = url_to_fs(args.src)
    enc = EncFileSystem(fs=src_fs, key=args.key or None, identities=args.identity or None, allow_plaintext=args.allow_plaintext)
    if args.dst == "-":
        with enc.open(src, "rb") as r, _progress(r.size, "decrypt", args.progress) as bar:
            copy_stream(r, sys.stdout.buffer, bar.update)
        return 0
    dst_fs, dst = url_to_fs(args.dst)
    pairs = _pairs(enc, src, dst)
    total = sum(enc.size(s) for s, _ in pairs)
    with _progress(total, "decrypt", args.progress) as bar:
        for s, d in pairs:
            if isinstance(dst_fs, LocalFileSystem):
                enc.get_file(s, d)
                bar.update(enc.size(s))
                continue
            with enc.open(s, "rb") as r:
                fill_atomically(open_sink(dst_fs, d), lambda sink: copy_stream(r, sink, bar.update))
    print(f"decrypted {len(pairs)} file(s), {total} bytes", file=sys.stderr)
    return 0


def inspect_file(path: str, keyring: KeyRing | None) -> dict:
    fs, p = url_to_fs(path)
    size = fs.size(p)
    with fs.open(p, "rb") as f:
        head = f.read(min(size, 4096))
        length = fmt.parse_prefix(head)
        if len(head) < length + cs.PREFIX_SIZE:
            head += f.read(length + cs.PREFIX_SIZE - len(head))
    header = fmt.parse(head)
    pt = fmt.plaintext_size(size, length)
    info: dict[str, Any] = {
        "path": path,
        "format_version": header.version,
        "suite": fmt.SUITES[header.suite],
        "file_id": header.file_id.hex(),
        "header_length": length,
        "header_free": length - len(header.signed) - fmt.MAC_SIZE,
        "ciphertext_size": size,
        "plaintext_size": pt,
        "chunks": cs.chunk_count(pt),
        "recipients": [{"type": s.type, "key_id": s.key_id.hex() or None} for s in header.stanzas],
    }
    if keyring is not None and (keyring.identities() if keyring else []):
        file_key = keyring.unwrap(header)
        try:
            fmt.verify(header, file_key)
            keys = cs.derive(file_key.view(), head[length : length + cs.SALT_SIZE], header.context)
        finally:
            file_key.wipe()
        try:
            cs.check_commitment(keys, head[length + cs.SALT_SIZE : length + cs.PREFIX_SIZE])
        finally:
            keys.wipe()
        info["verified"] = "header MAC and key commitment OK (chunks not read)"
    return info


def cmd_inspect(args: argparse.Namespace) -> int:
    keyring = _keyring(args) if (args.key or args.identity) else None
    for path in args.paths:
        info = inspect_file(path, keyring)
        if args.json:
            print(json.dumps(info))
            continue
        for k, v in info.items():
            if k == "recipients":
                for r in v:
                    print(f"  recipient: {r['type']}" + (f" {r['key_id']}" if r["key_id"] else ""))
            else:
                print(f"{k:>16}: {v}")
    return 0


def cmd_rewrap(args: argparse.Namespace) -> int:
    keyring = KeyRing(args.key or None, identities=args.identity or None)
    add = [load_reference(r) for r in args.add]
    for path in args.paths:
        fs, p = url_to_fs(path)
        res = rewrap(fs, p, keyring, add=add, remove=args.remove, in_place=not args.no_in_place)
        how = "in place" if res.in_place else "by rewriting the header into a new file"
        print(f"{path}: +{res.added} -{res.removed} ({how}); now {res.header.labels()}", file=sys.stderr)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    backend = get_backend()
    out: dict[str, Any] = {"encfs": __version__, "backend": getattr(backend, "describe", lambda: backend.name)()}
    try:
        from ._native_backend import native_status

        out["native"] = native_status()
    except ImportError as e:
        out["native"] = {"built": False, "why": str(e)}
    try:
        from . import securemem

        out["mlock_fallbacks"] = securemem.mlock_fallbacks()
    except (ImportError, AttributeError):
        pass
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        out["rlimit_memlock"] = "unlimited" if soft == resource.RLIM_INFINITY else soft
    except (ImportError, ValueError):
        pass
    out["fsspec"] = fsspec.__version__
    if args.json:
        print(json.dumps(out, default=str))
    else:
        for k, v in out.items():
            print(f"{k:>16}: {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="encfs", description="Encrypted files for ML data (Cobblestone-256 / AES-256-GCM).")
    p.add_argument("--version", action="version", version=f"encfs {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    def keys(sp: argparse.ArgumentParser, recipient: bool = False, identity: bool = False) -> None:
        sp.add_argument("-k", "--key", action="append", default=[], help="key reference for both directions (repeatable; default $ENCFS_KEY)")
        if recipient:
            sp.add_argument("-r", "--recipient", action="append", default=[], help="encrypt to this reference (repeatable)")
        if identity:
            sp.add_argument("-i", "--identity", action="append", default=[], help="decrypt with this reference (repeatable)")

    sp = sub.add_parser("keygen", help="create a symmetric key or an X25519 identity")
    sp.add_argument("-o", "--output", help="key file to create (mode 0600); default stdout")
    sp.add_argument("--x25519", action="store_true", help="make an X25519 identity; its public key goes to stderr")
    sp.add_argument("--force", action="store_true", help="overwrite an existing key file")
    sp.set_defaults(func=cmd_keygen)

    sp = sub.add_parser("pubkey", help="print the x25519: public reference of an identity file")
    sp.add_argument("identity", help="identity file path or reference")
    sp.set_defaults(func=cmd_pubkey)

    for name, func, help_ in (("encrypt", cmd_encrypt, "encrypt a file or directory tree"), ("decrypt", cmd_decrypt, "decrypt a file or directory tree")):
        sp = sub.add_parser(name, help=help_)
        keys(sp, recipient=name == "encrypt", identity=name == "decrypt")
        sp.add_argument("src", help="path or fsspec URL ('-' for stdin)" if name == "encrypt" else "path or fsspec URL of ciphertext")
        sp.add_argument("dst", help="path or fsspec URL of ciphertext" if name == "encrypt" else "path or fsspec URL ('-' for stdout)")
        sp.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
        if name == "decrypt":
            sp.add_argument("--allow-plaintext", action="store_true", help="pass through files that are not encfs files")
        sp.set_defaults(func=func)

    sp = sub.add_parser("inspect", help="show header, recipients and sizes (no secrets)")
    keys(sp, identity=True)
    sp.add_argument("paths", nargs="+")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_inspect)

    sp = sub.add_parser("rewrap", help="add/remove recipients without re-encrypting data")
    keys(sp, identity=True)
    sp.add_argument("--add", action="append", default=[], help="reference of a recipient to add (repeatable)")
    sp.add_argument("--remove", action="append", default=[], help="stanza to remove: 'type:keyid' or key id hex (repeatable)")
    sp.add_argument("--no-in-place", action="store_true", help="always rewrite to a new file and rename")
    sp.add_argument("paths", nargs="+")
    sp.set_defaults(func=cmd_rewrap)

    sp = sub.add_parser("doctor", help="which cipher backend is active; whether memory locking works")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_doctor)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (EncfsError, OSError) as e:
        print(f"encfs: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("encfs: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
