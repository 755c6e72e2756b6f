"""encfs over real gcsfs and adlfs clients talking to emulators on loopback (gcp-storage-emulator,
Azurite; see tests/emulators.py): round trips, ranged and random reads, listings, the stored
ciphertext, atomic writes, tampering, Parquet through pandas/pyarrow, forked readers. Every
result is checked against the plaintext."""

from __future__ import annotations

import io
import multiprocessing
import os
import random
import uuid

import pytest

from encfs import format as fmt
from encfs.errors import EncfsError, FormatError, IntegrityError
from encfs.filesystem import EncFileSystem
from tests.emulators import azurite_connection_string, azurite_endpoint, gcs_endpoint, missing  # noqa: F401 (fixtures)


KIB, MIB = 1 << 10, 1 << 20
PART = 256 * KIB  # ENCFS_PART_SIZE in these tests: many concurrent parts on small data


def _gcs(endpoint: str, monkeypatch):
    """gcsfs's plain client. Since gcsfs 2026.10, ``gcsfs.GCSFileSystem`` (and so ``gs://``) is
    ``ExtendedGcsFileSystem``, which first asks the gRPC storage-control API for each bucket's
    layout: against an HTTP-only emulator every such lookup waits out a 60 s timeout (it retries
    on every call, the answer "unknown" is not cached). ``gs://`` URLs get the plain class here."""
    try:
        from gcsfs.core import GCSFileSystem
    except ImportError:
        missing("gcsfs is not installed (pip install gcsfs)")
    from fsspec.registry import _registry

    for protocol in ("gs", "gcs"):
        monkeypatch.setitem(_registry, protocol, GCSFileSystem)
    opts = {"endpoint_url": endpoint, "token": "anon", "project": "encfs-test"}
    return GCSFileSystem(skip_instance_cache=True, **opts), opts


def _azure(endpoint: str):
    try:
        from adlfs import AzureBlobFileSystem
    except ImportError:
        missing("adlfs is not installed (pip install adlfs)")
    opts = {"connection_string": azurite_connection_string(endpoint)}
    return AzureBlobFileSystem(skip_instance_cache=True, **opts), opts


class Store:
    """A fresh bucket (container) on one emulator: ``raw`` is the gcsfs/adlfs client, ``enc`` encfs
    over it, ``protocol``/``opts`` what an ``encfs::`` URL needs."""

    def __init__(self, kind: str, raw, opts: dict, bucket: str, keyref: str):
        self.kind, self.raw, self.opts, self.bucket, self.keyref = kind, raw, opts, bucket, keyref
        self.protocol = "gs" if kind == "gcs" else "abfs"
        self.enc = EncFileSystem(fs=raw, key=keyref, skip_instance_cache=True)

    def p(self, name: str) -> str:
        return f"{self.bucket}/{name}"

    def url(self, name: str) -> str:
        return f"encfs::{self.protocol}://{self.p(name)}"

    @property
    def storage_options(self) -> dict:
        return {"encfs": {"key": self.keyref}, self.protocol: dict(self.opts)}

    def raw_names(self) -> list[str]:
        """Every object in the bucket, as the client lists it afresh."""
        self.raw.invalidate_cache()
        return sorted(self.raw.find(self.bucket))

    def rewrite_raw(self, name: str, data: bytes) -> None:
        self.raw.pipe_file(self.p(name), data)
        self.raw.invalidate_cache()


@pytest.fixture(params=["gcs", "azure"])
def store(request, keyref, monkeypatch) -> Store:
    monkeypatch.setenv("ENCFS_PART_SIZE", str(PART))
    if request.param == "gcs":
        raw, opts = _gcs(request.getfixturevalue("gcs_endpoint"), monkeypatch)
    else:
        raw, opts = _azure(request.getfixturevalue("azurite_endpoint"))
    bucket = f"b{uuid.uuid4().hex[:12]}"
    raw.mkdir(bucket)
    return Store(request.param, raw, opts, bucket, keyref)


def _data(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


# -- 1. round trips, reads, listings ------------------------------------------------------------

SIZES = {"empty": 0, "one-byte": 1, "one-chunk": 16 * KIB, "chunk-plus-one": 16 * KIB + 1, "few-MiB": 3 * MIB + 12345}


@pytest.mark.parametrize("how", ["pipe_file", "open-wb"])
def test_round_trip_of_every_size_and_listed_sizes(store, how):
    enc = store.enc
    files = {f"rt/{name}": _data(n, seed) for seed, (name, n) in enumerate(SIZES.items())}
    for name, data in files.items():
        if how == "pipe_file":
            enc.pipe_file(store.p(name), data)
        else:
            with enc.open(store.p(name), "wb") as f:
                for i in range(0, len(data), 100_000):  # writes of a size unrelated to chunks
                    f.write(data[i : i + 100_000])
    for name, data in files.items():
        assert enc.cat_file(store.p(name)) == data, name
        with enc.open(store.p(name), "rb") as f:
            assert f.read() == data, name
        assert enc.info(store.p(name))["size"] == len(data), name
    store.raw.invalidate_cache()
    listed = {e["name"]: e["size"] for e in enc.ls(store.p("rt"), detail=True)}
    assert listed == {store.p(n): len(d) for n, d in files.items()}
    found = enc.find(store.bucket, detail=True)
    assert {k: v["size"] for k, v in found.items()} == listed
    assert sorted(enc.find(store.bucket)) == sorted(listed)
    fresh = EncFileSystem(fs=store.raw, key=store.keyref, skip_instance_cache=True)  # nothing cached: sizes from listing alone
    assert {e["name"]: e["size"] for e in fresh.ls(store.p("rt"), detail=True)} == listed
    raw_sizes = {e["name"]: e["size"] for e in store.raw.ls(store.p("rt"), detail=True)}
    assert {e["name"]: e["ciphertext_size"] for e in fresh.ls(store.p("rt"), detail=True)} == raw_sizes


def test_random_seeks_readinto_and_ranged_cat_file(store):
    enc = store.enc
    data = _data(3 * MIB + 777, 7)
    path = store.p("random.bin")
    enc.pipe_file(path, data)
    rng = random.Random(11)
    n = len(data)
    with enc.open(path, "rb") as f:
        assert f.size == n
        for _ in range(40):
            pos = rng.randrange(n + 10)
            size = rng.choice([1, 100, 16 * KIB, 16 * KIB + 3, 300 * KIB, 1 * MIB + 5])
            f.seek(pos)
            assert f.read(size) == data[pos : pos + size], (pos, size)
            assert f.tell() == min(pos + size, max(pos, n))
        f.seek(-1000, io.SEEK_END)
        assert f.read() == data[-1000:]
        for _ in range(10):
            pos = rng.randrange(n)
            buf = bytearray(rng.choice([1, 5000, 600 * KIB]))
            f.seek(pos)
            got = f.readinto(buf)
            assert got == min(len(buf), n - pos) and bytes(buf[:got]) == data[pos : pos + got], pos
    for _ in range(15):
        a = rng.randrange(n)
        b = rng.randrange(a, min(n, a + 2 * MIB) + 1)
        assert enc.cat_file(path, start=a, end=b) == data[a:b], (a, b)
    assert enc.cat_file(path, start=-5000) == data[-5000:]
    assert enc.cat_file(path, start=10, end=-10) == data[10:-10]
    assert enc.cat_file(path, start=n, end=n + 100) == b""


def test_a_long_read_in_many_concurrent_parts(store):
    """Several MiB in 256 KiB parts (ENCFS_PART_SIZE): parts fetched concurrently, in order."""
    data = _data(6 * MIB + 99, 8)
    path = store.p("parts.bin")
    store.enc.pipe_file(path, data)
    with store.enc.open(path, "rb") as f:
        f.seek(12345)
        assert f.read(5 * MIB) == data[12345 : 12345 + 5 * MIB]
    assert store.enc.cat_file(path) == data
    paths = [path] * 4
    starts = [0, MIB, 3 * MIB + 1, 5 * MIB]
    ends = [MIB + 7, 3 * MIB, 5 * MIB, None]
    assert store.enc.cat_ranges(paths, starts, ends) == [data[s:e] for s, e in zip(starts, ends)]


def test_encfs_url_round_trip(store):
    import fsspec

    data = _data(700 * KIB, 9)
    with fsspec.open(store.url("url.bin"), "wb", **store.storage_options) as f:
        f.write(data)
    with fsspec.open(store.url("url.bin"), "rb", **store.storage_options) as f:
        f.seek(100_000)
        assert f.read(200_000) == data[100_000:300_000]
    fs, path = fsspec.core.url_to_fs(store.url("url.bin"), **store.storage_options)
    assert fs.cat_file(path) == data and fs.info(path)["size"] == len(data)


def test_sizes_follow_an_overwrite_with_another_header_length(store, request):
    """The header length encfs remembers per file version must not outlive the version: a file
    replaced by one of the same ciphertext size but a longer header lists its new size."""
    from encfs import cobblestone as cs

    path = store.p("hl.bin")
    n = 10 * cs.CHUNK_SIZE - 2000
    first, second = _data(n + 1024, 17), _data(n, 18)
    store.enc.pipe_file(path, first)
    assert store.enc.info(path)["size"] == len(first)
    ct_first = store.raw.info(path)["size"]
    EncFileSystem(fs=store.raw, key=store.keyref, header_length=2048, skip_instance_cache=True).pipe_file(path, second)
    store.raw.invalidate_cache()
    assert store.raw.info(path)["size"] == ct_first  # same ciphertext size, another header length
    assert store.enc.cat_file(path) == second
    assert store.enc.info(path)["size"] == len(second)
    assert store.enc.ls(store.bucket, detail=True)[0]["size"] == len(second)


# -- 2. what is stored --------------------------------------------------------------------------


def test_stored_object_is_ciphertext_with_the_magic(store):
    data = b"plaintext that must not be stored as it is. " * 2000
    store.enc.pipe_file(store.p("secret.txt"), data)
    raw = store.raw.cat_file(store.p("secret.txt"))
    assert raw[: len(fmt.MAGIC)] == fmt.MAGIC
    assert len(raw) > len(data)
    assert b"plaintext that must not" not in raw and data[:64] not in raw
    assert store.raw.info(store.p("secret.txt"))["size"] == len(raw)
    store.enc.pipe_file(store.p("empty"), b"")
    assert store.raw.cat_file(store.p("empty"))[: len(fmt.MAGIC)] == fmt.MAGIC


# -- 3. atomic writes ---------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [None, PART])
def test_a_failed_write_leaves_no_object(store, block_size):
    path = store.p("dir/crash.bin")
    with pytest.raises(RuntimeError, match="crash mid-write"):
        with store.enc.open(path, "wb", block_size=block_size) as f:
            for _ in range(6):
                f.write(os.urandom(MIB))
            raise RuntimeError("crash mid-write")
    assert store.raw_names() == []
    assert not store.raw.exists(path)
    with pytest.raises(FileNotFoundError):
        store.enc.cat_file(path)
    # the store still takes a write at the same path afterwards
    store.enc.pipe_file(path, b"after")
    assert store.enc.cat_file(path) == b"after" and store.raw_names() == [path]


@pytest.mark.parametrize("block_size", [None, PART])
def test_a_failed_overwrite_keeps_the_old_object(store, block_size):
    path = store.p("keep.bin")
    old = _data(2 * MIB + 5, 12)
    store.enc.pipe_file(path, old)
    with pytest.raises(RuntimeError, match="crash mid-overwrite"):
        with store.enc.open(path, "wb", block_size=block_size) as f:
            for _ in range(5):
                f.write(os.urandom(MIB))
            raise RuntimeError("crash mid-overwrite")
    assert store.raw_names() == [path]
    assert store.enc.cat_file(path) == old
    assert store.enc.info(path)["size"] == len(old)


def test_nothing_is_visible_before_close(store):
    path = store.p("pending.bin")
    data = _data(3 * MIB, 13)
    f = store.enc.open(path, "wb", block_size=PART)
    f.write(data)
    assert store.raw_names() == []
    f.close()
    assert store.raw_names() == [path] and store.enc.cat_file(path) == data


def test_a_failed_abort_does_not_hide_the_error_that_caused_it(store, monkeypatch):
    """When cancelling the upload itself fails (a network error during the abort), the error
    the ``with`` block raised is the one the caller gets, and no object appears."""
    if store.kind == "gcs":
        from gcsfs.core import GCSFile as inner
    else:
        from adlfs.spec import AzureBlobFile as inner

    def broken_discard(self):
        raise OSError("abort request failed")

    monkeypatch.setattr(inner, "discard", broken_discard)
    path = store.p("abort-fails.bin")
    with pytest.raises(BaseException) as info:
        with store.enc.open(path, "wb", block_size=PART) as f:
            f.write(os.urandom(2 * MIB))
            raise RuntimeError("the real failure")
    assert isinstance(info.value, RuntimeError) and "the real failure" in str(info.value), repr(info.value)
    assert not store.raw.exists(path)


# -- 4. tampering and truncation ----------------------------------------------------------------


def test_a_flipped_byte_is_an_integrity_error_never_wrong_bytes(store):
    from encfs import cobblestone as cs

    data = _data(40 * cs.CHUNK_SIZE + 100, 14)
    name = "tamper.bin"
    store.enc.pipe_file(store.p(name), data)
    raw = bytearray(store.raw.cat_file(store.p(name)))
    mid = len(raw) // 2
    raw[mid] ^= 0x01
    store.rewrite_raw(name, bytes(raw))
    assert store.raw.cat_file(store.p(name)) == bytes(raw)  # the store holds the tampered object

    with pytest.raises(IntegrityError) as e:
        store.enc.cat_file(store.p(name))
    assert e.value.chunk_index is not None
    bad = e.value.chunk_index
    assert 0 < bad < 40 and store.p(name) in str(e.value)
    with pytest.raises(IntegrityError):
        with store.enc.open(store.p(name), "rb") as f:
            f.read()
    # a read that ends before the bad chunk is verified plaintext; one that crosses it fails,
    # and readinto's buffer holds verified plaintext only up to ``verified_bytes``
    good_end = bad * cs.CHUNK_SIZE
    assert store.enc.cat_file(store.p(name), 0, good_end) == data[:good_end]
    with store.enc.open(store.p(name), "rb") as f:
        f.seek(good_end - 1000)
        buf = bytearray(5000)
        with pytest.raises(IntegrityError) as e2:
            f.readinto(buf)
        assert e2.value.verified_bytes == 1000 and bytes(buf[:1000]) == data[good_end - 1000 : good_end]
        assert bytes(buf[1000:]) == bytes(4000)


@pytest.mark.parametrize("cut", ["last-byte", "half", "inside-header"])
def test_a_truncated_object_is_a_clear_error(store, cut):
    data = _data(300 * KIB, 15)
    name = f"trunc-{cut}.bin"
    store.enc.pipe_file(store.p(name), data)
    raw = store.raw.cat_file(store.p(name))
    keep = {"last-byte": len(raw) - 1, "half": len(raw) // 2, "inside-header": 20}[cut]
    store.rewrite_raw(name, raw[:keep])
    with pytest.raises(EncfsError) as e:
        store.enc.cat_file(store.p(name))
    assert isinstance(e.value, (FormatError, IntegrityError)) and store.p(name) in str(e.value), repr(e.value)
    with pytest.raises(EncfsError):
        with store.enc.open(store.p(name), "rb") as f:
            f.seek(1000)
            f.read(100)


# -- 5. Parquet through pandas and pyarrow ------------------------------------------------------


def test_parquet_through_encfs_urls_with_pandas_and_pyarrow(store):
    pd = pytest.importorskip("pandas")
    pq = pytest.importorskip("pyarrow.parquet")
    import numpy as np

    rng = np.random.default_rng(5)
    n = 60_000
    df = pd.DataFrame({"i": np.arange(n, dtype=np.int64), "x": rng.normal(size=n), "s": [f"row-{k}" for k in range(n)]})
    url = store.url("tables/t.parquet")
    df.to_parquet(url, storage_options=store.storage_options, row_group_size=7_000)
    raw = store.raw.cat_file(store.p("tables/t.parquet"))
    assert raw[: len(fmt.MAGIC)] == fmt.MAGIC and b"PAR1" not in raw[:64] + raw[-64:]

    table = pq.read_table(store.p("tables/t.parquet"), filesystem=store.enc)
    pd.testing.assert_frame_equal(table.to_pandas(), df)
    pd.testing.assert_frame_equal(pd.read_parquet(url, storage_options=store.storage_options), df)
    sub = pq.read_table(store.p("tables/t.parquet"), filesystem=store.enc, columns=["s"], filters=[("i", ">=", 50_000)])
    assert sub.column("s").to_pylist() == [f"row-{k}" for k in range(50_000, n)]
    # pyarrow writing through encfs as its filesystem
    pq.write_table(table, store.p("tables/t2.parquet"), filesystem=store.enc)
    pd.testing.assert_frame_equal(pd.read_parquet(store.url("tables/t2.parquet"), storage_options=store.storage_options), df)


# -- 6. forked readers --------------------------------------------------------------------------


def _child_reads(f, enc, path, spans, queue) -> None:
    """In a forked child: read ``spans`` through the inherited open file ``f``, or (``f`` None)
    through the inherited filesystem ``enc``; put the bytes (or the error) on ``queue``."""
    try:
        out = []
        for a, b in spans:
            if f is not None:
                f.seek(a)
                out.append(f.read(b - a))
            else:
                out.append(enc.cat_file(path, start=a, end=b))
        queue.put(out)
    except BaseException as e:  # reported to the parent
        queue.put(f"{type(e).__name__}: {e}")


def _read_in_forked_children(store, through_file: bool) -> None:
    data = _data(4 * MIB + 3, 16)
    path = store.p("fork.bin")
    store.enc.pipe_file(path, data)
    with store.enc.open(path, "rb") as f:
        assert f.read(100_000) == data[:100_000]  # the parent's client, loop and pools are in use
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        spans = [[(MIB * k + 17, MIB * k + 17 + 700 * KIB), (k, k + 5), (len(data) - 40_000 + k, len(data))] for k in range(2)]
        procs = [ctx.Process(target=_child_reads, args=(f if through_file else None, store.enc, path, spans[k], queue)) for k in range(2)]
        for p in procs:
            p.start()
        f.seek(3 * MIB)
        assert f.read(MIB) == data[3 * MIB : 4 * MIB]  # the parent reads while they do
        results = [queue.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    assert all(isinstance(r, list) for r in results), results
    expected = [[data[a:b] for a, b in s] for s in spans]
    assert sorted(results) == sorted(expected)
    assert store.enc.cat_file(path, MIB, MIB + 10) == data[MIB : MIB + 10]  # the parent still reads after


def test_forked_children_read_an_open_file_concurrently(store):
    """Two forked children read the parent's open file (each through its own client) while the
    parent reads it too."""
    _read_in_forked_children(store, through_file=True)


def test_forked_children_open_and_read_through_the_inherited_filesystem(store):
    _read_in_forked_children(store, through_file=False)
