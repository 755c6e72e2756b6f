"""Every AES-256-GCM implementation of the native library (IPsec-MB, OpenSSL EVP) against
Wycheproof and the Cobblestone-256 vectors, against each other (files written with one, read
with the other), under tampering, under ASan + UBSan, and the ENCFS_AES switch.

An implementation this build or CPU cannot run is a skip with the reason; under CI=true,
IPsec-MB missing where its header is installed (the set-up installed it) is a failure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from .conftest import require_native, shared_vectors

require_native()

from encfs import _native_backend as nb
from encfs import backend as backend_mod
from encfs import cobblestone as cs
from encfs.backend import PythonBackend
from encfs.errors import ConfigError, EncfsError, IntegrityError

lib, ffi = nb.lib, nb.ffi
CHUNK, CT_CHUNK = cs.CHUNK_SIZE, cs.CT_CHUNK_SIZE
ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("ipsec-mb", "openssl")
CODES = {"ipsec-mb": lib.ENCFS_AES_IPSEC_MB, "openssl": lib.ENCFS_AES_OPENSSL}
IPSEC_HEADER = Path("/usr/include/intel-ipsec-mb.h")


def require_impl(name: str) -> None:
    """Skip unless ``name`` runs here; fail instead under CI=true when IPsec-MB is installed
    (its header is there) but this build or CPU cannot run it."""
    if lib.encfs_aes_available(CODES[name]):
        return
    built = bool(lib.encfs_aes_built(CODES[name]))
    why = f"{name}: " + ("built in, but this CPU lacks AES-NI/PCLMULQDQ" if built else "not linked into this build (libipsec-mb-dev missing at build time)")
    if os.environ.get("CI") == "true" and name == "ipsec-mb" and IPSEC_HEADER.exists() and not built:
        pytest.fail(f"{why}, yet {IPSEC_HEADER} is installed: rebuild (bash scripts/run.sh)", pytrace=False)
    pytest.skip(why)


@pytest.fixture(params=IMPLS)
def impl(request) -> str:
    require_impl(request.param)
    return request.param


@pytest.fixture(params=[(a, b) for a in IMPLS for b in IMPLS if a != b], ids=lambda p: f"{p[0]}-to-{p[1]}")
def pair(request) -> tuple[str, str]:
    for name in request.param:
        require_impl(name)
    return request.param


def gcm(name: str, op: str, key: bytes, iv: bytes, aad: bytes, data: bytes) -> tuple[int, bytes]:
    """The single-shot C primitive of implementation ``name``: (return code, output)."""
    out = ffi.new("uint8_t[]", max(1, len(data) + 16))
    fn = lib.encfs_gcm_seal_impl if op == "seal" else lib.encfs_gcm_open_impl
    rc = fn(CODES[name], key, len(key), iv, len(iv), aad, len(aad), data, len(data), out, len(out))
    return rc, ffi.buffer(out, len(out))[:]


def wycheproof_cases() -> list[tuple[str, dict]]:
    """The AES-256, 96-bit IV, 128-bit tag Wycheproof cases: (label, test)."""
    data = json.loads((shared_vectors("wycheproof") / "aes_gcm_test.json").read_text())
    return [
        (f"tcId {t['tcId']} ({t['comment']})", t)
        for g in data["testGroups"]
        if (g["keySize"], g["ivSize"], g["tagSize"]) == (256, 96, 128)
        for t in g["tests"]
    ]


def test_wycheproof_single_shot(impl):
    """Every AES-256/96-bit IV/128-bit tag Wycheproof case through ``impl``'s single-shot C
    primitive, AAD included: valid ones open and seal to the expected bytes; invalid ones fail
    with ENCFS_E_AUTH and leave the output zeroed."""
    seen = {"valid": 0, "invalid": 0}
    for label, t in wycheproof_cases():
        key, iv, aad, msg, ct, tag = (bytes.fromhex(t[k]) for k in ("key", "iv", "aad", "msg", "ct", "tag"))
        rc, out = gcm(impl, "open", key, iv, aad, ct + tag)
        if t["result"] == "valid":
            assert rc == len(msg) and out[: len(msg)] == msg, label
            rc, sealed = gcm(impl, "seal", key, iv, aad, msg)
            assert rc == len(msg) + 16 and sealed[:rc] == ct + tag, label
        elif t["result"] == "invalid":
            assert rc == lib.ENCFS_E_AUTH and not any(out), label
        else:
            continue
        seen[t["result"]] += 1
    assert seen["valid"] > 20 and seen["invalid"] > 10, seen


def test_wycheproof_through_the_chunk_api(impl):
    """The cases one chunk can express (no AAD, under 16 KiB) through NativeBackend over
    ``impl``: chunk 0 under base nonce IV is AES-GCM under IV, a short piece the final chunk."""
    seen = 0
    for label, t in wycheproof_cases():
        key, iv, aad, msg, ct, tag = (bytes.fromhex(t[k]) for k in ("key", "iv", "aad", "msg", "ct", "tag"))
        if aad or len(msg) >= CHUNK or t["result"] not in ("valid", "invalid"):
            continue
        cipher = nb.NativeBackend(threads=1, aes=impl).chunk_cipher(memoryview(key), iv)
        assert cipher.aes == impl
        out = bytearray(b"\xaa" * len(msg))
        if t["result"] == "valid":
            assert cipher.decrypt_into(0, memoryview(ct + tag), memoryview(out)) == len(msg) and out == msg, label
            sealed = bytearray(len(msg) + 16)
            assert cipher.encrypt_into(0, memoryview(msg), memoryview(sealed), final=True) == len(sealed) and sealed == ct + tag, label
        else:
            with pytest.raises(IntegrityError):
                cipher.decrypt_into(0, memoryview(ct + tag), memoryview(out))
            assert not any(out), label
        cipher.close()
        seen += 1
    assert seen > 25, seen


def _cobblestone_cases() -> list[dict]:
    cases = json.loads((shared_vectors("cobblestone256") / "vectors.json").read_text())["cases"]
    assert cases
    return cases


def _pattern_message(case: dict) -> bytes:
    import re

    m = re.fullmatch(r"bytes\(\(j \* (\d+) \+ (\d+)\) % (\d+) for j in range\(msg_len\)\)", case["msg_pattern"])
    assert m, f"unknown msg_pattern {case['msg_pattern']!r}"
    a, b, mod = map(int, m.groups())
    return bytes((j * a + b) % mod for j in range(case["msg_len"]))


@pytest.mark.parametrize("threads", [1, 2])
def test_cobblestone_vectors(impl, threads):
    backend = nb.NativeBackend(threads=threads, min_chunks_per_thread=1, aes=impl)
    for case in _cobblestone_cases():
        key, salt, ctx = (bytes.fromhex(case[k]) for k in ("key", "salt", "context"))
        msg, expected = _pattern_message(case), bytes.fromhex(case["ct"])
        assert cs.encrypt(key, msg, salt, ctx, backend=backend) == expected, case["msg_len"]
        assert cs.decrypt(key, expected, ctx, backend=backend) == msg, case["msg_len"]


def _use_native(monkeypatch, aes: str) -> None:
    """The filesystem's cipher backend: native over ``aes`` for every span length."""
    monkeypatch.setenv("ENCFS_BACKEND", "native")
    monkeypatch.setenv(nb.AES_ENV, aes)
    b = backend_mod.get_backend()
    assert b.name == "native" and b.aes == aes


def test_files_written_with_one_read_with_the_other(pair, enc, monkeypatch):
    """A file written through encfs over one implementation reads back through the other,
    whole and by ranges across chunk boundaries, and the two write the same ciphertext."""
    fs, root = enc
    data = os.urandom(37 * CHUNK + 123)
    writer, reader = pair
    _use_native(monkeypatch, writer)
    with fs.open(f"{root}/a.bin", "wb") as f:
        f.write(data)
    _use_native(monkeypatch, reader)
    with fs.open(f"{root}/a.bin", "rb") as f:
        assert f.read() == data
    with fs.open(f"{root}/a.bin", "rb") as f:
        f.seek(5 * CHUNK - 7)
        assert f.read(3 * CHUNK + 20) == data[5 * CHUNK - 7 : 8 * CHUNK + 13]
    key, salt = os.urandom(32), os.urandom(24)
    one = cs.encrypt(key, data, salt, b"x", backend=nb.NativeBackend(aes=writer))
    assert one == cs.encrypt(key, data, salt, b"x", backend=nb.NativeBackend(aes=reader))
    assert cs.decrypt(key, one, b"x", backend=nb.NativeBackend(aes=reader)) == data


@given(
    size=st.one_of(st.sampled_from([0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK]), st.integers(0, 40 * CHUNK)),
    first=st.one_of(st.just(0), st.integers(0, 2**38 - 100)),
    final=st.booleans(),
    threads=st.integers(1, 2),
    seed=st.binary(min_size=44, max_size=44),
)
def test_property_seal_with_one_open_with_the_other(size, first, final, threads, seed):
    """Random plaintext sizes and chunk indices: sealed by one implementation, opened by every
    other (and by the python backend), equal; both seal the same bytes."""
    names = [n for n in IMPLS if lib.encfs_aes_available(CODES[n])]
    if len(names) < 2:
        require_impl("ipsec-mb")
    if not final:
        size -= size % CHUNK
    key, nonce = seed[:32], seed[32:]
    pt = os.urandom(size)
    sealed = {}
    for name in names:
        c = nb.NativeBackend(threads=threads, min_chunks_per_thread=1, aes=name).chunk_cipher(memoryview(key), nonce)
        out = bytearray(size + (size // CHUNK + (1 if final else 0)) * 16)
        assert c.encrypt_into(first, memoryview(pt), memoryview(out), final) == len(out)
        sealed[name] = (out, c)
    assert len({bytes(o) for o, _ in sealed.values()}) == 1
    for a in names:
        for b in names:
            back = bytearray(size)
            assert sealed[b][1].decrypt_into(first, memoryview(sealed[a][0]), memoryview(back)) == size and back == pt, (a, b)
    py = bytearray(size)
    PythonBackend().chunk_cipher(memoryview(key), nonce).decrypt_into(first, memoryview(sealed[names[0]][0]), memoryview(py))
    assert py == pt
    for _, c in sealed.values():
        c.close()


def _tampered(nchunks: int, bad: int, first: int) -> tuple[bytes, bytes, bytearray]:
    key, nonce = os.urandom(32), os.urandom(12)
    pt = os.urandom((nchunks - 1) * CHUNK + 300)
    ct = bytearray(len(pt) + nchunks * 16)
    PythonBackend().chunk_cipher(memoryview(key), nonce).encrypt_into(first, memoryview(pt), memoryview(ct), True)
    ct[bad * CT_CHUNK + 1234] ^= 0x04  # CTR: the forged chunk opens to pt with this bit flipped
    return key + nonce, pt, ct


@pytest.mark.parametrize("threads", [1, 2])
def test_tampered_chunk_mid_batch(impl, threads, tmp_path):
    """A chunk forged in the middle of a 40-chunk batch: IntegrityError naming it, the
    verified chunks before it released, and the output zero from it on, from memory and from
    a file; a thread watching the output while the batch runs never sees the forged chunk's
    plaintext (each chunk is opened in private scratch and copied out only once verified)."""
    first, bad = 5000, 23
    kn, pt, ct = _tampered(40, bad, first)
    c = nb.NativeBackend(threads=threads, min_chunks_per_thread=1, aes=impl).chunk_cipher(memoryview(kn[:32]), kn[32:])
    keep = bad * CHUNK
    forged = bytearray(pt[keep + 1200 : keep + 1300])  # what opening the forgery gives around the flipped byte
    forged[34] ^= 0x04

    out = bytearray(b"\xaa" * len(pt))
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if out[keep + 1200 : keep + 1300] == forged:
                seen.append(1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        for _ in range(30):
            with pytest.raises(IntegrityError) as e:
                c.decrypt_into(first, memoryview(ct), memoryview(out))
    finally:
        stop.set()
        watcher.join(10)
    assert e.value.chunk_index == first + bad and e.value.verified_bytes == keep
    assert out[:keep] == pt[:keep] and not any(out[keep:])
    assert not seen, "the forged chunk's plaintext reached the output"

    path = tmp_path / "ct.bin"
    path.write_bytes(b"0123" + bytes(ct))
    out2 = bytearray(b"\xaa" * len(pt))
    with open(path, "rb") as f, pytest.raises(IntegrityError) as e2:
        c.pread_decrypt_into(f.fileno(), 4, first, len(ct), memoryview(out2))
    assert e2.value.chunk_index == first + bad and out2[:keep] == pt[:keep] and not any(out2[keep:])
    c.close()


def test_forced_openssl_fallback(monkeypatch):
    """ENCFS_AES=openssl forces the OpenSSL EVP path everywhere encfs picks a backend, on any
    build; it reads what the default path wrote."""
    monkeypatch.setenv(nb.AES_ENV, "openssl")
    assert nb.aes_impl() == "openssl"
    native = nb.NativeBackend()
    assert native.aes == "openssl" and nb.native_status()["aes"] == "openssl"
    assert nb.aes_describe("openssl").startswith("openssl 3.")
    auto = backend_mod.get_backend("auto")
    assert getattr(auto, "native", auto).aes == "openssl"
    key, salt = os.urandom(32), os.urandom(24)
    data = os.urandom(20 * CHUNK + 9)
    c = native.chunk_cipher(memoryview(key), bytes(12))
    assert c.aes == "openssl" and lib.encfs_aes_key_impl(c._key_ptr) == lib.ENCFS_AES_OPENSSL
    c.close()
    monkeypatch.delenv(nb.AES_ENV)
    default = cs.encrypt(key, data, salt, b"c", backend=nb.NativeBackend())
    monkeypatch.setenv(nb.AES_ENV, "openssl")
    assert cs.decrypt(key, default, b"c", backend=nb.NativeBackend()) == data


def test_aes_setting_errors(monkeypatch):
    """An unknown ENCFS_AES is a ConfigError (never a fallback), from the backend choice too;
    ipsec-mb where it cannot run is an EncfsError; auto takes the fastest available."""
    monkeypatch.setenv(nb.AES_ENV, "aesni")
    with pytest.raises(ConfigError, match="ENCFS_AES"):
        nb.NativeBackend()
    with pytest.raises(ConfigError, match="ENCFS_AES"):
        backend_mod.get_backend()
    with pytest.raises(ConfigError):
        nb.NativeBackend(aes="fast")
    monkeypatch.setenv(nb.AES_ENV, "ipsec-mb")
    if lib.encfs_aes_available(lib.ENCFS_AES_IPSEC_MB):
        assert nb.NativeBackend().aes == "ipsec-mb"
    else:
        with pytest.raises(EncfsError, match="ipsec-mb"):
            nb.NativeBackend()
    monkeypatch.setenv(nb.AES_ENV, " AUTO ")
    assert nb.NativeBackend().aes == nb.aes_available()[0]


def test_doctor_names_the_aes_path(monkeypatch):
    from encfs.cli import doctor_lines

    for name in nb.aes_available():
        monkeypatch.setenv(nb.AES_ENV, name)
        status = nb.native_status()
        assert status["aes"] == name and status["aes_code_path"] == nb.aes_describe(name)
        line = next(x for x in doctor_lines({"native": status}) if x.startswith("AES-256-GCM:"))
        assert nb.aes_describe(name) in line and f"ENCFS_AES={name}" in line
    if "ipsec-mb" in nb.aes_available():
        assert nb.aes_describe("ipsec-mb").startswith("ipsec-mb 1.")
        assert nb.aes_describe("ipsec-mb").split()[2] in ("sse", "avx", "avx2", "avx512")
    monkeypatch.setenv(nb.AES_ENV, "bogus")
    line = next(x for x in doctor_lines({"native": nb.native_status()}) if x.startswith("AES-256-GCM:"))
    assert "ERROR" in line and "ENCFS_AES" in line


def test_schedule_hygiene(impl):
    """The expanded key lives in locked memory, is never in a repr or an error, and is wiped
    on close; a schedule that was never initialised (or was wiped) is refused by C."""
    from encfs.securemem import SecureBuffer

    key = os.urandom(32)
    c = nb.NativeBackend(aes=impl).chunk_cipher(memoryview(key), bytes(12))
    sched = c._key
    assert isinstance(sched._slot[0], SecureBuffer) and len(sched) == lib.encfs_aes_key_size()
    assert key.hex() not in repr(c) and str(key) not in repr(c) and "redacted" in repr(sched)
    ct = bytearray(CT_CHUNK)
    c.encrypt_into(0, memoryview(bytes(CHUNK)), memoryview(ct), final=False)
    ct[3] ^= 1
    with pytest.raises(IntegrityError) as e:
        c.decrypt_into(0, memoryview(ct), memoryview(bytearray(CHUNK)))
    assert key.hex() not in str(e.value) and key.hex() not in repr(e.value)
    view = sched.view()
    c.close()
    assert sched.wiped and not any(view)
    blank = ffi.new("uint8_t[]", lib.encfs_aes_key_size())
    assert lib.encfs_aes_key_impl(blank) == lib.ENCFS_E_ARG
    out = ffi.new("uint8_t[]", CHUNK)
    failed = ffi.new("int64_t *")
    assert lib.encfs_decrypt_chunks_ks(blank, bytes(12), 0, bytes(ct), len(ct), out, CHUNK, 1, failed) == lib.ENCFS_E_ARG


def test_extension_needs_no_ipsec_mb_at_run_time():
    """IPsec-MB is linked in from its static archive: the extension needs no libIPSec_MB.so."""
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf not found")
    so = nb.__file__.replace("_native_backend.py", "")
    path = next(p for p in Path(so).glob("_native*.so"))
    needed = subprocess.run([readelf, "-d", str(path)], capture_output=True, text=True, check=True).stdout
    assert "libIPSec_MB" not in needed and "libcrypto" in needed


@pytest.mark.slow
def test_sanitizer_harness(tmp_path):
    """native/encfs_aes.c and encfs_native.c built with ASan + UBSan into the standalone
    tests/aes_harness.c, driven with Wycheproof and Cobblestone vectors and tampered batches
    through every implementation the build has; any sanitizer report fails."""
    in_ci = os.environ.get("CI") == "true"
    gcc = shutil.which("gcc")
    if gcc is None:
        (pytest.fail if in_ci else pytest.skip)("gcc not found")
    lines = []
    for _, t in wycheproof_cases():
        if t["result"] in ("valid", "invalid"):
            f = [t[k] or "-" for k in ("key", "iv", "aad", "msg", "ct", "tag")]
            lines.append(" ".join(["G", *f, "1" if t["result"] == "valid" else "0"]))
    for case in _cobblestone_cases():
        key, salt, ctx = (bytes.fromhex(case[k]) for k in ("key", "salt", "context"))
        keys = cs.derive(key, salt, ctx)
        body = bytes.fromhex(case["ct"])[cs.PAYLOAD_PREFIX_SIZE :]
        msg = _pattern_message(case)
        lines.append(" ".join(["S", bytes(keys.key.view()).hex(), keys.base_nonce.hex(), "0", msg.hex() or "-", body.hex()]))
        keys.wipe()
    vectors = tmp_path / "vectors.txt"
    vectors.write_text("\n".join(lines) + "\n")

    sys.path.insert(0, str(ROOT / "native"))
    try:
        import build_native
    finally:
        sys.path.pop(0)
    archive = build_native.ipsec_mb_archive()
    exe = tmp_path / "harness"
    cmd = [gcc, "-std=c11", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g", "-O1",
           "-Wall", "-Wextra", "-Wno-unused-parameter", f"-I{ROOT / 'native'}"]
    cmd += ["-DENCFS_HAVE_IPSEC_MB=1"] if archive else []
    cmd += [str(ROOT / "native" / "encfs_native.c"), str(ROOT / "native" / "encfs_aes.c"), str(ROOT / "tests" / "aes_harness.c")]
    cmd += ([archive, "-Wl,-z,noexecstack"] if archive else []) + ["-lcrypto", "-lpthread", "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if build.returncode != 0 and ("libasan" in build.stderr or "openssl/" in build.stderr):
        (pytest.fail if in_ci else pytest.skip)("sanitizer runtime or OpenSSL headers missing: " + build.stderr[-500:])
    assert build.returncode == 0, build.stderr[-4000:]
    assert "warning" not in build.stderr, build.stderr[-4000:]
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=1", UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    run = subprocess.run([str(exe), str(vectors)], capture_output=True, text=True, timeout=300, env=env)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    assert "Sanitizer" not in output and "runtime error" not in output, output[-4000:]
    assert ", 0 failures" in run.stdout, output[-4000:]
    if archive and lib.encfs_aes_available(lib.ENCFS_AES_IPSEC_MB):
        assert "ipsec-mb" in run.stdout, run.stdout
