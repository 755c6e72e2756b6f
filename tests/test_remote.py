"""Reads from an object store: requests counted and faults injected by a proxy in front of a
real S3 API (moto server), results checked against the plaintext."""

from __future__ import annotations

import multiprocessing
import os
import random
import uuid

import numpy as np
import pytest

from encfs import cobblestone as cs
from encfs import remote
from encfs.errors import EncfsError, IntegrityError
from encfs.filesystem import EncFileSystem
from tests.latency_proxy import LatencyProxy


@pytest.fixture
def proxied(s3_endpoint, keyref, monkeypatch):
    """(encfs over s3fs through the proxy, raw s3fs, bucket, proxy, s3fs options)."""
    s3fs = pytest.importorskip("s3fs")
    monkeypatch.setenv("ENCFS_PART_SIZE", str(1 << 20))  # several parts per span at test sizes
    with LatencyProxy(s3_endpoint, latency=0.002) as proxy:
        opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": proxy.url, "region_name": "us-east-1"}}
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
        bucket = f"r{uuid.uuid4().hex[:12]}"
        fs.call_s3("create_bucket", Bucket=bucket)
        yield EncFileSystem(fs=fs, key=keyref, skip_instance_cache=True), fs, bucket, proxy, opts


def _gets(proxy: LatencyProxy, name: str) -> list:
    return [r for r in proxy.requests if r.method == "GET" and r.path.endswith("/" + name)]


def test_open_costs_two_requests_after_a_listing_and_one_when_reopened(proxied, keyref):
    enc, fs, bucket, proxy, _ = proxied
    data = os.urandom(3 << 20)
    enc.pipe_file(f"{bucket}/big", data)
    enc.ls(bucket)
    proxy.reset()
    f = enc.open(f"{bucket}/big", "rb")
    assert proxy.count() == 2 and len(_gets(proxy, "big")) == 2, proxy.requests  # header, final chunk
    f.close()
    proxy.reset()
    with enc.open(f"{bucket}/big", "rb") as f:
        assert len(_gets(proxy, "big")) == 1, proxy.requests  # same version: its header is reused; the final chunk proves it
        assert proxy.requests[0].range is not None and not proxy.requests[0].range.startswith("bytes=0-")
        f.seek(1 << 20)
        assert f.read(100) == data[(1 << 20) : (1 << 20) + 100]
    fs.invalidate_cache()
    proxy.reset()
    fresh = EncFileSystem(fs=fs, key=keyref, skip_instance_cache=True)
    fresh.open(f"{bucket}/big", "rb").close()
    assert [r.method for r in proxy.requests] == ["HEAD", "GET", "GET"]  # no listing: the size costs a HEAD


def test_a_small_object_is_one_request_open_and_read(proxied):
    enc, _, bucket, proxy, _ = proxied
    data = os.urandom(150_000)
    enc.pipe_file(f"{bucket}/small", data)
    enc.ls(bucket)
    proxy.reset()
    assert enc.cat_file(f"{bucket}/small") == data
    assert proxy.count() == 1


def test_per_sample_random_reads_cost_one_request_each(proxied):
    enc, _, bucket, proxy, _ = proxied
    data = os.urandom(8 << 20)
    enc.pipe_file(f"{bucket}/s", data)
    rng = random.Random(1)
    with enc.open(f"{bucket}/s", "rb") as f:
        proxy.reset()
        for _ in range(25):
            pos = rng.randrange(len(data) - 150_000)
            f.seek(pos)
            assert f.read(150_000) == data[pos : pos + 150_000]
        assert proxy.count() <= 25, proxy.count()
        per_sample = max(r.bytes_out for r in proxy.requests)
        assert per_sample <= (-(-150_000 // cs.CHUNK_SIZE) + 1) * cs.CT_CHUNK_SIZE, per_sample  # its chunks, no more
        reader = enc.open_reader(f"{bucket}/s")
        proxy.reset()
        out = bytearray(10 * cs.CHUNK_SIZE)
        assert reader.read_chunks(100, 10, memoryview(out)) == len(out)
        assert bytes(out) == data[100 * cs.CHUNK_SIZE : 110 * cs.CHUNK_SIZE] and proxy.count() == 1
        reader.close()


def test_cat_ranges_reads_files_concurrently_and_right(proxied):
    enc, _, bucket, proxy, _ = proxied
    files = {f"{bucket}/c/{i}": os.urandom(300_000 + i) for i in range(12)}
    for p, d in files.items():
        enc.pipe_file(p, d)
    paths = list(files) * 2
    starts = [i * 1000 for i in range(len(paths))]
    ends = [s + 50_000 for s in starts]
    got = enc.cat_ranges(paths, starts, ends)
    assert got == [files[p][s:e] for p, s, e in zip(paths, starts, ends)]
    got = enc.cat_ranges([f"{bucket}/c/0", f"{bucket}/c/missing"], 0, 10)
    assert got[0] == files[f"{bucket}/c/0"][:10] and isinstance(got[1], FileNotFoundError)
    with pytest.raises(FileNotFoundError):
        enc.cat_ranges([f"{bucket}/c/missing"], 0, 10, on_error="raise")


def test_sequential_read_fetches_ahead_in_parallel_and_delivers_in_order(proxied):
    enc, _, bucket, proxy, _ = proxied
    data = os.urandom(24 << 20)
    enc.pipe_file(f"{bucket}/seq", data)
    proxy.reset()
    with enc.open(f"{bucket}/seq", "rb") as f:
        buf, got = bytearray(4 << 20), bytearray()
        while n := f.readinto(buf):
            got += buf[:n]
        ahead = f._window.ahead
        assert ahead is not None and ahead.depth > 2  # the read-ahead grew while reads stayed sequential
    assert got == data and proxy.max_in_flight() > 2
    spans = -(-len(data) // ((4 << 20) // cs.CHUNK_SIZE * cs.CHUNK_SIZE))
    parts_per_span = -(-(4 << 20) // cs.CHUNK_SIZE * cs.CT_CHUNK_SIZE // remote.part_size())
    assert proxy.count("GET") <= spans * parts_per_span + 2, proxy.count("GET")


def test_a_long_span_is_fetched_in_parts_concurrently(proxied):
    enc, _, bucket, proxy, _ = proxied
    data = os.urandom(6 << 20)
    enc.pipe_file(f"{bucket}/parts", data)
    reader = enc.open_reader(f"{bucket}/parts")
    proxy.reset()
    out = bytearray(len(data))
    assert reader.read_chunks(0, reader.chunks, memoryview(out)) == len(data) and out == data
    ranges = [r.range for r in proxy.requests]
    assert len(ranges) >= 6 and len(set(ranges)) == len(ranges)  # 1 MiB parts, each fetched once
    assert proxy.max_in_flight() > 1
    reader.close()


@pytest.mark.parametrize("fault", ["503", "reset", "truncate"])
def test_a_failing_part_is_retried_or_an_error_never_wrong_bytes(proxied, fault):
    enc, _, bucket, proxy, _ = proxied
    data = os.urandom(6 << 20)
    enc.pipe_file(f"{bucket}/f", data)
    reader = enc.open_reader(f"{bucket}/f")
    proxy.inject(fault, when=lambda r: r.method == "GET" and r.range is not None and not r.range.startswith("bytes=0-"), times=1)
    out = bytearray(len(data))
    try:
        n = reader.read_chunks(0, reader.chunks, memoryview(out))
    except (OSError, EncfsError):
        assert not any(out), "a failed read left bytes in the buffer"
    else:
        assert n == len(data) and out == data
    reader.close()
    with enc.open(f"{bucket}/f", "rb") as f:
        proxy.inject(fault, when=lambda r: r.method == "GET", times=1)
        try:
            assert f.read() == data
        except (OSError, EncfsError):
            pass


def test_a_part_that_keeps_failing_is_an_error_and_nothing_is_released(proxied, keyref):
    import s3fs

    enc, _, bucket, proxy, opts = proxied
    data = os.urandom(6 << 20)
    enc.pipe_file(f"{bucket}/dead", data)
    impatient = s3fs.S3FileSystem(skip_instance_cache=True, config_kwargs={"retries": {"max_attempts": 1}}, **opts)
    impatient.retries = 1
    reader = EncFileSystem(fs=impatient, key=keyref, skip_instance_cache=True).open_reader(f"{bucket}/dead")
    proxy.inject("503", when=lambda r: r.method == "GET" and r.range is not None and "bytes=0-" not in r.range, times=1000)
    out = bytearray(os.urandom(len(data)))
    with pytest.raises(OSError):
        reader.read_chunks(0, reader.chunks, memoryview(out))
    assert not any(out)
    reader.close()


def test_a_tampered_part_is_an_integrity_error_with_verified_bytes_before_it(proxied):
    enc, fs, bucket, proxy, _ = proxied
    data = os.urandom(6 << 20)
    enc.pipe_file(f"{bucket}/t", data)
    raw = bytearray(fs.cat_file(f"{bucket}/t"))
    bad_chunk = 200
    raw[1024 + cs.chunk_offset(bad_chunk) + 5] ^= 1
    fs.pipe_file(f"{bucket}/t", bytes(raw))
    reader = enc.open_reader(f"{bucket}/t")
    out = bytearray(len(data))
    with pytest.raises(IntegrityError) as e:
        reader.read_chunks(0, reader.chunks, memoryview(out))
    assert e.value.chunk_index == bad_chunk and e.value.verified_bytes == bad_chunk * cs.CHUNK_SIZE
    assert out[: bad_chunk * cs.CHUNK_SIZE] == data[: bad_chunk * cs.CHUNK_SIZE] and not any(out[bad_chunk * cs.CHUNK_SIZE :])
    reader.close()


def _read_in_child(f, queue) -> None:
    try:
        f.seek(5 << 20)
        queue.put(f.read(100_000))
    except BaseException as e:  # pragma: no cover - reported to the parent
        queue.put(repr(e))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_an_open_file_reads_in_child_processes(proxied, method):
    """A forked child reads through its own s3fs instance (s3fs refuses the parent's), a
    spawned one through a reopened file; both concurrently with the parent."""
    enc, _, bucket, _, _ = proxied
    data = os.urandom(8 << 20)
    enc.pipe_file(f"{bucket}/child", data)
    with enc.open(f"{bucket}/child", "rb") as f:
        assert f.read(1000) == data[:1000]
        ctx = multiprocessing.get_context(method)
        queue = ctx.Queue()
        procs = [ctx.Process(target=_read_in_child, args=(f, queue)) for _ in range(2)]
        for p in procs:
            p.start()
        f.seek(1 << 20)
        assert f.read(100_000) == data[(1 << 20) : (1 << 20) + 100_000]
        results = [queue.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(60)
    assert results == [data[(5 << 20) : (5 << 20) + 100_000]] * 2


def test_dataset_over_the_proxy_with_spawn_workers(proxied, keyref):
    torch = pytest.importorskip("torch")
    from encfs.loaders import EncryptedRecordDataset

    enc, _, bucket, _, opts = proxied
    rng = np.random.default_rng(3)
    recs = [rng.normal(size=(n, 4, 8)).astype(np.float32) for n in (40, 25)]
    for k, a in enumerate(recs):
        enc.pipe_file(f"{bucket}/train/rec-{k}.bin", a.tobytes())
    ds = EncryptedRecordDataset(f"encfs::s3://{bucket}/train/rec-*.bin", (4, 8), storage_options={"encfs": {"key": keyref}, "s3": opts})
    ref = np.concatenate(recs)
    loader = torch.utils.data.DataLoader(ds, batch_size=7, num_workers=2, multiprocessing_context="spawn")
    assert torch.equal(torch.cat(list(loader)), torch.from_numpy(ref))


def test_io_pool_threads_run_nested_work_inline():
    """Work handed to the pool from one of its own threads runs there (no pool-on-pool wait)."""
    inner = remote.io_pool().submit(lambda: remote.run_all([remote.in_io_thread, remote.in_io_thread])).result()
    assert inner == [True, True] and not remote.in_io_thread()


# -- writes ---------------------------------------------------------------------------------------


def _uploads(fs, bucket: str) -> list:
    return fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])


def test_a_large_write_uploads_parts_concurrently_and_commits_whole(proxied):
    enc, fs, bucket, proxy, _ = proxied
    data = os.urandom(23 << 20)
    proxy.reset()
    with enc.open(f"{bucket}/w", "wb") as f:
        for i in range(0, len(data), 3 << 20):
            f.write(data[i : i + (3 << 20)])
        assert not fs.exists(f"{bucket}/w")  # nothing visible before the commit
    parts = [r for r in proxy.requests if r.method == "PUT" and "partNumber" in r.query]
    assert proxy.max_in_flight() > 1
    assert len(parts) == -(-(len(data) + 2000 + 16 * (len(data) // cs.CHUNK_SIZE + 1)) // (5 << 20))
    assert enc.cat_file(f"{bucket}/w") == data and _uploads(fs, bucket) == []


def test_a_small_write_is_one_put(proxied):
    enc, _, bucket, proxy, _ = proxied
    proxy.reset()
    enc.pipe_file(f"{bucket}/one", b"x" * 1000)
    assert [r.method for r in proxy.requests] == ["PUT"]
    assert enc.cat_file(f"{bucket}/one") == b"x" * 1000


def test_a_part_refused_once_is_retried(proxied):
    enc, fs, bucket, proxy, _ = proxied
    data = os.urandom(12 << 20)
    proxy.inject("503", when=lambda r: r.method == "PUT" and "partNumber=2" in r.query)
    enc.pipe_file(f"{bucket}/retry", data)
    assert enc.cat_file(f"{bucket}/retry") == data and _uploads(fs, bucket) == []


def test_a_part_that_keeps_failing_aborts_the_upload_and_keeps_the_old_object(proxied, keyref):
    import s3fs

    enc, fs, bucket, proxy, opts = proxied
    enc.pipe_file(f"{bucket}/keep", b"old")
    impatient = s3fs.S3FileSystem(skip_instance_cache=True, config_kwargs={"retries": {"max_attempts": 1}}, **opts)
    impatient.retries = 1
    proxy.inject("503", when=lambda r: r.method == "PUT" and "partNumber=3" in r.query, times=1000)
    with pytest.raises(OSError):
        EncFileSystem(fs=impatient, key=keyref, skip_instance_cache=True).pipe_file(f"{bucket}/keep", os.urandom(20 << 20))
    fs.invalidate_cache()
    assert enc.cat_file(f"{bucket}/keep") == b"old" and _uploads(fs, bucket) == []


def test_an_error_in_the_writer_aborts_the_upload(proxied):
    enc, fs, bucket, _, _ = proxied
    with pytest.raises(RuntimeError):
        with enc.open(f"{bucket}/crash", "wb") as f:
            f.write(os.urandom(16 << 20))
            raise RuntimeError("crash mid-upload")
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/crash") and _uploads(fs, bucket) == []


def test_a_batch_of_samples_is_one_request_each_in_flight_together(proxied, keyref):
    """``read_batch`` over an object store: one ranged GET per run of chunks, sent together."""
    from encfs.loaders import ShardSet, read_batch

    enc, _, bucket, _, opts = proxied
    data = os.urandom(16 << 20)
    enc.pipe_file(f"{bucket}/shard.bin", data)
    shards = ShardSet(f"encfs::s3://{bucket}/shard.bin", storage_options={"encfs": {"key": keyref}, "s3": opts})
    shards.reader(0)
    rng = random.Random(4)
    samples = [(0, p, 20_000) for p in sorted(rng.sample(range(0, len(data) - 20_000, 40 * cs.CHUNK_SIZE), 16))]
    with LatencyProxy(opts["client_kwargs"]["endpoint_url"], latency=0.2) as slow:
        slow_opts = {**opts, "client_kwargs": {**opts["client_kwargs"], "endpoint_url": slow.url}}
        shards = ShardSet(f"encfs::s3://{bucket}/shard.bin", storage_options={"encfs": {"key": keyref}, "s3": slow_opts})
        shards.reader(0)
        slow.reset()
        with read_batch(shards, samples) as batch:
            assert [bytes(batch[i]) for i in range(len(samples))] == [data[p : p + n] for _, p, n in samples]
        assert slow.count("GET") == len(samples) and slow.max_in_flight() > 4, slow.max_in_flight()


def test_a_parquet_footer_costs_no_request_beyond_the_open(proxied):
    """Opening reads a remote file's last chunks with its final chunk, so pyarrow's first read,
    the footer, is served from them."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")

    enc, _, bucket, proxy, _ = proxied
    table = pa.table({"x": np.arange(300_000), "s": [f"r{i}" for i in range(300_000)]})
    with enc.open(f"{bucket}/t.parquet", "wb") as f:
        pq.write_table(table, f)
    enc.ls(bucket)
    proxy.reset()
    with enc.open(f"{bucket}/t.parquet", "rb") as f:
        meta = pq.ParquetFile(f).metadata
        assert meta.num_rows == 300_000 and proxy.count() == 2, proxy.requests
        assert pq.ParquetFile(f).read().equals(table)


def test_reading_a_whole_remote_file_holds_a_bounded_amount_of_ciphertext(proxied, monkeypatch):
    """``f.read()`` of a remote file goes in steps of ``REMOTE_DIRECT`` chunks, each fetched in
    concurrent parts straight into the result: no buffer the size of the file besides it (at
    most a window or two of read-ahead)."""
    from encfs import window

    monkeypatch.setattr(window, "REMOTE_DIRECT", 512)  # 8 MiB steps
    enc, _, bucket, proxy, _ = proxied
    data = os.urandom(20 << 20)
    enc.pipe_file(f"{bucket}/whole", data)
    proxy.reset()
    with enc.open(f"{bucket}/whole", "rb") as f:
        assert f.read() == data
        ahead = f._window.ahead
        assert ahead is None or sum(len(b) for b in ahead.buffers) <= 2 * f.readahead * cs.CT_CHUNK_SIZE  # not the file's size
    assert max(r.bytes_out for r in proxy.requests) <= remote.part_size() and proxy.max_in_flight() > 1


@pytest.mark.parametrize("bad_chunk", [None, 0, 1, 40])
def test_a_long_unaligned_read_fetches_head_and_rest_together_and_stops_at_a_bad_chunk(keyref, bad_chunk):
    """An unaligned read of many windows on a remote file: the chunk under the position and the
    chunks after it are fetched at the same time; what comes back is the plaintext up to the
    first bad chunk, and nothing after it is left in the buffer."""
    from fsspec.implementations.memory import MemoryFileSystem

    mem = MemoryFileSystem(skip_instance_cache=True)
    enc = EncFileSystem(fs=mem, key=keyref, skip_instance_cache=True)
    path = f"/split-{uuid.uuid4().hex[:8]}"
    data = os.urandom(120 * cs.CHUNK_SIZE + 777)
    enc.pipe_file(path, data)
    if bad_chunk is not None:
        raw = bytearray(mem.cat_file(path))
        raw[1024 + cs.chunk_offset(bad_chunk) + 9] ^= 1
        mem.pipe_file(path, bytes(raw))
    with enc.open(path, "rb", readahead=8) as f:
        f.seek(100)
        buf = bytearray(100 * cs.CHUNK_SIZE)
        if bad_chunk is None:
            assert f.readinto(buf) == len(buf) and buf == data[100 : 100 + len(buf)]
            return
        with pytest.raises(IntegrityError) as e:
            f.readinto(buf)
        v = e.value.verified_bytes
        assert v == max(0, bad_chunk * cs.CHUNK_SIZE - 100) and f.tell() == 100 + v
        assert buf[:v] == data[100 : 100 + v] and not any(buf[v:])
