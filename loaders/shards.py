"""``ShardSet``: the encrypted files of a dataset, opened afresh in every process.

A dataset is a list of ``encfs::`` URLs (globs and brace ranges such as
``encfs::s3://bucket/train/shard-{00000..00127}.bin`` are expanded once, when the set is
made) plus ``storage_options``. What crosses process boundaries (pickling into spawn or
forkserver workers) is only that: URLs, key *references* and the authenticated sizes, never
key bytes, open files or filesystem instances. A plain URL (``file://``, ``s3://``) is read by
the same code without decryption (``PlainReader``): the plaintext baseline of a benchmark.

Each process builds its own filesystem and chunk readers on first use (``forking.ForkLocal``),
with ``skip_instance_cache`` set for every filesystem of the URL chain. A forked DataLoader
worker therefore never touches its parent's target filesystem: s3fs refuses that ("This class
is not fork-safe"), and a local descriptor's offset or an HTTP session must not be shared.

Threads in workers: in a DataLoader worker process the first use sets ``ENCFS_THREADS=1``
(unless the variable is already set), so that the workers, not the threads inside each of
them, share the cores (``worker_threads=None`` leaves the variable alone; a value the user
set is kept). ``limit_worker_threads`` is the same as a ``worker_init_fn``. Caveat: encfs makes
its cipher backend once per process and reads the variable then, so this takes effect in
spawn and forkserver workers, but a fork worker whose parent had already read encrypted data
(making a ``ShardSet`` does) inherits the parent's backend and its thread count.

Making a ``ShardSet`` opens each file once (header and final chunk authenticated, size
recorded) and closes it again, so a parent that only hands the set to workers holds no open
files or file keys; each process then opens a file on its first read of it, and keeps it open.

``manifest=`` (docs/MANIFESTS.md): the set is checked against a signed dataset manifest when
it is made (signature, minimum version, no file outside the manifest, none that a glob should
match missing), and every open of a file, in every process, compares its authenticated file
id, key commitment and size with the manifest's entry (``ManifestError`` before any byte of it
is returned). Only the entries of the set's files travel to workers, not the signature.
"""

from __future__ import annotations

import bisect
import io
import operator
import os
import re
import sys
import threading
from typing import Any, BinaryIO, Iterable, Sequence

from fsspec.core import split_protocol, url_to_fs

from encfs.cobblestone import CHUNK_SIZE
from encfs.errors import FileChangedError, FormatError, with_path
from encfs.forking import ForkLocal
from encfs.reader import ChunkReader
from encfs.sink import is_local

THREADS_VARIABLE = "ENCFS_THREADS"

_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_ALTERNATIVES = re.compile(r"\{([^{}]*,[^{}]*)\}")
_MAGIC = re.compile(r"[*?\[]")


def expand_braces(pattern: str) -> list[str]:
    """``{00000..00009}`` (zero-padded to the first bound's width) and ``{a,b}`` expanded, in order."""
    m = _RANGE.search(pattern)
    if m:
        lo, hi = m.group(1), m.group(2)
        width = len(lo) if lo.startswith("0") else 0
        step = 1 if int(hi) >= int(lo) else -1
        head, tail = pattern[: m.start()], pattern[m.end() :]
        return [s for n in range(int(lo), int(hi) + step, step) for s in expand_braces(f"{head}{n:0{width}d}{tail}")]
    m = _ALTERNATIVES.search(pattern)
    if m:
        head, tail = pattern[: m.start()], pattern[m.end() :]
        return [s for alt in m.group(1).split(",") for s in expand_braces(head + alt + tail)]
    return [pattern]


def in_worker_process() -> bool:
    """Whether this is a torch DataLoader worker process (torch is never imported for this)."""
    data = sys.modules.get("torch.utils.data")
    return data is not None and data.get_worker_info() is not None


def limit_worker_threads(worker_id: int = 0, threads: int = 1) -> None:
    """A DataLoader ``worker_init_fn``: ``ENCFS_THREADS`` set to ``threads`` in the worker
    unless the user set it. ``ShardSet`` does the same on first use; this helper runs earlier,
    before anything in the worker reads data."""
    os.environ.setdefault(THREADS_VARIABLE, str(threads))


def _fresh_options(url: str, storage_options: dict) -> dict:
    """``storage_options`` with ``skip_instance_cache`` for every protocol of ``url``'s chain:
    this process gets filesystem instances of its own, never one made before a fork."""
    opts = {k: (dict(v) if isinstance(v, dict) else v) for k, v in storage_options.items()}
    for protocol in _chain(url):
        level = opts.get(protocol)
        if level is None or isinstance(level, dict):
            opts[protocol] = {**(level or {}), "skip_instance_cache": True}
    return opts


def _chain(url: str) -> list[str]:
    """The protocols of a chained URL, outermost first (``encfs::s3://b/k`` -> encfs, s3)."""
    parts = url.split("::")
    return [split_protocol(part)[0] or (part if i == 0 and len(parts) > 1 else "file") for i, part in enumerate(parts)]


class PlainReader:
    """A plaintext file behind ``ChunkReader``'s interface (``size``, ``read_chunks``), so a
    plaintext baseline (a ``file://`` or ``s3://`` URL) or an ``allow_plaintext`` file is read
    by the same code: positional reads on a local descriptor, else seek + read under a lock.
    Nothing is authenticated: a short file is a FormatError, never a short read."""

    header_length = 0

    def __init__(self, raw: BinaryIO, name: str):
        self.name = name
        self._raw = raw
        self._lock = threading.Lock()
        try:
            self._fd: int | None = raw.fileno()
        except (AttributeError, OSError, io.UnsupportedOperation):
            self._fd = None
        self.size = os.fstat(self._fd).st_size if self._fd is not None else raw.seek(0, io.SEEK_END)

    def read_chunks(self, first: int, count: int, out: memoryview) -> int:
        """Bytes of chunks ``first..first+count-1`` (16 KiB each) into ``out``; how many."""
        start = first * CHUNK_SIZE
        view = memoryview(out)[: max(0, min(count * CHUNK_SIZE, self.size - start))]
        got = 0
        if self._fd is not None:
            while got < len(view) and (n := os.preadv(self._fd, [view[got:]], start + got)):
                got += n
        else:
            with self._lock:
                self._raw.seek(start)
                while got < len(view) and (n := self._raw.readinto(view[got:]) or 0):
                    got += n
        if got != len(view):
            raise with_path(FormatError(f"file shrank while reading (ends at {start + got})"), self.name)
        return got

    def close(self) -> None:
        self._raw.close()


class _Process:
    """One process's filesystem and open chunk readers (made lazily, one reader per shard)."""

    def __init__(self, url: str, storage_options: dict, worker_threads: int | None):
        if worker_threads is not None and in_worker_process():
            limit_worker_threads(threads=worker_threads)
        self.fs, _ = url_to_fs(url, **_fresh_options(url, storage_options))
        self.readers: dict[int, ChunkReader | PlainReader] = {}
        self.lock = threading.Lock()

    def open(self, path: str) -> ChunkReader | PlainReader:
        """The reader of ``path``: a chunk reader on ``encfs::``, else (plaintext baselines,
        ``allow_plaintext`` files) the file behind the same interface."""
        if hasattr(self.fs, "open_reader"):
            r = self.fs.open_reader(path)
            return r if isinstance(r, ChunkReader) else PlainReader(r, path)
        return PlainReader(self.fs.open(path, "rb") if is_local(self.fs) else self.fs.open(path, "rb", cache_type="none"), path)

    def close(self) -> None:
        with self.lock:
            readers, self.readers = list(self.readers.values()), {}
        for r in readers:
            r.close()


class ShardSet:
    """The encrypted files of a dataset, with their authenticated plaintext sizes.

    ``urls``: one URL or several, each an ``encfs::`` URL, glob or brace range; all on one
    filesystem (one protocol chain and one set of ``storage_options``). Globs are sorted;
    the order of ``urls`` is kept otherwise. Making the set opens every file once: a file that
    is truncated, tampered with in its header or final chunk, or needs a key that is not
    configured fails here, with an error that names it.
    """

    def __init__(self, urls: str | Iterable[str], storage_options: dict | None = None, *, worker_threads: int | None = 1, manifest: Any = None):
        self.storage_options: dict = dict(storage_options or {})
        self.worker_threads = worker_threads
        self.expected: Any = None
        """``encfs.manifest.ShardCheck`` of ``manifest=``: every open is checked against it."""
        self._globs: list[str] = []
        self.urls, self.paths = self._expand([urls] if isinstance(urls, str) else list(urls))
        if not self.paths:
            raise ValueError(f"no files match {urls!r}")
        self._proc: ForkLocal[_Process] = ForkLocal(self._make_process)
        if manifest is not None:
            from encfs.manifest import for_shards

            self.expected = for_shards(manifest, self.fs, self.paths, self._globs)
        self.sizes: list[int] = [self.reader(k).size for k in range(len(self.paths))]
        self.close()

    def _expand(self, patterns: Sequence[str]) -> tuple[list[str], list[str]]:
        urls: list[str] = []
        paths: list[str] = []
        chain: list[str] | None = None
        for pattern in patterns:
            for url in expand_braces(pattern):
                fs, path = url_to_fs(url, **self.storage_options)
                if chain is None:
                    chain = _chain(url)
                elif _chain(url) != chain:
                    raise ValueError(f"{url}: every shard must be on the same filesystem with the same options as {urls[0]}")
                found = sorted(fs.glob(path)) if _MAGIC.search(path) else [path]
                if _MAGIC.search(path):
                    self._globs.append(path)
                if not found:
                    raise FileNotFoundError(f"no files match {url}")
                for p in found:
                    urls.append(fs.unstrip_protocol(p) if _MAGIC.search(path) else url)
                    paths.append(p)
        return urls, paths

    def _make_process(self) -> _Process:
        return _Process(self.urls[0], self.storage_options, self.worker_threads)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def fs(self) -> Any:
        """This process's ``EncFileSystem``."""
        return self._proc.get().fs

    def size(self, k: int) -> int:
        """Plaintext bytes of shard ``k``; authenticated for encrypted files (their final chunk
        was verified when the set was made)."""
        return self.sizes[k]

    def reader(self, k: int) -> ChunkReader | PlainReader:
        """This process's open chunk reader of shard ``k`` (opened on first use; thread-safe)."""
        proc = self._proc.get()
        r = proc.readers.get(k)
        if r is not None:
            return r
        with proc.lock:
            r = proc.readers.get(k)
            if r is None:
                try:
                    r = proc.open(self.paths[k])
                except FileNotFoundError:
                    if getattr(self, "expected", None) is None:
                        raise
                    from encfs.manifest import ManifestError

                    raise ManifestError(self.paths[k], "missing", "in the manifest but not in storage") from None
                self.check_opened(k, r)
                sizes = getattr(self, "sizes", None)
                if sizes is not None and r.size != sizes[k]:
                    r.close()
                    raise with_path(FileChangedError(f"plaintext size is now {r.size}, was {sizes[k]} when the dataset was made"), self.paths[k])
                proc.readers[k] = r
        return r

    def check_opened(self, k: int, reader: Any) -> None:
        """With ``manifest=``: ``ManifestError`` (reader closed) unless the just-opened file
        ``k`` is the one the manifest records; nothing otherwise."""
        expected = getattr(self, "expected", None)
        if expected is not None:
            try:
                expected.check(k, reader, self.paths[k])
            except BaseException:
                reader.close()
                raise

    def read_chunks(self, k: int, first: int, count: int, out: memoryview) -> int:
        """Decrypt chunks ``first..first+count-1`` of shard ``k`` into ``out`` (one call)."""
        return self.reader(k).read_chunks(first, count, out)

    def close(self) -> None:
        """Close this process's readers (they reopen on next use)."""
        proc = self._proc.peek()
        if proc is not None:
            proc.close()

    def __getstate__(self) -> dict:
        return {
            "urls": self.urls, "paths": self.paths, "storage_options": self.storage_options, "sizes": self.sizes,
            "worker_threads": self.worker_threads, "expected": self.expected,
        }

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._proc = ForkLocal(self._make_process)

    def __repr__(self) -> str:
        return f"<ShardSet {len(self.paths)} files, first {self.urls[0]!r}>"



class SampleIndex:
    """Global sample index -> (shard, index inside the shard), from per-shard counts."""

    def __init__(self, counts: Sequence[int]):
        self.counts = [int(c) for c in counts]
        self.starts: list[int] = []
        total = 0
        for c in self.counts:
            self.starts.append(total)
            total += c
        self.total = total

    def locate(self, i: int) -> tuple[int, int]:
        """(shard, local index) of sample ``i``; negative ``i`` counts from the end; IndexError outside."""
        i = operator.index(i)
        if not -self.total <= i < self.total:
            raise IndexError(f"sample {i} outside 0..{self.total - 1}")
        i %= self.total
        k = bisect.bisect_right(self.starts, i) - 1
        while self.counts[k] == 0:  # bisect lands on the last of several shards starting at i
            k -= 1
        return k, i - self.starts[k]
