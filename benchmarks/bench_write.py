"""The write path on local disk: encrypt + write + commit against a plaintext write of the same
bytes, in one run, as ratios.

Rows (4 MiB ``write`` calls, 1 GiB by default, each measured ``--repeats`` times, interleaved,
medians; the page cache is synced before each so no run inherits another's dirty pages):

* plaintext write (Python ``open().write``), no fsync;
* ``encfs::file://`` write with ``durable=False`` (no fsync): the target compares this row;
* both again with fsync before the file counts as written (encfs's default, ``durable=True``),
  reported beside them: what durability costs;
* the AES limit: the fastest AES-256-GCM encryption measured in-process on this CPU (1 thread,
  16 KiB chunks), so the bound is min(plaintext write, cores x limit);
* peak RSS of a process streaming ``--rss-gib`` GiB through an encrypted write.

    python benchmarks/bench_write.py [--size-mib 1024] [--repeats 5] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from main_job import cpu_model, update_results  # noqa: E402

BLOCK = 4 << 20
GB = 1e9


def write_plain(path: Path, total: int, fsync: bool) -> float:
    buf = os.urandom(BLOCK)
    os.sync()
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(total // BLOCK):
            f.write(buf)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return time.perf_counter() - t


def write_encfs(path: Path, total: int, key: str, durable: bool) -> float:
    from encfs.filesystem import EncFileSystem

    enc = EncFileSystem(key=key, durable=durable, skip_instance_cache=True)
    buf = os.urandom(BLOCK)
    os.sync()
    t = time.perf_counter()
    with enc.open(str(path), "wb") as f:
        for _ in range(total // BLOCK):
            f.write(buf)
    return time.perf_counter() - t


def aes_limit(seconds: float = 1.5) -> dict[str, float]:
    """GB/s of AES-256-GCM encryption, 1 thread, 16 KiB chunks, for each implementation here."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from encfs import cobblestone as cs

    out: dict[str, float] = {}
    chunk = bytearray(os.urandom(cs.CHUNK_SIZE))
    sealed = bytearray(cs.CHUNK_SIZE + cs.TAG_SIZE)
    aead, nonce = AESGCM(os.urandom(32)), os.urandom(12)
    if hasattr(aead, "encrypt_into"):
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            aead.encrypt_into(nonce, chunk, None, sealed)
            n += len(chunk)
        out["pyca/cryptography AESGCM.encrypt_into"] = n / (time.perf_counter() - t) / GB
    try:
        from encfs._native_backend import NativeChunkCipher
    except ImportError:
        return out
    cipher = NativeChunkCipher(os.urandom(32), os.urandom(12), 1, 1)
    block = memoryview(bytearray(os.urandom(256 * cs.CHUNK_SIZE)))
    sealed_block = memoryview(bytearray(256 * cs.CT_CHUNK_SIZE))
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        cipher.encrypt_into(0, block, sealed_block, False)
        n += len(block)
    out["encfs native"] = n / (time.perf_counter() - t) / GB
    cipher.close()
    return out


RSS_CLIENT = """
import os, sys, json
from encfs.filesystem import EncFileSystem
enc = EncFileSystem(key=sys.argv[1], durable=False, skip_instance_cache=True)
buf = os.urandom(4 << 20)
with enc.open(sys.argv[2], "wb") as f:
    for _ in range(int(sys.argv[3]) // len(buf)):
        f.write(buf)
os.remove(sys.argv[2])
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"maxrss_mib": hwm / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rss-gib", type=float, default=4)
    ap.add_argument("--dir", default=str(ROOT / "bench-data"), help="where to write (local disk)")
    ap.add_argument("--record", action="store_true", help="write the table to benchmarks/RESULTS.md")
    args = ap.parse_args()

    from encfs.keys import SymmetricKey, key_file_text

    os.makedirs(args.dir, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-write-", dir=args.dir))
    (tmp / "k.key").write_text(key_file_text(SymmetricKey.generate()))
    key = f"keyfile:{tmp / 'k.key'}"
    total = args.size_mib << 20
    runs: dict[str, list[float]] = {}
    rows_def = {
        "plain": lambda p: write_plain(p, total, False),
        "encfs": lambda p: write_encfs(p, total, key, False),
        "plain+fsync": lambda p: write_plain(p, total, True),
        "encfs+fsync": lambda p: write_encfs(p, total, key, True),
    }
    try:
        for _ in range(args.repeats):
            for name, fn in rows_def.items():
                path = tmp / name
                runs.setdefault(name, []).append(total / fn(path) / GB)
                path.unlink()
        limits = aes_limit()
        out = subprocess.run(
            [sys.executable, "-c", RSS_CLIENT, key, str(tmp / "rss"), str(int(args.rss_gib * (1 << 30)))],
            capture_output=True, text=True, cwd=ROOT, check=True,
        )
        rss = json.loads(out.stdout.strip().splitlines()[-1])["maxrss_mib"]
    finally:
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()

    med = {k: statistics.median(v) for k, v in runs.items()}
    ratio = statistics.median(e / p for e, p in zip(runs["encfs"], runs["plain"]))
    ratio_sync = statistics.median(e / p for e, p in zip(runs["encfs+fsync"], runs["plain+fsync"]))
    cores = len(os.sched_getaffinity(0))
    limit_name, limit = max(limits.items(), key=lambda kv: kv[1]) if limits else ("none measured", float("inf"))
    bound = min(med["plain"], cores * limit)
    rows = [
        "## Write path: encrypted write against plaintext write (AES-speed issue)",
        "",
        f"Local disk, {cpu_model()}, {cores} cores; {args.size_mib} MiB per file in 4 MiB writes; medians of "
        f"{args.repeats} interleaved runs (`python benchmarks/bench_write.py --record`).",
        "",
        "| row | GB/s | ratio |",
        "|---|---:|---:|",
        f"| plaintext write, no fsync | {med['plain']:.2f} | 1.00 |",
        f"| `encfs::file://` write, `durable=False` (no fsync) | {med['encfs']:.2f} | {ratio:.2f} of plaintext |",
        f"| plaintext write + fsync | {med['plain+fsync']:.2f} | |",
        f"| `encfs::file://` write, default (`durable=True`: fsync file and directory) | {med['encfs+fsync']:.2f} | "
        f"{ratio_sync:.2f} of plaintext + fsync |",
        *[f"| AES limit: {name}, 1 thread, 16 KiB chunks | {v:.2f} | |" for name, v in sorted(limits.items())],
        f"| bound = min(plaintext write, {cores} x {limit_name}) | {bound:.2f} | |",
        f"| **encfs write / bound** (target >= 0.80) | | **{med['encfs'] / bound:.2f}** |",
        f"| peak RSS streaming a {args.rss_gib:g} GiB encrypted write (target < 256 MiB) | {rss:.0f} MiB | |",
        "",
        "GB/s are this machine's (shared, noisy); the ratios are the result. Runs: "
        + "; ".join(f"{k} {', '.join(f'{x:.2f}' for x in v)}" for k, v in runs.items()),
    ]
    print("\n".join(rows))
    if args.record:
        update_results(Path(__file__).with_name("RESULTS.md"), "write", rows)


if __name__ == "__main__":
    main()
