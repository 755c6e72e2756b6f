"""Decrypt throughput of one large span: native (1..N pthreads), Python threads over the
GIL-released C call, and the pure-Python backend. ``python native/bench_native.py [MiB] [reps]``.

``python native/bench_native.py --compare [REV] [reps]`` instead builds ``native/`` as of git
revision REV (default HEAD) into a temporary folder and measures it against the working
tree's build, alternating the two in one process: 4 MiB spans of 16 KiB chunks opened from
memory and read from a file (pread), 1 and 2 threads, calling the C entry points directly.
Used to price opening chunks into per-thread scratch (no unverified plaintext in the
destination).

Prints GB/s (10^9 bytes of plaintext per second), best of ``reps``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from encfs._native import ffi, lib
from encfs._native_backend import NativeBackend
from encfs.backend import PythonBackend
from encfs.cobblestone import CHUNK_SIZE, CT_CHUNK_SIZE, TAG_SIZE


def best(fn: Callable[[], object], nbytes: int, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return nbytes / min(times) / 1e9


def python_threads(key: bytes, nonce: bytes, ct: bytearray, out: bytearray, nthreads: int, pool: ThreadPoolExecutor) -> None:
    """Each Python thread opens a contiguous sub-span through the C call (GIL released)."""
    nchunks = -(-len(ct) // CT_CHUNK_SIZE)
    kp, np_ = ffi.from_buffer(key), ffi.from_buffer(nonce)
    ctp, outp = ffi.from_buffer(ct), ffi.from_buffer(out, require_writable=True)

    def run(t: int) -> int:
        a, b = nchunks * t // nthreads, nchunks * (t + 1) // nthreads
        lo, hi = a * CT_CHUNK_SIZE, min(b * CT_CHUNK_SIZE, len(ct))
        failed = ffi.new("int64_t *")
        return lib.encfs_decrypt_chunks(kp, np_, a, ctp + lo, hi - lo, outp + a * CHUNK_SIZE, len(out) - a * CHUNK_SIZE, 1, failed)

    rcs = list(pool.map(run, range(nthreads)))
    assert all(rc >= 0 for rc in rcs), rcs


def rate(fn: Callable[[], object], nbytes: int, calls: int) -> float:
    """GB/s over ``calls`` back-to-back calls of ``fn``, each opening ``nbytes``."""
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return nbytes * calls / (time.perf_counter() - t0) / 1e9


def load_native(so_path: str) -> object:
    """A separately loaded copy of an encfs._native build (its own pool), not put in sys.modules."""
    spec = importlib.util.spec_from_file_location("encfs._native", so_path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_revision(rev: str, into: str) -> str:
    """Compile native/ as of git ``rev`` into ``into``; the path of the built module."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = os.path.join(into, "native")
    os.makedirs(src)
    for name in ("encfs_native.c", "encfs_native.h", "build_native.py"):
        text = subprocess.run(["git", "show", f"{rev}:native/{name}"], cwd=root, check=True, capture_output=True).stdout
        with open(os.path.join(src, name), "wb") as f:
            f.write(text)
    out = subprocess.run([sys.executable, os.path.join(src, "build_native.py"), os.path.join(into, "build")], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def compare(rev: str, reps: int) -> None:
    """Old build (``rev``) against the working tree's, in one process, every variant measured
    once per round (20 calls) so that load from elsewhere hits all of them alike."""
    span_chunks, key, nonce = 256, os.urandom(32), os.urandom(12)
    n = span_chunks * CHUNK_SIZE
    pt = os.urandom(n)
    ct = bytearray(n + span_chunks * TAG_SIZE)
    NativeBackend(threads=1).chunk_cipher(memoryview(key), nonce).encrypt_into(0, memoryview(pt), memoryview(ct), final=False)
    out = bytearray(n)
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryFile() as f:
        f.write(ct)
        f.flush()
        fd = f.fileno()
        builds = {rev: load_native(build_revision(rev, tmp)), "tree": sys.modules["encfs._native"]}
        calls: dict[str, Callable[[], object]] = {}
        for label, mod in builds.items():
            mffi, mlib = mod.ffi, mod.lib  # type: ignore[attr-defined]
            kp, npp = mffi.from_buffer(key), mffi.from_buffer(nonce)
            ctp, outp = mffi.from_buffer(ct), mffi.from_buffer(out, require_writable=True)
            failed, err = mffi.new("int64_t *"), mffi.new("int *")
            for t in (1, 2):
                calls[f"memory x{t} {label}"] = lambda mlib=mlib, kp=kp, npp=npp, ctp=ctp, outp=outp, failed=failed, t=t: mlib.encfs_decrypt_chunks(
                    kp, npp, 0, ctp, len(ct), outp, n, t, failed
                )
                calls[f"pread x{t} {label}"] = lambda mlib=mlib, kp=kp, npp=npp, outp=outp, failed=failed, err=err, t=t: mlib.encfs_pread_decrypt_chunks(
                    fd, 0, kp, npp, 0, len(ct), outp, n, t, failed, err
                )
        for name, call in calls.items():  # warm up, and check every variant opens the span right
            out[:] = bytes(n)
            assert call() in (n, None) and out == pt, name
        for _ in range(reps):
            for name, call in calls.items():
                results.setdefault(name, []).append(rate(call, n, 20))
    top = {name: max(v) for name, v in results.items()}
    print(f"4 MiB spans ({span_chunks} chunks of 16 KiB), GB/s, best of {reps} rounds of 20 calls; '{rev}' vs working tree")
    for path in ("memory", "pread"):
        for t in (1, 2):
            old, new = top[f"{path} x{t} {rev}"], top[f"{path} x{t} tree"]
            print(f"  {path:>6} x{t}: {rev} {old:6.2f}   tree {new:6.2f}   ({(new / old - 1) * 100:+.1f}%)")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--compare":
        rev = sys.argv[2] if len(sys.argv) > 2 else "HEAD"
        compare(rev, int(sys.argv[3]) if len(sys.argv) > 3 else 10)
        return
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    n = mib << 20
    key, nonce = os.urandom(32), os.urandom(12)
    pt = bytearray(os.urandom(n))
    ct = bytearray(n + (n // CHUNK_SIZE + 1) * TAG_SIZE)
    out = bytearray(n)
    ncpu = os.cpu_count() or 1
    enc = NativeBackend(threads=ncpu).chunk_cipher(memoryview(key), nonce)
    enc.encrypt_into(0, memoryview(pt), memoryview(ct), final=True)
    results = {}
    for t in sorted({1, 2, ncpu}):
        c = NativeBackend(threads=t).chunk_cipher(memoryview(key), nonce)
        results[f"native pthreads x{t}"] = best(lambda: c.decrypt_into(0, memoryview(ct), memoryview(out)), n, reps)
        assert out == pt
    for t in sorted({2, ncpu}):
        with ThreadPoolExecutor(t) as pool:
            results[f"python threads x{t}"] = best(lambda: python_threads(key, nonce, ct, out, t, pool), n, reps)
        assert out == pt
    py = PythonBackend().chunk_cipher(memoryview(key), nonce)
    results["PythonBackend"] = best(lambda: py.decrypt_into(0, memoryview(ct), memoryview(out)), n, max(1, reps // 2))
    results["native encrypt x1"] = best(
        lambda: NativeBackend(threads=1).chunk_cipher(memoryview(key), nonce).encrypt_into(0, memoryview(pt), memoryview(ct), True), n, reps
    )
    for name, gbps in results.items():
        print(f"{name:>24}: {gbps:6.2f} GB/s")


if __name__ == "__main__":
    main()
