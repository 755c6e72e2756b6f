"""What writer signatures (docs/FORMAT.md §1.5) cost, in one run on the same machine: opens of a
signed file by a reader that checks the signature (``signers=``) against one that does not,
and small-file writes with ``sign_with=`` against writes without. Local disk, page cache warm,
the default backend; interleaved repetitions, best of each.

    python benchmarks/bench_signatures.py [--opens 2000] [--writes 1000] [--reps 5] [--record]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from main_job import cpu_model, update_results  # noqa: E402

from encfs.filesystem import EncFileSystem  # noqa: E402
from encfs.keys import SymmetricKey, key_file_text  # noqa: E402
from encfs.signing import SigningKey, write_signing_key  # noqa: E402


def opens(fs: EncFileSystem, path: str, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        with fs.open(path, "rb") as f:
            f.read(4096)
    return n / (time.perf_counter() - t)


def writes(fs: EncFileSystem, root: Path, n: int, data: bytes) -> float:
    t = time.perf_counter()
    for i in range(n):
        fs.pipe_file(str(root / f"w{i % 50}"), data)
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--opens", type=int, default=2000)
    ap.add_argument("--writes", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--record", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="encfs-bench-sig-"))
    (work / "k.key").write_text(key_file_text(SymmetricKey.generate()))
    signer = SigningKey.generate()
    write_signing_key(str(work / "w.sign"), signer)
    key = f"keyfile:{work / 'k.key'}"
    plain_w = EncFileSystem(key=key, durable=False, skip_instance_cache=True)
    signed_w = EncFileSystem(key=key, durable=False, sign_with=str(work / "w.sign"), skip_instance_cache=True)
    plain_r = EncFileSystem(key=key, skip_instance_cache=True)
    checking_r = EncFileSystem(key=key, signers=[signer.public], skip_instance_cache=True)
    path = str(work / "signed-150k")
    signed_w.pipe_file(path, os.urandom(150 << 10))
    (work / "a").mkdir()
    (work / "b").mkdir()
    data = os.urandom(1024)
    best: dict[str, float] = {}
    for _ in range(args.reps):
        for name, value in (
            ("open, no signature check", lambda: opens(plain_r, path, args.opens)),
            ("open, signature checked", lambda: opens(checking_r, path, args.opens)),
            ("write 1 KiB, unsigned", lambda: writes(plain_w, work / "a", args.writes, data)),
            ("write 1 KiB, signed", lambda: writes(signed_w, work / "b", args.writes, data)),
        ):
            best[name] = max(best.get(name, 0.0), value())
    open_ratio = best["open, signature checked"] / best["open, no signature check"]
    write_ratio = best["write 1 KiB, signed"] / best["write 1 KiB, unsigned"]
    for name, v in best.items():
        print(f"{name:>28}: {v:8.0f} /s")
    print(f"open ratio {open_ratio:.2f}, write ratio {write_ratio:.2f}")
    if not args.record:
        return
    cores = len(os.sched_getaffinity(0))
    lines = [
        "## Writer signatures: cost at open and at write (signed-writers part of the authenticity issue)",
        "",
        f"Machine: {cpu_model()}, {cores} cores. Command: `python benchmarks/bench_signatures.py --opens {args.opens} "
        f"--writes {args.writes} --reps {args.reps} --record` ({time.strftime('%Y-%m-%d')}). Interleaved, best of {args.reps}. "
        "Opens: open + one 4 KiB read + close of a signed 150 KiB file. Writes: 1 KiB files, `durable=False`.",
        "",
        "| operation | per second | ratio |",
        "|---|---:|---:|",
        f"| open, no signature check | {best['open, no signature check']:.0f} | 1.00 |",
        f"| open, signature checked (`signers=`) | {best['open, signature checked']:.0f} | {open_ratio:.2f} |",
        f"| write 1 KiB, unsigned | {best['write 1 KiB, unsigned']:.0f} | 1.00 |",
        f"| write 1 KiB, signed (`sign_with=`) | {best['write 1 KiB, signed']:.0f} | {write_ratio:.2f} |",
        "",
        "A verification result is remembered (same key, signature and header), so the open row is what a repeated"
        " open costs; a first open adds one Ed25519 verification (~0.05-0.12 ms measured here, depending on load).",
    ]
    update_results(Path(__file__).with_name("RESULTS.md"), "signatures", lines)


if __name__ == "__main__":
    main()
