"""Batches decrypted straight into locked memory, one ``read_chunks`` call per run of chunks.

``read_batch(shards, samples)`` takes samples as ``(shard index, plaintext start, length)``,
groups them by shard and by chunk range (samples whose chunks overlap or touch form one
run), decrypts each run with one ``ChunkReader.read_chunks`` call into a region of a single
``SecureBuffer`` (locked, kept out of core dumps, wiped on release), and returns a ``Batch``
whose samples are memoryviews into that buffer. Chunks between two runs are never read.

``read_records`` does the same for fixed-size records and packs them into one locked buffer
laid out as the batch tensor (``torch.frombuffer`` over it): when the batch is exactly one
run in order, the tensor is a view of the decrypted run (no copy); otherwise each record is
copied once, from the decrypted run (in a small locked scratch buffer, reused for every
run and wiped at the end) into the packed buffer.

Buffers come from this process's ``pool.BufferPool``: a buffer is mapped and locked once and
reused by later batches, wiped in between, and never reused while a view of it is alive.

Plaintext lifetime. A ``Batch``/``RecordBatch`` owns its buffer: ``close()`` (or leaving its
``with`` block) wipes it, and views or tensors made from it read zeros from then on; a batch
whose views (items, the batch tensor) are all garbage is wiped then, and its buffer goes back
to the pool. What stays outside locked memory, and is not
wiped by encfs: copies torch makes (``torch.stack`` in the default collate, ``.clone()``,
``.to(device)``, a ``pin_memory`` copy, the output of a transform) and, with DataLoader worker
processes, the shared-memory segment through which each collated batch travels to the main
process (torch allocates and frees it; its pages are ordinary, unlocked memory).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from encfs.cobblestone import CHUNK_SIZE
from encfs.remote import run_all
from encfs.securemem import SecureBuffer

from .pool import Lease, pool
from .shards import ShardSet

if TYPE_CHECKING:
    from typing_extensions import Self

Sample = tuple[int, int, int]
"""(shard index, plaintext start, length in bytes)."""


@dataclass
class Run:
    """Chunks ``first..first+count-1`` of shard ``shard``, decrypted to ``offset`` in the batch
    buffer; ``members`` are (sample position, start inside the run, length)."""

    shard: int
    first: int
    count: int
    offset: int = 0
    members: list[tuple[int, int, int]] = field(default_factory=list)


def plan_runs(shards: ShardSet, samples: Sequence[Sample]) -> list[Run]:
    """Runs of chunks covering ``samples``: grouped by shard, merged where chunk ranges
    overlap or touch, in file order. Samples must lie inside their shard (ValueError)."""
    for s, (k, start, length) in enumerate(samples):
        if not (0 <= k < len(shards)) or start < 0 or length < 0 or start + length > shards.size(k):
            raise ValueError(f"sample {s} ({start}+{length}) outside shard {k}")
    order = sorted((s for s in range(len(samples)) if samples[s][2] > 0), key=lambda s: (samples[s][0], samples[s][1]))
    runs: list[Run] = []
    for s in order:
        k, start, length = samples[s]
        first, last = start // CHUNK_SIZE, (start + length - 1) // CHUNK_SIZE
        run = runs[-1] if runs and runs[-1].shard == k and first <= runs[-1].first + runs[-1].count else None
        if run is None:
            run = Run(k, first, last - first + 1)
            runs.append(run)
        else:
            run.count = max(run.count, last - run.first + 1)
        run.members.append((s, start - run.first * CHUNK_SIZE, length))
    offset = 0
    for run in runs:
        run.offset = offset
        offset += run_bytes(shards, run)
    return runs


def run_bytes(shards: ShardSet, run: Run) -> int:
    """Plaintext bytes of ``run`` (its last chunk may be the shard's short final chunk)."""
    return min(run.count * CHUNK_SIZE, shards.size(run.shard) - run.first * CHUNK_SIZE)


def _decrypt_runs(shards: ShardSet, runs: list[Run]) -> tuple[np.ndarray, Lease]:
    """One pooled buffer holding every run, each filled by one ``read_chunks`` call (on an
    object store, the runs' requests in flight together): the uint8 array over it and its
    lease. Wiped (and back to the pool) if any run fails (an IntegrityError names the file and
    the chunk)."""
    total = sum(run_bytes(shards, r) for r in runs)
    array, lease = pool().lease(total)
    try:
        with memoryview(lease.buffer) as view:
            tasks = [lambda r=r: shards.read_chunks(r.shard, r.first, r.count, view[r.offset : r.offset + run_bytes(shards, r)]) for r in runs]
            remote = any(getattr(shards.reader(k), "remote", False) for k in {r.shard for r in runs})
            run_all(tasks, concurrent=remote)
    except BaseException:
        lease.wipe()
        raise
    return array, lease


def torch_dtype(dtype: np.dtype) -> Any:
    """The torch dtype of NumPy ``dtype``, or None (no torch, or no equivalent)."""
    try:
        import torch

        return torch.from_numpy(np.empty(0, dtype)).dtype
    except (ImportError, TypeError):
        return None


class _OwnsPlaintext:
    """Owner of one pooled locked buffer of plaintext: ``close()`` or the end of a ``with``
    block wipes it (views made from it read zeros from then on); the buffer goes back to the
    pool once no view of it is left."""

    _lease: Lease
    _closed: bool = False

    @property
    def buffer(self) -> SecureBuffer | None:
        """The locked buffer (at least as large as the batch; None once closed)."""
        return self._lease.buffer

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Wipe the plaintext now and drop this object's views of it."""
        self._closed = True
        self._lease.wipe()
        self._drop_views()

    def _drop_views(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Batch(_OwnsPlaintext):
    """Decrypted samples as memoryviews into one locked buffer that this object owns.

    ``batch[i]`` is sample ``i`` in the order asked for. ``close()`` (or the end of a ``with``
    block) wipes the buffer: views taken before then read zeros afterwards."""

    def __init__(self, lease: Lease, views: list[memoryview], runs: list[Run]):
        self._lease = lease
        self.runs = runs
        self._views = views
        self._n = len(views)

    def _drop_views(self) -> None:
        self._views = []

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> memoryview:
        if self._closed:
            raise ValueError("batch is closed")
        return self._views[i]

    def __iter__(self) -> Iterator[memoryview]:
        return (self[i] for i in range(len(self)))

    @property
    def calls(self) -> int:
        """``read_chunks`` calls that filled this batch (one per run)."""
        return len(self.runs)


def read_batch(shards: ShardSet, samples: Sequence[Sample]) -> Batch:
    """Decrypt ``samples`` with one ``read_chunks`` call per run (see ``plan_runs``) into one
    locked buffer; the returned ``Batch`` owns it."""
    runs = plan_runs(shards, samples)
    array, lease = _decrypt_runs(shards, runs)
    whole = memoryview(array)  # views keep ``array`` alive, and with it the buffer out of reuse
    views = [whole[0:0]] * len(samples)
    for r in runs:
        for s, start, length in r.members:
            views[s] = whole[r.offset + start : r.offset + start + length]
    return Batch(lease, views, runs)


class RecordBatch(_OwnsPlaintext):
    """Fixed-size records packed as one array ``(len(samples), *shape)`` in locked memory.

    ``tensor`` (``torch.from_numpy(array)``, when torch is importable) and ``array`` (NumPy) are
    views of ``buffer``; ``copied`` says whether the records were copied once from the decrypted runs
    (False: the batch was exactly one run, in order, and the tensor is that run's memory)."""

    def __init__(self, raw: np.ndarray, lease: Lease, offset: int, n: int, shape: tuple[int, ...], dtype: np.dtype, copied: bool, calls: int):
        self._lease = lease
        self.copied = copied
        self.calls = calls
        nbytes = n * int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        self.array: Any = raw[offset : offset + nbytes].view(dtype).reshape((n, *shape))
        self._n, self._shape, self._dtype = n, shape, dtype
        self._tensor: Any = None

    def _drop_views(self) -> None:
        self.array = self._tensor = None

    @property
    def tensor(self) -> Any:
        """The batch as a ``torch.Tensor`` over the locked buffer (no copy; it keeps ``array``
        alive, so the pool sees it); TypeError for a dtype torch has no equivalent of
        (structured rows, say: use ``array``)."""
        if self._closed:
            raise ValueError("batch is closed")
        if self._tensor is None:
            import torch

            dtype = torch_dtype(self._dtype)
            if dtype is None:
                raise TypeError(f"torch has no dtype for {self._dtype}; use .array")
            if self.array.size == 0:
                self._tensor = torch.empty((self._n, *self._shape), dtype=dtype)
            else:
                self._tensor = torch.from_numpy(self.array)
        return self._tensor

    def __len__(self) -> int:
        return self._n


def read_records(shards: ShardSet, samples: Sequence[Sample], shape: tuple[int, ...], dtype: Any) -> RecordBatch:
    """Records (each ``shape`` x ``dtype``, all the same length) as one packed locked array."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if any(length != nbytes for _, _, length in samples):
        raise ValueError(f"every record must be {nbytes} bytes")
    runs = plan_runs(shards, samples)
    if len(runs) == 1 and _in_order(runs[0], len(samples), nbytes):
        raw, lease = _decrypt_runs(shards, runs)
        return RecordBatch(raw, lease, runs[0].members[0][1], len(samples), tuple(shape), dtype, False, 1)
    raw, lease = pool().lease(len(samples) * nbytes)
    try:
        with memoryview(lease.buffer) as dst:
            _pack_runs(shards, runs, dst, nbytes)
    except BaseException:
        lease.wipe()
        raise
    return RecordBatch(raw, lease, 0, len(samples), tuple(shape), dtype, True, len(runs))


def _pack_runs(shards: ShardSet, runs: list[Run], dst: memoryview, nbytes: int) -> None:
    """Decrypt each run into one small locked scratch buffer from the pool (the longest run's
    size, reused for every run, wiped and returned at the end) and copy its records to their
    places in ``dst``."""
    longest = max((run_bytes(shards, r) for r in runs), default=1)
    with pool().scratch(longest) as scratch, memoryview(scratch) as src:
        for r in runs:
            shards.read_chunks(r.shard, r.first, r.count, src[: run_bytes(shards, r)])
            for s, start, length in r.members:
                dst[s * nbytes : (s + 1) * nbytes] = src[start : start + length]


def _in_order(run: Run, n: int, nbytes: int) -> bool:
    """Whether ``run`` holds samples 0..n-1 back to back, in the order asked for."""
    if len(run.members) != n:
        return False
    base = run.members[0][1]
    return all(s == i and start == base + i * nbytes for i, (s, start, _) in enumerate(run.members))

