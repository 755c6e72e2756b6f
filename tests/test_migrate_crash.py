"""``encfs migrate`` under ``kill -9``: a few hundred objects (nested folders, a couple large
enough for multipart uploads on S3), the command run as a subprocess and SIGKILLed at 20+
seeded-random moments spread over the run, each kill followed by a rerun (itself possibly
killed), then a clean run to the end. Afterwards the destination must hold exactly one
complete encrypted copy of every source object (no temporaries, no partial or extra
objects), each decrypting (with the independent reader, from docs/FORMAT.md alone) to the
source's bytes; the source must be untouched (bytes and mtimes on disk, ETags on S3); the
last run must report no failure and skip what earlier runs committed.

Run on local disk and on the moto S3 server. Orphaned multipart uploads (a killed process
cannot abort its upload) are invisible as objects; the S3 test asserts none shows up as an
object and prints their count.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from . import independent_reader as ir
from .conftest import write_key

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SEED = 20261206
N_SMALL = 300
N_SMALL_S3 = 250  # moto answers slowly (~80 ms an object, copy and check): fewer there
MIN_KILLS = 21
TEMP_MARK = ".encfs-tmp-"
PART = 5 << 20  # S3's smallest part: the large objects below take 2 and 3 parts


def make_objects(seed: int, big: tuple[int, ...], n_small: int = N_SMALL) -> dict[str, bytes]:
    """``n_small`` objects of 1-60 KB in nested folders plus ``big`` larger ones."""
    rng = random.Random(seed)
    out: dict[str, bytes] = {}
    for i in range(n_small):
        depth = rng.randint(0, 3)
        parts = [f"d{rng.randint(0, 4)}" for _ in range(depth)]
        out["/".join([*parts, f"obj-{i:04d}.bin"])] = rng.randbytes(rng.randint(1024, 60 * 1024))
    for j, size in enumerate(big):
        out[f"large/blob-{j}.bin"] = rng.randbytes(size)
    return out


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@dataclass
class Side:
    """One backend: listing (relative path -> version stamp) and reading of the raw objects
    under the destination prefix (temporaries included), and a snapshot of the source."""

    src_url: str
    dst_url: str
    extra: list[str]
    listing: object  # () -> {rel: stamp} of everything at the destination, temporaries too
    read_many: object  # (rels) -> {rel: raw bytes}
    src_snapshot: object  # () -> equal before and after iff the source is untouched
    reset_dst: object
    verified: set = field(default_factory=set)  # (rel, stamp) already found complete

class Migration:
    def __init__(self, side: Side, keyref: str, journal: Path):
        self.side, self.keyref, self.journal = side, keyref, journal
        self.env = {**os.environ, "ENCFS_PART_SIZE": str(PART), "PYTHONUNBUFFERED": "1"}
        self.env.pop("ENCFS_KEY", None)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "encfs.cli", "migrate", "-k", self.keyref, "--journal", str(self.journal),
                "--json", "--no-progress", "-j", "4", *self.side.extra, self.side.src_url, self.side.dst_url]

    def run(self, kill_after: float | None = None) -> tuple[bool, int, str, str]:
        """Run once; SIGKILL after ``kill_after`` seconds if still running. Returns
        (killed, returncode, stdout, stderr)."""
        p = subprocess.Popen(self.argv(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env, cwd=REPO, text=True)
        try:
            out, err = p.communicate(timeout=kill_after if kill_after is not None else 300)
            return False, p.returncode, out, err
        except subprocess.TimeoutExpired:
            if kill_after is None:
                p.kill()
                p.communicate()
                raise
            p.send_signal(signal.SIGKILL)
            out, err = p.communicate()
            return p.returncode == -signal.SIGKILL, p.returncode, out, err  # it may have ended just before the kill


def journal_states(path: Path) -> dict[str, int]:
    if not path.exists():
        return {}
    db = sqlite3.connect(path)
    try:
        return dict(db.execute("SELECT state, COUNT(*) FROM objects GROUP BY state"))
    except sqlite3.OperationalError:
        return {}
    finally:
        db.close()


def decrypt(raw: bytes, sym_key: bytes) -> bytes:
    return ir.open_encfs(raw, sym_key=sym_key)


def check_no_partial(side: Side, listing: dict[str, object], src: dict[str, bytes], sym_key: bytes) -> None:
    """Every object visible at the destination (temporaries aside) is a complete copy (each
    version checked once)."""
    new = [rel for rel, st in listing.items() if TEMP_MARK not in rel and (rel, st) not in side.verified]
    extra = [rel for rel in new if rel not in src]
    assert not extra, f"extra objects at the destination: {extra[:5]}"
    for rel, data in side.read_many(new).items():
        assert sha(decrypt(data, sym_key)) == sha(src[rel]), f"{rel}: visible but not a complete copy"
        side.verified.add((rel, listing[rel]))


def check_complete(side: Side, src: dict[str, bytes], sym_key: bytes) -> None:
    """The destination is exactly one complete copy of each source object, nothing else."""
    listing = side.listing()
    temps = sorted(r for r in listing if TEMP_MARK in r)
    assert not temps, f"temporaries left at the destination: {temps[:5]} ({len(temps)})"
    assert set(listing) == set(src), f"missing {sorted(set(src) - set(listing))[:5]}, extra {sorted(set(listing) - set(src))[:5]}"
    raw = side.read_many(sorted(listing))
    bad = [rel for rel in src if sha(decrypt(raw[rel], sym_key)) != sha(src[rel])]
    assert not bad, f"copies not decrypting to the source: {bad[:5]}"


def crash_campaign(side: Side, keyref: str, sym_key: bytes, src: dict[str, bytes], tmp: Path, seed: int) -> dict:
    rng = random.Random(seed)
    before = side.src_snapshot()

    # An uninterrupted run (to a scratch journal and the real destination, then wiped) and an
    # all-skipped rerun: how long the whole copy takes, and how long starting up and listing do.
    ref = Migration(side, keyref, tmp / "ref.sqlite")
    t = time.perf_counter()
    killed, rc, out, err = ref.run()
    full = time.perf_counter() - t
    assert not killed and rc == 0, err
    t = time.perf_counter()
    killed, rc, out, err = ref.run()
    idle = time.perf_counter() - t
    assert rc == 0 and json.loads(out)["skipped"] == len(src), out + err
    work = max(full - idle, 0.2)
    side.reset_dst()

    stats = {"kills": 0, "no_progress": 0, "mid_copy": 0, "with_temporaries": 0, "natural_ends": 0, "runs": 0,
             "full_s": round(full, 2), "idle_s": round(idle, 2), "committed_at_kills": []}
    episode = 0
    mig = Migration(side, keyref, tmp / f"j{episode}.sqlite")
    last: dict | None = None
    committed_before = 0
    done_before = 0
    bias = 0.0
    # At least MIN_KILLS kills, and on until a kill has landed past half the objects (a busy
    # machine slows the runs down: the kill points then move later, see ``bias``).
    while stats["kills"] < MIN_KILLS or (max(stats["committed_at_kills"]) < len(src) // 2 and stats["kills"] < 3 * MIN_KILLS):
        # Each run gets a random share of the start-up time (some die before copying anything)
        # plus a small random share of the copying, so that the kills of one chain land at
        # every stage of the migration, from the first object to the last.
        delay = bias + rng.uniform(0.4, 1.1) * idle + rng.uniform(0.0, 0.12) * work
        killed, rc, out, err = mig.run(kill_after=delay)
        stats["runs"] += 1
        if not killed:
            # It ended before the kill: a complete run; check it, then start over afresh.
            assert rc == 0, f"run ended with {rc}: {err}"
            last = json.loads(out)
            assert last["failed"] == [], last
            assert last["skipped"] == committed_before, (last, committed_before)
            stats["natural_ends"] += 1
            check_complete(side, src, sym_key)
            episode += 1
            side.reset_dst()
            mig = Migration(side, keyref, tmp / f"j{episode}.sqlite")
            committed_before = done_before = 0
            bias = 0.0
            continue
        assert rc == -signal.SIGKILL, (rc, err)
        stats["kills"] += 1
        listing = side.listing()
        done = [r for r in listing if TEMP_MARK not in r]
        stats["with_temporaries"] += any(TEMP_MARK in r for r in listing)
        if len(done) == done_before:
            stats["no_progress"] += 1  # killed while starting up or listing, or mid-object
        if len(done) < len(src):
            stats["mid_copy"] += 1
        done_before = len(done)
        check_no_partial(side, listing, src, sym_key)
        committed = journal_states(mig.journal).get("committed", 0)
        # No progress committed (a slow start-up on a busy machine): give the next runs longer.
        bias = bias + 0.3 * idle if committed == committed_before else 0.0
        committed_before = committed
        stats["committed_at_kills"].append(committed)

    killed, rc, out, err = mig.run()
    stats["runs"] += 1
    assert rc == 0, err
    last = json.loads(out)
    assert last["failed"] == [] and last["objects"] == len(src), last
    assert last["skipped"] == committed_before, (last, committed_before)
    assert last["skipped"] + last["checked"] == len(src), last
    if committed_before:
        assert last["copied"] < len(src), last
    check_complete(side, src, sym_key)
    assert journal_states(mig.journal) == {"committed": len(src)}

    # And once more: nothing to do.
    killed, rc, out, err = mig.run()
    again = json.loads(out)
    assert rc == 0 and again["copied"] == 0 and again["checked"] == 0 and again["skipped"] == len(src), again
    assert side.src_snapshot() == before, "the source changed"
    check_complete(side, src, sym_key)

    # The kill points really were spread over the run.
    assert stats["kills"] >= MIN_KILLS
    assert stats["mid_copy"] >= 5, stats
    at = stats["committed_at_kills"]
    assert min(at) < len(src) // 5 and max(at) >= len(src) // 2, stats
    stats["final_run"] = last
    return stats


@pytest.fixture
def key(tmp_path) -> tuple[str, bytes]:
    ref = write_key(tmp_path / "m.key")
    return ref, ir.parse_sym_key_file((tmp_path / "m.key").read_text())


def test_kill9_local(tmp_path, key):
    keyref, sym_key = key
    src = make_objects(SEED, (3 << 20, 6 << 20 | 12345))
    src_root, dst_root = tmp_path / "src", tmp_path / "dst"
    for rel, data in src.items():
        p = src_root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)

    def walk(root: Path) -> dict[str, Path]:
        out = {}
        for d, _, files in os.walk(root):
            for f in files:
                p = Path(d) / f
                out[p.relative_to(root).as_posix()] = p
        return out

    def snapshot():
        return {rel: (sha(p.read_bytes()), p.stat().st_mtime_ns, p.stat().st_mode) for rel, p in walk(src_root).items()}

    def reset():
        import shutil

        shutil.rmtree(dst_root, ignore_errors=True)

    side = Side(
        src_url=str(src_root), dst_url=f"encfs::file://{dst_root}", extra=[],
        listing=lambda: {rel: (p.stat().st_mtime_ns, p.stat().st_size, p.stat().st_ino) for rel, p in walk(dst_root).items()},
        read_many=lambda rels: {rel: (dst_root / rel).read_bytes() for rel in rels},
        src_snapshot=snapshot, reset_dst=reset,
    )
    assert snapshot().keys() == src.keys()
    stats = crash_campaign(side, keyref, sym_key, src, tmp_path, SEED)
    print(f"\nlocal kill -9 campaign: {stats}")


def test_kill9_s3(tmp_path, key, s3, s3_endpoint):
    keyref, sym_key = key
    fs, bucket, _ = s3
    src = make_objects(SEED + 1, (5 << 20 | 300_000, 6 << 20 | 777), n_small=N_SMALL_S3)
    fs.pipe({f"{bucket}/src/{rel}": data for rel, data in src.items()})

    def find(prefix: str) -> dict[str, dict]:
        fs.invalidate_cache()
        found = fs.find(f"{bucket}/{prefix}", detail=True)
        return {name[len(f"{bucket}/{prefix}/"):]: e for name, e in found.items()}

    def listing():
        return {rel: e["ETag"] for rel, e in find("dst").items()}

    def read_many(rels):
        if not rels:
            return {}
        got = fs.cat([f"{bucket}/dst/{rel}" for rel in rels])
        return {name[len(f"{bucket}/dst/"):]: data for name, data in got.items()}

    def snapshot():
        return {rel: (e["ETag"], e["size"]) for rel, e in find("src").items()}

    def reset():
        names = list(find("dst"))
        if names:
            fs.rm([f"{bucket}/dst/{rel}" for rel in names])

    side = Side(
        src_url=f"s3://{bucket}/src", dst_url=f"encfs::s3://{bucket}/dst",
        extra=["--endpoint-url", s3_endpoint, "-o", "key=testing", "-o", "secret=testing"],
        listing=listing, read_many=read_many, src_snapshot=snapshot, reset_dst=reset,
    )
    before_bytes = {rel: sha(data) for rel, data in fs.cat([f"{bucket}/src/{rel}" for rel in src]).items()}
    stats = crash_campaign(side, keyref, sym_key, src, tmp_path, SEED + 1)
    after_bytes = {rel: sha(data) for rel, data in fs.cat([f"{bucket}/src/{rel}" for rel in src]).items()}
    assert after_bytes == before_bytes
    uploads = fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
    stats["orphaned_multipart_uploads"] = len(uploads)
    stats["orphaned_upload_keys"] = sorted({u["Key"] for u in uploads})
    # Orphans are invisible as objects (checked above: the listing is exactly the source's).
    print(f"\nS3 kill -9 campaign: {stats}")


def test_kill9_mid_multipart_s3(tmp_path, key, s3, s3_endpoint):
    """A kill while a multipart upload is under way (seen in ``list_multipart_uploads``):
    the object never shows up partial, the rerun completes it. The killed process cannot
    abort its upload: the orphan stays, invisible as an object, until a bucket lifecycle
    rule (AbortIncompleteMultipartUpload) or someone aborts it; its count is printed."""
    from .latency_proxy import LatencyProxy

    keyref, sym_key = key
    fs, bucket, _ = s3
    data = random.Random(SEED + 2).randbytes(12 << 20)
    fs.pipe(f"{bucket}/src/big.bin", data)
    with LatencyProxy(s3_endpoint, latency=0.0, bandwidth=6 << 20) as proxy:  # ~2 s for the upload
        side = Side(src_url=f"s3://{bucket}/src", dst_url=f"encfs::s3://{bucket}/dst",
                    extra=["--endpoint-url", proxy.url, "-o", "key=testing", "-o", "secret=testing"],
                    listing=None, read_many=None, src_snapshot=None, reset_dst=None)
        mig = Migration(side, keyref, tmp_path / "j.sqlite")
        p = subprocess.Popen(mig.argv(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=mig.env, cwd=REPO)
        deadline = time.monotonic() + 60
        while not fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads") and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # a part or two on its way
        assert p.poll() is None, "the run ended before the kill: nothing to test"
        p.send_signal(signal.SIGKILL)
        p.communicate()
        fs.invalidate_cache()
        assert not fs.find(f"{bucket}/dst"), "a killed multipart upload must not leave an object"
        killed, rc, out, err = mig.run()
    assert not killed and rc == 0, err
    summary = json.loads(out)
    assert summary["copied"] == 1 and summary["failed"] == []
    fs.invalidate_cache()
    assert list(fs.find(f"{bucket}/dst")) == [f"{bucket}/dst/big.bin"]
    assert sha(decrypt(fs.cat(f"{bucket}/dst/big.bin"), sym_key)) == sha(data)
    orphans = fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
    print(f"\norphaned multipart uploads after kill + rerun: {len(orphans)} ({sorted(u['Key'] for u in orphans)})")
