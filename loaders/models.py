"""Encrypted, signed, versioned model checkpoints (docs/MODELS.md).

A model prefix ``PREFIX/`` holds one encfs file per version (``v000001.pt``,
``v000002.safetensors``, or a directory ``v000003/`` written by Hugging Face
``save_pretrained``) and a version log ``PREFIX/.encfs-versions``: an append-only list of
Ed25519-signed entries, each naming its version, the files of that version (path, plaintext
size, file id, key commitment, SHA-256: the rows of ``encfs.manifest``), who signed it, when,
and the SHA-256 of the entry before it (a hash chain). Every file gets its own random file
key, and ``recipients=`` on ``save`` sets who may read that version.

``load`` verifies the whole log against the signers it trusts, picks an entry, checks each
file at open (file id, commitment, size) and its SHA-256 after reading it into memory, and
only then hands the bytes to ``torch.load`` (``weights_only=True`` by default) or the
safetensors parser: a tampered, unsigned, wrongly signed, swapped or rolled-back checkpoint
never reaches a deserialiser. A rollback of the whole log is caught by ``min_version=`` and
by a local ``state=`` file (trust on first use).

Log layout (UTF-8)::

    encfs-model-log-v1
    ed25519:<signer>\\t<signature, base64url>\\t<body: canonical JSON>
    ...

The signature covers ``SIGNED_CONTEXT || body`` and is checked before the body is parsed; the
body must be byte-for-byte the canonical form of what it parses to (sorted keys, no spaces,
ASCII), so no two byte strings mean the same entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import json
import os
import posixpath
import re
import shutil
import tempfile
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

from encfs.errors import EncfsError
from encfs.keys.sources import b64decode, b64encode
from encfs.manifest import FIELDS, Entry, ManifestError, check_reader, check_rows, decrypt_self_signed, now_utc, store
from encfs.signing import SigningKey, VerifyKey

LOG_NAME = ".encfs-versions"
FORMAT_LINE = b"encfs-model-log-v1\n"
ENTRY_FORMAT = "encfs-model-version/v1"
SIGNED_CONTEXT = b"encfs/v1 model-version\x00"
"""Prefixed to each entry body before signing: such a signature is valid for nothing else."""
STATE_FORMAT = "encfs-model-state/v1"
GENESIS = "0" * 64
"""``prev`` of the first entry."""
KINDS = {"torch": ".pt", "safetensors": ".safetensors", "hf": ""}
"""Entry kind -> suffix of its version file (``hf``: a directory)."""
BODY_KEYS = ("created", "fields", "files", "format", "kind", "model", "note", "prev", "signer", "version")
MAX_LOG_BYTES = 64 << 20
READ_BLOCK = 4 << 20
_CREATED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
_HEX64 = re.compile(r"[0-9a-f]{64}")

REASONS = (
    "no-log", "unsigned", "malformed", "bad-signature", "untrusted-signer", "broken-chain",
    "version-not-increasing", "old-version", "rolled-back", "forked", "conflict",
    "kind", "name", "missing", "swapped", "resized", "modified", "unreadable",
)
"""Every ``ModelError.reason``."""


class ModelError(ManifestError):
    """A checkpoint or its version log is not acceptable. ``path``: the file concerned (a
    version file, or the log); ``reason``: one of ``REASONS``; ``detail``: why."""


class VersionEntry(NamedTuple):
    """One signed entry of a model's version log. ``files``: paths relative to the prefix;
    ``digest``: SHA-256 (hex) of the entry's line, which the next entry's ``prev`` holds."""

    model: str
    version: int
    kind: str
    files: tuple[Entry, ...]
    signer: str
    created: str
    prev: str
    note: str
    digest: str


# -- the log ---------------------------------------------------------------------------------------


def canonical(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def entry_body(model: str, version: int, kind: str, files: Sequence[Entry], signer: str, created: str, prev: str, note: str) -> bytes:
    return canonical({
        "created": created, "fields": FIELDS, "files": [list(f) for f in sorted(files)], "format": ENTRY_FORMAT,
        "kind": kind, "model": model, "note": note, "prev": prev, "signer": signer, "version": version,
    })


def sign_line(key: SigningKey, body: bytes) -> bytes:
    """The log line of ``body`` signed by ``key`` (no newline)."""
    return b"\t".join((key.public.encode("ascii"), b64encode(key.sign(SIGNED_CONTEXT + body)).encode("ascii"), body))


def parse_line(line: bytes, trusted: set[VerifyKey], where: str | None, n: int) -> VersionEntry:
    """Entry ``n`` (1-based) of a log: the signature by a key in ``trusted`` checked over the
    body's exact bytes, then the body parsed and required to be canonical."""
    at = f"entry {n}"
    parts = line.split(b"\t")
    if len(parts) == 1:
        raise ModelError(where, "unsigned", f"{at} has no signature")
    if len(parts) != 3:
        raise ModelError(where, "malformed", f"{at} is not 'signer<TAB>signature<TAB>body'")
    ref_raw, sig_raw, body = parts
    try:
        ref = ref_raw.decode("ascii")
        key = VerifyKey.parse(ref) if ref.startswith("ed25519:") else None
    except (UnicodeDecodeError, EncfsError):
        key = None
    if key is None or key.reference != ref:
        raise ModelError(where, "malformed", f"{at}: the signer is not an 'ed25519:' public key")
    if not sig_raw:
        raise ModelError(where, "unsigned", f"{at} has an empty signature")
    if key not in trusted:
        raise ModelError(where, "untrusted-signer", f"{at} is signed by {key.reference}, none of the trusted signers")
    try:
        sig = b64decode(sig_raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):  # b64decode takes only the canonical spelling
        sig = b""
    if len(sig) != 64 or not key.verify(sig, SIGNED_CONTEXT + body):
        raise ModelError(where, "bad-signature", f"{at}: the signature does not verify (the entry was modified after signing)")
    try:
        doc = json.loads(body)
        if not isinstance(doc, dict) or tuple(sorted(doc)) != BODY_KEYS:
            raise ValueError("unexpected fields")
        if doc["format"] != ENTRY_FORMAT or doc["fields"] != FIELDS:
            raise ValueError("unknown format")
        version, files = doc["version"], doc["files"]
        if type(version) is not int or version < 1:
            raise ValueError("version is not an integer >= 1")
        if doc["kind"] not in KINDS or not all(isinstance(doc[k], str) for k in ("model", "note", "created", "prev", "signer")):
            raise ValueError("bad field types")
        if not _CREATED.fullmatch(doc["created"]) or not _HEX64.fullmatch(doc["prev"]):
            raise ValueError("bad created or prev")
        if not isinstance(files, list) or not files:
            raise ValueError("no files")
        check_rows(files)
        if canonical(doc) != body:
            raise ValueError("the body is not in canonical form")
    except ManifestError as e:
        raise ModelError(where, "malformed", f"{at}: {e.detail}") from None
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise ModelError(where, "malformed", f"{at}: bad entry body ({e})") from None
    if doc["signer"] != key.reference:
        raise ModelError(where, "malformed", f"{at}: the body names signer {doc['signer']}, the line {key.reference}")
    paths = [r[0] for r in files]
    if len(set(paths)) != len(paths) or any(posixpath.basename(p) == LOG_NAME for p in paths):
        raise ModelError(where, "malformed", f"{at}: a file path appears twice, or names the log")
    return VersionEntry(
        doc["model"], version, doc["kind"], tuple(Entry(*r) for r in files), doc["signer"], doc["created"],
        doc["prev"], doc["note"], hashlib.sha256(line).hexdigest(),
    )


def parse_log(data: bytes, signers: Iterable[str | VerifyKey], *, where: str | None = None) -> list[VersionEntry]:
    """Every entry of log ``data``, each signed by one of ``signers``, chained to the one
    before, versions strictly increasing, one model name, no file path twice."""
    trusted = {VerifyKey.parse(s) for s in signers}
    if not trusted:
        raise ModelError(where, "untrusted-signer", "no signer to trust was given")
    if not data.startswith(FORMAT_LINE):
        raise ModelError(where, "malformed", "not an encfs model version log (bad first line)")
    rest = data[len(FORMAT_LINE) :]
    if not rest:
        raise ModelError(where, "malformed", "the log has no entries")
    if not rest.endswith(b"\n"):
        raise ModelError(where, "malformed", "truncated: the last entry has no end of line")
    out: list[VersionEntry] = []
    seen: set[str] = set()
    for n, line in enumerate(rest[:-1].split(b"\n"), 1):
        e = parse_line(line, trusted, where, n)
        if e.prev != (out[-1].digest if out else GENESIS):
            raise ModelError(where, "broken-chain", f"entry {n} (version {e.version}) does not follow the entry before it")
        if out and e.version <= out[-1].version:
            raise ModelError(where, "version-not-increasing", f"entry {n}: version {e.version} after {out[-1].version}")
        if out and e.model != out[0].model:
            raise ModelError(where, "malformed", f"entry {n} names model {e.model!r}, the log {out[0].model!r}")
        paths = {f.path for f in e.files}
        if paths & seen:
            raise ModelError(where, "malformed", f"entry {n} reuses a file of an earlier version")
        seen |= paths
        out.append(e)
    return out


# -- storage ---------------------------------------------------------------------------------------


def resolve(url: str, fs: Any = None, storage_options: dict | None = None) -> tuple[Any, str]:
    """The ``EncFileSystem`` and target path of a model prefix: ``url`` is an ``encfs::`` URL,
    or a path on ``fs``."""
    from encfs.filesystem import EncFileSystem

    if fs is None:
        from fsspec.core import url_to_fs

        fs, url = url_to_fs(url, **(storage_options or {}))
    if not isinstance(fs, EncFileSystem):
        raise ModelError(url, "unreadable", "a model prefix is an encfs:: URL (or a path on an EncFileSystem)")
    return fs, fs._strip_protocol(url).rstrip("/")


def log_path(root: str) -> str:
    return f"{root}/{LOG_NAME}"


def _read_log(enc: Any, root: str) -> tuple[bytes | None, bytes | None]:
    """(stored bytes, plaintext) of the log, or (None, None) where there is none. Read whole
    from the target first (the stored bytes are what a writer's compare-and-swap compares)."""
    from encfs import format as fmt

    path = log_path(root)
    try:
        if enc.fs.size(path) > MAX_LOG_BYTES:
            raise ModelError(path, "malformed", f"the log is over {MAX_LOG_BYTES} bytes")
        stored = enc.fs.cat_file(path)
    except FileNotFoundError:
        return None, None
    if not stored.startswith(fmt.MAGIC):
        return stored, stored
    try:
        return stored, decrypt_self_signed(enc, path)
    except FileNotFoundError:
        return None, None
    except EncfsError as e:
        raise ModelError(path, "unreadable", f"{type(e).__name__}: {e}") from None


def versions(
    url: str, signers: Iterable[str | VerifyKey], *, fs: Any = None, storage_options: dict | None = None,
    min_version: int | None = None, state: str | os.PathLike | None = None, name: str | None = None,
) -> list[VersionEntry]:
    """The verified version log of the model at ``url``, oldest first. Refuses (``ModelError``)
    a missing, malformed, unsigned, wrongly signed or broken log, a newest version below
    ``min_version``, one older than ``state`` remembers, and another model ``name``."""
    enc, root = resolve(url, fs, storage_options)
    return _verified(enc, root, signers, min_version=min_version, state=state, name=name)


def _verified(enc: Any, root: str, signers: Any, *, min_version: int | None, state: Any, name: str | None) -> list[VersionEntry]:
    where = log_path(root)
    if isinstance(signers, (str, VerifyKey)):
        signers = [signers]
    _, data = _read_log(enc, root)
    if data is None:
        raise ModelError(where, "no-log", "no signed version log here (nothing was saved with encfs.loaders.save)")
    entries = parse_log(data, signers, where=where)
    head = entries[-1]
    if min_version is not None and head.version < min_version:
        raise ModelError(where, "old-version", f"the newest version is {head.version}, below the minimum {min_version} (a rolled-back log)")
    if name is not None and head.model != name:
        raise ModelError(where, "name", f"the log of model {head.model!r}, not {name!r}")
    if state is not None:
        _check_state(state, enc.fs.unstrip_protocol(root), entries, where)
    return entries


def _pick(entries: list[VersionEntry], version: int | str, min_version: int | None, where: str) -> VersionEntry:
    if version == "latest":
        chosen = entries[-1]
    elif type(version) is int:
        found = [e for e in entries if e.version == version]
        if not found:
            raise ModelError(where, "unsigned", f"version {version} is not in the signed log ({len(entries)} versions, {entries[0].version} to {entries[-1].version})")
        chosen = found[0]
    else:
        raise ValueError(f"version is 'latest' or an int, not {version!r}")
    if min_version is not None and chosen.version < min_version:
        raise ModelError(where, "old-version", f"version {chosen.version} is below the minimum {min_version}")
    return chosen


def _by_file_id(entries: list[VersionEntry]) -> dict[str, str]:
    return {f.file_id: f.path for e in entries for f in e.files}


def _open_checked(enc: Any, root: str, fe: Entry, by_id: dict[str, str]) -> Any:
    """The opened version file, after its file id, commitment and size matched ``fe``."""
    path = f"{root}/{fe.path}"
    try:
        f = enc.open(path, "rb")
    except FileNotFoundError:
        raise ModelError(path, "missing", "in the signed log but not in storage") from None
    except EncfsError as e:
        raise ModelError(path, "unreadable", f"{type(e).__name__}: {e}") from None
    try:
        check_reader(fe, f, path, by_id)
    except ManifestError as e:
        f.close()
        raise ModelError(path, e.reason, e.detail) from None
    except BaseException:
        f.close()
        raise
    return f


def _stream_verified(enc: Any, root: str, fe: Entry, by_id: dict[str, str], write: Callable[[bytes], Any]) -> None:
    """Every block of ``fe``'s plaintext to ``write``, the file checked against ``fe`` at open;
    ``ModelError`` at the end unless its size and SHA-256 are the entry's (the caller keeps
    what it wrote away from any parser until this returns)."""
    path = f"{root}/{fe.path}"
    h, total = hashlib.sha256(), 0
    with _open_checked(enc, root, fe, by_id) as f:
        try:
            while block := f.read(READ_BLOCK):
                h.update(block)
                write(block)
                total += len(block)
        except EncfsError as e:
            raise ModelError(path, "unreadable", f"{type(e).__name__}: {e}") from None
    if total != fe.size or not hmac.compare_digest(h.hexdigest(), fe.sha256):
        raise ModelError(path, "modified", "the plaintext's SHA-256 is not the signed log's (forged by a holder of the file key?)")


def read_verified(enc: Any, root: str, fe: Entry, by_id: dict[str, str]) -> bytes:
    """The whole plaintext of ``fe``, returned only once it matched the entry at open and by SHA-256."""
    parts: list[bytes] = []
    _stream_verified(enc, root, fe, by_id, parts.append)
    return b"".join(parts)


# -- trust on first use ------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked_state(path: str | os.PathLike) -> Iterator[dict]:
    """The state file's models (read under an exclusive lock); written back atomically, 0600."""
    import fcntl

    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            with open(path, "rb") as f:
                doc = json.loads(f.read())
            if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT or not isinstance(doc.get("models"), dict):
                raise ValueError
        except FileNotFoundError:
            doc = {"format": STATE_FORMAT, "models": {}}
        except ValueError:
            raise ModelError(path, "malformed", "not an encfs model state file") from None
        before = json.dumps(doc, sort_keys=True)
        yield doc["models"]
        if json.dumps(doc, sort_keys=True) != before:
            text = json.dumps(doc, sort_keys=True, indent=1)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
                f.write(text + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        os.close(fd)


def _check_state(state: Any, model: str, entries: list[VersionEntry], where: str) -> None:
    """Refuse a log older than, or diverging from, what this host saw last; then remember its head."""
    head = entries[-1]
    with _locked_state(state) as models:
        seen = models.get(model)
        if isinstance(seen, dict) and type(seen.get("version")) is int:
            if head.version < seen["version"]:
                raise ModelError(where, "rolled-back", f"the newest version is {head.version}; this host has seen version {seen['version']}")
            same = [e for e in entries if e.version == seen["version"]]
            if not same or same[0].digest != seen.get("entry"):
                raise ModelError(where, "forked", f"version {seen['version']} is not the entry this host saw: the log's history was rewritten")
            if head.version == seen["version"]:
                return
        models[model] = {"version": head.version, "entry": head.digest}


# -- writing ---------------------------------------------------------------------------------------


def _signing_key(sign: Any) -> SigningKey:
    if isinstance(sign, SigningKey):
        return sign
    if isinstance(sign, (str, os.PathLike)):
        return SigningKey.load(os.fspath(sign))
    raise TypeError("sign= takes an encfs.signing.SigningKey or the path of a signing key file")


def _writer_fs(enc: Any, recipients: Any) -> Any:
    """``enc`` itself, or an ``EncFileSystem`` over the same target writing to ``recipients``
    (and signing as ``enc`` does, where it was given ``sign_with``)."""
    if recipients is None:
        return enc
    from encfs.filesystem import EncFileSystem

    signing = getattr(enc.keyring, "signing_key", None)
    return EncFileSystem(
        fs=enc.fs, recipients=recipients, identities=[], backend=enc.backend_name, header_length=enc.header_length,
        durable=enc.durable, sign_with=signing() if signing else None, skip_instance_cache=True,
    )


def _written_commitment(f: Any) -> bytes:
    """The key commitment an ``EncryptedWriter`` stores (it derived it, so it needs no read-back:
    an encrypt-only host can log its own files)."""
    return bytes(f.commitment)


def _write_file(wenc: Any, path: str, rel: str, chunks: Iterable[bytes]) -> Entry:
    """Encrypt ``chunks`` to the new file ``path`` (refused if it exists) and return its entry."""
    h, total = hashlib.sha256(), 0
    try:
        f = wenc.open(path, "xb")
    except FileExistsError:
        raise ModelError(path, "conflict", "exists but is not in the log: a concurrent save, or a crashed one (remove it, or save another version)") from None
    with f:
        file_id, commitment = f.header.file_id, _written_commitment(f)
        for block in chunks:
            f.write(block)
            h.update(block)
            total += len(block)
    return Entry(rel, total, file_id.hex(), commitment.hex(), h.hexdigest())


def _publish(
    enc: Any, root: str, key: SigningKey, kind: str, files: Sequence[tuple[str, Any]], *, signers: Any,
    recipients: Any, version: int | None, note: str, plain_log: bool, name: str | None,
) -> VersionEntry:
    """Write ``files`` (name within the version, callable giving its chunks) as the next version
    and append its signed entry to the log, refusing if the log changed meanwhile."""
    where = log_path(root)
    trusted = [key.verify_key, *([signers] if isinstance(signers, (str, VerifyKey)) else (signers or []))]
    stored, data = _read_log(enc, root)
    entries = parse_log(data, trusted, where=where) if data is not None else []
    model = entries[0].model if entries else (name if name is not None else posixpath.basename(root))
    if name is not None and name != model:
        raise ModelError(where, "name", f"the log of model {model!r}, not {name!r}")
    last = entries[-1].version if entries else 0
    if version is None:
        version = last + 1
    elif type(version) is not int or version <= last:
        raise ModelError(where, "version-not-increasing", f"version {version!r} is not above the log's newest, {last}")
    base = f"v{version:06d}{KINDS[kind]}"
    wenc = _writer_fs(enc, recipients)
    written: list[str] = []
    try:
        rows = []
        for sub, chunks in files:
            rel = f"{base}/{sub}" if kind == "hf" else base
            path = f"{root}/{rel}"
            rows.append(_write_file(wenc, path, rel, chunks()))
            written.append(path)
            enc.invalidate_cache(path)
        body = entry_body(model, version, kind, rows, key.public, now_utc(), entries[-1].digest if entries else GENESIS, note)
        line = sign_line(key, body)
        entry = parse_line(line, {key.verify_key}, where, len(entries) + 1)  # what readers will check, before it is stored
        now, _ = _read_log(enc, root)
        if now != stored:
            raise ModelError(where, "conflict", "the log changed while this version was written (a concurrent save); nothing was logged")
        store(enc, log_path(root), (data if data is not None else FORMAT_LINE) + line + b"\n", plain_log)
    except BaseException:
        for p in written:
            with contextlib.suppress(Exception):
                enc.fs.rm_file(p)
        raise
    return entry


def save(
    obj: Any, url: str, *, sign: Any, fs: Any = None, storage_options: dict | None = None, format: str | None = None,
    recipients: Any = None, version: int | None = None, note: str = "", signers: Any = None, plain_log: bool = False,
    name: str | None = None,
) -> VersionEntry:
    """Save ``obj`` as the next version of the model at ``url`` (an ``encfs::`` prefix), signed by
    ``sign`` (a ``SigningKey`` or its file). ``format``: ``"torch"`` (default, ``torch.save``) or
    ``"safetensors"`` (a dict of tensors). ``recipients``: who may read this version (default:
    the filesystem's). ``version``: above the log's newest (default: next). ``signers``: other
    keys trusted to have signed the existing log. ``plain_log``: store the log unencrypted."""
    kind = format or "torch"
    if kind == "torch":
        import torch

        buf = io.BytesIO()
        torch.save(obj, buf)
        payload = buf.getvalue()
    elif kind == "safetensors":
        from safetensors.torch import save as st_save

        payload = st_save(obj)
    else:
        raise ValueError(f"format is 'torch' or 'safetensors', not {format!r}")
    enc, root = resolve(url, fs, storage_options)
    return _publish(
        enc, root, _signing_key(sign), kind, [("", lambda: [payload])], signers=signers, recipients=recipients,
        version=version, note=note, plain_log=plain_log, name=name,
    )


def load(
    url: str, *, signers: Any, fs: Any = None, storage_options: dict | None = None, version: int | str = "latest",
    min_version: int | None = None, state: str | os.PathLike | None = None, weights_only: bool = True,
    map_location: Any = None, name: str | None = None,
) -> Any:
    """Load a version (default the newest) of the model at ``url``, after checking the signed
    log (``signers``: the ``ed25519:`` keys to trust), the file at open and its SHA-256. Nothing
    reaches ``torch.load``/safetensors before all checks pass. ``min_version``: refuse anything
    older; ``state``: a local file remembering the newest version seen (refuses a rolled-back log)."""
    enc, root = resolve(url, fs, storage_options)
    entries = _verified(enc, root, signers, min_version=min_version, state=state, name=name)
    e = _pick(entries, version, min_version, log_path(root))
    if e.kind == "hf":
        raise ModelError(f"{root}/{e.files[0].path}", "kind", f"version {e.version} is a Hugging Face directory: use encfs.loaders.from_pretrained")
    data = read_verified(enc, root, e.files[0], _by_file_id(entries))
    if e.kind == "safetensors":
        from safetensors.torch import load as st_load

        tensors = st_load(data)
        return tensors if map_location is None else {k: v.to(map_location) for k, v in tensors.items()}
    import torch

    return torch.load(io.BytesIO(data), weights_only=weights_only, map_location=map_location)


# -- Hugging Face ------------------------------------------------------------------------------------


@contextlib.contextmanager
def private_tempdir(parent: str | None = None) -> Iterator[str]:
    """A directory only this user can enter (0700), below ``parent``, by default in memory
    (``/dev/shm``) where there is one; removed on exit, whatever happened."""
    shm = "/dev/shm"
    if parent is None and os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK):
        parent = shm
    path = tempfile.mkdtemp(prefix="encfs-model-", dir=parent)
    try:
        os.chmod(path, 0o700)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _local_files(top: str) -> list[str]:
    out = []
    for d, dirs, names in os.walk(top):
        dirs.sort()
        for n in names:
            p = os.path.join(d, n)
            if os.path.islink(p) or not os.path.isfile(p):
                raise ModelError(p, "unreadable", "save_pretrained wrote something that is not a regular file")
            out.append(os.path.relpath(p, top).replace(os.sep, "/"))
    return sorted(out)


def _file_chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(READ_BLOCK):
            yield block


def save_pretrained(
    model: Any, url: str, *, sign: Any, fs: Any = None, storage_options: dict | None = None, recipients: Any = None,
    version: int | None = None, note: str = "", signers: Any = None, plain_log: bool = False, name: str | None = None,
    tmp_dir: str | None = None, **save_kwargs: Any,
) -> VersionEntry:
    """``model.save_pretrained`` (any object that has it: model, tokenizer, config) into a private
    temporary directory, then every file encrypted to ``url/vNNNNNN/`` as one signed version.
    The plaintext sits in that directory (in memory where ``/dev/shm`` exists; ``tmp_dir``: below
    this directory instead) until this returns."""
    enc, root = resolve(url, fs, storage_options)
    with private_tempdir(tmp_dir) as tmp:
        model.save_pretrained(tmp, **save_kwargs)
        files = [(rel, lambda rel=rel: _file_chunks(os.path.join(tmp, rel))) for rel in _local_files(tmp)]
        if not files:
            raise ModelError(tmp, "missing", "save_pretrained wrote no file")
        return _publish(
            enc, root, _signing_key(sign), "hf", files, signers=signers, recipients=recipients, version=version,
            note=note, plain_log=plain_log, name=name,
        )


def from_pretrained(
    cls: Any, url: str, *, signers: Any, fs: Any = None, storage_options: dict | None = None, version: int | str = "latest",
    min_version: int | None = None, state: str | os.PathLike | None = None, name: str | None = None,
    tmp_dir: str | None = None, **load_kwargs: Any,
) -> Any:
    """``cls.from_pretrained`` on a version saved by ``save_pretrained``: every file is checked
    against the signed log (at open, then by SHA-256) while it is decrypted into a private
    temporary directory; ``cls.from_pretrained`` runs only after all passed; the directory is
    removed before this returns or raises (``tmp_dir``: where to make it, as for ``save_pretrained``)."""
    enc, root = resolve(url, fs, storage_options)
    entries = _verified(enc, root, signers, min_version=min_version, state=state, name=name)
    e = _pick(entries, version, min_version, log_path(root))
    if e.kind != "hf":
        raise ModelError(f"{root}/{e.files[0].path}", "kind", f"version {e.version} is a {e.kind} checkpoint: use encfs.loaders.load")
    by_id = _by_file_id(entries)
    prefix = f"v{e.version:06d}/"
    with private_tempdir(tmp_dir) as tmp:
        for fe in e.files:
            if not fe.path.startswith(prefix):
                raise ModelError(f"{root}/{fe.path}", "malformed", f"not in the version's directory {prefix}")
            _decrypt_to(enc, root, fe, by_id, os.path.join(tmp, *fe.path[len(prefix) :].split("/")))
        return cls.from_pretrained(tmp, **load_kwargs)


def _decrypt_to(enc: Any, root: str, fe: Entry, by_id: dict[str, str], dest: str) -> None:
    os.makedirs(os.path.dirname(dest), mode=0o700, exist_ok=True)
    with open(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
        _stream_verified(enc, root, fe, by_id, out.write)
