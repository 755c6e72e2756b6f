"""Signed dataset manifests (encfs.manifest, encfs.signing, loaders' ``manifest=``).

The independent reference is the plaintext each file was written from and the raw ciphertext
files themselves (file id at bytes 12..28, the header length at 28..32, the key commitment at
H+24..H+56: docs/FORMAT.md), never what the code under test computes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from encfs import manifest as M
from encfs.errors import EncfsError, KeyReferenceError
from encfs.filesystem import EncFileSystem
from encfs.keys.sources import b64encode
from encfs.signing import SigningKey, VerifyKey, write_signing_key

RECORD = (8,)  # float32 records of 32 bytes
SIZES = {"train/shard-0.bin": 1000, "train/shard-1.bin": 600, "train/shard-2.bin": 600, "val/v.bin": 10}


def raw_facts(path: Path) -> tuple[str, str]:
    """(file id hex, commitment hex) read straight from the ciphertext file."""
    raw = path.read_bytes()
    h = int.from_bytes(raw[28:32], "big")
    return raw[12:28].hex(), raw[h + 24 : h + 56].hex()


@pytest.fixture
def dataset(tmp_path, keyref):
    fs = EncFileSystem(target_protocol="file", key=keyref, skip_instance_cache=True)
    root = tmp_path / "data"
    rng = np.random.default_rng(7)
    plain = {}
    for rel, n in SIZES.items():
        data = rng.normal(size=(n, *RECORD)).astype(np.float32).tobytes()
        fs.pipe_file(str(root / rel), data)
        plain[rel] = data
    key = SigningKey.generate()
    return fs, root, plain, key, keyref


def reasons(problems) -> set[tuple[str, str]]:
    return {(p.path, p.reason) for p in problems}


def check(fs, root, key, **kw):
    m = M.load(fs, str(root), [key.public], **kw)
    return reasons(M.verify_prefix(fs, m)), reasons(M.verify_prefix(fs, m, digests=False))


# -- the manifest itself -----------------------------------------------------------------------------


def test_clean_dataset_passes_and_entries_match_the_raw_files(dataset):
    fs, root, plain, key, _ = dataset
    made = M.create(fs, str(root), key, version=3)
    assert made.version == 3 and len(made) == len(SIZES)
    raw = (root / M.MANIFEST_NAME).read_bytes()
    assert raw[:8] == b"\x89ENCFS\r\n"  # encrypted by default
    assert b"shard-0" not in raw
    m = M.load(fs, str(root), [key.public], min_version=3)
    assert m.signer == key.public and m.version == 3 and m.name == "data"
    assert set(m.entries) == set(SIZES)
    for rel, data in plain.items():
        e = m.entries[rel]
        fid, com = raw_facts(root / rel)
        assert (e.size, e.sha256, e.file_id, e.commitment) == (len(data), hashlib.sha256(data).hexdigest(), fid, com)
    assert check(fs, root, key) == (set(), set())


def test_body_is_canonical_and_signed_bytewise(dataset):
    fs, root, _, key, _ = dataset
    M.create(fs, str(root), key, plain=True)
    raw = (root / M.MANIFEST_NAME).read_bytes()
    first, body, sigs, end = raw.split(b"\n")
    assert first == b"encfs-manifest-v1" and end == b""
    doc = json.loads(body)
    assert body == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    assert [r[0] for r in doc["entries"]] == sorted(SIZES)
    sig = json.loads(sigs)["signatures"][0]
    assert sig["signer"] == key.public
    import base64

    VerifyKey.parse(key.public)._key.verify(base64.urlsafe_b64decode(sig["sig"] + "=="), M.SIGNED_CONTEXT + body)


def test_missing_file(dataset):
    fs, root, _, key, _ = dataset
    M.create(fs, str(root), key)
    (root / "train/shard-1.bin").unlink()
    assert check(fs, root, key) == ({("train/shard-1.bin", "missing")},) * 2


def test_added_file(dataset):
    fs, root, _, key, _ = dataset
    M.create(fs, str(root), key)
    fs.pipe_file(str(root / "train/shard-9.bin"), b"\0" * 64)
    assert check(fs, root, key) == ({("train/shard-9.bin", "added")},) * 2


def test_swapped_file_same_size_same_key(dataset):
    """shard-1 and shard-2 have the same size and key: only the file id binding tells them apart."""
    fs, root, _, key, _ = dataset
    M.create(fs, str(root), key)
    shutil.copyfile(root / "train/shard-1.bin", root / "train/shard-2.bin")
    assert fs.cat_file(str(root / "train/shard-2.bin"))  # still a perfectly valid encfs file
    got, quick = check(fs, root, key)
    assert got == quick == {("train/shard-2.bin", "swapped")}
    m = M.load(fs, str(root), [key.public])
    err = next(p for p in M.verify_prefix(fs, m) if p.reason == "swapped")
    assert "train/shard-1.bin" in err.detail and isinstance(err, EncfsError)


def test_rolled_back_file(dataset):
    fs, root, _, key, _ = dataset
    old = (root / "train/shard-1.bin").read_bytes()
    fs.pipe_file(str(root / "train/shard-1.bin"), os.urandom(600 * 32))  # a new version, same size
    M.create(fs, str(root), key)
    (root / "train/shard-1.bin").write_bytes(old)  # the old ciphertext put back
    assert check(fs, root, key) == ({("train/shard-1.bin", "rolled-back")},) * 2


def test_resized_file(dataset):
    fs, root, _, key, _ = dataset
    M.create(fs, str(root), key)
    fs.pipe_file(str(root / "train/shard-0.bin"), os.urandom(1001 * 32))
    with open(root / "val/v.bin", "r+b") as f:  # cut short: also fails authentication
        f.truncate(os.path.getsize(root / "val/v.bin") - 100)
    assert check(fs, root, key) == ({("train/shard-0.bin", "resized"), ("val/v.bin", "resized")},) * 2


def test_digest_mismatch_is_found_by_the_full_pass_only(dataset):
    """A payload rewritten under the same file key (only a key holder can) keeps file id and
    commitment; the plaintext digest is what catches it. Simulated with a manifest that records
    another digest, honestly signed."""
    fs, root, _, key, _ = dataset
    m = M.build(fs, str(root), 1)
    e = m.entries["train/shard-0.bin"]
    forged = M.Manifest([x if x.path != e.path else e._replace(sha256="0" * 64) for x in m.entries.values()], 1, name="data")
    M.write_bytes(fs, fs._strip_protocol(str(root)), forged.sign(key))
    full, quick = check(fs, root, key)
    assert full == {("train/shard-0.bin", "modified")} and quick == set()


def test_wrong_signer(dataset):
    fs, root, _, key, _ = dataset
    M.create(fs, str(root), key)
    other = SigningKey.generate()
    with pytest.raises(M.ManifestError) as ei:
        M.load(fs, str(root), [other.public])
    assert ei.value.reason == "untrusted-signer" and ei.value.path.endswith(M.MANIFEST_NAME)
    assert M.load(fs, str(root), [other.public, key.public]).signer == key.public  # any trusted one


def test_manifest_signed_by_an_attacker_is_refused(dataset):
    fs, root, _, key, _ = dataset
    M.create(fs, str(root), key)
    mallory = SigningKey.generate()
    m = M.load(fs, str(root), [key.public])
    fake = m.sign(mallory).replace(mallory.public.encode(), key.public.encode())  # claims to be the real signer
    M.write_bytes(fs, str(root), fake, plain=True)
    with pytest.raises(M.ManifestError) as ei:
        M.load(fs, str(root), [key.public])
    assert ei.value.reason == "bad-signature"


@pytest.mark.parametrize("how", ["flip-body", "edit-entry", "flip-signature", "drop-line"])
def test_tampered_plain_manifest(dataset, how):
    fs, root, _, key, _ = dataset
    M.create(fs, str(root), key, plain=True)
    path = root / M.MANIFEST_NAME
    raw = bytearray(path.read_bytes())
    first, body, sigs, _ = bytes(raw).split(b"\n")
    if how == "flip-body":
        raw[len(first) + 1 + body.index(b"shard-1")] ^= 0x01  # shard-1 -> shard-0, still valid JSON
    elif how == "edit-entry":
        doc = json.loads(body)
        doc["entries"][0][1] += 32  # a size changed, re-serialised canonically, signature kept
        raw = bytearray(b"\n".join([first, json.dumps(doc, sort_keys=True, separators=(",", ":")).encode(), sigs, b""]))
    elif how == "flip-signature":
        s = json.loads(sigs)
        sig = s["signatures"][0]["sig"]
        s["signatures"][0]["sig"] = ("B" if sig[0] != "B" else "C") + sig[1:]
        raw = bytearray(b"\n".join([first, body, json.dumps(s).encode(), b""]))
    else:
        raw = bytearray(b"\n".join([first, body, b""]))
    path.write_bytes(bytes(raw))
    with pytest.raises(M.ManifestError) as ei:
        M.load(fs, str(root), [key.public])
    assert ei.value.reason == ("malformed" if how == "drop-line" else "bad-signature")


def test_tampered_encrypted_manifest(dataset):
    fs, root, _, key, _ = dataset
    M.create(fs, str(root), key)
    path = root / M.MANIFEST_NAME
    raw = bytearray(path.read_bytes())
    raw[2000] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(M.ManifestError) as ei:
        M.load(fs, str(root), [key.public])
    assert ei.value.reason == "unreadable" and "IntegrityError" in str(ei.value)


def test_no_manifest(dataset):
    fs, root, _, key, _ = dataset
    with pytest.raises(M.ManifestError) as ei:
        M.load(fs, str(root), [key.public])
    assert ei.value.reason == "no-manifest"


def test_versions_increase_and_min_version_refuses_a_rolled_back_dataset(dataset):
    fs, root, _, key, _ = dataset
    assert M.create(fs, str(root), key).version == 1
    v1 = (root / M.MANIFEST_NAME).read_bytes()
    assert M.create(fs, str(root), key).version == 2
    with pytest.raises(M.ManifestError) as ei:
        M.create(fs, str(root), key, version=2)
    assert ei.value.reason == "version-not-increasing"
    assert M.create(fs, str(root), key, version=7).version == 7
    assert M.load(fs, str(root), [key.public], min_version=7).version == 7
    (root / M.MANIFEST_NAME).write_bytes(v1)  # the whole dataset's old manifest put back
    with pytest.raises(M.ManifestError) as ei:
        M.load(fs, str(root), [key.public], min_version=7)
    assert ei.value.reason == "old-version" and "1" in ei.value.detail
    assert M.load(fs, str(root), [key.public]).version == 1  # without a minimum, v1 is still a valid v1


def test_malformed_bodies_are_refused_even_when_signed():
    key = SigningKey.generate()
    good = M.Entry("a.bin", 1, "0" * 32, "1" * 64, "2" * 64)
    for bad in ["../a", "/a", "a//b", "a/./b", "a/", ""]:
        with pytest.raises(M.ManifestError):
            M.Manifest([good._replace(path=bad)], 1)
    with pytest.raises(M.ManifestError):
        M.Manifest([good, good], 1)
    for field, value in (("file_id", "G" * 32), ("sha256", "A" * 64), ("commitment", "0" * 63)):
        with pytest.raises(M.ManifestError):
            M.Manifest([good._replace(**{field: value})], 1)
    # a signed body with a bad entry is still refused at parse
    body = json.dumps({"format": M.FORMAT_NAME, "version": 1, "created": "x", "name": "", "fields": M.FIELDS,
                       "entries": [["../x", 1, "0" * 32, "1" * 64, "2" * 64]]}, sort_keys=True, separators=(",", ":")).encode()
    sig = b64encode(key.sign(M.SIGNED_CONTEXT + body))
    data = M.FORMAT_LINE + body + b"\n" + json.dumps({"signatures": [{"signer": key.public, "sig": sig}]}).encode() + b"\n"
    with pytest.raises(M.ManifestError) as ei:
        M.Manifest.parse(data, [key.public])
    assert ei.value.reason == "malformed"


# -- keys ---------------------------------------------------------------------------------------------


def test_signing_key_file(tmp_path):
    key = SigningKey.generate()
    path = tmp_path / "signer.key"
    write_signing_key(str(path), key)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text = path.read_text()
    secret = next(line for line in text.splitlines() if line.startswith("encfs-ed25519-signing-v1:")).split(":", 1)[1]
    loaded = SigningKey.load(str(path))
    assert loaded.public == key.public and key.public in text
    assert secret not in repr(loaded) and secret not in repr(loaded.verify_key)
    with pytest.raises(TypeError):
        pickle.dumps(loaded)
    with pytest.raises(KeyReferenceError):
        write_signing_key(str(path), key)  # no silent overwrite
    assert VerifyKey.parse(str(path)).reference == key.public  # the public key from the key file
    bad = tmp_path / "bad.key"
    bad.write_text("encfs-ed25519-signing-v1:" + secret[:-2] + "!!\n")
    with pytest.raises(KeyReferenceError) as ei:
        SigningKey.load(str(bad))
    assert secret[:20] not in str(ei.value)
    with pytest.raises(KeyReferenceError):
        VerifyKey.parse("ed25519:short")


# -- loaders ------------------------------------------------------------------------------------------


def _records(root, opts, manifest, pattern="train/shard-*.bin"):
    from encfs.loaders import EncryptedRecordDataset

    return EncryptedRecordDataset(f"encfs::file://{root}/{pattern}", RECORD, np.float32, storage_options=opts, manifest=manifest)


def test_loader_clean_dataset_passes(dataset):
    fs, root, plain, key, keyref = dataset
    M.create(fs, str(root), key)
    opts = {"encfs": {"key": keyref}}
    ds = _records(root, opts, {"signers": [key.public], "min_version": 1})
    ref = np.frombuffer(b"".join(plain[f"train/shard-{k}.bin"] for k in range(3)), np.float32).reshape(-1, *RECORD)
    assert len(ds) == len(ref)
    for i in (0, 999, 1000, 2199):
        assert np.array_equal(np.asarray(ds[i]), ref[i])
    # a verified Manifest object works too, as does an explicit prefix
    m = M.load(fs, str(root), [key.public])
    assert len(_records(root, opts, m)) == len(ref)
    assert len(_records(root, opts, {"signers": key.public, "prefix": f"encfs::file://{root}"})) == len(ref)


def test_loader_refuses_a_swapped_shard_before_any_sample(dataset):
    fs, root, _, key, keyref = dataset
    M.create(fs, str(root), key)
    shutil.copyfile(root / "train/shard-1.bin", root / "train/shard-2.bin")
    with pytest.raises(M.ManifestError) as ei:
        _records(root, {"encfs": {"key": keyref}}, {"signers": [key.public]})
    assert ei.value.reason == "swapped" and ei.value.path.endswith("train/shard-2.bin")
    assert "train/shard-1.bin" in str(ei.value)


def test_loader_checks_every_later_open_too(dataset):
    """A swap after the dataset was made is caught when a process (re)opens the file: here
    the dataset pickled as for a spawn worker."""
    fs, root, _, key, keyref = dataset
    M.create(fs, str(root), key)
    ds = _records(root, {"encfs": {"key": keyref}}, {"signers": [key.public]})
    clone = pickle.loads(pickle.dumps(ds))
    assert b"encfs-key-v1" not in pickle.dumps(ds)
    shutil.copyfile(root / "train/shard-1.bin", root / "train/shard-2.bin")
    assert clone[0] is not None  # shard 0 is untouched
    with pytest.raises(M.ManifestError) as ei:
        clone[1000 + 600]  # first record of shard-2
    assert ei.value.reason == "swapped"
    with pytest.raises(M.ManifestError):
        ds[1600]


def test_loader_missing_added_rolled_back_old_version(dataset):
    fs, root, _, key, keyref = dataset
    opts = {"encfs": {"key": keyref}}
    old = (root / "train/shard-1.bin").read_bytes()
    fs.pipe_file(str(root / "train/shard-1.bin"), os.urandom(600 * 32))
    M.create(fs, str(root), key, version=4)
    spec = {"signers": [key.public], "min_version": 4}

    def reason() -> str:
        with pytest.raises(M.ManifestError) as ei:
            _records(root, opts, spec)
        return ei.value.reason

    (root / "train/shard-1.bin").write_bytes(old)
    assert reason() == "rolled-back"
    fs.pipe_file(str(root / "train/shard-1.bin"), b"\0" * 32)
    assert reason() == "resized"
    (root / "train/shard-1.bin").unlink()
    assert reason() == "missing"
    fs.pipe_file(str(root / "train/shard-1.bin"), b"\0" * 32)
    M.create(fs, str(root), key, version=5)
    fs.pipe_file(str(root / "train/shard-3.bin"), b"\0" * 32)
    assert reason() == "added"
    (root / "train/shard-3.bin").unlink()
    assert len(_records(root, opts, {**spec, "min_version": 5})) == 1000 + 1 + 600
    with pytest.raises(M.ManifestError) as ei:
        _records(root, opts, {**spec, "min_version": 6})
    assert ei.value.reason == "old-version"


def test_loader_explicit_url_of_a_deleted_file_is_missing(dataset):
    fs, root, _, key, keyref = dataset
    M.create(fs, str(root), key)
    (root / "train/shard-2.bin").unlink()
    with pytest.raises(M.ManifestError) as ei:
        _records(root, {"encfs": {"key": keyref}}, {"signers": [key.public]}, pattern="train/shard-{0..2}.bin")
    assert ei.value.reason == "missing" and ei.value.path.endswith("train/shard-2.bin")


def test_file_dataset_and_untrusted_signer(dataset):
    from encfs.loaders import EncryptedFileDataset

    fs, root, plain, key, keyref = dataset
    M.create(fs, str(root), key)
    opts = {"encfs": {"key": keyref}}
    ds = EncryptedFileDataset(f"encfs::file://{root}/val/*.bin", storage_options=opts, manifest={"signers": [key.public]})
    assert ds[0] == plain["val/v.bin"]
    with pytest.raises(M.ManifestError) as ei:
        EncryptedFileDataset(f"encfs::file://{root}/val/*.bin", storage_options=opts, manifest={"signers": [SigningKey.generate().public]})
    assert ei.value.reason == "untrusted-signer"


def _tar_bytes(n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(n):
            data = rng.bytes(3000)
            info = tarfile.TarInfo(f"s{i:04d}.bin")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_tar_dataset_digest_checked_by_the_end_of_the_read(tmp_path, keyref):
    from encfs.loaders.tars import EncryptedTarDataset

    fs = EncFileSystem(target_protocol="file", key=keyref, skip_instance_cache=True)
    root = tmp_path / "tars"
    for k in range(2):
        fs.pipe_file(str(root / f"shard-{k}.tar"), _tar_bytes(20, k))
    key = SigningKey.generate()
    M.create(fs, str(root), key)
    url, opts = f"encfs::file://{root}/shard-*.tar", {"encfs": {"key": keyref}}
    ds = EncryptedTarDataset(url, opts, shuffle=False, manifest={"signers": [key.public]})
    assert len(list(ds)) == 40
    # a manifest that records another digest for shard-1 (what a payload forged under the same file key looks like)
    m = M.load(fs, str(root), [key.public])
    e = m.entries["shard-1.tar"]
    forged = M.Manifest([x if x.path != e.path else e._replace(sha256="f" * 64) for x in m.entries.values()], 2, name="tars")
    M.write_bytes(fs, str(root), forged.sign(key))
    ds = EncryptedTarDataset(url, opts, shuffle=False, manifest={"signers": [key.public]})
    seen = []
    with pytest.raises(M.ManifestError) as ei:
        for s in ds:
            seen.append(s["__key__"])
    assert ei.value.reason == "modified" and ei.value.path.endswith("shard-1.tar")
    assert len(seen) == 40  # samples of a shard stream before its end; the digest fails at the end
    # a swapped tar shard fails at open, before any of its samples
    M.create(fs, str(root), key, version=3)
    shutil.copyfile(root / "shard-0.tar", root / "shard-1.tar")
    with pytest.raises(M.ManifestError) as ei:
        EncryptedTarDataset(url, opts, shuffle=False, manifest={"signers": [key.public]})
    assert ei.value.reason == "swapped"


def test_manifest_needs_encrypted_urls(dataset, tmp_path):
    _, root, _, key, _ = dataset
    from encfs.loaders import EncryptedFileDataset

    (tmp_path / "p.bin").write_bytes(b"x")
    with pytest.raises(M.ManifestError):
        EncryptedFileDataset(f"file://{tmp_path}/p.bin", manifest={"signers": [key.public]})
    with pytest.raises(ValueError):
        EncryptedFileDataset(f"encfs::file://{root}/val/v.bin", manifest={"signer": [key.public]})


# -- CLI ----------------------------------------------------------------------------------------------

def encfs_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ENCFS_KEY"}
    return subprocess.run([sys.executable, "-m", "encfs.cli", *args], capture_output=True, text=True, timeout=120, env=env)


def test_cli_keygen_create_verify(dataset, tmp_path):
    fs, root, _, _, keyref = dataset
    signer = tmp_path / "signer.key"
    r = encfs_cli("manifest", "keygen", "-o", str(signer))
    assert r.returncode == 0, r.stderr
    pub = r.stdout.strip()
    assert pub.startswith("ed25519:") and stat.S_IMODE(os.stat(signer).st_mode) == 0o600
    secret = signer.read_text().splitlines()[-1].split(":", 1)[1]
    r = encfs_cli("manifest", "create", str(root), "--sign", str(signer), "-k", keyref, "--version", "3")
    assert r.returncode == 0, r.stderr
    assert "version 3" in r.stderr and secret not in r.stdout + r.stderr
    r = encfs_cli("manifest", "verify", str(root), "--signer", pub, "-k", keyref, "--min-version", "3")
    assert r.returncode == 0, r.stderr
    assert "ok: 4 files" in r.stderr
    shutil.copyfile(root / "train/shard-1.bin", root / "train/shard-2.bin")
    (root / "val/v.bin").unlink()
    r = encfs_cli("manifest", "verify", str(root), "--signer", pub, "-k", keyref, "--json")
    assert r.returncode == 1
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert {(x["path"], x["reason"]) for x in rows[:-1]} == {("train/shard-2.bin", "swapped"), ("val/v.bin", "missing")}
    assert rows[-1]["ok"] is False
    r = encfs_cli("manifest", "verify", str(root), "--signer", pub, "-k", keyref, "--min-version", "4")
    assert r.returncode == 1 and "old-version" in r.stderr and secret not in r.stdout + r.stderr
    r = encfs_cli("manifest", "create", str(root), "--sign", str(signer), "-k", keyref, "--version", "2")
    assert r.returncode == 1 and "version-not-increasing" in r.stderr


def test_cli_plain_manifest_and_wrong_signer(dataset, tmp_path):
    fs, root, _, _, keyref = dataset
    signer = tmp_path / "signer.key"
    write_signing_key(str(signer), SigningKey.generate())
    r = encfs_cli("manifest", "create", str(root), "--sign", str(signer), "-k", keyref, "--plain")
    assert r.returncode == 0, r.stderr
    assert (root / M.MANIFEST_NAME).read_bytes().startswith(M.FORMAT_LINE)
    r = encfs_cli("manifest", "verify", str(root), "--signer", SigningKey.generate().public, "-k", keyref)
    assert r.returncode == 1 and "untrusted-signer" in r.stderr
    r = encfs_cli("manifest", "pubkey", str(signer))
    assert r.returncode == 0 and r.stdout.strip() == SigningKey.load(str(signer)).public


def test_cli_manifest_requires_writer_signatures_when_asked(dataset, tmp_path, signer):
    """``--writer-signer``: a file no trusted writer signed (one planted by a holder of a public
    recipient key, say) is refused while the manifest is made, rather than hashed into it."""
    fs, root, _, _, keyref = dataset
    wkey, wpath = signer
    mkey = tmp_path / "m.key"
    write_signing_key(str(mkey), SigningKey.generate())
    signed = EncFileSystem(target_protocol="file", key=keyref, sign_with=wpath, skip_instance_cache=True)
    for rel in SIZES:  # every file written again by the trusted writer
        signed.pipe_file(str(root / rel), fs.cat_file(str(root / rel)))
    r = encfs_cli("manifest", "create", str(root), "--sign", str(mkey), "-k", keyref, "--writer-signer", wkey.public)
    assert r.returncode == 0, r.stderr
    fs.pipe_file(str(root / "train" / "planted.bin"), b"x" * 64)  # unsigned
    r = encfs_cli("manifest", "create", str(root), "--sign", str(mkey), "-k", keyref, "--writer-signer", wkey.public)
    assert r.returncode != 0 and "planted.bin" in r.stderr and "signed" in r.stderr
