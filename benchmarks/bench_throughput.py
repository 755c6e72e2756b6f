"""Decrypt throughput, from one run on the same data, as GB/s and ratios:

* plaintext read of the same file (page cache warm), and the AES-256-GCM limit: one GCM
  message through OpenSSL EVP on one thread (the native library's single-shot call);
* encfs native backend on 1 and N threads, and the pyca/cryptography backend (in memory);
* ``encfs::file://`` sequential read of the file (end to end);
* peers: a hand-written pyca/cryptography AESGCM loop over 16 KiB chunks, Tink streaming AEAD
  (AES256_GCM_HKDF_1MB), pyarrow Parquet modular encryption vs the same table through encfs;
* peak RSS while streaming a large encrypted file (subprocess, ru_maxrss).

    python benchmarks/bench_throughput.py [--size-mib 1024] [--mem-mib 256] [--rss-gib 4]

Writes the table to benchmarks/RESULTS.md with the CPU model and core count.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import fsspec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from main_job import best_of, cpu_model, update_results  # noqa: E402

from encfs import cobblestone as cs  # noqa: E402
from encfs.backend import PythonBackend, native_backend  # noqa: E402
from encfs.keys import SymmetricKey, key_file_text  # noqa: E402

BLOCK = 4 << 20
GB = 1e9


def read_file(path: str, opts: dict | None = None) -> int:
    buf = bytearray(BLOCK)
    total = 0
    with fsspec.open(path, "rb", **(opts or {})) as f:
        while n := f.readinto(buf):
            total += n
    return total


def decrypt_mapped(path: str, key_ref: str) -> None:
    """Open every chunk of ``path`` straight out of its page-cache mapping, 4 MiB at a time."""
    import mmap

    from encfs.filesystem import EncFileSystem

    with EncFileSystem(key=key_ref).open(path, "rb") as f, open(path, "rb") as raw:
        r = f._r
        mapped = mmap.mmap(raw.fileno(), 0, prot=mmap.PROT_READ)
        view, out = memoryview(mapped), bytearray(256 * cs.CHUNK_SIZE)
        for first in range(0, r.chunks, 256):
            ct_len, pt_len = r.span(first, min(256, r.chunks - first))
            off = r.header_length + cs.chunk_offset(first)
            r._cipher.decrypt_into(first, view[off : off + ct_len], memoryview(out)[:pt_len])
        view.release()
        mapped.close()


class Rows:
    def __init__(self) -> None:
        self.rows: list[tuple[str, float | None, str]] = []

    def add(self, name: str, gbps: float | None, note: str = "") -> None:
        self.rows.append((name, gbps, note))
        shown = f"{gbps:8.2f} GB/s" if gbps is not None else "   skipped"
        print(f"  {name:<48} {shown}  {note}", flush=True)


def in_memory(rows: Rows, mem_bytes: int, reps: int) -> dict[str, float]:
    key, salt = os.urandom(32), os.urandom(24)
    plain = os.urandom(mem_bytes - mem_bytes % cs.CHUNK_SIZE + 1000)
    payload = cs.encrypt(key, plain, salt, b"bench")
    keys = cs.derive(key, salt, b"bench")
    body = memoryview(payload)[cs.PAYLOAD_PREFIX_SIZE :]
    out = bytearray(len(plain))
    res: dict[str, float] = {}
    native = native_backend()
    if native is not None:
        from encfs import _native_backend as nb
        from encfs._native import ffi, lib

        from cryptography.hazmat.primitives.ciphers.aead import AESGCM as _AESGCM

        ct_tag = _AESGCM(key).encrypt(bytes(12), plain, None)
        dst = bytearray(len(plain))
        u8 = "uint8_t[]"
        args = (ffi.from_buffer(u8, key), 32, ffi.from_buffer(u8, bytes(12)), 12, ffi.NULL, 0,
                ffi.from_buffer(u8, ct_tag), len(ct_tag), ffi.from_buffer(u8, dst), len(dst))

        def limit() -> None:
            assert lib.encfs_gcm_open(*args) == len(plain)

        res["limit"] = len(plain) / best_of(limit, reps) / GB
        rows.add("AES-256-GCM limit (EVP, 1 thread, one message)", res["limit"])
        for threads in sorted({1, os.cpu_count() or 1}):
            c = nb.NativeBackend(threads=threads).chunk_cipher(keys.key.view(), keys.base_nonce)
            res[f"native{threads}"] = len(plain) / best_of(lambda: c.decrypt_into(0, body, memoryview(out)), reps) / GB
            c.close()
            rows.add(f"encfs native backend, {threads} thread(s)", res[f"native{threads}"],
                     f"{res[f'native{threads}'] / res['limit']:.2f} x limit")
        speed = openssl_speed_row(rows)
        if speed:
            res["openssl_speed"] = speed
    else:
        rows.add("encfs native backend", None, "extension not built")
    c = PythonBackend().chunk_cipher(keys.key.view(), keys.base_nonce)
    res["python"] = len(plain) / best_of(lambda: c.decrypt_into(0, body, memoryview(out)), reps) / GB
    rows.add("encfs python backend (pyca/cryptography)", res["python"])
    assert bytes(out) == plain

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(bytes(keys.key.view()))
    base = int.from_bytes(keys.base_nonce, "big")

    def handwritten() -> None:
        pieces = []
        for i, off in enumerate(range(0, len(body), cs.CT_CHUNK_SIZE)):
            pieces.append(aead.decrypt((base ^ i).to_bytes(12, "big"), body[off : off + cs.CT_CHUNK_SIZE], None))
        b"".join(pieces)

    res["handwritten"] = len(plain) / best_of(handwritten, reps) / GB
    rows.add("hand-written cryptography AESGCM loop (16 KiB)", res["handwritten"])
    keys.wipe()
    return res


def openssl_speed_row(rows: Rows) -> float | None:
    """Cross-check of the limit: the ``openssl speed`` CLI itself, decrypting 16 KiB messages."""
    exe = shutil.which("openssl")
    if exe is None:
        rows.add("openssl speed -decrypt -evp aes-256-gcm -bytes 16384", None, "openssl CLI not found")
        return None
    cmd = [exe, "speed", "-decrypt", "-evp", "aes-256-gcm", "-bytes", "16384", "-seconds", "3"]
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    match = re.search(r"^AES-256-GCM\s+([\d.]+)k", out, re.M)
    if match is None:
        rows.add(" ".join(cmd[1:6]), None, "could not parse its output")
        return None
    gbps = float(match.group(1)) * 1000 / GB
    rows.add("openssl speed -decrypt -evp aes-256-gcm -bytes 16384 (CLI, 1 core)", gbps, "cross-check of the limit")
    return gbps


def tink_row(rows: Rows, work: Path, plain_path: Path, size: int, reps: int) -> None:
    try:
        import tink
        from tink import streaming_aead
    except ImportError:
        rows.add("Tink streaming AEAD AES256_GCM_HKDF_1MB", None, "pip install tink (bench extra)")
        return
    streaming_aead.register()
    handle = tink.new_keyset_handle(streaming_aead.streaming_aead_key_templates.AES256_GCM_HKDF_1MB)
    prim = handle.primitive(streaming_aead.StreamingAead)
    path = work / "tink.bin"
    with open(plain_path, "rb") as src, open(path, "wb") as raw, prim.new_encrypting_stream(raw, b"") as enc:
        while block := src.read(BLOCK):
            enc.write(block)

    def read() -> None:
        n = 0
        with open(path, "rb") as raw, prim.new_decrypting_stream(raw, b"") as dec:
            while block := dec.read(BLOCK):
                n += len(block)
        assert n == size

    rows.add("Tink streaming AEAD AES256_GCM_HKDF_1MB (file)", size / best_of(read, reps) / GB)


def parquet_rows(rows: Rows, work: Path, opts: dict, reps: int) -> None:
    try:
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq
        import pyarrow.parquet.encryption as pe
    except ImportError:
        rows.add("pyarrow Parquet modular encryption", None, "pyarrow missing")
        return
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    master = {"footer": os.urandom(32), "col": os.urandom(32)}

    class LocalKms(pe.KmsClient):
        """Benchmark-only KMS: wraps DEKs with in-process master keys."""

        def __init__(self, config):
            super().__init__()

        def wrap_key(self, key_bytes, master_key_identifier):
            nonce = os.urandom(12)
            return base64.b64encode(nonce + AESGCM(master[master_key_identifier]).encrypt(nonce, key_bytes, None)).decode()

        def unwrap_key(self, wrapped_key, master_key_identifier):
            raw = base64.b64decode(wrapped_key)
            return AESGCM(master[master_key_identifier]).decrypt(raw[:12], raw[12:], None)

    n = 4_000_000
    rng = np.random.default_rng(0)
    table = pa.table({f"f{i}": rng.normal(size=n) for i in range(8)})
    nbytes = table.nbytes
    plain_pq, mod_pq, enc_pq = work / "plain.parquet", work / "modular.parquet", work / "encfs.parquet"
    pq.write_table(table, plain_pq, compression="none")
    factory = pe.CryptoFactory(lambda cfg: LocalKms(cfg))
    kms = pe.KmsConnectionConfig()
    cfg = pe.EncryptionConfiguration(footer_key="footer", column_keys={"col": table.column_names}, encryption_algorithm="AES_GCM_V1")
    with pq.ParquetWriter(mod_pq, table.schema, compression="none", encryption_properties=factory.file_encryption_properties(kms, cfg)) as w:
        w.write_table(table)
    with fsspec.open(f"encfs::file://{enc_pq}", "wb", **opts) as f:
        f.write(plain_pq.read_bytes())
    dec = factory.file_decryption_properties(kms)
    t_plain = best_of(lambda: pq.read_table(plain_pq), reps)
    t_mod = best_of(lambda: pq.ParquetFile(mod_pq, decryption_properties=dec).read(), reps)
    fs, path = fsspec.core.url_to_fs(f"encfs::file://{enc_pq}", **opts)
    t_enc = best_of(lambda: pq.read_table(path, filesystem=fs), reps)
    rows.add("parquet read_table, plaintext", nbytes / t_plain / GB, f"{nbytes / 1e6:.0f} MB table, uncompressed")
    rows.add("parquet read_table, modular encryption (AES_GCM_V1)", nbytes / t_mod / GB, f"{t_plain / t_mod:.2f} x plaintext")
    rows.add("parquet read_table, through encfs", nbytes / t_enc / GB, f"{t_plain / t_enc:.2f} x plaintext")


RSS_CHILD = textwrap.dedent(
    """
    import re, sys, fsspec
    url, key = sys.argv[1], sys.argv[2]
    buf = bytearray(4 << 20)
    total = 0
    if url:
        with fsspec.open(url, "rb", encfs={"key": key}) as f:
            while n := f.readinto(buf):
                total += n
    else:
        import encfs.filesystem
    # VmHWM is this process's own peak (ru_maxrss would include the parent's, inherited at fork)
    print(total, re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))
    """
)


def rss_row(rows: Rows, work: Path, opts: dict, key_ref: str, gib: int) -> None:
    url = f"encfs::file://{work / 'rss.bin'}"
    block = os.urandom(BLOCK)
    with fsspec.open(url, "wb", **opts) as f:
        for _ in range(gib * (1 << 30) // BLOCK):
            f.write(block)
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, url, key_ref], capture_output=True, text=True, check=True).stdout.split()
    total, maxrss_kib = int(out[0]), int(out[1])
    assert total == gib * (1 << 30)
    base = subprocess.run([sys.executable, "-c", RSS_CHILD, "", key_ref], capture_output=True, text=True, check=True).stdout.split()[1]
    rows.rows.append((f"peak RSS streaming a {gib} GiB file", None, f"{maxrss_kib / 1024:.0f} MiB (interpreter + imports alone: {int(base) / 1024:.0f} MiB)"))
    print(f"  peak RSS streaming {gib} GiB: {maxrss_kib / 1024:.0f} MiB (baseline {int(base) / 1024:.0f} MiB)")
    (work / "rss.bin").unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="file size for the file rows")
    ap.add_argument("--mem-mib", type=int, default=256, help="buffer size for the in-memory rows")
    ap.add_argument("--rss-gib", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workdir", default="bench-data/throughput")
    ap.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    args = ap.parse_args()
    work = Path(args.workdir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "k.key").write_text(key_file_text(SymmetricKey.generate()))
    key_ref = f"keyfile:{work / 'k.key'}"
    opts = {"encfs": {"key": key_ref}}
    rows = Rows()
    cores = os.cpu_count() or 1
    print(f"{cpu_model()}, {cores} cores; file {args.size_mib} MiB, in-memory {args.mem_mib} MiB, best of {args.reps}")

    mem = in_memory(rows, args.mem_mib << 20, args.reps)
    size = args.size_mib << 20
    plain_path = work / "plain.bin"
    with open(plain_path, "wb") as f:
        for _ in range(size // BLOCK):
            f.write(os.urandom(BLOCK))
    with open(plain_path, "rb") as src, fsspec.open(f"encfs::file://{work / 'enc.bin'}", "wb", **opts) as dst:
        while block := src.read(BLOCK):
            dst.write(block)
    t_plain = best_of(lambda: read_file(str(plain_path)), args.reps)
    t_enc = best_of(lambda: read_file(f"encfs::file://{work / 'enc.bin'}", opts), args.reps)
    rows.add("plaintext read of the same file (page cache)", size / t_plain / GB)
    t_mmap = best_of(lambda: decrypt_mapped(str(work / "enc.bin"), key_ref), args.reps)
    rows.add("decrypt straight from an mmap of the file (no copy)", size / t_mmap / GB, "no copy, page faults instead; not used (SIGBUS on truncation)")
    rows.add("encfs::file:// sequential read (end to end)", size / t_enc / GB,
             f"{t_plain / t_enc:.2f} x plaintext read, {t_mmap / t_enc:.2f} x the mmap row")
    tink_row(rows, work, plain_path, size, args.reps)
    parquet_rows(rows, work, opts, args.reps)
    rss_row(rows, work, opts, key_ref, args.rss_gib)

    ratios = []
    if "limit" in mem:
        lim = mem["limit"]
        ratios.append(f"native 1 thread / single-core limit: {mem['native1'] / lim:.2f} (target >= 0.90)")
        if cores > 1:
            ratios.append(f"native {cores} threads / 1 thread: {mem[f'native{cores}'] / mem['native1']:.2f} (target >= 1.7 on 2 cores)")
        bound = min(size / t_plain / GB, cores * lim)
        ratios.append(f"encfs::file:// read / min(plaintext read, cores x limit): {size / t_enc / GB / bound:.2f} (target >= 0.80)")
        ratios.append(f"encfs::file:// read / native {cores} threads on the same chunks in memory (no file I/O): "
                      f"{size / t_enc / GB / mem[f'native{cores}']:.2f}")
        if "openssl_speed" in mem:
            speed_bound = min(size / t_plain / GB, cores * mem["openssl_speed"])
            ratios.append(f"encfs::file:// read / min(plaintext read, cores x `openssl speed` CLI figure): {size / t_enc / GB / speed_bound:.2f}")
    ratios.append(f"native backend / python backend: {mem.get(f'native{cores}', 0) / mem['python']:.2f}" if "limit" in mem else "native not built")
    print("\n".join("  " + r for r in ratios))
    write_results(Path(args.out), rows, ratios, args, cores)
    shutil.rmtree(work, ignore_errors=True)


def write_results(path: Path, rows: Rows, ratios: list[str], args, cores: int) -> None:
    import cryptography

    from encfs.backend import get_backend

    try:
        from encfs._native_backend import native_status

        ossl = native_status().get("openssl_version", "?")
    except ImportError:
        ossl = "native backend not built"
    lines = [
        "## Decrypt throughput",
        "",
        f"Machine: {cpu_model()}, {cores} cores. Python {sys.version.split()[0]}, cryptography {cryptography.__version__}, "
        f"{ossl}. Default backend: {get_backend().name}.",
        f"Command: `python benchmarks/bench_throughput.py --size-mib {args.size_mib} --mem-mib {args.mem_mib} --rss-gib {args.rss_gib} --reps {args.reps}` "
        f"({time.strftime('%Y-%m-%d')}). One run; best of {args.reps} per row; GB = 10^9 bytes of plaintext.",
        "",
        "| measurement | GB/s | note |",
        "|---|---:|---|",
    ]
    for name, gbps, note in rows.rows:
        lines.append(f"| {name} | {'' if gbps is None else f'{gbps:.2f}'} | {note} |")
    lines += ["", "Ratios from this run:", ""] + [f"- {r}" for r in ratios]
    update_results(path, "throughput", lines)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
