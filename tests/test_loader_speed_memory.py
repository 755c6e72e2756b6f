"""The batch-buffer pool, in-process loading on threads, shared memory from worker processes
and ``pin_memory``: behaviour only (timings live in benchmarks/bench_loaders.py)."""

from __future__ import annotations

import gc
import os
import pickle
import threading
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader  # noqa: E402

from encfs import cobblestone as cs  # noqa: E402
from encfs.errors import IntegrityError  # noqa: E402
from encfs.loaders import EncryptedRecordDataset, ShardSet, collate_locked, read_batch, read_records  # noqa: E402
from encfs.loaders.loader import EncryptedLoader, wipe_batch  # noqa: E402
from encfs.loaders.order import EpochOrder  # noqa: E402
from encfs.loaders.pool import BufferPool, pool, size_class  # noqa: E402

from .test_loader_datasets import _npy_bytes, _write  # noqa: E402

SHAPE = (5, 700)  # 14,000-byte float32 records
NBYTES = 14_000


@pytest.fixture
def data(tmp_path, keyref):
    rng = np.random.default_rng(3)
    opts = {"encfs": {"key": keyref}}
    recs = [rng.normal(size=(n, *SHAPE)).astype(np.float32) for n in (20, 7, 13)]
    urls = [f"encfs::file://{tmp_path}/r-{k}.bin" for k in range(len(recs))]
    for url, a in zip(urls, recs):
        _write(url, a.tobytes(), opts)
    return {"urls": urls, "opts": opts, "recs": np.concatenate(recs), "root": tmp_path}


@pytest.fixture
def fresh_pool(monkeypatch):
    """An empty pool of this process for the test (the module's pool is left alone)."""
    from encfs.forking import ForkLocal
    from encfs.loaders import pool as pool_mod

    p = BufferPool()
    monkeypatch.setattr(pool_mod, "_POOL", ForkLocal(lambda: p, p))
    return p


def _samples(idx):
    return [(0, int(i) * NBYTES, NBYTES) for i in idx]


def _shards(data):
    return ShardSet(data["urls"], data["opts"])


# -- the pool ---------------------------------------------------------------------------------


def test_size_classes_round_up_by_at_most_an_eighth():
    for n in [1, 4095, 4097, 100_000, 9_633_792, 1 << 24]:
        c = size_class(n)
        assert c >= n and c % 4096 == 0
        if n > 8 * 4096:
            assert c <= n * 1.125 + 4096


def test_batches_reuse_pooled_buffers(data, fresh_pool):
    shards = _shards(data)
    rng = np.random.default_rng(0)
    spread = np.arange(0, 20, 4)  # a chunk between any two: one run each, the same buffer sizes every time
    for _ in range(6):  # closed batches
        idx = rng.permutation(spread)
        with read_records(shards, _samples(idx), SHAPE, np.float32) as rb:
            assert np.array_equal(rb.array, data["recs"][idx])
    for _ in range(6):  # batches dropped by the loop, never closed
        idx = rng.permutation(spread)
        t = read_records(shards, _samples(idx), SHAPE, np.float32).tensor
        assert torch.equal(t, torch.from_numpy(data["recs"][idx]))
        del t
    # one packed buffer and one scratch buffer, mapped once each, then reused
    assert fresh_pool.maps == 2 and fresh_pool.reuses == 22


def test_returned_memory_reads_zero(data, fresh_pool):
    shards = _shards(data)
    batch = read_batch(shards, _samples([3, 1, 2]))
    buf = batch.buffer
    whole = memoryview(buf)
    assert any(whole)
    batch.close()
    assert not any(whole)  # wiped at close, while a view is alive
    del whole, buf, batch
    rb = read_records(shards, _samples([5, 9]), SHAPE, np.float32)
    del rb  # garbage, never closed: wiped when its last view goes
    stats = fresh_pool.stats()
    assert stats["quarantined"] == 0 and stats["idle_bytes"] > 0
    for bufs in fresh_pool._free.values():
        for b in bufs:
            assert not any(memoryview(b)), "a free pooled buffer holds plaintext"


def test_no_reuse_while_a_numpy_view_is_alive(data, fresh_pool):
    shards = _shards(data)
    rb = read_records(shards, _samples([4, 6]), SHAPE, np.float32)
    row = rb.array[1]
    first = rb.buffer
    del rb  # the batch object is gone but a view of its plaintext is not
    others = [read_records(shards, _samples([1, 2]), SHAPE, np.float32) for _ in range(3)]
    assert all(o.buffer is not first for o in others)
    assert np.array_equal(row, data["recs"][6])  # still the caller's data, untouched
    closed = read_records(shards, _samples([7, 8]), SHAPE, np.float32)
    keep = closed.array[0]
    held = closed.buffer
    closed.close()
    assert not keep.any()
    again = read_records(shards, _samples([7, 8]), SHAPE, np.float32)
    assert again.buffer is not held and not keep.any()  # the zeroed view never sees new plaintext
    del keep, held, closed
    gc.collect()
    third = read_records(shards, _samples([7, 8]), SHAPE, np.float32)
    assert fresh_pool.reuses >= 1 and np.array_equal(third.array, data["recs"][[7, 8]])
    del first, row, others, again, third


def test_a_hand_made_frombuffer_tensor_keeps_the_buffer_out_of_reuse(data, fresh_pool):
    """``torch.frombuffer`` holds no export; the pool's reference count still sees it."""
    shards = _shards(data)
    with read_batch(shards, _samples([0, 1])) as batch:
        t = torch.frombuffer(batch.buffer, dtype=torch.uint8)
        buf = batch.buffer
    assert not buf.exported() and not t.any()
    del buf
    nxt = read_batch(shards, _samples([0, 1]))
    assert torch.frombuffer(nxt.buffer, dtype=torch.uint8).data_ptr() != t.data_ptr()
    assert not t.any()


def test_wipe_batch_zeroes_a_pooled_batch_and_keeps_its_buffer_usable(data, fresh_pool):
    shards = _shards(data)
    rb = read_records(shards, _samples([2, 3]), SHAPE, np.float32)
    arr, buf = rb.array, rb.buffer
    wipe_batch(arr)
    assert not arr.any() and not buf.released
    del arr, rb, buf
    read_records(shards, _samples([2, 3]), SHAPE, np.float32)
    assert fresh_pool.reuses >= 1


def test_forked_child_has_its_own_pool(data):
    shards = _shards(data)
    read_records(shards, _samples([1, 2]), SHAPE, np.float32).close()
    parent = pool()
    assert parent.maps >= 1
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            p = pool()
            ok = p is not parent and p.maps == 0
            rb = read_records(shards, _samples([1, 2]), SHAPE, np.float32)
            ok = ok and p.maps == 1 and np.array_equal(rb.array, data["recs"][[1, 2]])
            os.write(w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(w)
    got = os.read(r, 1)
    os.close(r)
    os.waitpid(pid, 0)
    assert got == b"1"
    assert pool() is parent


def test_pool_locks_within_the_limit_and_keeps_the_rest_unlocked(monkeypatch):
    from encfs import securemem

    p = BufferPool(lock_limit=securemem.locked_bytes() + (1 << 20) + 64 * 4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, _ = p.lease(4096)
        big, _ = p.lease(1 << 20)
    assert securemem.owner(small).locked and not securemem.owner(big).locked
    assert p.unlocked == 1


# -- threads ----------------------------------------------------------------------------------


def _epoch(loader):
    return [b.clone() for b in loader]


def test_threads_give_the_same_batches_in_the_same_order(data):
    ds = EncryptedRecordDataset(data["urls"], SHAPE, np.float32, data["opts"])
    ref = _epoch(EncryptedLoader(ds, 6, seed=5, num_workers=0))
    order = list(EpochOrder(ds, seed=5))
    assert torch.equal(torch.cat(ref), torch.from_numpy(data["recs"][order]))
    for kw in [dict(threads=1), dict(threads=3), dict(threads=2, collate_fn=collate_locked, prefetch_factor=1)]:
        got = _epoch(EncryptedLoader(ds, 6, seed=5, **kw))
        assert len(got) == len(ref) and all(torch.equal(a, b) for a, b in zip(got, ref)), kw


def test_record_datasets_default_to_threads(data):
    ds = EncryptedRecordDataset(data["urls"], SHAPE, np.float32, data["opts"])
    assert EncryptedLoader(ds, 4).threads == (os.cpu_count() or 1)
    assert EncryptedLoader(ds, 4, num_workers=0).threads == 0
    assert EncryptedLoader(ds, 4, num_workers=2).threads == 0
    with pytest.raises(ValueError, match="not both"):
        EncryptedLoader(ds, 4, num_workers=2, threads=2)


# What benchmarks/bench_loaders.py measured as each map-style kind's faster way to load.
MEASURED_LOADING = {
    "EncryptedRecordDataset": "threads",
    "EncryptedNpyDataset": "threads",
    "EncryptedFileDataset": "threads",
    "EncryptedParquetDataset": "threads",
}


def _as_list(items):
    """A ``collate_fn``: the items as they are (records as bytes, to compare)."""
    return [x.numpy().tobytes() if isinstance(x, torch.Tensor) else x for x in items]


def _every_map_style_kind(data, tmp_path):
    from encfs.loaders import EncryptedFileDataset, EncryptedNpyDataset

    opts = data["opts"]
    npy = [f"encfs::file://{tmp_path}/a-{k}.npy" for k in range(2)]
    for k, url in enumerate(npy):
        _write(url, _npy_bytes(np.arange(30 * k, 30 * k + 30, dtype=np.int32).reshape(10, 3)), opts)
    out = [
        EncryptedRecordDataset(data["urls"], SHAPE, np.float32, opts),
        EncryptedNpyDataset(npy, storage_options=opts),
        EncryptedFileDataset(data["urls"], storage_options=opts),
    ]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return out
    from encfs.loaders import EncryptedParquetDataset

    pq_path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": np.arange(40, dtype=np.int64), "tag": [f"r{i}" for i in range(40)]}), pq_path, row_group_size=9)
    _write(f"encfs::file://{tmp_path}/t-enc.parquet", pq_path.read_bytes(), opts)
    return out + [EncryptedParquetDataset(f"encfs::file://{tmp_path}/t-enc.parquet", storage_options=opts)]


def test_each_map_style_kind_declares_its_measured_loading_and_the_loader_follows_it(data, tmp_path):
    kinds = _every_map_style_kind(data, tmp_path)
    assert {type(ds).__name__ for ds in kinds} <= set(MEASURED_LOADING)
    for ds in kinds:
        name = type(ds).__name__
        assert ds.loading == MEASURED_LOADING[name], name
        loader = EncryptedLoader(ds, 4, seed=2, collate_fn=_as_list)
        if ds.loading == "threads":
            assert (loader.threads, loader.num_workers) == (os.cpu_count() or 1, 0), name
        else:
            assert loader.threads == 0 and loader.num_workers > 0, name
        got = [b for b in loader]
        ref = [b for b in EncryptedLoader(ds, 4, seed=2, num_workers=0, collate_fn=_as_list)]
        assert got == ref and sum(map(len, got)) == len(ds), name
        # an explicit choice still wins over the declared default
        assert EncryptedLoader(ds, 4, num_workers=0).threads == 0
        assert (EncryptedLoader(ds, 4, num_workers=2).num_workers, EncryptedLoader(ds, 4, num_workers=2).threads) == (2, 0)
        assert EncryptedLoader(ds, 4, threads=1).threads == 1


def test_a_dataset_without_a_loading_default_reads_in_the_main_process():
    class Plain:
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return i

    loader = EncryptedLoader(Plain(), 4)
    assert (loader.threads, loader.num_workers) == (0, 0)
    assert sorted(i for b in loader for i in b.tolist()) == list(range(8))


def test_thread_prefetch_is_bounded_and_resume_is_exact(data):
    ds = EncryptedRecordDataset(data["urls"], SHAPE, np.float32, data["opts"])
    fetched = []
    real = ds.__getitems__

    class Counting:  # ds itself (its shards, layout and identity), counting its batch reads
        def __len__(self):
            return len(ds)

        def __getattr__(self, name):
            return getattr(ds, name)

        def __getitems__(self, idx):
            fetched.append(len(idx))
            return real(idx)

    loader = EncryptedLoader(Counting(), 4, seed=2, threads=2, prefetch_factor=2)
    it = iter(loader)
    seen = []
    for _ in range(3):
        seen += [tuple(r.flatten()[:3].tolist()) for r in next(it)]
    assert len(fetched) <= 3 + 2 * 2 + 1  # handed out + threads x prefetch_factor (+ one being queued)
    state = loader.state_dict()
    it.close()
    rest = EncryptedLoader(ds, 5, seed=2, num_workers=0)
    rest.load_state_dict(pickle.loads(pickle.dumps(state)))
    for b in rest:
        seen += [tuple(r.flatten()[:3].tolist()) for r in b]
    want = [tuple(data["recs"][i].flatten()[:3].tolist()) for i in EpochOrder(ds, seed=2)]
    assert seen == want


def test_threads_stop_the_epoch_on_a_tampered_shard_and_leave_no_threads(data):
    ds = EncryptedRecordDataset(data["urls"], SHAPE, np.float32, data["opts"])
    path = str(data["root"] / "r-1.bin")
    with open(path, "r+b") as f:
        f.seek(ds.shards.reader(1).header_length + cs.chunk_offset(1) + 9)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 1]))
    ds.close()
    before = threading.active_count()
    with pytest.raises(IntegrityError, match="chunk 1 failed authentication") as e:
        _epoch(EncryptedLoader(ds, 4, threads=2, shuffle=False))
    assert path in str(e.value)
    assert threading.active_count() <= before


def test_left_iteration_wipes_fetched_batches_when_asked(data):
    ds = EncryptedRecordDataset(data["urls"], SHAPE, np.float32, data["opts"])
    loader = EncryptedLoader(ds, 4, seed=1, threads=2, wipe_previous=True)
    it = iter(loader)
    first = next(it)
    assert first.any()
    second = next(it)
    assert not first.any() and second.any()
    it.close()
    assert not second.any()


# -- worker processes and shared memory -------------------------------------------------------


def test_worker_batches_arrive_in_shared_memory_and_are_wiped_there(data):
    ds = EncryptedRecordDataset(data["urls"], SHAPE, np.float32, data["opts"])
    loader = EncryptedLoader(ds, 8, seed=0, num_workers=2, multiprocessing_context="fork")
    order = list(EpochOrder(ds, seed=0))
    got = []
    for b in loader:
        assert b.is_shared()  # the worker's collate wrote it into a shared-memory segment
        got.append(b.clone())
        ptr = b.data_ptr()
        wipe_batch(b)
        assert not b.any() and b.data_ptr() == ptr  # zeroed in place: the segment itself
    assert torch.equal(torch.cat(got), torch.from_numpy(data["recs"][order]))


# -- pin_memory -------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(num_workers=0), dict(num_workers=2, multiprocessing_context="fork"), dict(threads=2)])
def test_pin_memory_keeps_working(data, kw):
    ds = EncryptedRecordDataset(data["urls"], SHAPE, np.float32, data["opts"])
    order = list(EpochOrder(ds, seed=4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: pin_memory without an accelerator is ignored
        got = _epoch(EncryptedLoader(ds, 8, seed=4, pin_memory=True, **kw))
    assert torch.equal(torch.cat(got), torch.from_numpy(data["recs"][order]))


def test_plain_dataloader_with_pin_memory(data):
    ds = EncryptedRecordDataset(data["urls"], SHAPE, np.float32, data["opts"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = list(DataLoader(ds, batch_size=16, pin_memory=True, collate_fn=collate_locked))
    assert torch.equal(torch.cat(got), torch.from_numpy(data["recs"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.cuda.is_available() is False: no CUDA device to pin for")
def test_pinned_batches_are_page_locked_and_wipeable(data):
    ds = EncryptedRecordDataset(data["urls"], SHAPE, np.float32, data["opts"])
    for kw in [dict(num_workers=0), dict(threads=2), dict(num_workers=2)]:
        for b in EncryptedLoader(ds, 8, seed=4, pin_memory=True, **kw):
            assert b.is_pinned()
            wipe_batch(b)
            assert not b.any()
