"""encfs.loaders datasets, shard sets and locked batches, against the plaintext they hold.

Real torch DataLoaders (0 and 2 workers, fork and spawn), S3 through a moto server with fork
workers, the byte budget of random access (a byte-counting target filesystem), failures
(tampered, truncated, wrong key) and the wipe of released batches.
"""

from __future__ import annotations

import io
import os
import pickle

import fsspec
import numpy as np
import pytest
from fsspec.spec import AbstractFileSystem

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader  # noqa: E402

from encfs import cobblestone as cs  # noqa: E402
from encfs.errors import EncfsError, FormatError, IntegrityError, NoMatchingKeyError  # noqa: E402
from encfs.remote import SMALL_OBJECT  # noqa: E402
from encfs.keys.refs import load_reference  # noqa: E402
from encfs.loaders import (  # noqa: E402
    EncryptedFileDataset,
    EncryptedNpyDataset,
    EncryptedRecordDataset,
    ShardSet,
    collate_locked,
    read_batch,
    read_records,
)
from encfs.loaders.files import as_bytes  # noqa: E402
from encfs.reader import ChunkReader  # noqa: E402

C = cs.CHUNK_SIZE
REC_SHAPE = (3, 1000)  # 12,000-byte float32 records: most straddle a chunk boundary
REC_BYTES = 12_000


def _write(url: str, data: bytes, opts: dict) -> None:
    with fsspec.open(url, "wb", **opts) as f:
        f.write(data)


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


@pytest.fixture
def data(tmp_path, keyref):
    """Records, .npy and per-sample files, encrypted under ``tmp_path``, with their plaintext."""
    rng = np.random.default_rng(7)
    opts = {"encfs": {"key": keyref}}
    root = tmp_path / "enc"
    root.mkdir()
    recs = [rng.normal(size=(n, *REC_SHAPE)).astype(np.float32) for n in (9, 1, 14)]
    for k, a in enumerate(recs):
        _write(f"encfs::file://{root}/rec-{k:02d}.bin", a.tobytes(), opts)
    arrays = [rng.integers(0, 1 << 30, size=(n, 7, 301), dtype=np.int32) for n in (11, 3)]
    for k, a in enumerate(arrays):
        _write(f"encfs::file://{root}/arr-{k}.npy", _npy_bytes(a), opts)
    files = [rng.bytes(n) for n in (0, 1, 5000, C, C + 1, 3 * C - 7, 40_000)]
    for k, b in enumerate(files):
        _write(f"encfs::file://{root}/img-{k}.raw", b, opts)
    return {
        "root": root,
        "opts": opts,
        "rec_urls": [f"encfs::file://{root}/rec-{k:02d}.bin" for k in range(3)],
        "recs": np.concatenate(recs),
        "npy_urls": [f"encfs::file://{root}/arr-{k}.npy" for k in range(2)],
        "arrays": np.concatenate(arrays),
        "file_urls": [f"encfs::file://{root}/img-{k}.raw" for k in range(len(files))],
        "files": files,
    }


def _dataset(data: dict, kind: str, urls: list[str] | None = None, opts: dict | None = None):
    opts = data["opts"] if opts is None else opts
    if kind == "records":
        return EncryptedRecordDataset(urls or data["rec_urls"], REC_SHAPE, np.float32, storage_options=opts)
    if kind == "npy":
        return EncryptedNpyDataset(urls or data["npy_urls"], storage_options=opts)
    return EncryptedFileDataset(urls or data["file_urls"], as_bytes, storage_options=opts)


def _reference(data: dict, kind: str) -> list:
    if kind == "records":
        return list(data["recs"])
    if kind == "npy":
        return list(data["arrays"])
    return data["files"]


def _same(item, ref) -> bool:
    if isinstance(ref, bytes):
        return item == ref
    return torch.equal(item, torch.from_numpy(np.ascontiguousarray(ref)))


# -- ShardSet ---------------------------------------------------------------------------------


def test_shardset_expands_globs_and_brace_ranges(data):
    root, opts = data["root"], data["opts"]
    by_glob = ShardSet(f"encfs::file://{root}/rec-*.bin", opts)
    by_range = ShardSet(f"encfs::file://{root}/rec-{{00..02}}.bin", opts)
    assert by_glob.paths == by_range.paths == [f"{root}/rec-{k:02d}.bin" for k in range(3)]
    assert [by_glob.size(k) for k in range(3)] == [n * REC_BYTES for n in (9, 1, 14)]
    with pytest.raises(FileNotFoundError):
        ShardSet(f"encfs::file://{root}/nothing-*.bin", opts)


def test_shardset_pickles_key_references_never_key_bytes(data, keyref):
    ds = _dataset(data, "records")
    ds[3]  # readers open, keys loaded
    blob = pickle.dumps(ds)
    key = load_reference(keyref).secret.bytes()
    key_text = open(keyref.split(":", 1)[1]).read().split("encfs-key-v1:")[1].strip()
    assert key not in blob and key_text.encode() not in blob
    assert keyref.encode() in blob
    copy = pickle.loads(blob)
    assert copy.shards._proc.peek() is None  # nothing open travelled
    assert _same(copy[13], data["recs"][13])


def test_plaintext_urls_are_read_by_the_same_code(data, tmp_path):
    """The plaintext baseline: file:// URLs, no decryption, the same items and batches."""
    for k, a in enumerate([data["recs"][:9], data["recs"][9:10], data["recs"][10:]]):
        a.tofile(tmp_path / f"plain-{k}.bin")
    ds = EncryptedRecordDataset(f"file://{tmp_path}/plain-*.bin", REC_SHAPE, np.float32)
    assert [ds.shards.size(k) for k in range(3)] == [n * REC_BYTES for n in (9, 1, 14)]
    assert all(_same(ds[i], data["recs"][i]) for i in range(len(ds)))
    order = [int(i) for i in np.random.default_rng(3).permutation(len(ds))]
    loader = DataLoader(ds, batch_size=5, sampler=order, num_workers=2, multiprocessing_context="fork")
    assert torch.equal(torch.cat(list(loader)), torch.from_numpy(data["recs"][order]))


def test_each_process_builds_fresh_filesystems(data):
    shards = ShardSet(data["rec_urls"], data["opts"])
    again = ShardSet(data["rec_urls"], data["opts"])
    assert shards.fs is not again.fs and shards.fs.fs is not again.fs.fs


# -- batches in locked memory -------------------------------------------------------------------


def _count_read_chunks(monkeypatch) -> list:
    calls: list = []
    real = ChunkReader.read_chunks

    def spy(self, first, count, out, *a, **kw):
        calls.append((self.name, first, count))
        return real(self, first, count, out, *a, **kw)

    monkeypatch.setattr(ChunkReader, "read_chunks", spy)
    return calls


def test_read_batch_decrypts_one_run_per_touching_chunk_range(data, monkeypatch):
    shards = ShardSet(data["rec_urls"], data["opts"])
    plain = [data["recs"][:9].tobytes(), data["recs"][9:10].tobytes(), data["recs"][10:].tobytes()]
    samples = [
        (2, 5 * REC_BYTES, REC_BYTES),  # shard 2, chunks 3..4
        (0, 100, 50),  # shard 0, chunk 0
        (2, 4 * REC_BYTES + 10, 20_000),  # shard 2, chunks 2..4: overlaps the first
        (0, C - 10, 20),  # shard 0, chunks 0..1: touches the one before
        (0, 5 * C + 3, 10),  # shard 0, chunk 5: a gap, so a run of its own
        (1, 0, REC_BYTES),  # shard 1, chunk 0
        (2, 0, 0),  # empty: reads nothing
    ]
    calls = _count_read_chunks(monkeypatch)
    with read_batch(shards, samples) as batch:
        assert [bytes(v) for v in batch] == [plain[k][s : s + n] for k, s, n in samples]
        assert batch.calls == len(calls) == 4
        assert sorted(calls) == sorted(
            [(shards.paths[0], 0, 2), (shards.paths[0], 5, 1), (shards.paths[1], 0, 1), (shards.paths[2], 2, 3)]
        )


def test_released_batch_reads_zero(data):
    shards = ShardSet(data["rec_urls"], data["opts"])
    batch = read_batch(shards, [(0, 0, 3 * REC_BYTES), (2, 7, 99)])
    views = list(batch)
    whole = memoryview(batch.buffer)
    assert any(views[0]) and any(views[1])
    batch.close()
    assert not any(views[0]) and not any(views[1]) and not any(whole)
    with pytest.raises(ValueError, match="closed"):
        batch[0]
    with read_records(shards, [(2, 0, REC_BYTES), (0, 0, REC_BYTES)], REC_SHAPE, np.float32) as rb:
        tensor, array = rb.tensor, rb.array
        assert torch.equal(tensor[1], torch.from_numpy(data["recs"][0]))
    assert not tensor.any() and not array.any()


def test_record_batch_is_the_decrypted_run_when_the_layout_allows(data, monkeypatch):
    shards = ShardSet(data["rec_urls"], data["opts"])
    recs = data["recs"]
    in_order = [(2, j * REC_BYTES, REC_BYTES) for j in range(3, 8)]
    calls = _count_read_chunks(monkeypatch)
    with read_records(shards, in_order, REC_SHAPE, np.float32) as rb:
        assert not rb.copied and rb.calls == len(calls) == 1
        assert torch.equal(rb.tensor, torch.from_numpy(recs[13:18]))
        start = rb.tensor.data_ptr() - np.frombuffer(rb.buffer, np.uint8).ctypes.data
        assert start == 3 * REC_BYTES % C  # a view 3 records in (inside chunk 2), no copy
    shuffled = [in_order[j] for j in (4, 0, 3, 1, 2)] + [(0, 0, REC_BYTES)]
    with read_records(shards, shuffled, REC_SHAPE, np.float32) as rb:
        assert rb.copied and rb.calls == 2 and rb.buffer.nbytes >= 6 * REC_BYTES
        assert torch.equal(rb.tensor, torch.from_numpy(recs[[17, 13, 16, 14, 15, 0]]))


def test_batches_from_several_threads_at_once(data):
    """In-process loading on threads: one ShardSet, its readers shared (read_chunks is thread-safe)."""
    from concurrent.futures import ThreadPoolExecutor

    ds = _dataset(data, "records")
    rng = np.random.default_rng(4)
    orders = [rng.permutation(len(ds))[:8].tolist() for _ in range(24)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda idx: ds.__getitems__(idx).batch.array.copy(), orders))
    for idx, g in zip(orders, got):
        assert np.array_equal(g, data["recs"][idx])


def test_samples_outside_their_shard_are_refused(data):
    shards = ShardSet(data["rec_urls"], data["opts"])
    for bad in [(3, 0, 1), (1, -1, 2), (1, 0, REC_BYTES + 1), (1, 5, -1)]:
        with pytest.raises(ValueError, match="outside shard"):
            read_batch(shards, [(0, 0, 10), bad])


def test_getitems_and_collate_locked_hand_over_the_packed_buffer(data):
    ds = _dataset(data, "records")
    items = ds.__getitems__([4, 5, 6])
    batch = collate_locked(items)
    assert batch is items.batch.tensor
    assert torch.equal(batch, torch.from_numpy(data["recs"][4:7]))
    loader = DataLoader(ds, batch_size=5, sampler=[3, 1, 4, 1, 5, 9, 2, 6], collate_fn=collate_locked)
    assert torch.equal(torch.cat(list(loader)), torch.from_numpy(data["recs"][[3, 1, 4, 1, 5, 9, 2, 6]]))


# -- datasets through real DataLoaders ------------------------------------------------------


def _collate(kind: str):
    return list if kind == "files" else None


@pytest.mark.parametrize("kind", ["records", "npy", "files"])
def test_items_and_batches_match_plaintext(data, kind):
    ds = _dataset(data, kind)
    ref = _reference(data, kind)
    assert len(ds) == len(ref)
    for i in list(range(len(ref))) + [-1, -len(ref)]:
        assert _same(ds[i], ref[i]), i
    with pytest.raises(IndexError):
        ds[len(ref)]
    order = list(np.random.default_rng(1).permutation(len(ref)))
    got = ds.__getitems__(order + order[:3])
    assert all(_same(g, ref[i]) for g, i in zip(got, order + order[:3]))


def test_npy_header_longer_than_a_chunk_and_rows_without_a_torch_dtype(tmp_path, keyref):
    """Structured rows (no torch dtype: NumPy items) whose .npy header spans two chunks."""
    opts = {"encfs": {"key": keyref}}
    dtype = np.dtype([(f"field{j:04d}", "u1") for j in range(1500)])
    rows = np.frombuffer(np.random.default_rng(9).bytes(40 * dtype.itemsize), dtype=dtype)
    raw = _npy_bytes(rows)
    assert raw.index(b"}") > C  # the header dict ends in the second chunk
    _write(f"encfs::file://{tmp_path}/wide.npy", raw, opts)
    with pytest.raises(FormatError, match=r"wide.npy: .npy header is \d+ bytes, over max_header_size=10000"):
        EncryptedNpyDataset(f"encfs::file://{tmp_path}/wide.npy", storage_options=opts)  # NumPy's limit
    ds = EncryptedNpyDataset(f"encfs::file://{tmp_path}/wide.npy", storage_options=opts, max_header_size=1 << 16)
    assert len(ds) == 40 and not ds.tensors
    assert all(ds[i].tobytes() == rows[i].tobytes() for i in range(40))
    assert np.array_equal(np.stack(ds.__getitems__([39, 0, 7])), rows[[39, 0, 7]])


@pytest.mark.parametrize(
    "kind,workers,context",
    [
        ("records", 0, None),
        ("npy", 0, None),
        ("files", 0, None),
        ("records", 2, "fork"),
        ("npy", 2, "fork"),
        ("files", 2, "fork"),
        ("records", 2, "spawn"),
        ("files", 2, "spawn"),
        ("npy", 2, "forkserver"),
    ],
)
def test_dataloader_batches_equal_plaintext(data, kind, workers, context):
    ds = _dataset(data, kind)
    ref = _reference(data, kind)
    order = [int(i) for i in np.random.default_rng(2).permutation(len(ref))]
    loader = DataLoader(ds, batch_size=4, sampler=order, num_workers=workers, multiprocessing_context=context, collate_fn=_collate(kind))
    batches = list(loader)
    assert len(batches) == -(-len(ref) // 4)
    got = [item for b in batches for item in b]
    assert len(got) == len(ref)
    assert all(_same(g, ref[i]) for g, i in zip(got, order))


class ThreadsProbe(torch.utils.data.Dataset):
    """Reads through ``ds`` and reports ``ENCFS_THREADS`` as seen in the worker."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> str:
        self.ds[i]
        return os.environ.get("ENCFS_THREADS", "unset")


@pytest.mark.parametrize("worker_threads,expected", [(1, "1"), (None, "unset")])
def test_workers_default_to_one_encfs_thread(data, monkeypatch, worker_threads, expected):
    monkeypatch.delenv("ENCFS_THREADS", raising=False)
    ds = EncryptedRecordDataset(data["rec_urls"], REC_SHAPE, storage_options=data["opts"], worker_threads=worker_threads)
    seen = [s for b in DataLoader(ThreadsProbe(ds), batch_size=2, num_workers=2, multiprocessing_context="fork") for s in b]
    assert seen == [expected] * 4
    assert "ENCFS_THREADS" not in os.environ  # the main process is left alone


def test_s3_dataset_with_fork_workers(s3, keyref):
    _, bucket, s3opts = s3
    opts = {"encfs": {"key": keyref}, "s3": s3opts}
    rng = np.random.default_rng(5)
    recs = [rng.normal(size=(n, *REC_SHAPE)).astype(np.float32) for n in (5, 8)]
    for k, a in enumerate(recs):
        _write(f"encfs::s3://{bucket}/train/rec-{k}.bin", a.tobytes(), opts)
    ds = EncryptedRecordDataset(f"encfs::s3://{bucket}/train/rec-*.bin", REC_SHAPE, storage_options=opts)
    ref = np.concatenate(recs)
    assert _same(ds[6], ref[6])  # the parent has used its own s3fs instance before forking
    loader = DataLoader(ds, batch_size=3, sampler=list(range(len(ref)))[::-1], num_workers=2, multiprocessing_context="fork")
    assert torch.equal(torch.cat(list(loader)), torch.from_numpy(ref[::-1].copy()))


# -- the byte budget of random access ------------------------------------------------------------


class _CountingFile(io.RawIOBase):
    """A local file with no descriptor exposed (so encfs reads it by seek + read), counting bytes."""

    def __init__(self, path: str):
        self._f = open(path, "rb")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readinto(self, b) -> int:
        n = self._f.readinto(b)
        CountingFileSystem.bytes_read += n
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


class CountingFileSystem(AbstractFileSystem):
    """Local files, counting every byte read from them (the target under encfs)."""

    protocol = "counting"
    root_marker = "/"
    bytes_read = 0

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        return path[len("counting://") :] if path.startswith("counting://") else path

    def _open(self, path: str, mode: str = "rb", **kwargs):
        return _CountingFile(path)

    def info(self, path: str, **kwargs) -> dict:
        return {"name": path, "size": os.path.getsize(path), "type": "file"}


fsspec.register_implementation("counting", CountingFileSystem, clobber=True)


def _chunk_ciphertext(start: int, length: int) -> int:
    """Ciphertext bytes of the chunks under plaintext ``start .. start+length``."""
    if length == 0:
        return 0
    first, last = start // C, (start + length - 1) // C
    return (last - first + 1) * cs.CT_CHUNK_SIZE  # an upper bound at the short final chunk


@pytest.mark.parametrize("kind", ["records", "npy", "files"])
def test_item_reads_its_bytes_plus_two_chunks_at_most(data, kind):
    urls = [u.replace("encfs::file://", "encfs::counting://") for u in data[{"records": "rec_urls", "npy": "npy_urls", "files": "file_urls"}[kind]]]
    ds = _dataset(data, kind, urls)
    ref = _reference(data, kind)
    for i in range(len(ds)):
        k, start, length = ds.sample(i) if kind != "files" else (i, 0, len(ref[i]))
        fresh = pickle.loads(pickle.dumps(ds))  # no reader open: the first item pays for the header
        CountingFileSystem.bytes_read = 0
        assert _same(fresh[i], ref[i])
        first_read = CountingFileSystem.bytes_read
        CountingFileSystem.bytes_read = 0
        assert _same(fresh[i], ref[i])
        again = CountingFileSystem.bytes_read
        reader = fresh.shards.reader(k)
        if reader.ciphertext_size <= SMALL_OBJECT:  # read whole by the request that opened it, once
            assert first_read == (reader.ciphertext_size if length else 0) and again == 0, (i, first_read, again)
            continue
        budget = length + 2 * cs.CT_CHUNK_SIZE + cs.TAG_SIZE * (length // C + 1)
        assert again <= _chunk_ciphertext(start, length) <= budget, (i, again)
        assert again >= length  # (the sample's bytes were read, not served from elsewhere)
        header = reader.header_length + cs.PAYLOAD_PREFIX_SIZE
        assert first_read - again <= max(header, 4096) + cs.CT_CHUNK_SIZE, (i, first_read)


# -- failures ------------------------------------------------------------------------------------


def _epoch_error(loader: DataLoader) -> BaseException:
    """The exception that ended an epoch over ``loader`` (AssertionError if none did). Its
    traceback is dropped: it holds the iterator, whose workers are then shut down at once."""
    try:
        for _ in loader:
            pass
    except Exception as e:
        e.__traceback__ = None
        return e
    raise AssertionError("the epoch ended without an error")


def _ciphertext_path(data: dict, name: str) -> str:
    return str(data["root"] / name)


def test_tampered_shard_stops_the_epoch_naming_file_and_chunk(data):
    path = _ciphertext_path(data, "rec-02.bin")
    ds = _dataset(data, "records")
    with open(path, "r+b") as f:  # one bit of chunk 2 of the last shard (records 10+2..10+4)
        f.seek(ds.shards.reader(2).header_length + cs.chunk_offset(2) + 100)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 1]))
    ds.close()
    with pytest.raises(IntegrityError) as e:
        ds[9 + 1 + 3]
    assert e.value.path == path and e.value.chunk_index == 2
    loader = DataLoader(ds, batch_size=4, sampler=list(range(len(ds))), num_workers=2, multiprocessing_context="fork")
    error = _epoch_error(loader)
    assert isinstance(error, IntegrityError), error
    assert path in str(error) and "chunk 2 failed authentication" in str(error)


def test_truncated_shard_stops_the_epoch_naming_file_and_chunk(data):
    path = _ciphertext_path(data, "rec-02.bin")
    ds = _dataset(data, "records")
    size = os.path.getsize(path)
    os.truncate(path, size - 100)  # cut inside the final chunk after the dataset was made
    last = (14 * REC_BYTES - 1) // C
    loader = DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context="fork")
    error = _epoch_error(loader)
    assert isinstance(error, IntegrityError), error
    assert path in str(error) and f"final chunk {last}" in str(error)
    with pytest.raises(IntegrityError) as e:
        _dataset(data, "records")
    assert e.value.path == path and e.value.chunk_index == last
    os.truncate(path, size - (size - ds.shards.reader(0).header_length - cs.PAYLOAD_PREFIX_SIZE) % cs.CT_CHUNK_SIZE)
    with pytest.raises(EncfsError, match=path):  # cut at a chunk boundary
        _dataset(data, "records")


def test_missing_key_names_the_file_and_the_key_ids_it_needs(data, other_keyref):
    with pytest.raises(NoMatchingKeyError) as e:
        _dataset(data, "npy", opts={"encfs": {"key": other_keyref}})
    assert e.value.path == _ciphertext_path(data, "arr-0.npy")
    assert e.value.key_ids and all(k in str(e.value) for k in e.value.key_ids)


def test_failure_in_one_fork_worker_is_not_skipped(data):
    """A file dataset whose third file is tampered with: the epoch fails, it never yields fewer items."""
    path = _ciphertext_path(data, "img-6.raw")
    ds = _dataset(data, "files")
    with open(path, "r+b") as f:
        f.seek(ds.shards.reader(6).header_length + cs.chunk_offset(0) + 5)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x80]))
    loader = DataLoader(ds, batch_size=1, num_workers=2, multiprocessing_context="fork", collate_fn=list)
    error = _epoch_error(loader)
    assert isinstance(error, IntegrityError) and f"{path}: chunk 0 failed authentication" in str(error), error
