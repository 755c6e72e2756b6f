"""WebDataset-layout tar shards in encfs, as a PyTorch ``IterableDataset``.

A shard is a ``.tar`` whose members are grouped into samples by key, as WebDataset does: the
key is the member's path up to the first dot of its base name, the rest is the field name
(lower-cased), so ``train/000123.jpg`` and ``train/000123.cls`` make
``{"__key__": "train/000123", "jpg": b"...", "cls": b"..."}``. Members of one sample must be
adjacent; names without a dot, non-regular members and ``__*__`` metadata files are skipped; a
field repeated within one sample is an error. Every sample also carries ``__url__`` (the
shard's URL), ``__shard__`` (its index in the dataset), ``__index__`` (the sample's position in
the shard) and ``__last__`` (whether it is the shard's final sample): what ``TarProgress``
counts for a resume.

**One sequential read per shard.** A shard is opened through encfs (``open_shard``: an
``EncryptedReader``, decrypting 4 MiB windows in locked memory as it goes) and read once, front
to back, by ``tarfile`` in stream mode (``r|``). Opening it authenticates the header and the
final chunk, so that read is one ciphertext pass plus the header and the last chunk. Member
bytes are ordinary ``bytes`` objects (not locked, not wiped by encfs), as are decoded fields.

**Split.** Each epoch, the shards are put in a deterministic order (``order.epoch_order`` over
shards, from ``seed`` and the epoch; ``set_epoch``), then dealt round-robin to ranks
(``torch.distributed``'s, or ``world_size``/``rank``) and, within a rank, to its DataLoader
workers (``get_worker_info()``). A shard is read whole by exactly one worker of one rank, so
every sample is seen exactly once per epoch. With fewer shards than ``world_size x
num_workers`` some workers (and possibly whole ranks) get no shard and yield nothing: still
exactly once, but unbalanced, and ranks then see different batch counts (under DDP, use at
least ``world_size x num_workers`` shards, ideally a multiple). Shards are never split across
workers: each worker would have to read the whole shard.

**Resume.** ``TarProgress.update(batch)`` in the training loop records, per shard, how many
samples the loop has consumed (a prefix: one worker reads a shard in order and the DataLoader
hands each worker's batches back in order) and which shards it finished. ``state_dict()`` of
every rank's progress, joined by ``combine_tar_states`` (or one rank's alone when there is one
rank), resumes through ``EncryptedTarDataset.load_state_dict``: finished shards are not opened
again, a partly consumed shard is streamed from its start with its first consumed samples
skipped without being decoded, and the remaining shards are dealt out again at the new rank and
worker counts. So the granularity is a shard plus a sample count in it. The resume point holds
for its epoch until ``set_epoch`` moves to another one; an iterator copies the dataset into
its workers when it starts, so call ``set_epoch``/``load_state_dict`` before iterating (and do
not use ``persistent_workers=True``, whose workers keep the copy of the first epoch).

Failure: a shard that is tampered with or truncated raises ``IntegrityError`` naming the file
(from the worker that read it; the DataLoader re-raises it in the loop); a damaged tar stream
inside a well-encrypted file raises ``tarfile.ReadError`` naming the file. Nothing is skipped.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, BinaryIO

from encfs.sink import is_local

from .order import checked_states, distributed_world, epoch_order
from .shards import ShardSet

try:  # an IterableDataset when torch is there, a plain iterable otherwise
    from torch.utils.data import IterableDataset as _IterableBase
    from torch.utils.data import get_worker_info
except ImportError:  # pragma: no cover - torch is an optional dependency
    _IterableBase = object  # type: ignore[assignment,misc]

    def get_worker_info() -> Any:  # type: ignore[misc]
        return None


__all__ = ["EncryptedTarDataset", "TarProgress", "combine_tar_states", "open_shard", "split_key"]

STATE_KIND = "encfs.loaders/tar-state"
STATE_VERSION = 1
META_KEYS = ("__key__", "__url__", "__shard__", "__index__", "__last__")
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset.tariterators.base_plus_ext

Decode = Callable[[dict], Any] | Mapping[str, Callable[[bytes], Any]]


def open_shard(shards: ShardSet, k: int, **encfs_options: Any) -> BinaryIO:
    """File ``k`` of ``shards`` opened for reading in this process, through its filesystem:
    an ``EncryptedReader`` on ``encfs::`` (``encfs_options`` such as ``readahead`` go to it),
    the plain file otherwise (the plaintext baseline; unbuffered on remote stores)."""
    fs, path = shards.fs, shards.paths[k]
    if hasattr(fs, "open_reader"):
        f = fs.open(path, "rb", **encfs_options)
        shards.check_opened(k, f)
        expected = getattr(shards, "expected", None)
        if expected is not None:  # manifest=: the plaintext is hashed as it is read (DigestingReader)
            from encfs.manifest import DigestingReader

            return DigestingReader(f, expected.entries[k], path)
        return f
    return fs.open(path, "rb") if is_local(fs) else fs.open(path, "rb", cache_type="none")


def split_key(name: str) -> tuple[str, str] | None:
    """(key, field) of member ``name`` as WebDataset splits it, or None (no dot in the base name)."""
    m = _KEY.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


class _Tail:
    """A forward-only reader that keeps its last two reads, so that the end-of-archive marker
    (two zero blocks at the offset where ``tarfile`` stopped) is checked without reading back:
    ``tarfile`` ends a stream quietly at a cut or damaged header past the first."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.pos, self.kept, self.kept_at = raw, 0, b"", 0
        self._last = b""

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.kept, self.kept_at = self._last + data, self.pos - len(self._last)
        self._last = data
        self.pos += len(data)
        return data

    def check_end(self, offset: int) -> None:
        """Raise ``tarfile.ReadError`` unless two zero blocks follow ``offset``."""
        want = offset + 2 * tarfile.BLOCKSIZE
        if want > self.pos:
            self.read(want - self.pos)
        end = self.kept[offset - self.kept_at : want - self.kept_at] if offset >= self.kept_at else b"?"
        if len(end) < 2 * tarfile.BLOCKSIZE or any(end):
            raise tarfile.ReadError(f"no end-of-archive marker at offset {offset}: the archive is cut short or damaged")


def _digest(paths: Sequence[str]) -> str:
    return hashlib.sha256("\0".join(paths).encode()).hexdigest()[:32]


class EncryptedTarDataset(_IterableBase):  # type: ignore[misc,valid-type]
    """Samples of WebDataset-layout ``.tar`` shards (``encfs::`` URLs, globs, brace ranges).

    ``decode``: a function of the whole sample dict, or a mapping from field name to a function
    of that field's bytes (other fields are kept as bytes). ``shuffle``/``seed``: the shard
    order of each epoch (``set_epoch``); samples keep their order within a shard.
    ``world_size``/``rank`` default to ``torch.distributed``'s. ``bufsize``: the bytes tarfile
    asks for at a time. See the module docstring for the split, resume and failures.
    """

    def __init__(
        self,
        urls: str | Iterable[str],
        storage_options: dict | None = None,
        *,
        decode: Decode | None = None,
        shuffle: bool = True,
        seed: int = 0,
        world_size: int | None = None,
        rank: int | None = None,
        bufsize: int = 1 << 20,
        worker_threads: int | None = 1,
        manifest: Any = None,
    ) -> None:
        self.shards = ShardSet(urls, storage_options, worker_threads=worker_threads, manifest=manifest)
        self.decode = decode
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.world_size, self.rank = distributed_world(world_size, rank)
        self.bufsize = int(bufsize)
        self.epoch = 0
        self._done: frozenset[int] = frozenset()
        self._skip: dict[int, int] = {}

    # -- order and split -----------------------------------------------------------------------

    def shard_order(self, epoch: int | None = None) -> list[int]:
        """Every shard index, in the order of ``epoch`` (default: the current one), for all ranks."""
        epoch = self.epoch if epoch is None else int(epoch)
        return epoch_order(len(self.shards), seed=self.seed, epoch=epoch, shuffle=self.shuffle).tolist()

    def assigned(self, worker: int = 0, num_workers: int = 1) -> list[tuple[int, int]]:
        """(shard, samples to skip) that worker ``worker`` of ``num_workers`` on this rank reads
        this epoch, in order: the shards not finished at the resume point, dealt round-robin
        to ranks and then to the rank's workers."""
        if not 0 <= worker < num_workers:
            raise ValueError(f"worker {worker} is not in 0..{num_workers - 1}")
        rest = [k for k in self.shard_order() if k not in self._done]
        return [(k, self._skip.get(k, 0)) for k in rest[self.rank :: self.world_size][worker::num_workers]]

    def set_epoch(self, epoch: int, *, restart: bool = False) -> None:
        """Move to the start of ``epoch``; a resume point loaded for ``epoch`` is kept unless
        ``restart``. Call it before iterating: workers take a copy of the dataset."""
        epoch = int(epoch)
        if epoch < 0:
            raise ValueError("epoch must be >= 0")
        if restart or epoch != self.epoch:
            self.epoch, self._done, self._skip = epoch, frozenset(), {}

    def load_state_dict(self, state: dict[str, Any] | Sequence[dict[str, Any]]) -> None:
        """Resume from a ``TarProgress.state_dict()``, a list of every rank's, or their
        ``combine_tar_states``; the rank and worker counts may differ from the saving run's."""
        state = combine_tar_states(state)
        mine = {"seed": self.seed, "shuffle": self.shuffle, "shards": _digest(self.shards.paths)}
        bad = [k for k in mine if state.get(k) != mine[k]]
        if bad:
            raise ValueError("resume state is for another dataset or order (" + ", ".join(f"{k}: saved {state.get(k)!r}, here {mine[k]!r}" for k in bad) + ")")
        self.epoch = int(state["epoch"])
        self._done = frozenset(int(k) for k in state["done"])
        self._skip = {int(k): int(n) for k, n in state["partial"]}

    # -- reading -------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for k, skip in self.assigned(worker, num_workers):
            for sample in self.samples(k, skip):
                yield self._decoded(sample)

    def samples(self, k: int, skip: int = 0) -> Iterator[dict[str, Any]]:
        """The samples of shard ``k`` in file order, after the first ``skip`` (read past, not
        kept), undecoded: one sequential read of the file."""
        url, path = self.shards.urls[k], self.shards.paths[k]
        with open_shard(self.shards, k) as raw:
            f = _Tail(raw)
            try:
                tar = tarfile.open(fileobj=f, mode="r|", bufsize=self.bufsize)
                yield from self._group(tar, k, url, skip)
                f.check_end(tar.offset)
                if hasattr(raw, "finish"):  # manifest=: the rest read, the plaintext digest checked
                    raw.finish()
            except tarfile.TarError as e:
                raise tarfile.ReadError(f"{path}: {e}") from e

    def _group(self, tar: tarfile.TarFile, k: int, url: str, skip: int) -> Iterator[dict[str, Any]]:
        current: dict[str, Any] | None = None
        index = -1
        finished: set[str] = set()
        for member in tar:
            if not member.isreg() or ("/" not in member.name and member.name.startswith("__") and member.name.endswith("__")):
                continue
            parts = split_key(member.name)
            if parts is None:
                continue
            key, field = parts
            if current is None or key != current["__key__"]:
                if key in finished:
                    raise ValueError(f"{url}: {member.name}: sample {key!r} appears again after other samples (its members must be adjacent)")
                if current is not None:
                    finished.add(current["__key__"])
                    if index >= skip:
                        yield current
                index += 1
                current = {"__key__": key, "__url__": url, "__shard__": k, "__index__": index, "__last__": False}
            if index < skip:
                continue  # consumed before the resume point: read past, not kept
            if field in current:
                raise ValueError(f"{url}: {member.name}: field {field!r} repeated in sample {key!r}")
            body = tar.extractfile(member)
            assert body is not None  # a regular member
            current[field] = body.read()
        if current is not None and index >= skip:
            current["__last__"] = True
            yield current

    def _decoded(self, sample: dict[str, Any]) -> Any:
        if self.decode is None:
            return sample
        if callable(self.decode):
            return self.decode(sample)
        return {f: (self.decode[f](v) if f in self.decode and f not in META_KEYS else v) for f, v in sample.items()}

    def close(self) -> None:
        """Close this process's open files (none stay open between shards)."""
        self.shards.close()

    def __repr__(self) -> str:
        return f"<EncryptedTarDataset {len(self.shards)} shards, epoch {self.epoch}, rank {self.rank}/{self.world_size}>"


def _rows(batch: Any) -> Iterator[tuple[int, int, bool]]:
    """(shard, index, last) of each sample in ``batch``: one sample, a list of samples, or a
    collated dict (lists or tensors)."""
    if isinstance(batch, Mapping):
        shard, index, last = (batch[k] for k in ("__shard__", "__index__", "__last__"))
        if isinstance(shard, int):
            yield shard, int(index), bool(last)
            return
        as_list = [v.tolist() if hasattr(v, "tolist") else list(v) for v in (shard, index, last)]
        yield from ((int(s), int(i), bool(x)) for s, i, x in zip(*as_list))
        return
    for sample in batch:
        yield from _rows(sample)


class TarProgress:
    """What the training loop has consumed of an epoch of an ``EncryptedTarDataset`` on this
    rank: ``update(batch)`` after each step (samples or collated batches keep their
    ``__shard__``/``__index__``/``__last__`` fields), ``state_dict()`` to save."""

    def __init__(self, dataset: EncryptedTarDataset) -> None:
        self.epoch = dataset.epoch
        self._fixed = {"seed": dataset.seed, "shuffle": dataset.shuffle, "shards": _digest(dataset.shards.paths)}
        self.done: set[int] = set(dataset._done)
        self.consumed: dict[int, int] = dict(dataset._skip)

    def update(self, batch: Any) -> None:
        """Count the samples of ``batch`` as consumed."""
        for shard, index, last in _rows(batch):
            self.consumed[shard] = max(self.consumed.get(shard, 0), index + 1)
            if last:
                self.done.add(shard)

    def state_dict(self) -> dict[str, Any]:
        """This rank's resume state: plain, JSON-able data."""
        return {
            "kind": STATE_KIND,
            "version": STATE_VERSION,
            "epoch": self.epoch,
            **self._fixed,
            "done": sorted(self.done),
            "partial": sorted([k, n] for k, n in self.consumed.items() if k not in self.done and n),
        }


def combine_tar_states(states: dict[str, Any] | Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One resume state from every rank's ``TarProgress.state_dict()`` (each shard is read by
    one rank, so their shards are disjoint: the union). One state is returned as it is."""
    states = checked_states([states] if isinstance(states, Mapping) else states, STATE_KIND, STATE_VERSION, ("epoch", "seed", "shuffle", "shards"), "tar dataset")
    first = states[0]
    done = sorted({int(k) for s in states for k in s["done"]})
    partial: dict[int, int] = {}
    for s in states:
        for k, n in s["partial"]:
            partial[int(k)] = max(partial.get(int(k), 0), int(n))
    return {**first, "done": done, "partial": sorted([k, n] for k, n in partial.items() if k not in done)}
