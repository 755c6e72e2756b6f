"""Object-store reads and writes, encfs against s3fs, on one S3 endpoint in one run.

A moto server runs in its own process (patched to serve a range without copying the whole
object, see MOTO) and a latency-injecting proxy (tests/latency_proxy.py:
first-byte latency, per-connection bandwidth cap) in another, so that the client sees what it
would see on S3 rather than moto's Python per request. Every measured client runs in a fresh
subprocess (its own GIL, its own peak RSS). Reported, as MB/s and ratios:

* sequential read of one object (4 MiB ``readinto``): s3fs's defaults on the plaintext object,
  s3fs ``cat_file`` of the whole object (its concurrent path), and ``encfs::s3`` on the
  encrypted one, with encfs's defaults;
* write of the same bytes: s3fs ``pipe_file`` against encfs ``pipe_file``;
* per-sample random reads (150 KB at random offsets) on an open file;
* a Parquet prefix (several files) read with pyarrow: plaintext through s3fs against encfs.

    python benchmarks/bench_remote.py [--size-mib 512] [--latency-ms 20] [--bandwidth-mbs 100] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from main_job import cpu_model, update_results  # noqa: E402

MB = 1e6
BUCKET = "bench-remote"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port}")


MOTO = """
import sys
from moto.s3 import models

# moto reads and copies a whole object for every request (FakeKey.value), so a ranged GET of a
# 512 MiB object costs ~0.4 s of its CPU whatever the range: a cost no real store has, which
# would penalise exactly the many-ranges strategy under test. Here the value is kept as one
# immutable bytes object per write, and a range is a slice of it.
_get, _set = models.FakeKey.value.fget, models.FakeKey.value.fset


def _value(self):
    cached = self.__dict__.get("_bench_value")
    if cached is None:
        cached = self.__dict__["_bench_value"] = _get(self)
    return cached


def _store(self, new):
    self.__dict__.pop("_bench_value", None)
    _set(self, new)


models.FakeKey.value = property(_value, _store)
from moto.server import main
main(["-p", sys.argv[1]])
"""

PROXY = """
import sys, time
sys.path.insert(0, {root!r})
from tests.latency_proxy import LatencyProxy
p = LatencyProxy({upstream!r}, latency={latency}, bandwidth={bandwidth}, port={port})
p.start()
while True:
    time.sleep(3600)
"""

CLIENT = """
import json, os, random, sys, time
import s3fs
from encfs.filesystem import EncFileSystem
opts = json.loads(sys.argv[2])
fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts["s3"])
enc = EncFileSystem(fs=fs, key=opts["key"], skip_instance_cache=True)
what, B = sys.argv[1], opts["bucket"]
if what.endswith("-parquet"):
    import pyarrow.dataset as ds
    from pyarrow.fs import FSSpecHandler, PyFileSystem
t = time.perf_counter()
n = 0
if what in ("s3fs-seq", "encfs-seq"):
    f = (fs if what == "s3fs-seq" else enc).open(f"{{B}}/{{'plain' if what == 's3fs-seq' else 'enc'}}", "rb")
    buf = bytearray(4 << 20)
    while (k := f.readinto(buf)):
        n += k
    f.close()
elif what == "s3fs-cat":
    n = len(fs.cat_file(f"{{B}}/plain"))
elif what in ("s3fs-write", "encfs-write"):
    data = os.urandom(opts["size"])
    t = time.perf_counter()
    (fs if what == "s3fs-write" else enc).pipe_file(f"{{B}}/w-{{what}}", data)
    n = len(data)
elif what in ("s3fs-random", "encfs-random"):
    f = (fs if what == "s3fs-random" else enc).open(f"{{B}}/{{'plain' if what == 's3fs-random' else 'enc'}}", "rb", **({{"cache_type": "none"}} if what == "s3fs-random" else {{}}))
    rng = random.Random(0)
    size = f.size
    t = time.perf_counter()
    for _ in range(opts["samples"]):
        f.seek(rng.randrange(size - 150_000))
        n += len(f.read(150_000))
    f.close()
elif what in ("s3fs-parquet", "encfs-parquet"):
    src = fs if what == "s3fs-parquet" else enc
    table = ds.dataset(f"{{B}}/{{'pq-plain' if what == 's3fs-parquet' else 'pq-enc'}}", filesystem=PyFileSystem(FSSpecHandler(src)), format="parquet").to_table(use_threads=False)
    n = table.nbytes
dt = time.perf_counter() - t
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))  # this image's peak; ru_maxrss survives exec
print(json.dumps({{"bytes": n, "seconds": dt, "maxrss_mib": hwm / 1024}}))
sys.stdout.flush()
os._exit(0)
"""


def run_client(what: str, opts: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CLIENT.format(), what, json.dumps(opts)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--latency-ms", type=float, default=20)
    ap.add_argument("--bandwidth-mbs", type=float, default=100, help="per connection; 0 = no cap")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--parquet-files", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--record", action="store_true", help="write the table to benchmarks/RESULTS.md")
    args = ap.parse_args()

    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
    moto_port, proxy_port = free_port(), free_port()
    procs = [subprocess.Popen([sys.executable, "-c", MOTO, str(moto_port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        wait_port(moto_port)
        bandwidth = args.bandwidth_mbs * MB if args.bandwidth_mbs else None
        code = PROXY.format(root=str(ROOT), upstream=f"http://127.0.0.1:{moto_port}", latency=args.latency_ms / 1000, bandwidth=bandwidth, port=proxy_port)
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(proxy_port)
        rows = measure(args, proxy_port, moto_port)
    finally:
        for p in procs:
            p.kill()
    print("\n".join(rows))
    if args.record:
        update_results(Path(__file__).with_name("RESULTS.md"), "remote", rows)


def measure(args: argparse.Namespace, proxy_port: int, moto_port: int) -> list[str]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import s3fs

    from encfs.filesystem import EncFileSystem
    from encfs.keys import SymmetricKey, key_file_text

    tmp = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    (tmp / "k.key").write_text(key_file_text(SymmetricKey.generate()))
    key = f"keyfile:{tmp / 'k.key'}"
    direct = {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{moto_port}", "region_name": "us-east-1"}}
    proxied = {**direct, "client_kwargs": {**direct["client_kwargs"], "endpoint_url": f"http://127.0.0.1:{proxy_port}"}}
    size = args.size_mib << 20
    setup = s3fs.S3FileSystem(skip_instance_cache=True, **direct)
    setup.call_s3("create_bucket", Bucket=BUCKET)
    data = os.urandom(size)
    setup.pipe_file(f"{BUCKET}/plain", data)
    EncFileSystem(fs=setup, key=key, skip_instance_cache=True).pipe_file(f"{BUCKET}/enc", data)
    del data
    rng = np.random.default_rng(0)
    for i in range(args.parquet_files):
        t = pa.table({"x": rng.normal(size=500_000), "y": rng.integers(0, 1 << 40, size=500_000), "s": [f"row{j}" for j in range(500_000)]})
        with setup.open(f"{BUCKET}/pq-plain/part-{i}.parquet", "wb") as f:
            pq.write_table(t, f)
        with EncFileSystem(fs=setup, key=key, skip_instance_cache=True).open(f"{BUCKET}/pq-enc/part-{i}.parquet", "wb") as f:
            pq.write_table(t, f)
    opts = {"s3": proxied, "key": key, "bucket": BUCKET, "size": size, "samples": args.samples}

    def best(what: str) -> dict:
        runs = [run_client(what, opts) for _ in range(args.repeats)]
        return min(runs, key=lambda r: r["seconds"])

    r = {w: best(w) for w in (
        "s3fs-seq", "s3fs-cat", "encfs-seq", "s3fs-write", "encfs-write", "s3fs-random", "encfs-random", "s3fs-parquet", "encfs-parquet"
    )}

    def mbs(w: str) -> float:
        return r[w]["bytes"] / r[w]["seconds"] / MB

    bw = f"{args.bandwidth_mbs:g} MB/s per connection" if args.bandwidth_mbs else "no bandwidth cap"
    rows = [
        "## Object stores: encfs::s3 against s3fs (remote-reads issue)",
        "",
        f"Object store, {cpu_model()}, {os.cpu_count()} cores; moto server behind a proxy with "
        f"{args.latency_ms:g} ms first-byte latency and {bw}; {args.size_mib} MiB object; best of {args.repeats}, "
        "each client a fresh process (`python benchmarks/bench_remote.py --record`).",
        "",
        "| path | s3fs | encfs::s3 | ratio | encfs peak RSS |",
        "|---|---:|---:|---:|---:|",
        f"| sequential read, 4 MiB readinto (s3fs defaults) | {mbs('s3fs-seq'):.0f} MB/s | {mbs('encfs-seq'):.0f} MB/s | "
        f"{mbs('encfs-seq') / mbs('s3fs-seq'):.2f} | {r['encfs-seq']['maxrss_mib']:.0f} MiB (s3fs {r['s3fs-seq']['maxrss_mib']:.0f}) |",
        f"| sequential read vs s3fs `cat_file` (concurrent) | {mbs('s3fs-cat'):.0f} MB/s | {mbs('encfs-seq'):.0f} MB/s | "
        f"{mbs('encfs-seq') / mbs('s3fs-cat'):.2f} | (s3fs {r['s3fs-cat']['maxrss_mib']:.0f} MiB) |",
        f"| write (`pipe_file`) | {mbs('s3fs-write'):.0f} MB/s | {mbs('encfs-write'):.0f} MB/s | {mbs('encfs-write') / mbs('s3fs-write'):.2f} | |",
        f"| {args.samples} random 150 KB reads | {r['s3fs-random']['seconds'] / args.samples * 1000:.1f} ms each | "
        f"{r['encfs-random']['seconds'] / args.samples * 1000:.1f} ms each | {r['s3fs-random']['seconds'] / r['encfs-random']['seconds']:.2f} | |",
        f"| Parquet prefix, {args.parquet_files} files, pyarrow dataset | {r['s3fs-parquet']['seconds']:.2f} s | {r['encfs-parquet']['seconds']:.2f} s | "
        f"{r['s3fs-parquet']['seconds'] / r['encfs-parquet']['seconds']:.2f} | |",
        "",
        "Ratios are encfs over s3fs (higher is better for encfs; for times, s3fs time over encfs time).",
        "moto runs patched so that a ranged GET costs what its range costs (unpatched, moto copies the whole",
        "object per request: 105 ms for 1 KiB of a 128 MiB object, which would penalise exactly the many-ranges",
        "strategy measured here). moto, the proxy and the client share this machine's cores, so absolute MB/s are",
        "this machine's; the ratios are the result. encfs reads with its defaults: 4 MiB windows fetched ahead,",
        "up to 64 MiB in flight, 8 MiB parts; s3fs with its own (50 MiB blocks, `readahead` cache; `cat_file`",
        "splits large objects into concurrent ranged GETs).",
    ]
    return rows


if __name__ == "__main__":
    main()
