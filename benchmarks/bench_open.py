"""What authenticating the final chunk at open costs (the hardening issue: a file cut at a
chunk boundary must never read as a shorter valid file), in one run on the same files:
open + one 4 KiB read at a random offset + close, with the check and with it switched off
(the behaviour before the fix, reproduced here by replacing the check with a no-op; never
done outside this benchmark). Local disk, page cache warm, the default backend.

    python benchmarks/bench_open.py [--opens 2000] [--reps 5]

Prints opens per second and the ratio, and writes a table into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from main_job import cpu_model, update_results  # noqa: E402

from encfs.filesystem import EncFileSystem  # noqa: E402
from encfs.keys import SymmetricKey, key_file_text  # noqa: E402
from encfs.reader import ChunkReader  # noqa: E402

SIZES = {"1 KiB": 1 << 10, "150 KiB": 150 << 10, "16 MiB": 16 << 20}


def opens_per_second(fs: EncFileSystem, path: str, size: int, n: int, reps: int, seed: int) -> float:
    best = float("inf")
    for _ in range(reps):
        rng = random.Random(seed)
        t0 = time.perf_counter()
        for _ in range(n):
            with fs.open(path, "rb") as f:
                f.seek(rng.randrange(max(1, size - 4096)))
                f.read(4096)
        best = min(best, time.perf_counter() - t0)
    return n / best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--opens", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="encfs-bench-open-"))
    (work / "k.key").write_text(key_file_text(SymmetricKey.generate()))
    fs = EncFileSystem(key=f"keyfile:{work / 'k.key'}", skip_instance_cache=True)
    real = ChunkReader._authenticate_final_chunk
    rows = []
    for name, size in SIZES.items():
        path = str(work / name.replace(" ", ""))
        fs.pipe_file(path, os.urandom(size))
        results = {}
        for label, check in (("checked", real), ("unchecked", lambda self, head: None)):
            ChunkReader._authenticate_final_chunk = check  # type: ignore[method-assign]
            results[label] = opens_per_second(fs, path, size, args.opens, args.reps, seed=1)
        ChunkReader._authenticate_final_chunk = real  # type: ignore[method-assign]
        ratio = results["checked"] / results["unchecked"]
        rows.append((name, results["checked"], results["unchecked"], ratio))
        print(f"{name:>8}: {results['checked']:8.0f} opens/s checked, {results['unchecked']:8.0f} unchecked, ratio {ratio:.2f}")
    cores = len(os.sched_getaffinity(0))
    lines = [
        "## Open cost of authenticating the final chunk",
        "",
        f"Machine: {cpu_model()}, {cores} cores. Command: `python benchmarks/bench_open.py --opens {args.opens} --reps {args.reps}`"
        f" ({time.strftime('%Y-%m-%d')}). One run; best of {args.reps}; each open is open + one 4 KiB read at a random offset + close.",
        "",
        "| file | opens/s, final chunk checked | opens/s, unchecked (before the fix) | ratio |",
        "|---|---:|---:|---:|",
        *[f"| {n} | {c:.0f} | {u:.0f} | {r:.2f} |" for n, c, u, r in rows],
    ]
    update_results(Path(args.out), "open-cost", lines)


if __name__ == "__main__":
    main()
