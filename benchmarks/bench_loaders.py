"""Loaders: a user's own map-style Dataset over plaintext files against encfs's
``EncryptedRecordDataset`` (+ ``collate_locked``), on 0 and 2 worker processes and on threads;
shuffled, batch 64, 150,528-byte records (uint8 3x224x224). One run, ratios from that run;
best of ``--reps`` epochs per row, rows interleaved. Also: the batch-buffer pool on and off,
what worker processes leave in shared memory, and LitData with ``FernetEncryption`` when
``litdata`` is installed.

The other dataset kinds, each on ``EncryptedLoader(threads=2)``, 2 worker processes and 0
workers (the measurement behind each kind's ``loading`` default): ``EncryptedFileDataset``
(``--files`` files of one 150,528-byte image each, decoded to a tensor), ``EncryptedParquetDataset``
(``--parquet-mib`` of rows with an id, a label and a 1 KiB binary feature, in 4 files of 8
row groups each, snappy) and ``EncryptedTarDataset`` (the ``--files`` images again as
WebDataset samples in 8 tar shards, read by a plain DataLoader on 0 and 2 workers: it is
iterable, so no threads row).

    python benchmarks/bench_loaders.py [--size-mib 256] [--files 1000] [--parquet-mib 32] [--reps 3] [--record]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import fsspec
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from main_job import cpu_model, update_results  # noqa: E402

SHAPE = (3, 224, 224)
RECORD = int(np.prod(SHAPE))
BATCH = 64
SHARDS = 8


class PlainFiles:
    """What a user writes for plaintext: one record = seek + readinto in the file, per item
    (files opened lazily per process), collated by torch's default collate."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self.counts = [os.path.getsize(p) // RECORD for p in paths]
        self.starts = np.cumsum([0] + self.counts[:-1]).tolist()
        self._files: dict[int, Any] = {}
        self._pid = -1

    def __len__(self) -> int:
        return sum(self.counts)

    def __getitem__(self, i: int) -> Any:
        import bisect

        import torch

        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        k = bisect.bisect_right(self.starts, i) - 1
        f = self._files.get(k)
        if f is None:
            f = self._files[k] = open(self.paths[k], "rb", buffering=0)
        out = np.empty(SHAPE, np.uint8)
        os.preadv(f.fileno(), [memoryview(out).cast("B")], (i - self.starts[k]) * RECORD)
        return torch.from_numpy(out)

    def __getstate__(self) -> dict:
        return {"paths": self.paths, "counts": self.counts, "starts": self.starts, "_files": {}, "_pid": -1}


def touch_tensor(batch: Any) -> int:
    """Touch a batch tensor of records; its sample count."""
    int(batch[-1, 0, 0, 0])
    return len(batch)


def touch_key(key: str, *index: int) -> Callable[[Any], int]:
    """Touch ``batch[key]`` (a collated dict); the sample count."""

    def touch(batch: Any) -> int:
        int(batch[key][(-1, *index)])
        return len(batch[key])

    return touch


def epoch(loader: Any, touch: Callable[[Any], int] = touch_tensor) -> tuple[float, int]:
    """Seconds for one epoch and samples seen (each batch touched once)."""
    n = 0
    t = time.perf_counter()
    for batch in loader:
        n += touch(batch)
    return time.perf_counter() - t, n


def decode_image(view: memoryview) -> Any:
    """A file's (or tar member's) plaintext as a uint8 3x224x224 tensor (a copy: module level,
    so it pickles)."""
    import torch

    return torch.from_numpy(np.frombuffer(view, np.uint8).reshape(SHAPE).copy())


def decode_label(data: bytes) -> int:
    return int(data)


PARQUET_FILES, PARQUET_GROUPS, PARQUET_FEATURE = 4, 8, 1024
TAR_SHARDS = 8


def write_kinds(work: Path, opts: dict, files: int, parquet_mib: int) -> dict[str, Any]:
    """The file, Parquet and tar datasets' encrypted files under ``work``; their sizes."""
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, size=RECORD, dtype=np.uint8).tobytes() for _ in range(files)]
    (work / "files").mkdir()
    for i, data in enumerate(images):
        with fsspec.open(f"encfs::file://{work}/files/{i:05d}.img", "wb", **opts) as f:
            f.write(data)
    per_shard = -(-files // TAR_SHARDS)
    for k in range(TAR_SHARDS):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
            for i in range(k * per_shard, min(files, (k + 1) * per_shard)):
                for field, body in (("img", images[i]), ("cls", str(i % 10).encode())):
                    info = tarfile.TarInfo(f"{i:05d}.{field}")
                    info.size = len(body)
                    t.addfile(info, io.BytesIO(body))
        with fsspec.open(f"encfs::file://{work}/shard-{k:02d}.tar", "wb", **opts) as f:
            f.write(buf.getvalue())
    group = max(64, parquet_mib * (1 << 20) // (PARQUET_FEATURE + 16) // (PARQUET_FILES * PARQUET_GROUPS))
    pq_bytes = 0
    for k in range(PARQUET_FILES):
        n = group * PARQUET_GROUPS
        table = pa.table(
            {
                "id": np.arange(k * n, (k + 1) * n, dtype=np.int64),
                "label": rng.integers(0, 10, n),
                "x": [rng.bytes(PARQUET_FEATURE) for _ in range(n)],
            }
        )
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=group)
        pq_bytes += len(buf.getvalue())
        with fsspec.open(f"encfs::file://{work}/part-{k}.parquet", "wb", **opts) as f:
            f.write(buf.getvalue())
    return {"files": files, "rows": group * PARQUET_GROUPS * PARQUET_FILES, "group": group, "pq_bytes": pq_bytes, "per_shard": per_shard}


def shm_exposure(ds: Any) -> dict[str, Any]:
    """Iterate 2 worker processes (torch's default sharing strategy) and watch the main
    process: shared-memory segments it maps (fds into /dev/shm), their bytes, files in
    /dev/shm, and whether each batch lives in shared memory."""
    import torch

    from encfs.loaders.loader import EncryptedLoader, wipe_batch

    def segments() -> tuple[int, int]:
        n = size = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith("/dev/shm/") or target.startswith("/memfd:"):
                n += 1
                try:
                    size += os.fstat(int(fd)).st_size
                except OSError:
                    pass
        return n, size

    shm_files = lambda: len([f for f in os.listdir("/dev/shm") if f.startswith("torch")])  # noqa: E731
    before_files = shm_files()
    loader = EncryptedLoader(ds, BATCH, seed=1, num_workers=2, wipe_previous=True)
    most = (0, 0)
    most_files = 0
    shared = wiped = 0
    batches = 0
    for batch in loader:
        batches += 1
        shared += bool(batch.is_shared())
        seg = segments()
        most = max(most, seg)
        most_files = max(most_files, shm_files() - before_files)
        if batches == 3:
            wipe_batch(batch)
            wiped = int(not batch.any())
    del batch, loader
    import gc

    gc.collect()
    return {
        "strategy": torch.multiprocessing.get_sharing_strategy(),
        "batches": batches,
        "shared": shared,
        "max_segments": most[0],
        "max_bytes": most[1],
        "max_shm_files": most_files,
        "after": segments()[0],
        "wiped_in_place": wiped,
    }


def litdata_rows(plain_paths: list[str], work: Path, reps: int) -> tuple[list[tuple[str, float, int]], str]:
    """LitData plain and with ``FernetEncryption(level="chunk")``, 2 workers, shuffled; or a note."""
    try:
        import litdata
        from litdata.utilities.encryption import FernetEncryption
    except ImportError as e:
        return [], f"LitData rows left out: litdata is not installed ({e})."
    import logging

    logging.getLogger("litdata").setLevel(logging.ERROR)
    records = np.concatenate([np.fromfile(p, np.uint8) for p in plain_paths]).reshape(-1, *SHAPE)
    out: list[tuple[str, float, int]] = []
    fernet = FernetEncryption(password="bench-password", level="chunk")
    for name, enc in (("LitData plain", None), ("LitData + FernetEncryption (chunk)", fernet)):
        target = work / ("lit-" + ("enc" if enc else "plain"))
        litdata.optimize(fn=_lit_item(records), inputs=list(range(len(records))), output_dir=str(target),
                         chunk_bytes="64MB", encryption=enc, num_workers=1, verbose=False, mode="overwrite")
        best = float("inf")
        n = 0
        for _ in range(reps):
            shutil.rmtree(work / "lit-cache", ignore_errors=True)
            ds = litdata.StreamingDataset(str(target), shuffle=True, seed=1, encryption=enc, cache_dir=str(work / "lit-cache"))
            dl = litdata.StreamingDataLoader(ds, batch_size=BATCH, num_workers=2)
            t, n = epoch(dl)
            best = min(best, t)
        out.append((name, best, n))
    del records
    return out, ""


class _lit_item:
    def __init__(self, records: np.ndarray):
        self.records = records

    def __call__(self, i: int) -> np.ndarray:
        return self.records[i]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--files", type=int, default=1000, help="files (and tar samples) of the file and tar rows")
    ap.add_argument("--parquet-mib", type=int, default=32, help="plaintext rows of the Parquet rows")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-litdata", action="store_true")
    ap.add_argument("--record", action="store_true", help="write the block to benchmarks/RESULTS.md")
    args = ap.parse_args()

    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from encfs.backend import get_backend
    from encfs.keys import SymmetricKey, key_file_text
    from encfs.loaders import EncryptedFileDataset, EncryptedParquetDataset, EncryptedRecordDataset, EncryptedTarDataset, collate_locked
    from encfs.loaders import pool as pool_mod
    from encfs.loaders.loader import EncryptedLoader

    torch.set_num_threads(1)  # torch's own threads would distort 2 busy cores
    work = Path(tempfile.mkdtemp(prefix="bench-loaders-"))
    try:
        key = work / "k"
        key.write_text(key_file_text(SymmetricKey.generate()))
        opts = {"encfs": {"key": f"keyfile:{key}"}}
        per = max(1, args.size_mib * (1 << 20) // RECORD // SHARDS)
        rng = np.random.default_rng(0)
        plain_paths, enc_urls = [], []
        for k in range(SHARDS):
            data = rng.integers(0, 256, size=per * RECORD, dtype=np.uint8).tobytes()
            p = work / f"plain-{k}.bin"
            p.write_bytes(data)
            plain_paths.append(str(p))
            url = f"encfs::file://{work}/enc-{k}.bin"
            with fsspec.open(url, "wb", **opts) as f:
                f.write(data)
            enc_urls.append(url)
        total = per * SHARDS
        plain = PlainFiles(plain_paths)
        enc = EncryptedRecordDataset(enc_urls, SHAPE, np.uint8, opts)
        enc_auto = EncryptedRecordDataset(enc_urls, SHAPE, np.uint8, opts, backend="auto")

        def user_loader(workers: int) -> Callable[[], Any]:
            gen = torch.Generator().manual_seed(1)
            return lambda: DataLoader(plain, BATCH, sampler=RandomSampler(plain, generator=gen), num_workers=workers)

        def enc_loader(ds: Any = enc, **kw: Any) -> Callable[[], Any]:
            return lambda: EncryptedLoader(ds, BATCH, seed=1, collate_fn=collate_locked, **kw)

        def no_pool(make: Callable[[], Any]) -> Callable[[], Any]:
            def run() -> Any:
                return make()

            run.no_pool = True  # type: ignore[attr-defined]
            return run

        rows: list[tuple[str, Callable[[], Any]]] = [
            ("plaintext, user Dataset, 0 workers", user_loader(0)),
            ("plaintext, user Dataset, 2 workers", user_loader(2)),
            ("plaintext, user Dataset, EncryptedLoader threads=2", lambda: EncryptedLoader(plain, BATCH, seed=1, threads=2)),
            ("encfs, 0 workers", enc_loader(num_workers=0)),
            ("encfs, 0 workers, pool off", no_pool(enc_loader(num_workers=0))),
            ("encfs, 2 workers", enc_loader(num_workers=2)),
            ("encfs, threads=2 (the default)", enc_loader()),
            ("encfs, threads=2, pool off", no_pool(enc_loader(threads=2))),
            ("encfs auto backend, 0 workers", enc_loader(enc_auto, num_workers=0)),
            ("encfs auto backend, 2 workers", enc_loader(enc_auto, num_workers=2)),
            ("encfs auto backend, threads=2", enc_loader(enc_auto, threads=2)),
        ]
        sizes = write_kinds(work, opts, args.files, args.parquet_mib)
        files_ds = EncryptedFileDataset(f"encfs::file://{work}/files/*.img", decode_image, opts)
        parquet_ds = EncryptedParquetDataset(f"encfs::file://{work}/part-*.parquet", storage_options=opts)
        tar_ds = EncryptedTarDataset(f"encfs::file://{work}/shard-*.tar", opts, decode={"img": decode_image, "cls": decode_label}, seed=1)
        touch = {}

        def kind(name: str, ds: Any, how: str, workers: int = 0, on: Callable[[Any], int] = touch_tensor) -> tuple[str, Callable[[Any], Any]]:
            if how == "threads":
                make = lambda: EncryptedLoader(ds, BATCH, seed=1, threads=2)  # noqa: E731
            elif how == "workers":
                make = lambda: EncryptedLoader(ds, BATCH, seed=1, num_workers=workers)  # noqa: E731
            else:  # an iterable dataset: a plain DataLoader
                make = lambda: DataLoader(ds, BATCH, num_workers=workers)  # noqa: E731
            label = f"{name}, " + ("threads=2" if how == "threads" else f"{workers} workers")
            touch[label] = on
            return label, make

        on_pq = touch_key("id")
        on_tar = touch_key("img", 0, 0, 0)
        kinds: list[tuple[str, Callable[[], Any]]] = [
            kind("files", files_ds, "threads"),
            kind("files", files_ds, "workers", 2),
            kind("files", files_ds, "workers", 0),
            kind("parquet", parquet_ds, "threads", on=on_pq),
            kind("parquet", parquet_ds, "workers", 2, on=on_pq),
            kind("parquet", parquet_ds, "workers", 0, on=on_pq),
            kind("tar", tar_ds, "dataloader", 2, on=on_tar),
            kind("tar", tar_ds, "dataloader", 0, on=on_tar),
        ]
        best = {name: float("inf") for name, _ in rows + kinds}
        seen = {}
        for _ in range(args.reps):
            for name, make in rows + kinds:
                saved = None
                if getattr(make, "no_pool", False):
                    saved = pool_mod._POOL
                    pool_mod._POOL = pool_mod.ForkLocal(lambda: pool_mod.BufferPool(max_idle_bytes=0))
                try:
                    t, n = epoch(make(), touch.get(name, touch_tensor))
                finally:
                    if saved is not None:
                        pool_mod._POOL = saved
                best[name] = min(best[name], t)
                seen[name] = n
        stats = pool_mod.pool().stats()
        lit, lit_note = ([], "LitData rows left out (--no-litdata).") if args.no_litdata else litdata_rows(plain_paths, work, max(1, args.reps - 1))
        exposure = shm_exposure(enc)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mb = total * RECORD / 1e6
    base = best["plaintext, user Dataset, 2 workers"]
    table = ["| row | epoch s | samples/s | vs plaintext 2 workers |", "|---|---:|---:|---:|"]
    for name, _ in rows:
        t = best[name]
        table.append(f"| {name} | {t:.3f} | {seen[name] / t:,.0f} | {base / t:.2f} |")
    for name, t, n in lit:
        table.append(f"| {name}, 2 workers | {t:.3f} | {n / t:,.0f} | {base / t:.2f} |")
    r = lambda a, b: best[a] / best[b]  # noqa: E731  (epoch-time ratio b/a in speed)
    T = "encfs, threads=2 (the default)"
    ratios = [
        f"- encfs threads=2 / encfs 2 workers: {r('encfs, 2 workers', T):.2f} (auto backend: {r('encfs auto backend, 2 workers', 'encfs auto backend, threads=2'):.2f})",
        f"- encfs threads=2 / encfs 0 workers: {r('encfs, 0 workers', T):.2f} (auto backend: {r('encfs auto backend, 0 workers', 'encfs auto backend, threads=2'):.2f})",
        f"- encfs threads=2 / plaintext 2 workers (samples/s): {r('plaintext, user Dataset, 2 workers', T):.2f}; "
        f"encfs 2 workers / plaintext 2 workers: {r('plaintext, user Dataset, 2 workers', 'encfs, 2 workers'):.2f}",
        f"- encfs threads=2 / plaintext threads=2: {r('plaintext, user Dataset, EncryptedLoader threads=2', T):.2f}; "
        f"encfs 0 workers / plaintext 0 workers: {r('plaintext, user Dataset, 0 workers', 'encfs, 0 workers'):.2f}",
        f"- pool on / off, 0 workers: {r('encfs, 0 workers, pool off', 'encfs, 0 workers'):.2f}; threads=2: {r('encfs, threads=2, pool off', T):.2f}",
    ]
    kind_table = ["| dataset, loading | epoch s | samples/s | vs its 2 workers |", "|---|---:|---:|---:|"]
    for name, _ in kinds:
        t = best[name]
        two = best[name.split(",")[0] + ", 2 workers"]
        kind_table.append(f"| {name} | {t:.3f} | {seen[name] / t:,.0f} | {two / t:.2f} |")
    k = lambda a, b: best[f"{a}, {b}"]  # noqa: E731
    kind_ratios = [
        f"- files threads=2 / 2 workers: {k('files', '2 workers') / k('files', 'threads=2'):.2f}; / 0 workers: {k('files', '0 workers') / k('files', 'threads=2'):.2f}",
        f"- parquet threads=2 / 2 workers: {k('parquet', '2 workers') / k('parquet', 'threads=2'):.2f}; / 0 workers: {k('parquet', '0 workers') / k('parquet', 'threads=2'):.2f}",
        f"- tar 2 workers / 0 workers: {k('tar', '0 workers') / k('tar', '2 workers'):.2f}",
    ]
    if len(lit) == 2:
        lit_t = {name: t for name, t, _ in lit}
        enc_lit = lit_t["LitData + FernetEncryption (chunk)"]
        ratios.append(f"- LitData+Fernet / LitData plain: {lit_t['LitData plain'] / enc_lit:.2f}")
        ratios.append(f"- encfs threads=2 / LitData+Fernet: {enc_lit / best[T]:.2f}; encfs 2 workers / LitData+Fernet: {enc_lit / best['encfs, 2 workers']:.2f}")
    e = exposure
    kind_lines = [
        "",
        f"Other dataset kinds, in the same run and rows interleaved with the above (batch {BATCH}; map-style ones "
        f"through `EncryptedLoader(seed=1)`, shuffled, default collate): files: {sizes['files']} files of {RECORD} bytes, "
        f"`EncryptedFileDataset(decode=...)` to a uint8 3x224x224 tensor; parquet: {sizes['rows']} rows (int64 id, "
        f"int64 label, {PARQUET_FEATURE}-byte binary) in {PARQUET_FILES} snappy files of {PARQUET_GROUPS} row groups of "
        f"{sizes['group']} rows ({sizes['pq_bytes'] / 1e6:.0f} MB), `EncryptedParquetDataset` default items (`to_pylist`), "
        f"shuffled within windows of a row group; tar: the same {sizes['files']} images plus a label as WebDataset "
        f"samples in {TAR_SHARDS} shards of {sizes['per_shard']}, `EncryptedTarDataset(decode=...)` (shard order "
        f"shuffled) under a plain `DataLoader` (an iterable dataset: no threads row).",
        "",
        *kind_table,
        "",
        *kind_ratios,
    ]
    lines = [
        "## Loaders",
        "",
        f"`python benchmarks/bench_loaders.py --size-mib {args.size_mib} --reps {args.reps}{' --record' if args.record else ''}` "
        f"({time.strftime('%Y-%m-%d')}). One run; best of {args.reps} epochs per row (rows interleaved; LitData best of "
        f"{max(1, args.reps - 1)}). Machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__} "
        f"(`torch.set_num_threads(1)`); the process's cipher backend '{get_backend().name}', the record dataset's "
        f"'native' unless the row says auto. {mb:.0f} MB: {total} records of "
        f"{RECORD} bytes (uint8 3x224x224) in {SHARDS} shards; shuffled, batch {BATCH}, each batch touched once.",
        "",
        *table,
        "",
        "Ratios from this run (speed, higher is better for the first named):",
        "",
        *ratios,
        *kind_lines,
        "",
        f"Batch-buffer pool in the benchmark process after the pooled rows: {stats['maps']} buffers mapped, "
        f"{stats['reuses']} reuses, {stats['unlocked']} used unlocked (RLIMIT_MEMLOCK {stats['lock_limit']} bytes; "
        f"a {BATCH}-record batch is {BATCH * RECORD} bytes).",
        "",
        f"Shared memory with 2 worker processes (sharing strategy `{e['strategy']}`): {e['shared']} of {e['batches']} "
        f"batches arrived in shared memory; at most {e['max_segments']} segments ({e['max_bytes'] / 1e6:.1f} MB) mapped "
        f"in the main process at once, {e['max_shm_files']} named files in /dev/shm, {e['after']} left once the "
        f"loop dropped its last batch; `wipe_batch` zeroed a received batch in place: {'yes' if e['wiped_in_place'] else 'no'}.",
    ]
    if lit_note:
        lines += ["", lit_note]
    else:
        lines += ["", "LitData: `optimize(..., chunk_bytes='64MB')` into local chunk files, read with `StreamingDataset(shuffle=True)` "
                  "and `StreamingDataLoader(num_workers=2)`, its cache emptied before each epoch. Its own per-item cost "
                  "(about 1.3 ms per 150 KB sample here, with or without encryption) dominates both LitData rows, so the "
                  "Fernet/plain ratio is noisy from run to run."]
    print("\n".join(lines))
    if args.record:
        update_results(Path(__file__).with_name("RESULTS.md"), "loaders", lines)


if __name__ == "__main__":
    main()
