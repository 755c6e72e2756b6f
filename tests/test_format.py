"""Header encoding: round trips, every field bound checked, every byte authenticated."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from encfs import format as fmt
from encfs.errors import FormatError, HeaderFullError, IntegrityError
from encfs.keys import new_file_key

stanzas = st.builds(
    fmt.Stanza,
    type=st.from_regex(r"\A[a-z0-9][a-z0-9-]{0,31}\Z"),
    key_id=st.binary(max_size=64),
    params=st.binary(max_size=300),
    body=st.binary(min_size=1, max_size=300),
)


@given(st.lists(stanzas, min_size=1, max_size=8))
def test_seal_parse_roundtrip(ss):
    key = new_file_key()
    h = fmt.Header(fmt.new_file_id(), ss)
    needed = fmt.FIXED_FIELDS_SIZE + 2 + sum(len(s.encode()) for s in ss) + fmt.MAC_SIZE
    if needed > fmt.STANDARD_HEADER:
        with pytest.raises(HeaderFullError, match=f"need a {needed}-byte header"):
            fmt.seal(h, key)
    length = max(fmt.STANDARD_HEADER, -(-needed // fmt.HEADER_ALIGN) * fmt.HEADER_ALIGN)
    raw = fmt.seal(h, key, length)
    assert len(raw) == h.length == length and raw[needed:] == bytes(length - needed)
    got = fmt.parse(raw + b"payload follows")
    assert got.stanzas == ss and got.file_id == h.file_id and got.length == h.length
    fmt.verify(got, key)
    assert got.context == raw[:28]


@given(st.lists(stanzas, min_size=1, max_size=4), st.data())
def test_any_single_bit_flip_in_the_header_is_detected(ss, data):
    key = new_file_key()
    h = fmt.Header(fmt.new_file_id(), ss)
    raw = bytearray(fmt.seal(h, key))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises((FormatError, IntegrityError)):
        fmt.verify(fmt.parse(bytes(raw)), key)


def _sealed() -> bytes:
    return fmt.seal(fmt.Header(fmt.new_file_id(), [fmt.Stanza("key", b"12345678", b"", b"x" * 60)]), new_file_key())


@pytest.mark.parametrize(
    "offset,value,match",
    [
        (0, b"\x88", "magic"),
        (8, b"\x00", "version"),
        (8, b"\x02", "version"),
        (9, b"\x00", "suite"),
        (9, b"\xff", "suite"),
        (10, b"\x80\x00", "flags"),
        (28, struct.pack(">I", 65), "header length"),
        (28, struct.pack(">I", (1 << 20) + 1), "header length"),
        (32, b"\x00\x00", "stanza count"),
        (32, b"\x00\x41", "stanza count"),
        (34, b"\x00", "stanza type"),
        (35, b"K", "stanza type"),
    ],
)
def test_out_of_range_fields_are_format_errors(offset, value, match):
    raw = bytearray(_sealed())
    raw[offset : offset + len(value)] = value
    with pytest.raises(FormatError, match=match):
        fmt.parse(bytes(raw))


def test_length_fields_running_past_the_header():
    raw = bytearray(_sealed())
    struct.pack_into(">H", raw, 34 + 1 + 3 + 1 + 8 + 2, 60000)
    with pytest.raises(FormatError, match="runs past|body must be"):
        fmt.parse(bytes(raw))


def test_header_longer_than_the_file():
    raw = _sealed()
    with pytest.raises(FormatError, match="truncated"):
        fmt.parse(raw[:-1])


def test_reserve_and_explicit_length():
    key = new_file_key()
    h = fmt.Header(fmt.new_file_id(), [fmt.Stanza("key", b"", b"", b"x")])
    assert len(fmt.seal(h, key)) == fmt.STANDARD_HEADER
    with pytest.raises(HeaderFullError, match="header_length=1024"):
        fmt.seal(h, key, length=40)
    assert len(fmt.seal(h, key, length=4096)) == 4096
    with pytest.raises(FormatError, match="at most|exceeds"):
        fmt.seal(h, key, length=(1 << 20) + 512)


def test_plaintext_size_from_sizes_alone():
    assert fmt.plaintext_size(1024 + 56 + 16, 1024) == 0
    assert fmt.plaintext_size(1024 + 56 + 16400 + 16, 1024) == 16384
    for bad in (1023, 1024 + 56 + 15, 1024 + 56 + 16400):
        with pytest.raises(FormatError):
            fmt.plaintext_size(bad, 1024)


# -- moved from tests/test_review_fixes.py (the first and second reviews' findings) ------------


def test_key_stanza_shape_is_enforced(enc, keyref):
    """From the first review (tests/test_review_fixes.py, commit 927ed62): a ``key`` stanza with
    parameters it must not have is a ``FormatError``.
    """
    fs, root = enc
    fs.pipe_file(f"{root}/s", b"x")
    raw = open(f"{root}/s", "rb").read()
    h = fmt.parse(raw)
    st = h.stanzas[0]
    odd = fmt.Stanza(st.type, st.key_id, b"extra", st.body)
    body = struct.pack(">H", 1) + odd.encode()
    head = raw[:32] + body + h.mac
    open(f"{root}/s", "wb").write(head + bytes(h.length - len(head)) + raw[h.length :])
    with pytest.raises(FormatError, match="malformed key stanza"):
        fs.cat_file(f"{root}/s")
