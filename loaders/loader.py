"""``EncryptedLoader``: a torch DataLoader that knows where the training loop is in the epoch.

A thin wrapper over ``torch.utils.data.DataLoader`` for map-style datasets, with three jobs:

- **Order.** Batches are drawn from an ``EpochOrder`` (``encfs.loaders.order``): one global
  order per seed and epoch, split across ``torch.distributed`` ranks, the same at any rank or
  worker count. Workers only fetch: the DataLoader hands their batches back in sampler order,
  so ``num_workers`` never changes which samples come, or when.
- **Resume.** The loader counts the samples it has *handed to the loop* (the DataLoader's
  prefetch runs ahead of the loop, so the sampler's own position would overcount).
  ``state_dict()`` is this rank's point; ``combine_states`` (or ``load_state_dict`` with a list)
  joins every rank's, e.g. gathered with ``torch.distributed.all_gather_object``; one rank's
  state alone stands for all when the ranks run in lock-step. ``load_state_dict`` resumes at
  any world size, rank, worker count and batch size, each sample still read once per epoch.
  Take the state *after* the step on the last batch: a batch counts as consumed once handed out.
- **Threads or processes.** ``threads=N`` reads batches on N threads of the main process
  (the C decrypt path releases the GIL): ordered delivery, at most ``N x prefetch_factor``
  batches ahead, the same ``state_dict`` semantics, and no plaintext in shared memory at all.
  ``num_workers=N`` uses DataLoader worker processes as usual. With neither given, a dataset
  that names its faster way (``loading = "threads"`` on the record, ``.npy``, file and
  Parquet datasets, measured against worker processes in benchmarks/bench_loaders.py) gets
  it, with ``os.cpu_count()`` threads;
  anything else reads in the main process as before.
- **Workers and plaintext.** Worker processes get ``ENCFS_THREADS=1`` unless it is already set
  (so the workers, not threads inside each, share the cores), then run the user's own
  ``worker_init_fn``. ``wipe_previous=True`` wipes each batch when the next one is taken (and
  the last when the epoch ends or the iteration is dropped): see ``wipe_batch`` for what that
  reaches and what it cannot.

One iteration runs the rest of the current epoch from the loader's position: a fresh loader
starts epoch 0; an iteration left early (``break``) is continued by the next one; an epoch read to
its end moves the loader to the start of the next epoch (so the order changes each epoch even
without ``set_epoch``). ``set_epoch(e)`` moves to the start of epoch ``e`` unless already in it.
"""

from __future__ import annotations

import os
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset

from encfs import securemem

from .order import EpochOrder, Uneven
from .pool import pool

__all__ = ["EncryptedLoader", "wipe_batch"]

THREADS_ENV = "ENCFS_THREADS"


class _WorkerInit:
    """``worker_init_fn``: ``ENCFS_THREADS`` for the worker unless set, then the user's function.
    A module-level class, so it pickles under spawn and forkserver."""

    def __init__(self, threads: int | None, user_fn: Callable[[int], None] | None) -> None:
        self.threads = threads
        self.user_fn = user_fn

    def __call__(self, worker_id: int) -> None:
        if self.threads is not None and THREADS_ENV not in os.environ:
            os.environ[THREADS_ENV] = str(self.threads)
        if self.user_fn is not None:
            self.user_fn(worker_id)


def wipe_batch(batch: Any) -> None:
    """Zero the plaintext a batch holds, in place, and release what it owns.

    Walks tuples, lists and mappings. An object with ``close()`` (a batch over a locked encfs
    buffer, a ``SecureBuffer``) is closed: its owner wipes and unlocks its memory. A tensor is
    zeroed in place: that reaches a ``torch.frombuffer`` tensor over a ``SecureBuffer`` (the
    buffer's own pages), a batch that came from a worker (the shared-memory segment it was sent
    in, which is that batch's only copy) and a ``pin_memory`` batch (the pinned copy). A NumPy
    array or memoryview over a ``SecureBuffer`` releases the buffer; other writable ones are
    zeroed. What cannot be reached: any copy torch or the loop made (``.to(device)``,
    ``.float()``, a transform's output, the worker-side shared memory of a batch that was then
    pinned: torch frees it without wiping), Python objects (``str``, ``bytes``, ints) and
    read-only buffers. Views of a wiped batch read zeros afterwards.

    Zeroing is in place, so it is only for batches that own their memory: the default collate
    makes new tensors, but a ``collate_fn`` that hands back the dataset's own tensors (or views
    of them) would have the dataset zeroed.
    """
    seen: set[int] = set()

    def walk(obj: Any) -> None:
        if id(obj) in seen or obj is None:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.device.type != "meta" and obj.numel():
                with torch.no_grad():
                    obj.detach().zero_()
        elif isinstance(obj, (np.ndarray, memoryview)):
            buf = securemem.owner(obj)
            if buf is not None:
                if pool().owns(buf):
                    buf.zero()  # a pooled batch buffer: zeroed now, reused once its views are gone
                else:
                    buf.release()
            elif isinstance(obj, memoryview):
                if obj.readonly:
                    pass
                elif obj.c_contiguous:
                    securemem.cleanse(obj)
                else:
                    np.asarray(obj).fill(0)
            elif obj.flags.writeable:
                obj.fill(0)
        elif callable(getattr(obj, "close", None)) and not isinstance(obj, (str, bytes)):
            obj.close()
        elif isinstance(obj, Mapping):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    walk(batch)


class EncryptedLoader:
    """Batches of a map-style ``dataset`` in the epoch's global order, resumable.

    ``shard_sizes``, ``seed``, ``shuffle``, ``window``, ``world_size``, ``rank`` and ``uneven``
    go to ``EpochOrder`` (default shard sizes: the dataset's ``shard_sizes`` attribute).
    Batches are ``batch_size`` samples of this rank's sequence; the last may be shorter, never
    dropped (a dropped batch would break exactly-once: use ``uneven="drop"`` for equal ranks).
    ``threads`` (N > 0) reads batches on N threads in this process instead of worker processes
    (``prefetch_factor`` batches per thread ahead, default 2; ``pin_memory`` pins on those
    threads when CUDA is available); ``num_workers`` and ``threads`` cannot both be positive.
    Left out, both follow the dataset's ``loading`` attribute (module docstring).
    ``worker_threads`` is the ``ENCFS_THREADS`` given to worker processes that do not have one
    (None: leave it alone). ``wipe_previous`` wipes each batch when the next is taken
    (``wipe_batch``). The other keyword arguments go to ``DataLoader`` (``num_workers``,
    ``collate_fn``, ``pin_memory``, ``multiprocessing_context``, ``persistent_workers``,
    ``prefetch_factor``, ...); ``sampler``, ``batch_sampler`` and ``drop_last`` are
    this class's job and refused, as is ``in_order=False``.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int = 1,
        *,
        shard_sizes: Sequence[int] | None = None,
        seed: int = 0,
        shuffle: bool = True,
        window: int | None = None,
        world_size: int | None = None,
        rank: int | None = None,
        uneven: Uneven = "split",
        num_workers: int | None = None,
        threads: int | None = None,
        worker_init_fn: Callable[[int], None] | None = None,
        worker_threads: int | None = 1,
        wipe_previous: bool = False,
        **dataloader_kwargs: Any,
    ) -> None:
        if isinstance(dataset, IterableDataset):
            raise TypeError("EncryptedLoader needs a map-style dataset (len and [i]); an iterable dataset orders itself")
        taken = sorted(k for k in ("sampler", "batch_sampler", "shuffle", "drop_last") if k in dataloader_kwargs)
        if taken:
            raise TypeError(f"EncryptedLoader sets {', '.join(taken)} itself")
        if dataloader_kwargs.get("in_order", True) is not True:
            raise ValueError("in_order=False would make the order depend on the workers")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.sampler = EpochOrder(
            dataset, shard_sizes=shard_sizes, seed=seed, shuffle=shuffle, window=window, world_size=world_size, rank=rank, uneven=uneven
        )
        self.wipe_previous = bool(wipe_previous)
        self._batches = 0  # handed to the loop since the sampler's current resume point
        if num_workers is None and threads is None:
            threads = (os.cpu_count() or 1) if getattr(dataset, "loading", None) == "threads" else 0
        num_workers, threads = int(num_workers or 0), int(threads or 0)
        if num_workers < 0 or threads < 0 or (num_workers and threads):
            raise ValueError("use either num_workers (processes) or threads, not both")
        self.threads = threads
        self._prefetch = max(1, int(dataloader_kwargs.get("prefetch_factor") or 2))
        self._pin = bool(dataloader_kwargs.get("pin_memory", False))
        self._pin_device = dataloader_kwargs.get("pin_memory_device", "") or None
        if threads:  # the DataLoader below is only the collate and fetch settings, in-process
            for k in ("prefetch_factor", "persistent_workers", "multiprocessing_context", "pin_memory", "pin_memory_device", "timeout"):
                dataloader_kwargs.pop(k, None)
        self._dataloader = DataLoader(
            dataset,
            batch_sampler=BatchSampler(self.sampler, self.batch_size, drop_last=False),
            num_workers=num_workers,
            worker_init_fn=_WorkerInit(worker_threads, worker_init_fn) if num_workers else worker_init_fn,
            **dataloader_kwargs,
        )

    # -- where we are -------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def world_size(self) -> int:
        return self.sampler.world_size

    @property
    def rank(self) -> int:
        return self.sampler.rank

    @property
    def consumed(self) -> int:
        """Samples of this rank handed to the loop since the current resume point."""
        return min(self._batches * self.batch_size, len(self.sampler))

    @property
    def num_workers(self) -> int:
        """Worker processes (0 in the main process, threads or not)."""
        return self._dataloader.num_workers

    @property
    def dataloader(self) -> DataLoader:
        """The underlying DataLoader (iterating it directly bypasses the consumption count;
        with ``threads`` it reads in the main process on one thread)."""
        return self._dataloader

    def __len__(self) -> int:
        """Batches left for this rank in the current epoch."""
        return -(-(len(self.sampler) - self.consumed) // self.batch_size)

    def set_epoch(self, epoch: int, *, restart: bool = False) -> None:
        """Move to the start of ``epoch``, unless already in it (a loaded resume point is kept)
        or ``restart``. Call it at the top of each epoch, as with ``DistributedSampler``."""
        if restart or int(epoch) != self.sampler.epoch:
            self.sampler.set_epoch(epoch, restart=True)
            self._batches = 0

    def state_dict(self) -> dict[str, Any]:
        """This rank's resume point: epoch, seed, world size, rank, samples handed to the loop,
        and the point this run itself started from. Plain data; see ``combine_states``."""
        return self.sampler.state_dict(self.consumed, batches=self._batches, batch_size=self.batch_size)

    def load_state_dict(self, state: dict[str, Any] | Sequence[dict[str, Any]]) -> None:
        """Resume from one rank's state (ranks in lock-step), all ranks' states, or a combined
        state; at any world size, worker count and batch size."""
        self.sampler.load_state_dict(state)
        self._batches = 0

    def _fold(self) -> None:
        """Make what this rank consumed the sampler's new resume point (lock-step reading, as a
        single state is), so that the next iteration continues the epoch."""
        if self._batches:
            self.sampler.load_state_dict(self.state_dict())
            self._batches = 0

    # -- iteration ----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        self._fold()
        return self._run()

    def _run(self) -> Iterator[Any]:
        previous: Any = None
        have_previous = False
        total = len(self.sampler)
        it = self._threaded() if self.threads else iter(self._dataloader)
        try:
            for batch in it:
                if have_previous and self.wipe_previous:
                    wipe_batch(previous)
                previous, have_previous = None, False
                self._batches += 1
                previous, have_previous = batch, True
                yield batch
            if self.consumed >= total:  # read to the end: the loader moves to the next epoch
                self.sampler.set_epoch(self.sampler.epoch + 1)
                self._batches = 0
        finally:
            if have_previous and self.wipe_previous:
                wipe_batch(previous)
            del previous, it  # the DataLoader's iterator shuts its workers down when dropped

    # -- in-process loading on threads ----------------------------------------------------------

    def _fetch(self, indices: list[int]) -> Any:
        """One batch, as the DataLoader's in-process fetcher makes it (``__getitems__`` when the
        dataset has it, then the collate), pinned when asked and CUDA is there."""
        ds = self.dataset
        getitems = getattr(ds, "__getitems__", None)
        items = getitems(indices) if getitems else [ds[i] for i in indices]
        batch = self._dataloader.collate_fn(items)
        del items
        if self._pin and torch.cuda.is_available():
            from torch.utils.data._utils.pin_memory import pin_memory

            batch = pin_memory(batch, self._pin_device)
        return batch

    def _threaded(self) -> Iterator[Any]:
        """Batches fetched on ``self.threads`` threads, handed out in sampler order, at most
        ``threads x prefetch_factor`` ahead. Leaving early waits for the fetches in flight
        (bounded) and wipes what was fetched but never handed out when ``wipe_previous``."""
        if self._pin and not torch.cuda.is_available():
            warnings.warn("pin_memory=True but CUDA is not available: batches are not pinned", UserWarning, stacklevel=3)
        depth = self.threads * self._prefetch
        pending: deque[Future] = deque()
        indices = iter(self._dataloader.batch_sampler)  # the sampler runs on this thread only
        executor = ThreadPoolExecutor(self.threads, thread_name_prefix="encfs-loader")
        try:
            for idx in indices:
                pending.append(executor.submit(self._fetch, idx))
                if len(pending) >= depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
            while pending:
                f = pending.popleft()
                if not f.cancelled() and f.exception() is None and self.wipe_previous:
                    wipe_batch(f.result())
