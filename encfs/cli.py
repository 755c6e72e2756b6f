"""The ``encfs`` command: keygen, pubkey, key id, encrypt, decrypt, ls, cat, verify, inspect, rewrap, clean, doctor, agent, audit, manifest, migrate, revoke, reencrypt, status.

Errors are one line on stderr and exit status 1 (``--debug`` for a traceback). ``encrypt`` and
``decrypt`` take several sources or globs (``'raw/*.parquet' enc/``: the last argument is then a
directory; a trailing '/' always means one). A run over a tree or several sources is
all-or-nothing: on failure every output it created is removed; with ``--keep-going`` a file
that fails is left out, the files that succeeded are written, the failures are listed and the
exit status is 1. Symlinks inside a source tree or among glob matches are skipped, never
followed (``inspect`` and ``rewrap`` walk directories the same way). Local outputs take the
source file's permission bits and access/modification times. ``passphrase:prompt`` asks twice
when encrypting."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import posixpath
import stat
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Sequence

import fsspec
from fsspec.core import url_to_fs as _fsspec_url_to_fs
from fsspec.implementations.local import LocalFileSystem

from . import __version__
from . import cobblestone as cs
from . import format as fmt
from .backend import get_backend
from .copying import copy_stream, write_all
from .errors import ConfigError, EncfsError, KeyReferenceError, naming
from .filesystem import EncFileSystem
from .header import open_header, read_header, read_signed_header
from .keys import KeyRing, SymmetricKey, X25519Identity, key_file_text, load_reference, public_reference
from .keys import sig
from .keys.base import key_label
from .keys.sources import b64encode
from .rewrap import rewrap
from .securemem import cleanse
from .signing import PUBLIC_PREFIX
from .sink import LocalSink, Sink, fill_atomically, is_local, is_temp_name, open_sink, remove_stale_temporaries, temp_name
from .target import Target
from .writer import PayloadWriter


ENCFS_HOPS = ("encfs::", "encfs://")


def encfs_hops(arg: str) -> tuple[str, int]:
    """``arg`` without its leading ``encfs::`` hops, and how many there were. The CLI itself
    is the encfs layer, so an ``encfs::`` URL names the ciphertext below it; two hops would
    encrypt twice and are refused. An ``encfs::`` hop further down a chain is refused too."""
    hops = 0
    while arg.startswith(ENCFS_HOPS):
        arg = arg[len("encfs::") if arg.startswith("encfs::") else len("encfs://"):]
        hops += 1
    if hops > 1:
        raise EncfsError(f"{'encfs::' * hops}...: {hops} encfs:: hops would encrypt twice; write one (encfs::URL)")
    if "::encfs::" in arg or "::encfs://" in arg:
        raise EncfsError(f"{arg}: encfs:: must be the first hop of a URL here (encfs::PROTOCOL://...)")
    return arg, hops


def _option_value(text: str) -> Any:
    """A ``-o`` value: JSON where it parses (true, 3, {"a": 1}), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def storage_options(pairs: Sequence[str], endpoint_url: str | None = None) -> dict[str, Any]:
    """``-o KEY=VALUE`` options as fsspec storage options. ``PROTOCOL.KEY=VALUE`` is for that
    hop of a URL only (``s3.anon=true``); other dots nest (``client_kwargs.region_name=...``).
    ``--endpoint-url`` is ``endpoint_url`` (S3-compatible stores)."""
    from fsspec.registry import known_implementations, registry  # noqa: PLC0415

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise EncfsError(f"-o {pair}: expected KEY=VALUE or PROTOCOL.KEY=VALUE")
        parts = key.split(".")
        where = out
        if len(parts) > 1 and (parts[0] in known_implementations or parts[0] in registry):
            where = out.setdefault(_HOP_OPTIONS, {}).setdefault(parts[0], {})
            parts = parts[1:]
        for part in parts[:-1]:
            nxt = where.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise EncfsError(f"-o {pair}: {part} is already set to a value, not options")
            where = nxt
        where[parts[-1]] = _option_value(value)
    if endpoint_url:
        out["endpoint_url"] = endpoint_url
    return out


_HOP_OPTIONS = "\0per-protocol"


def _options_for(arg: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """The storage options of one URL: per-protocol ones for the hops it has; flat ones for its
    outermost hop unless that is local disk (a plain path takes none)."""
    if not options:
        return {}
    from fsspec.core import split_protocol  # noqa: PLC0415

    protocols = [split_protocol(bit)[0] or "file" for bit in arg.split("::")]
    per_hop = options.get(_HOP_OPTIONS, {})
    out: dict[str, Any] = {p: dict(per_hop[p]) for p in protocols if p in per_hop}
    if protocols[0] not in ("file", "local"):
        out.update({k: v for k, v in options.items() if k != _HOP_OPTIONS})
    return out


def url_to_fs(arg: str, options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """The filesystem and path an argument names: an fsspec URL, else a local path (also one
    with '::' in its name that fsspec would take for a chain of protocols); an argument that is
    neither is one clear error, not a bare ValueError. A leading ``encfs::`` hop is dropped:
    the command encrypts or decrypts itself (``encfs_hops``). ``options``: ``storage_options``."""
    arg, _ = encfs_hops(arg)
    try:
        if "://" not in arg and "::" not in arg:
            return _fsspec_url_to_fs(arg)
        return _fsspec_url_to_fs(arg, **_options_for(arg, options))
    except (ValueError, ImportError) as e:
        if "://" not in arg:
            return LocalFileSystem(), os.path.abspath(arg)
        raise EncfsError(f"{arg}: not a path or URL encfs can open ({e})") from None


def _keyring(args: argparse.Namespace) -> KeyRing:
    return KeyRing(args.key or None, getattr(args, "recipient", None) or None, getattr(args, "identity", None) or None, **signatures(args))


def signatures(args: argparse.Namespace) -> dict[str, Any]:
    """``--sign`` / ``--signer`` as the filesystem options ``sign_with`` / ``signers``."""
    out: dict[str, Any] = {}
    if getattr(args, "sign", None):
        out["sign_with"] = args.sign
    if getattr(args, "signer", None):
        out["signers"] = list(args.signer)
    return out


_bare_paths_noted: set[str] = set()


def key_refs(values: Sequence[str], flag: str) -> list[str]:
    """The references given to ``flag`` (-k/-r/-i/--add), comma-separated ones split. A bare
    path that exists as a file is taken as ``keyfile:PATH`` (said once on stderr); a value that
    is neither a reference nor a file, or is both, is refused with the fix spelled out."""
    from .keys import registry  # noqa: PLC0415

    out: list[str] = []
    for value in values:
        for item in (v.strip() for v in value.split(",")):
            if not item:
                continue
            scheme, sep, rest = item.partition(":")
            is_ref = bool(sep and rest) and registry.is_scheme(scheme) and registry.loader(scheme) is not None
            path = os.path.expanduser(item)
            is_file = os.path.isfile(path)
            if is_ref and is_file:
                raise EncfsError(
                    f"{flag} {item}: both a key reference and a file of that name; write "
                    f"{flag} keyfile:{os.path.join('.', item) if not os.path.isabs(item) else item} for the file"
                )
            if is_ref:
                out.append(item)
            elif is_file:
                ref = f"keyfile:{os.path.abspath(path)}"
                if item not in _bare_paths_noted:
                    _bare_paths_noted.add(item)
                    print(f"encfs: note: {flag} {item}: taken as {ref}", file=sys.stderr)
                out.append(ref)
            else:
                known = ", ".join(f"{s}:" for s in registry.schemes())
                why = "no such file" if not sep else "not a key reference"
                raise EncfsError(
                    f"{flag} {item}: {why}; a key is a reference ({known}), e.g. {flag} keyfile:PATH for a key file"
                )
    return out


def _progress(total: int | None, desc: str, enabled: bool, unit: str = "B"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1024, disable=None if enabled else True, leave=False)


def _warn(message: str) -> None:
    print(f"encfs: warning: {message}", file=sys.stderr)


STDIO = "-"
"""As a source, stdin; as a destination, stdout. A file named '-' is written './-'."""


@dataclass
class _Item:
    """One file of a run: its source path, its path relative to the source root ('' for a
    single file), and the permission bits a local output takes (None: not known)."""

    src: str
    rel: str
    mode: int | None = None
    size: int | None = None
    times: tuple[int, int] | None = None
    """(atime_ns, mtime_ns) of a local source: a local output takes them."""
    fs: Any = None
    """The source's filesystem when a run reads from several sources (else the run's own)."""
    named: bool = False
    """Named on the command line (may be a symlink or a pipe): opened as given."""


@dataclass
class _Tree:
    """What a run reads: files, the directories between them, and what it refused to read."""

    items: list[_Item] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    is_dir: bool = False


def _scan_local(root: str) -> _Tree:
    """Walk a local directory without following symlinks: symlinks (to files or directories)
    and special files are skipped, so a run never reads outside the tree it was given, nor
    blocks on a FIFO. encfs's own temporaries are skipped too."""
    tree = _Tree(is_dir=True)
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel) if rel else root) as it:
            entries = sorted(it, key=lambda e: e.name)
        for ent in entries:
            r = posixpath.join(rel, ent.name) if rel else ent.name
            if ent.is_symlink():
                tree.skipped.append((r, "symlink, not followed"))
            elif is_temp_name(ent.name):
                tree.skipped.append((r, "an unfinished encfs temporary file"))
            elif ent.is_dir(follow_symlinks=False):
                tree.dirs.append(r)
                stack.append(r)
            elif ent.is_file(follow_symlinks=False):
                st = ent.stat(follow_symlinks=False)
                tree.items.append(_Item(ent.path, r, st.st_mode & 0o777, st.st_size, (st.st_atime_ns, st.st_mtime_ns)))
            else:
                tree.skipped.append((r, "not a regular file"))
    tree.items.sort(key=lambda i: i.rel)
    tree.dirs.sort()
    return tree


def _scan(fs: Any, src: str) -> _Tree:
    """The files a run reads from ``src`` on ``fs``: one file, or a whole tree."""
    if is_local(fs):
        path = fs._strip_protocol(src)
        if os.path.isdir(path):
            return _scan_local(path)
        st = os.stat(path)  # a file named explicitly may be a symlink or a pipe (<(cmd)): read it
        regular = stat.S_ISREG(st.st_mode)
        times = (st.st_atime_ns, st.st_mtime_ns) if regular else None
        return _Tree([_Item(path, "", st.st_mode & 0o777 if regular else None, st.st_size if regular else None, times)])
    if not fs.isdir(src):
        return _Tree([_Item(src, "", None, fs.size(src))])
    base = src.rstrip("/")
    tree = _Tree(is_dir=True)
    for name, info in sorted(fs.find(base, withdirs=True, detail=True).items()):
        rel = posixpath.relpath(name, base)
        if rel == ".":
            continue
        if is_temp_name(name):
            tree.skipped.append((rel, "an unfinished encfs temporary file"))
        elif info.get("type") == "directory":
            tree.dirs.append(rel)
        else:
            tree.items.append(_Item(name, rel, None, info.get("size")))
    return tree


def is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def several_sources(srcs: Sequence[str]) -> bool:
    """Whether a run names several sources (the destination is then a directory): more than
    one argument, or a glob (a path with glob characters that exists as named is one file)."""
    if len(srcs) != 1:
        return True
    arg = srcs[0]
    if arg == STDIO or not is_glob(arg):
        return False
    return "://" in arg or "::" in arg or not os.path.lexists(arg)


def _named(fs: Any, path: str, arg: str) -> tuple[list[str], list[tuple[str, str]], bool]:
    """What one argument names: ``path`` itself, or the matches of a glob (a local path with
    glob characters that exists as named is itself). Returns the paths (local ones without
    their protocol), the glob matches left out with why (encfs temporaries; on local disk
    symlinks, never followed, and special files), and whether it was a glob."""
    local = is_local(fs)
    globbed = is_glob(path) and not (local and os.path.lexists(fs._strip_protocol(path)))
    if not globbed:
        return [fs._strip_protocol(path) if local else path], [], False
    found = sorted(fs.glob(path))
    if not found:
        raise EncfsError(f"{arg}: no file matches")
    out: list[str] = []
    skipped: list[tuple[str, str]] = []
    for m in found:
        m = fs._strip_protocol(m) if local else m
        if is_temp_name(posixpath.basename(m.rstrip("/"))):
            skipped.append((m, "an unfinished encfs temporary file"))
        elif local and os.path.islink(m):
            skipped.append((m, "symlink, not followed"))
        elif local and not (os.path.isdir(m) or os.path.isfile(m)):
            skipped.append((m, "not a regular file"))
        else:
            out.append(m)
    return out, skipped, True


def _gather(srcs: Sequence[str], options: dict[str, Any] | None) -> _Tree:
    """The files of a run over several sources (arguments and glob matches), as one tree
    under a destination directory: a file goes to ``DST/NAME``, a directory to ``DST/NAME/...``
    (like ``cp -r a b DST/``). Glob matches, like files found walking a tree, are read only if
    they are regular files or directories (symlinks are skipped, never followed); an argument
    named explicitly is read as given. Two sources with one output name are refused."""
    tree = _Tree(is_dir=True)
    owner: dict[str, str] = {}
    for arg in srcs:
        if arg == STDIO:
            raise EncfsError("'-' (stdin) cannot be one of several sources")
        fs, path = url_to_fs(arg, options)
        matches, skipped, globbed = _named(fs, path, arg)
        tree.skipped.extend(skipped)
        for m in matches:
            name = posixpath.basename(m.rstrip("/"))
            sub = _scan(fs, m)
            if sub.is_dir:
                tree.dirs.append(name)
                tree.dirs.extend(posixpath.join(name, d) for d in sub.dirs)
                tree.skipped.extend((posixpath.join(name, r), why) for r, why in sub.skipped)
            else:
                sub.items[0].named = not globbed
            for item in sub.items:
                item.rel = posixpath.join(name, item.rel) if sub.is_dir else name
                item.fs = fs
                if item.rel in owner:
                    if owner[item.rel] == item.src:
                        continue  # named twice
                    raise EncfsError(f"{owner[item.rel]} and {item.src} would both be written to {item.rel}")
                owner[item.rel] = item.src
                tree.items.append(item)
    tree.items.sort(key=lambda i: i.rel)
    tree.dirs = sorted(set(tree.dirs))
    return tree


def _open_local_nofollow(path: str) -> BinaryIO:
    """Open a file found by walking a tree; refuses if it was swapped for a symlink since."""
    return os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)), "rb")


class _StdoutSink:
    """Ciphertext straight to stdout. ``discard`` cannot take back what was written, but a
    stream cut short has no final chunk, so a reader refuses it (truncation is detected)."""

    def __init__(self, stream: BinaryIO):
        self._stream = stream

    def write(self, data: bytes | memoryview) -> int:
        write_all(self._stream, memoryview(data))
        return len(data)

    def commit(self) -> None:
        self._stream.flush()

    def discard(self) -> None:
        pass


class _Outputs:
    """The outputs of one run, published all-or-nothing as far as storage allows.

    Local disk: each file is written (atomically, with its mode) to a hidden staging file
    beside its destination, and the staging files are renamed into place only after every
    file succeeded. Other filesystems: each file is committed atomically as it is done.
    ``rollback`` removes every output this run created (staging files, committed files that
    did not exist before, directories it made that are now empty); files that were in the
    destination before are left as they were."""

    def __init__(self, fs: Any):
        self.fs = fs
        self.local = is_local(fs)
        self.staged: list[tuple[str, str]] = []
        self.held: list[LocalSink] = []
        self.created: list[str] = []
        self.dirs: list[str] = []
        self.times: dict[str, tuple[int, int]] = {}

    def makedirs(self, path: str) -> None:
        """Create ``path`` and missing parents, remembering which this run created."""
        if self.local:
            missing = []
            p = os.path.abspath(path)
            while not os.path.isdir(p):
                missing.append(p)
                parent = os.path.dirname(p)
                if parent == p:
                    break
                p = parent
            for d in reversed(missing):
                os.mkdir(d)
                self.dirs.append(d)
        elif not self.fs.exists(path):
            self.fs.makedirs(path, exist_ok=True)
            self.dirs.append(path)

    def sink(self, path: str, mode: int | None, staged: bool, times: tuple[int, int] | None = None) -> Sink:
        """An atomic sink for ``path``; ``staged`` defers publishing to ``publish()``. A local
        output takes ``times`` (atime_ns, mtime_ns) when published."""
        if self.local:
            path = os.path.abspath(path)
            if os.path.islink(path) and os.lstat(path).st_uid == os.getuid():
                path = os.path.realpath(path)  # as LocalSink does: write at one's own link's target
            if os.path.isdir(path):
                raise EncfsError(f"{path}: is a directory")
            self.makedirs(os.path.dirname(path))
            if times is not None:
                self.times[path] = times
            if not staged:
                return LocalSink(path, mode=mode)
            stage = temp_name(path)
            self.staged.append((stage, path))
            sink = LocalSink(stage, mode=mode, hold=True)  # locked until published: never "stale"
            self.held.append(sink)
            return sink
        if not self.fs.exists(path):
            self.created.append(path)
        return open_sink(self.fs, path)

    def mark(self) -> tuple[int, int, int]:
        """Where the outputs stand now: ``drop`` forgets one file's outputs begun after it."""
        return len(self.staged), len(self.held), len(self.created)

    def drop(self, mark: tuple[int, int, int]) -> None:
        """Forget the output of a file that failed (``--keep-going``): its staging file is
        removed, and it is neither published nor counted as created."""
        staged, held, created = mark
        for stage, path in self.staged[staged:]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stage)
            self.times.pop(path, None)
        del self.staged[staged:]
        while len(self.held) > held:
            with contextlib.suppress(OSError):
                self.held.pop().release()
        del self.created[created:]

    def publish(self) -> None:
        """Rename every staging file into place (local disk), then sync their directories.
        Local outputs take their sources' access and modification times."""
        parents = set()
        while self.staged:
            stage, path = self.staged[0]
            existed = os.path.lexists(path)
            os.replace(stage, path)
            self.staged.pop(0)
            if not existed:
                self.created.append(path)
            parents.add(os.path.dirname(path))
        for path, times in self.times.items():
            with contextlib.suppress(OSError):
                os.utime(path, ns=times, follow_symlinks=False)
        self.times.clear()
        for d in parents:
            _fsync_dir(d)
        self._release()

    def _release(self) -> None:
        while self.held:
            with contextlib.suppress(OSError):
                self.held.pop().release()

    def rollback(self) -> int:
        """Remove what this run created; returns how many output files were removed."""
        removed = 0
        for stage, _ in self.staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stage)
        self.staged.clear()
        self._release()
        for path in self.created:
            try:
                if self.local:
                    os.unlink(path)
                else:
                    self.fs.rm_file(path)
                removed += 1
            except (FileNotFoundError, OSError):
                pass
        self.created.clear()
        for d in reversed(self.dirs):
            with contextlib.suppress(OSError):
                os.rmdir(d) if self.local else self.fs.rmdir(d)
        self.dirs.clear()
        return removed


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Plaintext:
    """``readinto`` over a source that must not already be an encfs file: the first bytes are
    checked for the encfs magic before any is passed on (encrypting twice is refused)."""

    def __init__(self, src: BinaryIO, name: str | None):
        self._src = src
        self._head = bytearray()
        while len(self._head) < len(fmt.MAGIC):
            part = src.read(len(fmt.MAGIC) - len(self._head))
            if not part:
                break
            self._head += part
        if bytes(self._head) == fmt.MAGIC:
            raise EncfsError(
                (f"{name}: " if name else "") + "already an encfs file; refusing to encrypt it twice "
                "(decrypt it first; `encfs rewrap` changes who can read it)"
            )

    def readinto(self, buf: Any) -> int:
        if not self._head:
            return self._src.readinto(buf)
        view = memoryview(buf).cast("B")
        n = min(len(view), len(self._head))
        view[:n] = self._head[:n]
        cleanse(self._head)
        del self._head[:n]
        return n


def _seal(sink: Sink, enc: EncFileSystem, src: BinaryIO, progress: Callable[[int], Any], name: str | None = None) -> None:
    """Encrypt ``src`` into ``sink``; it is committed only if everything was read and sealed.
    A source that is already an encfs file is refused before anything is written."""
    try:
        plain = _Plaintext(src, name)
    except BaseException:
        sink.discard()
        raise
    writer = PayloadWriter(sink, enc.keyring, enc.backend, header_length=enc.header_length)
    done = False
    try:
        copy_stream(plain, writer, progress)
        writer.seal()
        writer.commit()
        done = True
    finally:
        if not done:
            with contextlib.suppress(Exception):
                writer.discard()


def _destination(dst_fs: Any, dst: str, tree: _Tree, src: str, dst_arg: str = "") -> str:
    """Where a single file goes: ``dst``, or inside it when ``dst`` is a directory (like cp)
    or is written with a trailing '/' (a directory, created if missing)."""
    if tree.is_dir or not (dst_arg.endswith("/") or dst_fs.isdir(dst)):
        return dst
    join = os.path.join if is_local(dst_fs) else posixpath.join
    return join(dst, posixpath.basename(src.rstrip("/")))


def _directory_destination(dst_fs: Any, dst: str, dst_arg: str) -> str:
    """The destination of several sources: a directory (created if missing)."""
    if dst_arg == STDIO:
        raise EncfsError("several sources (or a glob) go to a directory, not to stdout")
    if dst_fs.exists(dst) and not dst_fs.isdir(dst):
        raise EncfsError(f"{dst_arg}: not a directory; several sources (or a glob) go to a directory")
    return dst


CopyOne = Callable[[_Item, Sink, Callable[[int], Any]], None]


def _run(
    verb: str, tree: _Tree, dst_fs: Any, dst: str, copy_one: CopyOne, progress: bool, total: int | None,
    keep_going: bool = False,
) -> int:
    """Copy every item of ``tree`` to ``dst`` with ``copy_one``: all outputs, or (on any error
    or interrupt) none of this run's outputs; then one summary line on stderr.

    ``keep_going``: a file that fails is left out and the run goes on; the files that
    succeeded are published (they stay), the failures are listed at the end and the exit
    status is 1. Errors about keys or settings, and interrupts, still stop the run and
    remove all of its outputs."""
    for rel, why in tree.skipped:
        _warn(f"skipped {rel}: {why}")
    out = _Outputs(dst_fs)
    join = os.path.join if out.local else posixpath.join
    failure = ""
    failures: list[str] = []
    current = dst
    written = nbytes = 0

    def count(n: int) -> None:
        nonlocal nbytes
        nbytes += n
        bar.update(n)

    try:
        try:
            if tree.is_dir:
                out.makedirs(dst)
                for d in tree.dirs:
                    out.makedirs(join(dst, d))
            with _progress(total, verb, progress) as bar:
                for item in tree.items:
                    current = item.rel or item.src
                    target = join(dst, item.rel) if item.rel else dst
                    mark = out.mark()
                    try:
                        copy_one(item, out.sink(target, item.mode, staged=tree.is_dir, times=item.times), count)
                    except (KeyReferenceError, ConfigError):
                        raise
                    except (EncfsError, OSError) as e:
                        if not keep_going:
                            raise
                        out.drop(mark)
                        failures.append(cli_words(_one_line(EncfsError(f"{current}: {e}"))))
                        _warn(f"{verb} failed: {failures[-1]} (going on: --keep-going)")
                        continue
                    written += 1
            current = dst
            out.publish()
        except (KeyReferenceError, ConfigError) as e:
            failure = str(e)  # about the keys or settings, not about the file at hand
        except (EncfsError, OSError) as e:
            failure = f"{current}: {e}"
    except BaseException:
        out.rollback()
        raise
    if failure:
        removed = out.rollback()
        note = f" (nothing written; removed {removed} output file(s) this run had published)" if tree.is_dir else ""
        if tree.is_dir and not removed:
            note = " (nothing written to the destination)"
        raise EncfsError(f"{verb} failed: {failure}{note}")
    skipped = f"; skipped {len(tree.skipped)} (see warnings)" if tree.skipped else ""
    failed = f"; {len(failures)} FAILED" if failures else ""
    print(f"{verb}ed {written} file(s), {nbytes} bytes{skipped}{failed}", file=sys.stderr)
    if failures:
        print(f"encfs: error: {verb} failed for {len(failures)} of {len(tree.items)} file(s) "
              f"(--keep-going: the {written} that succeeded were written):", file=sys.stderr)
        for line in failures:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


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


PROMPT_REF = "passphrase:prompt"


def _prompt_new_passphrase(args: argparse.Namespace) -> None:
    """A ``passphrase:prompt`` that encrypts is asked for twice (a typo would lock the data
    away); the two must match, else nothing is written. The one passphrase then serves every
    -k/-r that names it."""
    if PROMPT_REF not in (args.key or []) + (args.recipient or []):
        return
    import getpass  # noqa: PLC0415
    import hmac  # noqa: PLC0415

    from .keys.passphrase import Passphrase  # noqa: PLC0415
    from .secret import SecretBytes  # noqa: PLC0415

    first = bytearray(getpass.getpass("encfs passphrase: ").encode("utf-8"))
    second = bytearray()
    try:
        if not first:
            raise KeyReferenceError(f"{PROMPT_REF}: empty passphrase; nothing was written")
        second += getpass.getpass("encfs passphrase (again): ").encode("utf-8")
        if not hmac.compare_digest(bytes(first), bytes(second)):
            raise KeyReferenceError(f"{PROMPT_REF}: the two passphrases differ; nothing was written")
        key = Passphrase(SecretBytes.take(first), PROMPT_REF)
    finally:
        cleanse(first)
        cleanse(second)
    args.key = [key if r == PROMPT_REF else r for r in args.key or []]
    args.recipient = [key if r == PROMPT_REF else r for r in args.recipient or []]


def cmd_encrypt(args: argparse.Namespace) -> int:
    sources = list(args.src)
    multi = several_sources(sources)
    for s in sources:
        if s != STDIO and encfs_hops(s)[1]:
            raise EncfsError(
                f"{s}: an encfs:: source reads as plaintext through encfs, and encrypt takes plaintext files; "
                "name the plaintext, or use `encfs rewrap` to change who can read encrypted files"
            )
    _prompt_new_passphrase(args)
    if multi:
        return _encrypt_several(args, sources)
    args.src = sources[0]
    enc = EncFileSystem(key=args.key or None, recipients=args.recipient or None, header_length=args.header_length, skip_instance_cache=True, **signatures(args))
    if args.dst == STDIO:
        if sys.stdout.isatty():
            raise EncfsError("refusing to write ciphertext to a terminal: redirect stdout, or name an output file ('./-' for a file named '-')")
        if args.src == STDIO:
            _seal(_StdoutSink(sys.stdout.buffer), enc, sys.stdin.buffer, lambda n: None, "stdin")
            return 0
        src_fs, src = url_to_fs(args.src, args.storage_options)
        tree = _scan(src_fs, src)
        if tree.is_dir:
            raise EncfsError(f"{args.src} is a directory: write a tree to a directory, not to stdout")
        with _open_source(src_fs, tree.items[0]) as r:
            _seal(_StdoutSink(sys.stdout.buffer), enc, r, lambda n: None, args.src)
        return 0
    dst_fs, dst = url_to_fs(args.dst, args.storage_options)
    enc = EncFileSystem(fs=dst_fs, key=args.key or None, recipients=args.recipient or None, header_length=args.header_length, skip_instance_cache=True, **signatures(args))
    if args.src == STDIO:
        tree = _Tree([_Item(STDIO, "")])
        total = None
    else:
        src_fs, src = url_to_fs(args.src, args.storage_options)
        tree = _scan(src_fs, src)
        dst = _destination(dst_fs, dst, tree, src, args.dst)
        for item in tree.items:
            item.fs, item.named = src_fs, not tree.is_dir
        total = _total(tree)
    return _run("encrypt", tree, dst_fs, dst, _encrypt_copier(enc), args.progress, total, args.keep_going)


def _total(tree: _Tree) -> int | None:
    sizes = [i.size for i in tree.items]
    return None if None in sizes else sum(sizes)  # type: ignore[arg-type]


def _encrypt_copier(enc: EncFileSystem) -> CopyOne:
    """Encrypt one item of a run (stdin, or a file on the item's filesystem) into its sink.
    A file found walking a tree or matching a glob is opened without following a symlink."""

    def copy_one(item: _Item, sink: Sink, progress: Callable[[int], Any]) -> None:
        if item.src == STDIO:
            _seal(sink, enc, sys.stdin.buffer, progress)
            return
        try:
            r = _open_source(item.fs, item, nofollow=not item.named)
        except BaseException:
            sink.discard()
            raise
        with r:
            _seal(sink, enc, r, progress)

    return copy_one


def _encrypt_several(args: argparse.Namespace, sources: list[str]) -> int:
    """``encfs encrypt SRC... DIR``: several sources or a glob into one directory."""
    dst_fs, dst = url_to_fs(args.dst, args.storage_options) if args.dst != STDIO else (None, STDIO)
    dst = _directory_destination(dst_fs, dst, args.dst)
    enc = EncFileSystem(fs=dst_fs, key=args.key or None, recipients=args.recipient or None, header_length=args.header_length, skip_instance_cache=True, **signatures(args))
    tree = _gather(sources, args.storage_options)
    return _run("encrypt", tree, dst_fs, dst, _encrypt_copier(enc), args.progress, _total(tree), args.keep_going)


def _open_source(fs: Any, item: _Item, nofollow: bool = False) -> BinaryIO:
    if is_local(fs):
        return _open_local_nofollow(item.src) if nofollow else open(item.src, "rb")
    return fs.open(item.src, "rb")


def cmd_decrypt(args: argparse.Namespace) -> int:
    if args.dst != STDIO and encfs_hops(args.dst)[1]:
        raise EncfsError(
            f"{args.dst}: writing decrypted data through an encfs:: destination would encrypt it again; "
            "name a plain path, or use `encfs rewrap` to change who can read the files"
        )
    sources = list(args.src)
    if several_sources(sources):
        return _decrypt_several(args, sources)
    args.src = sources[0]
    with contextlib.ExitStack() as stack:
        src_arg = args.src
        if src_arg == STDIO:
            # Reading needs random access (the header, then chunks): spool stdin to a private
            # temporary file first. It holds ciphertext only.
            tmpdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="encfs-stdin-"))
            src_arg = os.path.join(tmpdir, "stdin.enc")
            with open(src_arg, "wb") as f:
                copy_stream(sys.stdin.buffer, f, lambda n: None)
        src_fs, src = url_to_fs(src_arg, args.storage_options)
        enc = EncFileSystem(fs=src_fs, key=args.key or None, identities=args.identity or None, allow_plaintext=args.allow_plaintext, skip_instance_cache=True, **signatures(args))
        tree = _scan(src_fs, src)
        if args.dst == STDIO:
            if tree.is_dir:
                raise EncfsError(f"{args.src} is a directory: decrypt a tree to a directory, not to stdout")
            with enc.open(src, "rb") as r, _progress(r.size, "decrypt", args.progress) as bar:
                copy_stream(r, sys.stdout.buffer, bar.update)
            sys.stdout.buffer.flush()
            return 0
        dst_fs, dst = url_to_fs(args.dst, args.storage_options)
        dst = _destination(dst_fs, dst, tree, src, args.dst)
        for item in tree.items:
            item.fs, item.named = src_fs, not tree.is_dir
        copy_one = _decrypt_copier(args, {id(src_fs): enc})
        return _run("decrypt", tree, dst_fs, dst, copy_one, args.progress, None, args.keep_going)


def _decrypt_copier(args: argparse.Namespace, encs: dict[int, EncFileSystem]) -> CopyOne:
    """Decrypt one item of a run into its sink, through the encfs filesystem over the item's
    own filesystem (``encs``, by id, made on first use). A file found walking a tree that has
    become a symlink since is refused, not followed."""

    def copy_one(item: _Item, sink: Sink, progress: Callable[[int], Any]) -> None:
        try:
            if is_local(item.fs) and not item.named and stat.S_ISLNK(os.lstat(item.src).st_mode):
                raise EncfsError(f"{item.src}: became a symlink while the tree was read; not followed")
            enc = encs.get(id(item.fs))
            if enc is None:
                enc = encs[id(item.fs)] = EncFileSystem(
                    fs=item.fs, key=args.key or None, identities=args.identity or None,
                    allow_plaintext=args.allow_plaintext, skip_instance_cache=True, **signatures(args),
                )
            r = enc.open(item.src, "rb")
        except BaseException:
            sink.discard()
            raise
        with r:
            fill_atomically(sink, lambda k: copy_stream(r, k, progress))

    return copy_one


def _decrypt_several(args: argparse.Namespace, sources: list[str]) -> int:
    """``encfs decrypt SRC... DIR``: several sources or a glob into one directory."""
    dst_fs, dst = url_to_fs(args.dst, args.storage_options) if args.dst != STDIO else (None, STDIO)
    dst = _directory_destination(dst_fs, dst, args.dst)
    tree = _gather(sources, args.storage_options)
    return _run("decrypt", tree, dst_fs, dst, _decrypt_copier(args, {}), args.progress, None, args.keep_going)


def cmd_clean(args: argparse.Namespace) -> int:
    """Remove encfs temporaries that killed writers left behind (``sink.remove_stale_temporaries``)."""
    fs, path = url_to_fs(args.path, args.storage_options)
    if not fs.isdir(path):
        raise EncfsError(f"{args.path}: not a directory")
    dirs = [path]
    if args.recursive:
        if is_local(fs):
            dirs = [d for d, _, _ in os.walk(fs._strip_protocol(path), followlinks=False)]
        else:
            dirs += [n for n, i in fs.find(path, withdirs=True, detail=True).items() if i.get("type") == "directory"]
    removed = [name for d in dirs for name in remove_stale_temporaries(fs, d, older_than=args.older_than)]
    for name in removed:
        print(name)
    print(f"removed {len(removed)} stale encfs temporary file(s) older than {args.older_than:g} s", file=sys.stderr)
    return 0


def _expand(fs: Any, path: str, arg: str, dirs: bool = True) -> list[str]:
    """The files ``path`` names: itself, every file below it (a directory), or the matches of a
    glob (directories among them expanded too). encfs temporaries are left out."""
    if any(c in path for c in "*?["):
        found = sorted(fs.glob(path))
        if not found:
            raise EncfsError(f"{arg}: no file matches")
    else:
        found = [path]
    out: list[str] = []
    for p in found:
        if fs.isdir(p):
            if not dirs:
                raise EncfsError(f"{arg}: is a directory")
            out.extend(sorted(n for n in fs.find(p) if not is_temp_name(n)))
        else:
            out.append(p)
    return out


def walk_files(fs: Any, path: str, arg: str) -> list[str]:
    """The files ``path`` names for ``inspect`` and ``rewrap``: itself, every file below it (a
    directory or an object-store prefix), or the matches of a glob (directories among them
    walked too). Walked as ``encrypt`` walks a tree: symlinks inside a tree or among glob
    matches are skipped, never followed, and so are encfs temporaries (each one said on
    stderr); a path named explicitly is taken as given."""
    found, skipped, _ = _named(fs, path, arg)
    for p, why in skipped:
        _warn(f"skipped {p}: {why}")
    out: list[str] = []
    for p in found:
        if is_local(fs) and not os.path.lexists(p):
            raise EncfsError(f"{arg}: no such file or directory")
        if fs.isdir(p):
            tree = _scan(fs, p)
            for rel, why in tree.skipped:
                _warn(f"skipped {posixpath.join(p, rel)}: {why}")
            out.extend(i.src for i in tree.items)
        else:
            out.append(p)
    return out


def _shown(fs: Any, path: str) -> str:
    return path if is_local(fs) else fs.unstrip_protocol(path)


def _entry_line(e: dict, name: str) -> str:
    if e.get("type") == "directory":
        return f"{'-':>14}  {name.rstrip('/')}/"
    enc = e.get("encrypted")
    note = "" if enc is True else "  (not an encfs file: ciphertext size)" if enc is False else f"  ({_one_line(enc)})"
    return f"{e.get('size', 0):>14}  {name}{note}"


def cmd_ls(args: argparse.Namespace) -> int:
    """Plaintext sizes from the listing and each file's header length (no key needed)."""
    fs, path = url_to_fs(args.path, args.storage_options)
    enc = EncFileSystem(fs=fs, key=[], skip_instance_cache=True)
    if fs.isdir(path):
        base = path.rstrip("/")
        if args.recursive:
            entries = sorted(enc.find(base, withdirs=True, detail=True).values(), key=lambda e: e["name"])
        else:
            entries = sorted(enc.ls(base, detail=True), key=lambda e: e["name"])
        named = [(e, posixpath.relpath(e["name"], base) if e["name"] != base else ".") for e in entries]
        named = [(e, n) for e, n in named if n != "."]
    else:
        named = [(enc.info(path), args.path)]
    for e, name in named:
        if args.json:
            row = {"name": name, "path": e["name"], "type": e.get("type"), "size": e.get("size")}
            if e.get("type") == "file":
                row.update(ciphertext_size=e.get("ciphertext_size"), encrypted=e.get("encrypted"))
            print(json.dumps(row, default=str))
        else:
            print(_entry_line(e, name))
    return 0


def cmd_cat(args: argparse.Namespace) -> int:
    """Decrypt files to stdout, one after another."""
    for arg in args.paths:
        fs, path = url_to_fs(arg, args.storage_options)
        enc = EncFileSystem(fs=fs, key=args.key or None, identities=args.identity or None, skip_instance_cache=True, **signatures(args))
        for p in _expand(fs, path, arg, dirs=False):
            with enc.open(p, "rb") as r:
                copy_stream(r, sys.stdout.buffer)
    sys.stdout.buffer.flush()
    return 0


VERIFY_SPAN = 256
"""Chunks opened per ``read_chunks`` call by ``verify`` (4 MiB of plaintext scratch)."""


def verify_file(enc: EncFileSystem, path: str, scratch: bytearray) -> tuple[str, str] | None:
    """Authenticate every chunk of ``path`` (header, key commitment and final chunk on open;
    then every chunk, ``VERIFY_SPAN`` at a time, into ``scratch``, which is wiped). None when
    it is sound; else (error type, reason). Key set-up errors are raised: they are no file's fault."""
    try:
        reader = enc.open_reader(path)
        try:
            if not hasattr(reader, "read_chunks"):  # pragma: no cover - only with allow_plaintext
                return ("FormatError", f"{path}: not an encfs file")
            out = memoryview(scratch)
            for first in range(0, reader.chunks, VERIFY_SPAN):
                reader.read_chunks(first, min(VERIFY_SPAN, reader.chunks - first), out)
        finally:
            reader.close()
            cleanse(scratch)
    except (KeyReferenceError, ConfigError):
        raise
    except (EncfsError, OSError) as e:  # IntegrityError, FormatError, NoMatchingKeyError, I/O
        reason = cli_words(_one_line(e))
        return type(e).__name__, reason[len(path) + 2:] if reason.startswith(f"{path}: ") else reason
    return None


def verify_object(enc: EncFileSystem, path: str) -> tuple[str, str] | None:
    """``verify_file`` as a bulk task (threads or a Dask worker): scratch of its own, wiped."""
    return verify_file(enc, path, bytearray(VERIFY_SPAN * cs.CHUNK_SIZE))


def cmd_verify(args: argparse.Namespace) -> int:
    """Authenticate every chunk of every file named (directories and globs expand), on a small
    thread pool or a Dask cluster; print the bad ones and exit 1 if there is any."""
    from .bulk import Runner  # noqa: PLC0415

    jobs: list[tuple[EncFileSystem, str, str]] = []
    for arg in args.paths:
        fs, path = url_to_fs(arg, args.storage_options)
        enc = EncFileSystem(fs=fs, key=args.key or None, identities=args.identity or None, skip_instance_cache=True, **signatures(args))
        try:
            jobs.extend((enc, p, enc.fs.unstrip_protocol(p) if not is_local(fs) else p) for p in _expand(fs, path, arg))
        except FileNotFoundError:
            raise EncfsError(f"{arg}: no such file or directory") from None
    if not jobs[0][0].keyring.identities() if jobs else False:
        raise EncfsError("no key to verify with: pass -k or -i (or set $ENCFS_KEY)")
    pending = list(reversed({p: (e, p, shown) for e, p, shown in jobs}.values()))
    total, bad = len(pending), 0
    with Runner(max(1, min(args.jobs, total or 1)), args.dask) as runner, _progress(total, "verify", args.progress, unit="file") as bar:
        while pending or len(runner):
            while pending and not runner.full:
                enc, path, shown = pending.pop()
                runner.submit(shown, verify_object, enc, path)
            for shown, result in runner.finished():
                if isinstance(result, (KeyReferenceError, ConfigError)):
                    raise result
                if isinstance(result, BaseException):
                    result = (type(result).__name__, _one_line(result))
                bar.update(1)
                if args.json:
                    row = {"path": shown, "ok": result is None}
                    if result:
                        row.update(error=result[0], reason=result[1])
                    print(json.dumps(row), flush=True)
                elif result:
                    print(f"{shown}: {result[0]}: {result[1]}", flush=True)
                bad += result is not None
    print(f"verified {total} file(s): {total - bad} ok, {bad} bad", file=sys.stderr)
    return 1 if bad else 0


def inspect_file(path: str, keyring: KeyRing | None, options: dict[str, Any] | None = None, fs: Any = None) -> dict:
    """Header facts of ``path``; with identities, also whether its header MAC and key
    commitment verify (no chunk is read). ``fs``: ``path`` is a path on it, not a URL."""
    if fs is None:
        fs, p = url_to_fs(path, options)
    else:
        p, path = path, _shown(fs, path)
    size = fs.size(p)
    target = Target(fs.open(p, "rb"))
    try:
        with naming(path):
            if keyring is not None and keyring.identities():
                opened = open_header(target.read_at, size, keyring)
                opened.keys.wipe()
                header, verified = opened.header, "header MAC and key commitment OK (chunks not read)"
            elif keyring is not None and keyring.signers:
                header = read_signed_header(target.read_at, size, keyring)[0]
                verified = "writer signature OK over the stored key commitment (no key given: header MAC, commitment and payload not checked)"
            else:
                header, verified = read_header(target.read_at, size)[0], None
    finally:
        target.close()
    pt = fmt.plaintext_size(size, header.length)
    info: dict[str, Any] = {
        "path": path,
        "format_version": header.version,
        "suite": fmt.SUITES[header.suite],
        "file_id": header.file_id.hex(),
        "header_length": header.length,
        "header_free": header.length - len(header.signed) - fmt.MAC_SIZE,
        "ciphertext_size": size,
        "plaintext_size": pt,
        "chunks": cs.chunk_count(pt),
        "recipients": [{"type": s.type, "key_id": s.key_id.hex() or None} for s in header.stanzas if not sig.is_signature(s)],
        "signed_by": [PUBLIC_PREFIX + b64encode(s.params) for s in header.stanzas if sig.is_signature(s)],
    }
    if verified:
        info["verified"] = verified
    return info


def cmd_inspect(args: argparse.Namespace) -> int:
    keyring = _keyring(args) if (args.key or args.identity or args.signer) else None
    for arg in args.paths:
        fs, path = url_to_fs(arg, args.storage_options)
        for p in walk_files(fs, path, arg):
            _print_inspect(inspect_file(p, keyring, fs=fs), args.json)
    return 0


def _print_inspect(info: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(info))
        return
    for k, v in info.items():
        if k == "recipients":
            for r in v:
                print(f"  recipient: {r['type']}" + (f" {r['key_id']}" if r["key_id"] else ""))
        elif k == "signed_by":
            for signer in v:
                print(f"  signed by: {signer} (unverified unless --signer names it)")
        else:
            print(f"{k:>16}: {v}")


def cmd_key_id(args: argparse.Namespace) -> int:
    """Print the id a key has in headers (what ``inspect`` lists and ``rewrap --remove`` takes)."""
    (ref,) = key_refs([args.key_ref], "encfs key id")
    key = load_reference(ref)
    try:
        print(key_label(key))
    finally:
        getattr(key, "wipe", lambda: None)()
    return 0


def _removal(value: str) -> Any:
    """A ``rewrap --remove`` value as ``rewrap`` takes it (``rotate.removal_for``)."""
    from .rotate import removal_for  # noqa: PLC0415

    return removal_for(_canonical_removal(value))


def _type_names() -> list[str]:
    from .keys import registry  # noqa: PLC0415

    return registry.names()


def cmd_rewrap(args: argparse.Namespace) -> int:
    """Files named one by one are rewrapped here, in order, stopping at the first failure;
    a directory or prefix goes to ``rotate.rewrap_prefix`` (parallel, journaled, resumable)."""
    keyring = KeyRing(args.key or None, identities=args.identity or None, **signatures(args))
    add_refs = key_refs(args.add, "--add")
    remove_refs = [_canonical_removal(r) for r in args.remove]
    add = [load_reference(r) for r in add_refs]
    remove = [_removal(r) for r in args.remove]
    files, prefixes = [], []
    for arg in args.paths:
        fs, path = url_to_fs(arg, args.storage_options)
        if not any(c in path for c in "*?[") and fs.isdir(path):
            prefixes.append((fs, path, arg))
        else:
            files.extend((fs, p) for p in walk_files(fs, path, arg))
    status = 0
    if prefixes:
        status = _rewrap_prefixes(args, prefixes, add_refs, remove_refs, tolerant=False)
    done = 0
    for fs, p in files:
        shown = _shown(fs, p)
        try:
            with naming(shown):
                res = rewrap(fs, p, keyring, add=add, remove=remove, in_place=args.in_place, header_length=args.header_length)
        except (KeyReferenceError, ConfigError, EncfsError, OSError) as e:
            if not done:
                raise
            raise EncfsError(f"{_one_line(e)} (rewrap stopped here: {done} of {len(files)} file(s) before it were rewrapped)") from e
        done += 1
        how = "in place" if res.in_place else "by rewriting the header into a new file"
        print(f"{shown}: +{res.added} -{res.removed} ({how}); now {res.header.labels()}", file=sys.stderr)
    return status


def _canonical_removal(value: str) -> str:
    """A ``--remove`` value as tasks take it: a label, key id, or reference (a bare key file
    path becomes ``keyfile:PATH``), never a loaded key."""
    kind, sep, rest = value.partition(":")
    if (sep and kind and rest) or set(value) <= set("0123456789abcdefABCDEF") or value in _type_names():
        return value
    (ref,) = key_refs([value], "--remove")
    return ref


def _rewrap_prefixes(args: argparse.Namespace, prefixes: list, add: list[str], remove: list[str], tolerant: bool) -> int:
    from .migrate import report  # noqa: PLC0415
    from .rotate import rewrap_prefix  # noqa: PLC0415

    status = 0
    for fs, path, arg in prefixes:
        out = rewrap_prefix(
            fs, path, url=arg, key=key_refs(args.key, "-k"), identities=key_refs(args.identity, "-i"), add=add, remove=remove,
            tolerant=tolerant, header_length=args.header_length, journal_path=args.journal, jobs=args.jobs, dask=args.dask,
            progress=args.progress, signers=list(args.signer) or None,
        )
        status |= report(out, args.json, verb="rewrapped")
    return status


def cmd_revoke(args: argparse.Namespace) -> int:
    """Remove a recipient from every file under the prefixes that has it."""
    refs = [_canonical_removal(args.recipient)]
    prefixes = []
    for arg in args.paths:
        fs, path = url_to_fs(arg, args.storage_options)
        prefixes.append((fs, path, arg))
    args.header_length = None
    return _rewrap_prefixes(args, prefixes, [], refs, tolerant=True)


def cmd_reencrypt(args: argparse.Namespace) -> int:
    """New file keys for every file under the prefix: migrate it onto itself."""
    from .migrate import migrate, report  # noqa: PLC0415

    status = 0
    for arg in args.paths:
        fs, root = bulk_side("encfs::" + encfs_hops(arg)[0], args.storage_options, key=args.key or None,
                             recipients=args.recipient or None, identities=args.identity or None, header_length=args.header_length,
                             **signatures(args))
        fs.keyring.recipients()
        check_signed_writes(fs)
        if fs.keyring.signing_key() is None:
            print("note: the re-encrypted files carry no writer signature (a new file key voids an old one); "
                  "pass --sign KEYFILE to sign them", file=sys.stderr)
        out = migrate(fs, root, fs, root, src_url=arg, dst_url=arg, journal_path=args.journal, jobs=args.jobs, dask=args.dask,
                      progress=args.progress, op="reencrypt", in_place=True)
        status |= report(out, args.json, verb="re-encrypted")
    return status


def cmd_status(args: argparse.Namespace) -> int:
    """Which objects under the prefixes are not encrypted (the first bytes of each, nothing more)."""
    from .bulk import all_files  # noqa: PLC0415

    bad = total = 0
    for arg in args.paths:
        fs, root = url_to_fs(arg, args.storage_options)
        files = all_files(fs, root)
        paths = [f"{root.rstrip('/')}/{rel}" if rel else root for rel in files]
        heads = fs.cat_ranges(paths, [0] * len(paths), [len(fmt.MAGIC)] * len(paths), on_error="return") if paths else []
        for p, head in zip(paths, heads):
            total += 1
            state = "unreadable" if isinstance(head, Exception) else "encrypted" if head == fmt.MAGIC else "NOT ENCRYPTED"
            if state != "encrypted":
                bad += 1
                why = f" ({type(head).__name__}: {head})" if isinstance(head, Exception) else ""
                print(json.dumps({"path": _shown(fs, p), "state": state}) if args.json else f"{_shown(fs, p)}: {state}{why}", flush=True)
            elif args.all:
                print(json.dumps({"path": _shown(fs, p), "state": state}) if args.json else f"{_shown(fs, p)}: {state}", flush=True)
    print(f"{total} object(s): {total - bad} encrypted, {bad} not encrypted or unreadable", file=sys.stderr)
    return 1 if bad else 0


def check_signed_writes(fs: EncFileSystem) -> None:
    """A bulk writer reads back what it wrote: where its reads check writer signatures
    (``--signer``, ``$ENCFS_SIGNERS``) it must sign (``--sign``), and its own key is trusted for
    that read-back. Refused up front otherwise: every copy would fail its check."""
    ring = fs.keyring
    if not ring.signers:
        return
    key = ring.signing_key()
    if key is None:
        raise EncfsError(
            "reads here check writer signatures (--signer or $ENCFS_SIGNERS) but the files written would carry none, "
            "so every read-back would be refused: pass --sign KEYFILE (its key is trusted for the read-back)"
        )
    if key.verify_key not in ring.signers:
        ring.signers = (*ring.signers, key.verify_key)


def bulk_side(arg: str, options: dict[str, Any], **keys: Any) -> tuple[Any, str]:
    """The filesystem and root of one side of a bulk operation: the target itself, or an
    ``EncFileSystem`` over it when ``arg`` has an ``encfs::`` hop (keys as references)."""
    _, hops = encfs_hops(arg)
    fs, root = url_to_fs(arg, options)
    if hops:
        fs = EncFileSystem(fs=fs, skip_instance_cache=True, **keys)
    return fs, root


def cmd_migrate(args: argparse.Namespace) -> int:
    from .migrate import migrate, report  # noqa: PLC0415

    key = args.key or None
    sig = signatures(args)
    src_fs, src = bulk_side(args.src, args.storage_options, key=args.src_key or key, identities=args.identity or None,
                            **{k: v for k, v in sig.items() if k == "signers"})
    dst_fs, dst = bulk_side(args.dst, args.storage_options, key=key, recipients=args.recipient or None, header_length=args.header_length,
                            **{k: v for k, v in sig.items() if k == "sign_with"})
    if not isinstance(src_fs, EncFileSystem) and not isinstance(dst_fs, EncFileSystem):
        raise EncfsError("neither SRC nor DST is encrypted (encfs::URL): that is a plain copy, not a migration")
    if isinstance(dst_fs, EncFileSystem):
        dst_fs.keyring.recipients()  # no key: one clear error before anything is listed
        check_signed_writes(dst_fs)
    out = migrate(
        src_fs, src, dst_fs, dst, src_url=args.src, dst_url=args.dst, journal_path=args.journal, jobs=args.jobs,
        dask=args.dask, include=args.include, exclude=args.exclude, dry_run=args.dry_run, progress=args.progress,
    )
    return report(out, args.json)


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
        for line in doctor_lines(out):
            print(line)
    return 0


def _bytes_text(n: Any) -> str:
    if not isinstance(n, int):
        return str(n)
    if n < 1024:
        return f"{n} bytes"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.4g} {unit}"


def _aes_line(native: dict[str, Any]) -> str:
    """The AES-256-GCM implementation and code path in use, what ENCFS_AES says, and the others."""
    others = [name for name in native.get("aes_available", {}) if name != native.get("aes")]
    setting = f"ENCFS_AES={native.get('aes_setting', 'auto')}"
    if native.get("aes") is None:
        return f"AES-256-GCM: ERROR {native.get('aes_error')} ({setting})"
    also = f"; also available: {', '.join(others)}" if others else "; no other implementation available"
    return f"AES-256-GCM: {native.get('aes_code_path')} ({setting}{also})"


def doctor_lines(out: dict[str, Any]) -> list[str]:
    """``encfs doctor`` for people: one readable line per fact."""
    native = out.get("native") or {}
    lines = [f"encfs {out.get('encfs')} (fsspec {out.get('fsspec')})", f"cipher backend: {out.get('backend')}"]
    if native.get("built"):
        lines.append(f"native library: built, {native.get('openssl_version')}, {native.get('threads')} thread(s)")
        lines.append(_aes_line(native))
        lines.append(
            "memory locking: "
            + ("works" if native.get("mlock_ok") else "NOT available (plaintext and keys may be swapped to disk)")
            + f"; {_bytes_text(native.get('locked_bytes'))} locked now"
        )
    else:
        lines.append(f"native library: not built ({native.get('why', 'unknown reason')}); the pure-Python backend is used")
    if "mlock_fallbacks" in out:
        n = out["mlock_fallbacks"]
        lines.append(f"unlocked fallbacks: {n}" + ("" if not n else " (raise `ulimit -l` to keep buffers in locked memory)"))
    if "rlimit_memlock" in out:
        lines.append(f"locked memory limit (ulimit -l): {_bytes_text(out['rlimit_memlock'])}")
    return lines


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="encfs", description="Encrypted files for ML data (Cobblestone-256 / AES-256-GCM).")
    p.add_argument("--version", action="version", version=f"encfs {__version__}")
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")
    sub = p.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show a traceback on errors")

    storage = argparse.ArgumentParser(add_help=False)
    storage.add_argument(
        "-o", "--storage-option", dest="storage_option", action="append", default=[], metavar="KEY=VALUE",
        help="fsspec storage option for URLs (repeatable); PROTOCOL.KEY=VALUE for one hop (s3.anon=true); values parse as JSON where they can",
    )
    storage.add_argument("--endpoint-url", metavar="URL", help="endpoint of an S3-compatible store (storage option endpoint_url)")

    def keys(sp: argparse.ArgumentParser, recipient: bool = False, identity: bool = False) -> None:
        sp.add_argument("-k", "--key", action="append", default=[], help="key reference for both directions (repeatable; default $ENCFS_KEY)")
        if recipient:
            sp.add_argument("-r", "--recipient", action="append", default=[], help="encrypt to this reference (repeatable)")
            sp.add_argument(
                "--header-length", type=int, default=fmt.STANDARD_HEADER, metavar="BYTES",
                help="header length of the files written, a multiple of 512 (default %(default)s: about eight recipients; "
                "readers that list these files should be given the same, see docs/FORMAT.md section 4)",
            )
            sp.add_argument(
                "--sign", metavar="KEYFILE", default=None,
                help="sign every file written with this Ed25519 signing key (encfs manifest keygen); readers given "
                "--signer refuse files without a valid signature (docs/FORMAT.md section 1.5)",
            )
        if identity:
            sp.add_argument("-i", "--identity", action="append", default=[], help="decrypt with this reference (repeatable)")
            sp.add_argument(
                "--signer", action="append", default=[], metavar="PUBLIC",
                help="trust this writer (ed25519:<base64url> or a .pub file; repeatable): refuse any file it did not sign",
            )

    sp = sub.add_parser("keygen", parents=[common], help="create a symmetric key or an X25519 identity")
    sp.add_argument("-o", "--output", help="key file to create (mode 0600); default stdout")
    sp.add_argument("--x25519", action="store_true", help="make an X25519 identity; its public key goes to stderr")
    sp.add_argument("--force", action="store_true", help="overwrite an existing key file")
    sp.set_defaults(func=cmd_keygen)

    sp = sub.add_parser("pubkey", parents=[common], help="print the x25519: public reference of an identity file")
    sp.add_argument("identity", help="identity file path or reference")
    sp.set_defaults(func=cmd_pubkey)

    for name, func, help_ in (("encrypt", cmd_encrypt, "encrypt a file or directory tree"), ("decrypt", cmd_decrypt, "decrypt a file or directory tree")):
        sp = sub.add_parser(name, parents=[common, storage], help=help_)
        keys(sp, recipient=name == "encrypt", identity=name == "decrypt")
        what_src, what_dst = ("plaintext", "ciphertext") if name == "encrypt" else ("ciphertext", "plaintext")
        sp.add_argument(
            "src", nargs="+", metavar="SRC",
            help=f"{what_src}: file, directory tree, glob (quoted: 'raw/*.parquet') or fsspec URL; '-' for stdin "
            "(symlinks inside a tree or among glob matches are skipped, never followed)",
        )
        sp.add_argument(
            "dst", metavar="DST",
            help=f"{what_dst}: file, directory or fsspec URL; '-' for stdout ('./-' names a file '-'). With several "
            "sources or a glob, a directory: each file goes to DST/NAME, each directory to DST/NAME/...; "
            "a trailing '/' always means a directory (created if missing)",
        )
        sp.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
        sp.add_argument(
            "--keep-going", action="store_true",
            help="on a failed file, go on with the others; the files that succeeded are written, the failures "
            "are listed at the end and the exit status is 1 (default: stop and remove everything this run wrote)",
        )
        if name == "decrypt":
            sp.add_argument("--allow-plaintext", action="store_true", help="pass through files that are not encfs files")
        sp.set_defaults(func=func)

    sp = sub.add_parser("inspect", parents=[common, storage], help="show header, recipients and sizes (no secrets)")
    keys(sp, identity=True)
    sp.add_argument("paths", nargs="+", metavar="PATH", help="files, directories (every file below), object-store prefixes, globs or fsspec URLs; symlinks in a tree are skipped")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_inspect)

    sp = sub.add_parser("rewrap", parents=[common, storage], help="add/remove recipients without re-encrypting data")
    keys(sp, identity=True)
    sp.add_argument("--add", action="append", default=[], help="reference of a recipient to add (repeatable)")
    sp.add_argument("--remove", action="append", default=[], help="recipient to remove: 'type:keyid', key id hex, or a key reference/file (repeatable)")
    sp.add_argument(
        "--in-place", action="store_true",
        help="on local disk, write the new header over the old one (one write, fsync; fast, but a power cut during "
        "it can leave a torn header). Default: a new file, renamed over the old one",
    )
    sp.add_argument("--no-in-place", action="store_false", dest="in_place", help=argparse.SUPPRESS)
    bulk_options(sp, "rewrap")
    sp.add_argument(
        "--header-length", type=int, default=None, metavar="BYTES",
        help="grow headers to this length (a multiple of 512) when the recipients do not fit the file's own; default: keep it",
    )
    sp.add_argument("paths", nargs="+", metavar="PATH", help="files, directories (every file below), object-store prefixes, globs or fsspec URLs; symlinks in a tree are skipped")
    sp.set_defaults(func=cmd_rewrap)

    sp = sub.add_parser("key", parents=[common], help="about keys: 'encfs key id FILE_OR_REFERENCE'")
    ksub = sp.add_subparsers(dest="key_cmd", required=True)
    kp = ksub.add_parser("id", parents=[common], help="print a key's id as headers show it (key:<hex>, x25519:<hex>)")
    kp.add_argument("key_ref", metavar="FILE_OR_REFERENCE", help="key file, identity file, or reference (keyfile:, env:, x25519:...)")
    kp.set_defaults(func=cmd_key_id)

    sp = sub.add_parser("clean", parents=[common, storage], help="remove temporaries left by killed encfs writers")
    sp.add_argument("path", metavar="DIR_OR_URL", help="directory or fsspec URL")
    sp.add_argument("-r", "--recursive", action="store_true", help="also every directory below it (symlinks not followed)")
    sp.add_argument("--older-than", type=_seconds, default=3600.0, metavar="SECONDS", help="only temporaries older than this (default 3600)")
    sp.set_defaults(func=cmd_clean)

    sp = sub.add_parser("ls", parents=[common, storage], help="list files with their plaintext sizes (no key needed)")
    sp.add_argument("path", metavar="PATH_OR_URL")
    sp.add_argument("-R", "--recursive", action="store_true", help="every file below PATH")
    sp.add_argument("--json", action="store_true", help="one JSON object per entry")
    sp.set_defaults(func=cmd_ls)

    sp = sub.add_parser("cat", parents=[common, storage], help="decrypt files to stdout")
    keys(sp, identity=True)
    sp.add_argument("paths", nargs="+", metavar="PATH")
    sp.set_defaults(func=cmd_cat)

    sp = sub.add_parser("verify", parents=[common, storage], help="authenticate every chunk of every file; list the bad ones, exit 1 if any")
    keys(sp, identity=True)
    sp.add_argument("paths", nargs="+", metavar="PATH", help="files, directories, globs or fsspec URLs")
    sp.add_argument("-j", "--jobs", type=int, default=min(4, os.cpu_count() or 1), help="files verified at once (default min(4, cores))")
    sp.add_argument("--dask", default=None, metavar="ADDRESS", help="verify on this Dask scheduler's workers (pip install 'encfs[dask]')")
    sp.add_argument("--json", action="store_true", help="one JSON object per file: path, ok, error, reason")
    sp.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    sp.set_defaults(func=cmd_verify)

    sp = sub.add_parser("doctor", parents=[common], help="which cipher backend is active; whether memory locking works")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_doctor)

    from . import agent  # noqa: PLC0415

    sp = sub.add_parser("agent", parents=[common], help="the host's KMS key agent: start, serve, stop, clear, status")
    agent.add_arguments(sp)
    sp.set_defaults(func=agent.cli)

    from . import audit  # noqa: PLC0415

    audit.add_subcommand(sub, parents=[common])

    from . import manifest  # noqa: PLC0415

    manifest.add_subcommand(sub, parents=[common], storage_parents=[common, storage])

    sp = sub.add_parser("revoke", parents=[common, storage], help="remove a recipient from every file under prefixes that has it")
    keys(sp, identity=True)
    sp.add_argument("recipient", metavar="RECIPIENT", help="the recipient: reference, key file, 'type:keyid' or key id")
    sp.add_argument("paths", nargs="+", metavar="PREFIX", help="directories or object-store prefixes")
    bulk_options(sp, "revoke")
    sp.set_defaults(func=cmd_revoke)

    sp = sub.add_parser("reencrypt", parents=[common, storage], help="give every file under prefixes a new file key (re-encrypt, verified, journaled)")
    keys(sp, recipient=True, identity=True)
    sp.add_argument("paths", nargs="+", metavar="PREFIX", help="directories or object-store prefixes of encrypted files")
    bulk_options(sp, "reencrypt")
    sp.set_defaults(func=cmd_reencrypt)

    sp = sub.add_parser("status", parents=[common, storage], help="list objects under prefixes that are not encrypted (reads 8 bytes of each)")
    sp.add_argument("paths", nargs="+", metavar="PREFIX")
    sp.add_argument("--all", action="store_true", help="list encrypted objects too")
    sp.add_argument("--json", action="store_true", help="one JSON object per object listed")
    sp.set_defaults(func=cmd_status)

    sp = sub.add_parser(
        "migrate", parents=[common, storage],
        help="copy a prefix into another: encrypt (into encfs::DST), re-encrypt, or decrypt out; resumable, verified, never touching SRC",
    )
    keys(sp, recipient=True, identity=True)
    sp.add_argument("--src-key", action="append", default=[], help="decrypt an encfs:: SRC with this reference (default: -k/-i)")
    bulk_options(sp, "migrate")
    sp.add_argument("--include", action="append", default=[], metavar="GLOB", help="only paths (relative to SRC) matching a glob (repeatable)")
    sp.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="skip paths matching a glob (repeatable)")
    sp.add_argument("--dry-run", action="store_true", help="say what would be copied, checked and skipped; write nothing")
    sp.add_argument("src", metavar="SRC", help="a file or prefix: path or fsspec URL (encfs::URL if it is encrypted)")
    sp.add_argument("dst", metavar="DST", help="where the copies go (encfs::URL to encrypt them)")
    sp.set_defaults(func=cmd_migrate)
    return p


def bulk_options(sp: argparse.ArgumentParser, name: str) -> None:
    """The options every bulk operation over a prefix takes."""
    sp.add_argument("-j", "--jobs", type=int, default=4, help="objects in flight at once (default 4)")
    sp.add_argument("--journal", default=None, metavar="PATH", help=f"the {name} journal (default: one per SRC and DST under ~/.local/state/encfs/journals)")
    sp.add_argument("--dask", default=None, metavar="ADDRESS", help="run the per-object tasks on this Dask scheduler (pip install 'encfs[dask]')")
    sp.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    sp.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


_API_WORDS = (
    ("pass key= or recipients=", "pass -k or -r"),
    ("allow_plaintext=True (storage_options={'encfs': {'allow_plaintext': True}})", "--allow-plaintext (allow_plaintext=True in code)"),
    ("key=", "-k"), ("recipients=", "-r"), ("identities=", "-i"),
)


def cli_words(message: str) -> str:
    """A library error in the command's words: flags (-k/-r/-i), not keyword arguments."""
    import re  # noqa: PLC0415

    for api, flag in _API_WORDS:
        if api.endswith("=") and api[0].isalpha():
            message = re.sub(rf"(?<![\w-]){re.escape(api)}(?![\w'\"])", flag, message)
        else:
            message = message.replace(api, flag)
    if "configured keys are none" in message and "-k" not in message:
        message = message.replace("configured keys are none", "configured keys are none (pass -k or -i)")
    return message


_STORAGE_MODULES = frozenset({"botocore", "aiobotocore", "boto3", "s3fs", "gcsfs", "adlfs", "aiohttp", "requests", "urllib3", "google", "azure"})
"""Where errors that are the storage's, not encfs's, come from: shown as one line too."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def _stdout_is_pipe() -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(sys.stdout.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI. Every error is one line ``encfs: error: ...`` and exit status 1 (130 on
    Ctrl-C); ``--debug`` shows the traceback instead. Messages never carry key material."""
    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    try:
        args.storage_options = storage_options(getattr(args, "storage_option", None) or [], getattr(args, "endpoint_url", None))
        for attr, flag in (("key", "-k"), ("recipient", "-r"), ("identity", "-i")):
            if isinstance(getattr(args, attr, None), list):
                setattr(args, attr, key_refs(getattr(args, attr), flag))
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("encfs: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError as e:
        if not _stdout_is_pipe():
            print(f"encfs: error: {cli_words(_one_line(e))}", file=sys.stderr)
            return 1
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's flush cannot fail again
        return 141  # the reader of stdout stopped early (``| head``): quiet, as cat is
    except (EncfsError, OSError) as e:
        if debug:
            traceback.print_exc()
        print(f"encfs: error: {cli_words(_one_line(e))}", file=sys.stderr)
        return 1
    except Exception as e:
        if debug:
            raise
        if type(e).__module__.split(".")[0] in _STORAGE_MODULES:  # credentials, endpoints, networks
            print(f"encfs: error: storage: {type(e).__name__}: {_one_line(e)} (run with --debug for a traceback)", file=sys.stderr)
            return 1
        print(f"encfs: error: unexpected {type(e).__name__}: {_one_line(e)} (run with --debug for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
