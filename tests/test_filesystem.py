"""EncFileSystem over local disk and memory: every operation checked against plaintext."""

from __future__ import annotations

import io
import os
import pickle

import fsspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from encfs import FormatError
from encfs import cobblestone as cs
from encfs.filesystem import EncFileSystem

SIZES = [0, 1, 16383, 16384, 16385, 5 * 16384 + 7, 200_000]


def _data(n: int, seed: int = 0) -> bytes:
    return os.urandom(n) if seed == 0 else bytes((i * seed) % 256 for i in range(n))


@pytest.mark.parametrize("n", SIZES)
def test_roundtrip_sizes_local(enc, n):
    fs, root = enc
    data = _data(n)
    path = f"{root}/f.bin"
    with fs.open(path, "wb") as f:
        for i in range(0, n, 10_000):
            f.write(data[i : i + 10_000])
    ct_size = os.path.getsize(path)
    assert fs.info(path)["size"] == n == fs.size(path)
    assert fs.info(path)["ciphertext_size"] == ct_size > n
    assert fs.cat_file(path) == data
    with open(path, "rb") as raw:
        assert data[:64] not in raw.read() or n < 64


def test_streaming_write_bounded_memory(enc):
    """The writer holds at most one block of chunks however much is written in one call (and
    no more locked memory than what it holds, for a file smaller than a block)."""
    fs, root = enc
    data = _data(3 * 1024 * 1024 + 5)
    with fs.open(f"{root}/big", "wb") as f:
        f.write(memoryview(data))
        assert f._w._fill < f._w._block and (f._w._pending is None or f._w._fill <= len(f._w._pending) <= f._w._block)
    with fs.open(f"{root}/big2", "wb") as f:
        f.write(memoryview(data * 2))
        assert len(f._w._pending) <= f._w._block
    assert fs.cat_file(f"{root}/big") == data


st_ops = st.lists(st.tuples(st.integers(0, 120_000), st.integers(-1, 40_000)), min_size=1, max_size=12)


@pytest.fixture(scope="module")
def random_access_file(tmp_path_factory):
    from .conftest import write_key

    d = tmp_path_factory.mktemp("ra")
    ref = write_key(d / "k.key")
    fs = EncFileSystem(key=ref, skip_instance_cache=True)
    data = _data(100_003, seed=7)
    fs.pipe_file(str(d / "x"), data)
    return fs, str(d / "x"), data


@given(ops=st_ops, readahead=st.sampled_from([1, 2, 64]))
def test_random_seeks_and_reads_match_plaintext(random_access_file, ops, readahead):
    fs, path, data = random_access_file
    with fs.open(path, "rb", readahead=readahead) as f:
        for pos, n in ops:
            f.seek(pos)
            assert f.tell() == pos
            expect = data[pos:] if n < 0 else data[pos : pos + n]
            assert f.read(n) == expect
            assert f.tell() == min(len(data), pos + len(expect)) if pos <= len(data) else True


@given(pos=st.integers(0, 100_003), n=st.integers(0, 70_000))
def test_readinto_matches_plaintext(random_access_file, pos, n):
    fs, path, data = random_access_file
    with fs.open(path, "rb") as f:
        f.seek(pos)
        buf = bytearray(n)
        got = f.readinto(buf)
        assert bytes(buf[:got]) == data[pos : pos + n]


@given(start=st.integers(-120_000, 120_000) | st.none(), end=st.integers(-120_000, 120_000) | st.none())
def test_cat_file_ranges_match_python_slicing(random_access_file, start, end):
    fs, path, data = random_access_file
    s = 0 if start is None else (max(0, len(data) + start) if start < 0 else start)
    e = len(data) if end is None else (max(0, len(data) + end) if end < 0 else end)
    assert fs.cat_file(path, start, end) == data[s:e]


def test_random_read_touches_only_its_chunks(random_access_file):
    fs, path, data = random_access_file
    with fs.open(path, "rb") as f:
        fetched = []
        real, real_pread = f._r.fetch_into, f._r._cipher.pread_decrypt_into
        f._r.fetch_into = lambda first, count, buf: fetched.append((first, count)) or real(first, count, buf)
        # spans the native backend reads from the file itself (auto: 2 chunks and more)
        f._r._cipher.pread_decrypt_into = lambda fd, off, first, n, out: fetched.append((first, cs.span_chunk_count(n))) or real_pread(fd, off, first, n, out)
        f.seek(3 * cs.CHUNK_SIZE + 10)
        assert f.read(100) == data[3 * cs.CHUNK_SIZE + 10 : 3 * cs.CHUNK_SIZE + 110]
        assert fetched == [(3, 1)]
        f.seek(cs.CHUNK_SIZE - 5)
        assert f.read(10) == data[cs.CHUNK_SIZE - 5 : cs.CHUNK_SIZE + 5]
        assert fetched[-1] == (0, 2)


def test_sequential_reads_prefetch_ahead_on_remote_targets(enc, keyref):
    fs, root = enc
    data = _data(40 * cs.CHUNK_SIZE + 3)
    remote = EncFileSystem(fs=fsspec.filesystem("memory"), key=keyref, skip_instance_cache=True)
    for f_s, path in ((fs, f"{root}/s"), (remote, "/pf/s")):
        f_s.pipe_file(path, data)
        with f_s.open(path, "rb", readahead=8) as f:
            assert b"".join(iter(lambda: f.read(5000), b"")) == data
        with f_s.open(path, "rb", readahead=8) as f:
            buf = bytearray(8 * cs.CHUNK_SIZE)
            assert f.readinto(buf) == len(buf) and bytes(buf) == data[: len(buf)]
            f.read(10)
            ahead = f._window.ahead
            if f_s is remote:
                assert ahead is not None and ahead.pending == (16, 8)
            else:
                assert ahead is None or (ahead.pending is None and not ahead.started), "local files rely on kernel read-ahead"
            assert f.read() == data[len(buf) + 10 :]


def test_cat_ranges_and_pipe_and_text_mode(enc):
    fs, root = enc
    a, b = _data(50_000, 3), _data(20_000, 5)
    fs.pipe({f"{root}/a": a, f"{root}/b": b})
    out = fs.cat_ranges([f"{root}/a", f"{root}/b", f"{root}/a"], [0, 100, 40_000], [10, 20_000, 60_000])
    assert out == [a[:10], b[100:20_000], a[40_000:]]
    assert isinstance(fs.cat_ranges([f"{root}/missing"], [0], [1])[0], Exception)
    with fs.open(f"{root}/t.txt", "w", encoding="utf-8") as f:
        f.write("héllo\nwörld\n")
    with fs.open(f"{root}/t.txt", "r", encoding="utf-8") as f:
        assert f.readlines() == ["héllo\n", "wörld\n"]


def test_listing_reports_plaintext_sizes(enc):
    fs, root = enc
    fs.pipe({f"{root}/d/x": b"x" * 100, f"{root}/d/sub/y": b"y" * 70_000, f"{root}/d/z": b""})
    ls = {os.path.basename(e["name"]): e for e in fs.ls(f"{root}/d")}
    assert ls["x"]["size"] == 100 and ls["z"]["size"] == 0 and ls["sub"]["type"] == "directory"
    assert fs.find(f"{root}/d", detail=True)[f"{root}/d/sub/y"]["size"] == 70_000
    assert sorted(fs.glob(f"{root}/d/*")) == sorted([f"{root}/d/x", f"{root}/d/z", f"{root}/d/sub"])
    assert fs.du(f"{root}/d") == 70_100
    assert fs.exists(f"{root}/d/x") and not fs.exists(f"{root}/d/nope")
    assert fs.isdir(f"{root}/d/sub") and fs.isfile(f"{root}/d/x")


def test_mv_cp_rm_keep_files_decryptable(enc):
    fs, root = enc
    data = _data(30_000)
    fs.pipe_file(f"{root}/a", data)
    fs.cp_file(f"{root}/a", f"{root}/b")
    fs.mv(f"{root}/a", f"{root}/c")
    assert not fs.exists(f"{root}/a")
    assert fs.cat_file(f"{root}/b") == data == fs.cat_file(f"{root}/c")
    fs.rm(f"{root}/b")
    assert not fs.exists(f"{root}/b")


def test_put_and_get_encrypt_and_decrypt(enc, tmp_path):
    fs, root = enc
    src = tmp_path / "plain"
    src.mkdir()
    (src / "one").write_bytes(_data(40_000))
    (src / "two").write_bytes(b"")
    fs.put(str(src), f"{root}/up", recursive=True)
    assert (src / "one").read_bytes() not in open(f"{root}/up/one", "rb").read()
    fs.get(f"{root}/up", str(tmp_path / "down"), recursive=True)
    assert (tmp_path / "down" / "one").read_bytes() == (src / "one").read_bytes()
    assert (tmp_path / "down" / "two").read_bytes() == b""


def test_memory_backend_url_and_fs_object(keyref):
    data = _data(33_000)
    with fsspec.open("encfs::memory://ds/x.bin", "wb", encfs={"key": keyref}) as f:
        f.write(data)
    raw = fsspec.filesystem("memory").cat_file("/ds/x.bin")
    assert raw[:8] == b"\x89ENCFS\r\n" and data not in raw
    with fsspec.open("encfs::memory://ds/x.bin", "rb", encfs={"key": keyref}) as f:
        assert f.read() == data
    fs = fsspec.filesystem("encfs", fs=fsspec.filesystem("memory"), key=keyref)
    assert fs.cat_file("/ds/x.bin") == data
    fs2 = fsspec.filesystem("encfs", target_protocol="memory", key=keyref)
    assert fs2.ls("/ds", detail=True)[0]["size"] == 33_000


def test_pickle_carries_references_not_key_bytes(enc, keyref):
    fs, root = enc
    fs.pipe_file(f"{root}/p", b"pickled")
    blob = pickle.dumps(fs)
    key_line = open(keyref.split(":", 1)[1]).read().split("encfs-key-v1:")[1].strip()
    assert key_line.encode() not in blob
    assert keyref.encode() in blob
    assert pickle.loads(blob).cat_file(f"{root}/p") == b"pickled"
    with fs.open(f"{root}/p", "rb") as f:
        f.seek(3)
        g = pickle.loads(pickle.dumps(f))
        assert g.read() == b"kled"


def test_in_memory_keys_refuse_to_pickle(tmp_path):
    from encfs.keys import SymmetricKey

    fs = EncFileSystem(key=[SymmetricKey.generate()], skip_instance_cache=True)
    with pytest.raises(TypeError, match="key reference"):
        pickle.dumps(fs)


def test_not_encfs_is_format_error_unless_opted_in(tmp_path, keyref):
    (tmp_path / "plain.csv").write_bytes(b"a,b\n1,2\n")
    strict = EncFileSystem(key=keyref, skip_instance_cache=True)
    with pytest.raises(FormatError, match="not an encfs file"):
        strict.cat_file(str(tmp_path / "plain.csv"))
    mixed = EncFileSystem(key=keyref, allow_plaintext=True, skip_instance_cache=True)
    assert mixed.cat_file(str(tmp_path / "plain.csv")) == b"a,b\n1,2\n"
    assert mixed.info(str(tmp_path / "plain.csv"))["encrypted"] is False


def test_append_is_refused(enc):
    fs, root = enc
    fs.pipe_file(f"{root}/a", b"x")
    with pytest.raises(NotImplementedError, match="nonce"):
        fs.open(f"{root}/a", "ab")


def test_seek_takes_any_integer_type(enc):
    import numpy as np

    fs, root = enc
    fs.pipe_file(f"{root}/n", b"0123456789")
    with fs.open(f"{root}/n", "rb") as f:
        f.seek(np.int64(4))
        assert f.read(np.int32(3)) == b"456" and type(f.tell()) is int
        with pytest.raises(TypeError):
            f.seek(1.5)


def test_exclusive_create(enc):
    fs, root = enc
    fs.pipe_file(f"{root}/a", b"x")
    with pytest.raises(FileExistsError):
        fs.open(f"{root}/a", "xb")


def test_each_file_has_its_own_key_and_salt(enc):
    fs, root = enc
    fs.pipe({f"{root}/a": b"same", f"{root}/b": b"same"})
    a, b = (open(f"{root}/{n}", "rb").read() for n in "ab")
    assert a[12:28] != b[12:28]
    assert a[-20:] != b[-20:]


def test_readable_through_io_wrappers(enc):
    fs, root = enc
    fs.pipe_file(f"{root}/lines", b"".join(b"line %d\n" % i for i in range(5000)))
    with fs.open(f"{root}/lines", "rb") as f:
        assert sum(1 for _ in io.BufferedReader(f)) == 5000


def test_read_results_are_fresh_objects(enc):
    """read() fills the bytes it returns in place: it must never touch shared singletons."""
    fs, root = enc
    data = bytes(range(256)) * 300
    fs.pipe_file(f"{root}/b", data)
    singles = [bytes([i]) for i in range(256)]
    with fs.open(f"{root}/b", "rb") as f:
        parts = [f.read(1) for _ in range(600)]
        assert f.read(0) == b"" and len(b"") == 0
        f.seek(len(data))
        assert f.read() == b"" and f.read(5) == b""
    assert b"".join(parts) == data[:600]
    assert [bytes([i]) for i in range(256)] == singles and b"\x00" == bytes(1)
    assert len({id(p) for p in parts}) == len(parts) or all(p == data[i : i + 1] for i, p in enumerate(parts))


def test_lines_and_peek(enc):
    """Iteration and readline see exactly the plaintext's lines; peek never moves the position."""
    fs, root = enc
    lines = [b"line %d %s\n" % (i, b"x" * (i * 37 % 20000)) for i in range(300)] + [b"no newline at end"]
    fs.pipe_file(f"{root}/lines", b"".join(lines))
    with fs.open(f"{root}/lines", "rb") as f:
        assert list(f) == lines
        f.seek(5)
        head = f.peek(3)
        assert f.tell() == 5 and b"".join(lines)[5 : 5 + len(head)] == head and len(head) >= 3
        assert f.readline() == lines[0][5:]
        f.seek(0, 2)
        assert f.peek() == b"" and f.readline() == b""


# -- moved from tests/test_review_fixes.py (the first and second reviews' findings) ------------

import numpy as np  # noqa: E402


def test_readers_survive_fork_into_dataloader_workers(tmp_path, keyref):
    """From the first review (tests/test_review_fixes.py, commit 927ed62): open readers keep working in
    forked DataLoader workers.
    """
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    from encfs.loaders import EncryptedRecordDataset

    arr = np.arange(64 * 5000, dtype=np.float32).reshape(5000, 64)
    url = f"encfs::file://{tmp_path}/r.bin"
    opts = {"encfs": {"key": keyref}}
    with fsspec.open(url, "wb", **opts) as f:
        f.write(arr.tobytes())
    ds = EncryptedRecordDataset([url], (64,), np.float32, storage_options=opts)
    assert torch.equal(ds[0], torch.from_numpy(arr[0]))
    ds.shards.reader(0).read_chunks(0, 6, memoryview(bytearray(6 * 16384)))  # a reader in use before fork
    dl = DataLoader(ds, batch_size=250, num_workers=2, multiprocessing_context="fork")
    assert torch.equal(torch.cat(list(dl)), torch.from_numpy(arr))


def test_open_reader_used_after_fork(tmp_path, keyref):
    """From the first review (tests/test_review_fixes.py, commit 927ed62): a reader opened before
    ``fork`` reads correctly in the child and the parent.
    """
    fs = EncFileSystem(key=keyref, skip_instance_cache=True)
    data = os.urandom(300_000)
    fs.pipe_file(f"{tmp_path}/x", data)
    f = fs.open(f"{tmp_path}/x", "rb", readahead=2)
    f.read(40_000)
    pid = os.fork()
    if pid == 0:
        try:
            f.seek(0)
            ok = f.read() == data
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    assert f.read() == data[40_000:]
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


def test_listing_survives_a_malformed_file(enc):
    """From the first review (tests/test_review_fixes.py, commit 927ed62): ``ls``/``find`` list a
    malformed file as invalid instead of failing.
    """
    fs, root = enc
    fs.pipe_file(f"{root}/good", b"g" * 1000)
    raw = open(f"{root}/good", "rb").read()
    open(f"{root}/bad-version", "wb").write(raw[:8] + b"\x09" + raw[9:])
    open(f"{root}/bad-size", "wb").write(raw[: 1024 + 56 + 10])
    entries = {os.path.basename(e["name"]): e for e in fs.ls(root)}
    assert entries["good"]["size"] == 1000 and entries["good"]["encrypted"] is True
    assert entries["bad-version"]["encrypted"].startswith("invalid")
    assert entries["bad-size"]["encrypted"].startswith("invalid")
    assert len(fs.find(root)) == 3
    with pytest.raises(FormatError):
        fs.cat_file(f"{root}/bad-version")


def test_header_length_cache_follows_file_versions(enc, tmp_path):
    """From the first review (tests/test_review_fixes.py, commit 927ed62): the cached header length
    follows a file rewritten with a longer header.
    """
    from .conftest import write_key

    fs, root = enc
    path = f"{root}/v"
    fs.pipe_file(path, b"a" * 10_000)
    assert fs.info(path)["size"] == 10_000
    many = [write_key(tmp_path / f"k{i}.key", x25519=True) for i in range(8)]
    big = EncFileSystem(key=many, skip_instance_cache=True)
    big.pipe_file(path, b"b" * (10_000 - 512))
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert big.info(path)["ciphertext_size"] == os.path.getsize(path)
    assert fs.info(path)["size"] == big.cat_file(path).__len__() == 9488


def test_threads_sharing_one_reader_get_their_own_chunks(tmp_path, keyref, monkeypatch):
    """From the second review (tests/test_review_fixes.py, commit 8c32070): threads sharing one chunk
    reader each get their own chunks (per-call scratch in the python backend).
    """
    from concurrent.futures import ThreadPoolExecutor

    from encfs import backend
    from encfs import cobblestone as cs

    monkeypatch.setattr(backend, "_BACKENDS", {})
    monkeypatch.setenv("ENCFS_BACKEND", "python")
    fs = EncFileSystem(key=keyref, skip_instance_cache=True)
    data = b"".join(bytes([i]) * cs.CHUNK_SIZE for i in range(40))
    fs.pipe_file(f"{tmp_path}/c", data)
    reader = fs.open_reader(f"{tmp_path}/c")

    def check(i: int) -> bool:
        out = bytearray(cs.CHUNK_SIZE)
        reader.read_chunks(i % 40, 1, memoryview(out))
        return bytes(out) == bytes([i % 40]) * cs.CHUNK_SIZE

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(check, range(2000)))
    reader.close()


def test_random_reads_keep_small_buffers(enc):
    """From the second review (tests/test_review_fixes.py, commit 8c32070): random reads allocate
    ciphertext buffers on demand and keep them small.
    """
    from encfs import cobblestone as cs

    fs, root = enc
    fs.pipe_file(f"{root}/r", os.urandom(300 * cs.CHUNK_SIZE))
    with fs.open(f"{root}/r", "rb") as f:
        for pos in (5, 90 * cs.CHUNK_SIZE + 7, 200 * cs.CHUNK_SIZE, 17):
            f.seek(pos)
            f.read(4096)
        assert sum(len(b) for b in f._window.ahead.buffers) <= 2 * cs.CT_CHUNK_SIZE
        assert len(f._window.buffer) <= 2 * cs.CHUNK_SIZE


def test_listing_survives_a_vanished_file(enc, monkeypatch):
    """From the second review (tests/test_review_fixes.py, commit 8c32070): a file that vanishes while
    a directory is listed is reported as invalid, not an error.
    """
    fs, root = enc
    fs.pipe_file(f"{root}/a", b"a")
    fs.pipe_file(f"{root}/b", b"b")
    real = fs.fs.cat_file

    def flaky(path, start=None, end=None, **kw):
        if path.endswith("/b"):
            raise FileNotFoundError(path)
        return real(path, start=start, end=end, **kw)

    monkeypatch.setattr(fs.fs, "cat_file", flaky)
    monkeypatch.setattr(fs.fs, "cat_ranges", lambda paths, *a, **k: [FileNotFoundError(p) for p in paths])
    fs.invalidate_cache()
    entries = {os.path.basename(e["name"]): e for e in fs.ls(root)}
    assert entries["a"]["encrypted"] is True and entries["b"]["encrypted"].startswith("invalid")
