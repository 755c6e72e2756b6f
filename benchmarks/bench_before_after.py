"""Throughput of two versions of encfs in one run: an older git revision (checked out into a
temporary worktree, its native extension built there) against this working tree, each
benchmark alternated between the two, best of the rounds per row. Used to show a refactor
lost no throughput.

    python benchmarks/bench_before_after.py --old-rev REV [--rounds 2] [--size-mib 512] ...

Runs the *old* revision's ``benchmarks/bench_throughput.py`` under the old code and this
tree's under the new (same arguments), plus under each: an encrypted-write row (one file
through ``fsspec.open("encfs::file://...", "wb")``, fsync included) and the C library's own
4 MiB spans (from memory and by pread; each build in its own process), and writes a table of
GB/s and new/old ratios into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from main_job import cpu_model, update_results  # noqa: E402

HERE = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| (?P<name>[^|]+?) \| (?P<gbps>[0-9.]+) \|")

WRITE = """
import os, sys, time, fsspec
from encfs.keys import SymmetricKey, key_file_text
work = sys.argv[1]; size = int(sys.argv[2]) << 20
open(f"{work}/k.key", "w").write(key_file_text(SymmetricKey.generate()))
opts = {"encfs": {"key": f"keyfile:{work}/k.key"}}
block = os.urandom(4 << 20)
best = float("inf")
for _ in range(3):
    t = time.perf_counter()
    with fsspec.open(f"encfs::file://{work}/w.bin", "wb", **opts) as f:
        for _ in range(size // len(block)):
            f.write(block)
    best = min(best, time.perf_counter() - t)
print(f"| encrypted write (fsync included) | {size / best / 1e9:.3f} |")
"""


C_SPANS = """
import os, tempfile, time
from encfs._native import ffi, lib
CH, TAG, n = 16384, 16, 4 << 20
key, nonce = os.urandom(32), os.urandom(12)
kb, nb = ffi.from_buffer("uint8_t[]", key), ffi.new("uint8_t[]", nonce)
pt = os.urandom(n)
ct = bytearray(n + (n // CH + 1) * TAG)
m = lib.encfs_encrypt_chunks(kb, nb, 0, ffi.from_buffer("uint8_t[]", pt), n, 1, ffi.from_buffer("uint8_t[]", ct), len(ct), 1)
out = bytearray(n)
cb, ob = ffi.from_buffer("uint8_t[]", ct), ffi.from_buffer("uint8_t[]", out)
failed, err = ffi.new("int64_t *"), ffi.new("int *")


def rate(call):
    best = float("inf")
    for _ in range(40):
        t0 = time.perf_counter()
        rc = call()
        best = min(best, time.perf_counter() - t0)
        assert rc == n, rc
    return n / best / 1e9


with tempfile.TemporaryFile() as f:
    f.write(ct[:m])
    f.flush()
    for t in (1, 2):
        memory = rate(lambda: lib.encfs_decrypt_chunks(kb, nb, 0, cb, m, ob, n, t, failed))
        pread = rate(lambda: lib.encfs_pread_decrypt_chunks(f.fileno(), 0, kb, nb, 0, m, ob, n, t, failed, err))
        print(f"| C decrypt of 4 MiB spans (memory), {t} thread(s) | {memory:.3f} |")
        print(f"| C decrypt of 4 MiB spans (pread), {t} thread(s) | {pread:.3f} |")
"""


def build_old(rev: str, where: Path) -> Path:
    tree = where / "old"
    subprocess.run(["git", "-C", str(HERE), "worktree", "add", "-f", "--detach", str(tree), rev], check=True, capture_output=True)
    build = where / "build"
    subprocess.run([sys.executable, "native/build_native.py", str(build)], cwd=tree, check=True, capture_output=True)
    for so in build.rglob("_native*.so"):
        shutil.copy(so, tree / "encfs" / so.name)
    return tree


def run_rows(tree: Path, args: list[str], work: Path, size_mib: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = work / "out.md"
    out.write_text("")
    subprocess.run([sys.executable, str(tree / "benchmarks" / "bench_throughput.py"), *args, "--out", str(out),
                    "--workdir", str(work / "data")], cwd=tree, env=env, check=True, capture_output=True)
    lines = out.read_text().splitlines()
    wdir = work / "write"
    wdir.mkdir(exist_ok=True)
    res = subprocess.run([sys.executable, "-c", WRITE, str(wdir), str(size_mib)], cwd=tree, env=env, check=True, capture_output=True, text=True)
    shutil.rmtree(wdir, ignore_errors=True)
    lines += res.stdout.splitlines()
    res = subprocess.run([sys.executable, "-c", C_SPANS], cwd=work, env=env, check=True, capture_output=True, text=True)
    lines += res.stdout.splitlines()
    return {m["name"]: float(m["gbps"]) for m in map(ROW.match, lines) if m}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old-rev", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--mem-mib", type=int, default=128)
    ap.add_argument("--rss-gib", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    ap.add_argument("--marker", default="before-after", help="the RESULTS.md block to write (one per comparison)")
    ap.add_argument("--title", default="Before and after (same run)")
    a = ap.parse_args()
    passthrough = ["--size-mib", str(a.size_mib), "--mem-mib", str(a.mem_mib), "--rss-gib", str(a.rss_gib), "--reps", str(a.reps)]
    where = Path(tempfile.mkdtemp(prefix="encfs-before-after-"))
    try:
        old = build_old(a.old_rev, where)
        best: dict[str, dict[str, float]] = {"old": {}, "new": {}}
        for r in range(a.rounds):
            for label, tree in (("old", old), ("new", HERE)):
                work = where / f"{label}{r}"
                work.mkdir()
                for name, v in run_rows(tree, passthrough, work, a.size_mib).items():
                    best[label][name] = max(v, best[label].get(name, 0.0))
                shutil.rmtree(work, ignore_errors=True)
                print(f"round {r + 1}: {label} done", flush=True)
    finally:
        subprocess.run(["git", "-C", str(HERE), "worktree", "remove", "--force", str(where / "old")], capture_output=True)
        shutil.rmtree(where, ignore_errors=True)
    new_rev = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    cores = len(os.sched_getaffinity(0))
    lines = [
        f"## {a.title}",
        "",
        f"Machine: {cpu_model()}, {cores} cores. Command: `python benchmarks/bench_before_after.py --old-rev {a.old_rev} "
        f"--marker {a.marker} --rounds {a.rounds} --size-mib {a.size_mib} --mem-mib {a.mem_mib} --rss-gib {a.rss_gib} --reps {a.reps}` "
        f"({time.strftime('%Y-%m-%d')}): old = {a.old_rev}, new = the working tree at {new_rev}; each benchmark "
        f"alternated old/new, best of {a.rounds} rounds x {a.reps} reps per row, GB/s.",
        "",
        "| measurement | old | new | new / old |",
        "|---|---:|---:|---:|",
    ]
    for name in best["new"]:
        o, n = best["old"].get(name), best["new"][name]
        lines.append(f"| {name} | {'' if o is None else f'{o:.2f}'} | {n:.2f} | {'' if not o else f'{n / o:.2f}'} |")
    print("\n".join(lines))
    update_results(Path(a.out), a.marker, lines)


if __name__ == "__main__":
    main()
