"""``EncFileSystem``: the ``encfs`` fsspec protocol, wrapping any other filesystem.

Paths are the target filesystem's paths; sizes reported by ``ls``/``info`` are plaintext
sizes (from the ciphertext size and the header length alone). Configure it like fsspec's
own wrappers: ``target_protocol`` + ``target_options``, or a ready filesystem as ``fs=``;
the URL form ``encfs::s3://bucket/key`` does the same through fsspec's chaining.
"""

from __future__ import annotations

import difflib
import inspect
import io
import os
import threading
from typing import Any

import fsspec
from fsspec import AbstractFileSystem
from fsspec.callbacks import DEFAULT_CALLBACK
from fsspec.implementations.chained import ChainedFileSystem

from . import cobblestone as cs
from . import format as fmt
from .backend import CipherBackend, get_backend
from .copying import copy_stream
from .env import default_key, default_signers
from .errors import ConfigError, FormatError, naming, with_path
from .file import DEFAULT_READAHEAD, EncryptedReader
from .forking import ForkLocal
from .hf import warn_if_datasets_download
from .keys import KeyRing
from .keys.refs import KeySpec
from .header import FIRST_READ
from .reader import TAIL_CHUNKS, ChunkReader
from .remote import PieceCache, RemoteObject, fresh_instance, run_all
from .sink import LocalSink, fill_atomically, is_local, is_temp_name, open_sink
from .transaction import EncTransaction
from .writer import EncryptedTextWriter, EncryptedWriter, PayloadWriter

class _EnvDefault:
    """Class-level value of an environment default (``$ENCFS_KEY``, ``$ENCFS_SIGNERS``), so
    fsspec's instance cache (keyed by constructor arguments plus ``_extra_tokenize_attributes``)
    never hands out an instance built for an earlier value of the variable."""

    def __init__(self, read: Any):
        self.read = read

    def __get__(self, obj: Any, cls: Any) -> str | None:
        return self.read()


class EncFileSystem(ChainedFileSystem):
    """Encrypt on write, decrypt on read, over any fsspec filesystem.

    Parameters
    ----------
    target_protocol, target_options, fs:
        The filesystem holding the ciphertext (``fs`` wins if given).
    key:
        Key reference(s) used both to encrypt (as recipients) and decrypt (as identities);
        a string (comma-separated for several) or a list. Default: ``$ENCFS_KEY``.
    recipients, identities:
        Override one side, e.g. public keys only on an encrypt-only host.
    allow_plaintext:
        Read files that are not in the encfs format as plaintext (mixed buckets); off by default,
        when such a file is a ``FormatError``.
    backend:
        ``"auto"`` (default), ``"native"`` or ``"python"``; see ``encfs.backend``.
    readahead:
        Chunks (16 KiB each) decrypted per window on sequential reads.
    header_length:
        Header length of the files this filesystem writes (default 1024, which holds about eight
        recipients), and the length a listing assumes for files it does not probe.
    list_sizes:
        How ``ls``/``find``/``info`` learn plaintext sizes. ``"probe"``: read each file's first 32
        bytes (exact for every file; one request per file on an object store). ``"assume"``: from
        object sizes and ``header_length`` alone, checking one file per listing call and probing
        the files whose size cannot be an encfs file of that header length; a file's true header
        length is always read when it is opened. ``"auto"`` (default): ``probe`` on local disk or
        with ``allow_plaintext``, ``assume`` elsewhere.
    durable:
        On local disk, ``fsync`` each file (and its directory) before it appears (default True):
        a file that appeared survives a power cut. ``False`` keeps writes atomic for other
        processes and for a crash of this one, not for a crash of the machine; for scratch data
        that can be written again (benchmarks/RESULTS.md gives what it saves).
    signers:
        Trusted writers' Ed25519 public keys (``ed25519:<base64url>`` references, or files holding
        one; a list or comma-separated). Every file opened must carry a valid signature by one of
        them (``SignatureError`` otherwise, before any byte or key is used): a holder of a public
        recipient key can no longer write files these readers accept. Default: ``$ENCFS_SIGNERS``
        (a host-wide policy), else no check.
    sign_with:
        A signing key file (``encfs manifest keygen``) or ``encfs.signing.SigningKey``: every
        file written carries that writer's signature (docs/FORMAT.md §1.5). Pass a path, not a
        key object, where the filesystem is pickled (DataLoader workers, Dask).
    """

    protocol = "encfs"
    root_marker = ""
    transaction_type = EncTransaction
    _env_default_key = _EnvDefault(default_key)
    _env_default_signers = _EnvDefault(default_signers)
    _extra_tokenize_attributes = ("_env_default_key", "_env_default_signers")

    def __init__(
        self,
        target_protocol: str | None = None,
        target_options: dict | None = None,
        fs: AbstractFileSystem | None = None,
        key: KeySpec = None,
        recipients: KeySpec = None,
        identities: KeySpec = None,
        allow_plaintext: bool = False,
        backend: str | None = None,
        readahead: int = DEFAULT_READAHEAD,
        header_length: int = fmt.STANDARD_HEADER,
        list_sizes: str = "auto",
        durable: bool = True,
        signers: Any = None,
        sign_with: Any = None,
        **kwargs: Any,
    ):
        kwargs.pop("fo", None)
        key, target_options, fsspec_options = _route_options(key, kwargs, fs, target_protocol, target_options)
        super().__init__(**fsspec_options)
        if fs is None:
            fs = fsspec.filesystem(target_protocol or "file", **target_options)
        self.fs = fs
        self.keyring = KeyRing(key, recipients, identities, signers=signers, sign_with=sign_with)
        if allow_plaintext and self.keyring.signers:
            raise ConfigError(
                "signers= and allow_plaintext=True contradict each other: signers refuses every file no trusted "
                "writer signed, allow_plaintext passes files that are not encfs files through unchecked"
            )
        self.allow_plaintext = allow_plaintext
        self.backend_name = backend
        self.readahead = readahead
        self.durable = bool(durable)
        self.header_length = fmt.check_header_length(header_length)
        if list_sizes not in LIST_SIZES:
            raise ConfigError(f"list_sizes must be one of {', '.join(LIST_SIZES)}, not {list_sizes!r}")
        self.probe_sizes = list_sizes == "probe" or (list_sizes == "auto" and (allow_plaintext or is_local(fs)))
        self._header_lengths: dict[tuple, int] = {}
        self._heads = PieceCache()
        self._hl_lock_local: ForkLocal[threading.Lock] = ForkLocal(threading.Lock)
        self._strip_protocol = self._strip_target  # type: ignore[method-assign]

    @property
    def fs(self) -> AbstractFileSystem:
        """The target filesystem; in a forked child, a new instance with the same options (an
        async filesystem's client and event loop belong to the process that made them)."""
        return self._target.get()

    @fs.setter
    def fs(self, value: AbstractFileSystem) -> None:
        self._target: ForkLocal[AbstractFileSystem] = ForkLocal(lambda: fresh_instance(value), initial=value)

    # -- paths ---------------------------------------------------------------------------
    @classmethod
    def _strip_encfs(cls, path: str) -> str:
        for prefix in ("encfs::", "encfs://"):
            if path.startswith(prefix):
                path = path[len(prefix) :]
        return path

    def _strip_target(self, path: Any) -> Any:
        if isinstance(path, list):
            return [self._strip_target(p) for p in path]
        return self.fs._strip_protocol(self._strip_encfs(path))

    def unstrip_protocol(self, name: str) -> str:
        return "encfs::" + self.fs.unstrip_protocol(name)

    @property
    def backend(self) -> CipherBackend:
        return get_backend(self.backend_name)

    # -- sizes ---------------------------------------------------------------------------
    @staticmethod
    def _version(entry: dict) -> tuple:
        """What identifies one version of a file: name, size and whatever stamp the backend gives."""
        stamp = next((entry[k] for k in VERSION_STAMPS if entry.get(k) is not None), None)
        return entry["name"], entry["size"], str(stamp)

    def _header_length(self, entry: dict, assume: bool = False) -> int | None:
        """Header length of a file (cached per file version), else ``header_length`` if
        ``assume``, else one 32-byte read; None if not encfs."""
        with self._hl_lock_local.get():
            hit = self._header_lengths.get(self._version(entry))
        if hit is not None:
            return hit
        if assume:
            return self.header_length
        prefix = self.fs.cat_file(entry["name"], start=0, end=fmt.FIXED_FIELDS_SIZE) if entry["size"] >= fmt.FIXED_FIELDS_SIZE else b""
        return self._remember(entry, prefix)

    def _remember(self, entry: dict, prefix: bytes) -> int | None:
        if prefix[:8] != fmt.MAGIC:
            return None
        length = fmt.parse_fixed_fields(prefix)
        with self._hl_lock_local.get():
            if len(self._header_lengths) > 100_000:
                self._header_lengths.clear()
            self._header_lengths[self._version(entry)] = length
        return length

    def _plain_entries(self, entries: list[dict]) -> list[dict]:
        """Entries with plaintext sizes. A file that cannot be sized keeps its ciphertext size
        and says why in ``encrypted`` ("invalid: ..."); it fails only when opened."""
        files = [e for e in entries if e.get("type") == "file" and not is_temp_name(e["name"])]
        self._probe(self._to_probe(files))
        out = []
        for e in entries:
            if is_temp_name(e["name"]):
                continue
            e = dict(e)
            if e.get("type") == "file":
                e["ciphertext_size"] = e["size"]
                try:
                    e["size"], e["encrypted"] = self._plain_size(e)
                except (FormatError, OSError) as err:
                    e["encrypted"] = f"invalid: {err}"
            out.append(e)
        return out

    def _to_probe(self, files: list[dict]) -> list[dict]:
        """The files whose header must be read to size them. When sizes are assumed, those are the
        files no header length is known for whose size an encfs file of ``header_length`` cannot
        have, plus one that could, to check the assumption; if it fails, all of them."""
        todo = [e for e in files if self._version(e) not in self._header_lengths and e["size"] >= fmt.FIXED_FIELDS_SIZE]
        if self.probe_sizes or not todo:
            return todo
        odd: list[dict] = []
        shaped: list[dict] = []
        for e in todo:
            (shaped if _fits(e["size"], self.header_length) else odd).append(e)
        if not shaped:
            return odd
        self._probe(odd + shaped[:1])
        if self._header_lengths.get(self._version(shaped[0])) == self.header_length:
            return []
        return shaped[1:]

    def _probe(self, todo: list[dict]) -> None:
        """Read the fixed fields of ``todo`` (one ranged read each, run together) and remember
        their header lengths."""
        if not todo:
            return
        prefixes = self.fs.cat_ranges([e["name"] for e in todo], [0] * len(todo), [fmt.FIXED_FIELDS_SIZE] * len(todo), on_error="return")
        for e, p in zip(todo, prefixes):
            if isinstance(p, bytes):
                try:
                    self._remember(e, p)
                except (FormatError, OSError):
                    pass

    def _plain_size(self, entry: dict) -> tuple[int, bool]:
        """Plaintext size and whether the file is encrypted, from a known header length, else (when
        sizes are assumed) ``header_length``, else one read of the header's fixed fields."""
        hl = self._header_length(entry, assume=not self.probe_sizes and _fits(entry["size"], self.header_length))
        if hl is None:
            return entry["size"], False
        return fmt.plaintext_size(entry["size"], hl), True

    # -- listing -------------------------------------------------------------------------
    def ls(self, path: str, detail: bool = True, **kwargs: Any):
        entries = self.fs.ls(self._strip_target(path), detail=True, **kwargs)
        entries = self._plain_entries(entries)
        return entries if detail else [e["name"] for e in entries]

    def find(self, path: str, maxdepth: int | None = None, withdirs: bool = False, detail: bool = False, **kwargs: Any):
        """The target's own ``find`` (one listing request per page on object stores, however many
        directories), with plaintext sizes."""
        found = self.fs.find(self._strip_target(path), maxdepth=maxdepth, withdirs=withdirs, detail=True, **kwargs)
        entries = self._plain_entries(list(found.values()))
        return {e["name"]: e for e in entries} if detail else [e["name"] for e in entries]

    def info(self, path: str, **kwargs: Any) -> dict:
        return self._plain_entries([self.fs.info(self._strip_target(path), **kwargs)])[0]

    def exists(self, path: str, **kwargs: Any) -> bool:
        return self.fs.exists(self._strip_target(path), **kwargs)

    def isdir(self, path: str) -> bool:
        return self.fs.isdir(self._strip_target(path))

    def isfile(self, path: str) -> bool:
        return self.fs.isfile(self._strip_target(path))

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        self.fs.mkdir(self._strip_target(path), create_parents=create_parents, **kwargs)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.fs.makedirs(self._strip_target(path), exist_ok=exist_ok)

    def rmdir(self, path: str) -> None:
        self.fs.rmdir(self._strip_target(path))

    def rm_file(self, path: str) -> None:
        self.fs.rm_file(self._strip_target(path))

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        self.fs.rm(self._strip_target(path), recursive=recursive, maxdepth=maxdepth)

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        """Ciphertext copy: the header binds no path, so the copy stays decryptable. Parent
        directories are made as for every other write."""
        dst = self._strip_target(path2)
        self.fs.makedirs(self.fs._parent(dst), exist_ok=True)
        self.fs.cp_file(self._strip_target(path1), dst, **kwargs)

    def touch(self, path: str, truncate: bool = True, **kwargs: Any) -> None:
        """An empty encrypted file, or (``truncate=False`` on an existing file) a new
        modification time for the ciphertext, which stays as it is."""
        if not truncate and self.exists(path):
            self.fs.touch(self._strip_target(path), truncate=False, **kwargs)
        else:
            self.pipe_file(path, b"")

    def mv(self, path1: Any, path2: Any, recursive: bool = False, maxdepth: int | None = None, **kwargs: Any) -> None:
        self.fs.mv(self._strip_target(path1), self._strip_target(path2), recursive=recursive, maxdepth=maxdepth, **kwargs)

    def created(self, path: str):
        return self.fs.created(self._strip_target(path))

    def modified(self, path: str):
        return self.fs.modified(self._strip_target(path))

    def invalidate_cache(self, path: str | None = None) -> None:
        self.fs.invalidate_cache(path)
        with self._hl_lock_local.get():
            self._header_lengths.clear()
        self._heads.clear()

    # -- files ---------------------------------------------------------------------------
    def open_reader(self, path: str, ct_size: int | None = None) -> ChunkReader | io.IOBase:
        """The chunk reader of ``path`` (or a raw target file, for plaintext passthrough)."""
        return self._reader(self._strip_target(path), ct_size)

    def _reader(self, path: str, ct_size: int | None) -> ChunkReader | io.IOBase:
        """A local file is read through one descriptor; anything else by ranged requests
        (``remote.RemoteObject``), reusing what the last open of the same version read."""
        if is_local(self.fs):
            return self._open_chunks(self.fs.open(path, "rb"), path, ct_size, lambda: self.fs.open(path, "rb"))
        version, etag = None, None
        if ct_size is None:
            entry = self.fs.info(path)
            if entry.get("type") == "directory":
                raise FileNotFoundError(f"{path} is a directory")
            ct_size, version, etag = entry["size"], PieceCache.key(entry), entry.get("ETag")
        obj = RemoteObject(self.fs, path, ct_size, self._heads.get(version), etag)
        obj.preload(FIRST_READ, TAIL_CHUNKS * cs.CT_CHUNK_SIZE)
        reader = self._open_chunks(obj, path, ct_size, None)
        if isinstance(reader, ChunkReader):
            span = max(FIRST_READ, reader.header_length + cs.PAYLOAD_PREFIX_SIZE)  # what opening reads from offset 0
            head = obj.known(0, span) if span < ct_size else None  # never a whole file: its end must be read again
            if head is not None:
                self._heads.put(version, head)
        return reader

    def _open_chunks(self, raw: Any, path: str, ct_size: int | None, reopen: Any) -> ChunkReader | io.IOBase:
        try:
            if ct_size is None:
                ct_size = raw.seek(0, io.SEEK_END)
                raw.seek(0)
            if self.allow_plaintext and not _starts_with_magic(raw, ct_size):
                return raw if not isinstance(raw, RemoteObject) else self.fs.open(path, "rb")
            try:
                return ChunkReader(raw, ct_size, self.keyring, self.backend, name=path, reopen=reopen)
            except FormatError as e:
                if not self.allow_plaintext and not _starts_with_magic(raw, ct_size):
                    raise with_path(
                        FormatError(
                            "not an encfs file (bad magic): it may be plaintext. To read files that are not "
                            "encrypted as they are, pass allow_plaintext=True (storage_options="
                            "{'encfs': {'allow_plaintext': True}}); see the README on what that gives up"
                        ),
                        path,
                    ) from None
                raise with_path(e, path)
        except BaseException:
            raw.close()
            raise

    def open(self, path: str, mode: str = "rb", **kwargs: Any):
        """fsspec's ``open``; text writes get an ``EncryptedTextWriter``, whose failed ``with``
        discards the file as the binary writer's does."""
        if "b" in mode or not ("w" in mode or "x" in mode):
            return super().open(path, mode, **kwargs)
        text = {k: kwargs.pop(k) for k in ("encoding", "errors", "newline") if k in kwargs}
        return EncryptedTextWriter(super().open(path, mode.replace("t", "") + "b", **kwargs), **text)

    def _open(self, path: str, mode: str = "rb", block_size: int | None = None, autocommit: bool = True, cache_options: dict | None = None, **kwargs: Any):
        """``path`` arrives stripped (fsspec's ``open`` strips it)."""
        if mode == "rb":
            reader = self._reader(path, kwargs.get("size"))
            if not isinstance(reader, ChunkReader):
                return reader
            return EncryptedReader(self, path, reader, readahead=kwargs.get("readahead", self.readahead))
        if mode in ("wb", "xb"):
            with naming(path):
                sink = open_sink(self.fs, path, block_size, exclusive=mode == "xb", durable=kwargs.get("durable", self.durable))
                return EncryptedWriter(self, path, PayloadWriter(sink, self.keyring, self.backend, header_length=self.header_length), mode, autocommit=autocommit)
        if "a" in mode:
            raise NotImplementedError(
                "append is not supported: re-sealing the final chunk would reuse its nonce; rewrite the file instead"
            )
        raise ValueError(f"unsupported mode {mode!r}; use rb, wb or xb (text modes wrap these)")

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        with self.open(path, "rb") as f:
            return _read_range(f, start, end)

    def cat_ranges(self, paths: list[str], starts: Any, ends: Any, max_gap: Any = None, on_error: str = "return", **kwargs: Any) -> list:
        if not isinstance(starts, list):
            starts = [starts] * len(paths)
        if not isinstance(ends, list):
            ends = [ends] * len(paths)
        if len(starts) != len(paths) or len(ends) != len(paths):
            raise ValueError("paths, starts and ends must have the same length")
        out: list = [None] * len(paths)
        by_path: dict[str, list[int]] = {}
        for i, p in enumerate(paths):
            by_path.setdefault(p, []).append(i)

        def one_file(p: str, idx: list[int]) -> None:
            try:
                with self.open(p, "rb") as f:
                    for i in idx:
                        out[i] = _read_range(f, starts[i], ends[i])
            except Exception as e:
                for i in idx:
                    out[i] = e

        run_all([lambda p=p, idx=idx: one_file(p, idx) for p, idx in by_path.items()], concurrent=not is_local(self.fs))
        if on_error == "raise":
            for r in out:
                if isinstance(r, Exception):
                    raise r
        return out

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        with self.open(path, "xb" if mode == "create" else "wb") as f:
            f.write(value)

    def put_file(self, lpath: str, rpath: str, callback=DEFAULT_CALLBACK, mode: str = "overwrite", **kwargs: Any) -> None:
        """Encrypt local plaintext ``lpath`` to ``rpath``."""
        if os.path.isdir(lpath):
            self.makedirs(rpath, exist_ok=True)
            return
        with open(lpath, "rb") as src:
            callback.set_size(os.fstat(src.fileno()).st_size)
            with self.open(rpath, "xb" if mode == "create" else "wb") as dst:
                copy_stream(src, dst, callback.relative_update)

    def get_file(self, rpath: str, lpath: str, callback=DEFAULT_CALLBACK, outfile: Any = None, **kwargs: Any) -> None:
        """Decrypt ``rpath`` to local ``lpath``, atomically (never a partial plaintext file).
        A copy made for Hugging Face ``datasets`` (``load_dataset`` without ``streaming=True``,
        ``load_from_disk``) warns with ``encfs.hf.PlaintextCacheWarning``."""
        if outfile is None:
            warn_if_datasets_download(lpath)
        if self.isdir(rpath):
            os.makedirs(lpath, exist_ok=True)
            return
        with self.open(rpath, "rb") as src:
            callback.set_size(getattr(src, "size", None))
            if outfile is not None:
                copy_stream(src, outfile, callback.relative_update)
                return
            fill_atomically(LocalSink(os.path.abspath(lpath)), lambda sink: copy_stream(src, sink, callback.relative_update))

    def wipe_keys(self) -> None:
        """Overwrite loaded key material now (it reloads from its references when needed)."""
        self.keyring.wipe()

    def __del__(self) -> None:
        try:
            self.keyring.wipe()
        except Exception:
            pass


ENCFS_OPTIONS = (
    "target_protocol", "target_options", "fs", "key", "recipients", "identities", "allow_plaintext", "backend", "readahead",
    "header_length", "list_sizes", "durable", "signers", "sign_with",
)
LIST_SIZES = ("auto", "probe", "assume")
VERSION_STAMPS = ("ETag", "etag", "generation", "VersionId", "version_id", "mtime", "LastModified", "last_modified", "created", "creation_time")
"""Listing fields that tell one version of a file from another, as the backends name them
(s3fs, gcsfs, adlfs, local), strongest first."""
KEY_MATERIAL_MARKS = ("encfs-key-v1:", "encfs-x25519-identity-v1:")
"""What key file lines start with (docs/FORMAT.md §5): a ``key=`` holding one is never routed on."""
FSSPEC_OPTIONS = ("skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths", "asynchronous", "loop")


def _route_options(
    key: KeySpec, options: dict[str, Any], fs: AbstractFileSystem | None, target_protocol: str | None, target_options: dict | None
) -> tuple[KeySpec, dict[str, Any], dict[str, Any]]:
    """Send flat options where fsspec users expect them: ``encfs::s3://`` with
    ``storage_options={"secret": ..., "endpoint_url": ...}`` configures s3fs, as the same
    options did before ``encfs::`` was put in front of the URL. An option the target's
    constructor names goes to the target (an explicit ``target_options`` entry wins); a ``key``
    that is no encfs key reference (no ``keyfile:``/``env:``/... scheme) but an option of the
    target (s3fs's access key id) goes there too. Anything else is a ``ConfigError`` listing the
    valid options, with a near miss suggested. Returns (key, target options, fsspec options)."""
    target_options = dict(target_options or {})
    accepted = _constructor_options(type(fs) if fs is not None else _target_class(target_protocol))
    fsspec_options = {k: options.pop(k) for k in list(options) if k in FSSPEC_OPTIONS}
    if isinstance(key, str) and any(m in key for m in KEY_MATERIAL_MARKS):
        raise ConfigError(
            "key= holds key material itself, not a reference to it; name where the key is "
            "(keyfile:PATH, env:NAME, ...: docs/KEYS.md). The value is not shown"
        )
    if isinstance(key, str) and key and not _is_key_reference(key) and "key" in accepted:
        target_options.setdefault("key", key)
        key = None
    unknown = []
    for name, value in options.items():
        if name in accepted and fs is None:
            target_options.setdefault(name, value)
        else:
            unknown.append(name)
    if unknown:
        valid = sorted(set(ENCFS_OPTIONS) | set(FSSPEC_OPTIONS) | (accepted if fs is None else set()))
        near = {n: difflib.get_close_matches(n, valid, n=1) for n in unknown}
        hints = "".join(f"; did you mean {near[n][0]!r} for {n!r}?" for n in unknown if near[n])
        where = "" if fs is None else " (options of a ready target filesystem given as fs= cannot be set here)"
        raise ConfigError(f"unknown encfs option(s) {sorted(unknown)}{where}; valid: {', '.join(valid)}{hints}")
    return key, target_options, fsspec_options


def _target_class(protocol: str | None) -> type | None:
    try:
        return fsspec.get_filesystem_class(protocol or "file")
    except (ValueError, ImportError):
        return None


def _constructor_options(cls: type | None) -> set[str]:
    """Keyword options named by ``cls``'s constructor or its bases' (not ``**kwargs``)."""
    names: set[str] = set()
    for klass in getattr(cls, "__mro__", ()):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            continue
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"}
    return names


def _is_key_reference(text: str) -> bool:
    """Whether ``text`` names encfs keys (every comma-separated item has a registered scheme)."""
    from .keys import registry

    schemes = set(registry.schemes())
    items = [t.strip() for t in text.split(",") if t.strip()]
    return bool(items) and all(t.partition(":")[0] in schemes for t in items)


def _fits(ciphertext_size: int, header_length: int) -> bool:
    """Whether an encfs file with this header length can have this size."""
    try:
        fmt.plaintext_size(ciphertext_size, header_length)
    except FormatError:
        return False
    return True


def _starts_with_magic(raw: Any, ct_size: int) -> bool:
    """Whether the target file starts with the encfs magic (the position is left at 0)."""
    if isinstance(raw, RemoteObject):
        return ct_size >= len(fmt.MAGIC) and raw.read_at(0, min(ct_size, FIRST_READ))[: len(fmt.MAGIC)] == fmt.MAGIC
    raw.seek(0)
    head = raw.read(len(fmt.MAGIC)) if ct_size else b""
    raw.seek(0)
    return head == fmt.MAGIC


def _read_range(f: Any, start: int | None, end: int | None) -> bytes:
    size = f.size
    start = 0 if start is None else (max(0, size + start) if start < 0 else start)
    end = size if end is None else (max(0, size + end) if end < 0 else min(end, size))
    f.seek(min(start, end))
    if end == size:
        return f.read()
    return f.read(max(0, end - start))
