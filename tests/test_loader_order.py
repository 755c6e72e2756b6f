"""The global sample order, its split across ranks and workers, and elastic resume (issue 13).

Ranks are simulated: one loader per rank in this process, with ``world_size``/``rank`` given.
DataLoader workers are real processes wherever a test names a worker count.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

from encfs.loaders.loader import EncryptedLoader, wipe_batch  # noqa: E402
from encfs.loaders.order import EpochOrder, combine_states, epoch_order  # noqa: E402
from encfs.securemem import SecureBuffer  # noqa: E402


class IndexDataset:
    """Sample ``i`` is the tensor ``i``: what was read is what was seen."""

    def __init__(self, n: int, shard_sizes: list[int] | None = None) -> None:
        self.n = n
        if shard_sizes is not None:
            self.shard_sizes = shard_sizes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return torch.tensor(i, dtype=torch.int64)


class EnvDataset:
    """Sample ``i`` is what the process that fetched it has in two environment variables."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[str, str]:
        return os.environ.get("ENCFS_THREADS", "unset"), os.environ.get("ENCFS_TEST_INIT", "unset")


def mark_worker(worker_id: int) -> None:
    """A user's own worker_init_fn."""
    os.environ["ENCFS_TEST_INIT"] = f"worker-{worker_id}"


def flat(batches) -> list[int]:
    return [int(x) for b in batches for x in b.reshape(-1).tolist()]


def interleave(per_rank: list[list[int]]) -> list[int]:
    """The global order back from the ranks' sequences: position p is rank p % W's item p // W."""
    w = len(per_rank)
    total = sum(len(s) for s in per_rank)
    return [per_rank[p % w][p // w] for p in range(total)]


# -- the order ---------------------------------------------------------------------------------


def test_order_is_deterministic_per_seed_and_epoch():
    kw = dict(shard_sizes=[30, 50, 20], window=25)
    a = epoch_order(100, seed=7, epoch=3, **kw)
    assert sorted(a.tolist()) == list(range(100))
    assert np.array_equal(a, epoch_order(100, seed=7, epoch=3, **kw))
    assert not np.array_equal(a, epoch_order(100, seed=7, epoch=4, **kw))
    assert not np.array_equal(a, epoch_order(100, seed=8, epoch=3, **kw))
    assert np.array_equal(epoch_order(100, seed=7, epoch=3, shuffle=False), np.arange(100))


def test_shuffle_is_by_shard_then_within_windows():
    """With equal shards and a shard-sized window, each window of the order is one whole shard,
    shuffled inside (reads stay within a shard), and the shards come in a shuffled order."""
    shard_orders = set()
    for epoch in range(4):
        order = epoch_order(80, seed=1, epoch=epoch, shard_sizes=[10] * 8)
        shards = []
        for b in range(8):
            window = order[b * 10 : (b + 1) * 10].tolist()
            assert len({x // 10 for x in window}) == 1
            assert window != sorted(window)
            shards.append(window[0] // 10)
        shard_orders.add(tuple(shards))
    assert len(shard_orders) == 4 and tuple(range(8)) not in shard_orders


def test_shard_sizes_must_cover_the_dataset():
    with pytest.raises(ValueError, match="add up"):
        EpochOrder(10, shard_sizes=[3, 3])
    assert EpochOrder(IndexDataset(6, shard_sizes=[2, 4])).shard_sizes == [2, 4]


@pytest.mark.parametrize("n", [1, 7, 23, 100])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_every_sample_once_per_epoch_across_ranks(n, world):
    samplers = [EpochOrder(n, seed=3, world_size=world, rank=r, shard_sizes=[n // 2, n - n // 2]) for r in range(world)]
    per_rank = [list(s) for s in samplers]
    seen = [i for seq in per_rank for i in seq]
    assert sorted(seen) == list(range(n))  # exactly once
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1
    assert [len(s) for s in samplers] == list(map(len, per_rank))
    assert interleave(per_rank) == epoch_order(n, seed=3, epoch=0, shard_sizes=[n // 2, n - n // 2]).tolist()


@pytest.mark.parametrize("world", [2, 3, 4])
def test_uneven_drop_and_pad(world):
    n = 23
    drop = [list(EpochOrder(n, world_size=world, rank=r, uneven="drop")) for r in range(world)]
    pad = [list(EpochOrder(n, world_size=world, rank=r, uneven="pad")) for r in range(world)]
    assert len({len(s) for s in drop}) == 1 and len({len(s) for s in pad}) == 1
    dropped = [i for s in drop for i in s]
    assert len(dropped) == len(set(dropped)) == n - n % world
    padded = [i for s in pad for i in s]
    assert set(padded) == set(range(n)) and len(padded) == -(-n // world) * world


def test_rank_and_world_from_torch_distributed(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 3)
    monkeypatch.setattr(dist, "get_rank", lambda: 2)
    s = EpochOrder(10)
    assert (s.world_size, s.rank) == (3, 2)
    assert list(s) == epoch_order(10)[2::3].tolist()
    assert (EpochOrder(10, world_size=2, rank=0).world_size, EpochOrder(10, world_size=2, rank=0).rank) == (2, 0)
    with pytest.raises(ValueError, match="rank 3"):
        EpochOrder(10, world_size=3, rank=3)


# -- the same order at any worker and rank count -------------------------------------------------


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_same_global_order_at_any_worker_and_rank_count(workers):
    n, sizes = 45, [20, 5, 20]
    ds = IndexDataset(n, shard_sizes=sizes)
    want = epoch_order(n, seed=11, epoch=2, shard_sizes=sizes).tolist()
    for world in (1, 2, 4):
        per_rank = []
        for r in range(world):
            loader = EncryptedLoader(ds, batch_size=4, seed=11, world_size=world, rank=r, num_workers=workers)
            loader.set_epoch(2)
            per_rank.append(flat(loader))
        assert interleave(per_rank) == want, (workers, world)


# -- epochs ------------------------------------------------------------------------------------


def test_set_epoch_and_epochs_advance():
    ds = IndexDataset(30)
    loader = EncryptedLoader(ds, batch_size=7, seed=5)
    e0 = flat(loader)
    assert e0 == epoch_order(30, seed=5, epoch=0).tolist()
    assert loader.epoch == 1  # read to the end: the next epoch's start
    e1 = flat(loader)
    assert e1 == epoch_order(30, seed=5, epoch=1).tolist() and e1 != e0
    loader.set_epoch(0)
    assert flat(loader) == e0  # an epoch's order is the same whenever it is read
    # set_epoch on the epoch the loader is in keeps its position; restart=True does not
    loader.set_epoch(4)
    it = iter(loader)
    first = flat([next(it), next(it)])
    it.close()
    loader.set_epoch(4)
    assert flat(loader) == epoch_order(30, seed=5, epoch=4).tolist()[len(first) :]
    loader.set_epoch(4)
    it = iter(loader)
    next(it)
    it.close()
    loader.set_epoch(4, restart=True)
    assert flat(loader) == epoch_order(30, seed=5, epoch=4).tolist()


def test_sampler_set_epoch_changes_the_order_like_distributed_sampler():
    s = EpochOrder(50, world_size=2, rank=1)
    a = list(s)
    s.set_epoch(1)
    b = list(s)
    assert a != b and sorted(a + list(EpochOrder(50, world_size=2, rank=0))) == list(range(50))
    s.set_epoch(0)
    assert list(s) == a


def test_len_counts_batches_left():
    loader = EncryptedLoader(IndexDataset(23), batch_size=5, world_size=2, rank=1)  # 11 samples
    assert len(loader) == 3
    it = iter(loader)
    next(it)
    assert len(loader) == 2 and loader.consumed == 5
    it.close()


# -- resume ------------------------------------------------------------------------------------


def _encrypted_records(tmp_path, keyref, sizes):
    import fsspec

    opts = {"encfs": {"key": keyref}}
    urls, start = [], 0
    for k, size in enumerate(sizes):
        url = f"encfs::file://{tmp_path}/records-{k}.bin"
        with fsspec.open(url, "wb", **opts) as f:
            f.write(np.arange(start, start + size, dtype=np.int64).tobytes())
        urls.append(url)
        start += size
    return urls, opts


def read_ranks(loaders, batches: int | None) -> tuple[list[int], list[dict]]:
    """Read ``batches`` batches from each rank's loader in lock-step (all when None), then take
    every rank's state: what a DDP job saving a checkpoint at that step does."""
    seen: list[int] = []
    iters = [iter(ld) for ld in loaders]
    step = 0
    while batches is None or step < batches:
        got = False
        for it in iters:
            b = next(it, None)
            if b is not None:
                seen += flat([b])
                got = True
        if not got:
            break
        step += 1
    states = [ld.state_dict() for ld in loaders]
    for it in iters:
        it.close()
    return seen, states


SIZES = [37, 50, 13]  # N = 100: not divisible by 3 ... and not the same across shards
N = sum(SIZES)


def make_loaders(ds, world, workers, batch_size, state=None):
    out = []
    for r in range(world):
        ld = EncryptedLoader(ds, batch_size=batch_size, seed=42, shard_sizes=SIZES, world_size=world, rank=r, num_workers=workers)
        if state is None:
            ld.set_epoch(3)
        else:
            ld.load_state_dict(state)
            assert ld.epoch in (3, 4)  # 4: the state was saved at the end of epoch 3
            ld.set_epoch(ld.epoch)  # the loop's `for epoch in range(loader.epoch, E)` keeps the point
        out.append(ld)
    return out


def rest_of_epoch_3(loaders) -> list[int]:
    return read_ranks(loaders, None)[0] if loaders[0].epoch == 3 else []


@pytest.mark.parametrize("k", [0, 3, 7])
def test_resume_matrix_across_worker_and_rank_counts(tmp_path, keyref, k):
    """Stop mid-epoch at 4 workers x 2 ranks after k batches; resume at 2 workers x 4 ranks (and
    stop again), then at 0 workers x 1 rank: every sample of the epoch seen exactly once."""
    from encfs.loaders import EncryptedRecordDataset

    urls, opts = _encrypted_records(tmp_path, keyref, SIZES)
    ds = EncryptedRecordDataset(urls, (1,), np.int64, storage_options=opts)
    assert len(ds) == N

    first, states = read_ranks(make_loaders(ds, 2, 4, 6), k)
    assert len(first) == 2 * 6 * k
    assert [s["consumed"] for s in states] == [6 * k, 6 * k]  # what the loop got, not what was prefetched
    point = combine_states(states)
    assert point["epoch"] == 3 and point["prefix"] == 12 * k

    # resume at 2 workers x 4 ranks, with another batch size, read 2 batches and stop again
    second, states2 = read_ranks(make_loaders(ds, 4, 2, 5, point), 2)
    # resume at 0 workers x 1 rank to the end of the epoch, from the lock-step single state too
    rest = rest_of_epoch_3(make_loaders(ds, 1, 0, 8, states2))
    rest_single = rest_of_epoch_3(make_loaders(ds, 1, 0, 8, states2[1]))
    assert rest_single == rest

    seen = first + second + rest
    assert sorted(seen) == list(range(N)), "a sample lost or seen twice"
    # and the epoch's samples came in the global order's sequence of rounds
    assert set(first) == set(epoch_order(N, seed=42, epoch=3, shard_sizes=SIZES)[: 12 * k].tolist())


def test_resume_straight_from_stop_at_zero_workers_one_rank(tmp_path, keyref):
    from encfs.loaders import EncryptedRecordDataset

    urls, opts = _encrypted_records(tmp_path, keyref, SIZES)
    ds = EncryptedRecordDataset(urls, (1,), np.int64, storage_options=opts)
    first, states = read_ranks(make_loaders(ds, 2, 4, 6), 4)
    rest, end_states = read_ranks(make_loaders(ds, 1, 0, 16, states), None)
    assert sorted(first + rest) == list(range(N))
    assert combine_states(end_states)["epoch"] == 4  # a finished epoch resumes at the next one


def test_resume_when_ranks_ran_unevenly():
    """Ranks that stopped at different points (no lock-step): every rank's state, combined,
    still resumes exactly."""
    ds = IndexDataset(41)
    loaders = [EncryptedLoader(ds, batch_size=3, world_size=3, rank=r, seed=9) for r in range(3)]
    seen = []
    for ld, k in zip(loaders, (0, 2, 5)):
        it = iter(ld)
        seen += flat([next(it) for _ in range(k)])
        it.close()
    point = combine_states([ld.state_dict() for ld in loaders])
    assert len(point["extras"]) > 0  # rank 1 and 2 ran ahead of rank 0
    after = [EncryptedLoader(ds, batch_size=4, world_size=2, rank=r, seed=9) for r in range(2)]
    for ld in after:
        ld.load_state_dict(point)
        seen += flat(ld)
    assert sorted(seen) == list(range(41))


@given(
    n=st.integers(0, 60),
    runs=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 4), st.lists(st.integers(0, 6), min_size=5, max_size=5)), min_size=1, max_size=4),
    seed=st.integers(0, 2**32),
)
def test_any_chain_of_stops_and_resumes_sees_each_sample_once(n, runs, seed):
    """Sampler level: runs at any world size and batch size, each rank stopping after any
    number of batches, then one rank to the end: the epoch is each sample exactly once."""
    sizes = [n // 3, n // 3, n - 2 * (n // 3)]
    state = None
    seen: list[int] = []
    for world, bs, stops in runs:
        states = []
        for r in range(world):
            s = EpochOrder(n, shard_sizes=sizes, seed=seed, world_size=world, rank=r)
            if state is not None:
                s.load_state_dict(state)
            take = min(stops[r] * bs, len(s))
            seen += s.indices()[:take].tolist()
            states.append(s.state_dict(take))
        state = combine_states(states)
        if state["epoch"] == 1:
            break
    last = EpochOrder(n, shard_sizes=sizes, seed=seed)
    if state is not None:
        last.load_state_dict(state)
    if last.epoch == 0:
        seen += list(last)
    assert sorted(seen) == list(range(n))


def test_resume_refuses_another_order():
    state = EpochOrder(30, seed=1, world_size=2, rank=0).state_dict(4)
    with pytest.raises(ValueError, match="seed"):
        EpochOrder(30, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="num_samples"):
        EpochOrder(31, seed=1).load_state_dict(state)
    other = EpochOrder(30, seed=1, world_size=3, rank=1).state_dict(0)
    with pytest.raises(ValueError, match="disagree"):
        combine_states([state, other])
    with pytest.raises(ValueError, match="all 2 ranks"):
        combine_states([state, state])
    with pytest.raises(ValueError, match="consumed"):
        EpochOrder(30, world_size=2, rank=0).state_dict(16)


def test_loader_refuses_what_it_does_itself():
    ds = IndexDataset(5)
    for kw in ({"sampler": None}, {"drop_last": True}, {"batch_sampler": None}):
        with pytest.raises(TypeError):
            EncryptedLoader(ds, **kw)
    with pytest.raises(ValueError, match="in_order"):
        EncryptedLoader(ds, in_order=False)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(3))

    with pytest.raises(TypeError, match="map-style"):
        EncryptedLoader(Stream())


# -- workers: ENCFS_THREADS ----------------------------------------------------------------------


def as_list(batch: list) -> list:
    return batch


def _env_seen(**kw) -> set[tuple[str, str]]:
    loader = EncryptedLoader(EnvDataset(), batch_size=2, collate_fn=as_list, **kw)
    return {item for batch in loader for item in batch}


def test_workers_get_one_encfs_thread(monkeypatch):
    monkeypatch.delenv("ENCFS_THREADS", raising=False)
    assert _env_seen(num_workers=2) == {("1", "unset")}
    assert _env_seen(num_workers=0) == {("unset", "unset")}  # the main process is left alone
    assert os.environ.get("ENCFS_THREADS") is None
    assert _env_seen(num_workers=2, worker_threads=None) == {("unset", "unset")}


def test_workers_keep_the_users_threads_and_init_fn(monkeypatch):
    monkeypatch.setenv("ENCFS_THREADS", "3")
    assert _env_seen(num_workers=2, worker_init_fn=mark_worker) == {("3", "worker-0"), ("3", "worker-1")}
    monkeypatch.delenv("ENCFS_THREADS")
    assert _env_seen(num_workers=2, worker_init_fn=mark_worker) == {("1", "worker-0"), ("1", "worker-1")}


# -- wiping the previous batch ---------------------------------------------------------------------


class ValueDataset:
    """Sample i is 64 bytes of value (i % 250) + 1: never zero."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((64,), i % 250 + 1, dtype=torch.uint8)


@pytest.mark.parametrize("workers", [0, 2])
def test_previous_batch_is_wiped_when_the_next_is_taken(workers):
    loader = EncryptedLoader(ValueDataset(), batch_size=4, num_workers=workers, wipe_previous=True)
    kept = []
    for batch in loader:
        assert bool((batch != 0).all())  # the batch in hand is intact
        assert all(not bool(b.any()) for b in kept)  # every earlier one reads as zero
        kept.append(batch)
    assert len(kept) == 3 and not any(bool(b.any()) for b in kept)  # the last too, at the end


def test_batches_are_left_alone_by_default():
    kept = list(EncryptedLoader(ValueDataset(), batch_size=4))
    assert all(bool((b != 0).all()) for b in kept)


def test_dropped_iteration_wipes_its_last_batch():
    loader = EncryptedLoader(ValueDataset(), batch_size=4, wipe_previous=True)
    it = iter(loader)
    batch = next(it)
    it.close()
    assert not batch.any()


class LockedBatch:
    """A batch over a SecureBuffer, as a collate into locked memory makes it."""

    def __init__(self, samples: list[torch.Tensor]) -> None:
        self.buf = SecureBuffer(64 * len(samples))
        self.data = torch.frombuffer(self.buf, dtype=torch.uint8).view(len(samples), 64)
        self.data.copy_(torch.stack(samples))

    def close(self) -> None:
        self.buf.release()


def test_wipe_closes_batches_over_locked_memory():
    loader = EncryptedLoader(ValueDataset(), batch_size=4, wipe_previous=True, collate_fn=LockedBatch)
    batches = []
    for batch in loader:
        assert not batch.buf.released and bool((batch.data != 0).all())
        assert all(b.buf.released and not b.data.any() for b in batches)
        batches.append(batch)
    assert batches[-1].buf.released


def test_wipe_batch_reaches_nested_tensors_arrays_and_secure_buffers():
    buf = SecureBuffer(4096)
    view = np.frombuffer(buf, dtype=np.uint8)
    view[:] = 7
    plain = np.full(16, 9, dtype=np.uint8)
    t = torch.ones(3, 3)
    wipe_batch({"x": [t, (plain, view)], "label": "cat"})
    assert not t.any() and not plain.any()
    assert buf.released and not view.any()


def test_worker_init_pickles_under_spawn(monkeypatch):
    monkeypatch.delenv("ENCFS_THREADS", raising=False)
    seen = _env_seen(num_workers=1, worker_init_fn=mark_worker, multiprocessing_context="spawn")
    assert seen == {("1", "worker-0")}


def test_persistent_workers_continue_after_a_break():
    """Batches the persistent workers prefetched before the break are not counted or lost."""
    loader = EncryptedLoader(IndexDataset(40), batch_size=3, num_workers=2, persistent_workers=True, seed=1)
    it = iter(loader)
    head = flat([next(it) for _ in range(4)])
    it.close()
    assert loader.state_dict()["consumed"] == 12
    assert head + flat(loader) == epoch_order(40, seed=1).tolist()
    assert flat(loader) == epoch_order(40, seed=1, epoch=1).tolist()
