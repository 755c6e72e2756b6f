"""Bucket-scale migration against a plain copy of the same objects, in one run, as ratios.

Rows (local disk, and an S3 endpoint on loopback: moto server behind the latency proxy):

* plain copy: ``fsspec`` ``cp_file`` of every object (local) / ``get``+``put`` through s3fs;
* ``encfs migrate`` (copy + read back + compare digests, journal) into ``encfs::`` with its
  defaults (4 objects in flight);
* rclone ``copy`` where an ``rclone`` binary is installed (a peer row; skipped otherwise).

The target (issue: bucket-scale operations): migrate + verify >= 0.5x a plain copy's
throughput on local disk.

    python benchmarks/bench_migrate.py [--objects 200] [--size-kib 512] [--repeats 3] [--record]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from main_job import cpu_model, update_results  # noqa: E402

MB = 1e6


def make_tree(root: Path, objects: int, size: int) -> int:
    total = 0
    for i in range(objects):
        p = root / f"d{i % 10}" / f"obj-{i:05d}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        n = size // 2 + (i * 7919) % size
        p.write_bytes(os.urandom(n))
        total += n
    return total


def plain_copy(src: Path, dst: Path) -> float:
    import fsspec

    fs = fsspec.filesystem("file")
    t = time.perf_counter()
    for path in fs.find(str(src)):
        out = dst / Path(path).relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        fs.cp_file(path, str(out))
    return time.perf_counter() - t


def migrate(src: Path, dst: Path, key: str, journal: Path, extra: list[str] | None = None) -> float:
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "encfs.cli", "migrate", "-k", key, "--journal", str(journal), "--no-progress", "--json",
         *(extra or []), str(src), f"encfs::file://{dst}"],
        check=True, capture_output=True, cwd=ROOT,
    )
    return time.perf_counter() - t


def plain_copy_synced(src: Path, dst: Path) -> float:
    """The plain copy made as durable as migrate's commits: its files synced before it ends."""
    t = time.perf_counter()
    plain_copy(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.syncfs(fd) if hasattr(os, "syncfs") else os.sync()
    finally:
        os.close(fd)
    return time.perf_counter() - t


def work_bound(seconds: float = 2.0) -> float:
    """MB/s of plaintext that this machine's cores can push through the work migrate must do per
    byte, with no I/O and no Python per object: SHA-256 of the source, AES-GCM seal, AES-GCM
    open of the read-back, SHA-256 of the plaintext read back; one thread per core on 16 MiB
    buffers (hashlib and the native cipher release the GIL). No migration can beat it here."""
    import hashlib
    import threading

    from encfs import cobblestone as cs
    from encfs.backend import get_backend

    n = 16 << 20
    cores = len(os.sched_getaffinity(0))
    done = [0] * cores

    def worker(k: int) -> None:
        cipher = get_backend().chunk_cipher(memoryview(os.urandom(32)), os.urandom(12))
        plain, back = bytearray(os.urandom(n)), bytearray(n)
        sealed = bytearray(n // cs.CHUNK_SIZE * (cs.CHUNK_SIZE + 16))
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            hashlib.sha256(plain).digest()
            cipher.encrypt_into(0, memoryview(plain), memoryview(sealed), False)
            cipher.decrypt_into(0, memoryview(sealed), memoryview(back))
            hashlib.sha256(back).digest()
            done[k] += n

    t = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(cores)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sum(done) / (time.perf_counter() - t) / MB


def rclone_copy(src: Path, dst: Path) -> float | None:
    if shutil.which("rclone") is None:
        return None
    t = time.perf_counter()
    subprocess.run(["rclone", "copy", str(src), str(dst)], check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objects", type=int, default=200)
    ap.add_argument("--size-kib", type=int, default=512, help="object sizes spread over [size/2, 1.5 size)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=str(ROOT / "bench-data"))
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()

    from encfs.keys import SymmetricKey, key_file_text

    os.makedirs(args.dir, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-migrate-", dir=args.dir))
    try:
        (work / "k.key").write_text(key_file_text(SymmetricKey.generate()))
        key = f"keyfile:{work / 'k.key'}"
        src = work / "src"
        total = make_tree(src, args.objects, args.size_kib << 10)
        runs: dict[str, list[float]] = {"plain": [], "plain_synced": [], "migrate": [], "rclone": [], "bound": []}
        for r in range(args.repeats):
            runs["bound"].append(work_bound())
            for name in ("plain", "plain_synced", "migrate", "rclone"):
                dst = work / f"dst-{name}-{r}"
                os.sync()
                if name == "plain":
                    dt = plain_copy(src, dst)
                elif name == "plain_synced":
                    dt = plain_copy_synced(src, dst)
                elif name == "migrate":
                    dt = migrate(src, dst, key, work / f"j-{r}.sqlite")
                else:
                    dt = rclone_copy(src, dst)
                if dt is not None:
                    runs[name].append(total / dt / MB)
                shutil.rmtree(dst, ignore_errors=True)
        rerun_dst = work / "dst-rerun"
        migrate(src, rerun_dst, key, work / "j-rerun.sqlite")
        t = time.perf_counter()
        migrate(src, rerun_dst, key, work / "j-rerun.sqlite")
        rerun_s = time.perf_counter() - t
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in runs.items() if v}
    ratio = statistics.median(m / p for m, p in zip(runs["migrate"], runs["plain"]))
    rows = [
        "## Bulk migration: encfs migrate against a plain copy (bucket-scale issue)",
        "",
        f"Local disk, {cpu_model()}, {os.cpu_count()} cores; {args.objects} objects, {total / MB:.0f} MB "
        f"({args.size_kib // 2}-{args.size_kib * 3 // 2} KiB each); medians of {args.repeats} interleaved runs "
        "(`python benchmarks/bench_migrate.py --record`). `migrate` includes reading every copy back, authenticating it "
        "and comparing its SHA-256 with the source's, the journal, and starting the command.",
        "",
        "| path | MB/s | ratio to plain copy |",
        "|---|---:|---:|",
        f"| plain copy (`fsspec` `cp_file`) | {med['plain']:.0f} | 1.00 |",
        f"| plain copy, then synced to disk (as durable as migrate's commits) | {med['plain_synced']:.0f} | {med['plain_synced'] / med['plain']:.2f} |",
        f"| `encfs migrate` (copy + read back + digest, 4 in flight) | {med['migrate']:.0f} | **{ratio:.2f}** (target >= 0.50) |",
        f"| work bound: SHA-256 x 2 + AES-GCM seal + open, all {len(os.sched_getaffinity(0))} cores, no I/O | {med['bound']:.0f} | "
        f"{med['bound'] / med['plain']:.2f} |",
        (f"| rclone copy | {med['rclone']:.0f} | {med['rclone'] / med['plain']:.2f} |" if "rclone" in med else
         "| rclone copy | not installed here | |"),
        f"| rerun of a finished migration (every object skipped) | {args.objects} objects in {rerun_s:.2f} s | |",
        "",
        "Runs (MB/s): " + "; ".join(f"{k} {', '.join(f'{x:.0f}' for x in v)}" for k, v in runs.items() if v),
        "",
        f"Against the synced plain copy, migrate runs at {med['migrate'] / med['plain_synced']:.2f}x; it reaches "
        f"{med['migrate'] / med['bound']:.2f}x of the work bound.",
    ]
    print("\n".join(rows))
    if args.record:
        update_results(Path(__file__).with_name("RESULTS.md"), "migrate", rows)


if __name__ == "__main__":
    main()
