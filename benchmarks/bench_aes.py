"""AES-256-GCM implementations on this CPU, one run, as GB/s and ratios:

* the AES-256-GCM limit of each implementation: one 4 MiB message, single-shot, one thread
  (IPsec-MB and OpenSSL EVP through the native library, pyca/cryptography ``decrypt_into``);
* per implementation, a 16 KiB chunk loop on one thread into a buffer opened in place: encfs
  native over IPsec-MB, encfs native over OpenSSL EVP (the baseline), pyca ``decrypt_into``;
* native decrypt on 2 threads against 1;
* ``encfs::file://`` sequential read of a 1 GiB file, against the decrypt-plus-one-copy bound
  1/(1/(cores x limit) + 1/(cores x plaintext read)) and against the OpenSSL build
  (``ENCFS_AES=openssl``) in the same run;
* backend routing: per span length, the native backend against Python threads over pyca
  ``decrypt_into`` (which releases the GIL from cryptography 50 on) and the one-thread python
  backend.

    python benchmarks/bench_aes.py [--size-mib 1024] [--reps 3]

Writes the ``aes`` block of benchmarks/RESULTS.md with CPU model, flags and core count.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from main_job import best_of, cpu_model, update_results  # noqa: E402

import cryptography  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from encfs import _native_backend as nb  # noqa: E402
from encfs import cobblestone as cs  # noqa: E402
from encfs.backend import PythonBackend  # noqa: E402
from encfs.keys import SymmetricKey, key_file_text  # noqa: E402

GB = 1e9
CHUNK, CT_CHUNK = cs.CHUNK_SIZE, cs.CT_CHUNK_SIZE
FLAGS = ("aes", "pclmulqdq", "avx", "avx2", "avx512f", "vaes", "vpclmulqdq", "gfni", "sha_ni")
ROUTING_SPANS = (1, 2, 3, 4, 8, 16, 64, 256)
SPAN_CHUNKS = 256
NOTES = [
    '',
    'Notes: this CPU (AMD Zen 3 class: AVX2, VAES and VPCLMULQDQ, no AVX-512, no GFNI) gets no',
    'wide-vector GCM from IPsec-MB 1.3: its VAES GCM is AVX-512 only, and its AVX2 code is the',
    '128-bit AES-NI one, which here runs ~7% slower than its AVX code, so a start-up timing picks',
    "`avx`. IPsec-MB is then only a few percent faster than OpenSSL 3.0 and pyca's OpenSSL, and",
    'the targets that assumed AVX-512 speed (file read >= 1.6 x the OpenSSL build) cannot be met',
    'here. Native decrypt opens each chunk into per-thread scratch and copies it out once its tag',
    'verified (no unverified plaintext in the destination, ever); that copy is the ~10% between',
    'native on one thread and the one-message limit.',
]
"""Written under the ratios: what limits the figures on the machine these were measured on."""


def cpu_flags() -> str:
    """The AES-relevant flags of /proc/cpuinfo, '-' before those the CPU lacks."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return " ".join(f if f in have else f"-{f}" for f in FLAGS)
    except OSError:
        pass
    return "unknown"


class Table:
    """Rows of (measurement, GB/s, note), printed as they come."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float | None, str]] = []

    def add(self, name: str, gbps: float | None, note: str = "") -> float | None:
        self.rows.append((name, gbps, note))
        shown = f"{gbps:8.2f} GB/s" if gbps is not None else "   skipped"
        print(f"  {name:<60} {shown}  {note}", flush=True)
        return gbps

    def markdown(self) -> list[str]:
        out = ["| measurement | GB/s | note |", "|---|---:|---|"]
        out += [f"| {n} | {'' if g is None else f'{g:.2f}'} | {note} |" for n, g, note in self.rows]
        return out


def span(nchunks: int, key: bytes, nonce: bytes) -> tuple[bytes, bytearray]:
    """Plaintext of ``nchunks`` whole chunks and its ciphertext (python backend)."""
    pt = os.urandom(nchunks * CHUNK)
    ct = bytearray(nchunks * CT_CHUNK)
    PythonBackend().chunk_cipher(memoryview(key), nonce).encrypt_into(0, memoryview(pt), memoryview(ct), False)
    return pt, ct


def limits(t: Table, reps: int) -> dict[str, float]:
    """One 4 MiB message opened single-shot, per implementation: the AES-256-GCM limit (one
    thread each); then pyca on all threads at once, to show whether it releases the GIL."""
    from encfs._native import ffi, lib

    key, iv = os.urandom(32), os.urandom(12)
    msg = os.urandom(4 << 20)
    ct_tag = AESGCM(key).encrypt(iv, msg, None)
    dst = bytearray(len(msg))
    res: dict[str, float] = {}
    for name in nb.aes_available():
        code = {"ipsec-mb": lib.ENCFS_AES_IPSEC_MB, "openssl": lib.ENCFS_AES_OPENSSL}[name]
        args = (code, key, 32, iv, 12, ffi.NULL, 0, ct_tag, len(ct_tag), ffi.from_buffer(dst), len(dst))

        def one() -> None:
            assert lib.encfs_gcm_open_impl(*args) == len(msg)

        res[name] = t.add(f"limit: {name}, one 4 MiB message, 1 thread", len(msg) / best_of(one, reps * 10) / GB, nb.aes_describe(name))
    aead, mv = AESGCM(key), memoryview(dst)
    res["pyca"] = t.add("limit: pyca AESGCM.decrypt_into, one 4 MiB message", len(msg) / best_of(lambda: aead.decrypt_into(iv, ct_tag, None, mv), reps * 10) / GB,
                        f"cryptography {cryptography.__version__}")
    assert bytes(dst) == msg
    threads = nb.default_threads()
    if threads > 1:
        dsts = [memoryview(bytearray(len(msg))) for _ in range(threads)]
        with ThreadPoolExecutor(threads) as pool:

            def together() -> None:
                for f in [pool.submit(lambda d: [aead.decrypt_into(iv, ct_tag, None, d) for _ in range(4)], d) for d in dsts]:
                    f.result()

            gbps = threads * 4 * len(msg) / best_of(together, reps * 3) / GB
        ratio = gbps / res["pyca"]
        t.add(f"pyca AESGCM.decrypt_into, 4 MiB messages on {threads} Python threads", gbps,
                                    f"{ratio:.2f} x one thread" + (" (the GIL is released)" if ratio > 1.4 else ""))
    return res


def chunk_loops(t: Table, reps: int) -> dict[str, float]:
    """16 KiB chunks of a 4 MiB span (the limit's message size) opened into a buffer on one
    thread, per implementation; native on 2 threads too."""
    key, nonce = os.urandom(32), os.urandom(12)
    pt, ct = span(SPAN_CHUNKS, key, nonce)
    out = bytearray(len(pt))
    src, dst = memoryview(ct), memoryview(out)
    res: dict[str, float] = {}
    for name in nb.aes_available():
        for threads in (1, 2):
            c = nb.NativeBackend(threads=threads, aes=name).chunk_cipher(memoryview(key), nonce)
            gbps = len(pt) / best_of(lambda: c.decrypt_into(0, src, dst), reps * 10) / GB
            c.close()
            assert out == pt
            res[f"{name}{threads}"] = t.add(f"encfs native over {name}, 16 KiB chunks, {threads} thread(s)", gbps)
    aead = AESGCM(key)
    nonces = [cs.chunk_nonce(nonce, i) for i in range(SPAN_CHUNKS)]

    def pyca() -> None:
        for i, n in enumerate(nonces):
            aead.decrypt_into(n, src[i * CT_CHUNK : (i + 1) * CT_CHUNK], None, dst[i * CHUNK : (i + 1) * CHUNK])

    res["pyca"] = t.add("pyca AESGCM.decrypt_into loop, 16 KiB chunks, 1 thread", len(pt) / best_of(pyca, reps * 10) / GB)
    assert out == pt
    return res


def file_read(t: Table, size: int, reps: int, workdir: Path) -> dict[str, float]:
    """``encfs::file://`` sequential read of one file, default build and ENCFS_AES=openssl,
    and the plaintext read of a file the same size (page cache warm)."""
    keyfile = workdir / "bench.key"
    keyfile.write_text(key_file_text(SymmetricKey.generate()))
    opts = {"encfs": {"key": f"keyfile:{keyfile}"}}
    plain, enc = workdir / "plain.bin", workdir / "enc.bin"
    block = os.urandom(4 << 20)
    with open(plain, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
    with fsspec.open(f"encfs::file://{enc}", "wb", **opts) as f:
        for _ in range(size // len(block)):
            f.write(block)

    def read(url: str, **kw) -> None:
        buf = bytearray(4 << 20)
        with fsspec.open(url, "rb", **kw) as f:
            while f.readinto(buf):
                pass

    best: dict[str, float] = {}
    saved = os.environ.get(nb.AES_ENV)
    try:
        for _ in range(reps * 2):  # the variants interleaved, so a noisy moment hits all of them
            best["plain"] = max(best.get("plain", 0.0), size / best_of(lambda: read(f"file://{plain}"), 1) / GB)
            for aes in nb.aes_available():
                os.environ[nb.AES_ENV] = aes
                best[aes] = max(best.get(aes, 0.0), size / best_of(lambda: read(f"encfs::file://{enc}", **opts), 1) / GB)
    finally:
        os.environ.pop(nb.AES_ENV, None) if saved is None else os.environ.__setitem__(nb.AES_ENV, saved)
    t.add("plaintext read of a file the same size (page cache)", best["plain"])
    for aes in nb.aes_available():
        t.add(f"encfs::file:// sequential read, ENCFS_AES={aes}", best[aes])
    return best


def routing(reps: int) -> list[str]:
    """Per span length: native (default threads), Python threads over pyca ``decrypt_into``
    (each thread opens its share of the chunks into its own scratch, as the python backend
    does), and the python backend on one thread. GB/s, best of many calls."""
    key, nonce = os.urandom(32), os.urandom(12)
    threads = nb.default_threads()
    pool = ThreadPoolExecutor(threads)
    native = nb.NativeBackend(min_chunks_per_thread=nb.MIN_CHUNKS_PER_THREAD).chunk_cipher(memoryview(key), nonce)
    py = PythonBackend().chunk_cipher(memoryview(key), nonce)
    lines = [f"| span (chunks) | native ({threads} threads max, {native.aes}) | pyca, {threads} Python threads | python backend, 1 thread | fastest |", "|---:|---:|---:|---:|---|"]
    for n in ROUTING_SPANS:
        pt, ct = span(n, key, nonce)
        out = bytearray(len(pt))
        src, dst = memoryview(ct), memoryview(out)
        share = -(-n // threads)
        parts = [(i, min(i + share, n)) for i in range(0, n, share)]

        def threaded() -> None:
            for f in [pool.submit(py.decrypt_into, a, src[a * CT_CHUNK : b * CT_CHUNK], dst[a * CHUNK : b * CHUNK]) for a, b in parts]:
                f.result()

        calls = max(3, 1024 // n)
        got: dict[str, float] = {}
        for _ in range(reps * 4):  # the three interleaved, so a noisy moment hits all of them
            for label, fn in (("native", lambda: native.decrypt_into(0, src, dst)), ("threads", threaded), ("python", lambda: py.decrypt_into(0, src, dst))):
                gbps = len(pt) * calls / best_of(lambda: [fn() for _ in range(calls)], 1) / GB
                got[label] = max(got.get(label, 0.0), gbps)
                assert out == pt
        best = max(got, key=got.get)
        lines.append(f"| {n} | {got['native']:.2f} | {got['threads']:.2f} | {got['python']:.2f} | {best} |")
        print("  routing", lines[-1], flush=True)
    native.close()
    pool.shutdown()
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    cores = nb.usable_cpus()
    t = Table()
    started = time.time()
    lim = limits(t, args.reps)
    loops = chunk_loops(t, args.reps)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        rd = file_read(t, args.size_mib << 20, args.reps, Path(tmp))
    route = routing(args.reps)
    fastest = max(lim.values())
    best_impl = max(lim, key=lim.get)
    native_impl = nb.aes_impl("auto")
    one, two = loops[f"{native_impl}1"], loops[f"{native_impl}2"]
    bound = 1 / (1 / (cores * fastest) + 1 / (cores * rd["plain"]))
    ratios = [
        f"- native 1 thread ({native_impl}) / fastest AES-256-GCM in-process ({best_impl}, one message): {one / fastest:.2f} (target >= 0.90)",
        f"- native 1 thread over {native_impl} / over openssl (the baseline): {one / loops['openssl1']:.2f}",
        f"- native 1 thread / pyca decrypt_into loop: {one / loops['pyca']:.2f}",
        f"- native 2 threads / 1 thread: {two / one:.2f} (target >= 1.7)",
        f"- encfs::file:// read / decrypt-plus-one-copy bound ({bound:.2f} GB/s): {rd[native_impl] / bound:.2f} (target >= 0.90)",
        f"- encfs::file:// read / the OpenSSL build (ENCFS_AES=openssl): {rd[native_impl] / rd['openssl']:.2f} (target >= 1.6)",
    ]
    print("\n".join(ratios))
    lines = [
        "## AES-256-GCM implementations",
        "",
        f"Machine: {cpu_model()}, {cores} cores; flags: {cpu_flags()}. Python {platform.python_version()}, "
        f"cryptography {cryptography.__version__}. Native AES: {nb.aes_describe(native_impl)}; baseline: {nb.aes_describe('openssl')}.",
        f"Command: `python benchmarks/bench_aes.py --size-mib {args.size_mib} --reps {args.reps}` ({time.strftime('%Y-%m-%d')}, "
        f"{time.time() - started:.0f} s). One run; best of several per row; GB = 10^9 bytes of plaintext.",
        "",
        *t.markdown(),
        "",
        "Ratios from this run:",
        "",
        *ratios,
        *NOTES,
        "",
        "Backend routing, GB/s per span length (in memory, same run). cryptography "
        f"{cryptography.__version__} releases the GIL in `decrypt_into` (the 4 MiB row above), but over "
        "16 KiB chunks each call's Python work holds it, and Python threads over pyca never come near "
        "native; one native thread beats the python backend from 2 chunks on. So `auto` sends spans of "
        "2 chunks and more to native on any thread count (ENCFS_THREADS=1 included) and single chunks "
        "to pyca (a tie).",
        "",
        *route,
    ]
    if not args.no_write:
        update_results(Path(__file__).resolve().parent / "RESULTS.md", "aes", lines)


if __name__ == "__main__":
    main()
