"""Secure memory: SecureBuffer views and release, core-dump exclusion, the mlock fallback,
SecretBytes, and the sanitizer (ASan + UBSan) build of the native code."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from encfs import secret as secret_mod
from encfs import securemem
from encfs.secret import SecretBytes
from encfs.securemem import SecureBuffer

from .native_helpers import vm_flags

ROOT = Path(__file__).resolve().parents[1]
try:
    import encfs._native  # noqa: F401

    NATIVE = True
except ImportError:
    NATIVE = False


@pytest.fixture(params=["native", "python"])
def memory(request, monkeypatch):
    """Run a test with the C locking/wiping helpers and with the ctypes fallback."""
    if request.param == "native":
        if not NATIVE:
            pytest.skip("encfs._native is not built")
    else:
        monkeypatch.setattr(securemem, "_mem", securemem._PyMemory())
    return request.param


def test_views_share_memory(memory):
    with SecureBuffer(10_000) as buf:
        assert len(buf) == buf.nbytes == 10_000
        assert securemem.buffer_address(buf) % securemem.PAGE_SIZE == 0
        mv = memoryview(buf)
        arr = np.frombuffer(buf, dtype=np.uint8)
        assert not mv.readonly and not any(mv)
        mv[:4] = b"abcd"
        arr[4:8] = [1, 2, 3, 4]
        assert buf[:8] == b"abcd\x01\x02\x03\x04"
        assert bytes(arr[:8]) == bytes(mv[:8]) == buf[:8]
        assert securemem.buffer_address(buf) == arr.__array_interface__["data"][0]
        assert buf.exported()
        del mv, arr
        assert not buf.exported()


def test_torch_view_shares_memory(memory):
    torch = pytest.importorskip("torch")
    with SecureBuffer(4096) as buf:
        t = torch.frombuffer(buf, dtype=torch.uint8)
        buf[:3] = b"xyz"
        assert bytes(t[:3].tolist()) == b"xyz"
        t[3] = 7
        assert buf[3] == 7
        assert t.data_ptr() == securemem.buffer_address(buf)
        buf.release()
        assert not t.any()  # still mapped: the tensor holds the buffer; it reads zeros


def test_release_wipes_and_views_read_zeros(memory):
    """Views alive across release() keep the (wiped) mapping; reading them is sound."""
    before = securemem.locked_bytes()
    buf = SecureBuffer(3 * securemem.PAGE_SIZE + 5)
    if buf.locked:
        assert securemem.locked_bytes() == before + 4 * securemem.PAGE_SIZE
    else:
        assert securemem.mlock_fallbacks() > 0
    mv = memoryview(buf)
    arr = np.frombuffer(buf, dtype=np.uint8)
    mv[:] = b"\x5a" * len(mv)
    buf.release()
    assert buf.released and not buf.locked
    assert securemem.locked_bytes() == before
    assert not any(mv) and not arr.any()
    buf.release()  # idempotent
    buf.close()
    assert "released" in repr(buf)
    with pytest.raises(TypeError):
        buf.resize(10)
    with pytest.raises(TypeError):
        pickle.dumps(buf)


def test_zero_and_context_manager(memory):
    with SecureBuffer(100) as buf:
        buf[:] = b"\xff" * 100
        buf.zero()
        assert buf[:] == bytes(100)
    assert buf.released
    with pytest.raises(ValueError):
        SecureBuffer(0)


def test_unlocked_buffer(memory):
    with SecureBuffer(5000, lock=False) as buf:
        assert not buf.locked and "unlocked" in repr(buf)
        buf[:2] = b"hi"
        view = memoryview(buf)
    assert not any(view)


def test_release_all_at_exit(memory):
    bufs = [SecureBuffer(64) for _ in range(3)]
    views = [memoryview(b) for b in bufs]
    for v in views:
        v[:] = b"k" * 64
    securemem._release_all()
    assert all(b.released for b in bufs) and not any(any(v) for v in views)


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs /proc/self/smaps (Linux)")
@pytest.mark.parametrize("lock", [True, False])
def test_buffers_are_left_out_of_core_dumps(memory, lock):
    """Every SecureBuffer is MADV_DONTDUMP, locked or not; the memory backend marks it (in C
    for the native memory), not SecureBuffer itself."""
    calls: list[str] = []
    mem = securemem._mem
    for name in ("lock", "exclude_from_dumps"):
        real = getattr(mem, name)

        def spy(addr, n, real=real, name=name):
            calls.append(name)
            return real(addr, n)

        setattr(mem, name, spy)
    try:
        with SecureBuffer(3 * securemem.PAGE_SIZE + 1, lock=lock) as buf:
            flags = vm_flags(securemem.buffer_address(buf))
            assert "dd" in flags, flags
            if buf.locked:
                assert "lo" in flags, flags
            assert calls[:1] == (["lock"] if lock else ["exclude_from_dumps"]), calls  # lock excludes too
    finally:
        for name in ("lock", "exclude_from_dumps"):
            vars(mem).pop(name, None)


_DROP_CAP_IPC_LOCK = """
import ctypes, resource
class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
libc = ctypes.CDLL(None, use_errno=True)
hdr, caps = _Header(0x20080522, 0), (_Data * 2)()
if libc.capget(ctypes.byref(hdr), caps) == 0:  # root keeps mlock despite the limit unless CAP_IPC_LOCK goes
    for field in ("effective", "permitted", "inheritable"):
        setattr(caps[0], field, getattr(caps[0], field) & ~(1 << 14))
    libc.capset(ctypes.byref(hdr), caps)
resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))
import mmap
probe = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE)
anchor = ctypes.c_char.from_buffer(probe)
if libc.mlock(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(mmap.PAGESIZE)) == 0:
    print("SKIP: mlock still succeeds with RLIMIT_MEMLOCK=0")
    raise SystemExit(0)
del anchor
"""

_FALLBACK_DRIVER = """
import warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    from encfs import securemem
    from encfs.secret import SecretBytes
    bufs = [securemem.SecureBuffer(10000) for _ in range(3)]
    secrets = [SecretBytes(bytes([i]) * 32) for i in range(1, 200)] + [SecretBytes(b"z" * 5000)]
    for buf in bufs:
        memoryview(buf)[:5] = b"12345"
        assert buf[:5] == b"12345" and not buf.locked
    assert secrets[7].bytes() == bytes([8]) * 32 and secrets[-1].bytes() == b"z" * 5000
    for s in secrets:
        s.wipe()
    for buf in bufs:
        buf.release()
    status = None
    try:
        from encfs._native_backend import native_status
    except ImportError:
        pass
    else:
        status = native_status()
ours = [w for w in caught if "could not lock memory" in str(w.message)]
assert len(ours) == 1, [str(w.message) for w in caught]
assert issubclass(ours[0].category, RuntimeWarning)
assert securemem.mlock_fallbacks() > 0, securemem.mlock_fallbacks()
assert securemem.locked_bytes() == 0
if status is not None:
    assert status["mlock_ok"] is False and status["mlock_fallbacks"] > 0, status
print("OK", securemem.mlock_fallbacks(), type(securemem._mem).__name__, status is not None)
"""


_UNBUILT = """
import sys
sys.modules["encfs._native"] = None  # as if the extension had not been built
from encfs.backend import get_backend
assert get_backend().name == "python"
"""


@pytest.mark.parametrize("impl", ["native", "python", "unbuilt"])
def test_mlock_fallback_in_subprocess(impl):
    """With RLIMIT_MEMLOCK=0 everything still works, unlocked, with exactly one warning."""
    if impl == "native" and not NATIVE:
        pytest.skip("encfs._native is not built")
    env = {k: v for k, v in os.environ.items() if k not in ("ENCFS_SECUREMEM", "ENCFS_BACKEND")}
    if impl == "python":
        env["ENCFS_SECUREMEM"] = "python"
    code = _DROP_CAP_IPC_LOCK + (_UNBUILT if impl == "unbuilt" else "") + _FALLBACK_DRIVER
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if proc.stdout.startswith("SKIP"):
        pytest.skip(proc.stdout.strip())
    expected = "_NativeMemory True" if impl == "native" else "_PyMemory False" if impl == "unbuilt" else "_PyMemory"
    assert proc.stdout.startswith("OK") and expected in proc.stdout, proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("compiler_works", [True, False])
def test_setup_build_is_optional(tmp_path, compiler_works):
    """setup.py builds encfs._native, or warns and goes on when it cannot be compiled."""
    env = dict(os.environ)
    if not compiler_works:
        env["CC"] = "/bin/false"
    elif shutil.which("gcc") is None:
        pytest.skip("gcc not found")
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"), "--build-temp", str(tmp_path / "tmp")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    built = list((tmp_path / "lib").glob("encfs/_native*.so"))
    if compiler_works:
        assert len(built) == 1 and "was not built" not in proc.stderr, proc.stderr
    else:
        assert not built and "WARNING: the native extension encfs._native was not built" in proc.stderr


def test_secret_wipe_zeroes_in_place():
    s = SecretBytes(b"\x11" * 32)
    v = s.view()
    assert bytes(v) == b"\x11" * 32 and len(s) == 32 and not s.wiped
    s.wipe()
    assert s.wiped and len(s) == 32
    assert bytes(v) == bytes(32)
    with pytest.raises(ValueError):
        s.view()
    s.wipe()


def test_secret_slot_not_reused_while_viewed():
    s = SecretBytes(b"\x22" * 32)
    v = s.view()
    s.wipe()
    others = [SecretBytes(bytes([i % 255 + 1]) * 32) for i in range(600)]  # more than one slab's worth
    assert bytes(v) == bytes(32), "a wiped secret's slot was reused while a view of it was alive"
    assert all(o.bytes() == bytes([i % 255 + 1]) * 32 for i, o in enumerate(others))
    del v
    for o in others:
        o.wipe()


def test_secret_slot_reused_after_views_die():
    s = SecretBytes(b"\x33" * 32)
    addr = securemem.buffer_address(s.view())
    s.wipe()
    t = SecretBytes(b"\x44" * 32)
    assert securemem.buffer_address(t.view()) == addr
    assert t.bytes() == b"\x44" * 32
    t.wipe()


def test_secret_is_in_secure_memory():
    s = SecretBytes(b"k" * 32)
    assert isinstance(s._slot[0], SecureBuffer)
    big = SecretBytes(os.urandom(5000))
    assert isinstance(big._slot[0], SecureBuffer) and big._slot[0].nbytes == 5000
    buf = big._slot[0]
    big.wipe()
    assert buf.released
    s.wipe()


def test_secret_api():
    raw = bytearray(b"\xde\xad\xbe\xef" * 8)
    s = SecretBytes.take(raw)
    assert raw == bytes(32)
    assert s.bytes() == b"\xde\xad\xbe\xef" * 8
    for text in (repr(s), str(s)):
        assert "redacted" in text and "dead" not in text.lower() and "\xde" not in text and "222" not in text
    with pytest.raises(TypeError):
        pickle.dumps(s)
    empty = SecretBytes(b"")
    assert len(empty) == 0 and empty.bytes() == b""
    empty.wipe()
    assert empty.wiped
    from_view = SecretBytes(memoryview(np.arange(8, dtype=np.uint32)))
    assert from_view.bytes() == np.arange(8, dtype=np.uint32).tobytes()
    secret_mod._wipe_all()
    assert s.wiped and from_view.wiped


def test_secret_heap_fallback(monkeypatch):
    """When no memory can be mapped, a secret lives in a bytearray with the same behaviour."""

    def no_mapping(n: int) -> None:
        raise OSError("mmap failed")

    monkeypatch.setattr(secret_mod._arena, "alloc", no_mapping)
    s = SecretBytes(b"\x55" * 40)
    assert s._slot is None and s.bytes() == b"\x55" * 40
    v = s.view()
    s.wipe()
    assert s.wiped and len(s) == 40 and bytes(v) == bytes(40)


@pytest.mark.slow
def test_sanitizer_build(tmp_path):
    """Build the C code with ASan + UBSan into tmp_path and drive it from Python under libasan."""
    in_ci = os.environ.get("CI") == "true"

    def unavailable(why: str) -> None:
        (pytest.fail if in_ci else pytest.skip)(why)

    gcc = shutil.which("gcc")
    if gcc is None:
        unavailable("gcc not found")
    libasan = subprocess.run([gcc, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(libasan) or not os.path.exists(libasan):
        unavailable(f"libasan not found (gcc says {libasan!r})")
    env = dict(os.environ, ENCFS_NATIVE_SANITIZE="1")
    build = subprocess.run(
        [sys.executable, str(ROOT / "native" / "build_native.py"), str(tmp_path / "build")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    if build.returncode != 0 and "openssl" in build.stderr.lower():
        unavailable("OpenSSL headers missing: " + build.stderr[-500:])
    assert build.returncode == 0, build.stdout + build.stderr
    so_path = build.stdout.strip().splitlines()[-1]
    assert Path(so_path).is_file() and str(tmp_path) in so_path
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(_SANITIZER_DRIVER))
    env.update(LD_PRELOAD=libasan, ASAN_OPTIONS="detect_leaks=0:abort_on_error=1", UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    env.pop("ENCFS_SECUREMEM", None)
    run = subprocess.run([sys.executable, str(driver), so_path], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    assert "AddressSanitizer" not in output and "runtime error" not in output, output[-4000:]
    assert "sanitized driver: all checks passed" in run.stdout


_SANITIZER_DRIVER = """
    import importlib.util, os, sys, threading
    so_path = sys.argv[1]
    spec = importlib.util.spec_from_file_location("encfs._native", so_path)
    native = importlib.util.module_from_spec(spec)
    sys.modules["encfs._native"] = native
    spec.loader.exec_module(native)
    sys.path.insert(0, os.getcwd())  # the repository root: tests.native_helpers
    from tests import native_helpers as nh

    from encfs import _native_backend as nb, securemem
    from encfs import cobblestone as cs
    from encfs.backend import PythonBackend
    from encfs.errors import FormatError, IntegrityError
    from encfs.secret import SecretBytes

    assert nb.lib is native.lib and securemem._mem._lib is native.lib and nh.lib is native.lib
    with open("/proc/self/maps") as maps:
        assert "libasan" in maps.read(), "the ASan runtime is not loaded"
    CH, CT = cs.CHUNK_SIZE, cs.CT_CHUNK_SIZE
    key, nonce = os.urandom(32), os.urandom(12)
    checks = 0
    for size in (0, 1, CH - 1, CH, CH + 1, 40 * CH + 3):
        for threads in (1, 4):
            pt = os.urandom(size)
            ref = bytearray(size + (size // CH + 1) * 16)
            PythonBackend().chunk_cipher(memoryview(key), nonce).encrypt_into(7, memoryview(pt), memoryview(ref), True)
            c = nb.NativeBackend(threads=threads, min_chunks_per_thread=1).chunk_cipher(memoryview(key), nonce)
            ct = bytearray(len(ref))
            assert c.encrypt_into(7, memoryview(pt), memoryview(ct), True) == len(ct) and ct == ref
            out = bytearray(size)
            assert c.decrypt_into(7, memoryview(ct), memoryview(out)) == size and out == pt
            if size > 3 * CH:
                for bad in ((30,), (2, 39)):
                    t = bytearray(ct)
                    for b in bad:
                        t[b * CT + 5] ^= 1
                    out = bytearray(b"\\xaa" * size)
                    try:
                        c.decrypt_into(7, memoryview(t), memoryview(out))
                        raise AssertionError("tamper not detected")
                    except IntegrityError as e:
                        assert e.chunk_index == 7 + min(bad) and not any(out[min(bad) * CH:])
                        assert out[: min(bad) * CH] == pt[: min(bad) * CH]
            import tempfile, threading
            with tempfile.TemporaryFile() as f:
                f.write(b"lead" + ct)
                f.flush()
                out = bytearray(size)
                assert c.pread_decrypt_into(f.fileno(), 4, 7, len(ct), memoryview(out)) == size and out == pt
                if size > 3 * CH:
                    f.seek(4 + 30 * CT + 9)
                    f.write(b"!")
                    f.flush()
                    out = bytearray(b"\\xaa" * size)
                    try:
                        c.pread_decrypt_into(f.fileno(), 4, 7, len(ct), memoryview(out))
                        raise AssertionError("tamper not detected")
                    except IntegrityError as e:
                        assert e.chunk_index == 37 and not any(out[30 * CH:]) and out[:30 * CH] == pt[:30 * CH]
                    f.truncate(4 + 20 * CT + 100)
                    try:
                        c.pread_decrypt_into(f.fileno(), 4, 7, len(ct), memoryview(out))
                        raise AssertionError("truncation not detected")
                    except FormatError:
                        assert not any(out)
            if size and threads == 4:
                def hammer():
                    for _ in range(5):
                        o = bytearray(size)
                        assert c.decrypt_into(7, memoryview(ct), memoryview(o)) == size and o == pt
                ts = [threading.Thread(target=hammer) for _ in range(4)]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
            for bad_len in (CT + 3, 5):
                try:
                    c.decrypt_into(0, memoryview(bytes(bad_len)), memoryview(bytearray(2 * CH)))
                    raise AssertionError("short chunk accepted")
                except FormatError:
                    pass
            try:
                c.decrypt_into(7, memoryview(ct), memoryview(bytearray(max(0, size - 1))))
                assert size == 0
            except ValueError:
                pass
            c.close()
            checks += 1
    sealed = nh.aes256gcm_encrypt(key, nonce, b"hello", b"aad")
    assert nh.aes256gcm_decrypt(key, nonce, sealed[:-16], sealed[-16:], b"aad") == b"hello"
    assert nh.aes256gcm_decrypt(key, nonce, b"", nh.aes256gcm_encrypt(key, nonce, b"")) == b""
    try:
        nh.aes256gcm_decrypt(key, nonce, sealed[:-16], bytes(16), b"aad")
        raise AssertionError("bad tag accepted")
    except IntegrityError:
        pass
    for n in (1, 4096, 10000):
        for lock in (True, False):
            buf = securemem.SecureBuffer(n, lock=lock)
            memoryview(buf)[:] = b"s" * n
            view = memoryview(buf)
            buf.release()
            assert not any(view)
        checks += 1
    secrets = [SecretBytes(os.urandom(n)) for n in (1, 16, 32, 33, 2048, 2049, 9000)]
    for s in secrets:
        s.wipe()
    big = os.urandom(64 * CH)
    sealed_big = bytearray(len(big) + 64 * 16)
    PythonBackend().chunk_cipher(memoryview(key), nonce).encrypt_into(0, memoryview(big), memoryview(sealed_big), False)
    for _ in range(5):  # close() and release() racing calls on other threads (pins, in-use counts)
        c = nb.NativeBackend(threads=2, min_chunks_per_thread=1).chunk_cipher(memoryview(key), nonce)
        dest = securemem.SecureBuffer(len(big))
        view = memoryview(dest)
        def race():
            for _ in range(4):
                try:
                    c.decrypt_into(0, memoryview(sealed_big), view[:])
                except ValueError:
                    pass
        ts = [threading.Thread(target=race) for _ in range(2)]
        for t in ts:
            t.start()
        dest.release()
        c.close()
        for t in ts:
            t.join()
        assert not any(view)
        del view
    checks += 1
    ffi, lib = native.ffi, native.lib
    relock = securemem.SecureBuffer(5000)
    if relock.locked:
        assert lib.encfs_secure_relock(ffi.from_buffer(relock), len(relock)) in (0, 1)
    relock.release()
    assert lib.encfs_mlock_probe() in (0, 1)
    print(nb.native_status())
    print(f"sanitized driver: all checks passed ({checks + 1} groups)")
"""
