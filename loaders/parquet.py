"""Rows of encrypted Parquet files, as a PyTorch map-style Dataset read by row group.

Each file is handed to ``pyarrow.parquet.ParquetFile`` as a Python file object, ``RangeFile``:
every read of it decrypts exactly the chunks under it, with one ``read_chunks`` call on the
``ShardSet``'s chunk reader of the file (opened once per process). pyarrow reads the footer,
then each column chunk of a row group by its byte range, so reading a row group fetches and
decrypts that row group's column chunks (of ``columns`` only, when given) plus at most the
partial chunks at their ends, not the file. (encfs's own file object would serve the same
reads, but its window and background read-ahead fetch up to 4 MiB past a sequential read:
right for streams, wasted on a reader that already asks for exact ranges.)

``__getitems__`` (which torch's DataLoader calls with a whole batch of indices) groups the
indices by (file, row group) and decodes each row group once per batch. Items are dicts of
column values (``to_pylist``), or ``transform(rows)`` of a one-row ``pyarrow.RecordBatch``.
``shard_sizes`` are the rows per row group, so ``EpochOrder(dataset)`` shuffles within windows
of about one row group and a batch touches few of them.

Reading through a file object with ``pre_buffer=False`` and ``use_threads=False`` keeps pyarrow
from calling into Python from its own threads: the README's known issue (an abort at exit
after ``read_table`` through a Python filesystem) is not met on this path. Each process opens
its own files on first use (fork, spawn, forkserver, S3), and one file is read by one thread
at a time. Decoded values are ordinary memory (pyarrow buffers, Python objects), not wiped.

Threads or processes: ``EncryptedLoader`` reads this dataset on threads of the main process by
default (``loading = "threads"``): measured 1.2-2.2x faster than 2 worker processes for
shuffled rows, batch 64, on 2 cores (benchmarks/RESULTS.md, "Loaders"). In a loop that only
loads, reading in the main process without threads (``num_workers=0``) was faster in most
runs (threads at 0.68-1.22x of it: threads reading one file take turns on its lock, and
``to_pylist`` holds the GIL), but it cannot read ahead while the loop trains. A ``transform``
that holds the GIL for long favours ``num_workers=N``.
"""

from __future__ import annotations

import io
import threading
from contextlib import closing
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from encfs.cobblestone import CHUNK_SIZE
from encfs.errors import naming
from encfs.forking import ForkLocal
from encfs.fresh_bytes import fresh_bytes
from encfs.securemem import SecureBuffer, cleanse

from .shards import SampleIndex, ShardSet

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

__all__ = ["EncryptedParquetDataset", "RangeFile"]


class RangeFile(io.RawIOBase):
    """File ``k`` of ``shards`` as a seekable read-only file object whose every read decrypts
    exactly the chunks under it (one ``read_chunks`` call), for readers that ask for exact
    ranges. Unaligned reads go through a locked scratch buffer, wiped after the copy; ``read``
    decrypts straight into the ``bytes`` it returns when aligned. One thread at a time."""

    def __init__(self, shards: ShardSet, k: int):
        self.shards, self.k = shards, k
        self.size = shards.size(k)
        self.name = shards.paths[k]
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        n = max(0, self.size - self._pos)
        n = n if size is None or size < 0 else min(size, n)
        if n == 0:
            return b""
        out, view = fresh_bytes(n)
        try:
            self._read_at(self._pos, view)
        except BaseException:
            cleanse(view)
            raise
        finally:
            view.release()
        self._pos += n
        return out if isinstance(out, bytes) else bytes(out)

    readall = read

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        n = max(0, min(len(view), self.size - self._pos))
        if n:
            self._read_at(self._pos, view[:n])
            self._pos += n
        return n

    def _read_at(self, pos: int, out: memoryview) -> None:
        first, last = pos // CHUNK_SIZE, (pos + len(out) - 1) // CHUNK_SIZE
        head = pos - first * CHUNK_SIZE
        span = min((last + 1) * CHUNK_SIZE, self.size) - first * CHUNK_SIZE
        if head == 0 and len(out) == span:  # whole chunks: straight into ``out``
            self.shards.read_chunks(self.k, first, last - first + 1, out)
            return
        with SecureBuffer(span) as scratch:
            whole = memoryview(scratch)
            try:
                self.shards.read_chunks(self.k, first, last - first + 1, whole)
                out[:] = whole[head : head + len(out)]
            finally:
                whole.release()


class _OpenFile:
    """One process's open file and its ``ParquetFile``, read by one thread at a time."""

    def __init__(self, raw: RangeFile, parquet: pq.ParquetFile):
        self.raw, self.parquet, self.lock = raw, parquet, threading.Lock()


class EncryptedParquetDataset:
    """The rows of the Parquet files of ``urls`` (``encfs::`` URLs, globs, brace ranges), in
    file order; ``columns`` selects columns (default: all). The files must share one schema.
    ``transform`` must be picklable (a module-level function) for spawn and forkserver workers.
    """

    loading = "threads"
    """How ``EncryptedLoader`` reads this dataset unless told otherwise (threads, not processes)."""

    def __init__(
        self,
        urls: str | Iterable[str],
        columns: Sequence[str] | None = None,
        transform: Callable[[pa.RecordBatch], Any] | None = None,
        storage_options: dict | None = None,
        *,
        worker_threads: int | None = 1,
        manifest: Any = None,
    ) -> None:
        self.shards = ShardSet(urls, storage_options, worker_threads=worker_threads, manifest=manifest)
        self.columns = None if columns is None else list(columns)
        self.transform = transform
        self.groups: list[tuple[int, int]] = []
        """(file, row group) of each row group, in index order."""
        counts: list[int] = []
        schema = None
        for k in range(len(self.shards)):
            with naming(self.shards.paths[k]), closing(RangeFile(self.shards, k)) as f:
                meta = self._parquet(f).metadata
            if schema is None:
                schema = meta.schema
            elif not meta.schema.equals(schema):
                raise ValueError(f"{self.shards.paths[k]}: schema differs from {self.shards.paths[0]}'s")
            for g in range(meta.num_row_groups):
                self.groups.append((k, g))
                counts.append(meta.row_group(g).num_rows)
        self.index = SampleIndex(counts)
        self._open: ForkLocal[dict[int, _OpenFile]] = ForkLocal(dict)
        self._open_lock: ForkLocal[threading.Lock] = ForkLocal(threading.Lock)
        self.close()

    @staticmethod
    def _parquet(f: Any) -> pq.ParquetFile:
        import pyarrow.parquet as pq

        return pq.ParquetFile(f, pre_buffer=False)

    @property
    def shard_sizes(self) -> list[int]:
        """Rows per row group (for ``EpochOrder``: shuffle windows of about one row group)."""
        return list(self.index.counts)

    def __len__(self) -> int:
        return self.index.total

    def _file(self, k: int) -> _OpenFile:
        files = self._open.get()
        f = files.get(k)
        if f is None:
            with self._open_lock.get():
                f = files.get(k)
                if f is None:
                    raw = RangeFile(self.shards, k)
                    with naming(self.shards.paths[k]):
                        f = files[k] = _OpenFile(raw, self._parquet(raw))
        return f

    def read_row_group(self, group: int) -> pa.Table:
        """Row group ``group`` (in index order, across files) of ``columns``, read by its ranges."""
        k, g = self.groups[group]
        f = self._file(k)
        with f.lock, naming(self.shards.paths[k]):
            return f.parquet.read_row_group(g, columns=self.columns, use_threads=False)

    def __getitem__(self, i: int) -> Any:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """Items ``indices``, each row group among them read and decoded once."""
        located = [self.index.locate(i) for i in indices]
        by_group: dict[int, list[int]] = {}
        for pos, (group, _) in enumerate(located):
            by_group.setdefault(group, []).append(pos)
        out: list[Any] = [None] * len(located)
        for group, positions in by_group.items():
            table = self.read_row_group(group)
            rows = [located[p][1] for p in positions]
            if self.transform is None:
                items = table.take(rows).to_pylist()
            else:
                batch = table.combine_chunks().to_batches()[0]
                items = [self.transform(batch.slice(r, 1)) for r in rows]
            for p, item in zip(positions, items):
                out[p] = item
        return out

    def close(self) -> None:
        """Close this process's open files (they reopen on next use)."""
        files = self._open.peek()
        if files:
            files.clear()
        self.shards.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_open"], state["_open_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open = ForkLocal(dict)
        self._open_lock = ForkLocal(threading.Lock)
