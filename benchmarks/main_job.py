"""The main job: encrypt a small synthetic dataset on local disk, then read it and train a
model through ``encfs::file://`` URLs, and report throughput against the same work on the
plaintext files (ratios from one run; these machines are shared and noisy).

    python benchmarks/main_job.py [--size-mib 64] [--workdir bench-data]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path

import fsspec
import numpy as np

FEATURES = 255
RECORD = (FEATURES + 1) * 4
BLOCK = 4 << 20


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def update_results(path: Path, marker: str, lines: list[str]) -> None:
    """Replace (or append) the block between two ``<!-- marker -->`` lines of RESULTS.md."""
    tag = f"<!-- {marker} -->"
    block = tag + "\n" + "\n".join(lines) + "\n" + tag
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if tag in text:
        pre, _, rest = text.partition(tag)
        _, _, post = rest.partition(tag)
        text = pre + block + post
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def make_dataset(plain: Path, shards: int, records_per_shard: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=FEATURES).astype(np.float32)
    plain.mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        x = rng.normal(size=(records_per_shard, FEATURES)).astype(np.float32)
        y = (x @ w > 0).astype(np.float32)[:, None]
        (plain / f"shard-{k:03d}.bin").write_bytes(np.hstack([x, y]).tobytes())


def copy_all(srcs: list[str], dsts: list[str], opts: dict, durable: bool = False) -> float:
    """Seconds to copy each ``src`` to its ``dst`` in ``BLOCK`` reads; ``durable``: fsync each
    plaintext copy, as encfs's default does for each file it writes."""
    t = time.perf_counter()
    for src, dst in zip(srcs, dsts):
        with fsspec.open(src, "rb") as r, fsspec.open(dst, "wb", **opts) as w:
            while block := r.read(BLOCK):
                w.write(block)
            if durable:
                w.flush()
                os.fsync(w.fileno())
    return time.perf_counter() - t


def read_all(urls: list[str], opts: dict) -> int:
    total = 0
    buf = bytearray(BLOCK)
    for url in urls:
        with fsspec.open(url, "rb", **opts) as f:
            while n := f.readinto(buf):
                total += n
    return total


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def train(urls: list[str], opts: dict, epochs: int, workers: int) -> tuple[float, float, int]:
    import torch
    from torch.utils.data import DataLoader

    from encfs.loaders import EncryptedRecordDataset

    torch.manual_seed(0)
    ds = EncryptedRecordDataset(urls, (FEATURES + 1,), np.float32, storage_options=opts)
    dl = DataLoader(ds, batch_size=512, shuffle=False, num_workers=workers, persistent_workers=workers > 0)
    model = torch.nn.Linear(FEATURES, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    seen = 0
    t = time.perf_counter()
    for _ in range(epochs):
        for batch in dl:
            x, y = batch[:, :FEATURES], batch[:, FEATURES:]
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            seen += len(batch)
    elapsed = time.perf_counter() - t
    with torch.no_grad():
        batch = next(iter(DataLoader(ds, batch_size=4096)))  # 4 MiB: fits the default 8 MiB ulimit -l, so it stays locked
        acc = ((model(batch[:, :FEATURES]) > 0).float() == batch[:, FEATURES:]).float().mean().item()
    ds.close()
    return seen / elapsed, acc, seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=64, help="dataset size (default 64 MiB)")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    ap.add_argument("--workdir", default="bench-data")
    ap.add_argument("--record", action="store_true", help="write the figures to benchmarks/RESULTS.md")
    args = ap.parse_args()

    from encfs.backend import get_backend
    from encfs.keys import SymmetricKey, key_file_text

    work = Path(args.workdir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    key_path = work / "dataset.key"
    key_path.write_text(key_file_text(SymmetricKey.generate()))
    key_path.chmod(0o600)
    opts = {"encfs": {"key": f"keyfile:{key_path}"}}

    per_shard = max(1, args.size_mib * (1 << 20) // RECORD // args.shards)
    make_dataset(work / "plain", args.shards, per_shard)
    plain_urls = [f"file://{p}" for p in sorted((work / "plain").iterdir())]
    enc_urls = [f"encfs::file://{work / 'enc' / Path(u).name}" for u in plain_urls]
    nbytes = sum(os.path.getsize(u[7:]) for u in plain_urls)

    copy_urls = [f"file://{work / 'copy' / Path(u).name}" for u in plain_urls]
    (work / "copy").mkdir()
    copy_time = copy_all(plain_urls, copy_urls, {}, durable=True)
    enc_time = copy_all(plain_urls, enc_urls, opts)
    assert read_all(enc_urls, opts) == nbytes
    shutil.rmtree(work / "copy")

    plain_read = best_of(lambda: read_all(plain_urls, {}))
    enc_read = best_of(lambda: read_all(enc_urls, opts))
    plain_train = train(plain_urls, {}, args.epochs, args.workers)
    enc_train = train(enc_urls, opts, args.epochs, args.workers)

    mb = nbytes / 1e6
    lines = [
        f"encfs main job: {mb:.0f} MB in {args.shards} shards, cipher backend '{get_backend().name}', "
        f"{os.cpu_count()} cores, {cpu_model()}",
        f"  encrypt (write)      : plaintext {mb / copy_time:9.1f} MB/s | encfs {mb / enc_time:9.1f} MB/s | ratio {copy_time / enc_time:.2f}"
        " (copies of the shards, each fsynced)",
        f"  sequential read      : plaintext {mb / plain_read:9.1f} MB/s | encfs {mb / enc_read:9.1f} MB/s | ratio {plain_read / enc_read:.2f}",
        f"  train ({args.epochs} epochs, {args.workers} workers): plaintext {plain_train[0]:9.0f} samples/s | encfs {enc_train[0]:9.0f} samples/s | "
        f"ratio {enc_train[0] / plain_train[0]:.2f}",
        f"  accuracy after training: plaintext {plain_train[1]:.3f} | encfs {enc_train[1]:.3f} (same data, same seed)",
    ]
    print("\n".join(lines))
    if args.record:
        cmd = f"python benchmarks/main_job.py --size-mib {args.size_mib} --epochs {args.epochs} --workers {args.workers} --record"
        update_results(Path(__file__).with_name("RESULTS.md"), "main-job",
                       ["## Main job", "", f"`{cmd}` ({time.strftime('%Y-%m-%d')}), one run:", "", "```", *lines, "```"])
    if abs(plain_train[1] - enc_train[1]) > 1e-6 or plain_train[2] != enc_train[2]:
        raise SystemExit("encrypted and plaintext training diverged: this is a bug")


if __name__ == "__main__":
    main()
