"""One encrypted file per sample (an image folder, say), decoded by a user function.

``dataset[i]`` decrypts file ``i`` into locked memory and passes a read-only memoryview of it
to ``decode``; the plaintext is wiped as soon as ``decode`` returns, so ``decode`` must copy
what it keeps (``bytes(view)``, ``np.frombuffer(view, ...).copy()``, a decoded image, ...).
``__getitems__`` reads a batch of files into one locked buffer, one ``read_chunks`` call per
file.

Threads or processes: ``EncryptedLoader`` reads this dataset on threads of the main process by
default (``loading = "threads"``): measured 2.4-4.2x faster than 2 worker processes for shuffled
150 KB files, batch 64, on 2 cores (benchmarks/RESULTS.md, "Loaders"). In a loop that only
loads, reading in the main process without threads (``num_workers=0``) was faster still in
most runs (threads at 0.75-1.03x of it), but it cannot read ahead while the loop trains.
Worker processes remain the choice for a ``decode`` that holds the GIL for long.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Iterable, Sequence

from .batch import Batch, read_batch
from .shards import ShardSet


def as_bytes(view: memoryview) -> bytes:
    """The default ``decode``: a copy of the file's plaintext."""
    return bytes(view)


class EncryptedFileDataset:
    """The files of ``urls`` (``encfs::`` URLs, globs, brace ranges), one item each:
    ``decode(view)`` of its plaintext. ``decode`` must be picklable (a module-level function)
    for spawn and forkserver workers."""

    loading = "threads"
    """How ``EncryptedLoader`` reads this dataset unless told otherwise (threads, not processes)."""

    def __init__(
        self, urls: str | Iterable[str], decode: Callable[[memoryview], Any] = as_bytes, storage_options: dict | None = None, *,
        worker_threads: int | None = 1, manifest: Any = None,
    ):
        self.shards = ShardSet(urls, storage_options, worker_threads=worker_threads, manifest=manifest)
        self.decode = decode

    def __len__(self) -> int:
        return len(self.shards)

    def _samples(self, indices: Sequence[int]) -> list[tuple[int, int, int]]:
        n = len(self.shards)
        out = []
        for i in map(operator.index, indices):
            if not -n <= i < n:
                raise IndexError(f"sample {i} outside 0..{n - 1}")
            out.append((i % n, 0, self.shards.size(i % n)))
        return out

    def _decoded(self, batch: Batch) -> list[Any]:
        with batch:
            return [self.decode(view.toreadonly()) for view in batch]

    def __getitem__(self, i: int) -> Any:
        return self._decoded(read_batch(self.shards, self._samples([i])))[0]

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        return self._decoded(read_batch(self.shards, self._samples(indices)))

    def close(self) -> None:
        """Close this process's open files (they reopen on next use)."""
        self.shards.close()
