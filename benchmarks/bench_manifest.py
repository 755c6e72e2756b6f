"""What signed dataset manifests cost (docs/MANIFESTS.md), in one run:

1. Verifying a manifest of 100,000 entries (synthetic: random file ids, commitments and
   digests): the Ed25519 signature over the body plus parsing and checking every entry
   (``Manifest.parse``), and the same through ``manifest.load`` from an encrypted
   ``.encfs-manifest`` on local disk (read + decrypt + parse).
2. Loader overhead on a small dataset, with and without ``manifest=``: making an
   ``EncryptedRecordDataset`` (opens every file once: with a manifest, also loads and verifies
   it and checks each file at open) plus one shuffled epoch (each file opened again and
   checked, then read by batches); and one pass of an ``EncryptedTarDataset`` (with a
   manifest, also the SHA-256 of each shard's plaintext, hashed as it is read).

    python benchmarks/bench_manifest.py [--entries 100000] [--reps 5] [--mib 32] [--no-record]

Prints the figures and writes the ``manifest`` block of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from main_job import cpu_model, update_results  # noqa: E402

from encfs import manifest as M  # noqa: E402
from encfs.filesystem import EncFileSystem  # noqa: E402
from encfs.keys import SymmetricKey, key_file_text  # noqa: E402
from encfs.signing import SigningKey  # noqa: E402

RECORD = 4096
SHARDS = 16
BATCH = 64


def best(fn, reps: int) -> float:
    out = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out


def synthetic(n: int) -> M.Manifest:
    rnd = os.urandom
    entries = [M.Entry(f"train/shard-{i:06d}.bin", 9_633_792, rnd(16).hex(), rnd(32).hex(), rnd(32).hex()) for i in range(n)]
    return M.Manifest(entries, 1, name="synthetic")


def bench_verify(work: Path, fs: EncFileSystem, n: int, reps: int) -> dict:
    key = SigningKey.generate()
    m = synthetic(n)
    t = time.perf_counter()
    data = m.sign(key)
    sign_s = time.perf_counter() - t
    parse_s = best(lambda: M.Manifest.parse(data, [key.public], min_version=1), reps)
    root = work / "big"
    root.mkdir()
    M.write_bytes(fs, str(root), data)
    load_s = best(lambda: M.load(fs, str(root), [key.public], min_version=1), reps)
    return {"entries": n, "bytes": len(data), "sign_s": sign_s, "parse_s": parse_s, "load_s": load_s}


def _tar(n_samples: int, sample: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(n_samples):
            data = rng.bytes(sample)
            info = tarfile.TarInfo(f"{i:06d}.bin")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def bench_loaders(work: Path, fs: EncFileSystem, keyref: str, mib: int, reps: int) -> dict:
    from encfs.loaders import EncryptedRecordDataset
    from encfs.loaders.tars import EncryptedTarDataset

    key = SigningKey.generate()
    rec_root, tar_root = work / "records", work / "tars"
    per_shard = (mib << 20) // SHARDS // RECORD
    rng = np.random.default_rng(0)
    for k in range(SHARDS):
        fs.pipe_file(str(rec_root / f"shard-{k:03d}.bin"), rng.bytes(per_shard * RECORD))
        fs.pipe_file(str(tar_root / f"shard-{k:03d}.tar"), _tar(per_shard, RECORD, k))
    M.create(fs, str(rec_root), key)
    M.create(fs, str(tar_root), key)
    opts = {"encfs": {"key": keyref}}
    spec = {"signers": [key.public]}
    order = np.random.default_rng(1).permutation(SHARDS * per_shard)

    def records(manifest) -> None:
        ds = EncryptedRecordDataset(f"encfs::file://{rec_root}/shard-*.bin", (RECORD,), np.uint8, storage_options=opts, manifest=manifest)
        for i in range(0, len(order), BATCH):
            ds.__getitems__(order[i : i + BATCH].tolist())
        ds.close()

    def tars(manifest) -> None:
        ds = EncryptedTarDataset(f"encfs::file://{tar_root}/shard-*.tar", opts, shuffle=False, manifest=manifest)
        n = sum(1 for _ in ds)
        assert n == SHARDS * per_shard

    out: dict = {"bytes": SHARDS * per_shard * RECORD, "files": SHARDS}
    for name, fn in (("records", records), ("tars", tars)):
        fn(None)  # warm the page cache and imports
        without = with_ = float("inf")
        for i in range(reps):  # interleaved, first one then the other first: drift and order hit both alike
            for manifest in ((None, spec) if i % 2 == 0 else (spec, None)):
                t = best(lambda: fn(manifest), 1)
                if manifest is None:
                    without = min(without, t)
                else:
                    with_ = min(with_, t)
        out[name] = (without, with_)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--mib", type=int, default=32, help="dataset size of the loader runs")
    ap.add_argument("--no-record", dest="record", action="store_false", help="print only; leave RESULTS.md alone")
    ap.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="encfs-bench-manifest-"))
    keyfile = work / "k.key"
    keyfile.write_text(key_file_text(SymmetricKey.generate()))
    keyref = f"keyfile:{keyfile}"
    fs = EncFileSystem(key=keyref, skip_instance_cache=True, durable=False)
    v = bench_verify(work, fs, args.entries, args.reps)
    print(f"{v['entries']} entries, {v['bytes'] / 1e6:.1f} MB: sign {v['sign_s']:.3f} s, verify+parse {v['parse_s']:.3f} s, load (read+decrypt+verify) {v['load_s']:.3f} s")
    lo = bench_loaders(work, fs, keyref, args.mib, args.reps)
    for name in ("records", "tars"):
        a, b = lo[name]
        print(f"{name}: without manifest {a:.3f} s, with {b:.3f} s, ratio {b / a:.2f}")
    if not args.record:
        return
    cores = len(os.sched_getaffinity(0))
    reps_lo = args.reps
    mb = lo["bytes"] / 1e6
    lines = [
        "## Signed dataset manifests",
        "",
        f"Machine: {cpu_model()}, {cores} cores (shared with other jobs). Command: `python benchmarks/bench_manifest.py"
        f" --entries {args.entries} --reps {args.reps} --mib {args.mib}` ({time.strftime('%Y-%m-%d')}). One run; best of the repetitions.",
        "",
        f"Verifying a manifest of {v['entries']:,} entries ({v['bytes'] / 1e6:.1f} MB; synthetic, best of {args.reps}):",
        "",
        "| step | seconds |",
        "|---|---:|",
        f"| Ed25519 signature + parse and check of every entry (`Manifest.parse`) | {v['parse_s']:.3f} |",
        f"| the same from an encrypted `.encfs-manifest` on local disk (`manifest.load`: read, decrypt, verify) | {v['load_s']:.3f} |",
        f"| making and signing it (`Manifest.sign`, not counting the hashing of the files) | {v['sign_s']:.3f} |",
        "",
        f"Loader overhead, {lo['files']} files, {mb:.0f} MB, local disk, page cache warm (best of {reps_lo}, runs with and without interleaved, in alternating order):",
        "",
        "| run | without `manifest=` (s) | with (s) | ratio |",
        "|---|---:|---:|---:|",
        f"| `EncryptedRecordDataset`: make (every file opened once) + one shuffled epoch, batch {BATCH} of {RECORD} B | {lo['records'][0]:.3f} | {lo['records'][1]:.3f} | {lo['records'][1] / lo['records'][0]:.2f} |",
        f"| `EncryptedTarDataset`: make + one pass (with: SHA-256 of every shard as it is read) | {lo['tars'][0]:.3f} | {lo['tars'][1]:.3f} | {lo['tars'][1] / lo['tars'][0]:.2f} |",
        "",
        "With a manifest, the record dataset reads no byte more: files are checked at open (file id, key commitment, size"
        " against the signed entry) and never hashed; the tar dataset hashes the plaintext it is already reading.",
    ]
    update_results(Path(args.out), "manifest", lines)


if __name__ == "__main__":
    main()
