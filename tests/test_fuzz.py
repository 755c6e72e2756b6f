"""Fuzz targets over the header parser and the reader (hypothesis-driven).

Inputs: arbitrary bytes (also behind a valid 32-byte prefix, so the stanza parser is
reached), and valid files mutated by bit flips, byte overwrites, insertions, deletions,
truncations and splices of two valid files. Targets:

* ``encfs.format.parse_fixed_fields`` / ``parse``;
* opening and reading a file through ``EncFileSystem(...).open(path, "rb")`` (``read(n)``
  and ``readinto`` loops) and ``cat_file``, under each backend (python, native, auto).

Properties: the only exceptions are encfs's typed errors (``EncfsError`` subclasses); inputs
are bounded, so nothing hangs; every byte handed out equals the plaintext of the file whose
header the input starts with, at the same offset; a read that completes returns that whole
plaintext, and only for an input byte-identical to a valid file (everything else in a file is
authenticated or must be zero).

The short run is these tests (``max_examples`` from the hypothesis profile in conftest);
``scripts/fuzz.py`` runs the same targets for as long as asked.
"""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from encfs import cobblestone as cs
from encfs import format as fmt
from encfs.errors import EncfsError
from encfs.filesystem import EncFileSystem

from .conftest import require_native, write_key

BACKENDS = ("python", "native", "auto")
SIZES = (0, 1, 100, cs.CHUNK_SIZE - 1, cs.CHUNK_SIZE, cs.CHUNK_SIZE + 1, 40000)
MAX_INPUT = 64 << 10
# These targets take about a millisecond an example: run 20x the profile's max_examples (ci: 1200, dev: 500).
FUZZ = settings(max_examples=20 * settings.default.max_examples, suppress_health_check=[HealthCheck.function_scoped_fixture])


# -- the corpus ------------------------------------------------------------------------------
class Corpus:
    """Valid files (one per size, plus one with a passphrase recipient) and one filesystem per
    backend reading a scratch directory."""

    def __init__(self, root: Path, backends=BACKENDS, passphrase_env: str | None = None):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.ref = write_key(root / "k.key")
        writer = EncFileSystem(target_protocol="file", key=self.ref, backend="python", skip_instance_cache=True)
        rng = random.Random(1)
        self.files: list[tuple[bytes, bytes]] = []  # (ciphertext file, plaintext)
        for n in SIZES:
            pt = rng.randbytes(n)
            p = root / f"valid-{n}"
            writer.pipe_file(str(p), pt)
            self.files.append((p.read_bytes(), pt))
        self.readers = {
            b: EncFileSystem(target_protocol="file", key=self.ref, backend=b, skip_instance_cache=True) for b in backends
        }
        self.n = 0

    def path(self) -> str:
        self.n += 1
        return str(self.root / f"input-{self.n}")


# -- mutations -------------------------------------------------------------------------------
# An op is a tuple: ("flip", pos, bit) ("put", pos, bytes) ("insert", pos, bytes)
# ("delete", pos, length) ("truncate", pos) ("splice", other_file_index, cut_a, cut_b).
# Positions are taken modulo the current length, so any integer is a valid position.


def apply_ops(blob: bytes, ops: list[tuple], files: list[tuple[bytes, bytes]]) -> bytes:
    b = bytearray(blob)
    for op in ops:
        kind = op[0]
        pos = op[1] % (len(b) + 1) if kind not in ("splice",) else 0
        if kind == "flip" and b:
            b[pos % len(b)] ^= 1 << op[2]
        elif kind == "put" and b:
            p = pos % len(b)
            b[p : p + len(op[2])] = op[2][: len(b) - p]
        elif kind == "insert":
            b[pos:pos] = op[2]
        elif kind == "delete":
            del b[pos : pos + op[2]]
        elif kind == "truncate":
            del b[pos:]
        elif kind == "splice":
            other = files[op[1] % len(files)][0]
            a, c = op[2] % (len(b) + 1), op[3] % (len(other) + 1)
            b = b[:a] + bytearray(other[c:])
    return bytes(b[:MAX_INPUT])


positions = st.one_of(st.integers(0, 1200), st.integers(0, MAX_INPUT))
op_strategy = st.one_of(
    st.tuples(st.just("flip"), positions, st.integers(0, 7)),
    st.tuples(st.just("put"), positions, st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("insert"), positions, st.binary(min_size=1, max_size=40)),
    st.tuples(st.just("delete"), positions, st.integers(1, 40)),
    st.tuples(st.just("truncate"), positions),
    st.tuples(st.just("splice"), st.integers(0, 100), positions, positions),
)
ops_strategy = st.lists(op_strategy, min_size=1, max_size=4)


def random_ops(rng: random.Random) -> list[tuple]:
    """The same kinds of mutation as ``ops_strategy``, from a seeded RNG (scripts/fuzz.py)."""

    def pos() -> int:
        return rng.randrange(1200) if rng.random() < 0.5 else rng.randrange(MAX_INPUT)

    def blob(lo: int, hi: int) -> bytes:
        return rng.randbytes(rng.randint(lo, hi))

    makers = [
        lambda: ("flip", pos(), rng.randrange(8)),
        lambda: ("put", pos(), blob(1, 8)),
        lambda: ("insert", pos(), blob(1, 40)),
        lambda: ("delete", pos(), rng.randint(1, 40)),
        lambda: ("truncate", pos()),
        lambda: ("splice", rng.randrange(100), pos(), pos()),
    ]
    return [rng.choice(makers)() for _ in range(rng.randint(1, 4))]


def random_arbitrary(rng: random.Random) -> bytes:
    n = rng.randrange(0, 3000)
    data = rng.randbytes(n)
    if rng.random() < 0.5:
        data = _valid_prefix(rng.randrange(fmt.MIN_HEADER, 2048)) + data
    return data


def _valid_prefix(header_length: int) -> bytes:
    return fmt.MAGIC + bytes([1, 1, 0, 0]) + bytes(16) + struct.pack(">I", header_length)


# -- the targets -----------------------------------------------------------------------------
def check_parse(blob: bytes) -> None:
    """parse_fixed_fields and parse raise nothing but EncfsError."""
    for fn in (fmt.parse_fixed_fields, fmt.parse):
        try:
            fn(blob)
        except EncfsError:
            pass


def check_read(corpus: Corpus, blob: bytes, backend: str) -> None:
    """Open and read ``blob`` through the filesystem: typed errors only, nothing but the
    reference plaintext's bytes handed out, success only for an unmodified valid file."""
    fs = corpus.readers[backend]
    valid = {c: pt for c, pt in corpus.files}
    # The reference plaintext: that of the valid file whose header the input starts with.
    ref = next((pt for c, pt in corpus.files if len(blob) >= 64 and blob[:64] == c[:64]), b"")
    path = corpus.path()
    with open(path, "wb") as f:
        f.write(blob)
    try:
        for how in ("read", "readinto", "cat_file"):
            got, done = bytearray(), False
            try:
                if how == "cat_file":
                    got += fs.cat_file(path)
                else:
                    with fs.open(path, "rb") as f:
                        buf = bytearray(9000)
                        while True:
                            if how == "read":
                                piece = f.read(7000)
                            else:
                                try:
                                    k = f.readinto(buf)
                                except EncfsError as e:
                                    got += buf[: getattr(e, "verified_bytes", 0)]
                                    raise
                                piece = buf[:k]
                            if not piece:
                                break
                            got += piece
                done = True
            except EncfsError:
                pass
            except Exception as e:  # pragma: no cover - this is the failure being looked for
                raise AssertionError(f"{backend}/{how}: untyped {type(e).__name__}: {e}") from e
            assert bytes(got) == ref[: len(got)], f"{backend}/{how}: {len(got)} bytes returned that are not the plaintext"
            if done:
                assert blob in valid, f"{backend}/{how}: a modified file read without error ({len(got)} bytes)"
                assert bytes(got) == valid[blob], f"{backend}/{how}: a valid file read back wrong"
    finally:
        os.unlink(path)


# -- the short run (pytest) ------------------------------------------------------------------
_CORPUS: dict[str, Corpus] = {}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return Corpus(tmp_path_factory.mktemp("fuzz"))


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param != "python":
        require_native()
    return request.param


@FUZZ
@given(st.binary(max_size=4096))
def test_parse_arbitrary_bytes(blob):
    check_parse(blob)
    check_parse(fmt.MAGIC + blob)
    check_parse(_valid_prefix(fmt.MIN_HEADER + len(blob) % 2048) + blob)


@FUZZ
@given(data=st.data())
def test_parse_mutated_headers(corpus, data):
    blob, _ = corpus.files[data.draw(st.integers(0, len(corpus.files) - 1))]
    check_parse(apply_ops(blob, data.draw(ops_strategy), corpus.files))


@FUZZ
@given(blob=st.one_of(st.binary(max_size=3000), st.builds(lambda h, b: _valid_prefix(h) + b, st.integers(0, 4096), st.binary(max_size=3000))))
def test_read_arbitrary_bytes(corpus, backend, blob):
    check_read(corpus, blob, backend)


@FUZZ
@given(data=st.data())
def test_read_mutated_files(corpus, backend, data):
    blob, _ = corpus.files[data.draw(st.integers(0, len(corpus.files) - 1))]
    check_read(corpus, apply_ops(blob, data.draw(ops_strategy), corpus.files), backend)


def test_unmodified_corpus_reads_back(corpus, backend):
    """The reference side of the property: the valid files do read (so a reader that always
    raised would fail here, not pass the fuzz tests)."""
    for blob, pt in corpus.files:
        path = corpus.path()
        Path(path).write_bytes(blob)
        assert corpus.readers[backend].cat_file(path) == pt
        with corpus.readers[backend].open(path, "rb") as f:
            assert f.read() == pt


def test_random_loop_is_seeded_and_runs(corpus):
    """The long-run loop of scripts/fuzz.py, a few iterations (its generators are these)."""
    rng = random.Random(5)
    for _ in range(20):
        check_parse(random_arbitrary(rng))
        blob, _ = corpus.files[rng.randrange(len(corpus.files))]
        check_read(corpus, apply_ops(blob, random_ops(rng), corpus.files), "python")


@settings(max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_read_mutated_passphrase_file(tmp_path_factory, monkeypatch, data):
    """A passphrase recipient (Argon2id at the conftest's test cost): mutations anywhere but
    the stanza's memory_kib field (a flipped high bit there asks for up to 1 GiB of Argon2
    memory, which the format allows but this test's budget does not)."""
    monkeypatch.setenv("ENCFS_FUZZ_PW", "correct horse")
    key = "passphrase:env:ENCFS_FUZZ_PW"
    if "pw" not in _CORPUS:
        root = tmp_path_factory.mktemp("fuzz-pw")
        fs = EncFileSystem(target_protocol="file", key=key, backend="python", skip_instance_cache=True)
        pt = random.Random(2).randbytes(20000)
        fs.pipe_file(str(root / "valid"), pt)
        blob = (root / "valid").read_bytes()
        h = fmt.parse(blob)
        assert [s.type for s in h.stanzas] == ["passphrase"]
        c = Corpus.__new__(Corpus)
        c.root, c.ref, c.files, c.n = root, key, [(blob, pt)], 0
        c.readers = {"python": EncFileSystem(target_protocol="file", key=key, backend="python", skip_instance_cache=True)}
        # offset of memory_kib: 34 + type(1+10) + kid(1+0) + params_len(2) + salt(16)
        c.protect = range(34 + 11 + 1 + 2 + 16, 34 + 11 + 1 + 2 + 16 + 4)
        _CORPUS["pw"] = c
    c = _CORPUS["pw"]
    blob = c.files[0][0]
    pos = data.draw(st.integers(0, len(blob) - 1).filter(lambda p: p not in c.protect))
    kind = data.draw(st.sampled_from(["flip", "truncate", "put"]))
    if kind == "flip":
        bad = apply_ops(blob, [("flip", pos, data.draw(st.integers(0, 7)))], c.files)
    elif kind == "put":
        bad = bytearray(blob)
        bad[pos] = data.draw(st.integers(0, 255))
        bad = bytes(bad)
    else:
        bad = blob[:pos]
    check_read(c, bad, "python")
    check_read(c, blob, "python")
