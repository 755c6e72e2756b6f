"""Outside audit of writer signatures (the ``sig`` stanza, docs/FORMAT.md §1.5).

Each test is one check. Tests marked ``FINDING`` fail against the code audited (84bdd0e..HEAD)
and pass once the finding is fixed; the others pin behaviour that was checked and found right.
Attackers modelled: one who controls storage (rewrites any byte of any object), one who holds
only a recipient's *public* key, and a user who configures the options.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pytest

from encfs import format as fmt
from encfs.errors import EncfsError, FormatError, IntegrityError, KeyReferenceError, NoMatchingKeyError, SignatureError
from encfs.filesystem import EncFileSystem
from encfs.header import unlock
from encfs.keys import KeyRing, load_reference, sig
from encfs.signing import SigningKey, VerifyKey, write_signing_key

from .test_signatures import DATA, fs, signed_and_forged  # noqa: F401  (signed_and_forged: a fixture)

L = 2**252 + 27742317777372353535851937790883648493  # Ed25519 group order


def each_signature(change):
    """A ``reseal`` edit that replaces every ``sig`` stanza ``s`` with ``change(s)``."""
    return lambda stanzas, header, commitment: [change(s) if sig.is_signature(s) else s for s in stanzas]


def reseal(path: Path, keyref: str, edit) -> None:
    """Rewrite ``path``'s header with ``edit(header, commitment)`` applied to its stanza list,
    with a *valid* MAC (the strongest storage attacker: one who also holds the file key)."""
    raw = bytearray(path.read_bytes())
    header = fmt.parse(bytes(raw))
    h = header.length
    commitment = bytes(raw[h + 24 : h + 56])
    file_key = unlock(header, KeyRing(keyref))
    try:
        header.stanzas = edit(list(header.stanzas), header, commitment)
        raw[:h] = fmt.seal(header, file_key, h)
    finally:
        file_key.wipe()
    path.write_bytes(bytes(raw))


def cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "encfs.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120, env=env)


# ---------------------------------------------------------------------------------------------
# FINDINGS
# ---------------------------------------------------------------------------------------------


def test_audit_allow_plaintext_with_signers_releases_unsigned_bytes(tmp_path, keyref, signer):
    """signers= promises "every file opened must carry a valid signature by one of them", yet with
    allow_plaintext=True a storage attacker replaces a signed file by any bytes that do not start
    with the encfs magic and the reader returns them. Either the combination is a ConfigError or
    a non-encfs file is refused (SignatureError) while signers are set."""
    key, path = signer
    target = tmp_path / "a"
    fs(key=keyref, sign_with=path).pipe_file(str(target), DATA)
    target.write_bytes(b"attacker-chosen bytes, no magic")
    try:
        reader = fs(key=keyref, signers=[key.public], allow_plaintext=True)
    except (EncfsError, KeyReferenceError):
        return  # fixed by refusing the combination
    with pytest.raises(IntegrityError):
        reader.cat_file(str(target))


def test_audit_cli_decrypt_allow_plaintext_with_signer_copies_unsigned_file(tmp_path, keyref, signer):
    """The same through the CLI: ``decrypt --allow-plaintext --signer`` writes an unsigned
    (plaintext, attacker-supplied) file to the output."""
    key, _ = signer
    (tmp_path / "in.enc").write_bytes(b"attacker-chosen bytes, no magic")
    res = cli("decrypt", "-k", keyref, "--signer", key.public, "--allow-plaintext", "--no-progress", "in.enc", "out", cwd=tmp_path)
    assert res.returncode != 0 and not (tmp_path / "out").exists(), (res.returncode, res.stderr)


def test_rewrap_removing_last_recipient_of_signed_file_is_refused(tmp_path, keyref, signer):
    """Was a finding at e106fb5: rewrap refuses "to remove every recipient" but counted a ``sig``
    stanza as a recipient, so removing the only real recipient of a signed file left a header
    holding only a signature (nobody could open it). Fixed by aed7284 (check_per_header: a
    recipient besides signatures), which this pins."""
    from fsspec.implementations.local import LocalFileSystem

    from encfs.keys.base import key_label
    from encfs.rewrap import rewrap

    _, path = signer
    target = tmp_path / "a"
    fs(key=keyref, sign_with=path).pipe_file(str(target), DATA)
    with pytest.raises(EncfsError):
        rewrap(LocalFileSystem(), str(target), KeyRing(keyref), remove=[key_label(load_reference(keyref))])
    assert fs(key=keyref).cat_file(str(target)) == DATA


def test_header_with_only_sig_stanzas_is_a_format_error(tmp_path, keyref, signer):
    """§1.5: "at least one recipient stanza besides" (a format error otherwise). Was a finding
    at e106fb5 (a sig-only header sealed; readers said NoMatchingKeyError); fixed by aed7284."""
    key, _ = signer
    target = tmp_path / "a"
    fs(key=keyref).pipe_file(str(target), DATA)
    before = target.read_bytes()
    with pytest.raises(FormatError):
        reseal(target, keyref, lambda stanzas, header, commitment: [sig.sign(key, header.context, commitment)])
    assert target.read_bytes() == before


def test_sig_only_header_read_is_format_error(tmp_path, keyref, signer):
    """Reader side of the same rule: a storage attacker strips every recipient stanza of a signed
    file; the reader says FormatError (fixed by aed7284), with and without signers."""
    key, path = signer
    target = tmp_path / "a"
    fs(key=keyref, sign_with=path).pipe_file(str(target), DATA)
    raw = bytearray(target.read_bytes())
    header = fmt.parse(bytes(raw))
    sigs = [s for s in header.stanzas if sig.is_signature(s)]
    body = struct.pack(">H", len(sigs)) + b"".join(s.encode() for s in sigs)
    new = raw[:32] + body + bytes(32)
    raw[: header.length] = new + bytes(header.length - len(new))
    target.write_bytes(bytes(raw))
    with pytest.raises(FormatError):
        fs(key=keyref, signers=[key.public]).cat_file(str(target))
    with pytest.raises(FormatError):
        fs(key=keyref).cat_file(str(target))


def test_audit_rewrap_ignores_signers(tmp_path, keyref, other_keyref, signer):
    """``encfs rewrap`` (and revoke) accept ``--signer`` (they share the decrypt key options) and
    the keyring carries the signers, but rewrap unlocks with ``unlock`` and never checks the
    signature: a forged, unsigned file is granted to a new recipient while the operator believed
    only trusted writers' files would be touched. Either check (``keyring.check_signature``
    before ``unlock`` in ``_reheader``) or refuse ``--signer`` on rewrap/revoke."""
    key, _ = signer
    target = tmp_path / "forged"
    fs(key=keyref).pipe_file(str(target), b"forged")  # unsigned
    res = cli("rewrap", "-k", keyref, "--signer", key.public, "--add", other_keyref, str(target), cwd=tmp_path)
    assert res.returncode != 0, res.stderr
    with pytest.raises(NoMatchingKeyError):
        fs(key=other_keyref).cat_file(str(target))


def test_audit_verify_key_objects_do_not_pickle(tmp_path, keyref, signer):
    """``signers=`` accepts ``VerifyKey`` objects (``_trusted_signers``), but a VerifyKey holds a
    pyca key object and does not pickle, so such a filesystem (or loader storage_options) cannot
    go to Dask / spawn DataLoader workers. It fails closed (TypeError), but a SigningKey refuses
    pickling on purpose and a *public* key has no reason to: ``__reduce__`` -> (VerifyKey, (raw,))."""
    key, _ = signer
    vk = pickle.loads(pickle.dumps(key.verify_key))
    assert vk == key.verify_key
    reader = pickle.loads(pickle.dumps(fs(key=keyref, signers=[key.verify_key])))
    assert reader.keyring.signers == (key.verify_key,)


@pytest.mark.parametrize("scenario", ["signer_without_sign", "rotate_signing_key"])
def test_audit_cli_reencrypt_with_signer_deletes_every_file(tmp_path, keyref, signer, scenario):
    """DATA LOSS. ``encfs reencrypt --signer PUB`` (without ``--sign``, or with ``--sign`` of a new
    key, the natural key-rotation command "check the old signer, re-sign with the new one") writes
    each file in place with a new file key that PUB did not sign, then reads it back through the
    *same* filesystem (signers=PUB): SignatureError; migrate.check_object then deletes the
    destination, which in place is the only copy. Every file of the dataset is gone and a rerun
    says "0 object(s)". Fix: reencrypt must read back through a filesystem that trusts the new
    signer (or none), refuse ``--signer`` without a matching ``--sign`` up front, and an in-place
    check failure must never delete (leave the file, mark it failed)."""
    key, path = signer
    d = tmp_path / "d"
    d.mkdir()
    w = fs(key=keyref, sign_with=path)
    for i in range(2):
        w.pipe_file(str(d / f"f{i}"), DATA[: 100 * (i + 1)])
    extra: list[str] = []
    if scenario == "rotate_signing_key":
        new = tmp_path / "new.sign"
        write_signing_key(str(new), SigningKey.generate())
        extra = ["--sign", str(new)]
    res = cli("reencrypt", "-k", keyref, "--signer", key.public, *extra, "--journal", str(tmp_path / "j.db"), "--no-progress", str(d), cwd=tmp_path)
    left = sorted(p.name for p in d.iterdir())
    assert left == ["f0", "f1"], (left, res.returncode, res.stderr)


# ---------------------------------------------------------------------------------------------
# Checks that passed (kept as regression tests)
# ---------------------------------------------------------------------------------------------


def test_every_filesystem_read_path_refuses_forged(signed_and_forged, tmp_path):
    key, idref, root = signed_and_forged
    strict = fs(identities=idref, signers=[key.public])
    real, forged = str(root / "real"), str(root / "forged")
    assert strict.cat_file(real) == DATA
    calls = [
        lambda p: strict.open(p, "rb").read(),
        lambda p: strict.open(p, "r", encoding="latin-1").read(),
        lambda p: strict.cat_file(p, start=5, end=10),
        lambda p: strict.cat(p),
        lambda p: strict.head(p, 10),
        lambda p: strict.tail(p, 10),
        lambda p: strict.read_block(p, 0, 10),
        lambda p: strict.read_bytes(p),
        lambda p: strict.open_reader(p),
        lambda p: strict.get_file(p, str(tmp_path / "out")),
        lambda p: strict.get(p, str(tmp_path / "out2")),
    ]
    for call in calls:
        with pytest.raises(SignatureError):
            call(forged)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()
    out = strict.cat_ranges([forged, real], [0, 0], [4, 4])
    assert isinstance(out[0], SignatureError) and out[1] == DATA[:4]
    with pytest.raises(SignatureError):
        strict.cat_ranges([forged], [0], [4], on_error="raise")


def test_fsspec_url_and_instance_cache_keep_signers_apart(signed_and_forged):
    """Two filesystems that differ only in signers are never the same cached instance, and
    ``fsspec.open`` / ``url_to_fs`` pass signers through."""
    key, idref, root = signed_and_forged
    plain = fsspec.filesystem("encfs", target_protocol="file", identities=idref)
    strict = fsspec.filesystem("encfs", target_protocol="file", identities=idref, signers=[key.public])
    assert plain is not strict and not plain.keyring.signers and strict.keyring.signers
    assert plain.cat_file(str(root / "forged")) == b"poison" * 1000
    with pytest.raises(SignatureError):
        strict.cat_file(str(root / "forged"))
    with pytest.raises(SignatureError):
        with fsspec.open(f"encfs::file://{root / 'forged'}", "rb", encfs={"identities": idref, "signers": key.public}) as f:
            f.read()
    again = fsspec.filesystem("encfs", target_protocol="file", identities=idref)
    assert again is plain  # cached, and still without signers


def test_pickled_and_forked_reader_keeps_signers(signed_and_forged):
    key, idref, root = signed_and_forged
    strict = fs(identities=idref, signers=key.public)
    again = pickle.loads(pickle.dumps(strict))
    with pytest.raises(SignatureError):
        again.cat_file(str(root / "forged"))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            strict.cat_file(str(root / "forged"))
            os.write(w, b"R")
        except SignatureError:
            os.write(w, b"S")
        except BaseException:
            os.write(w, b"E")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(r, 1) == b"S"


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_keep_signers(signed_and_forged, context):
    torch = pytest.importorskip("torch")
    from encfs.loaders import EncryptedFileDataset

    key, idref, root = signed_and_forged
    opts = {"encfs": {"identities": idref, "signers": [key.public]}}
    with pytest.raises(SignatureError):
        EncryptedFileDataset([f"encfs::file://{root / 'forged'}"], storage_options=opts)
    ds = EncryptedFileDataset([f"encfs::file://{root / 'real'}"], storage_options=opts)
    # The file is swapped for the forged one after the dataset was made: workers re-open it.
    os.replace(root / "forged", root / "real")
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context=context)
    with pytest.raises(Exception) as e:
        list(loader)
    assert "SignatureError" in str(e.value) or isinstance(e.value, SignatureError), repr(e.value)


def test_loaders_refuse_unsigned_shard(tmp_path, keyref, signer):
    from encfs.loaders import EncryptedFileDataset, EncryptedNpyDataset, EncryptedParquetDataset, EncryptedRecordDataset, EncryptedTarDataset, read_batch
    from encfs.loaders.shards import ShardSet

    key, path = signer
    p = str(tmp_path / "u.bin")
    fs(key=keyref).pipe_file(p, np.arange(64, dtype=np.float32).tobytes())
    url = f"encfs::file://{p}"
    opts = {"encfs": {"key": keyref, "signers": [key.public]}}
    for make in (
        lambda: ShardSet(url, opts),
        lambda: EncryptedRecordDataset([url], (8,), np.float32, storage_options=opts),
        lambda: EncryptedFileDataset([url], storage_options=opts),
        lambda: EncryptedNpyDataset([url], storage_options=opts),
        lambda: EncryptedParquetDataset([url], storage_options=opts),
        lambda: EncryptedTarDataset([url], storage_options=opts),
    ):
        with pytest.raises(SignatureError):
            make()
    del read_batch


def test_several_sig_stanzas(tmp_path, keyref, signer):
    """A trusted signer's bad signature refuses the file even next to a good one; a duplicate
    valid one is fine; a malformed stanza of an untrusted key is still a FormatError; more than
    four sig stanzas are refused even when one is trusted and valid."""
    key, path = signer
    other = SigningKey.generate()
    target = tmp_path / "a"
    fs(key=keyref, sign_with=path).pipe_file(str(target), DATA)
    pristine = target.read_bytes()
    reader = fs(key=keyref, signers=[key.public])

    def bad_copy(stanzas, header, commitment):
        s = [x for x in stanzas if sig.is_signature(x)][0]
        return stanzas + [fmt.Stanza("sig", s.key_id, s.params, bytes(64))]

    reseal(target, keyref, bad_copy)
    with pytest.raises(SignatureError, match="does not verify"):
        reader.cat_file(str(target))
    target.write_bytes(pristine)
    reseal(target, keyref, lambda st, h, c: st + [x for x in st if sig.is_signature(x)])
    assert reader.cat_file(str(target)) == DATA
    target.write_bytes(pristine)
    reseal(target, keyref, lambda st, h, c: st + [fmt.Stanza("sig", bytes(8), other.verify_key.raw, bytes(64))])
    with pytest.raises(FormatError):
        reader.cat_file(str(target))
    target.write_bytes(pristine)
    extra = [sig.sign(SigningKey.generate(), fmt.parse(pristine).context, pristine[fmt.parse(pristine).length + 24 : fmt.parse(pristine).length + 56]) for _ in range(4)]
    raw = bytearray(pristine)
    header = fmt.parse(pristine)
    header.stanzas += extra
    body = struct.pack(">H", len(header.stanzas)) + b"".join(s.encode() for s in header.stanzas)
    new = raw[:32] + body + bytes(32)
    raw[: header.length] = new + bytes(header.length - len(new))
    target.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="at most 4"):
        reader.cat_file(str(target))
    with pytest.raises(FormatError, match="at most 4"):
        fs(key=keyref).cat_file(str(target))


def test_trusted_key_id_with_other_public_key_is_format_error(tmp_path, keyref, signer):
    key, path = signer
    other = SigningKey.generate()
    target = tmp_path / "a"
    fs(key=keyref).pipe_file(str(target), DATA)

    def spoof(stanzas, header, commitment):
        s = sig.sign(other, header.context, commitment)
        return stanzas + [fmt.Stanza("sig", sig.key_id(key.verify_key.raw), s.params, s.body)]

    reseal(target, keyref, spoof)
    with pytest.raises(FormatError, match="key id is not the id"):
        fs(key=keyref, signers=[key.public]).cat_file(str(target))


@pytest.mark.parametrize("change", ["key_id", "params", "body_short", "body_long"])
def test_oversized_and_undersized_fields(tmp_path, keyref, signer, change):
    key, path = signer
    target = tmp_path / "a"
    fs(key=keyref, sign_with=path).pipe_file(str(target), DATA)

    def edit(s):
        return {
            "key_id": fmt.Stanza("sig", s.key_id + b"\0", s.params, s.body),
            "params": fmt.Stanza("sig", s.key_id, s.params + b"\0", s.body),
            "body_short": fmt.Stanza("sig", s.key_id, s.params, s.body[:63]),
            "body_long": fmt.Stanza("sig", s.key_id, s.params, s.body + b"\0"),
        }[change]

    reseal(target, keyref, each_signature(edit))
    with pytest.raises(FormatError, match="malformed sig"):
        fs(key=keyref, signers=[key.public]).cat_file(str(target))


def test_signature_malleability_s_plus_l_refused(tmp_path, keyref, signer):
    """RFC 8032 requires S < L; a signature with S + L (same R) must not verify (pyca/OpenSSL)."""
    key, path = signer
    target = tmp_path / "a"
    fs(key=keyref, sign_with=path).pipe_file(str(target), DATA)

    def malleate(s):
        r, S = s.body[:32], int.from_bytes(s.body[32:], "little")
        return fmt.Stanza("sig", s.key_id, s.params, r + (S + L).to_bytes(32, "little"))

    reseal(target, keyref, each_signature(malleate))
    sig._verifies.cache_clear()
    with pytest.raises(SignatureError, match="does not verify"):
        fs(key=keyref, signers=[key.public]).cat_file(str(target))


def test_verification_cache_cannot_be_poisoned(tmp_path, keyref, signer):
    """The lru_cache is keyed by (public key, signature, message): a verified (True) entry for a
    genuine file never answers for another message or another signature, and its inputs are
    always bytes (hashable, compared by value)."""
    key, path = signer
    fs(key=keyref, sign_with=path).pipe_file(str(tmp_path / "a"), DATA)
    reader = fs(key=keyref, signers=[key.public])
    assert reader.cat_file(str(tmp_path / "a")) == DATA  # cached True
    raw = (tmp_path / "a").read_bytes()
    header = fmt.parse(raw)
    s = [x for x in header.stanzas if sig.is_signature(x)][0]
    h = header.length
    good = sig.message(header.context, raw[h + 24 : h + 56])
    assert sig._verifies(key.verify_key.raw, s.body, good)
    assert not sig._verifies(key.verify_key.raw, s.body, good[:-1] + bytes([good[-1] ^ 1]))
    assert type(s.body) is bytes and type(s.params) is bytes
    # The same signature and message under another trusted key: not the cached answer.
    other = SigningKey.generate()
    assert not sig._verifies(other.verify_key.raw, s.body, good)


def test_signature_ties_to_payload_not_to_path(tmp_path, keyref, signer):
    """What a signature does not cover (documenting, not a defect of the code): a storage attacker
    swaps two signed files, or rolls a path back to an older signed version; both read as
    authentic. Only a manifest binds paths and versions. docs/MANIFESTS.md should say so in the
    "Signed writers" section."""
    key, path = signer
    w = fs(key=keyref, sign_with=path)
    w.pipe_file(str(tmp_path / "a"), b"version 1")
    old = (tmp_path / "a").read_bytes()
    w.pipe_file(str(tmp_path / "a"), b"version 2")
    (tmp_path / "a").write_bytes(old)
    assert fs(key=keyref, signers=[key.public]).cat_file(str(tmp_path / "a")) == b"version 1"


def test_inspect_signature_ok_without_key_overclaims(tmp_path, keyref, signer):
    """``inspect --signer`` without a key prints "writer signature OK" for a file whose payload
    was replaced (and whose recipient stanzas could be anything): it checks the signature over
    the *stored* commitment only. Documented here; the wording should say "over the stored key
    commitment; payload and header MAC not checked"."""
    key, path = signer
    target = tmp_path / "a.enc"
    fs(key=keyref, sign_with=path).pipe_file(str(target), DATA)
    raw = bytearray(target.read_bytes())
    h = fmt.parse(bytes(raw)).length
    raw[h + 56 :] = os.urandom(len(raw) - h - 56)
    target.write_bytes(bytes(raw))
    res = cli("inspect", "--signer", key.public, "a.enc", cwd=tmp_path)
    assert res.returncode == 0 and "writer signature OK" in res.stdout
    with pytest.raises(IntegrityError):
        fs(key=keyref, signers=[key.public]).cat_file(str(target))


def test_signers_configuration_values(tmp_path, keyref, signer):
    key, path = signer
    for bad in ([], "", " , ", [""], [None], b"x", 0, False, {}, ["ed25519:" + "A" * 43 + "x"]):
        with pytest.raises(KeyReferenceError):
            fs(key=keyref, signers=bad)
    pub = tmp_path / "w.pub"
    pub.write_text(f"# writer\n{key.public}\n")
    os.chmod(pub, 0o644)  # a public key file may be world-readable
    assert fs(key=keyref, signers=str(pub)).keyring.signers == (key.verify_key,)
    assert fs(key=keyref, signers=path).keyring.signers == (key.verify_key,)


def test_no_key_bytes_in_reprs_or_errors(tmp_path, keyref, signer, capsys):
    key, path = signer
    secret_line = [ln for ln in Path(path).read_text().splitlines() if ln.startswith("encfs-ed25519-signing-v1:")][0]
    seed = secret_line.split(":", 1)[1]
    w = fs(key=keyref, sign_with=path)
    w.pipe_file(str(tmp_path / "a"), DATA)
    texts = [repr(w.keyring), repr(w.keyring.signing_key()), str(w.storage_options), repr(w)]
    broken = tmp_path / "broken.sign"
    broken.write_text(secret_line + "\n" + secret_line + "\n")
    for bad in (lambda: SigningKey.load(str(broken)), lambda: VerifyKey.parse(str(broken) + "x")):
        with pytest.raises(KeyReferenceError) as e:
            bad()
        texts.append(str(e.value))
    # a signer file with no public comment: the private key is loaded just to get the public one
    nocomment = tmp_path / "nocomment.sign"
    nocomment.write_text(secret_line + "\n")
    assert VerifyKey.parse(str(nocomment)) == key.verify_key
    fs(key=keyref).pipe_file(str(tmp_path / "u"), DATA)
    with pytest.raises(SignatureError) as e:
        fs(key=keyref, signers=str(nocomment)).cat_file(str(tmp_path / "u"))
    texts.append(str(e.value))
    out = capsys.readouterr()
    texts += [out.out, out.err]
    assert not any(seed in t for t in texts)


def test_s3_read_and_rewrap_paths(s3, keyref, other_keyref, signer):
    """S3 (moto): the ranged-read opener (RemoteObject, cached heads) checks signatures, and the
    server-side rewrap keeps the signature valid."""
    from encfs.keys.base import key_label
    from encfs.rewrap import rewrap

    s3fs_, bucket, opts = s3
    key, path = signer
    w = EncFileSystem(fs=s3fs_, key=keyref, sign_with=path, skip_instance_cache=True)
    u = EncFileSystem(fs=s3fs_, key=keyref, skip_instance_cache=True)
    big = os.urandom(300 * 1024)
    w.pipe_file(f"{bucket}/s", big)
    u.pipe_file(f"{bucket}/u", big)
    strict = EncFileSystem(fs=s3fs_, key=keyref, signers=[key.public], skip_instance_cache=True)
    assert strict.cat_file(f"{bucket}/s") == big
    for _ in range(2):  # second time from the cached head
        with pytest.raises(SignatureError):
            strict.cat_file(f"{bucket}/u")
    # Storage attacker overwrites the signed object with the unsigned one (same size).
    s3fs_.pipe_file(f"{bucket}/s", s3fs_.cat_file(f"{bucket}/u"))
    s3fs_.invalidate_cache()
    with pytest.raises(SignatureError):
        strict.cat_file(f"{bucket}/s")
    w.pipe_file(f"{bucket}/s", big)
    rewrap(s3fs_, f"{bucket}/s", KeyRing(keyref), add=[load_reference(other_keyref)])
    rewrap(s3fs_, f"{bucket}/s", KeyRing(other_keyref), remove=[key_label(load_reference(keyref))])
    s3fs_.invalidate_cache()
    assert EncFileSystem(fs=s3fs_, key=other_keyref, signers=[key.public], skip_instance_cache=True).cat_file(f"{bucket}/s") == big


def test_cli_read_commands_refuse_unsigned(tmp_path, keyref, signer):
    key, path = signer
    fs(key=keyref).pipe_file(str(tmp_path / "u.enc"), DATA)
    res = cli("verify", "-k", keyref, "--signer", key.public, "--no-progress", "u.enc", cwd=tmp_path)
    assert res.returncode == 1 and "SignatureError" in res.stdout
    res = subprocess.run(
        [sys.executable, "-m", "encfs.cli", "decrypt", "-k", keyref, "--signer", key.public, "-", "-"],
        input=(tmp_path / "u.enc").read_bytes(), capture_output=True, cwd=tmp_path, timeout=120,
    )
    assert res.returncode != 0 and res.stdout == b""
    src = tmp_path / "src"
    src.mkdir()
    (src / "u").write_bytes((tmp_path / "u.enc").read_bytes())
    res = cli("migrate", "-k", keyref, "--signer", key.public, "--journal", str(tmp_path / "j.db"), "--no-progress",
              f"encfs::file://{src}", str(tmp_path / "plainout"), cwd=tmp_path)
    assert res.returncode != 0
    assert not (tmp_path / "plainout" / "u").exists()


def _tar_bytes() -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in (("s0.txt", b"forged sample"),):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _import_opener(_worker_id: int) -> None:
    """What a training script's top-level ``from encfs.loaders import webdataset`` does in a spawn
    worker (the main module is imported again there as ``__mp_main__``; ``register(...)`` sits
    under ``if __name__ == "__main__":`` as spawn requires, so it does not run)."""
    import encfs.loaders.webdataset  # noqa: F401


def test_audit_webdataset_spawn_dataloader_releases_unsigned_shard(tmp_path, keyref, signer, monkeypatch):
    """The previous finding end to end: ``register(key=..., encfs={"signers": [...]})``, a list of
    plain URLs, ``$ENCFS_KEY`` in the environment, a spawn DataLoader worker that has the opener
    (the script imports encfs.loaders.webdataset at top level): the parent refuses the forged
    shard, the worker yields its samples. (Without the import the worker fails closed with "no
    gopen handler".)"""
    wds = pytest.importorskip("webdataset")
    torch = pytest.importorskip("torch")
    from encfs.loaders import webdataset as encfs_wds

    key, _ = signer
    shard = tmp_path / "shard-0.tar"
    fs(key=keyref).pipe_file(str(shard), _tar_bytes())  # unsigned
    urls = [f"encfs::file://{shard}"]
    monkeypatch.setenv("ENCFS_KEY", keyref)
    try:
        encfs_wds.register(key=keyref, encfs={"signers": [key.public]})
        with pytest.raises(SignatureError):
            next(iter(wds.WebDataset(urls, shardshuffle=False)))
        loader = torch.utils.data.DataLoader(wds.WebDataset(urls, shardshuffle=False), batch_size=None, num_workers=1, multiprocessing_context="spawn",
                                             worker_init_fn=_import_opener)
        try:
            got = list(loader)
        except Exception as e:  # refused in the worker: the URL carries no options there (ConfigError)
            assert "ConfigError" in repr(e) and "expand_urls" in str(e), repr(e)
            return
        pytest.fail(f"spawn worker released an unsigned shard: {got!r}")
    finally:
        encfs_wds._options.clear()


def test_hf_datasets_args_keep_signers(signed_and_forged):
    from encfs.hf import datasets_args

    key, idref, root = signed_and_forged
    files, opts = datasets_args([f"encfs::file://{root / 'forged'}"], {"encfs": {"identities": idref, "signers": [key.public]}})
    assert opts["encfs"]["signers"] == [key.public]
    with pytest.raises(SignatureError):
        with fsspec.open(files[0], "rb", **opts) as f:
            f.read()


def test_audit_signer_file_trusts_comment_over_the_key_it_holds(tmp_path, keyref, signer):
    """``signers=PATH`` of a signing key file takes the first ``ed25519:`` it finds, the comment
    line, before looking at the key itself; a file whose comment does not match its key (edited,
    or a comment copied from another key) makes the reader trust the comment's key, not the
    key in the file. Low: fails closed unless the comment names an attacker's key. Fix: when a
    signing line is present, derive the public key from it (and refuse a mismatching comment)."""
    key, path = signer
    other = SigningKey.generate()
    text = Path(path).read_text().replace(key.public, other.public)
    bad = tmp_path / "mismatch.sign"
    bad.write_text(text)
    assert SigningKey.load(str(bad)).public == key.public
    try:
        got = VerifyKey.parse(str(bad))
    except KeyReferenceError:
        return  # fixed by refusing the mismatch
    assert got == key.verify_key


SMALL_ORDER_IDENTITY = bytes([1] + [0] * 31)  # the neutral point's encoding: order 1


def test_audit_encrypted_manifest_unreadable_by_loader_with_signers(tmp_path, keyref, signer):
    """``encfs manifest create`` has neither ``--signer`` nor a writer ``--sign`` for the manifest
    file itself (its ``--sign`` is the manifest key). Two consequences:
    (1) a file dropped into the prefix by a holder of a public recipient key is hashed and signed
        into the manifest with no way to refuse it (``--signer`` is rejected by argparse), so the
        manifest launders the forgery for manifest-only readers;
    (2) the encrypted manifest file carries no writer signature, so a loader configured with both
        ``signers=`` and ``manifest=`` (the combination docs/MANIFESTS.md recommends) cannot read
        the manifest: every such dataset fails with "unreadable ... SignatureError".
    Fix: ``--signer`` (trust check while hashing) and writer-sign the manifest file (reuse
    ``--sign``'s key via ``sign_with``, or a separate option); or read the manifest file without
    the writer-signature check (it carries its own Ed25519 signature)."""
    from encfs.loaders.shards import ShardSet

    key, path = signer
    d = tmp_path / "ds"
    d.mkdir()
    fs(key=keyref, sign_with=path).pipe_file(str(d / "a.bin"), DATA)
    mkey = tmp_path / "manifest.sign"
    mk = SigningKey.generate()
    write_signing_key(str(mkey), mk)
    res = cli("manifest", "create", "-k", keyref, "--sign", str(mkey), str(d), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    opts = {"encfs": {"key": keyref, "signers": [key.public]}}
    shards = ShardSet(f"encfs::file://{d}/a.bin", opts, manifest={"signers": [mk.public], "prefix": str(d)})
    assert shards.size(0) == len(DATA)


def test_python_manifest_create_with_signers_refuses_forged_file(signed_and_forged, tmp_path):
    """Through the Python API the filesystem's signers do apply while hashing."""
    from encfs import manifest

    key, idref, root = signed_and_forged
    d = root / "ds"
    d.mkdir()
    os.replace(root / "forged", d / "forged")
    with pytest.raises(Exception) as e:
        manifest.create(fs(identities=idref, signers=[key.public]), str(d), SigningKey.generate(), plain=True)
    assert "SignatureError" in repr(e.value) or isinstance(e.value, SignatureError) or "signature" in str(e.value), repr(e.value)


def test_audit_wipe_keys_keeps_the_loaded_signing_key(tmp_path, keyref, signer):
    """``EncFileSystem.wipe_keys()`` ("overwrite loaded key material now; it reloads from its
    references when needed") drops recipient/identity keys but keeps the loaded Ed25519 *private*
    signing key (KeyRing._signing_key) for the life of the filesystem. pyca keys cannot be
    overwritten, but the reference can be dropped so that it reloads from ``sign_with`` like the
    other keys. Low."""
    key, path = signer
    w = fs(key=keyref, sign_with=path)
    w.pipe_file(str(tmp_path / "a"), DATA)
    assert w.keyring._signing_key is not None
    w.wipe_keys()
    assert w.keyring._signing_key is None
    w.pipe_file(str(tmp_path / "b"), DATA)  # reloads
    assert fs(key=keyref, signers=[key.public]).cat_file(str(tmp_path / "b")) == DATA
