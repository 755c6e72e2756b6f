"""encfs.loaders over file formats: Parquet row groups (map-style) and WebDataset tar shards
(iterable), against the plaintext they hold.

Real DataLoaders (0 and 2 fork workers, one spawn run), simulated ranks, resume, tampered and
truncated files, a missing key, and what is read from storage (a logging target filesystem).
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from collections import Counter

import fsspec
import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem

torch = pytest.importorskip("torch")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
from torch.utils.data import DataLoader  # noqa: E402

from encfs import cobblestone as cs  # noqa: E402
from encfs.errors import EncfsError, IntegrityError, NoMatchingKeyError  # noqa: E402
from encfs.loaders import EncryptedParquetDataset, EncryptedTarDataset, TarProgress, combine_tar_states  # noqa: E402
from encfs.loaders.order import EpochOrder  # noqa: E402

from .test_loader_datasets import _CountingFile, _epoch_error  # noqa: E402

C = cs.CHUNK_SIZE


# -- a target filesystem that logs every read --------------------------------------------------


class _LoggedFile(_CountingFile):
    """A local file with no descriptor exposed (encfs reads it by seek + read), logging
    (path, offset, bytes) of every read."""

    def __init__(self, path: str):
        super().__init__(path)
        self.path = path

    def readinto(self, b) -> int:
        pos = self.tell()
        n = super().readinto(b)
        ReadLogFileSystem.log.append((self.path, pos, n))
        return n


class ReadLogFileSystem(LocalFileSystem):
    """Local disk under ``readlog://``, logging (path, offset, bytes) of every read."""

    protocol = "readlog"
    log: list[tuple[str, int, int]] = []

    def _open(self, path, mode="rb", **kwargs):
        return _LoggedFile(self._strip_protocol(path)) if mode == "rb" else super()._open(path, mode, **kwargs)


fsspec.register_implementation("readlog", ReadLogFileSystem, clobber=True)


def _reads(path) -> list[tuple[int, int]]:
    return [(o, n) for p, o, n in ReadLogFileSystem.log if p == str(path)]


def _ct(start: int, end: int) -> int:
    """Ciphertext bytes of the chunks under plaintext ``start .. end`` (an upper bound)."""
    return 0 if end <= start else ((end - 1) // C - start // C + 1) * cs.CT_CHUNK_SIZE


def _encrypt(url: str, data: bytes, opts: dict) -> None:
    with fsspec.open(url, "wb", **opts) as f:
        f.write(data)


def _flip(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


# -- Parquet ----------------------------------------------------------------------------------

ROWS = (1500, 700)
GROUP = 300


def _table(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "id": np.arange(n, dtype=np.int64) + seed * 10_000,
            "x": rng.normal(size=n),
            "label": [f"row-{i % 17}" for i in range(n)],
            "blob": [rng.bytes(int(k)) for k in rng.integers(100, 600, n)],
            "seq": [list(range(int(k))) for k in rng.integers(0, 5, n)],
        }
    )


@pytest.fixture
def parquet(tmp_path, keyref):
    """Two encrypted Parquet files of 300-row groups, their plaintext bytes and rows."""
    opts = {"encfs": {"key": keyref}}
    plain, rows = [], []
    for k, n in enumerate(ROWS):
        buf = io.BytesIO()
        pq.write_table(_table(n, k), buf, row_group_size=GROUP, compression="none")
        plain.append(buf.getvalue())
        rows += pq.read_table(io.BytesIO(buf.getvalue())).to_pylist()
        _encrypt(f"encfs::file://{tmp_path}/part-{k}.parquet", plain[-1], opts)
    return {"root": tmp_path, "opts": opts, "plain": plain, "rows": rows, "urls": [f"encfs::file://{tmp_path}/part-{k}.parquet" for k in range(2)]}


def first_value(batch) -> object:
    """A ``transform``: the one row's ``id`` (module level, so it pickles)."""
    assert batch.num_rows == 1
    return batch.column("id")[0].as_py()


def test_parquet_rows_equal_plaintext(parquet):
    ds = EncryptedParquetDataset(f"encfs::file://{parquet['root']}/part-*.parquet", storage_options=parquet["opts"])
    ref = parquet["rows"]
    assert len(ds) == len(ref) == sum(ROWS)
    assert ds.shard_sizes == [GROUP] * 5 + [GROUP, GROUP, 100]
    assert all(ds[i] == ref[i] for i in range(0, len(ref), 7))
    assert ds[-1] == ref[-1] and ds[1499] == ref[1499] and ds[1500] == ref[1500]
    with pytest.raises(IndexError):
        ds[len(ref)]
    order = np.random.default_rng(0).permutation(len(ref))[:200].tolist()
    assert ds.__getitems__(order + order[:5]) == [ref[i] for i in order + order[:5]]
    picky = EncryptedParquetDataset(parquet["urls"], columns=["blob", "id"], storage_options=parquet["opts"])
    assert picky[1777] == {"blob": ref[1777]["blob"], "id": ref[1777]["id"]}
    ids = EncryptedParquetDataset(parquet["urls"], transform=first_value, storage_options=parquet["opts"])
    assert ids.__getitems__([5, 2000, 6]) == [5, 10_000 + 500, 6]


def test_parquet_plaintext_url_is_read_by_the_same_code(parquet, tmp_path):
    (tmp_path / "plain.parquet").write_bytes(parquet["plain"][1])
    ds = EncryptedParquetDataset(f"file://{tmp_path}/plain.parquet", columns=["id", "seq"])
    assert ds.__getitems__([0, 699, 350]) == [{"id": parquet["rows"][1500 + i]["id"], "seq": parquet["rows"][1500 + i]["seq"]} for i in (0, 699, 350)]


def test_parquet_getitems_decodes_each_row_group_once(parquet, monkeypatch):
    ds = EncryptedParquetDataset(parquet["urls"], storage_options=parquet["opts"])
    calls: list[int] = []
    real = EncryptedParquetDataset.read_row_group
    monkeypatch.setattr(EncryptedParquetDataset, "read_row_group", lambda self, g: calls.append(g) or real(self, g))
    idx = [310, 5, 320, 1600, 6, 599, 1601]  # row groups 1, 0, 1, 5, 0, 1, 5
    assert ds.__getitems__(idx) == [parquet["rows"][i] for i in idx]
    assert sorted(calls) == [0, 1, 5]


def test_parquet_row_group_reads_its_column_chunks_not_the_file(parquet):
    """A row group read fetches its column chunks' chunks (plus the partial chunks at their
    ends), the footer on first open, and nothing else; never the file."""
    path = parquet["root"] / "part-0.parquet"
    url = f"encfs::readlog://{path}"
    plain = parquet["plain"][0]
    meta = pq.ParquetFile(io.BytesIO(plain)).metadata
    size = len(plain)
    footer = _ct(size - max(64 << 10, meta.serialized_size + 8), size)

    def ranges(g: int, cols: list[int]) -> list[tuple[int, int]]:
        out = []
        for c in cols:
            col = meta.row_group(g).column(c)
            start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
            out.append((start, start + col.total_compressed_size))
        return out

    for columns, cols in ((None, list(range(5))), (["x"], [1])):
        ds = EncryptedParquetDataset(url, columns=columns, storage_options=parquet["opts"])
        for g in range(meta.num_row_groups):
            fresh = pickle.loads(pickle.dumps(ds))  # nothing open: pays for header, final chunk, footer
            ReadLogFileSystem.log.clear()
            assert fresh[g * GROUP + 7] == {k: v for k, v in parquet["rows"][g * GROUP + 7].items() if columns is None or k in columns}
            first = sum(n for _, n in _reads(path))
            ReadLogFileSystem.log.clear()
            fresh[g * GROUP + 8]
            again = sum(n for _, n in _reads(path))
            wanted = sum(e - s for s, e in ranges(g, cols))
            budget = sum(_ct(s, e) for s, e in ranges(g, cols)) + len(cols) * cs.CT_CHUNK_SIZE  # a boundary chunk each, read twice at most
            assert wanted <= again <= budget, (columns, g, again, budget)
            opening = fresh.shards.reader(0).header_length + cs.PAYLOAD_PREFIX_SIZE + cs.CT_CHUNK_SIZE  # header, final chunk
            assert again + (64 << 10) <= first <= again + footer + max(opening, 4096 + cs.CT_CHUNK_SIZE), (columns, g, first)
            assert first < os.path.getsize(path) / 2


@pytest.mark.parametrize("workers,context", [(0, None), (2, "fork"), (2, "spawn")])
def test_parquet_dataloader_batches_equal_plaintext(parquet, workers, context):
    ds = EncryptedParquetDataset(parquet["urls"], storage_options=parquet["opts"])
    sampler = EpochOrder(ds, seed=3)
    loader = DataLoader(ds, batch_size=64, sampler=sampler, num_workers=workers, multiprocessing_context=context, collate_fn=list)
    got = [row for batch in loader for row in batch]
    assert got == [parquet["rows"][i] for i in sampler.indices()]
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in parquet["rows"])


def test_parquet_tampered_row_group_fails_there_only(parquet):
    path = parquet["root"] / "part-1.parquet"
    ds = EncryptedParquetDataset(parquet["urls"], storage_options=parquet["opts"])
    col = pq.ParquetFile(io.BytesIO(parquet["plain"][1])).metadata.row_group(1).column(3)  # blob, rows 1800..2099
    pos = col.dictionary_page_offset + col.total_compressed_size // 2
    _flip(path, ds.shards.reader(1).header_length + cs.chunk_offset(pos // C) + 50)
    ds.close()
    assert ds[1500] == parquet["rows"][1500] and ds[2100] == parquet["rows"][2100]  # random access around it
    with pytest.raises(IntegrityError) as e:
        ds[1900]
    assert e.value.path == str(path) and e.value.chunk_index == pos // C
    loader = DataLoader(ds, batch_size=50, num_workers=2, multiprocessing_context="fork", collate_fn=list)
    error = _epoch_error(loader)
    assert isinstance(error, IntegrityError) and f"{path}: chunk {pos // C} failed authentication" in str(error), error


def test_parquet_missing_key_and_truncated_file(parquet, other_keyref):
    with pytest.raises(NoMatchingKeyError) as e:
        EncryptedParquetDataset(parquet["urls"], storage_options={"encfs": {"key": other_keyref}})
    assert e.value.path == str(parquet["root"] / "part-0.parquet") and e.value.key_ids
    path = parquet["root"] / "part-1.parquet"
    os.truncate(path, os.path.getsize(path) - 10)
    with pytest.raises(IntegrityError, match=str(path)):
        EncryptedParquetDataset(parquet["urls"], storage_options=parquet["opts"])


# -- tar shards ---------------------------------------------------------------------------------

SHARD_SAMPLES = (7, 3, 12, 1, 9)


def _tar(samples: list[dict], extra: list[tuple[str, bytes]] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in extra:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for s in samples:
            for field, data in s.items():
                if not field.startswith("__"):
                    info = tarfile.TarInfo(f"{s['__key__']}.{field}")
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def tars(tmp_path, keyref):
    """Five encrypted WebDataset-layout shards and their samples (in shard order)."""
    rng = np.random.default_rng(11)
    opts = {"encfs": {"key": keyref}}
    shards = []
    for k, n in enumerate(SHARD_SAMPLES):
        samples = [
            {"__key__": f"s{k}/{k * 100 + j:06d}", "jpg": rng.bytes(int(rng.integers(0, 3 * C))), "cls": str(j % 4).encode(), "json": b'{"k": %d}' % j}
            for j in range(n)
        ]
        extra = [("__meta__", b"skipped"), ("README", b"no dot: skipped")] if k == 2 else []
        _encrypt(f"encfs::file://{tmp_path}/shard-{k:03d}.tar", _tar(samples, extra), opts)
        shards.append(samples)
    pattern = f"{tmp_path}/shard-{{000..004}}.tar"
    return {"root": tmp_path, "opts": opts, "shards": shards, "url": f"encfs::file://{pattern}", "logged": f"encfs::readlog://{pattern}"}


def _fields(sample: dict) -> dict:
    return {k: v for k, v in sample.items() if k not in ("__url__", "__shard__", "__index__", "__last__")}


def _unbatch(batches) -> list[dict]:
    """Samples back out of default-collated batches (lists of bytes and strings, int tensors)."""
    out = []
    for b in batches:
        n = len(b["__key__"])
        out += [{k: (v[i].item() if torch.is_tensor(v) else v[i]) for k, v in b.items()} for i in range(n)]
    return out


def test_tar_samples_equal_plaintext_each_shard_read_once_in_order(tars):
    ds = EncryptedTarDataset(tars["logged"], tars["opts"], shuffle=False)
    ReadLogFileSystem.log.clear()
    got = list(ds)
    assert [_fields(s) for s in got] == [s for shard in tars["shards"] for s in shard]
    assert [(s["__shard__"], s["__index__"], s["__last__"]) for s in got] == [
        (k, j, j == n - 1) for k, n in enumerate(SHARD_SAMPLES) for j in range(n)
    ]
    assert got[0]["__url__"] == f"encfs::readlog://{tars['root']}/shard-000.tar"
    for k in range(len(SHARD_SAMPLES)):
        path = tars["root"] / f"shard-{k:03d}.tar"
        reads = _reads(path)
        header = ds.shards.reader(k).header_length
        payload = [(o, n) for o, n in reads if o >= header]
        size = os.path.getsize(path)
        # Opening authenticates the final chunk (one read); the stream is then one pass, in order.
        stream = payload[1:]
        assert all(o1 + n1 == o2 for (o1, n1), (o2, _) in zip(stream, stream[1:])), reads
        assert stream[0][0] == header + cs.chunk_offset(0) and stream[-1][0] + stream[-1][1] == size
        assert sum(n for _, n in reads) <= size + cs.CT_CHUNK_SIZE + 4096


@pytest.mark.parametrize("workers,context", [(0, None), (2, "fork"), (2, "spawn")])
def test_tar_dataloader_sees_every_sample_once(tars, workers, context):
    ds = EncryptedTarDataset(tars["url"], tars["opts"], seed=5)
    ds.set_epoch(2)
    loader = DataLoader(ds, batch_size=4, num_workers=workers, multiprocessing_context=context)
    got = _unbatch(loader)
    assert sorted(s["__key__"] for s in got) == sorted(s["__key__"] for shard in tars["shards"] for s in shard)
    by_key = {s["__key__"]: s for shard in tars["shards"] for s in shard}
    assert all(_fields(s) == by_key[s["__key__"]] for s in got)
    for k in range(len(SHARD_SAMPLES)):  # each shard in file order (one worker read it)
        assert [s["__index__"] for s in got if s["__shard__"] == k] == list(range(SHARD_SAMPLES[k]))
    if workers == 0:
        assert list(dict.fromkeys(s["__shard__"] for s in got)) == ds.shard_order()


def test_tar_shard_order_is_deterministic_and_split_exactly_once(tars):
    ds = EncryptedTarDataset(tars["url"], tars["opts"], seed=1)
    again = EncryptedTarDataset(tars["url"], tars["opts"], seed=1)
    assert ds.shard_order() == again.shard_order() and sorted(ds.shard_order()) == list(range(5))
    assert {tuple(ds.shard_order(e)) for e in range(6)} != {tuple(ds.shard_order())}  # epochs differ
    for world, workers in ((1, 1), (2, 2), (3, 2), (7, 1)):  # 3 x 2 and 7 x 1: more slots than shards
        dealt = [
            k
            for r in range(world)
            for w in range(workers)
            for k, _ in EncryptedTarDataset(tars["url"], tars["opts"], seed=1, world_size=world, rank=r).assigned(w, workers)
        ]
        assert sorted(dealt) == list(range(5)), (world, workers)
    rank1 = EncryptedTarDataset(tars["url"], tars["opts"], seed=1, world_size=2, rank=1)
    assert [k for k, _ in rank1.assigned(0, 1)] == ds.shard_order()[1::2]


def test_tar_resume_at_other_rank_and_worker_counts_sees_each_sample_once(tars):
    """Stop mid-epoch at 2 ranks x 2 fork workers, resume at 1 rank x 0 workers and at 3 ranks x 1."""
    everything = Counter(s["__key__"] for shard in tars["shards"] for s in shard)
    for resume_world, resume_workers in ((1, 0), (3, 1)):
        seen: Counter = Counter()
        states = []
        for rank in range(2):
            ds = EncryptedTarDataset(tars["url"], tars["opts"], seed=9, world_size=2, rank=rank)
            ds.set_epoch(1)
            progress = TarProgress(ds)
            for i, batch in enumerate(DataLoader(ds, batch_size=2, num_workers=2, multiprocessing_context="fork")):
                if i == 3:
                    break
                progress.update(batch)
                seen.update(batch["__key__"])
            states.append(progress.state_dict())
        state = combine_tar_states(states)
        assert state["epoch"] == 1 and (state["done"] or state["partial"])
        for rank in range(resume_world):
            ds = EncryptedTarDataset(tars["url"], tars["opts"], seed=9, world_size=resume_world, rank=rank)
            ds.load_state_dict(state)
            ds.set_epoch(1)  # same epoch: the resume point is kept
            assert not set(state["done"]) & {k for w in range(max(resume_workers, 1)) for k, _ in ds.assigned(w, max(resume_workers, 1))}
            for batch in DataLoader(ds, batch_size=3, num_workers=resume_workers, multiprocessing_context="fork" if resume_workers else None):
                seen.update(batch["__key__"])
        assert seen == everything, (resume_world, resume_workers)
    ds.set_epoch(2)
    assert ds.assigned(0, 1) == [(k, 0) for k in ds.shard_order()[rank::resume_world]]
    with pytest.raises(ValueError, match="seed"):
        EncryptedTarDataset(tars["url"], tars["opts"], seed=8).load_state_dict(state)


def test_tar_progress_counts_prefixes_and_finished_shards(tars):
    ds = EncryptedTarDataset(tars["url"], tars["opts"], shuffle=False)
    progress = TarProgress(ds)
    samples = list(ds.samples(2)) + list(ds.samples(0))[:4]
    progress.update(samples[:5])
    progress.update(samples[5])  # one sample dict
    assert progress.state_dict()["partial"] == [[2, 6]] and progress.state_dict()["done"] == []
    progress.update(samples[6:])
    state = progress.state_dict()
    assert state["done"] == [2] and state["partial"] == [[0, 4]]
    ds.load_state_dict(state)
    assert [_fields(s) for s in ds] == tars["shards"][0][4:] + [s for k in (1, 3, 4) for s in tars["shards"][k]]
    with pytest.raises(ValueError, match="disagree"):
        combine_tar_states([state, {**state, "epoch": 3}])


def test_tar_decode_by_field_and_by_sample(tars):
    by_field = EncryptedTarDataset(tars["url"], tars["opts"], shuffle=False, decode={"cls": int, "__key__": len})
    first = next(iter(by_field))
    assert first["cls"] == 0 and first["__key__"] == "s0/000000" and first["jpg"] == tars["shards"][0][0]["jpg"]
    whole = EncryptedTarDataset(tars["url"], tars["opts"], shuffle=False, decode=_key_and_size)
    assert list(whole)[:2] == [(s["__key__"], len(s["jpg"])) for s in tars["shards"][0][:2]]


def _key_and_size(sample: dict) -> tuple:
    return sample["__key__"], len(sample["jpg"])


def _shard_path(tars: dict, k: int):
    return tars["root"] / f"shard-{k:03d}.tar"


def test_tar_tampered_shard_stops_the_epoch_from_a_worker(tars):
    ds = EncryptedTarDataset(tars["url"], tars["opts"], seed=2)
    path = _shard_path(tars, 2)
    _flip(path, ds.shards.reader(2).header_length + cs.chunk_offset(3) + 77)
    ds.close()
    with pytest.raises(IntegrityError) as e:
        list(ds.samples(2))
    assert e.value.path == str(path) and e.value.chunk_index == 3
    error = _epoch_error(DataLoader(ds, batch_size=2, num_workers=2, multiprocessing_context="fork"))
    assert isinstance(error, IntegrityError) and f"{path}: chunk 3 failed authentication" in str(error), error


def test_tar_truncated_shard_stops_the_epoch_naming_it(tars):
    ds = EncryptedTarDataset(tars["url"], tars["opts"])
    path = _shard_path(tars, 4)
    os.truncate(path, os.path.getsize(path) - 100)
    error = _epoch_error(DataLoader(ds, batch_size=2, num_workers=2, multiprocessing_context="fork"))
    assert isinstance(error, IntegrityError) and str(path) in str(error) and "final chunk" in str(error), error
    with pytest.raises(EncfsError, match=str(path)):
        EncryptedTarDataset(tars["url"], tars["opts"])


def test_tar_missing_key_names_the_file_and_key_ids(tars, other_keyref):
    with pytest.raises(NoMatchingKeyError) as e:
        EncryptedTarDataset(tars["url"], {"encfs": {"key": other_keyref}})
    assert e.value.path == str(_shard_path(tars, 0)) and all(k in str(e.value) for k in e.value.key_ids)


def test_tar_damaged_archive_inside_good_encryption_is_an_error(tmp_path, keyref):
    opts = {"encfs": {"key": keyref}}
    good = _tar([{"__key__": f"{j:03d}", "bin": bytes(3000)} for j in range(4)])
    _encrypt(f"encfs::file://{tmp_path}/cut.tar", good[:4000], opts)  # ends inside the second header
    _encrypt(f"encfs::file://{tmp_path}/short.tar", good[:6000], opts)  # ends inside the second member's data
    _encrypt(f"encfs::file://{tmp_path}/bare.tar", good[:3584], opts)  # ends after a whole member: no end marker
    _encrypt(f"encfs::file://{tmp_path}/dup.tar", _tar([{"__key__": "a", "x": b"1"}, {"__key__": "a", "x": b"2"}]), opts)
    for name in ("cut", "short", "bare"):
        with pytest.raises(tarfile.ReadError, match=f"{tmp_path}/{name}.tar"):
            list(EncryptedTarDataset(f"encfs::file://{tmp_path}/{name}.tar", opts))
    with pytest.raises(ValueError, match="field 'x' repeated in sample 'a'"):
        list(EncryptedTarDataset(f"encfs::file://{tmp_path}/dup.tar", opts))


def test_tar_webdataset_reader_over_an_encfs_file_gives_the_same_samples(tars):
    wds = pytest.importorskip("webdataset")
    ds = EncryptedTarDataset(tars["url"], tars["opts"], shuffle=False)
    ours = [_fields(s) for s in ds.samples(2)]
    with fsspec.open(tars["url"].replace("{000..004}", "002"), "rb", **tars["opts"]) as f:
        theirs = [
            {k: v for k, v in s.items() if k not in ("__url__", "__local_path__")}
            for s in wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander([{"stream": f, "url": "shard-002"}]))
        ]
    assert ours == theirs == tars["shards"][2]


def test_formats_over_s3_with_fork_workers(s3, keyref, parquet, tars):
    """Both datasets over encfs::s3:// (moto), used in the parent before fork workers start."""
    _, bucket, s3opts = s3
    opts = {"encfs": {"key": keyref}, "s3": s3opts}
    for k, blob in enumerate(parquet["plain"]):
        _encrypt(f"encfs::s3://{bucket}/pq/part-{k}.parquet", blob, opts)
    for k in range(3):
        with open(_shard_path(tars, k), "rb") as src, fsspec.open(f"s3://{bucket}/tar/shard-{k}.tar", "wb", **s3opts) as dst:
            dst.write(src.read())  # ciphertext copied as it is: same key
    rows = EncryptedParquetDataset(f"encfs::s3://{bucket}/pq/part-*.parquet", storage_options=opts)
    assert rows[1234] == parquet["rows"][1234]
    order = np.random.default_rng(4).permutation(len(rows))[:300].tolist()
    got = [r for b in DataLoader(rows, batch_size=50, sampler=order, num_workers=2, multiprocessing_context="fork", collate_fn=list) for r in b]
    assert got == [parquet["rows"][i] for i in order]
    samples = EncryptedTarDataset(f"encfs::s3://{bucket}/tar/shard-{{0..2}}.tar", opts, seed=1)
    assert next(iter(samples))["__url__"].startswith(f"encfs::s3://{bucket}/tar/")
    keys = sorted(k for b in DataLoader(samples, batch_size=2, num_workers=2, multiprocessing_context="fork") for k in b["__key__"])
    assert keys == sorted(s["__key__"] for shard in tars["shards"][:3] for s in shard)
