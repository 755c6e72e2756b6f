"""Concurrency: threads sharing one file object, one filesystem, and reading during a rewrap.

The plaintext is self-describing: byte ``p`` is byte ``p % 8`` of the 8-byte big-endian
number ``p // 8``. So any bytes a read hands out can be checked without knowing where the
read started: they must be one contiguous run of the plaintext (``locate``). Threads sharing
one file object race on its position (``seek`` then ``read`` is two calls), so for them each
read must return a contiguous run of plaintext of the length asked (or up to end of file),
never bytes from two places, a stale window or a failed chunk. Threads with their own file
objects (through one shared ``EncFileSystem``) must get exactly the bytes at the offsets they
asked for.
"""

from __future__ import annotations

import random
import threading

import pytest

from encfs import cobblestone as cs
from encfs.errors import EncfsError, IntegrityError
from encfs.filesystem import EncFileSystem
from encfs.keys import KeyRing, X25519Identity
from encfs.rewrap import rewrap

from .conftest import require_native, run_threads

BACKENDS = ["python", "native", "auto"]
THREADS = 16


def plaintext(n: int, salt: int = 0) -> bytes:
    words = (n + 7) // 8
    return b"".join(((i + salt * (1 << 40)) & ((1 << 64) - 1)).to_bytes(8, "big") for i in range(words))[:n]


def locate(pt: bytes, data: bytes, salt: int = 0) -> int | None:
    """The offset where ``data`` occurs in ``pt`` as a contiguous run (None: it does not)."""
    if not data:
        return 0
    if len(data) >= 15:
        for a in range(8):
            word = int.from_bytes(data[a : a + 8], "big") - salt * (1 << 40)
            p = word * 8 - a
            if 0 <= p and pt[p : p + len(data)] == data:
                return p
        return None
    p = pt.find(data)
    return None if p < 0 else p


def _backend(backend: str) -> None:
    if backend != "python":
        require_native()


SIZE = 40 * cs.CHUNK_SIZE + 1000  # 41 chunks: long spans go to the native backend under auto
OPS = 40


def _shared_reader_ops(f, pt: bytes, seed: int, allow_integrity: bool, stats: dict) -> None:
    """Random seek+read / readinto / read(n) on a file object other threads use too."""
    rng = random.Random(seed)
    buf = bytearray(300_000)
    for _ in range(OPS):
        op = rng.choice(("seek_read", "readinto", "read_n"))
        n = rng.choice((1, 100, 5000, cs.CHUNK_SIZE, 3 * cs.CHUNK_SIZE + 7, 17 * cs.CHUNK_SIZE, 250_000))
        off = rng.choice((rng.randrange(len(pt)), rng.randrange(0, len(pt), cs.CHUNK_SIZE)))
        try:
            if op == "readinto":
                f.seek(off)
                view = memoryview(buf)[:n]
                try:
                    k = f.readinto(view)
                except IntegrityError as e:
                    part = bytes(view[: e.verified_bytes])
                    if locate(pt, part) is None:
                        raise AssertionError(f"readinto raised after handing out {len(part)} bytes that are not plaintext") from None
                    raise
                data = bytes(view[:k])
            else:
                f.seek(off)
                data = f.read(n)
        except IntegrityError:
            if not allow_integrity:
                raise
            stats["integrity"] += 1
            continue
        if not data:  # another thread left the shared position at end of file
            stats["eof"] = stats.get("eof", 0) + 1
            stats["ok"] += 1
            continue
        p = locate(pt, data)
        assert p is not None, f"{op}({n}) at {off}: {len(data)} bytes that are not one contiguous run of the plaintext"
        # The position may have been moved by another thread, but a read never comes back
        # short except at the end of the file.
        assert len(data) == min(n, len(pt) - p), f"{op}({n}): {len(data)} bytes from offset {p} (short read before EOF)"
        stats["ok"] += 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_threads_share_one_file_object(enc, keyref, backend):
    _backend(backend)
    fs, root = enc
    fs = EncFileSystem(fs=fs.fs, key=keyref, backend=backend, skip_instance_cache=True)
    pt = plaintext(SIZE)
    path = f"{root}/shared.bin"
    fs.pipe_file(path, pt)
    stats = {"ok": 0, "integrity": 0}
    with fs.open(path, "rb") as f:
        failures = run_threads(THREADS, lambda i: _shared_reader_ops(f, pt, i, False, stats))
    assert not failures, "\n".join(failures[:10])
    assert stats["ok"] == THREADS * OPS


@pytest.mark.parametrize("backend", BACKENDS)
def test_threads_share_one_file_object_over_a_tampered_chunk(enc, keyref, backend):
    """One bit flipped in a middle chunk: every read returns plaintext or raises IntegrityError;
    no thread ever sees bytes of the failed chunk (or anything else that is not plaintext)."""
    _backend(backend)
    fs, root = enc
    fs = EncFileSystem(fs=fs.fs, key=keyref, backend=backend, skip_instance_cache=True)
    pt = plaintext(SIZE)
    path = f"{root}/bad.bin"
    fs.pipe_file(path, pt)
    raw = bytearray(fs.fs.cat_file(path))
    hl = int.from_bytes(raw[28:32], "big")
    bad_chunk = 20
    raw[hl + cs.PAYLOAD_PREFIX_SIZE + bad_chunk * cs.CT_CHUNK_SIZE + 1234] ^= 0x08
    fs.fs.pipe_file(path, bytes(raw))
    stats = {"ok": 0, "integrity": 0}
    with fs.open(path, "rb") as f:
        failures = run_threads(THREADS, lambda i: _shared_reader_ops(f, pt, 100 + i, True, stats))
        f.seek(bad_chunk * cs.CHUNK_SIZE + 10)
        with pytest.raises(IntegrityError):
            f.read(10)
    assert not failures, "\n".join(failures[:10])
    assert stats["ok"] + stats["integrity"] == THREADS * OPS
    assert stats["ok"] > 0 and stats["integrity"] > 0, stats


@pytest.mark.parametrize("backend", BACKENDS)
def test_threads_share_one_filesystem(enc, keyref, backend):
    """16 threads, one EncFileSystem, several files: cat_file ranges and their own open/read
    return exactly the bytes at the offsets asked for."""
    _backend(backend)
    fs, root = enc
    fs = EncFileSystem(fs=fs.fs, key=keyref, backend=backend, skip_instance_cache=True)
    files = {}
    for j, n in enumerate((0, 1000, cs.CHUNK_SIZE, 5 * cs.CHUNK_SIZE + 3, SIZE)):
        files[f"{root}/f{j}.bin"] = plaintext(n, salt=j + 1)
        fs.pipe_file(f"{root}/f{j}.bin", files[f"{root}/f{j}.bin"])
    paths = sorted(files)

    def work(i: int) -> None:
        rng = random.Random(1000 + i)
        for _ in range(25):
            p = rng.choice(paths)
            pt = files[p]
            start = rng.randrange(len(pt) + 1)
            end = min(len(pt), start + rng.choice((1, 777, cs.CHUNK_SIZE, 20 * cs.CHUNK_SIZE)))
            how = rng.choice(("cat", "cat_all", "open", "cat_ranges"))
            if how == "cat":
                got = fs.cat_file(p, start=start, end=end)
            elif how == "cat_all":
                got, start, end = fs.cat_file(p), 0, len(pt)
            elif how == "cat_ranges":
                got = fs.cat_ranges([p, p], [start, 0], [end, None], on_error="raise")
                assert got[1] == pt, f"cat_ranges whole {p} wrong"
                got = got[0]
            else:
                with fs.open(p, "rb") as f:
                    f.seek(start)
                    got = f.read(end - start)
                    buf = bytearray(min(5000, len(pt) - end))
                    k = f.readinto(buf)
                    assert bytes(buf[:k]) == pt[end : end + k], f"readinto after read in {p} wrong"
            assert got == pt[start:end], f"{how} {p}[{start}:{end}] returned {len(got)} bytes that differ"

    failures = run_threads(THREADS, work)
    assert not failures, "\n".join(failures[:10])


def test_readers_during_rewrap(enc, keyref):
    """8 threads read a file through fresh opens while it is rewrapped again and again (first
    in place, then, once the header outgrows its room, rewritten and renamed): every read is
    the plaintext or, only in the rewrite window, a typed error; most reads succeed."""
    fs, root = enc
    pt = plaintext(6 * cs.CHUNK_SIZE + 99, salt=9)
    path = f"{root}/rewrapped.bin"
    fs.pipe_file(path, pt)
    keyring = KeyRing(keyref)
    stop = threading.Event()
    counts = {"ok": 0, "typed": 0}
    lock = threading.Lock()
    added = []

    def reader(i: int) -> None:
        rng = random.Random(i)
        n = 0
        while not stop.is_set() or n < 20:
            n += 1
            start = rng.randrange(len(pt))
            try:
                if rng.random() < 0.5:
                    got, start = fs.cat_file(path), 0
                else:
                    got = fs.cat_file(path, start=start, end=start + 20000)
            except EncfsError:
                with lock:
                    counts["typed"] += 1
                continue
            assert got == pt[start : start + len(got)] and len(got) == min(len(pt) - start, 20000 if start else len(pt)), (
                f"read at {start} returned {len(got)} bytes that are not the plaintext"
            )
            with lock:
                counts["ok"] += 1

    def rewrapper() -> None:
        for _ in range(14):  # 112-byte x25519 stanzas: about 7 fit the 1024-byte header, then one grows it
            ident = X25519Identity.generate()
            rewrap(fs.fs, path, keyring, add=[ident.recipient], header_length=2048)
            added.append(ident)

    def body(i: int) -> None:
        if i == 8:
            try:
                rewrapper()
            finally:
                stop.set()
        else:
            reader(i)

    failures = run_threads(9, body)
    assert not failures, "\n".join(failures[:10])
    assert len(added) == 14
    total = counts["ok"] + counts["typed"]
    assert counts["ok"] >= total * 0.5, counts
    # The rewrapped file opens for the last recipient added and still for the original key.
    assert EncFileSystem(fs=fs.fs, key=[added[-1]], skip_instance_cache=True).cat_file(path) == pt
    assert fs.cat_file(path) == pt
    assert int.from_bytes(open(path, "rb").read(32)[28:32], "big") > 1024, "the header never outgrew its room: no rename was exercised"
