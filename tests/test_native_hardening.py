"""Hardening of the native path against concurrent use: no unverified plaintext ever visible in
a destination, close() and release() racing running calls, key pages locked again in a
forked child (at-fork actions registered with encfs.forking, in order), and checked ENCFS_*
settings."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from .conftest import require_native, seal_span
from .native_helpers import vma_of

require_native()

from encfs import _native_backend as nb
from encfs import cobblestone as cs
from encfs import securemem
from encfs.backend import PythonBackend
from encfs.errors import ConfigError, IntegrityError
from encfs.secret import SecretBytes
from encfs.securemem import SecureBuffer

CHUNK, CT_CHUNK = cs.CHUNK_SIZE, cs.CT_CHUNK_SIZE
ROOT = Path(__file__).resolve().parents[1]
KEY, NONCE = bytes(range(32, 64)), bytes(range(12))
MARKER = b"UNVERIFIED-PLAINTEXT-MARKER!"


def _forged_span(nchunks: int, forged: int) -> tuple[bytes, bytearray]:
    """A sealed span whose chunk ``forged`` keeps its tag but has ciphertext flipped so that,
    under CTR, its unverified plaintext is MARKER repeated (real plaintext XOR the flip)."""
    pt = os.urandom(nchunks * CHUNK)
    ct = seal_span(KEY, NONCE, 0, pt, final=False)
    want = (MARKER * (CHUNK // len(MARKER) + 1))[:CHUNK]
    base, p = forged * CT_CHUNK, forged * CHUNK
    for i in range(CHUNK):
        ct[base + i] ^= pt[p + i] ^ want[i]
    return pt, ct


def _poll_for(view: memoryview, offset: int, stop: threading.Event, seen: list[int]) -> None:
    """Spin while ``stop`` is unset, counting sightings of MARKER at ``offset`` of ``view``."""
    probe = view[offset : offset + len(MARKER)]
    while not stop.is_set():
        if probe == MARKER:
            seen.append(1)


@pytest.mark.parametrize("path", ["memory", "pread"])
@pytest.mark.parametrize("threads", [1, 2])
def test_forged_chunk_plaintext_never_visible(path, threads):
    """A thread reading the destination while calls run never sees a failed chunk's bytes.

    The forged chunk sits first in the second group of 8, so with 2 threads the other
    participant is still opening its group after the failure; the poller spins throughout."""
    nchunks, forged = 64, 8
    pt, ct = _forged_span(nchunks, forged)
    cipher = nb.NativeBackend(threads=threads, min_chunks_per_thread=1).chunk_cipher(memoryview(KEY), NONCE)
    out = bytearray(nchunks * CHUNK)
    view = memoryview(out)
    stop, seen = threading.Event(), []
    poller = threading.Thread(target=_poll_for, args=(view, forged * CHUNK, stop, seen))
    with tempfile.TemporaryFile() as f:
        f.write(ct)
        f.flush()
        poller.start()
        try:
            for _ in range(100):
                with pytest.raises(IntegrityError) as info:
                    if path == "memory":
                        cipher.decrypt_into(0, memoryview(ct), view)
                    else:
                        cipher.pread_decrypt_into(f.fileno(), 0, 0, len(ct), view)
                assert info.value.chunk_index == forged
                assert out[: forged * CHUNK] == pt[: forged * CHUNK] and not any(out[forged * CHUNK :])
                if seen:
                    break
        finally:
            stop.set()
            poller.join()
    cipher.close()
    assert not seen, "a forged chunk's unverified plaintext appeared in the destination"


def test_close_racing_encrypt_never_uses_a_wiped_key():
    """Every encrypt racing close() either raises 'cipher is closed' or seals under the real key."""
    key, nonce = os.urandom(32), os.urandom(12)
    pt = os.urandom(32 * CHUNK)
    expected = seal_span(key, nonce, 0, pt, final=True)
    outcomes = {"sealed": 0, "closed": 0}
    for _ in range(40):
        cipher = nb.NativeBackend(threads=2, min_chunks_per_thread=1).chunk_cipher(memoryview(key), nonce)
        started = threading.Event()
        results: list[object] = []

        def seal() -> None:
            for _ in range(20):
                started.set()
                out = bytearray(len(expected))
                try:
                    cipher.encrypt_into(0, memoryview(pt), memoryview(out), True)
                except ValueError as e:
                    results.append(str(e))
                else:
                    results.append(bytes(out))

        workers = [threading.Thread(target=seal) for _ in range(2)]
        for w in workers:
            w.start()
        started.wait()
        cipher.close()
        for w in workers:
            w.join()
        for r in results:
            if isinstance(r, str):
                assert "cipher is closed" in r
                outcomes["closed"] += 1
            else:
                assert r == expected, "a call racing close() sealed under a wiped key"
                outcomes["sealed"] += 1
    assert outcomes["closed"] and outcomes["sealed"], outcomes
    back = bytearray(len(pt))
    PythonBackend().chunk_cipher(memoryview(key), nonce).decrypt_into(0, memoryview(expected), memoryview(back))
    assert back == pt


def test_close_waits_for_running_calls():
    """close() returns only after the calls running on other threads have left the key."""
    cipher = nb.NativeBackend(threads=1).chunk_cipher(memoryview(KEY), NONCE)
    key = cipher._key
    with cipher._calling():  # what every native call holds for its duration
        closer = threading.Thread(target=cipher.close)
        closer.start()
        closer.join(0.2)
        assert closer.is_alive(), "close() did not wait for the running call"
        assert not key.wiped, "the key was wiped under a running call"
        with pytest.raises(ValueError, match="cipher is closed"):
            cipher.encrypt_into(0, memoryview(b""), memoryview(bytearray(16)), True)
    closer.join()
    assert key.wiped and cipher._key is None


@pytest.mark.parametrize("path", ["memory", "pread"])
def test_release_racing_decrypt_into_secure_buffer(path):
    """release() while decrypts write into a SecureBuffer: afterwards it is all zero and the
    locked-bytes count is back where it was."""
    pt = os.urandom(64 * CHUNK)
    ct = seal_span(KEY, NONCE, 0, pt, final=False)
    cipher = nb.NativeBackend(threads=2, min_chunks_per_thread=1).chunk_cipher(memoryview(KEY), NONCE)
    before = securemem.locked_bytes()
    refused = 0
    with tempfile.TemporaryFile() as f:
        f.write(ct)
        f.flush()
        for _ in range(30):
            buf = SecureBuffer(len(pt))
            view = memoryview(buf)
            go = threading.Barrier(2)
            errors: list[str] = []

            def fill() -> None:
                go.wait()
                for _ in range(10):
                    try:
                        if path == "memory":
                            cipher.decrypt_into(0, memoryview(ct), view[:])
                        else:
                            cipher.pread_decrypt_into(f.fileno(), 0, 0, len(ct), view[:])
                    except ValueError as e:
                        errors.append(str(e))

            t = threading.Thread(target=fill)
            t.start()
            go.wait()
            buf.release()
            t.join()
            assert buf.released and not any(view), "plaintext written into a released buffer"
            assert securemem.locked_bytes() == before
            assert all("released" in e for e in errors), errors
            refused += len(errors)
            del view
    cipher.close()
    assert refused, "no decrypt ever met a released buffer"


def test_pins_found_through_views():
    """The buffer behind a memoryview, a slice, a nested memoryview or a NumPy array is pinned."""
    np = pytest.importorskip("numpy")
    with SecureBuffer(4096) as buf:
        mv = memoryview(buf)
        arr = np.frombuffer(buf, dtype=np.uint8)
        for v in (mv, mv[10:], memoryview(mv), memoryview(arr), memoryview(arr[5:])):
            assert securemem.owner(v) is buf
        assert securemem.owner(memoryview(bytearray(3))) is None


def test_release_inside_own_pin_defers_the_wipe():
    """A thread that releases a buffer it has pinned itself does not deadlock; the wipe runs at
    the last unpin."""
    buf = SecureBuffer(100)
    view = memoryview(buf)
    with buf.pinned():
        view[:3] = b"abc"
        buf.release()
        assert buf.released and view[:3] == b"abc"
        with pytest.raises(ValueError, match="released"):
            buf.pin()
    assert not any(view)


def _vma_locked(addr: int) -> tuple[bool, int]:
    vma = vma_of(addr)
    assert vma is not None
    return "lo" in vma["VmFlags"].split(), int(vma["Locked"].split()[0])


@pytest.mark.skipif(not hasattr(os, "fork") or not os.path.exists("/proc/self/smaps"), reason="needs fork and /proc")
@pytest.mark.parametrize("memory", ["native", "python"])
def test_fork_child_relocks_key_pages(monkeypatch, memory):
    """mlock is not inherited across fork: the child locks live SecureBuffers (key slabs
    included) again, and its locked-bytes count matches what is locked."""
    from encfs import secret as secret_mod

    if memory == "python":
        monkeypatch.setattr(securemem, "_mem", securemem._PyMemory())
    monkeypatch.setattr(secret_mod, "_arena", secret_mod._Arena())  # a fresh slab (others may be released)
    secret = SecretBytes(os.urandom(32))
    slab = secret._slot[0]
    addr = securemem.buffer_address(secret.view())
    own = SecureBuffer(3 * securemem.PAGE_SIZE)
    if not (slab.locked and own.locked):
        pytest.skip("mlock unavailable here (RLIMIT_MEMLOCK)")
    if not (_vma_locked(addr)[0] and _vma_locked(securemem.buffer_address(own))[0]):
        pytest.skip("mlock reports success but locks nothing (ASan's runtime intercepts it)")
    parent_count = securemem.locked_bytes()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running any cleanup
        code = 1
        try:
            key_locked, key_kib = _vma_locked(addr)
            own_locked, own_kib = _vma_locked(securemem.buffer_address(own))
            ok = key_locked and own_locked and key_kib >= 4 and own_kib >= 12 and slab.locked and own.locked
            ok = ok and securemem.locked_bytes() == parent_count
            os.write(w, f"{int(ok)} {key_locked} {key_kib} {own_locked} {own_kib} {securemem.locked_bytes()} {parent_count}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        report = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert report.startswith("1 "), f"child: ok key_locked key_kib own_locked own_kib count parent_count = {report}"
    own.release()
    secret.wipe()


def test_at_fork_actions_are_registered_in_order():
    """securemem, secret and the native backend act after fork through encfs.forking (no
    os.register_at_fork of their own), securemem first: its fresh locks and re-locked pages
    come before anything that uses them."""
    import inspect

    from encfs import _native_backend, forking, secret

    modules = [securemem, secret, _native_backend]
    actions = [m._renew_after_fork for m in modules]
    positions = [forking._actions.index(a) for a in actions]
    assert positions == sorted(positions), positions
    assert forking._actions.index(forking._renew_shared_lock) < positions[0]
    for m in modules:
        assert "register_at_fork" not in inspect.getsource(m), m.__name__


def test_threads_setting_is_checked(monkeypatch):
    for bad in ("0", "-2", "many", "1.5"):
        monkeypatch.setenv("ENCFS_THREADS", bad)
        with pytest.raises(ConfigError, match="ENCFS_THREADS"):
            nb.default_threads()
    monkeypatch.setenv("ENCFS_THREADS", "100000")
    assert nb.default_threads() == nb.lib.ENCFS_MAX_THREADS
    monkeypatch.setenv("ENCFS_THREADS", " 2 ")
    assert nb.default_threads() == 2


@pytest.mark.parametrize("value, expected", [("python", "_PyMemory"), ("NATIVE", "_NativeMemory"), ("", "_NativeMemory"), ("bogus", "ConfigError")])
def test_securemem_setting_is_checked(value, expected):
    code = (
        "from encfs.errors import ConfigError\n"
        "try:\n    from encfs import securemem\nexcept ConfigError as e:\n"
        "    assert 'ENCFS_SECUREMEM' in str(e); print('ConfigError')\n"
        "else:\n    print(type(securemem._mem).__name__)\n"
    )
    env = dict(os.environ, ENCFS_SECUREMEM=value)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected
