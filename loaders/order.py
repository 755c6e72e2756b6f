"""One deterministic global sample order per epoch, split across ranks, resumable elastically.

The order (``epoch_order``) depends on the sample count, the shard sizes, ``seed``, ``epoch``,
``shuffle`` and ``window``, and on nothing else: not on the rank count, not on the DataLoader
worker count. It is built in two levels so that reads stay mostly sequential within a shard:

1. the shards are put in a random order, and their samples are laid end to end (each shard's
   samples in file order), a *stream* of all N sample indices;
2. the stream is cut into consecutive windows of ``window`` samples (default: the largest
   shard, so a window touches about two shards) and each window is shuffled on its own.

Positions in that order are split across ranks by interleaving: rank ``r`` of ``W`` takes
positions ``r, r + W, r + 2W, ...``. Reading the ranks' sequences round-robin gives back the
global order, whatever ``W`` is. DataLoader workers do not change it either: the sampler runs in
the main process and the DataLoader hands its batches back in sampler order.

**Exactly once.** With the default ``uneven="split"`` every position goes to exactly one rank;
when N is not a multiple of W, the first ``N mod W`` ranks get one sample more than the others
(so rank lengths, and possibly batch counts, differ by one: under DDP use
``torch.distributed.algorithms.Join`` or one of the other modes). ``uneven="drop"`` drops the last
``N mod W`` positions of the (shuffled) order, so those samples are not seen this epoch;
``uneven="pad"`` repeats the first positions to fill the last round, so those are seen twice,
as ``torch.utils.data.DistributedSampler`` does. Only ``"split"`` is exactly once.

**Resume.** A resume point is the set of positions consumed so far in the epoch, stored as a
``prefix`` (positions ``0..prefix-1``) plus the sorted ``extras`` beyond it (ranks that ran
ahead of others by a batch or so). A run that starts from such a point splits the *remaining*
positions, in order, across its own ranks by the same interleaving; ``combine_states`` maps
what each rank of that run consumed back to global positions. So the rank count, the worker
count and the batch size may all change between stop and resume (as in MosaicML streaming;
LitData refuses a changed worker count) and no position is lost or repeated.

Counting what was *consumed* is the caller's job: the sampler runs ahead of the training loop by
the DataLoader's prefetch. ``encfs.loaders.EncryptedLoader`` counts the samples it hands to the
loop and passes that count to ``EpochOrder.state_dict``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence, Sized
from typing import Any, Literal

import numpy as np

try:  # the sampler is a torch Sampler when torch is there, a plain iterable otherwise
    from torch.utils.data import Sampler as _SamplerBase
except ImportError:  # pragma: no cover - torch is an optional dependency
    _SamplerBase = object  # type: ignore[assignment,misc]

__all__ = ["EpochOrder", "combine_states", "distributed_world", "epoch_order"]

Uneven = Literal["split", "drop", "pad"]
STATE_VERSION = 1
RANK_KIND = "encfs.loaders/rank-state"
GLOBAL_KIND = "encfs.loaders/global-state"
_ORDER_KEYS = ("seed", "shuffle", "window", "num_samples", "shards", "dataset")
"""State keys that fix the order itself: a resume point is only valid for the same values."""


def _shard_sizes(num_samples: int, shard_sizes: Sequence[int] | None) -> np.ndarray:
    if shard_sizes is None:
        return np.array([num_samples], dtype=np.int64)
    sizes = np.asarray(list(shard_sizes), dtype=np.int64)
    if sizes.ndim != 1 or (sizes < 0).any():
        raise ValueError("shard_sizes must be non-negative integers")
    if int(sizes.sum()) != num_samples:
        raise ValueError(f"shard_sizes add up to {int(sizes.sum())}, not the {num_samples} samples")
    return sizes


def _default_window(sizes: np.ndarray) -> int:
    return max(int(sizes.max()) if len(sizes) else 1, 1)


def epoch_order(
    num_samples: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    shard_sizes: Sequence[int] | None = None,
    window: int | None = None,
    shuffle: bool = True,
) -> np.ndarray:
    """The global order of sample indices for one epoch (an int64 array, a permutation of
    ``range(num_samples)``): shards shuffled, then samples shuffled within windows of the
    resulting stream (module docstring). ``shuffle=False`` gives ``0..N-1``."""
    if num_samples < 0:
        raise ValueError("num_samples must be >= 0")
    sizes = _shard_sizes(num_samples, shard_sizes)
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    window = _default_window(sizes) if window is None else int(window)
    if window < 1:
        raise ValueError("window must be >= 1")
    # One generator per (seed, epoch), independent of everything else in the process.
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed) & (2**64 - 1), int(epoch)])))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    shards = rng.permutation(len(sizes))
    stream = np.concatenate([np.arange(starts[s], starts[s] + sizes[s], dtype=np.int64) for s in shards]) if len(sizes) else np.empty(0, np.int64)
    for b in range(0, num_samples, window):
        rng.shuffle(stream[b : b + window])  # a view: shuffles in place
    return stream


def distributed_world(world_size: int | None = None, rank: int | None = None) -> tuple[int, int]:
    """``(world_size, rank)``: the arguments where given, else ``torch.distributed``'s when it is
    initialised, else ``(1, 0)``. (Arguments win, as in ``DistributedSampler``, so that tests can
    simulate ranks and a job can split over a process group of its own.)"""
    if world_size is None or rank is None:
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                world_size = dist.get_world_size() if world_size is None else world_size
                rank = dist.get_rank() if rank is None else rank
        except ImportError:  # pragma: no cover - torch is optional
            pass
    world_size = 1 if world_size is None else int(world_size)
    rank = 0 if rank is None else int(rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    return world_size, rank


def _remaining(num_samples: int, prefix: int, extras: np.ndarray) -> np.ndarray:
    """Positions not yet consumed, in order."""
    rest = np.arange(prefix, num_samples, dtype=np.int64)
    return rest[~np.isin(rest, extras)] if len(extras) else rest


def _rank_positions(remaining: np.ndarray, world_size: int, rank: int, uneven: str) -> np.ndarray:
    """The global positions rank ``rank`` reads, in its reading order (module docstring)."""
    m = len(remaining)
    if uneven == "split":
        return remaining[rank::world_size]
    if uneven == "drop":
        return remaining[: m - m % world_size][rank::world_size]
    if uneven == "pad":
        total = -(-m // world_size) * world_size
        return np.resize(remaining, total)[rank::world_size] if m else remaining
    raise ValueError(f"uneven must be 'split', 'drop' or 'pad', not {uneven!r}")


def _digest(sizes: np.ndarray) -> str:
    return hashlib.sha256(sizes.astype("<i8").tobytes()).hexdigest()[:32]


def dataset_identity(dataset: Any) -> str | None:
    """What a resume state must belong to: the dataset's files (``dataset.shards.paths``) and
    record layout, digested; None for a dataset that names no files."""
    paths = getattr(getattr(dataset, "shards", None), "paths", None)
    if paths is None:
        return None
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p).encode() + b"\0")
    for attr in ("record_bytes", "record_shape", "dtype", "columns"):
        h.update(f"{attr}={getattr(dataset, attr, None)!r}\0".encode())
    return h.hexdigest()[:32]


class EpochOrder(_SamplerBase):  # type: ignore[misc,valid-type]
    """A map-style sampler: this rank's share of the epoch's global order, from the resume point.

    ``data`` is the dataset (anything with ``len``) or the sample count; ``shard_sizes`` (samples
    per shard, in index order; default: the dataset's ``shard_sizes`` attribute where it has one)
    lets the shuffle keep reads mostly within a shard. ``world_size``/``rank`` default to
    ``torch.distributed``'s (``distributed_world``). ``uneven`` says what happens when the
    remaining samples do not divide by the world size (module docstring; ``"split"``, the
    default, is the one that is exactly once).

    ``set_epoch(e)`` moves to the start of epoch ``e`` unless the sampler is already in epoch
    ``e`` (so a loaded resume point survives the usual ``set_epoch`` at the top of the loop);
    ``restart=True`` starts the epoch over regardless.
    """

    def __init__(
        self,
        data: Sized | int,
        *,
        shard_sizes: Sequence[int] | None = None,
        seed: int = 0,
        shuffle: bool = True,
        window: int | None = None,
        world_size: int | None = None,
        rank: int | None = None,
        uneven: Uneven = "split",
    ) -> None:
        self.num_samples = int(data) if isinstance(data, (int, np.integer)) else len(data)
        if shard_sizes is None and not isinstance(data, (int, np.integer)):
            shard_sizes = getattr(data, "shard_sizes", None)
        self._sizes = _shard_sizes(self.num_samples, shard_sizes)
        self.identity = None if isinstance(data, (int, np.integer)) else dataset_identity(data)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.window = _default_window(self._sizes) if window is None else int(window)
        if self.window < 1:
            raise ValueError("window must be >= 1")
        if uneven not in ("split", "drop", "pad"):
            raise ValueError(f"uneven must be 'split', 'drop' or 'pad', not {uneven!r}")
        self.uneven: str = uneven
        self.world_size, self.rank = distributed_world(world_size, rank)
        self.epoch = 0
        self._prefix = 0
        self._extras = np.empty(0, dtype=np.int64)
        self._order_cache: tuple[int, np.ndarray] | None = None
        self._positions_cache: np.ndarray | None = None

    # -- the order ---------------------------------------------------------------------------

    @property
    def shard_sizes(self) -> list[int]:
        return [int(s) for s in self._sizes]

    def order(self, epoch: int | None = None) -> np.ndarray:
        """The global order of ``epoch`` (default: the current one), for every rank."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._order_cache is None or self._order_cache[0] != epoch:
            order = epoch_order(self.num_samples, seed=self.seed, epoch=epoch, shard_sizes=self._sizes, window=self.window, shuffle=self.shuffle)
            order.setflags(write=False)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def positions(self) -> np.ndarray:
        """This rank's positions in the global order, from the resume point, in reading order."""
        if self._positions_cache is None:
            rest = _remaining(self.num_samples, self._prefix, self._extras)
            self._positions_cache = _rank_positions(rest, self.world_size, self.rank, self.uneven)
        return self._positions_cache

    def indices(self) -> np.ndarray:
        """The sample indices this rank reads this epoch from the resume point (what ``iter``
        yields)."""
        return self.order()[self.positions()]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return len(self.positions())

    # -- epochs and resume points ------------------------------------------------------------

    def set_epoch(self, epoch: int, *, restart: bool = False) -> None:
        """Move to the start of ``epoch``; kept where it is if already in ``epoch`` (a resume
        point loaded for it, or an epoch partly read), unless ``restart``."""
        epoch = int(epoch)
        if epoch < 0:
            raise ValueError("epoch must be >= 0")
        if restart or epoch != self.epoch:
            self._move(epoch, 0, np.empty(0, dtype=np.int64))

    def _move(self, epoch: int, prefix: int, extras: np.ndarray) -> None:
        if prefix >= self.num_samples and self.num_samples:  # a finished epoch: the next one's start
            epoch, prefix, extras = epoch + 1, 0, np.empty(0, dtype=np.int64)
        self.epoch, self._prefix, self._extras = epoch, prefix, extras
        self._positions_cache = None

    def state_dict(self, consumed: int = 0, *, batches: int | None = None, batch_size: int | None = None) -> dict[str, Any]:
        """This rank's resume state, after it consumed the first ``consumed`` samples of its
        sequence since the current resume point. ``batches``/``batch_size`` (when the sequence is
        read in batches of that size) let one rank's state stand for all ranks in lock-step.
        Plain data (ints, strings, lists): picklable, JSON-able, ``torch.save``-able."""
        if not 0 <= consumed <= len(self):
            raise ValueError(f"consumed {consumed} is outside 0..{len(self)}")
        return {
            "kind": RANK_KIND,
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "window": self.window,
            "num_samples": self.num_samples,
            "shards": _digest(self._sizes),
            "dataset": self.identity,
            "uneven": self.uneven,
            "world_size": self.world_size,
            "rank": self.rank,
            "prefix": self._prefix,
            "extras": self._extras.tolist(),
            "consumed": int(consumed),
            "length": len(self),
            "batches": None if batches is None else int(batches),
            "batch_size": None if batch_size is None else int(batch_size),
        }

    def load_state_dict(self, state: dict[str, Any] | Sequence[dict[str, Any]]) -> None:
        """Resume from ``state``: a global state (``combine_states``), a list of every rank's
        state, or one rank's state (read as every rank in lock-step: ``combine_states``). The
        world size, rank, worker count and batch size of this sampler may differ from the
        run that saved it; the sample count, shard sizes, seed, shuffle and window must not."""
        glob = combine_states(state)
        self._check_order(glob)
        self._move(int(glob["epoch"]), int(glob["prefix"]), np.asarray(glob["extras"], dtype=np.int64))

    def _check_order(self, state: dict[str, Any]) -> None:
        mine = {
            "seed": self.seed, "shuffle": self.shuffle, "window": self.window, "num_samples": self.num_samples,
            "shards": _digest(self._sizes), "dataset": self.identity,
        }
        bad = [k for k in _ORDER_KEYS if state.get(k) != mine[k]]
        if bad:
            raise ValueError(
                "resume state is for another order (" + ", ".join(f"{k}: saved {state.get(k)!r}, here {mine[k]!r}" for k in bad) + ")"
            )


def checked_states(states: Sequence[dict[str, Any]], kind: str, version: int, shared: Sequence[str], what: str) -> list[dict[str, Any]]:
    """``states`` (one per rank) as a list, each of ``kind`` and ``version``, all agreeing on
    the ``shared`` keys (saved by one run at one point); ValueError otherwise."""
    states = list(states)
    if not states:
        raise ValueError("no states given")
    for s in states:
        if s.get("kind") != kind or s.get("version") != version:
            raise ValueError(f"not an encfs {what} state (kind {s.get('kind')!r}, version {s.get('version')!r})")
    for s in states[1:]:
        diff = [k for k in shared if s[k] != states[0][k]]
        if diff:
            raise ValueError(f"rank states disagree on {', '.join(diff)}: not saved by one run at one point")
    return states


def combine_states(states: dict[str, Any] | Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One global resume point from the ranks' states.

    - Every rank's state (a list, e.g. gathered with ``torch.distributed.all_gather_object``):
      exact, whatever each rank consumed.
    - One rank's state: every rank is taken to have read the same number of *batches* (of the
      saved batch size; samples where no batch size was saved), capped at its own length: right
      when the ranks run in lock-step (DDP, each step one batch per rank) and the state was
      saved after the same step on each rank.
    - A global state (the result of this function) is returned as it is.

    The result holds the epoch, the order's parameters and the consumed positions (``prefix``,
    ``extras``); an epoch read to its end becomes the start of the next epoch.
    """
    if isinstance(states, dict):
        if states.get("kind") == GLOBAL_KIND:
            return dict(states)
        states = [states]
    states = checked_states(states, RANK_KIND, STATE_VERSION, ("epoch", "uneven", "world_size", "prefix", "extras", *_ORDER_KEYS), "loader")
    first = states[0]
    n, world, uneven = int(first["num_samples"]), int(first["world_size"]), str(first["uneven"])
    extras = np.asarray(first["extras"], dtype=np.int64)
    rest = _remaining(n, int(first["prefix"]), extras)
    if len(states) == 1 and world > 1:  # lock-step: infer the other ranks
        s = first
        per_rank = s["batches"] * s["batch_size"] if s["batches"] is not None and s["batch_size"] is not None else s["consumed"]
        consumed = {r: int(per_rank) for r in range(world)}
    else:
        ranks = sorted(int(s["rank"]) for s in states)
        if ranks != list(range(world)):
            raise ValueError(f"need the states of all {world} ranks (or one, in lock-step); got ranks {ranks}")
        consumed = {int(s["rank"]): int(s["consumed"]) for s in states}
    done = np.zeros(n, dtype=bool)
    done[: int(first["prefix"])] = True
    done[extras] = True
    exhausted = True
    for r, c in consumed.items():
        pos = _rank_positions(rest, world, r, uneven)
        done[pos[: min(c, len(pos))]] = True
        exhausted &= c >= len(pos)
    if exhausted:  # "drop" left the tail unread on purpose: the epoch is over
        done[rest] = True
    prefix = int(np.argmin(done)) if not done.all() else n
    out = {k: first[k] for k in ("epoch", *_ORDER_KEYS)}
    out.update(kind=GLOBAL_KIND, version=STATE_VERSION, prefix=prefix, extras=(np.nonzero(done[prefix:])[0] + prefix).tolist())
    if prefix >= n and n:
        out.update(epoch=int(first["epoch"]) + 1, prefix=0, extras=[])
    return out
