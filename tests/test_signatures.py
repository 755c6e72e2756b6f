"""Writer signatures (the ``sig`` stanza, docs/FORMAT.md §1.5): readers given trusted signer keys
refuse files nobody they trust signed, including files written by a holder of a public
recipient key; rewrap keeps signatures valid; every open path (filesystem, loaders, CLI)
honours ``signers``.

References: the plaintext written, the raw ciphertext bytes (stanzas parsed by offset), and
pyca/cryptography's Ed25519 verifying the stored signature on its own."""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from encfs import format as fmt
from encfs.errors import FormatError, IntegrityError, KeyReferenceError, NoMatchingKeyError, SignatureError
from encfs.filesystem import EncFileSystem
from encfs.keys import X25519Identity, key_file_text, public_reference
from encfs.signing import SigningKey, write_signing_key

from .conftest import write_key

DATA = os.urandom(3 * 16384 + 100)


def fs(**kw) -> EncFileSystem:
    return EncFileSystem(target_protocol="file", skip_instance_cache=True, **kw)


def stanzas(raw: bytes) -> list[tuple[int, str, bytes, bytes, bytes]]:
    """(offset, type, key id, params, body) of each stanza, parsed from the bytes by hand."""
    (count,) = struct.unpack_from(">H", raw, 32)
    pos, out = 34, []
    for _ in range(count):
        start = pos
        t = raw[pos + 1 : pos + 1 + raw[pos]].decode()
        pos += 1 + raw[pos]
        kid = raw[pos + 1 : pos + 1 + raw[pos]]
        pos += 1 + raw[pos]
        (n,) = struct.unpack_from(">H", raw, pos)
        params = raw[pos + 2 : pos + 2 + n]
        pos += 2 + n
        (n,) = struct.unpack_from(">H", raw, pos)
        body = raw[pos + 2 : pos + 2 + n]
        pos += 2 + n
        out.append((start, t, kid, params, body))
    return out


def test_signed_file_verifies_independently(tmp_path, keyref, signer):
    key, path = signer
    fs(key=keyref, sign_with=path).pipe_file(str(tmp_path / "a"), DATA)
    raw = (tmp_path / "a").read_bytes()
    sigs = [s for s in stanzas(raw) if s[1] == "sig"]
    assert len(sigs) == 1
    _, _, kid, public, signature = sigs[0]
    assert public == key.verify_key.raw
    assert kid == hashlib.sha256(b"encfs/v1 sig-key-id" + public).digest()[:8]
    h = int.from_bytes(raw[28:32], "big")
    Ed25519PublicKey.from_public_bytes(public).verify(signature, b"encfs/v1 writer-signature" + raw[:28] + raw[h + 24 : h + 56])
    assert fs(key=keyref, signers=[key.public]).cat_file(str(tmp_path / "a")) == DATA
    assert fs(key=keyref).cat_file(str(tmp_path / "a")) == DATA  # readers without signers: as before


@pytest.mark.parametrize("backend", ["python", "native"])
def test_unsigned_and_foreign_signed_refused(tmp_path, keyref, signer, backend):
    if backend == "native":
        from .conftest import require_native

        require_native()
    key, path = signer
    other = tmp_path / "other.sign"
    write_signing_key(str(other), SigningKey.generate())
    fs(key=keyref).pipe_file(str(tmp_path / "plain"), DATA)
    fs(key=keyref, sign_with=str(other)).pipe_file(str(tmp_path / "foreign"), DATA)
    reader = fs(key=keyref, signers=[key.public], backend=backend)
    with pytest.raises(SignatureError, match="carries no signature") as e:
        reader.cat_file(str(tmp_path / "plain"))
    assert e.value.signers == [] and isinstance(e.value, IntegrityError)
    with pytest.raises(SignatureError, match="signed by sig:") as e:
        reader.open(str(tmp_path / "foreign"), "rb")
    assert len(e.value.signers) == 1
    assert str(tmp_path / "foreign") in str(e.value)


@pytest.fixture
def signed_and_forged(tmp_path, signer):
    """A signed and an unsigned file to one X25519 identity; the forged one made by a holder of
    its public key only."""
    key, path = signer
    ident = X25519Identity.generate()
    (tmp_path / "id").write_text(key_file_text(ident))
    public = public_reference(ident.recipient.public)
    fs(recipients=public, sign_with=path).pipe_file(str(tmp_path / "real"), DATA)
    fs(recipients=public).pipe_file(str(tmp_path / "forged"), b"poison" * 1000)
    idref = f"keyfile:{tmp_path / 'id'}"
    return key, idref, tmp_path


def test_public_key_holder_cannot_forge(signed_and_forged):
    """The gap the issue names: anyone with the X25519 *public* key writes a file the identity
    holder reads as authentic. With signers configured it is refused."""
    key, idref, tmp_path = signed_and_forged
    naive = fs(identities=idref)
    assert naive.cat_file(str(tmp_path / "forged")) == b"poison" * 1000
    strict = fs(identities=idref, signers=key.public)
    assert strict.cat_file(str(tmp_path / "real")) == DATA
    with pytest.raises(SignatureError):
        strict.cat_file(str(tmp_path / "forged"))


def test_copied_signature_does_not_transfer(tmp_path, keyref, signer):
    """A forger copies a signed file's sig stanza (and even its file id) into a header of its own,
    with a valid MAC under its own file key: the signature covers the commitment, which a new
    file key changes."""
    key, path = signer
    fs(key=keyref, sign_with=path).pipe_file(str(tmp_path / "real"), DATA)
    raw = (tmp_path / "real").read_bytes()
    off, _, kid, params, body = [s for s in stanzas(raw) if s[1] == "sig"][0]
    forger = fs(key=keyref)
    forger.pipe_file(str(tmp_path / "mine"), b"poison")
    mine = bytearray((tmp_path / "mine").read_bytes())
    from encfs.header import unlock
    from encfs.keys import KeyRing

    header = fmt.parse(bytes(mine))
    file_key = unlock(header, KeyRing(keyref))
    header.stanzas.append(fmt.Stanza("sig", kid, params, body))
    mine[: header.length] = fmt.seal(header, file_key, header.length)
    file_key.wipe()
    (tmp_path / "mine").write_bytes(bytes(mine))
    assert forger.cat_file(str(tmp_path / "mine")) == b"poison"  # well-formed, MAC valid
    with pytest.raises(SignatureError, match="does not verify"):
        fs(key=keyref, signers=[key.public]).cat_file(str(tmp_path / "mine"))


def test_tampered_signature_refused_before_unwrap(tmp_path, keyref, other_keyref, signer):
    key, path = signer
    fs(key=keyref, sign_with=path).pipe_file(str(tmp_path / "a"), DATA)
    raw = bytearray((tmp_path / "a").read_bytes())
    off, _, kid, params, body = [s for s in stanzas(bytes(raw)) if s[1] == "sig"][0]
    raw[off + 1 + 3 + 1 + 8 + 2 + 32 + 2 + 5] ^= 1  # one bit of the signature
    (tmp_path / "a").write_bytes(bytes(raw))
    with pytest.raises(SignatureError, match="does not verify"):
        fs(key=keyref, signers=[key.public]).cat_file(str(tmp_path / "a"))
    with pytest.raises(IntegrityError, match="header MAC"):  # without signers, the MAC catches it
        fs(key=keyref).cat_file(str(tmp_path / "a"))
    # The signature is checked before any key is tried: a reader with the wrong key hears about
    # the signature, not about keys.
    fs(key=keyref).pipe_file(str(tmp_path / "b"), DATA)
    with pytest.raises(SignatureError):
        fs(key=other_keyref, signers=[key.public]).cat_file(str(tmp_path / "b"))
    with pytest.raises(NoMatchingKeyError):
        fs(key=other_keyref).cat_file(str(tmp_path / "b"))


def test_rewrap_keeps_signature(tmp_path, keyref, other_keyref, signer):
    from encfs.rewrap import rewrap

    key, path = signer
    target = str(tmp_path / "a")
    fs(key=keyref, sign_with=path).pipe_file(target, DATA)
    from encfs.keys import KeyRing, load_reference
    from encfs.keys.base import key_label
    from fsspec.implementations.local import LocalFileSystem

    local = LocalFileSystem()
    rewrap(local, target, KeyRing(keyref), add=[load_reference(other_keyref)])
    assert fs(key=other_keyref, signers=[key.public]).cat_file(target) == DATA
    rewrap(local, target, KeyRing(other_keyref), remove=[key_label(load_reference(keyref))], in_place=False)
    assert fs(key=other_keyref, signers=[key.public]).cat_file(target) == DATA
    assert [s[1] for s in stanzas((tmp_path / "a").read_bytes())].count("sig") == 1


def test_several_trusted_signers_and_cosigning(tmp_path, keyref, signer):
    key, path = signer
    a, b = SigningKey.generate(), SigningKey.generate()
    fs(key=keyref, sign_with=path).pipe_file(str(tmp_path / "f"), DATA)
    assert fs(key=keyref, signers=[a.public, key.public, b.public]).cat_file(str(tmp_path / "f")) == DATA
    assert fs(key=keyref, signers=f"{a.public},{key.public}").cat_file(str(tmp_path / "f")) == DATA
    assert fs(key=keyref, signers=path).cat_file(str(tmp_path / "f")) == DATA  # a signing key file names its public key


def test_limits_and_shapes(tmp_path, keyref, signer):
    from encfs.header import unlock
    from encfs.keys import KeyRing
    from encfs.keys import sig

    key, _ = signer
    fs(key=keyref).pipe_file(str(tmp_path / "a"), DATA)
    raw = bytearray((tmp_path / "a").read_bytes())
    header = fmt.parse(bytes(raw))
    h = header.length
    commitment = bytes(raw[h + 24 : h + 56])
    file_key = unlock(header, KeyRing(keyref))
    try:
        good = sig.sign(key, header.context, commitment)
        header.stanzas += [good] * 5
        with pytest.raises(FormatError, match="at most 4"):
            fmt.seal(header, file_key, h)
        header.stanzas = header.stanzas[:1] + [fmt.Stanza("sig", bytes(8), good.params, good.body)]
        raw[:h] = fmt.seal(header, file_key, h)
    finally:
        file_key.wipe()
    (tmp_path / "a").write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="key id is not the id"):
        fs(key=keyref, signers=[key.public]).cat_file(str(tmp_path / "a"))


def test_configuration_errors(tmp_path, keyref):
    with pytest.raises(KeyReferenceError, match="names no key"):
        fs(key=keyref, signers=[])
    with pytest.raises(KeyReferenceError):
        fs(key=keyref, signers=["ed25519:notbase64!"])
    with pytest.raises(KeyReferenceError):
        fs(key=keyref, signers=str(tmp_path / "missing.pub"))
    writer = fs(key=keyref, sign_with=str(tmp_path / "missing.sign"))
    with pytest.raises(KeyReferenceError, match="missing.sign"):
        writer.pipe_file(str(tmp_path / "x"), b"x")
    assert not list(tmp_path.glob("x*"))  # nothing written


def test_pickled_filesystem_keeps_signature_options(tmp_path, keyref, signer):
    key, path = signer
    writer = pickle.loads(pickle.dumps(fs(key=keyref, sign_with=path)))
    writer.pipe_file(str(tmp_path / "a"), DATA)
    reader = pickle.loads(pickle.dumps(fs(key=keyref, signers=[key.public])))
    assert reader.cat_file(str(tmp_path / "a")) == DATA
    fs(key=keyref).pipe_file(str(tmp_path / "b"), DATA)
    with pytest.raises(SignatureError):
        reader.cat_file(str(tmp_path / "b"))
    with pytest.raises(TypeError):
        pickle.dumps(fs(key=keyref, sign_with=key))  # a key object never travels
    assert key.public in repr(key) and "Ring" in repr(reader.keyring)


def test_loader_refuses_unsigned_shard(tmp_path, keyref, signer):
    from encfs.loaders import EncryptedRecordDataset

    key, path = signer
    writer = fs(key=keyref, sign_with=path)
    arrays = [np.arange(i * 64, (i + 1) * 64, dtype=np.float32) for i in range(3)]
    urls = []
    for i, a in enumerate(arrays):
        p = str(tmp_path / f"s{i}.bin")
        (writer if i != 1 else fs(key=keyref)).pipe_file(p, a.tobytes())
        urls.append(f"encfs::file://{p}")
    opts = {"encfs": {"key": keyref, "signers": [key.public]}}
    ds = EncryptedRecordDataset([urls[0], urls[2]], (8,), np.float32, storage_options=opts)
    assert np.array_equal(np.concatenate([np.asarray(ds[i]) for i in range(len(ds))]).ravel(), np.concatenate([arrays[0], arrays[2]]))
    with pytest.raises(SignatureError):
        ds = EncryptedRecordDataset(urls, (8,), np.float32, storage_options=opts)
        [ds[i] for i in range(len(ds))]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "encfs.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_cli_sign_and_verify(tmp_path, keyref, signer):
    key, path = signer
    (tmp_path / "p.txt").write_bytes(DATA)
    assert cli("encrypt", "-k", keyref, "--sign", path, "--no-progress", "p.txt", "s.enc", cwd=tmp_path).returncode == 0
    assert cli("encrypt", "-k", keyref, "--no-progress", "p.txt", "u.enc", cwd=tmp_path).returncode == 0
    out = cli("inspect", "s.enc", cwd=tmp_path)
    assert f"signed by: {key.public}" in out.stdout
    assert cli("inspect", "--signer", key.public, "s.enc", cwd=tmp_path).returncode == 0  # no key needed
    res = cli("inspect", "--signer", key.public, "u.enc", cwd=tmp_path)
    assert res.returncode != 0 and "carries no signature" in res.stderr
    res = cli("decrypt", "-k", keyref, "--signer", key.public, "--no-progress", "s.enc", "out", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out").read_bytes() == DATA
    res = cli("decrypt", "-k", keyref, "--signer", key.public, "--no-progress", "u.enc", "out2", cwd=tmp_path)
    assert res.returncode != 0 and "not signed by a trusted signer" in res.stderr
    assert not (tmp_path / "out2").exists()
    res = cli("cat", "-k", keyref, "--signer", key.public, "u.enc", cwd=tmp_path)
    assert res.returncode != 0 and res.stdout == ""


def test_cli_reencrypt_and_migrate_sign(tmp_path, keyref, signer):
    key, path = signer
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}").write_bytes(DATA[: 1000 * (i + 1)])
    res = cli("migrate", "-k", keyref, "--sign", path, "--journal", str(tmp_path / "j.db"), "--no-progress", str(src), f"encfs::file://{tmp_path / 'dst'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    reader = fs(key=keyref, signers=[key.public])
    for i in range(3):
        assert reader.cat_file(str(tmp_path / "dst" / f"f{i}")) == DATA[: 1000 * (i + 1)]
    before = {p.name: stanzas(p.read_bytes()) for p in (tmp_path / "dst").iterdir()}
    res = cli("reencrypt", "-k", keyref, "--journal", str(tmp_path / "r.db"), "--no-progress", str(tmp_path / "dst"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "carry no writer signature" in res.stderr
    with pytest.raises(SignatureError):
        reader.cat_file(str(tmp_path / "dst" / "f0"))
    res = cli("reencrypt", "-k", keyref, "--sign", path, "--journal", str(tmp_path / "r2.db"), "--no-progress", str(tmp_path / "dst"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    for i in range(3):
        assert reader.cat_file(str(tmp_path / "dst" / f"f{i}")) == DATA[: 1000 * (i + 1)]
    after = {p.name: stanzas(p.read_bytes()) for p in (tmp_path / "dst").iterdir()}
    assert all(before[n][-1][4] != after[n][-1][4] for n in before)  # new file keys, new signatures


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.integers(min_value=0, max_value=1 + 3 + 1 + 8 + 2 + 32 + 2 + 64 - 1), bit=st.integers(min_value=0, max_value=7))
def test_any_flipped_bit_of_the_sig_stanza_is_refused(tmp_path, keyref, signer, where, bit):
    key, path = signer
    target = tmp_path / "h"
    if not target.exists():
        fs(key=keyref, sign_with=path).pipe_file(str(target), DATA)
    raw = bytearray(target.read_bytes())
    off = [s for s in stanzas(bytes(raw)) if s[1] == "sig"][0][0]
    raw[off + where] ^= 1 << bit
    bad = tmp_path / "bad"
    bad.write_bytes(bytes(raw))
    with pytest.raises((FormatError, IntegrityError)):
        fs(key=keyref, signers=[key.public]).cat_file(str(bad))
    with pytest.raises((FormatError, IntegrityError)):
        fs(key=keyref).cat_file(str(bad))


def test_passphrase_and_key_file_writer_signatures_coexist(tmp_path, signer):
    """A signature takes header room like a recipient: 1024 bytes hold it with several keys."""
    key, path = signer
    refs = [write_key(tmp_path / f"k{i}") for i in range(6)]
    fs(key=refs, sign_with=path).pipe_file(str(tmp_path / "a"), DATA)
    for r in refs:
        assert fs(key=r, signers=[key.public]).cat_file(str(tmp_path / "a")) == DATA


def test_env_signers_are_a_host_policy(tmp_path, keyref, signer, monkeypatch):
    """``$ENCFS_SIGNERS`` is the default ``signers=``: set on a host (and inherited by its loader
    workers), every read there checks writer signatures; fsspec's instance cache never hands
    out a filesystem made before the variable changed."""
    import fsspec

    key, path = signer
    fs(key=keyref, sign_with=path).pipe_file(str(tmp_path / "signed"), DATA)
    fs(key=keyref).pipe_file(str(tmp_path / "unsigned"), DATA)
    url = f"encfs::file://{tmp_path / 'unsigned'}"
    with fsspec.open(url, "rb", encfs={"key": keyref}) as f:
        assert f.read() == DATA
    monkeypatch.setenv("ENCFS_SIGNERS", key.public)
    with pytest.raises(SignatureError):
        with fsspec.open(url, "rb", encfs={"key": keyref}) as f:
            f.read()
    assert fs(key=keyref).cat_file(str(tmp_path / "signed")) == DATA
    with pytest.raises(Exception, match="contradict"):
        fs(key=keyref, allow_plaintext=True)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a").write_bytes(DATA)
    env = {**os.environ, "ENCFS_SIGNERS": key.public}
    res = subprocess.run([sys.executable, "-m", "encfs.cli", "migrate", "-k", keyref, "--journal", str(tmp_path / "j.db"), "--no-progress",
                          str(tmp_path / "src"), f"encfs::file://{tmp_path / 'dst'}"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode != 0 and "pass --sign" in res.stderr
    assert not (tmp_path / "dst").exists() or not any((tmp_path / "dst").iterdir())
    res = subprocess.run([sys.executable, "-m", "encfs.cli", "migrate", "-k", keyref, "--sign", path, "--journal", str(tmp_path / "j2.db"),
                          "--no-progress", str(tmp_path / "src"), f"encfs::file://{tmp_path / 'dst'}"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert fs(key=keyref).cat_file(str(tmp_path / "dst" / "a")) == DATA


def test_small_order_keys_refused_as_signers():
    """Under a small-order public key the signature (R = identity, S = 0) verifies for a share of
    all messages (checked here with pyca, the independent reference): such keys are refused as
    trusted signers, in both sign-bit forms, canonical or not; a real key is never affected."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from encfs.keys.sources import b64encode
    from encfs.signing import _SMALL_ORDER_Y, VerifyKey

    forged = bytes([1]) + bytes(63)
    assert len(_SMALL_ORDER_Y) == 7
    for y in _SMALL_ORDER_Y:
        for sign in (0, 0x80):
            raw = y[:31] + bytes([y[31] | sign])
            pub = Ed25519PublicKey.from_public_bytes(raw)
            hits = 0
            for i in range(64):
                try:
                    pub.verify(forged, b"message %d" % i)
                    hits += 1
                except InvalidSignature:
                    pass
            assert hits > 0, raw.hex()  # small order indeed: a forgery verifies
            with pytest.raises(KeyReferenceError, match="small-order"):
                VerifyKey(raw)
            with pytest.raises(KeyReferenceError, match="small-order"):
                fs(key=None, signers=["ed25519:" + b64encode(raw)])
    real = SigningKey.generate().verify_key
    assert not any(real.verify(forged, b"message %d" % i) for i in range(64))
