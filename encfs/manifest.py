"""Signed dataset manifests: which files a dataset holds, and which ciphertext each must be.

Each encfs file authenticates itself, but storage can still swap two whole files written
under the same key, put back an older ciphertext of a file, delete a shard or add one. A
manifest closes that gap (docs/MANIFESTS.md): for every file of a prefix it records the path
(relative to the prefix), the file id, the payload's key commitment, the plaintext size and
the SHA-256 of the plaintext, plus a dataset ``version`` (which only grows) and the creation
time, signed with Ed25519 (``encfs.signing``).

File layout (UTF-8, three lines)::

    encfs-manifest-v1
    <body: canonical JSON, one line>
    {"signatures":[{"signer":"ed25519:<base64url>","sig":"<base64url>"}]}

The signature covers ``SIGNED_CONTEXT || body`` byte for byte, and is checked *before* the
body is parsed. The body is written canonically (sorted keys, no spaces, ASCII, entries
sorted by path), each entry ``[path, size, file_id_hex, commitment_hex, sha256_hex]``.
The manifest is stored at ``PREFIX/.encfs-manifest``, encrypted through the same
``EncFileSystem`` as the data, or in the clear (``plain=True``: it reveals names and sizes).

Checking a file at open costs nothing extra: the reader has already authenticated the
header and checked the payload's key commitment; the file id and that commitment are compared
with the entry (``check_reader``). Equal commitments mean the same file key, salt and file id,
and every chunk is authenticated under the key derived with that commitment, so a file that
passes at open can only differ from the recorded one if someone holding the file key forged
new chunks under it; the plaintext digest (checked by ``verify_prefix``, and by sequential
readers as they read, ``DigestingReader``) catches that too.

CLI: ``encfs manifest keygen|create|verify|pubkey`` (``add_subcommand``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import json
import posixpath
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, NamedTuple, Sequence

from .errors import EncfsError
from .keys.sources import b64decode, b64encode
from .signing import SigningKey, VerifyKey

FORMAT_LINE = b"encfs-manifest-v1\n"
FORMAT_NAME = "encfs-manifest/v1"
SIGNED_CONTEXT = b"encfs/v1 dataset-manifest\x00"
"""Prefixed to the body before signing: a manifest signature is never valid as anything else."""
MANIFEST_NAME = ".encfs-manifest"
FIELDS = ["path", "size", "file_id", "commitment", "sha256"]
READ_BLOCK = 4 << 20
MAX_SIGNATURES = 16

REASONS = (
    "missing", "added", "swapped", "rolled-back", "resized", "modified", "unreadable",
    "no-manifest", "malformed", "bad-signature", "untrusted-signer", "old-version", "version-not-increasing", "name",
)
"""Every ``ManifestError.reason``."""

_BAD_PATH_MARKS = ("\n/", "//", "/\n", "\n\n", "\\", "\x00", "/./", "/../", "\n./", "\n../", "/.\n", "/..\n", "\n.\n", "\n..\n")
"""In the newline-joined entry paths (with a newline before and after): an absolute path, an
empty component or path, ``.``/``..``, a backslash, NUL."""


def check_rows(rows: list) -> None:
    """Every entry a clean ``[path, size, file_id, commitment, sha256]``: checked column by
    column in C loops (``map``, ``set``, substring scans), which is what keeps 100,000 entries fast."""
    if set(map(type, rows)) - {list} or set(map(len, rows)) - {5}:
        raise ValueError("an entry is not a 5-item list")
    if not rows:
        return
    paths, sizes, fids, coms, shas = zip(*rows)
    if set(map(type, paths)) != {str} or set(map(type, sizes)) != {int} or min(sizes) < 0:
        raise ValueError("an entry has a path that is not a string or a size that is not a non-negative integer")
    for column, width, what in ((fids, 32, "file id"), (coms, 64, "commitment"), (shas, 64, "sha256")):
        if set(map(type, column)) != {str} or set(map(len, column)) != {width}:
            raise ValueError(f"an entry's {what} is not {width} hex digits")
        joined = "".join(column)
        if not joined.isascii() or len(bytes.fromhex(joined)) * 2 != len(joined) or any(c in joined for c in "ABCDEF"):
            raise ValueError(f"an entry's {what} is not lowercase hex")
    joined = "\n" + "\n".join(paths) + "\n"
    bad = next((m for m in _BAD_PATH_MARKS if m in joined), None)
    if bad is not None:
        at = joined.index(bad)
        raise ManifestError(None, "malformed", f"an entry path is not a clean relative path (near {joined[max(0, at - 30) : at + 30]!r})")


class ManifestError(EncfsError):
    """A dataset does not match its signed manifest, or the manifest itself is not acceptable.

    ``path``: the file concerned (a data file, or the manifest); ``reason``: one of ``REASONS``
    (``missing``, ``added``, ``swapped``, ``rolled-back``, ``resized``, ``modified``, ...);
    ``detail``: the explanation. The message is ``PATH: REASON: DETAIL``."""

    def __init__(self, path: str | None, reason: str, detail: str = ""):
        self.path = path
        self.reason = reason
        self.detail = detail
        text = f"{reason}: {detail}" if detail else reason
        super().__init__(f"{path}: {text}" if path else text)

    def __reduce__(self):
        return type(self), (self.path, self.reason, self.detail)


class Entry(NamedTuple):
    """One file of a manifest. ``file_id``, ``commitment`` and ``sha256`` are lowercase hex."""

    path: str
    size: int
    file_id: str
    commitment: str
    sha256: str


# -- building ------------------------------------------------------------------------------------


def commitment_of(reader: Any) -> bytes:
    """The payload key commitment of an opened encfs reader (``ChunkReader`` or
    ``EncryptedReader``): derived from the file key and checked against the stored one when
    the file was opened, so it is authenticated."""
    commitment = getattr(reader, "commitment", None)
    if not isinstance(commitment, bytes):
        raise ManifestError(getattr(reader, "name", getattr(reader, "path", None)), "unreadable", "not an encrypted file (no key commitment)")
    return commitment


def relative(root: str, path: str) -> str:
    """``path`` relative to ``root`` (both target-filesystem paths)."""
    root = root.rstrip("/")
    if root and not path.startswith(root + "/"):
        raise ManifestError(path, "added", f"not below the manifest's prefix {root}")
    return path[len(root) + 1 :] if root else path.lstrip("/")


def _strip(fs: Any, path: str) -> str:
    return fs._strip_protocol(path).rstrip("/")


def list_files(fs: Any, root: str) -> dict[str, dict]:
    """Relative path -> listing entry (plaintext sizes) of every file below ``root``, without
    manifests (``MANIFEST_NAME`` at any depth) and encfs temporaries."""
    found = fs.find(root, detail=True)
    out: dict[str, dict] = {}
    for name, e in found.items():
        if e.get("type", "file") != "file":
            continue
        rel = relative(root, name)
        if posixpath.basename(rel) == MANIFEST_NAME:
            continue
        out[rel] = e
    return out


def describe_file(fs: Any, path: str, rel: str) -> Entry:
    """The manifest entry of encrypted file ``path``: one sequential read (plaintext hashed as
    it is decrypted, into one reused buffer wiped at the end)."""
    from .securemem import cleanse

    buf = bytearray(READ_BLOCK)
    view = memoryview(buf)
    h = hashlib.sha256()
    try:
        with fs.open(path, "rb") as f:
            if not hasattr(f, "header"):
                raise ManifestError(path, "unreadable", "not an encfs file (a manifest covers encrypted files only)")
            file_id, commitment, size = f.header.file_id, commitment_of(f), f.size
            total = 0
            while n := f.readinto(view):
                h.update(view[:n])
                total += n
        if total != size:
            raise ManifestError(path, "unreadable", f"read {total} bytes of {size}")
    finally:
        view.release()
        cleanse(buf)
    return Entry(rel, size, file_id.hex(), commitment.hex(), h.hexdigest())


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- the manifest --------------------------------------------------------------------------------


class Manifest:
    """A dataset manifest. Made by ``build`` (then ``sign``), or by ``parse``/``load``, which
    verify the signature first: a ``Manifest`` from those is trusted as it stands.

    ``root``: the target-filesystem path of the prefix it describes (set by ``load``);
    ``signer``: the ``ed25519:`` reference whose signature was accepted."""

    def __init__(self, entries: Iterable[Entry], version: int, created: str | None = None, name: str = "", root: str | None = None):
        rows = [tuple(e) for e in entries]
        try:
            check_rows([list(r) for r in rows])
        except ValueError as e:
            raise ManifestError(None, "malformed", str(e)) from None
        self._rows: dict[str, Sequence] = {r[0]: r for r in rows}
        """path -> [path, size, file_id, commitment, sha256]: what the body holds (``Entry``s are made on demand)."""
        if len(self._rows) != len(rows):
            raise ManifestError(None, "malformed", "an entry path appears twice")
        self._entries: dict[str, Entry] | None = None
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ManifestError(None, "malformed", f"version must be an integer >= 1, not {version!r}")
        self.version = version
        self.created = created or now_utc()
        self.name = name
        self.root = root
        self.signer: str | None = None
        self.location: str | None = None
        self._by_id: dict[str, str] | None = None

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def entries(self) -> dict[str, Entry]:
        """Relative path -> ``Entry``, for every file (made on first use)."""
        if self._entries is None:
            self._entries = {p: Entry(*r) for p, r in self._rows.items()}
        return self._entries

    def paths(self) -> list[str]:
        return list(self._rows)

    def __repr__(self) -> str:
        return f"<Manifest {self.name!r} v{self.version} {len(self._rows)} files, signer {self.signer}>"

    # serialisation
    def body(self) -> bytes:
        rows = [list(self._rows[p]) for p in sorted(self._rows)]
        doc = {"format": FORMAT_NAME, "version": self.version, "created": self.created, "name": self.name, "fields": FIELDS, "entries": rows}
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")

    def sign(self, keys: SigningKey | Sequence[SigningKey]) -> bytes:
        """The manifest file's bytes, signed by ``keys``."""
        keys = [keys] if isinstance(keys, SigningKey) else list(keys)
        if not keys:
            raise ValueError("at least one signing key")
        body = self.body()
        sigs = [{"signer": k.public, "sig": b64encode(k.sign(SIGNED_CONTEXT + body))} for k in keys]
        tail = json.dumps({"signatures": sigs}, sort_keys=True, separators=(",", ":")).encode("ascii")
        return FORMAT_LINE + body + b"\n" + tail + b"\n"

    @classmethod
    def parse(
        cls, data: bytes, signers: Iterable[str | VerifyKey], *, min_version: int | None = None,
        name: str | None = None, where: str | None = None,
    ) -> "Manifest":
        """Check the signature (by any of ``signers``) over the body, then parse it. Raises
        ``ManifestError`` (``path`` = ``where``) for a malformed file, a bad or untrusted
        signature, a version below ``min_version`` or another ``name``."""
        trusted = {VerifyKey.parse(s) for s in signers}
        if not trusted:
            raise ManifestError(where, "untrusted-signer", "no signer to trust was given")
        if not data.startswith(FORMAT_LINE):
            raise ManifestError(where, "malformed", "not an encfs manifest (bad first line)")
        parts = data[len(FORMAT_LINE) :].split(b"\n")
        if len(parts) != 3 or parts[2] != b"":
            raise ManifestError(where, "malformed", "expected a body line and a signature line")
        body, tail = parts[0], parts[1]
        try:
            sigs = json.loads(tail)["signatures"]
            if not isinstance(sigs, list) or not 1 <= len(sigs) <= MAX_SIGNATURES:
                raise ValueError
            offered = [(str(s["signer"]), b64decode(s["sig"])) for s in sigs]
        except (ValueError, KeyError, TypeError):
            raise ManifestError(where, "malformed", "unreadable signature line") from None
        message = SIGNED_CONTEXT + body
        accepted = None
        tried = False
        for ref, sig in offered:
            try:
                key = VerifyKey.parse(ref) if ref.startswith("ed25519:") else None
            except EncfsError:
                key = None
            if key is None or key not in trusted:
                continue
            tried = True
            if len(sig) == 64 and key.verify(sig, message):
                accepted = key
                break
        if accepted is None:
            if tried:
                raise ManifestError(where, "bad-signature", "the signature does not verify: the manifest was modified after signing")
            raise ManifestError(where, "untrusted-signer", "signed by " + ", ".join(r for r, _ in offered) + ", none of the trusted signers")
        m = cls._from_body(body, where)
        m.signer = accepted.reference
        m.location = where
        if min_version is not None and m.version < min_version:
            raise ManifestError(where, "old-version", f"dataset version {m.version} is below the minimum {min_version} (a rolled-back dataset)")
        if name is not None and m.name != name:
            raise ManifestError(where, "name", f"manifest of dataset {m.name!r}, not {name!r}")
        return m

    @classmethod
    def _from_body(cls, body: bytes, where: str | None) -> "Manifest":
        try:
            doc = json.loads(body)
            if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME or doc.get("fields") != FIELDS:
                raise ValueError("unknown format or fields")
            rows = doc["entries"]
            version, created, name = doc["version"], doc["created"], doc["name"]
            if not isinstance(rows, list) or not isinstance(created, str) or not isinstance(name, str):
                raise ValueError("bad field types")
            check_rows(rows)
        except ManifestError as e:
            raise ManifestError(where, e.reason, e.detail) from None
        except (ValueError, KeyError, TypeError) as e:
            raise ManifestError(where, "malformed", f"bad manifest body ({e})") from None
        m = cls((), version, created, name)
        m._rows = dict(zip((r[0] for r in rows), rows))
        if len(m._rows) != len(rows):
            raise ManifestError(where, "malformed", "an entry path appears twice")
        return m

    # checks
    def by_file_id(self) -> dict[str, str]:
        if self._by_id is None:
            self._by_id = {r[2]: p for p, r in self._rows.items()}
        return self._by_id

    def entry(self, rel: str, shown: str | None = None) -> Entry:
        r = self._rows.get(rel)
        if r is None:
            raise ManifestError(shown or rel, "added", f"not in the dataset manifest (version {self.version})")
        return Entry(*r)

    def check_file(self, rel: str, file_id: bytes, commitment: bytes, size: int, shown: str | None = None) -> Entry:
        """Compare an opened file with its entry; ``ManifestError`` naming ``shown`` (or ``rel``)."""
        return check_against(self.entry(rel, shown), file_id, commitment, size, shown or rel, self.by_file_id)

    def check_listing(self, listing: dict[str, int | None]) -> list[ManifestError]:
        """Missing, added and resized files, from relative path -> plaintext size (None: unknown)."""
        problems = [ManifestError(p, "missing", "in the manifest but not in storage") for p in sorted(set(self._rows) - set(listing))]
        problems += [ManifestError(p, "added", "in storage but not in the manifest") for p in sorted(set(listing) - set(self._rows))]
        for p in sorted(set(listing) & set(self._rows)):
            size, want = listing[p], self._rows[p][1]
            if size is not None and size != want:
                problems.append(ManifestError(p, "resized", f"{size} bytes, the manifest says {want}"))
        return problems


def check_against(entry: Entry, file_id: bytes, commitment: bytes, size: int, shown: str, by_file_id: Any = None) -> Entry:
    """``ManifestError`` unless the opened file (``file_id``, authenticated ``commitment``,
    plaintext ``size``) is the one ``entry`` records. ``by_file_id``: a callable giving file id
    -> path of the whole manifest, to tell a swap from a rollback (only called on a mismatch)."""
    fid = file_id.hex()
    if fid != entry.file_id:
        other = (by_file_id() if callable(by_file_id) else by_file_id or {}).get(fid)
        if other is not None:
            raise ManifestError(shown, "swapped", f"holds the ciphertext of {other} (file id {fid}), not its own ({entry.file_id})")
        if size != entry.size:
            raise ManifestError(shown, "resized", f"{size} bytes, the manifest says {entry.size} (and file id {fid}, not {entry.file_id})")
        raise ManifestError(
            shown, "rolled-back",
            f"file id {fid} is not the manifest's {entry.file_id}: an older version put back, or another file written in its place",
        )
    if not hmac.compare_digest(commitment.hex(), entry.commitment):
        raise ManifestError(shown, "modified", "same file id but another payload key commitment: the payload was rewritten by a key holder")
    if size != entry.size:
        raise ManifestError(shown, "resized", f"{size} bytes, the manifest says {entry.size}")
    return entry


def check_reader(entry: Entry, reader: Any, shown: str, by_file_id: Any = None) -> Entry:
    """``check_against`` for an opened ``ChunkReader`` or ``EncryptedReader`` (header and
    commitment already authenticated by the open)."""
    header = getattr(reader, "header", None)
    if header is None:
        raise ManifestError(shown, "unreadable", "not an encfs file, but the manifest covers it (plaintext put in its place?)")
    return check_against(entry, header.file_id, commitment_of(reader), reader.size, shown, by_file_id)


class DigestingReader:
    """A file object over an opened ``EncryptedReader`` that hashes the plaintext as it is
    read, from the start, in order; ``finish()`` reads what is left and raises
    ``ManifestError`` (``modified``) unless the SHA-256 is the entry's. A seek (or a read that
    is not sequential) turns the check off: ``finish()`` then only reports it was skipped."""

    def __init__(self, raw: Any, entry: Entry, shown: str):
        self.raw, self.entry, self.shown = raw, entry, shown
        self._h: Any = hashlib.sha256()
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        if self._h is not None:
            self._h.update(data)
            self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        pos = self.raw.seek(offset, whence)
        if pos != self._pos:
            self._h = None
        return pos

    def finish(self) -> bool:
        """Read to the end and check the digest; True if it was checked."""
        if self._h is None:
            return False
        while self.read(READ_BLOCK):
            pass
        if self._pos != self.entry.size or not hmac.compare_digest(self._h.hexdigest(), self.entry.sha256):
            raise ManifestError(self.shown, "modified", "the plaintext's SHA-256 is not the manifest's")
        return True

    def close(self) -> None:
        self.raw.close()

    def __enter__(self) -> "DigestingReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


# -- storage -------------------------------------------------------------------------------------


def manifest_path(root: str) -> str:
    return f"{root.rstrip('/')}/{MANIFEST_NAME}"


def read_bytes(enc: Any, root: str) -> bytes:
    """The manifest of prefix ``root`` (a target path), decrypted if it is encrypted. The
    filesystem's writer-signature check (``signers=``) is not applied to it: a manifest is
    signed on its own, by the keys ``load`` is given, and those are checked before its body
    is parsed."""
    from . import format as fmt

    path = manifest_path(root)
    try:
        first = enc.fs.cat_file(path, start=0, end=len(fmt.MAGIC))
        return decrypt_self_signed(enc, path) if first == fmt.MAGIC else enc.fs.cat_file(path)
    except FileNotFoundError:
        raise ManifestError(path, "no-manifest", "no manifest here (make one with 'encfs manifest create')") from None
    except EncfsError as e:
        raise ManifestError(path, "unreadable", f"{type(e).__name__}: {e}") from None


def decrypt_self_signed(enc: Any, path: str) -> bytes:
    """The plaintext of encrypted file ``path`` without ``enc``'s writer-signature check
    (``signers=``): for files that carry a signature of their own, checked by their reader (a
    manifest, a model version log)."""
    from .file import EncryptedReader
    from .reader import ChunkReader

    raw = enc.fs.open(path, "rb")
    try:
        reader = ChunkReader(raw, raw.seek(0, 2), enc.keyring.without_signers(), name=path)
    except BaseException:
        raw.close()
        raise
    with EncryptedReader(enc, path, reader) as f:
        return bytes(f.read())


def store(enc: Any, path: str, data: bytes, plain: bool = False) -> None:
    """Write ``data`` to ``path`` atomically: encrypted through ``enc``, or in the clear."""
    from .sink import fill_atomically, open_sink

    if plain:
        fill_atomically(open_sink(enc.fs, path, durable=getattr(enc, "durable", True)), lambda s: s.write(data))
    else:
        with enc.open(path, "wb") as f:
            f.write(data)
    enc.invalidate_cache(path)


def write_bytes(enc: Any, root: str, data: bytes, plain: bool = False) -> str:
    """Store manifest ``data`` at ``root``: encrypted through ``enc``, or in the clear; atomically."""
    path = manifest_path(root)
    store(enc, path, data, plain)
    return path


def load(enc: Any, root: str, signers: Iterable[str | VerifyKey], *, min_version: int | None = None, name: str | None = None) -> Manifest:
    """The verified manifest of prefix ``root`` on ``enc`` (an ``EncFileSystem``)."""
    root = _strip(enc, root)
    m = Manifest.parse(read_bytes(enc, root), signers, min_version=min_version, name=name, where=manifest_path(root))
    m.root = root
    return m


def previous_version(enc: Any, root: str) -> int | None:
    """The version of the manifest stored at ``root`` now (not verified: a writer's guard), or None."""
    try:
        data = read_bytes(enc, root)
    except ManifestError as e:
        if e.reason == "no-manifest":
            return None
        raise
    try:
        body = data[len(FORMAT_LINE) :].split(b"\n", 1)[0]
        v = json.loads(body)["version"]
        return v if isinstance(v, int) else None
    except (ValueError, KeyError, TypeError):
        return None


def build(enc: Any, root: str, version: int, name: str | None = None, jobs: int = 4) -> Manifest:
    """The manifest of every file below ``root`` (one sequential read of each, ``jobs`` at once)."""
    root = _strip(enc, root)
    files = list_files(enc, root)
    todo = sorted(files)
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        entries = list(pool.map(lambda rel: describe_file(enc, f"{root}/{rel}", rel), todo))
    m = Manifest(entries, version, name=posixpath.basename(root) if name is None else name)
    m.root = root
    return m


def create(
    enc: Any, root: str, signing_keys: SigningKey | Sequence[SigningKey], *, version: int | None = None,
    name: str | None = None, plain: bool = False, jobs: int = 4,
) -> Manifest:
    """Build, sign and store the manifest of ``root``. ``version`` must be above the stored
    manifest's (default: one more than it, or 1)."""
    root = _strip(enc, root)
    before = previous_version(enc, root)
    if version is None:
        version = (before or 0) + 1
    elif before is not None and version <= before:
        raise ManifestError(manifest_path(root), "version-not-increasing", f"version {version} is not above the stored manifest's {before}")
    m = build(enc, root, version, name, jobs)
    m.location = write_bytes(enc, root, m.sign(signing_keys), plain)
    keys = [signing_keys] if isinstance(signing_keys, SigningKey) else list(signing_keys)
    m.signer = keys[0].public
    return m


def verify_prefix(enc: Any, manifest: Manifest, root: str | None = None, *, digests: bool = True, jobs: int = 4) -> list[ManifestError]:
    """Every way the files below ``root`` (default ``manifest.root``) differ from ``manifest``:
    missing, added, resized (from the listing), then each file opened (file id, commitment)
    and, with ``digests``, read whole and hashed. Returns the problems (empty: the dataset matches)."""
    root = _strip(enc, root if root is not None else manifest.root or "")
    files = list_files(enc, root)
    listing = {rel: (e["size"] if e.get("encrypted") is True else None) for rel, e in files.items()}
    problems = [p for p in manifest.check_listing(listing) if p.reason != "resized"]
    todo = [rel for rel in sorted(manifest.entries) if rel in files]

    def one(rel: str) -> ManifestError | None:
        path, entry = f"{root}/{rel}", manifest.entries[rel]
        try:
            if files[rel].get("encrypted") is not True:
                raise ManifestError(rel, "unreadable", f"not a readable encfs file ({files[rel].get('encrypted')})")
            if not digests:
                r = enc.open_reader(path)
                try:
                    check_reader(entry, r, rel, manifest.by_file_id)
                finally:
                    r.close()
                return None
            got = describe_file(enc, path, rel)  # one read: file id and commitment at open, digest at the end
            check_against(entry, bytes.fromhex(got.file_id), bytes.fromhex(got.commitment), got.size, rel, manifest.by_file_id)
            if not hmac.compare_digest(got.sha256, entry.sha256):
                return ManifestError(rel, "modified", "the plaintext's SHA-256 is not the manifest's")
        except ManifestError as err:
            return ManifestError(rel, err.reason, err.detail)
        except (EncfsError, OSError) as err:
            if listing[rel] is not None and listing[rel] != entry.size:
                return ManifestError(rel, "resized", f"{listing[rel]} bytes, the manifest says {entry.size} ({type(err).__name__}: {err})")
            return ManifestError(rel, "unreadable", f"{type(err).__name__}: {err}")
        return None

    manifest.by_file_id()  # built once, before the threads
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        problems += [p for p in pool.map(one, todo) if p is not None]
    return problems


# -- loaders ---------------------------------------------------------------------------------------


class ShardCheck:
    """What a ``ShardSet`` keeps of a manifest: the entry of each of its files (index-aligned
    with its paths) and the file id -> path map of the whole manifest (to name a swap). It
    pickles with the set, so worker processes check their own opens without the signature."""

    def __init__(self, entries: list[Entry], by_file_id: dict[str, str], version: int, signer: str | None):
        self.entries, self.ids, self.version, self.signer = entries, by_file_id, version, signer

    def check(self, k: int, reader: Any, shown: str) -> Entry:
        return check_reader(self.entries[k], reader, shown, self.ids)

    def __repr__(self) -> str:
        return f"<ShardCheck {len(self.entries)} files, manifest v{self.version}, signer {self.signer}>"


def _find_root(fs: Any, paths: Sequence[str]) -> str:
    """The nearest prefix above the dataset's files that holds a manifest."""
    start = posixpath.commonpath([posixpath.dirname(p) or "/" for p in paths]) if paths else ""
    here = start
    while True:
        if fs.fs.exists(manifest_path(here)):
            return here
        up = posixpath.dirname(here.rstrip("/"))
        if not here or up == here or not up:
            raise ManifestError(manifest_path(start), "no-manifest", "no manifest in this directory or above; pass manifest={'prefix': ...}")
        here = up


def for_shards(spec: Any, fs: Any, paths: Sequence[str], globs: Sequence[str] = ()) -> ShardCheck:
    """Resolve a loader's ``manifest=`` for the files ``paths`` (target paths on ``fs``, an
    ``EncFileSystem``) matched from ``globs``: every file must be in the manifest, and every
    manifest file a glob matches must be among them. ``spec``: a verified ``Manifest`` (from
    ``load``), or a dict ``{"signers": [...], "min_version": N, "prefix": URL_OR_PATH, "name": ...}``
    (``prefix`` default: the nearest directory above the files that holds a manifest)."""
    if not hasattr(fs, "open_reader"):
        raise ManifestError(paths[0] if paths else None, "unreadable", "manifest= checks encrypted datasets (encfs:: URLs) only")
    if isinstance(spec, Manifest):
        if spec.root is None or spec.signer is None:
            raise ValueError("a Manifest given to a loader must come from encfs.manifest.load (verified, with its prefix)")
        m = spec
    elif isinstance(spec, dict):
        unknown = set(spec) - {"signers", "min_version", "prefix", "name"}
        if unknown:
            raise ValueError(f"unknown manifest= option(s) {sorted(unknown)}; valid: signers, min_version, prefix, name")
        signers = spec.get("signers")
        if isinstance(signers, str):
            signers = [signers]
        if not signers:
            raise ValueError("manifest= needs 'signers': the ed25519: public keys to trust")
        root = _strip(fs, spec["prefix"]) if spec.get("prefix") else _find_root(fs, paths)
        m = load(fs, root, signers, min_version=spec.get("min_version"), name=spec.get("name"))
    else:
        raise TypeError(f"manifest= takes a dict or an encfs.manifest.Manifest, not {type(spec).__name__}")
    root = m.root or ""
    entries = []
    for p in paths:
        try:
            rel = relative(root, p)
        except ManifestError:
            raise ManifestError(p, "added", f"not below the manifest's prefix {root}") from None
        entries.append(m.entry(rel, p))
    if globs:
        from fsspec.utils import glob_translate

        have = set(paths)
        for g in globs:
            pattern = re.compile(glob_translate(g))
            for rel in m.paths():
                full = f"{root}/{rel}" if root else rel
                if full not in have and pattern.match(full):
                    raise ManifestError(full, "missing", f"in the manifest (version {m.version}) and matched by {g}, but not in storage")
    return ShardCheck(entries, m.by_file_id(), m.version, m.signer)


# -- command line ----------------------------------------------------------------------------------


def add_subcommand(sub: Any, parents: list | None = None, storage_parents: list | None = None) -> None:
    """``encfs manifest keygen|pubkey|create|verify`` under the CLI's subparsers ``sub``.
    ``parents``: the common options; ``storage_parents``: those plus the storage options
    (``-o KEY=VALUE``, ``--endpoint-url``) for the commands that read a prefix."""
    parents = parents or []
    storage_parents = storage_parents or parents
    sp = sub.add_parser("manifest", parents=parents, help="signed dataset manifests: keygen, create, verify, pubkey")
    msub = sp.add_subparsers(dest="manifest_cmd", required=True)

    kp = msub.add_parser("keygen", parents=parents, help="make an Ed25519 signing key file (0600); print its public key")
    kp.add_argument("-o", "--output", required=True, help="signing key file to create (mode 0600)")
    kp.add_argument("--force", action="store_true", help="overwrite an existing file")
    kp.set_defaults(func=cmd_keygen)

    pp = msub.add_parser("pubkey", parents=parents, help="print the ed25519: public key of a signing key file")
    pp.add_argument("keyfile", metavar="SIGNING_KEY")
    pp.set_defaults(func=cmd_pubkey)

    def data_keys(p: Any) -> None:
        p.add_argument("-k", "--key", action="append", default=[], help="key reference to read the data (repeatable; default $ENCFS_KEY)")
        p.add_argument("-i", "--identity", action="append", default=[], help="decrypt with this reference (repeatable)")
        p.add_argument(
            "--writer-signer", action="append", default=[], metavar="PUBKEY",
            help="refuse data files that no such trusted writer signed (writer signatures, docs/FORMAT.md section 1.5; "
            "repeatable; default $ENCFS_SIGNERS)",
        )

    cp = msub.add_parser("create", parents=storage_parents, help="hash every file of PREFIX and write a signed manifest PREFIX/.encfs-manifest")
    data_keys(cp)
    cp.add_argument("-r", "--recipient", action="append", default=[], help="encrypt the manifest to this reference too (repeatable)")
    cp.add_argument("--sign", required=True, metavar="SIGNING_KEY", help="Ed25519 signing key file ('encfs manifest keygen')")
    cp.add_argument("--version", dest="manifest_version", type=int, default=None, metavar="N", help="dataset version; must be above the stored manifest's (default: that plus one, or 1)")
    cp.add_argument("--name", default=None, help="dataset name recorded in the manifest (default: the prefix's last component)")
    cp.add_argument("--plain", action="store_true", help="store the manifest unencrypted (it reveals file names and sizes)")
    cp.add_argument("-j", "--jobs", type=int, default=4, help="files hashed at once (default 4)")
    cp.add_argument("prefix", metavar="PREFIX", help="directory or object-store prefix (path or fsspec URL)")
    cp.set_defaults(func=cmd_create)

    vp = msub.add_parser("verify", parents=storage_parents, help="check PREFIX against its signed manifest; list every difference, exit 1 if any")
    data_keys(vp)
    vp.add_argument("--signer", action="append", required=True, metavar="PUBKEY", help="trusted signer: ed25519:<base64url> or a file holding it (repeatable)")
    vp.add_argument("--min-version", type=int, default=None, metavar="N", help="refuse a manifest whose dataset version is below N")
    vp.add_argument("--name", default=None, help="require this dataset name")
    vp.add_argument("--no-digests", dest="digests", action="store_false", help="check file ids and commitments only (open each file; no full read)")
    vp.add_argument("-j", "--jobs", type=int, default=4, help="files checked at once (default 4)")
    vp.add_argument("--json", action="store_true", help="one JSON object per problem, then a summary object")
    vp.add_argument("prefix", metavar="PREFIX")
    vp.set_defaults(func=cmd_verify)


def _enc(args: Any) -> tuple[Any, str]:
    from .cli import url_to_fs
    from .filesystem import EncFileSystem

    fs, path = url_to_fs(args.prefix, getattr(args, "storage_options", None))
    keys = list(args.key or [])
    extra = list(getattr(args, "recipient", None) or [])
    enc = EncFileSystem(
        fs=fs, key=keys or None, identities=list(args.identity or []) or None,
        recipients=(keys + extra) if extra else None, signers=list(args.writer_signer or []) or None, skip_instance_cache=True,
    )
    return enc, path


def cmd_keygen(args: Any) -> int:
    from .signing import write_signing_key

    key = SigningKey.generate()
    write_signing_key(args.output, key, force=args.force)
    print(f"wrote Ed25519 signing key to {args.output} (mode 0600); give readers the public key:", file=sys.stderr)
    print(key.public)
    return 0


def cmd_pubkey(args: Any) -> int:
    print(SigningKey.load(args.keyfile).public)
    return 0


def cmd_create(args: Any) -> int:
    key = SigningKey.load(args.sign)
    enc, path = _enc(args)
    m = create(enc, path, key, version=args.manifest_version, name=args.name, plain=args.plain, jobs=args.jobs)
    how = "in the clear" if args.plain else "encrypted"
    print(f"wrote {m.location} ({how}): {len(m)} files, version {m.version}, signed by {m.signer}", file=sys.stderr)
    return 0


def cmd_verify(args: Any) -> int:
    enc, path = _enc(args)
    m = load(enc, path, args.signer, min_version=args.min_version, name=args.name)
    problems = verify_prefix(enc, m, path, digests=args.digests, jobs=args.jobs)
    for p in problems:
        if args.json:
            print(json.dumps({"path": p.path, "reason": p.reason, "detail": p.detail}), flush=True)
        else:
            print(str(p), flush=True)
    ok = not problems
    summary = f"{'ok' if ok else 'FAILED'}: {len(m)} files in the manifest, version {m.version} ({m.created}), signed by {m.signer}; {len(problems)} problem(s)"
    if args.json:
        print(json.dumps({"ok": ok, "files": len(m), "version": m.version, "created": m.created, "signer": m.signer, "problems": len(problems)}))
    print(summary, file=sys.stderr)
    return 0 if ok else 1
