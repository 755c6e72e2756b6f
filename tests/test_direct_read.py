"""The native read path that reads ciphertext straight into the destination
(``encfs_pread_decrypt_chunks``) and the helper pool behind every native batch: results
against the pure-Python backend and the plaintext, tampering and truncation through a real
file, read errors, and the pool across threads and fork()."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from .conftest import require_native, run_threads, seal_span, write_key

require_native()

from encfs import cobblestone as cs
from encfs._native_backend import NativeBackend
from encfs.backend import PythonBackend, get_backend
from encfs.errors import FormatError, IntegrityError
from encfs.filesystem import EncFileSystem


CH, CT = cs.CHUNK_SIZE, cs.CT_CHUNK_SIZE
KEY, NONCE = bytes(range(32)), bytes(range(100, 112))
ROOT = Path(__file__).resolve().parents[1]


def seal(first: int, pt: bytes) -> bytes:
    return bytes(seal_span(KEY, NONCE, first, pt, final=True))


def native(threads: int = 4):
    return NativeBackend(threads=threads, min_chunks_per_thread=1).chunk_cipher(memoryview(KEY), NONCE)


def span_file(path: Path, lead: bytes, ct: bytes) -> int:
    path.write_bytes(lead + ct)
    return os.open(path, os.O_RDONLY)


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(0, 40 * CH + 5) | st.sampled_from([CH - 1, CH, CH + 1, 17 * CH, 17 * CH + 16]),
    first=st.integers(0, 2**38 - 100),
    lead=st.integers(0, 5000),
    threads=st.sampled_from([1, 2, 4]),
)
def test_matches_python_backend(tmp_path_factory, size, first, lead, threads):
    pt = os.urandom(size)
    ct = seal(first, pt)
    fd = span_file(tmp_path_factory.mktemp("span") / "f", os.urandom(lead), ct)
    try:
        out = bytearray(b"\xaa" * (size + 7))
        assert native(threads).pread_decrypt_into(fd, lead, first, len(ct), memoryview(out)) == size
        assert out[:size] == pt and out[size:] == b"\xaa" * 7
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0, "the fd's offset must not move"
    finally:
        os.close(fd)


N = 64


@pytest.fixture(scope="module")
def sealed(tmp_path_factory) -> tuple[bytes, bytes, Path]:
    pt = os.urandom(N * CH - 333)
    return pt, seal(0, pt), tmp_path_factory.mktemp("tamper")


@pytest.mark.parametrize("bad", [[0], [7], [8], [37], [N - 1], [20, 50], [50, 9], [5, 6, 60]])
@pytest.mark.parametrize("where", ["data", "tag"])
@pytest.mark.parametrize("threads", [1, 4])
def test_tamper_in_the_file(sealed, bad, where, threads):
    pt, ct, d = sealed
    bad_ct = bytearray(ct)
    for c in bad:
        length = min(CT, len(ct) - c * CT)
        bad_ct[c * CT + (length - 3 if where == "tag" else 1000)] ^= 0x40
    fd = span_file(d / f"t{threads}{where}{bad}", b"", bytes(bad_ct))
    lowest = min(bad)
    out = bytearray(b"\xaa" * len(pt))
    try:
        with pytest.raises(IntegrityError) as info:
            native(threads).pread_decrypt_into(fd, 0, 0, len(ct), memoryview(out))
    finally:
        os.close(fd)
    assert (info.value.chunk_index, info.value.verified_bytes) == (lowest, lowest * CH)
    assert out[: lowest * CH] == pt[: lowest * CH]
    assert not any(out[lowest * CH :]), "no byte of the failed chunk or later ones may remain"


@pytest.mark.parametrize("cut", [0, 1, CT - 1, CT, CT + 16, 30 * CT + 5, -17, -16, -1])
@pytest.mark.parametrize("threads", [1, 4])
def test_file_shorter_than_the_span(sealed, cut, threads):
    pt, ct, d = sealed
    keep = cut if cut >= 0 else len(ct) + cut
    fd = span_file(d / f"short{cut}_{threads}", b"", ct[:keep])
    out = bytearray(b"\xaa" * len(pt))
    try:
        with pytest.raises(FormatError, match="truncated"):
            native(threads).pread_decrypt_into(fd, 0, 0, len(ct), memoryview(out))
    finally:
        os.close(fd)
    assert not any(out), "a span that could not be read whole is zeroed, verified part included"


def test_read_error_is_an_oserror_and_zeroes(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY)  # a directory: preadv fails with EISDIR
    out = bytearray(b"\xaa" * (3 * CH))
    try:
        with pytest.raises(OSError) as info:
            native().pread_decrypt_into(fd, 0, 0, 3 * CT, memoryview(out))
    finally:
        os.close(fd)
    assert info.value.errno == 21 and not any(out)


def test_bad_arguments(sealed):
    pt, ct, d = sealed
    c = native()
    with pytest.raises(ValueError):
        c.pread_decrypt_into(-1, 0, 0, len(ct), memoryview(bytearray(len(pt))))
    fd = span_file(d / "args", b"", ct)
    try:
        with pytest.raises(ValueError):
            c.pread_decrypt_into(fd, -5, 0, len(ct), memoryview(bytearray(len(pt))))
        with pytest.raises(ValueError, match="too small"):
            c.pread_decrypt_into(fd, 0, 0, len(ct), memoryview(bytearray(len(pt) - 1)))
        with pytest.raises(FormatError):
            c.pread_decrypt_into(fd, 0, 0, CT + 5, memoryview(bytearray(2 * CH)))
        with pytest.raises(TypeError):
            c.pread_decrypt_into(fd, 0, 0, len(ct), memoryview(bytes(len(pt))))
        assert c.pread_decrypt_into(fd, 0, 0, 0, memoryview(bytearray())) == 0
        c.close()
        with pytest.raises(ValueError, match="closed"):
            c.pread_decrypt_into(fd, 0, 0, len(ct), memoryview(bytearray(len(pt))))
    finally:
        os.close(fd)


def test_python_and_auto_backends_decline_short_spans():
    assert PythonBackend().chunk_cipher(memoryview(KEY), NONCE).pread_decrypt_into(0, 0, 0, CT, memoryview(bytearray(CH))) is None
    auto = get_backend("auto")
    if auto.name == "auto":
        c = auto.chunk_cipher(memoryview(KEY), NONCE)
        assert c.pread_decrypt_into(0, 0, 0, (auto.min_chunks - 1) * CT, memoryview(bytearray(auto.min_chunks * CH))) is None


def test_many_python_threads_share_the_pool(tmp_path):
    """Concurrent batches: one owns the helper pool, the others run on their own threads."""
    spans = []
    for i in range(6):
        pt = os.urandom((20 + 7 * i) * CH + i)
        ct = seal(i * 1000, pt)
        (tmp_path / f"s{i}").write_bytes(ct)
        spans.append((i * 1000, pt, ct, tmp_path / f"s{i}"))
    cipher = native(threads=2)

    def work(k: int) -> None:
        first, pt, ct, path = spans[k % len(spans)]
        fd = os.open(path, os.O_RDONLY)
        try:
            for _ in range(30):
                out = bytearray(len(pt))
                assert cipher.pread_decrypt_into(fd, 0, first, len(ct), memoryview(out)) == len(pt) and out == pt
                out2 = bytearray(len(pt))
                assert cipher.decrypt_into(first, memoryview(ct), memoryview(out2)) == len(pt) and out2 == pt
        finally:
            os.close(fd)

    failures = run_threads(12, work, timeout=60)
    assert not failures, failures[0]


_FORK_CHILD = """
    import os, sys
    from encfs import cobblestone as cs
    from encfs._native_backend import NativeBackend
    from encfs.backend import PythonBackend

    key, nonce = os.urandom(32), os.urandom(12)
    pt = os.urandom(50 * cs.CHUNK_SIZE + 9)
    ref = bytearray(len(pt) + 51 * 16)
    PythonBackend().chunk_cipher(memoryview(key), nonce).encrypt_into(0, memoryview(pt), memoryview(ref), True)
    with open(sys.argv[1], "wb") as f:
        f.write(ref)

    def check(tag):
        c = NativeBackend(threads=2, min_chunks_per_thread=1).chunk_cipher(memoryview(key), nonce)
        for _ in range(20):
            out = bytearray(len(pt))
            assert c.decrypt_into(0, memoryview(ref), memoryview(out)) == len(pt) and out == pt, tag
            fd = os.open(sys.argv[1], os.O_RDONLY)
            out = bytearray(len(pt))
            assert c.pread_decrypt_into(fd, 0, 0, len(ref), memoryview(out)) == len(pt) and out == pt, tag
            os.close(fd)

    check("parent before fork")  # starts the parent's helper pool
    for gen in range(3):
        pid = os.fork()
        if pid == 0:
            try:
                check(f"child {gen}")
                pid2 = os.fork()  # and a grandchild of a child that built its own pool
                if pid2 == 0:
                    check("grandchild")
                    os._exit(0)
                _, status = os.waitpid(pid2, 0)
                os._exit(0 if status == 0 else 3)
            except BaseException as e:
                print(repr(e), file=sys.stderr)
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        assert status == 0, f"child {gen} failed: {status}"
        check(f"parent after fork {gen}")
    print("fork ok")
"""


def test_pool_survives_fork(tmp_path):
    """A child of a process whose helper pool is running builds its own (the parent's threads
    do not exist there) and never waits on the parent's; no hang, right results everywhere."""
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_FORK_CHILD), str(tmp_path / "span")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0 and "fork ok" in run.stdout, run.stdout + run.stderr


# ---- through the filesystem: a local file read by the native backend ----


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    d = tmp_path_factory.mktemp("direct")
    ref = write_key(d / "k.key")
    fs = EncFileSystem(target_protocol="file", key=ref, backend="native", skip_instance_cache=True)
    data = os.urandom(300 * CH + 4321)
    fs.pipe_file(str(d / "f.bin"), data)
    return fs, d, data


@settings(max_examples=60, deadline=None)
@given(start=st.integers(0, 300 * CH + 4321), length=st.integers(0, 80 * CH))
def test_random_ranges_equal_plaintext(local, start, length):
    fs, d, data = local
    with fs.open(str(d / "f.bin"), "rb") as f:
        f.seek(start)
        assert f.read(length) == data[start : start + length]


def test_whole_file_and_aligned_readinto(local):
    fs, d, data = local
    assert fs.cat_file(str(d / "f.bin")) == data
    with fs.open(str(d / "f.bin"), "rb") as f:
        buf, got = bytearray(64 * CH), bytearray()
        while n := f.readinto(buf):
            got += buf[:n]
    assert got == data


def _tampered_copy(fs, d: Path, name: str, mutate) -> str:
    raw = bytearray((d / "f.bin").read_bytes())
    mutate(raw, fs.open(str(d / "f.bin"), "rb")._r.header_length + cs.PAYLOAD_PREFIX_SIZE)
    (d / name).write_bytes(raw)
    fs.invalidate_cache()
    return str(d / name)


@pytest.mark.parametrize("chunk", [0, 100, 299, 300])
def test_tampered_local_file_stops_at_the_bad_chunk(local, chunk):
    fs, d, data = local

    def flip(raw: bytearray, payload: int) -> None:
        raw[payload + chunk * CT + 7] ^= 1

    path = _tampered_copy(fs, d, f"bad{chunk}", flip)
    if chunk * CH + CH > len(data):  # the final chunk: authenticated when the file opens
        with pytest.raises(IntegrityError) as info:
            fs.open(path, "rb")
        assert info.value.chunk_index == chunk
        return
    with fs.open(path, "rb") as f:
        buf = bytearray(b"\xaa" * len(data))
        with pytest.raises(IntegrityError) as info:
            f.readinto(buf)
    assert info.value.chunk_index == chunk and info.value.verified_bytes == chunk * CH
    assert buf[: chunk * CH] == data[: chunk * CH] and not any(buf[chunk * CH :])
    with pytest.raises(IntegrityError):
        fs.cat_file(path)


def test_swapped_chunks_in_a_local_file(local):
    fs, d, _ = local

    def swap(raw: bytearray, payload: int) -> None:
        a, b = payload + 10 * CT, payload + 11 * CT
        raw[a : a + CT], raw[b : b + CT] = raw[b : b + CT], raw[a : a + CT]

    with pytest.raises(IntegrityError) as info:
        fs.cat_file(_tampered_copy(fs, d, "swapped", swap))
    assert info.value.chunk_index == 10


def test_local_file_truncated_while_open(local):
    """The size is taken at open; a file cut afterwards is a FormatError naming it, not garbage."""
    fs, d, data = local
    path = _tampered_copy(fs, d, "shrinks", lambda raw, payload: None)
    with fs.open(path, "rb") as f:
        os.truncate(path, os.path.getsize(path) - 100 * CT)
        buf = bytearray(b"\xaa" * len(data))
        with pytest.raises(FormatError, match="shrinks"):
            f.readinto(buf)
    # the first read-ahead span (256 chunks) reaches past the cut: all of it is zeroed, and
    # the rest of the caller's buffer is never written
    assert not any(buf[: 256 * CH]) and buf[256 * CH :] == b"\xaa" * (len(data) - 256 * CH)


@pytest.mark.parametrize("nthreads", [0, -5, -(2**31)])
def test_nonpositive_thread_counts_run_on_the_caller_alone(nthreads):
    """The C entry points clamp nthreads < 1 to the caller's thread (no helpers started)."""
    from encfs._native import ffi, lib

    pt = os.urandom(256 * CH)
    ct = seal(0, pt)
    out = bytearray(len(pt))
    before = len(os.listdir("/proc/self/task"))
    failed = ffi.new("int64_t *")
    rc = lib.encfs_decrypt_chunks(KEY, NONCE, 0, ct, len(ct), ffi.from_buffer(out), len(out), nthreads, failed)
    assert rc == len(pt) and out == pt
    assert len(os.listdir("/proc/self/task")) <= before
