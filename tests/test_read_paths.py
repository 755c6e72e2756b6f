"""Tamper matrix through every public read path, under each backend.

Two multi-chunk files (3 full chunks + a partial final chunk; exactly 3 full chunks, so an
empty final chunk) are tampered with (header bytes flipped, chunk ciphertext and tags flipped,
truncations, appended garbage, chunks swapped or duplicated, headers and payloads moved
between files), and each tampered file is read through every public read path: ``read()``,
``read(n)``, ``readinto``, ``readline``, iteration, text mode (``fs.open`` and
``fsspec.open``), ``seek`` + ``read``, ``cat_file`` (whole and ranges), ``cat_ranges``,
``get_file``, size-trusting reads (``info``/``size`` then that many bytes), pyarrow's
``PyFileSystem(FSSpecHandler(fs))`` and numpy over ``cat_file``.

Expected, with the original plaintext as the reference: a typed error of the class the case
names (computed from the tamper, see ``expected_error``), never garbage, never a read that
stops short as if at end of file; every byte a path hands out before its error equals the
plaintext at that offset; ``get_file`` leaves no file behind.

``readline`` and iteration read one byte per call (``EncryptedReader`` has no ``peek``), so
they run over the "core" cases only (every kind of tamper, no strides); every other path runs
over every case.
"""

from __future__ import annotations

import os
import random
import struct
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow.fs as pafs
import pytest

from encfs import cobblestone as cs
from encfs.errors import EncfsError, FormatError, IntegrityError, NoMatchingKeyError
from encfs.filesystem import EncFileSystem

from .conftest import require_native, write_key

BACKENDS = ["python", "native", "auto"]
CT = cs.CT_CHUNK_SIZE
PREFIX = cs.PAYLOAD_PREFIX_SIZE


def _plaintext(n: int, seed: int) -> bytes:
    """Printable ASCII with a newline every few dozen bytes (so readline and text mode have
    lines), different per file, no '\\r' (text mode must round-trip it unchanged)."""
    rng = random.Random(seed)
    out = bytearray(rng.randrange(32, 127) for _ in range(n))
    for i in range(rng.randrange(20, 80), n, 1):
        if rng.random() < 1 / 48:
            out[i] = 10
    return bytes(out)


# "A": 3 full chunks + a 5000-byte final chunk; "B": exactly 3 full chunks + an empty final chunk.
FILES = {"A": 3 * cs.CHUNK_SIZE + 5000, "B": 3 * cs.CHUNK_SIZE}
PLAINTEXT = {name: _plaintext(n, seed) for seed, (name, n) in enumerate(FILES.items())}
HL = 1024  # header length of a one-`key`-stanza file (the reference writer's default)


def chunk_start(i: int) -> int:
    return HL + PREFIX + i * CT


def n_chunks(name: str) -> int:
    return cs.chunk_count(FILES[name])


def size_error(total: int, hl: int = HL) -> type[EncfsError] | None:
    """FormatError when ``total`` bytes are an impossible size for header length ``hl``
    (docs/FORMAT.md §3), else None (the size is possible; a tamper then fails a tag)."""
    body = total - hl - PREFIX
    if total < hl or body < 16 or body % CT < 16:
        return FormatError
    return None


# -- the cases ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    id: str
    file: str
    kind: str
    arg: tuple = ()
    core: bool = True


def _cases() -> list[Case]:
    out: list[Case] = []
    # Header: every byte of the first 200, then a stride through the rest of the header and
    # the payload prefix (salt, commitment); file A only (the header is the same shape in B).
    header_positions = sorted(set(range(200)) | set(range(200, HL + PREFIX, 23)) | {HL - 1, HL, HL + 23, HL + 24, HL + PREFIX - 1})
    core_header = {0, 8, 9, 10, 12, 27, 28, 30, 31, 32, 33, 34, 36, 38, 40, 47, 49, 55, 110, 111, 142, 143, 500, HL - 1, HL, HL + 30}
    for pos in header_positions:
        out.append(Case(f"A-hdr{pos}", "A", "flip", (pos, 1 << (pos % 8)), core=pos in core_header))
    for name in FILES:
        last = n_chunks(name) - 1
        # A bit flipped in the first, a middle and the last chunk: ciphertext start, middle, tag.
        # (B's last chunk is empty: only its tag can be flipped; flip in the last full one too.)
        for i in sorted({0, 1, last - 1, last}):
            ct_len = (FILES[name] - i * cs.CHUNK_SIZE if i == last else cs.CHUNK_SIZE) + cs.TAG_SIZE
            for where, off in (("ct0", 0), ("ctmid", (ct_len - 16) // 2), ("tag", ct_len - 1), ("tag0", ct_len - 16)):
                if off < ct_len - 16 or where.startswith("tag"):
                    out.append(Case(f"{name}-flip-chunk{i}-{where}", name, "flip", (chunk_start(i) + off, 0x04)))
        total = HL + PREFIX + FILES[name] + n_chunks(name) * cs.TAG_SIZE
        # Truncation: every chunk boundary and its neighbours (a file cut to a boundary + 16
        # bytes looks whole by its size: only the final tag tells), then a stride through the
        # last two chunks.
        core_cuts = {HL + PREFIX + 16, total - 1, total - 16, total - 17}
        for i in range(1, n_chunks(name)):
            b = chunk_start(i)
            core_cuts |= {b, b + 16}
        cuts = set(core_cuts)
        for i in range(n_chunks(name)):
            b = chunk_start(i)
            cuts |= {b - 1, b + 1, b + 15, b + 17}
        cuts |= {0, 31, 32, HL - 1, HL, HL + PREFIX - 1, HL + PREFIX, HL + PREFIX + 15, HL + PREFIX + 17}
        cuts |= set(range(chunk_start(max(0, n_chunks(name) - 2)), total, 751))
        for cut in sorted(c for c in cuts if 0 <= c < total):
            out.append(Case(f"{name}-cut{cut}", name, "cut", (cut,), core=cut in core_cuts))
        for extra in (1, 15, 16, 17, CT):
            out.append(Case(f"{name}-append{extra}", name, "append", (extra,), core=extra in (1, 16)))
        out.append(Case(f"{name}-swap01", name, "order", (1, 0, *range(2, n_chunks(name)))))
        out.append(Case(f"{name}-swap12", name, "order", (0, 2, 1, *range(3, n_chunks(name)))))
        out.append(Case(f"{name}-swap-last", name, "order", (*range(n_chunks(name) - 2), last, last - 1)))
        out.append(Case(f"{name}-dup-replace", name, "order", (0, 0, *range(2, n_chunks(name)))))
        out.append(Case(f"{name}-dup-insert", name, "order", (0, 1, 1, *range(2, n_chunks(name)))))
        out.append(Case(f"{name}-payload-under-other-header", name, "other_header", ("same",)))
        out.append(Case(f"{name}-header-onto-other-payload", name, "other_payload", ()))
        out.append(Case(f"{name}-header-of-other-key", name, "other_header", ("foreign",)))
    return out


CASES = _cases()
CORE = [c for c in CASES if c.core]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Key files, one filesystem per backend, the two files and their look-alikes: the same
    plaintext sealed again (another file id and salt) and sealed to another key."""
    d = tmp_path_factory.mktemp("read_paths")
    ref, other_ref = write_key(d / "k.key"), write_key(d / "other.key")
    fs = EncFileSystem(target_protocol="file", key=ref, backend="python", skip_instance_cache=True)
    foreign = EncFileSystem(target_protocol="file", key=other_ref, backend="python", skip_instance_cache=True)
    raw, twin, alien = {}, {}, {}
    for name, pt in PLAINTEXT.items():
        for store, f in ((raw, fs), (twin, fs), (alien, foreign)):
            p = str(d / f"src-{name}-{len(store)}-{id(store)}")
            f.pipe_file(p, pt)
            store[name] = open(p, "rb").read()
        assert struct.unpack(">I", raw[name][28:32])[0] == HL
    victims = d / "victims"
    victims.mkdir()
    return {"dir": d, "ref": ref, "raw": raw, "twin": twin, "alien": alien, "victims": victims, "n": [0]}


def tampered(world, case: Case) -> tuple[bytes, tuple[type[EncfsError], ...]]:
    """The tampered file and the error classes a reader may raise for it."""
    raw = world["raw"][case.file]
    if case.kind == "flip":
        pos, mask = case.arg
        bad = bytearray(raw)
        bad[pos] ^= mask
        return bytes(bad), header_flip_error(pos) if pos < HL + PREFIX else (IntegrityError,)
    if case.kind in ("cut", "append"):
        blob = raw[: case.arg[0]] if case.kind == "cut" else raw + os.urandom(case.arg[0])
        return blob, (size_error(len(blob)) or IntegrityError,)
    if case.kind == "order":
        body = b"".join(raw[chunk_start(i) : chunk_start(i) + CT] for i in case.arg)
        blob = raw[: HL + PREFIX] + body
        return blob, (size_error(len(blob)) or IntegrityError,)
    if case.kind == "other_header":
        donor = world["twin" if case.arg[0] == "same" else "alien"][case.file]
        # Another file's header (same key: the commitment fails; another key: no stanza opens).
        return donor[:HL] + raw[HL:], (IntegrityError,) if case.arg[0] == "same" else (NoMatchingKeyError,)
    if case.kind == "other_payload":
        other = world["raw"]["B" if case.file == "A" else "A"]
        blob = raw[:HL] + other[HL:]
        return blob, (IntegrityError,)
    raise AssertionError(case.kind)


def header_flip_error(pos: int) -> tuple[type[EncfsError], ...]:
    """What flipping a bit at ``pos`` of a one-`key`-stanza header must raise.

    0..12 magic/version/suite/flags: format error. 12..28 file id: it is in every wrapped key's
    associated data, so no stanza unwraps. 28..34 header length and stanza count: not under
    the stanza AAD, so either the parse fails or the MAC does. 34.. the stanza (type_len,
    type, kid_len, key id, params_len, body_len, body): a changed length field misparses (format
    error) or moves bytes into the key id/AAD (no key opens it); a changed type is an unknown
    type; a changed key id or body unwraps nothing. 111..143 the MAC. 143..H padding (must be
    zero). H..H+56 salt and commitment: the commitment fails."""
    if pos < 12:
        return (FormatError,)
    if pos < 28:
        return (NoMatchingKeyError,)
    if pos < 34:
        return (FormatError, IntegrityError)
    if pos in (34, 38, 47, 48, 49, 50):
        return (FormatError, NoMatchingKeyError)
    if 35 <= pos < 38:
        return (FormatError,)
    if 39 <= pos < 47 or 51 <= pos < 111:
        return (NoMatchingKeyError,)
    if pos < 143:
        return (IntegrityError,)
    if pos < HL:
        return (FormatError,)
    return (IntegrityError,)


# -- the read paths -------------------------------------------------------------------------
# Each returns (pieces, errors, whole): pieces are (plaintext offset, bytes) handed out;
# errors the exceptions raised (each operation that raised); whole is True when the path,
# had it raised nothing, claims to have returned the whole file (pieces then cover it).


class Ctx:
    def __init__(self, fs, path, ref, backend, scratch):
        self.fs, self.path, self.ref, self.backend, self.scratch = fs, path, ref, backend, scratch


def _sequential(ctx: Ctx, step) -> tuple[list, list, bool]:
    pieces, pos = [], 0
    try:
        with ctx.fs.open(ctx.path, "rb") as f:
            while True:
                data = step(f, pieces, pos)
                if not data:
                    return pieces, [], True
                pieces.append((pos, bytes(data)))
                pos += len(data)
    except Exception as e:
        return pieces, [e], True


def p_read_all(ctx):
    return _sequential(ctx, lambda f, pieces, pos: None if pieces else f.read())


def p_read_n(ctx):
    return _sequential(ctx, lambda f, pieces, pos: f.read(5000))


def p_readinto(ctx):
    buf = bytearray(7000)

    def step(f, pieces, pos):
        try:
            n = f.readinto(buf)
        except IntegrityError as e:
            # readinto's buffer holds verified plaintext up to verified_bytes: check it too.
            pieces.append((pos, bytes(buf[: e.verified_bytes])))
            raise
        return buf[:n]

    return _sequential(ctx, step)


def p_readline(ctx):
    return _sequential(ctx, lambda f, pieces, pos: f.readline())


def p_iterate(ctx):
    pieces, pos = [], 0
    try:
        with ctx.fs.open(ctx.path, "rb") as f:
            for line in f:
                pieces.append((pos, line))
                pos += len(line)
    except Exception as e:
        return pieces, [e], True
    return pieces, [], True


def p_text_read(ctx):
    try:
        with ctx.fs.open(ctx.path, "r", encoding="utf-8", newline="") as f:
            return [(0, f.read().encode("utf-8"))], [], True
    except Exception as e:
        return [], [e], True


def p_text_lines(ctx):
    pieces, pos = [], 0
    try:
        with ctx.fs.open(ctx.path, "r", encoding="utf-8", newline="") as f:
            for text in f:
                data = text.encode("utf-8")
                pieces.append((pos, data))
                pos += len(data)
    except Exception as e:
        return pieces, [e], True
    return pieces, [], True


def p_fsspec_open_text(ctx):
    url = "encfs::file://" + ctx.path
    try:
        with fsspec.open(url, "rt", newline="", encfs={"key": ctx.ref, "backend": ctx.backend, "skip_instance_cache": True}) as f:
            return [(0, f.read().encode("utf-8"))], [], True
    except Exception as e:
        return [], [e], True


def _spans(size: int, seed: int) -> list[tuple[int, int]]:
    """(offset, length) reads touching every chunk, the end of file and random places."""
    rng = random.Random(seed)
    spans = [(c * cs.CHUNK_SIZE + rng.randrange(cs.CHUNK_SIZE), rng.randrange(1, 20000)) for c in range(cs.chunk_count(size))]
    spans += [(rng.randrange(size + 10), rng.randrange(0, 40000)) for _ in range(6)]
    spans += [(0, 10), (max(0, size - 1), 1), (size, 5)]
    rng.shuffle(spans)
    return spans


def p_seek_read(ctx):
    pieces, errors = [], []
    try:
        with ctx.fs.open(ctx.path, "rb") as f:
            for off, n in _spans(ctx.size, 7):
                f.seek(off)
                try:
                    pieces.append((off, f.read(n)))
                except Exception as e:
                    errors.append(e)
            f.seek(0, os.SEEK_END)
            try:
                pieces.append((f.tell(), f.read()))
            except Exception as e:
                errors.append(e)
    except Exception as e:
        errors.append(e)
    return pieces, errors, False


def p_cat_file(ctx):
    try:
        return [(0, ctx.fs.cat_file(ctx.path))], [], True
    except Exception as e:
        return [], [e], True


def _ranges(size: int) -> list[tuple[int | None, int | None]]:
    r = [(off, off + n) for off, n in _spans(size, 11)]
    return r + [(None, None), (0, None), (-100, None), (size // 2, None), (size - 1, size + 100)]


def _resolve(start, size):
    if start is None:
        return 0
    return max(0, size + start) if start < 0 else start


def p_cat_file_ranges(ctx):
    pieces, errors = [], []
    for start, end in _ranges(ctx.size):
        try:
            pieces.append((_resolve(start, ctx.size), ctx.fs.cat_file(ctx.path, start=start, end=end)))
        except Exception as e:
            errors.append(e)
    return pieces, errors, False


def p_cat_ranges(ctx):
    ranges = _ranges(ctx.size)
    pieces, errors = [], []
    try:
        out = ctx.fs.cat_ranges([ctx.path] * len(ranges), [s for s, _ in ranges], [e for _, e in ranges])
    except Exception as e:  # on_error="return" (the default) must not raise, but a typed error is fine
        return [], [e], False
    assert len(out) == len(ranges)
    for (start, _), res in zip(ranges, out):
        if isinstance(res, BaseException):
            errors.append(res)
        else:
            pieces.append((_resolve(start, ctx.size), res))
    try:
        out = ctx.fs.cat_ranges([ctx.path], [0], [None], on_error="raise")
        pieces.append((0, out[0]))
    except Exception as e:
        errors.append(e)
    return pieces, errors, False


def p_get_file(ctx):
    dest_dir = ctx.scratch / f"get-{ctx.n}"
    dest_dir.mkdir()
    dest = dest_dir / "out.bin"
    try:
        ctx.fs.get_file(ctx.path, str(dest))
    except Exception as e:
        assert not dest.exists(), "get_file left a destination file after an error"
        assert os.listdir(dest_dir) == [], f"get_file left files behind: {os.listdir(dest_dir)}"
        return [], [e], True
    return [(0, dest.read_bytes())], [], True


def _size_then_read(ctx, how: str):
    """Read exactly the size ``size()``/``info()`` reports (as pyarrow and many loaders do):
    reading that many bytes reaches the reported end of file, so it must raise, even when
    the reported size is 0, and never come back short."""
    try:
        n = ctx.fs.size(ctx.path) if how == "size" else ctx.fs.info(ctx.path)["size"]
        if how == "info_cat":
            return [(0, ctx.fs.cat_file(ctx.path, 0, n))], [], True
        with ctx.fs.open(ctx.path, "rb") as f:
            data = f.read(n)
    except Exception as e:
        return [], [e], True
    if len(data) < n:
        return [(0, data)], [AssertionError(f"short read: {len(data)} of the {n} bytes {how}() reported")], True
    return [(0, data)], [], True


def p_size_read(ctx):
    return _size_then_read(ctx, "size")


def p_info_read(ctx):
    return _size_then_read(ctx, "info")


def p_info_cat(ctx):
    return _size_then_read(ctx, "info_cat")


def _pyarrow_fs(ctx):
    return pafs.PyFileSystem(pafs.FSSpecHandler(ctx.fs))


def p_pyarrow_read(ctx):
    try:
        with _pyarrow_fs(ctx).open_input_file(ctx.path) as f:
            return [(0, f.read())], [], True
    except Exception as e:
        return [], [e], True


def p_pyarrow_read_at(ctx):
    pieces, errors = [], []
    try:
        with _pyarrow_fs(ctx).open_input_file(ctx.path) as f:
            size = f.size()
            for off, n in _spans(size, 13):
                try:
                    pieces.append((off, f.read_at(n, off)))
                except Exception as e:
                    errors.append(e)
    except Exception as e:
        errors.append(e)
    return pieces, errors, False


def p_numpy(ctx):
    try:
        arr = np.frombuffer(ctx.fs.cat_file(ctx.path), dtype=np.uint8)
    except Exception as e:
        return [], [e], True
    return [(0, arr.tobytes())], [], True


FAST_PATHS = {
    "read": p_read_all,
    "read_n": p_read_n,
    "readinto": p_readinto,
    "text_read": p_text_read,
    "text_lines": p_text_lines,
    "fsspec_open_text": p_fsspec_open_text,
    "seek_read": p_seek_read,
    "cat_file": p_cat_file,
    "cat_file_ranges": p_cat_file_ranges,
    "cat_ranges": p_cat_ranges,
    "get_file": p_get_file,
    "size_read": p_size_read,
    "info_read": p_info_read,
    "info_cat": p_info_cat,
    "pyarrow_read": p_pyarrow_read,
    "pyarrow_read_at": p_pyarrow_read_at,
    "numpy": p_numpy,
}
SLOW_PATHS = {"readline": p_readline, "iterate": p_iterate}


def _fs(world, backend):
    if backend != "python":
        require_native()
    key = ("fs", backend)
    if key not in world:
        world[key] = EncFileSystem(target_protocol="file", key=world["ref"], backend=backend, skip_instance_cache=True)
    return world[key]


def _victim(world, blob: bytes) -> str:
    world["n"][0] += 1
    p = world["victims"] / f"v{world['n'][0]}.bin"
    p.write_bytes(blob)
    return str(p)


def check_paths(world, backend: str, blob: bytes, pt: bytes, expected: tuple | None, paths: dict) -> None:
    """Run every path over ``blob``; ``expected`` None means untampered (must read ``pt``)."""
    fs = _fs(world, backend)
    path = _victim(world, blob)
    failures = []
    for name, fn in paths.items():
        world["n"][0] += 1
        ctx = Ctx(fs, path, world["ref"], backend, world["victims"])
        ctx.n, ctx.size = world["n"][0], len(pt)
        pieces, errors, whole = fn(ctx)
        for off, data in pieces:
            if bytes(data) != pt[off : off + len(data)]:
                bad = next((i for i, (a, b) in enumerate(zip(data, pt[off:])) if a != b), min(len(data), len(pt) - off))
                failures.append(f"{name}: returned {len(data)} bytes at offset {off} that differ from the plaintext from byte {off + bad}")
                break
        for e in errors:
            if expected is None or not isinstance(e, expected):
                failures.append(f"{name}: raised {type(e).__name__}: {e}" + (f" (expected {[x.__name__ for x in expected]})" if expected else ""))
        if expected is None:
            if whole and not errors and b"".join(d for _, d in sorted(pieces, key=lambda p: p[0])) != pt:
                failures.append(f"{name}: did not return the whole plaintext")
        elif not errors:
            got = sum(len(d) for _, d in pieces)
            failures.append(f"{name}: no error; returned {got} bytes as if the file were intact")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(FILES))
def test_untampered_file_reads_through_every_path(world, backend, name):
    """The reference: every path returns exactly the plaintext when nothing was changed."""
    check_paths(world, backend, world["raw"][name], PLAINTEXT[name], None, {**FAST_PATHS, **SLOW_PATHS})


def test_empty_plaintext_reads_through_every_path(world, tmp_path):
    fs = _fs(world, "python")
    p = str(tmp_path / "empty")
    fs.pipe_file(p, b"")
    blob = open(p, "rb").read()
    assert len(blob) == HL + PREFIX + cs.TAG_SIZE
    for backend in BACKENDS:
        check_paths(world, backend, blob, b"", None, {**FAST_PATHS, **SLOW_PATHS})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_tamper_matrix(world, backend, case):
    blob, expected = tampered(world, case)
    paths = {**FAST_PATHS, **SLOW_PATHS} if case.core else FAST_PATHS
    check_paths(world, backend, blob, PLAINTEXT[case.file], expected, paths)


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_to_header_plus_72_bytes(world, backend):
    """Header + 56-byte payload prefix + 16 bytes: by its size an empty file whose final chunk
    is the first 16 bytes of chunk 0. Sizes may say 0; every read must raise IntegrityError."""
    raw = world["raw"]["A"]
    blob = raw[: HL + PREFIX + 16]
    fs = _fs(world, backend)
    path = _victim(world, blob)
    assert fs.info(path)["size"] in (0, len(blob))
    check_paths(world, backend, blob, PLAINTEXT["A"], (IntegrityError,), {**FAST_PATHS, **SLOW_PATHS})
    with pytest.raises(IntegrityError):
        with fs.open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.read()
