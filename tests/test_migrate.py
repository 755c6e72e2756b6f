"""``encfs migrate SRC DST``: dry runs, include/exclude, the summary, idempotent and resumable
reruns (changed sources, deleted or tampered destinations), re-encryption and decrypting out,
unreadable sources, clear errors, and a 64 MiB object to S3 (multipart, bounded memory).

The kill -9 campaign is in test_migrate_crash.py. Copies are checked with the independent
reader (tests/independent_reader.py, written from docs/FORMAT.md alone) where it matters.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from encfs.cli import main
from encfs.journal import COMMITTED, WRITTEN, Journal

from . import independent_reader as ir
from .conftest import write_key

REPO = Path(__file__).resolve().parents[1]
HWM_WRAPPER = (
    "import sys, runpy, atexit; "
    "atexit.register(lambda: sys.stderr.write([ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:')][0])); "
    "sys.argv[0] = 'encfs'; runpy.run_module('encfs.cli', run_name='__main__')"
)
SUMMARY_FIELDS = {"objects", "bytes", "copied", "checked", "skipped", "failed", "seconds", "mb_per_s", "journal", "dry_run"}


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def walk(root: Path) -> dict[str, Path]:
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    return {rel: (sha(p.read_bytes()), p.stat().st_mtime_ns) for rel, p in walk(root).items()}


def sym_key(keyref: str) -> bytes:
    return ir.parse_sym_key_file(Path(keyref.removeprefix("keyfile:")).read_text())


def decrypted(root: Path, keyref: str) -> dict[str, bytes]:
    k = sym_key(keyref)
    return {rel: ir.open_encfs(p.read_bytes(), sym_key=k) for rel, p in walk(root).items()}


@pytest.fixture
def files() -> dict[str, bytes]:
    rng = random.Random(7)
    out = {f"a/{i}.bin": rng.randbytes(rng.randint(0, 40_000)) for i in range(6)}
    out.update({f"b/c/{i}.txt": f"text {i}\n".encode() * rng.randint(1, 500) for i in range(4)})
    out["top.txt"] = b"top level\n"
    out["empty.bin"] = b""
    return out


@pytest.fixture
def env(tmp_path, keyref, files):
    """A plaintext source tree, an ``encfs::`` destination URL and a journal path."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    tree(src, files)
    return {"src": src, "dst": dst, "url": f"encfs::file://{dst}", "journal": str(tmp_path / "j.sqlite"), "key": keyref}


def migrate(capsys, *argv: str) -> tuple[int, dict | None, str]:
    """Run ``encfs migrate --json --no-progress ARGV`` in this process: (exit status, summary, stderr)."""
    capsys.readouterr()
    rc = main(["migrate", "--json", "--no-progress", *argv])
    cap = capsys.readouterr()
    lines = [ln for ln in cap.out.splitlines() if ln.startswith("{")]
    return rc, (json.loads(lines[-1]) if lines else None), cap.err


def run(capsys, e: dict, *extra: str) -> tuple[int, dict | None, str]:
    return migrate(capsys, "-k", e["key"], "--journal", e["journal"], *extra, str(e["src"]), e["url"])


def test_summary_fields_and_first_run(capsys, env, files):
    before = snapshot(env["src"])
    rc, out, err = run(capsys, env)
    assert rc == 0, err
    assert set(out) == SUMMARY_FIELDS
    n, total = len(files), sum(map(len, files.values()))
    assert out["objects"] == n and out["copied"] == n and out["checked"] == n and out["skipped"] == 0
    assert out["bytes"] == total and out["failed"] == [] and out["dry_run"] is False
    assert out["seconds"] > 0 and out["mb_per_s"] is not None and out["journal"] == env["journal"]
    assert decrypted(env["dst"], env["key"]) == files
    assert snapshot(env["src"]) == before
    with Journal(env["journal"], "migrate", str(env["src"]), env["url"]) as j:
        assert j.counts() == {COMMITTED: n}


def test_text_summary(capsys, env, files):
    capsys.readouterr()
    rc = main(["migrate", "--no-progress", "-k", env["key"], "--journal", env["journal"], str(env["src"]), env["url"]])
    err = capsys.readouterr().err
    assert rc == 0
    assert f"{len(files)} object(s): copied {len(files)}, checked {len(files)}, skipped 0" in err
    assert "failed 0" in err and "MB/s" in err and env["journal"] in err


def test_dry_run_writes_nothing(capsys, env, files):
    before = snapshot(env["src"])
    rc, out, _ = run(capsys, env, "--dry-run")
    assert rc == 0 and out["dry_run"] is True
    assert out["objects"] == len(files) and out["copied"] == len(files) and out["skipped"] == 0 and out["failed"] == []
    assert out["bytes"] == 0
    assert not env["dst"].exists()
    assert not Path(env["journal"]).exists(), "a dry run wrote a journal"
    assert snapshot(env["src"]) == before
    # After a real run, a dry run says everything is done.
    assert run(capsys, env)[0] == 0
    dst_before = snapshot(env["dst"])
    rc, out, _ = run(capsys, env, "--dry-run")
    assert rc == 0 and out["copied"] == 0 and out["checked"] == 0 and out["skipped"] == len(files)
    assert snapshot(env["dst"]) == dst_before


def test_include_exclude(capsys, env, files):
    rc, out, _ = run(capsys, env, "--include", "a/*", "--include", "b/*", "--exclude", "*/3.bin", "--exclude", "b/c/0.txt")
    want = {rel for rel in files if rel.startswith(("a/", "b/")) and rel not in ("a/3.bin", "b/c/0.txt")}
    assert rc == 0 and out["objects"] == len(want) == out["copied"]
    assert set(walk(env["dst"])) == want
    # Widening the selection later copies only what is new.
    rc, out, _ = run(capsys, env)
    assert rc == 0 and out["skipped"] == len(want) and out["copied"] == len(files) - len(want)
    assert decrypted(env["dst"], env["key"]) == files


def test_second_run_skips_everything(capsys, env, files):
    assert run(capsys, env)[0] == 0
    dst_before = snapshot(env["dst"])
    rc, out, _ = run(capsys, env)
    assert rc == 0 and out["copied"] == 0 and out["checked"] == 0 and out["bytes"] == 0 and out["skipped"] == len(files)
    assert snapshot(env["dst"]) == dst_before  # nothing rewritten


def test_changed_source_is_copied_again(capsys, env, files):
    assert run(capsys, env)[0] == 0
    changed = env["src"] / "a/1.bin"
    new = os.urandom(len(files["a/1.bin"]))  # same size: only the version stamp tells
    changed.write_bytes(new)
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    rc, out, _ = run(capsys, env)
    assert rc == 0 and out["copied"] == 1 and out["skipped"] == len(files) - 1
    assert decrypted(env["dst"], env["key"])["a/1.bin"] == new


def test_deleted_destination_is_copied_again(capsys, env, files):
    assert run(capsys, env)[0] == 0
    (env["dst"] / "b/c/2.txt").unlink()
    rc, out, _ = run(capsys, env)
    assert rc == 0 and out["copied"] == 1 and out["skipped"] == len(files) - 1
    assert decrypted(env["dst"], env["key"]) == files


def test_replaced_destination_is_copied_again(capsys, env, files):
    """A committed copy replaced by something else (new mtime) is not trusted: copied again."""
    assert run(capsys, env)[0] == 0
    p = env["dst"] / "a/2.bin"
    p.write_bytes(b"not an encfs file")
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 3_000_000_000))
    rc, out, _ = run(capsys, env)
    assert rc == 0 and out["copied"] == 1
    assert decrypted(env["dst"], env["key"]) == files


def flip_byte_keep_mtime(p: Path, where: int) -> None:
    st = p.stat()
    data = bytearray(p.read_bytes())
    data[where] ^= 0x01
    p.write_bytes(bytes(data))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("where", [-1, 40], ids=["payload", "header"])
def test_tampered_written_copy_is_detected(capsys, env, files, where):
    """A copy left ``written`` (copied, not yet checked: the state a kill between the copy and
    its check leaves) and tampered with meanwhile fails its check on the rerun: it is deleted,
    reported failed with its path, exit status 1; the next run copies it again."""
    assert run(capsys, env)[0] == 0
    rel = "a/4.bin"
    assert len(files[rel]) > 100
    with Journal(env["journal"], "migrate", str(env["src"]), env["url"]) as j:
        j.mark(rel, WRITTEN)  # keeps the digest and destination stamp of the copy
    flip_byte_keep_mtime(env["dst"] / rel, where)
    rc, out, err = run(capsys, env)
    assert rc == 1, err
    assert out["checked"] == 0 and out["copied"] == 0 and out["skipped"] == len(files) - 1
    assert [f["path"] for f in out["failed"]] == [f"{env['dst']}/{rel}"]
    assert not (env["dst"] / rel).exists(), "a copy that failed its check must be deleted"
    with Journal(env["journal"], "migrate", str(env["src"]), env["url"]) as j:
        assert j.rows()[rel].state == "failed"
    rc, out, _ = run(capsys, env)
    assert rc == 0 and out["copied"] == 1 and out["failed"] == []
    assert decrypted(env["dst"], env["key"]) == files


def test_failed_check_listed_in_text_report(capsys, env, files):
    assert run(capsys, env)[0] == 0
    with Journal(env["journal"], "migrate", str(env["src"]), env["url"]) as j:
        j.mark("top.txt", WRITTEN)
    flip_byte_keep_mtime(env["dst"] / "top.txt", -1)
    capsys.readouterr()
    rc = main(["migrate", "--no-progress", "-k", env["key"], "--journal", env["journal"], str(env["src"]), env["url"]])
    err = capsys.readouterr().err
    assert rc == 1 and "failed 1" in err and f"failed: {env['dst']}/top.txt:" in err


def test_written_copy_is_checked_not_copied(capsys, env, files):
    """An intact ``written`` copy is checked on the rerun, not copied again."""
    assert run(capsys, env)[0] == 0
    with Journal(env["journal"], "migrate", str(env["src"]), env["url"]) as j:
        for rel in ("a/0.bin", "top.txt"):
            j.mark(rel, WRITTEN)
    rc, out, _ = run(capsys, env)
    assert rc == 0 and out["copied"] == 0 and out["checked"] == 2 and out["skipped"] == len(files) - 2


def test_reencrypt_and_decrypt_out(capsys, tmp_path, env, files, other_keyref):
    before = snapshot(env["src"])
    assert run(capsys, env)[0] == 0
    a_url, b, c = env["url"], tmp_path / "b", tmp_path / "plain"
    a_before = snapshot(env["dst"])
    rc, out, err = migrate(capsys, "-k", other_keyref, "--src-key", env["key"], "--journal", str(tmp_path / "j2.sqlite"), a_url, f"encfs::file://{b}")
    assert rc == 0 and out["copied"] == len(files) and out["failed"] == [], err
    assert decrypted(b, other_keyref) == files
    with pytest.raises(ir.NoMatchingKeyError):  # really under the other key only
        ir.open_encfs((b / "top.txt").read_bytes(), sym_key=sym_key(env["key"]))
    rc, out, err = migrate(capsys, "-k", other_keyref, "--journal", str(tmp_path / "j3.sqlite"), f"encfs::file://{b}", str(c))
    assert rc == 0 and out["copied"] == len(files), err
    assert {rel: p.read_bytes() for rel, p in walk(c).items()} == files
    assert snapshot(env["src"]) == before and snapshot(env["dst"]) == a_before
    # Decrypting out is resumable too.
    rc, out, _ = migrate(capsys, "-k", other_keyref, "--journal", str(tmp_path / "j3.sqlite"), f"encfs::file://{b}", str(c))
    assert rc == 0 and out["skipped"] == len(files) and out["copied"] == 0


def test_reencrypt_with_wrong_source_key_fails_cleanly(capsys, tmp_path, env, files, other_keyref):
    assert run(capsys, env)[0] == 0
    rc, out, err = migrate(capsys, "-k", other_keyref, "--journal", str(tmp_path / "j2.sqlite"), env["url"], f"encfs::file://{tmp_path / 'b'}")
    assert rc == 1, err
    assert out is not None and len(out["failed"]) == len(files) and out["checked"] == 0
    assert walk(tmp_path / "b") == {}


def test_unreadable_source_fails_others_complete(capsys, env, files, monkeypatch):
    """Root reads anything (no chmod 000 here): a source file that cannot be opened is
    simulated at the filesystem layer. It is reported failed, exit 1; the rest complete."""
    from fsspec.implementations.local import LocalFileSystem

    bad = str(env["src"] / "a/2.bin")
    real_open = LocalFileSystem._open

    def _open(self, path, mode="rb", *a, **kw):
        if self._strip_protocol(path) == bad and "r" in mode:
            raise PermissionError(13, "Permission denied", path)
        return real_open(self, path, mode, *a, **kw)

    monkeypatch.setattr(LocalFileSystem, "_open", _open)
    rc, out, err = run(capsys, env)
    assert rc == 1
    assert len(out["failed"]) == 1 and out["failed"][0]["path"].endswith("a/2.bin")
    assert "Permission denied" in out["failed"][0]["error"]
    assert out["checked"] == len(files) - 1
    got = decrypted(env["dst"], env["key"])
    assert set(got) == set(files) - {"a/2.bin"} and all(got[r] == files[r] for r in got)
    monkeypatch.setattr(LocalFileSystem, "_open", real_open)
    rc, out, _ = run(capsys, env)
    assert rc == 0 and out["copied"] == 1 and out["skipped"] == len(files) - 1


def test_symlinked_source_is_not_silently_dropped(capsys, env, files):
    """A symlink in SRC is not followed (its target is not the tree's) and not dropped silently:
    it is reported as not migrated, and the run exits 1; everything else is migrated."""
    (env["src"] / "link.txt").symlink_to(env["src"] / "top.txt")
    rc, out, err = run(capsys, env)
    assert rc == 1 and out["objects"] == len(files)
    assert [f["path"].endswith("link.txt") and "not a regular file" in f["error"] for f in out["failed"]] == [True]


def test_neither_side_encrypted(capsys, tmp_path, env):
    rc, out, err = migrate(capsys, "-k", env["key"], "--journal", env["journal"], str(env["src"]), str(tmp_path / "plain"))
    assert rc == 1 and out is None
    assert "neither SRC nor DST is encrypted" in err
    assert not (tmp_path / "plain").exists()


@pytest.mark.parametrize("dst", ["{src}", "{src}/enc", "{src}/../src/./x"], ids=["same", "inside", "inside-unnormalised"])
def test_overlapping_src_and_dst_refused(capsys, tmp_path, env, dst):
    """DST == SRC would replace each source object by its encrypted copy; DST inside SRC would
    nest copies of copies on every rerun. Both are refused before anything is written."""
    before = snapshot(env["src"])
    url = "encfs::file://" + dst.format(src=env["src"])
    for _ in range(2):
        rc, out, err = migrate(capsys, "-k", env["key"], "--journal", env["journal"], str(env["src"]), url)
        assert rc == 1 and out is None and "overlap" in err, err
    assert snapshot(env["src"]) == before


def test_journal_of_another_migration(capsys, tmp_path, env):
    assert run(capsys, env)[0] == 0
    other_dst = f"encfs::file://{tmp_path / 'elsewhere'}"
    rc, out, err = migrate(capsys, "-k", env["key"], "--journal", env["journal"], str(env["src"]), other_dst)
    assert rc == 1 and out is None
    assert "is the journal of" in err and "pass another --journal" in err
    assert not (tmp_path / "elsewhere").exists()


def test_not_a_journal(capsys, tmp_path, env):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite" * 100)
    rc, out, err = migrate(capsys, "-k", env["key"], "--journal", str(junk), str(env["src"]), env["url"])
    assert rc == 1 and "not a usable journal" in err


def test_single_file(capsys, tmp_path, env, files):
    """SRC a single file: DST is the file's copy."""
    dst = tmp_path / "one.enc"
    rc, out, err = migrate(capsys, "-k", env["key"], "--journal", str(tmp_path / "j1.sqlite"), str(env["src"] / "a/0.bin"), f"encfs::file://{dst}")
    assert rc == 0 and out["objects"] == 1 and out["copied"] == 1, err
    assert ir.open_encfs(dst.read_bytes(), sym_key=sym_key(env["key"])) == files["a/0.bin"]
    rc, out, _ = migrate(capsys, "-k", env["key"], "--journal", str(tmp_path / "j1.sqlite"), str(env["src"] / "a/0.bin"), f"encfs::file://{dst}")
    assert rc == 0 and out["skipped"] == 1


# -- S3 ----------------------------------------------------------------------------------------


def test_s3_roundtrip_and_rerun(capsys, tmp_path, keyref, s3, s3_endpoint, files):
    fs, bucket, _ = s3
    fs.pipe({f"{bucket}/src/{rel}": data for rel, data in files.items()})
    etags = {k: e["ETag"] for k, e in fs.find(f"{bucket}/src", detail=True).items()}
    opts = ["--endpoint-url", s3_endpoint, "-o", "key=testing", "-o", "secret=testing"]
    argv = ["-k", keyref, "--journal", str(tmp_path / "j.sqlite"), *opts, f"s3://{bucket}/src", f"encfs::s3://{bucket}/dst"]
    rc, out, err = migrate(capsys, *argv)
    assert rc == 0 and out["copied"] == len(files), err
    fs.invalidate_cache()
    k = sym_key(keyref)
    got = {name.split("/dst/", 1)[1]: ir.open_encfs(data, sym_key=k) for name, data in fs.cat(fs.find(f"{bucket}/dst")).items()}
    assert got == files
    rc, out, _ = migrate(capsys, *argv)
    assert rc == 0 and out["skipped"] == len(files) and out["copied"] == 0
    rc, out, err = migrate(capsys, "-k", keyref, "--journal", str(tmp_path / "j2.sqlite"), *opts, f"s3://{bucket}/src", f"encfs::s3://{bucket}/src")
    assert rc == 1 and "overlap" in err
    fs.rm_file(f"{bucket}/dst/top.txt")
    rc, out, _ = migrate(capsys, *argv)
    assert rc == 0 and out["copied"] == 1
    fs.invalidate_cache()
    assert {k: e["ETag"] for k, e in fs.find(f"{bucket}/src", detail=True).items()} == etags


@pytest.mark.slow
def test_s3_64mib_multipart_bounded_memory(tmp_path, keyref, s3, s3_endpoint):
    """A 64 MiB object goes up as a multipart upload of several parts, and the migrating
    process's peak RSS stays bounded (it streams: no whole-object buffers)."""
    from .latency_proxy import LatencyProxy

    fs, bucket, _ = s3
    size = 64 << 20
    rng = random.Random(64)
    block = rng.randbytes(1 << 20)
    data = b"".join(bytes([i]) + block[1:] for i in range(64))
    assert len(data) == size
    fs.pipe(f"{bucket}/src/big.bin", data)
    src_etag = fs.info(f"{bucket}/src/big.bin")["ETag"]
    del block
    with LatencyProxy(s3_endpoint, latency=0.0) as proxy:
        # The child reports its own VmHWM at exit (ru_maxrss from wait4 is no good here: Linux
        # carries the forking parent's high-water mark, this test process holding moto's
        # copies, over the exec).
        argv = [sys.executable, "-c", HWM_WRAPPER, "migrate", "--json", "--no-progress", "-k", keyref, "--journal", str(tmp_path / "j.sqlite"),
                "--endpoint-url", proxy.url, "-o", "key=testing", "-o", "secret=testing", f"s3://{bucket}/src", f"encfs::s3://{bucket}/dst"]
        envv = {**os.environ, "ENCFS_PART_SIZE": str(8 << 20)}
        t = time.perf_counter()
        p = subprocess.run(argv, capture_output=True, env=envv, cwd=REPO, timeout=300)
        out, err = p.stdout, p.stderr
        elapsed = time.perf_counter() - t
        reqs = proxy.requests
    assert p.returncode == 0, err.decode()[-2000:]
    summary = json.loads(out)
    assert summary["copied"] == 1 and summary["bytes"] == size and summary["failed"] == []
    parts = [r for r in reqs if r.method == "PUT" and "partNumber=" in r.query]
    creates = [r for r in reqs if r.method == "POST" and "uploads" in r.query]
    completes = [r for r in reqs if r.method == "POST" and "uploadId=" in r.query]
    assert len(creates) == 1 and len(completes) == 1
    assert len(parts) >= 8, f"{len(parts)} part(s)"
    assert max(r.bytes_in for r in parts) < 20 << 20
    peak_mib = int(err.decode().rsplit("VmHWM:", 1)[1].split()[0]) / 1024  # kB
    print(f"\n64 MiB to S3: {len(parts)} parts, peak RSS {peak_mib:.0f} MiB, {elapsed:.1f} s")
    assert peak_mib < 400, f"peak RSS {peak_mib:.0f} MiB"
    fs.invalidate_cache()
    assert sha(ir.open_encfs(fs.cat(f"{bucket}/dst/big.bin"), sym_key=sym_key(keyref))) == sha(data)
    assert fs.info(f"{bucket}/src/big.bin")["ETag"] == src_etag
    assert fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []) == []


def test_failed_read_back_in_place_keeps_the_only_copy(tmp_path, keyref):
    """reencrypt works in place: the copy it checks has replaced the source, so a read-back that
    does not match is reported and the file kept (deleting it would lose the object); a copy
    made beside its source is deleted instead (the source still has it)."""
    from encfs.filesystem import EncFileSystem
    from encfs.migrate import check_object

    enc = EncFileSystem(target_protocol="file", key=keyref, skip_instance_cache=True)
    for keep in (True, False):
        path = str(tmp_path / f"obj-{keep}")
        enc.pipe_file(path, b"x" * 5000)
        got = check_object(enc, path, "0" * 64, 5000, keep_failed=keep)
        assert not got["ok"] and "SHA-256" in got["why"]
        assert os.path.exists(path) == keep
