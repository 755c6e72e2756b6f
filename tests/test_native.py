"""The native backend (encfs._native over OpenSSL) against Wycheproof, the Cobblestone-256
vectors and the pure-Python backend; tamper handling in multi-threaded batches; the C header
as the one statement of the C API and of the chunk constants."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from . import native_helpers
from .conftest import require_native, seal_span, shared_vectors

require_native()

import numpy as np

from encfs import _native_backend as nb
from encfs import cobblestone as cs
from encfs.backend import PythonBackend
from encfs._native_backend import NativeBackend
from encfs.cobblestone import CHUNK_SIZE
from encfs.errors import ConfigError, FormatError, IntegrityError
from encfs.securemem import SecureBuffer

CHUNK, CT_CHUNK = cs.CHUNK_SIZE, cs.CT_CHUNK_SIZE


class _CountingLib:
    """Stands in for encfs._native.lib and counts calls into the single-shot primitive."""

    def __init__(self, lib: object):
        self._lib = lib
        self.calls = 0

    def __getattr__(self, name: str) -> object:
        attr = getattr(self._lib, name)
        if name in ("encfs_gcm_seal", "encfs_gcm_open"):
            def counted(*args: object) -> object:
                self.calls += 1
                return attr(*args)

            return counted
        return attr


def test_wycheproof_aes_gcm(monkeypatch):
    """Every Wycheproof AES-GCM vector through the C single-shot primitives (test helpers in
    tests/native_helpers.py); sizes other than 32/12/16 are refused before reaching C."""
    data = json.loads((shared_vectors("wycheproof") / "aes_gcm_test.json").read_text())
    counting = _CountingLib(native_helpers.lib)
    monkeypatch.setattr(native_helpers, "lib", counting)
    seen = {"valid": 0, "invalid": 0, "rejected": 0}
    for group in data["testGroups"]:
        for t in group["tests"]:
            key, iv, aad, msg, ct, tag = (bytes.fromhex(t[k]) for k in ("key", "iv", "aad", "msg", "ct", "tag"))
            assert (len(key) * 8, len(iv) * 8, len(tag) * 8) == (group["keySize"], group["ivSize"], group["tagSize"])
            label = f"tcId {t['tcId']} ({t['comment']})"
            if (len(key), len(iv), len(tag)) != (32, 12, 16):
                before = counting.calls
                with pytest.raises(ValueError):
                    native_helpers.aes256gcm_decrypt(key, iv, ct, tag, aad)
                with pytest.raises(ValueError):
                    native_helpers.aes256gcm_encrypt(key, iv, msg, aad, tag_size=len(tag))
                assert counting.calls == before, f"{label}: unsupported sizes reached the C primitive"
                seen["rejected"] += 1
            elif t["result"] == "valid":
                assert native_helpers.aes256gcm_decrypt(key, iv, ct, tag, aad) == msg, label
                assert native_helpers.aes256gcm_encrypt(key, iv, msg, aad) == ct + tag, label
                seen["valid"] += 1
            elif t["result"] == "invalid":
                with pytest.raises(IntegrityError):
                    native_helpers.aes256gcm_decrypt(key, iv, ct, tag, aad)
                seen["invalid"] += 1
    assert seen["valid"] > 20 and seen["invalid"] > 10 and seen["rejected"] > 100, seen


def test_wycheproof_aes_gcm_through_the_chunk_api():
    """The Wycheproof vectors a single chunk can express (AES-256, 96-bit IV, 128-bit tag, no
    AAD, under 16 KiB) through the chunk functions encfs reads and writes with: chunk 0 under
    base nonce IV is AES-GCM under IV, and a short piece is the final chunk."""
    data = json.loads((shared_vectors("wycheproof") / "aes_gcm_test.json").read_text())
    seen = {"valid": 0, "invalid": 0}
    for group in data["testGroups"]:
        if (group["keySize"], group["ivSize"], group["tagSize"]) != (256, 96, 128):
            continue
        for t in group["tests"]:
            key, iv, aad, msg, ct, tag = (bytes.fromhex(t[k]) for k in ("key", "iv", "aad", "msg", "ct", "tag"))
            if aad or len(msg) >= CHUNK or t["result"] not in ("valid", "invalid"):
                continue
            label = f"tcId {t['tcId']} ({t['comment']})"
            for threads in (1, 2):
                cipher = nb.NativeBackend(threads=threads, min_chunks_per_thread=1).chunk_cipher(memoryview(key), iv)
                out = bytearray(b"\xaa" * len(msg))
                if t["result"] == "valid":
                    assert cipher.decrypt_into(0, memoryview(ct + tag), memoryview(out)) == len(msg), label
                    assert out == msg, label
                    sealed = bytearray(len(msg) + 16)
                    assert cipher.encrypt_into(0, memoryview(msg), memoryview(sealed), final=True) == len(sealed)
                    assert sealed == ct + tag, label
                else:
                    with pytest.raises(IntegrityError):
                        cipher.decrypt_into(0, memoryview(ct + tag), memoryview(out))
                    assert not any(out), label
                cipher.close()
            seen[t["result"]] += 1
    assert seen["valid"] > 15 and seen["invalid"] > 10, seen


def test_chunk_constants_agree_with_c():
    """encfs.cobblestone's chunk constants are the C library's (native/encfs_native.h)."""
    lib = nb.lib
    pairs = {
        "CHUNK_SIZE": lib.ENCFS_CHUNK_SIZE,
        "TAG_SIZE": lib.ENCFS_TAG_SIZE,
        "CT_CHUNK_SIZE": lib.ENCFS_CT_CHUNK_SIZE,
        "KEY_SIZE": lib.ENCFS_KEY_SIZE,
        "NONCE_SIZE": lib.ENCFS_NONCE_SIZE,
        "MAX_CHUNKS": lib.ENCFS_MAX_CHUNKS,
    }
    for name, c_value in pairs.items():
        assert getattr(cs, name) == c_value, f"cobblestone.{name} = {getattr(cs, name)}, C says {c_value}"


def _build_native_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_native", Path(__file__).resolve().parents[1] / "native" / "build_native.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    return builder


def test_cdef_is_derived_from_the_header():
    """build_native.py's cdef is encfs_native.h's declarations: every function and ENCFS_
    constant the header declares is in the built library, and nothing else is declared."""
    builder = _build_native_module()
    header = builder.HEADER.read_text()
    functions = set(re.findall(r"\b(encfs_\w+)\s*\(", re.sub(r"/\*.*?\*/", "", header, flags=re.S)))
    constants = set(re.findall(r"^#define (ENCFS_\w+) \S", header, flags=re.M))
    assert {"encfs_decrypt_chunks", "encfs_secure_lock", "encfs_exclude_from_dumps"} <= functions
    assert {"ENCFS_CHUNK_SIZE", "ENCFS_MAX_CHUNKS", "ENCFS_E_TRUNCATED"} <= constants
    assert set(re.findall(r"\b(encfs_\w+)\s*\(", builder.CDEF)) == functions
    assert set(re.findall(r"#define (ENCFS_\w+) \.\.\.", builder.CDEF)) == constants
    declared = {name for name in dir(nb.lib) if name.lower().startswith("encfs_")}
    assert declared == functions | constants, declared ^ (functions | constants)
    assert "/*" not in builder.CDEF and "#include" not in builder.CDEF


def _pattern_message(case: dict) -> bytes:
    m = re.fullmatch(r"bytes\(\(j \* (\d+) \+ (\d+)\) % (\d+) for j in range\(msg_len\)\)", case["msg_pattern"])
    assert m, f"unknown msg_pattern {case['msg_pattern']!r}"
    a, b, mod = map(int, m.groups())
    return bytes((j * a + b) % mod for j in range(case["msg_len"]))


def test_cobblestone_vectors():
    cases = json.loads((shared_vectors("cobblestone256") / "vectors.json").read_text())["cases"]
    assert cases
    for backend in (nb.NativeBackend(), nb.NativeBackend(threads=4, min_chunks_per_thread=1)):
        for case in cases:
            key, salt, ctx = (bytes.fromhex(case[k]) for k in ("key", "salt", "context"))
            msg, expected = _pattern_message(case), bytes.fromhex(case["ct"])
            assert cs.encrypt(key, msg, salt, ctx, backend=backend) == expected, case["msg_len"]
            assert cs.decrypt(key, expected, ctx, backend=backend) == msg, case["msg_len"]


EDGE_SIZES = [0, 1, 15, 16, 17, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK + 5]


@given(
    size=st.one_of(st.sampled_from(EDGE_SIZES), st.integers(0, 200 * 1024)),
    first=st.one_of(st.just(0), st.integers(0, 2**38 - 1000)),
    key=st.binary(min_size=32, max_size=32),
    nonce=st.binary(min_size=12, max_size=12),
    final=st.booleans(),
    threads=st.integers(1, 4),
)
def test_native_matches_python(size, first, key, nonce, final, threads):
    if not final:
        size -= size % CHUNK
    pt = os.urandom(size)
    expected = seal_span(key, nonce, first, pt, final)
    native = nb.NativeBackend(threads=threads, min_chunks_per_thread=1).chunk_cipher(memoryview(key), nonce)
    out = bytearray(len(expected))
    assert native.encrypt_into(first, memoryview(pt), memoryview(out), final) == len(out)
    assert out == expected
    back = bytearray(size)
    assert native.decrypt_into(first, memoryview(expected), memoryview(back)) == size
    assert back == pt
    py_back = bytearray(size)
    PythonBackend().chunk_cipher(memoryview(key), nonce).decrypt_into(first, memoryview(out), memoryview(py_back))
    assert py_back == pt
    native.close()


@given(size=st.integers(0, 200 * 1024), key=st.binary(min_size=32, max_size=32), salt=st.binary(min_size=24, max_size=24))
def test_payload_parity(size, key, salt):
    msg = os.urandom(size)
    native_ct = cs.encrypt(key, msg, salt, b"ctx", backend=nb.NativeBackend(threads=2, min_chunks_per_thread=1))
    python_ct = cs.encrypt(key, msg, salt, b"ctx", backend=PythonBackend())
    assert native_ct == python_ct
    assert cs.decrypt(key, python_ct, b"ctx", backend=nb.NativeBackend()) == msg
    assert cs.decrypt(key, native_ct, b"ctx", backend=PythonBackend()) == msg


KEY, NONCE = bytes(range(32)), bytes(range(100, 112))
N_CHUNKS = 64


@pytest.fixture(scope="module")
def span() -> tuple[bytes, bytearray]:
    pt = os.urandom(N_CHUNKS * CHUNK)
    return pt, seal_span(KEY, NONCE, 0, pt, final=False)


def _flip(ct: bytearray, chunk: int, where: str) -> None:
    offset = CT_CHUNK - 3 if where == "tag" else 1234
    ct[chunk * CT_CHUNK + offset] ^= 0x10


@pytest.mark.parametrize(
    "bad, where",
    [([37], "tag"), ([37], "data"), ([20, 50], "data"), ([50, 20], "tag"), ([0], "data"), ([63], "tag"), ([5, 6, 60], "data")],
)
@pytest.mark.parametrize("threads", [1, 4])
def test_tampered_chunk_in_batch(span, bad, where, threads):
    pt, good = span
    ct = bytearray(good)
    for c in bad:
        _flip(ct, c, where)
    lowest = min(bad)
    cipher = nb.NativeBackend(threads=threads, min_chunks_per_thread=1).chunk_cipher(memoryview(KEY), NONCE)
    out = bytearray(b"\xaa" * len(pt))
    with pytest.raises(IntegrityError) as info:
        cipher.decrypt_into(0, memoryview(ct), memoryview(out))
    assert info.value.chunk_index == lowest
    assert info.value.verified_bytes == lowest * CHUNK
    assert out[: lowest * CHUNK] == pt[: lowest * CHUNK]
    assert not any(out[lowest * CHUNK :])
    py_out = bytearray(len(pt))
    with pytest.raises(IntegrityError) as py_info:
        PythonBackend().chunk_cipher(memoryview(KEY), NONCE).decrypt_into(0, memoryview(ct), memoryview(py_out))
    assert (py_info.value.chunk_index, py_info.value.verified_bytes) == (lowest, lowest * CHUNK)
    assert py_out == out


def test_tamper_at_nonzero_first_index():
    first = 2**38 - 200
    pt = os.urandom(40 * CHUNK + 777)
    ct = seal_span(KEY, NONCE, first, pt, final=True)
    _flip(ct, 33, "data")
    out = bytearray(len(pt))
    with pytest.raises(IntegrityError) as info:
        nb.NativeBackend(threads=4, min_chunks_per_thread=1).chunk_cipher(memoryview(KEY), NONCE).decrypt_into(
            first, memoryview(ct), memoryview(out)
        )
    assert info.value.chunk_index == first + 33
    assert info.value.verified_bytes == 33 * CHUNK
    assert out[: 33 * CHUNK] == pt[: 33 * CHUNK] and not any(out[33 * CHUNK :])


def test_wrong_index_fails_first_chunk(span):
    _, ct = span
    out = bytearray(N_CHUNKS * CHUNK)
    with pytest.raises(IntegrityError) as info:
        nb.NativeBackend().chunk_cipher(memoryview(KEY), NONCE).decrypt_into(1, memoryview(ct), memoryview(out))
    assert info.value.chunk_index == 1 and info.value.verified_bytes == 0 and not any(out)


def test_malformed_spans_and_small_buffers():
    c = nb.NativeBackend().chunk_cipher(memoryview(KEY), NONCE)
    ct = seal_span(KEY, NONCE, 0, os.urandom(CHUNK + 100), final=True)
    for short in (1, 15):
        with pytest.raises(ValueError):  # FormatError is a ValueError
            c.decrypt_into(0, memoryview(ct[: CT_CHUNK + short]), memoryview(bytearray(2 * CHUNK)))
    with pytest.raises(FormatError):
        c.decrypt_into(0, memoryview(ct[:10]), memoryview(bytearray(CHUNK)))
    with pytest.raises(ValueError, match="too small"):
        c.decrypt_into(0, memoryview(ct), memoryview(bytearray(CHUNK + 99)))
    with pytest.raises(ValueError, match="too small"):
        c.encrypt_into(0, memoryview(bytes(CHUNK)), memoryview(bytearray(CT_CHUNK)), final=True)
    with pytest.raises(ValueError, match="whole chunks"):
        c.encrypt_into(0, memoryview(bytes(100)), memoryview(bytearray(200)), final=False)
    with pytest.raises(FormatError):
        c.encrypt_into(2**38, memoryview(b""), memoryview(bytearray(16)), final=True)
    with pytest.raises(FormatError):
        c.decrypt_into(-1, memoryview(ct), memoryview(bytearray(2 * CHUNK)))
    with pytest.raises(TypeError):
        c.decrypt_into(0, memoryview(ct), memoryview(bytes(2 * CHUNK)))  # read-only out
    shared = bytearray(ct) + bytearray(CHUNK)
    with pytest.raises(ValueError, match="overlap"):
        c.decrypt_into(0, memoryview(shared)[: len(ct)], memoryview(shared)[100:])
    with pytest.raises(ValueError, match="overlap"):
        c.encrypt_into(0, memoryview(shared)[:CHUNK], memoryview(shared), final=True)
    assert c.decrypt_into(0, memoryview(b""), memoryview(bytearray())) == 0
    assert c.encrypt_into(0, memoryview(b""), memoryview(bytearray()), final=False) == 0
    c.close()
    c.close()
    with pytest.raises(ValueError, match="closed"):
        c.decrypt_into(0, memoryview(ct), memoryview(bytearray(2 * CHUNK)))


def test_zero_copy_buffers(span):
    """Ciphertext and output go to C as they are: NumPy arrays and SecureBuffers included."""
    pt, ct = span
    c = nb.NativeBackend(threads=2, min_chunks_per_thread=1).chunk_cipher(memoryview(KEY), NONCE)
    arr = np.zeros(len(pt), dtype=np.uint8)
    assert c.decrypt_into(0, memoryview(np.frombuffer(bytes(ct), dtype=np.uint8)), memoryview(arr)) == len(pt)
    assert arr.tobytes() == pt
    with SecureBuffer(len(pt)) as buf:
        c.decrypt_into(0, memoryview(ct), memoryview(buf))
        assert buf[:] == pt
        enc = SecureBuffer(len(ct))
        assert c.encrypt_into(0, memoryview(buf), memoryview(enc), final=False) == len(ct)
        assert enc[:] == bytes(ct)
        enc.release()


def test_key_copy_is_wiped_on_close():
    from encfs import secret

    key = bytearray(os.urandom(32))
    c = nb.NativeBackend().chunk_cipher(memoryview(key), NONCE)
    copy = c._key
    # the expanded key schedule (its first round keys are the key itself under either AES implementation)
    assert bytes(key) in copy.bytes() and isinstance(copy._slot[0], SecureBuffer)
    key[:] = bytes(32)  # the cipher keeps working from its own copy
    ct = bytearray(CT_CHUNK)
    c.encrypt_into(0, memoryview(bytes(CHUNK)), memoryview(ct), final=False)
    c.close()
    assert copy.wiped
    assert not secret._arena._quarantine, "the key copy's slot was left with a live view"


def test_threads_setting(monkeypatch):
    monkeypatch.setenv("ENCFS_THREADS", "3")
    assert nb.NativeBackend().threads == 3
    assert nb.native_status()["threads"] == 3
    assert nb.NativeBackend(threads=1).threads == 1
    monkeypatch.setenv("ENCFS_THREADS", "zero")
    with pytest.raises(ConfigError, match="ENCFS_THREADS"):  # a ValueError too
        nb.NativeBackend()
    monkeypatch.delenv("ENCFS_THREADS")
    assert nb.NativeBackend().threads == min(os.cpu_count() or 1, 256)


def test_native_status():
    status = nb.native_status()
    assert status["built"] is True
    assert status["openssl_version"].startswith("OpenSSL 3")
    assert isinstance(status["mlock_ok"], bool)
    assert all(isinstance(status[k], int) and status[k] >= 0 for k in ("threads", "mlock_fallbacks", "locked_bytes"))


def test_backend_selection(monkeypatch):
    from encfs import backend

    monkeypatch.setattr(backend, "_BACKENDS", {})
    monkeypatch.setenv("ENCFS_THREADS", "2")
    assert backend.get_backend("native").name == "native"
    auto = backend.get_backend("auto")
    assert auto.name == "auto" and auto.min_chunks == backend.NATIVE_MIN_CHUNKS
    monkeypatch.setattr(backend, "_BACKENDS", {})
    monkeypatch.setenv("ENCFS_NATIVE_MIN_CHUNKS", "0")
    assert backend.get_backend("auto").name == "native"
    monkeypatch.setattr(backend, "_BACKENDS", {})
    monkeypatch.delenv("ENCFS_NATIVE_MIN_CHUNKS")
    monkeypatch.setenv("ENCFS_THREADS", "1")
    assert backend.get_backend("auto").name == "auto", "one native thread beats the python backend from NATIVE_MIN_CHUNKS on"


@pytest.mark.parametrize("chunks", [3, 8, 9, 20])
def test_auto_routes_by_length_with_identical_results(chunks):
    from encfs.backend import AutoBackend

    auto = AutoBackend(NativeBackend(threads=2, min_chunks_per_thread=1), min_chunks=8)
    key, salt = os.urandom(32), os.urandom(24)
    plain = os.urandom(chunks * CHUNK_SIZE - 5)
    payload = cs.encrypt(key, plain, salt, b"ctx", backend=auto)
    assert payload == cs.encrypt(key, plain, salt, b"ctx", backend=PythonBackend())
    bad = bytearray(payload)
    bad[cs.PAYLOAD_PREFIX_SIZE + 2 * cs.CT_CHUNK_SIZE + 7] ^= 1
    keys = cs.derive(key, salt, b"ctx")
    out = bytearray(len(plain))
    c = auto.chunk_cipher(keys.key.view(), keys.base_nonce)
    with pytest.raises(IntegrityError) as e:
        c.decrypt_into(0, memoryview(bad)[cs.PAYLOAD_PREFIX_SIZE :], memoryview(out))
    assert e.value.chunk_index == 2 and e.value.verified_bytes == 2 * CHUNK_SIZE
    assert bytes(out[: 2 * CHUNK_SIZE]) == plain[: 2 * CHUNK_SIZE] and not any(out[2 * CHUNK_SIZE :])
    c.close()


def test_hot_calls_release_the_gil(tmp_path):
    """cffi API mode wraps each batch call in Py_BEGIN/END_ALLOW_THREADS."""
    builder = _build_native_module()
    c_file = tmp_path / "_native.c"
    builder.make_builder(absolute=True).emit_c_code(str(c_file))
    source = c_file.read_text()
    for fn in ("encfs_decrypt_chunks", "encfs_encrypt_chunks", "encfs_gcm_open"):
        wrapper = source[source.index(f"_cffi_f_{fn}(PyObject") :]
        wrapper = wrapper[: wrapper.index("\n}\n")]
        assert re.search(r"Py_BEGIN_ALLOW_THREADS\s+_cffi_restore_errno\(\);\s+\{ result = " + fn, wrapper), fn
