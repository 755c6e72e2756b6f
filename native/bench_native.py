"""Decrypt throughput of one large span: native (1..N pthreads), Python threads over the
GIL-released C call, and the pure-Python backend. ``python native/bench_native.py [MiB] [reps]``.

Old builds against new: benchmarks/bench_before_after.py (each build in its own process;
two builds of ``encfs._native`` loaded into one process measured the same library twice).

Prints GB/s (10^9 bytes of plaintext per second), best of ``reps``.
"""

from __future__ import annotations

import os
import sys
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


def main() -> None:
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
