"""The payload layer against the shared Cobblestone-256 known-answer vectors, and its size
arithmetic against a direct model of the chunking rule."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from encfs import cobblestone as cs
from encfs.backend import PythonBackend
from encfs.errors import FormatError, IntegrityError

from .conftest import shared_vectors


def _cases():
    data = json.loads((shared_vectors("cobblestone256") / "vectors.json").read_text())
    assert data["cases"], "no Cobblestone cases"
    return data["cases"]


def _msg(case) -> bytes:
    assert case["msg_pattern"].startswith("bytes((j * 31 + ")
    return eval(case["msg_pattern"], {"msg_len": case["msg_len"]})


def test_known_answers_byte_for_byte():
    cases = _cases()
    for case in cases:
        key, salt, ctx = (bytes.fromhex(case[k]) for k in ("key", "salt", "context"))
        msg = _msg(case)
        ct = cs.encrypt(key, msg, salt, ctx, backend=PythonBackend())
        assert ct.hex() == case["ct"], case["msg_len"]
        assert cs.decrypt(key, bytes.fromhex(case["ct"]), ctx, backend=PythonBackend()) == msg
    assert {c["msg_len"] for c in cases} >= {0, 1, 16383, 16384, 16385}


def test_known_answer_rejects_wrong_context_and_key():
    case = next(c for c in _cases() if c["context"])
    key, ct = bytes.fromhex(case["key"]), bytes.fromhex(case["ct"])
    with pytest.raises(IntegrityError, match="commitment"):
        cs.decrypt(key, ct, b"another context")
    with pytest.raises(IntegrityError, match="commitment"):
        cs.decrypt(bytes(32), ct, bytes.fromhex(case["context"]))


def _model_payload_size(n: int) -> int:
    full, last = divmod(n, 16384)
    return 24 + 32 + full * (16384 + 16) + (last + 16)


@given(st.integers(min_value=0, max_value=1 << 40))
def test_size_roundtrip(n):
    assert cs.payload_size(n) == _model_payload_size(n)
    assert cs.plaintext_size(cs.payload_size(n)) == n


@given(st.integers(min_value=0, max_value=1 << 30))
def test_every_payload_length_is_valid_or_a_format_error(length):
    try:
        n = cs.plaintext_size(length)
    except FormatError:
        body = length - 56
        assert body < 16 or body % cs.CT_CHUNK_SIZE < 16
    else:
        assert cs.payload_size(n) == length


@pytest.mark.parametrize("n", [0, 1, 16383, 16384, 16385, 3 * 16384, 100_000])
def test_roundtrip_and_every_truncation_point_fails(n):
    key, salt = os.urandom(32), os.urandom(24)
    msg = os.urandom(n)
    ct = cs.encrypt(key, msg, salt, b"ctx")
    assert len(ct) == cs.payload_size(n)
    assert cs.decrypt(key, ct, b"ctx") == msg
    cuts = {len(ct) - 1, len(ct) - 16, 56, 55, 0} | {56 + i * cs.CT_CHUNK_SIZE + d for i in range(n // cs.CHUNK_SIZE + 1) for d in (0, 1, 16399)}
    for cut in sorted(c for c in cuts if 0 <= c < len(ct)):
        with pytest.raises((FormatError, IntegrityError)):
            cs.decrypt(key, ct[:cut], b"ctx")


def test_nonce_is_base_xor_index():
    base = bytes(range(12))
    assert cs.chunk_nonce(base, 0) == base
    assert cs.chunk_nonce(base, 1)[-1] == base[-1] ^ 1
    assert cs.chunk_nonce(base, 0x0102)[-2:] == bytes([base[-2] ^ 1, base[-1] ^ 2])
    with pytest.raises(FormatError):
        cs.chunk_nonce(base, cs.MAX_CHUNKS)
