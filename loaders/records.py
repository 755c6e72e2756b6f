"""Fixed-size records in encrypted files, as a PyTorch map-style Dataset.

An item is read by plaintext range: only the chunks under it are fetched and decrypted (at
most the record plus two partial chunks), into locked memory; the item is a tensor over that
memory, wiped when the last reference to it goes. ``__getitems__`` (which torch's DataLoader
calls with a whole batch of indices) reads the batch as one packed locked buffer, with one
``read_chunks`` call per run of touching chunks (``batch.read_records``), and the items are
views of it. ``collate_locked`` hands that packed buffer on as the batch tensor without a
copy (in the main process; see its docstring for worker processes).

The dataset pickles by URL and key reference (``ShardSet``), never key bytes; each process
opens its own files.

Threads or processes: ``EncryptedLoader`` reads these datasets on threads of the main process
by default (``loading = "threads"``): measured faster than worker processes for shuffled
150 KB records (benchmarks/RESULTS.md, "Loaders"), and no batch crosses shared memory.
Batch buffers come from the per-process pool (``loaders.pool``) and go back to it, wiped,
once the batch tensor and its items are garbage.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Iterable, Sequence

import numpy as np

from .batch import RecordBatch, Sample, read_records, torch_dtype
from .shards import SampleIndex, ShardSet


class SampleList(list):
    """The items of one ``__getitems__`` call (a list, as torch's collate expects), with the
    packed ``RecordBatch`` they are views of as ``.batch``."""

    batch: RecordBatch


class RecordShards:
    """Records of one shape and dtype stored back to back in shards, after a per-shard
    ``base`` offset: the part of the record and ``.npy`` datasets that reads them."""

    shards: ShardSet
    record_shape: tuple[int, ...]
    dtype: np.dtype
    record_bytes: int
    bases: list[int]
    index: SampleIndex
    loading = "threads"
    """How ``EncryptedLoader`` reads this dataset unless told otherwise (threads, not processes)."""

    def __len__(self) -> int:
        return self.index.total

    @property
    def shard_sizes(self) -> list[int]:
        """Records per shard, in index order: ``EpochOrder`` shuffles shards, then records
        within windows, so reads stay mostly sequential within a shard."""
        return list(self.index.counts)

    def sample(self, i: int) -> Sample:
        """(shard, plaintext start, length) of item ``i``."""
        k, j = self.index.locate(i)
        return k, self.bases[k] + j * self.record_bytes, self.record_bytes

    def read(self, indices: Sequence[int]) -> RecordBatch:
        """Items ``indices`` as one packed locked batch (``batch.read_records``)."""
        return read_records(self.shards, [self.sample(i) for i in indices], self.record_shape, self.dtype)

    @functools.cached_property
    def tensors(self) -> bool:
        """Whether items are torch tensors (torch is importable and has this dtype), else NumPy."""
        return torch_dtype(self.dtype) is not None

    def __getitem__(self, i: int) -> Any:
        """Item ``i``: a tensor (else a NumPy array) over locked memory."""
        batch = self.read([i])
        return batch.tensor[0] if self.tensors else batch.array[0]

    def __getitems__(self, indices: Sequence[int]) -> SampleList:
        """Items ``indices``, read together (one ``read_chunks`` call per run of chunks)."""
        batch = self.read(indices)
        items = SampleList(batch.tensor.unbind(0) if self.tensors else list(batch.array))
        items.batch = batch
        return items

    def close(self) -> None:
        """Close this process's open files (they reopen on next use)."""
        self.shards.close()


class EncryptedRecordDataset(RecordShards):
    """Records of ``record_shape`` x ``dtype`` packed back to back in each file of ``urls``.

    ``urls`` are ``encfs::`` URLs, globs or brace ranges (``ShardSet``);
    ``storage_options`` go to fsspec (e.g. ``{"encfs": {"key": "keyfile:..."}}``).
    ``backend`` (``"auto"``, ``"native"``, ``"python"``) is the cipher backend, unless the
    options or ``ENCFS_BACKEND`` name one. The default, ``"native"`` where the extension is
    built, keeps every decrypt in C with the GIL released, which is what lets loader threads
    run in parallel (``auto`` sends the 10-chunk runs of 150 KB records to pyca/cryptography,
    which holds the GIL: two threads were slower than one).
    Items are ``torch.Tensor`` when torch is importable (and has the dtype), else ``numpy.ndarray``.
    """

    def __init__(
        self,
        urls: str | Iterable[str],
        record_shape: tuple[int, ...],
        dtype: Any = np.float32,
        storage_options: dict | None = None,
        *,
        worker_threads: int | None = 1,
        backend: str | None = "default",
        manifest: Any = None,
    ):
        first = urls if isinstance(urls, str) else next(iter(urls := list(urls)), "")
        if not first.startswith("encfs"):  # a plaintext baseline has no cipher
            backend = None
        self.shards = ShardSet(urls, with_backend(storage_options, backend), worker_threads=worker_threads, manifest=manifest)
        self.dtype = np.dtype(dtype)
        self.record_shape = tuple(int(d) for d in record_shape)
        self.record_bytes = int(np.prod(self.record_shape, dtype=np.int64)) * self.dtype.itemsize
        if self.record_bytes <= 0:
            raise ValueError("records must be at least one byte")
        bad = [k for k in range(len(self.shards)) if self.shards.size(k) % self.record_bytes]
        if bad:
            raise ValueError(f"{self.shards.paths[bad[0]]}: size is not a multiple of the {self.record_bytes}-byte record")
        self.bases = [0] * len(self.shards)
        self.index = SampleIndex([self.shards.size(k) // self.record_bytes for k in range(len(self.shards))])


def with_backend(storage_options: dict | None, backend: str | None) -> dict | None:
    """``storage_options`` with the encfs cipher ``backend`` added, unless None or already named
    (``"default"``: native when built and ``ENCFS_BACKEND`` is unset, else nothing added)."""
    if backend == "default":
        from encfs import env
        from encfs.backend import native_backend

        backend = "native" if os.environ.get(env.BACKEND) is None and native_backend() is not None else None
    if backend is None:
        return storage_options
    opts = dict(storage_options or {})
    level = dict(opts.get("encfs") or {})
    level.setdefault("backend", backend)
    opts["encfs"] = level
    return opts


def collate_locked(items: Any) -> Any:
    """A DataLoader ``collate_fn`` for record and ``.npy`` datasets: the batch tensor over the
    packed locked buffer that ``__getitems__`` read (no further copy), wiped when the tensor
    is garbage (and its buffer then reused by a later batch). In the main process, on its
    own or on ``EncryptedLoader`` threads, that is the whole story. In a worker process (or for items that are not one ``__getitems__`` result)
    it falls back to torch's ``default_collate``, which stacks into the shared memory that
    carries the batch to the main process (ordinary memory, not wiped by encfs); the locked
    buffer is then wiped as soon as the items are dropped."""
    from torch.utils.data import default_collate, get_worker_info

    batch = getattr(items, "batch", None)
    if isinstance(batch, RecordBatch) and get_worker_info() is None and len(items) == len(batch) and torch_dtype(batch.array.dtype) is not None:
        return batch.tensor
    return default_collate(items)
