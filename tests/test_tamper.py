"""Hostile storage: every truncation, bit flip, reordering and transplant is an error, and
no plaintext of a failed chunk is ever released."""

from __future__ import annotations

import os
import struct

import fsspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from encfs import FormatError, IntegrityError, NoMatchingKeyError
from encfs import cobblestone as cs
from encfs.filesystem import EncFileSystem

N_CHUNKS = 5
DATA = bytes((i * 13 + 5) % 256 for i in range(N_CHUNKS * cs.CHUNK_SIZE - 100))
ERRORS = (FormatError, IntegrityError, NoMatchingKeyError)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from .conftest import write_key

    d = tmp_path_factory.mktemp("tamper")
    ref = write_key(d / "k.key")
    fs = EncFileSystem(fs=fsspec.filesystem("memory"), key=ref, skip_instance_cache=True)
    fs.pipe_file("/t/orig", DATA)
    fs.pipe_file("/t/other", DATA)
    raw = fs.fs.cat_file("/t/orig")
    hl = struct.unpack(">I", raw[28:32])[0]
    return fs, raw, hl


def _read(fs, raw: bytes) -> bytes:
    fs.fs.pipe_file("/t/victim", raw)
    fs.invalidate_cache()
    return fs.cat_file("/t/victim")


def chunk(raw: bytes, hl: int, i: int) -> slice:
    start = hl + cs.PAYLOAD_PREFIX_SIZE + i * cs.CT_CHUNK_SIZE
    return slice(start, start + cs.CT_CHUNK_SIZE)


def test_untampered_reads(setup):
    fs, raw, _ = setup
    assert _read(fs, raw) == DATA


def test_truncation_at_every_chunk_boundary_and_next_to_it(setup):
    fs, raw, hl = setup
    cuts = {0, 7, 31, 32, hl - 1, hl, hl + 24, hl + 55, hl + 56}
    for i in range(N_CHUNKS + 1):
        b = hl + cs.PAYLOAD_PREFIX_SIZE + i * cs.CT_CHUNK_SIZE
        cuts |= {b - 1, b, b + 1, b + 15, b + 16}
    cuts |= {len(raw) - 1}
    for cut in sorted(c for c in cuts if 0 <= c < len(raw)):
        with pytest.raises(ERRORS):
            _read(fs, raw[:cut])


@pytest.mark.parametrize("extra", [1, 15, 16, 17, cs.CT_CHUNK_SIZE, cs.CT_CHUNK_SIZE + 20])
def test_garbage_after_the_final_chunk(setup, extra):
    fs, raw, _ = setup
    with pytest.raises(ERRORS):
        _read(fs, raw + os.urandom(extra))


def test_a_bit_flip_in_every_header_byte(setup):
    """Every byte of the header, including the reserved padding, is checked."""
    fs, raw, hl = setup
    for i in range(hl + cs.PAYLOAD_PREFIX_SIZE):
        bad = bytearray(raw)
        bad[i] ^= 0x10
        with pytest.raises(ERRORS):
            _read(fs, bytes(bad))


@given(st.integers(0, N_CHUNKS - 1), st.integers(0, cs.CT_CHUNK_SIZE - 1), st.integers(0, 7))
def test_a_bit_flip_in_chunk_data_or_tag(setup, i, offset, bit):
    fs, raw, hl = setup
    sl = chunk(raw, hl, i)
    pos = sl.start + offset
    if pos >= len(raw):
        return
    bad = bytearray(raw)
    bad[pos] ^= 1 << bit
    with fs.fs.open("/t/v2", "wb") as f:
        f.write(bytes(bad))
    if i == N_CHUNKS - 1:  # the final chunk is authenticated when the file is opened
        with pytest.raises(IntegrityError) as e:
            fs.open("/t/v2", "rb")
        assert e.value.chunk_index == i
        return
    with fs.open("/t/v2", "rb") as f:
        got = bytearray()
        buf = bytearray(7000)
        with pytest.raises(IntegrityError) as e:
            while True:
                try:
                    n = f.readinto(buf)
                except IntegrityError as err:
                    got += buf[: err.verified_bytes]
                    assert not any(buf[err.verified_bytes :])
                    raise
                if not n:
                    break
                got += buf[:n]
        with pytest.raises(IntegrityError):
            f.read(1)
    assert e.value.chunk_index == i
    assert bytes(got) == DATA[: i * cs.CHUNK_SIZE], "released bytes must be exactly the verified chunks before the bad one"


def _swap(raw: bytes, hl: int, order: list[int]) -> bytes:
    body = b"".join(raw[chunk(raw, hl, i)] for i in order)
    return raw[: hl + cs.PAYLOAD_PREFIX_SIZE] + body


@pytest.mark.parametrize(
    "order",
    [[1, 0, 2, 3, 4], [0, 2, 1, 3, 4], [0, 1, 2, 4, 3], [0, 0, 2, 3, 4], [0, 1, 1, 2, 3, 4], [0, 1, 2, 3], [1, 2, 3, 4]],
    ids=["swap01", "swap12", "swap-last", "dup-replace", "dup-insert", "drop-final", "drop-first"],
)
def test_chunks_reordered_duplicated_or_dropped(setup, order):
    fs, raw, hl = setup
    with pytest.raises(ERRORS):
        _read(fs, _swap(raw, hl, order))


def test_payload_moved_under_another_files_header(setup):
    fs, raw, hl = setup
    other = fs.fs.cat_file("/t/other")
    ohl = struct.unpack(">I", other[28:32])[0]
    with pytest.raises(IntegrityError, match="commitment"):
        _read(fs, other[:ohl] + raw[hl:])


def test_chunk_transplanted_from_another_file_at_same_index(setup):
    fs, raw, hl = setup
    other = fs.fs.cat_file("/t/other")
    sl = chunk(raw, hl, 2)
    with pytest.raises(IntegrityError) as e:
        _read(fs, raw[: sl.start] + other[sl] + raw[sl.stop :])
    assert e.value.chunk_index == 2


def test_wrong_key_names_the_key_ids(setup, other_keyref):
    fs, raw, _ = setup
    wrong = EncFileSystem(fs=fs.fs, key=other_keyref, skip_instance_cache=True)
    with pytest.raises(NoMatchingKeyError) as e:
        wrong.cat_file("/t/orig")
    assert e.value.key_ids and e.value.key_ids[0].startswith("key:")
    assert e.value.key_ids[0] in str(e.value)


def test_no_key_configured_is_a_clear_error(setup):
    fs, _, _ = setup
    nokey = EncFileSystem(fs=fs.fs, skip_instance_cache=True)
    with pytest.raises(NoMatchingKeyError, match="none"):
        nokey.cat_file("/t/orig")
    with pytest.raises(NoMatchingKeyError, match="no encryption key"):
        nokey.pipe_file("/t/new", b"x")


def test_empty_and_tiny_files_that_are_not_encfs(setup):
    fs, _, _ = setup
    for blob in (b"", b"\x89ENC", b"\x89ENCFS\r\n"):
        with pytest.raises(FormatError):
            _read(fs, blob)


def test_verified_prefix_then_error_through_readinto(setup):
    fs, raw, hl = setup
    bad = bytearray(raw)
    bad[chunk(raw, hl, 3).start + 5] ^= 1
    fs.fs.pipe_file("/t/v3", bytes(bad))
    with fs.open("/t/v3", "rb") as f:
        buf = bytearray(len(DATA))
        with pytest.raises(IntegrityError) as e:
            f.readinto(buf)
        n = e.value.verified_bytes
        assert n == 3 * cs.CHUNK_SIZE and bytes(buf[:n]) == DATA[:n]
        assert not any(buf[n:]) and f.tell() == n
        with pytest.raises(IntegrityError):
            f.read(10)
        f.seek(0)
        with pytest.raises(IntegrityError):
            f.read()
        f.seek(4 * cs.CHUNK_SIZE)
        assert f.read() == DATA[4 * cs.CHUNK_SIZE :], "chunks after a bad one stay readable by random access"
