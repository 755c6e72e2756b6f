"""Encrypted, signed, versioned model checkpoints (encfs.loaders.models, docs/MODELS.md).

The independent references are the objects saved (tensors compared exactly), the bytes
``torch.save``/safetensors produce for them, and the raw files in storage, which the tests
copy, swap, cut and rewrite as an attacker on the storage would."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat

import fsspec
import pytest

torch = pytest.importorskip("torch")

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from .conftest import write_key  # noqa: E402
from encfs import loaders as L  # noqa: E402
from encfs.filesystem import EncFileSystem  # noqa: E402
from encfs.loaders import models as M  # noqa: E402
from encfs.manifest import ManifestError  # noqa: E402
from encfs.signing import SigningKey  # noqa: E402


class Boom:
    """Unpickling it creates ``path``: the proof that a pickle was deserialised."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def state_dict(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(64, 33, generator=g),
        "b": torch.randn(33, generator=g).to(torch.float16),
        "step": torch.tensor(seed, dtype=torch.int64),
    }


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture
def model(tmp_path, keyref):
    fs = EncFileSystem(target_protocol="file", key=keyref, skip_instance_cache=True)
    root = tmp_path / "models" / "net"
    return fs, root, SigningKey.generate()


def refused(reason: str | tuple, fn, *a, **kw) -> M.ModelError:
    with pytest.raises(M.ModelError) as info:
        fn(*a, **kw)
    assert info.value.reason in ((reason,) if isinstance(reason, str) else reason), str(info.value)
    return info.value


# -- round trips -------------------------------------------------------------------------------------


def test_state_dict_round_trips_bit_for_bit(model):
    fs, root, key = model
    sd = state_dict(1)
    e = L.save(sd, str(root), sign=key, fs=fs, note="first")
    assert (e.version, e.kind, e.note, e.signer) == (1, "torch", "first", key.public)
    raw = (root / "v000001.pt").read_bytes()
    assert raw[:8] == b"\x89ENCFS\r\n" and b"step" not in raw
    assert fs.cat_file(str(root / "v000001.pt")) == torch_bytes(sd)  # the stored plaintext is torch.save's bytes
    back = L.load(str(root), signers=[key.public], fs=fs)
    assert same(back, sd)
    assert torch_bytes(back) == torch_bytes(sd)
    e2 = L.save(state_dict(2), str(root), sign=key, fs=fs)
    assert e2.version == 2 and e2.prev == e.digest
    assert same(L.load(str(root), signers=[key.public], fs=fs), state_dict(2))
    assert same(L.load(str(root), signers=[key.public], fs=fs, version=1), sd)
    assert [v.version for v in L.versions(str(root), [key.public], fs=fs)] == [1, 2]


def test_url_and_storage_options(tmp_path, keyref):
    key = SigningKey.generate()
    url = f"encfs::file://{tmp_path}/m"
    opts = {"encfs": {"key": keyref}}
    L.save(state_dict(3), url, sign=key, storage_options=opts)
    assert same(L.load(url, signers=key.public, storage_options=opts), state_dict(3))


def test_safetensors_round_trip(model):
    st_torch = pytest.importorskip("safetensors.torch")
    fs, root, key = model
    sd = {k: v for k, v in state_dict(4).items()}
    e = L.save(sd, str(root), sign=key, fs=fs, format="safetensors")
    assert e.kind == "safetensors" and e.files[0].path == "v000001.safetensors"
    assert fs.cat_file(str(root / e.files[0].path)) == st_torch.save(sd)
    assert same(L.load(str(root), signers=[key.public], fs=fs), sd)


def test_torch_load_through_fsspec_open(tmp_path, keyref):
    url = f"encfs::file://{tmp_path}/ckpt.pt"
    sd = state_dict(5)
    with fsspec.open(url, "wb", encfs={"key": keyref}) as f:
        torch.save(sd, f)
    assert (tmp_path / "ckpt.pt").read_bytes()[:8] == b"\x89ENCFS\r\n"
    with fsspec.open(url, "rb", encfs={"key": keyref}) as f:
        assert same(torch.load(f, weights_only=True), sd)


def test_versions_only_grow(model):
    fs, root, key = model
    L.save(state_dict(), str(root), sign=key, fs=fs, version=5)
    refused("version-not-increasing", L.save, state_dict(), str(root), sign=key, fs=fs, version=5)
    refused("version-not-increasing", L.save, state_dict(), str(root), sign=key, fs=fs, version=3)
    assert L.save(state_dict(), str(root), sign=key, fs=fs).version == 6


def test_another_writer_needs_signers(model):
    fs, root, key = model
    other = SigningKey.generate()
    L.save(state_dict(), str(root), sign=key, fs=fs)
    refused("untrusted-signer", L.save, state_dict(), str(root), sign=other, fs=fs)
    e = L.save(state_dict(7), str(root), sign=other, fs=fs, signers=[key.public])
    assert e.signer == other.public
    refused("untrusted-signer", L.load, str(root), signers=[key.public], fs=fs)
    assert same(L.load(str(root), signers=[key.public, other.public], fs=fs), state_dict(7))


def test_version_file_already_there_is_a_conflict(model):
    fs, root, key = model
    L.save(state_dict(), str(root), sign=key, fs=fs)
    fs.pipe_file(str(root / "v000002.pt"), b"left by a crashed writer")
    refused("conflict", L.save, state_dict(), str(root), sign=key, fs=fs)
    assert len(L.versions(str(root), [key.public], fs=fs)) == 1


def test_log_changed_during_save_is_a_conflict(model, monkeypatch):
    fs, root, key = model
    L.save(state_dict(), str(root), sign=key, fs=fs)
    real = M._write_file

    def other_writer_meanwhile(*a, **kw):
        out = real(*a, **kw)
        monkeypatch.setattr(M, "_write_file", real)
        L.save(state_dict(9), str(root), sign=key, fs=fs, version=10)
        return out

    monkeypatch.setattr(M, "_write_file", other_writer_meanwhile)
    refused("conflict", L.save, state_dict(), str(root), sign=key, fs=fs)
    assert not (root / "v000002.pt").exists()  # the loser's file is removed
    assert [v.version for v in L.versions(str(root), [key.public], fs=fs)] == [1, 10]


# -- refusals before deserialisation -----------------------------------------------------------------


def test_malicious_pickle_substituted_is_never_unpickled(model, tmp_path):
    fs, root, key = model
    marker = tmp_path / "pwned"
    L.save(state_dict(), str(root), sign=key, fs=fs)
    evil = torch_bytes({"w": Boom(str(marker))})
    fs.pipe_file(str(root / "v000001.pt"), evil)  # a key holder's ciphertext in its place
    refused("resized", L.load, str(root), signers=[key.public], fs=fs, weights_only=False)  # another file id, and size
    (root / "v000001.pt").write_bytes(evil)  # plaintext in its place
    refused("unreadable", L.load, str(root), signers=[key.public], fs=fs, weights_only=False)
    assert not marker.exists()


def test_malicious_pickle_with_valid_signature_refused_by_weights_only(model, tmp_path):
    fs, root, key = model
    marker = tmp_path / "pwned"
    L.save({"w": Boom(str(marker))}, str(root), sign=key, fs=fs)
    with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
        L.load(str(root), signers=[key.public], fs=fs)
    assert not marker.exists()


def test_forged_payload_caught_by_digest_before_unpickling(model, tmp_path):
    """Same file id, commitment and size, other plaintext (what a holder of the file key can
    forge): simulated by a trusted entry whose SHA-256 is not the file's."""
    fs, root, key = model
    marker = tmp_path / "pwned"
    e = L.save({"w": Boom(str(marker))}, str(root), sign=key, fs=fs)
    fe = e.files[0]._replace(sha256="0" * 64)
    body = M.entry_body(e.model, 1, "torch", [fe], key.public, e.created, M.GENESIS, "")
    (root / M.LOG_NAME).write_bytes(M.FORMAT_LINE + M.sign_line(key, body) + b"\n")
    refused("modified", L.load, str(root), signers=[key.public], fs=fs, weights_only=False)
    assert not marker.exists()


def test_swapped_version_files(model):
    fs, root, key = model
    L.save(state_dict(1), str(root), sign=key, fs=fs)
    L.save(state_dict(2), str(root), sign=key, fs=fs)
    a, b = root / "v000001.pt", root / "v000002.pt"
    ra, rb = a.read_bytes(), b.read_bytes()
    a.write_bytes(rb)
    b.write_bytes(ra)
    err = refused("swapped", L.load, str(root), signers=[key.public], fs=fs)
    assert err.path.endswith("v000002.pt") and "v000001.pt" in err.detail
    refused("swapped", L.load, str(root), signers=[key.public], fs=fs, version=1)


def test_rolled_back_version_file(model):
    fs, root, key = model
    L.save(state_dict(1), str(root), sign=key, fs=fs)
    old = (root / "v000001.pt").read_bytes()
    fs.rm_file(str(root / "v000001.pt"))
    fs.pipe_file(str(root / "v000001.pt"), torch_bytes(state_dict(1)))  # same plaintext, new ciphertext
    refused("rolled-back", L.load, str(root), signers=[key.public], fs=fs)
    (root / "v000001.pt").write_bytes(old)
    assert same(L.load(str(root), signers=[key.public], fs=fs), state_dict(1))


def test_missing_version_file_and_unlogged_version(model):
    fs, root, key = model
    L.save(state_dict(1), str(root), sign=key, fs=fs)
    fs.pipe_file(str(root / "v000002.pt"), torch_bytes(state_dict(2)))  # written without save(): unsigned
    assert same(L.load(str(root), signers=[key.public], fs=fs), state_dict(1))
    refused("unsigned", L.load, str(root), signers=[key.public], fs=fs, version=2)
    (root / "v000001.pt").unlink()
    refused("missing", L.load, str(root), signers=[key.public], fs=fs)


def test_unsigned_untrusted_and_missing_log(model):
    fs, root, key = model
    refused("no-log", L.load, str(root), signers=[key.public], fs=fs)
    L.save(state_dict(), str(root), sign=key, fs=fs, plain_log=True)
    refused("untrusted-signer", L.load, str(root), signers=[SigningKey.generate().public], fs=fs)
    log = root / M.LOG_NAME
    ref, sig, body = log.read_bytes()[len(M.FORMAT_LINE) : -1].split(b"\t")
    log.write_bytes(M.FORMAT_LINE + body + b"\n")
    refused("unsigned", L.load, str(root), signers=[key.public], fs=fs)
    log.write_bytes(M.FORMAT_LINE + ref + b"\t\t" + body + b"\n")
    refused("unsigned", L.load, str(root), signers=[key.public], fs=fs)
    impostor = SigningKey.generate()  # claims to be the trusted key, signs with its own
    log.write_bytes(M.FORMAT_LINE + ref + b"\t" + M.sign_line(impostor, body).split(b"\t")[1] + b"\t" + body + b"\n")
    refused("bad-signature", L.load, str(root), signers=[key.public], fs=fs)


def test_tampered_log_line(model):
    fs, root, key = model
    L.save(state_dict(1), str(root), sign=key, fs=fs, plain_log=True)
    L.save(state_dict(2), str(root), sign=key, fs=fs, plain_log=True)
    log = root / M.LOG_NAME
    good = log.read_bytes()
    for old, new in ((b'"version":2', b'"version":3'), (b'"note":""', b'"note":"x"'), (b"v000002.pt", b"v000001.pt")):
        assert old in good
        log.write_bytes(good.replace(old, new, 1))
        refused("bad-signature", L.load, str(root), signers=[key.public], fs=fs)
    lines = good.split(b"\n")
    log.write_bytes(b"\n".join([lines[0], lines[2], lines[1], b""]))  # reordered entries
    refused("broken-chain", L.load, str(root), signers=[key.public], fs=fs)
    log.write_bytes(b"\n".join([lines[0], lines[2], b""]))  # first entry dropped
    refused("broken-chain", L.load, str(root), signers=[key.public], fs=fs)
    log.write_bytes(good)
    assert same(L.load(str(root), signers=[key.public], fs=fs), state_dict(2))


def test_tampered_encrypted_log(model):
    fs, root, key = model
    L.save(state_dict(1), str(root), sign=key, fs=fs)
    log = root / M.LOG_NAME
    raw = bytearray(log.read_bytes())
    assert raw[:8] == b"\x89ENCFS\r\n" and b"v000001" not in raw
    raw[-5] ^= 1
    log.write_bytes(bytes(raw))
    refused("unreadable", L.load, str(root), signers=[key.public], fs=fs)
    fs.pipe_file(str(log), (M.FORMAT_LINE + b"x\n"))  # a key holder rewriting the log through encfs still cannot sign it
    refused("unsigned", L.load, str(root), signers=[key.public], fs=fs)


def test_truncated_log(model, tmp_path):
    fs, root, key = model
    L.save(state_dict(1), str(root), sign=key, fs=fs, plain_log=True)
    L.save(state_dict(2), str(root), sign=key, fs=fs, plain_log=True)
    log = root / M.LOG_NAME
    good = log.read_bytes()
    for cut in (len(good) - 1, len(good) - 40, len(M.FORMAT_LINE) + 10, len(M.FORMAT_LINE), 5):
        log.write_bytes(good[:cut])
        with pytest.raises(M.ModelError) as info:
            L.load(str(root), signers=[key.public], fs=fs)
        assert info.value.reason in ("malformed", "bad-signature", "unsigned"), str(info.value)
    log.write_bytes(good.split(b"\n", 2)[0] + b"\n" + good.split(b"\n")[1] + b"\n")  # cut at an entry: a valid older log
    state = tmp_path / "state.json"
    refused("old-version", L.load, str(root), signers=[key.public], fs=fs, min_version=2)
    log.write_bytes(good)
    L.load(str(root), signers=[key.public], fs=fs, state=str(state))
    log.write_bytes(good.split(b"\n", 2)[0] + b"\n" + good.split(b"\n")[1] + b"\n")
    refused("rolled-back", L.load, str(root), signers=[key.public], fs=fs, state=str(state))


def test_whole_log_rollback_caught_by_state_and_min_version(model, tmp_path):
    fs, root, key = model
    state = tmp_path / "seen" / "state.json"
    L.save(state_dict(1), str(root), sign=key, fs=fs)
    old_log, old_file = (root / M.LOG_NAME).read_bytes(), (root / "v000001.pt").read_bytes()
    assert same(L.load(str(root), signers=[key.public], fs=fs, state=str(state)), state_dict(1))
    L.save(state_dict(2), str(root), sign=key, fs=fs)
    assert same(L.load(str(root), signers=[key.public], fs=fs, state=str(state)), state_dict(2))
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o600
    seen = json.loads(state.read_text())["models"]
    assert list(seen.values())[0]["version"] == 2
    (root / M.LOG_NAME).write_bytes(old_log)  # storage puts the old log back
    (root / "v000002.pt").unlink()
    (root / "v000001.pt").write_bytes(old_file)
    assert same(L.load(str(root), signers=[key.public], fs=fs), state_dict(1))  # without protection: served
    refused("rolled-back", L.load, str(root), signers=[key.public], fs=fs, state=str(state))
    refused("old-version", L.load, str(root), signers=[key.public], fs=fs, min_version=2)
    refused("old-version", L.load, str(root), signers=[key.public], fs=fs, version=1, min_version=2)
    state.write_text("{not json")
    refused("malformed", L.load, str(root), signers=[key.public], fs=fs, state=str(state))


def test_state_is_written_only_when_it_learns_something(model, tmp_path):
    fs, root, key = model
    state = tmp_path / "state.json"
    L.save(state_dict(1), str(root), sign=key, fs=fs)
    L.load(str(root), signers=[key.public], fs=fs, state=state)
    first = state.stat().st_ino
    L.load(str(root), signers=[key.public], fs=fs, state=state)
    assert state.stat().st_ino == first  # not replaced
    L.save(state_dict(2), str(root), sign=key, fs=fs)
    L.load(str(root), signers=[key.public], fs=fs, state=state, version=1)  # an older version on purpose: allowed
    assert state.stat().st_ino != first
    assert list(json.loads(state.read_text())["models"].values())[0]["version"] == 2


def test_forked_history_caught_by_state(model, tmp_path):
    fs, root, key = model
    state = tmp_path / "state.json"
    L.save(state_dict(1), str(root), sign=key, fs=fs)
    L.load(str(root), signers=[key.public], fs=fs, state=str(state))
    shutil.rmtree(root)  # the signer (or a stolen key) rewrites history: another version 1, then 2
    L.save(state_dict(8), str(root), sign=key, fs=fs)
    L.save(state_dict(9), str(root), sign=key, fs=fs)
    refused("forked", L.load, str(root), signers=[key.public], fs=fs, state=str(state))


def test_wrong_size(model):
    fs, root, key = model
    e = L.save(state_dict(1), str(root), sign=key, fs=fs, plain_log=True)
    fe = e.files[0]._replace(size=e.files[0].size + 1)
    body = M.entry_body(e.model, 1, "torch", [fe], key.public, e.created, M.GENESIS, "")
    (root / M.LOG_NAME).write_bytes(M.FORMAT_LINE + M.sign_line(key, body) + b"\n")
    refused("resized", L.load, str(root), signers=[key.public], fs=fs)
    raw = (root / "v000001.pt").read_bytes()
    (root / "v000001.pt").write_bytes(raw[:-100])  # cut ciphertext
    refused("unreadable", L.load, str(root), signers=[key.public], fs=fs)


def test_per_version_recipients(tmp_path):
    a, b = write_key(tmp_path / "a.key"), write_key(tmp_path / "b.key")
    key = SigningKey.generate()
    root = str(tmp_path / "m")
    writer = EncFileSystem(target_protocol="file", key=[a, b], skip_instance_cache=True)
    L.save(state_dict(1), root, sign=key, fs=writer)
    e2 = L.save(state_dict(2), root, sign=key, fs=writer, recipients=[b])
    assert e2.files[0].file_id != L.versions(root, [key.public], fs=writer)[0].files[0].file_id
    only_a = EncFileSystem(target_protocol="file", key=a, skip_instance_cache=True)
    only_b = EncFileSystem(target_protocol="file", key=b, skip_instance_cache=True)
    assert same(L.load(root, signers=[key.public], fs=only_a, version=1), state_dict(1))
    err = refused("unreadable", L.load, root, signers=[key.public], fs=only_a)
    assert "NoMatchingKeyError" in str(err)
    assert same(L.load(root, signers=[key.public], fs=only_b), state_dict(2))
    assert same(L.load(root, signers=[key.public], fs=only_b, version=1), state_dict(1))


def test_encrypt_only_writer(tmp_path):
    """A host holding only an X25519 public key saves (file id and commitment come from the
    writer, not from reading the file back); the identity holder loads."""
    from encfs.keys.refs import load_reference
    from encfs.keys.x25519 import public_reference

    ident = write_key(tmp_path / "id.key", x25519=True)
    public = public_reference(load_reference(ident).recipient.public)
    key, root = SigningKey.generate(), str(tmp_path / "m")
    writer = EncFileSystem(target_protocol="file", recipients=public, skip_instance_cache=True)
    L.save(state_dict(1), root, sign=key, fs=writer, plain_log=True)
    L.save(state_dict(2), root, sign=key, fs=writer, plain_log=True)
    reader = EncFileSystem(target_protocol="file", key=ident, skip_instance_cache=True)
    assert same(L.load(root, signers=[key.public], fs=reader), state_dict(2))
    refused("unreadable", L.load, root, signers=[key.public], fs=writer)


def test_writer_signatures_carry_over_to_per_version_recipients(tmp_path):
    """An ``EncFileSystem(sign_with=...)`` signs each version file (docs/FORMAT.md §1.5), with
    per-version recipients too, so ``signers=`` readers open them."""
    a, b = write_key(tmp_path / "a.key"), write_key(tmp_path / "b.key")
    key, root = SigningKey.generate(), str(tmp_path / "m")
    writer = EncFileSystem(target_protocol="file", key=[a, b], sign_with=key, skip_instance_cache=True)
    L.save(state_dict(1), root, sign=key, fs=writer, recipients=[b])
    checked = EncFileSystem(target_protocol="file", key=[a, b], signers=[key.public], skip_instance_cache=True)
    assert same(L.load(root, signers=[key.public], fs=checked), state_dict(1))
    strict = EncFileSystem(target_protocol="file", key=[a, b], signers=[SigningKey.generate().public], skip_instance_cache=True)
    refused("unreadable", L.load, root, signers=[key.public], fs=strict)


def test_model_copied_to_another_prefix_caught_by_name(model, tmp_path):
    fs, root, key = model
    L.save(state_dict(1), str(root), sign=key, fs=fs)
    other = tmp_path / "models" / "other"
    shutil.copytree(root, other)
    assert same(L.load(str(other), signers=[key.public], fs=fs), state_dict(1))  # the files are the same ciphertext
    refused("name", L.load, str(other), signers=[key.public], fs=fs, name="other")
    assert same(L.load(str(root), signers=[key.public], fs=fs, name="net"), state_dict(1))


def test_errors_never_carry_key_material(model, tmp_path):
    fs, root, key = model
    path = tmp_path / "signer.key"
    path.write_text(key.file_text())
    os.chmod(path, 0o600)
    L.save(state_dict(), str(root), sign=str(path), fs=fs)
    secret = key.file_text().splitlines()[-1].split(":", 1)[1]
    err = refused("untrusted-signer", L.load, str(root), signers=[SigningKey.generate().public], fs=fs)
    assert secret not in str(err) and secret not in repr(err)
    assert isinstance(err, ManifestError)


def test_not_an_encfs_prefix(tmp_path):
    refused("unreadable", L.load, f"file://{tmp_path}", signers=[SigningKey.generate().public])


# -- Hugging Face --------------------------------------------------------------------------------------


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    return transformers, transformers.BertModel(cfg).eval()


def test_hugging_face_round_trip(model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers, bert = tiny_bert()
    fs, root, key = model
    e = L.save_pretrained(bert, str(root), sign=key, fs=fs)
    names = {f.path for f in e.files}
    assert e.kind == "hf" and "v000001/config.json" in names and any(n.endswith(".safetensors") for n in names)
    for n in names:
        assert (root / n).read_bytes()[:8] == b"\x89ENCFS\r\n"
    seen = []

    class Checked:
        @classmethod
        def from_pretrained(cls, path, **kw):
            seen.append((path, stat.S_IMODE(os.stat(path).st_mode), sorted(os.listdir(path))))
            return transformers.BertModel.from_pretrained(path, **kw)

    back = L.from_pretrained(Checked, str(root), signers=[key.public], fs=fs)
    assert same(dict(bert.state_dict()), dict(back.state_dict()))
    (path, mode, listed), = seen
    assert mode == 0o700 and not os.path.exists(path)
    assert {f"v000001/{n}" for n in listed} == names
    refused("kind", L.load, str(root), signers=[key.public], fs=fs)


def test_hugging_face_refusal_removes_temp_dir_and_never_calls_from_pretrained(model, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers, bert = tiny_bert()
    fs, root, key = model
    e = L.save_pretrained(bert, str(root), sign=key, fs=fs)
    weights = next(f.path for f in e.files if f.path.endswith(".safetensors"))
    fs.pipe_file(str(root / weights), b"\x00" * 100)  # substituted weights
    made = []
    real_mkdtemp = M.tempfile.mkdtemp

    def mkdtemp(*a, **kw):
        made.append(real_mkdtemp(*a, **kw))
        return made[-1]

    monkeypatch.setattr(M.tempfile, "mkdtemp", mkdtemp)
    calls = []

    class Never:
        @classmethod
        def from_pretrained(cls, *a, **kw):
            calls.append(a)

    refused("resized", L.from_pretrained, Never, str(root), signers=[key.public], fs=fs)
    assert made and not os.path.exists(made[-1]) and not calls

    class Fails:
        @classmethod
        def from_pretrained(cls, path, **kw):
            assert os.listdir(path)
            raise RuntimeError("boom")

    L.save_pretrained(bert, str(root), sign=key, fs=fs)
    with pytest.raises(RuntimeError, match="boom"):
        L.from_pretrained(Fails, str(root), signers=[key.public], fs=fs)
    assert not os.path.exists(made[-1])
    L.save(state_dict(), str(root), sign=key, fs=fs)
    refused("kind", L.from_pretrained, Never, str(root), signers=[key.public], fs=fs)


def test_private_tempdir_is_private_and_removed():
    with M.private_tempdir() as d:
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
            assert d.startswith("/dev/shm/")
        open(os.path.join(d, "x"), "w").close()
    assert not os.path.exists(d)


# -- the log's parser ------------------------------------------------------------------------------------

KEY = SigningKey.generate()
FE = M.Entry("v000001.pt", 10, "ab" * 16, "cd" * 32, "ef" * 32)


def good_body(**over) -> bytes:
    doc = json.loads(M.entry_body("net", 1, "torch", [FE], KEY.public, "2026-12-06T10:00:00Z", M.GENESIS, ""))
    doc.update(over)
    return M.canonical(doc)


def test_parser_accepts_the_canonical_entry():
    entries = M.parse_log(M.FORMAT_LINE + M.sign_line(KEY, good_body()) + b"\n", [KEY.public])
    assert entries[0].files == (FE,) and entries[0].version == 1


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_parser_refuses_garbage_lines(junk):
    for data in (junk, M.FORMAT_LINE + junk, M.FORMAT_LINE + junk + b"\n", M.FORMAT_LINE + M.sign_line(KEY, junk) + b"\n"):
        with pytest.raises(M.ModelError):
            M.parse_log(data, [KEY.public])


@settings(max_examples=100, deadline=None)
@given(st.permutations(M.BODY_KEYS), st.sampled_from([(",", ":"), (", ", ": "), (",", ": ")]))
def test_parser_refuses_non_canonical_bodies_even_when_signed(order, seps):
    doc = json.loads(good_body())
    body = json.dumps({k: doc[k] for k in order}, separators=seps).encode()
    data = M.FORMAT_LINE + M.sign_line(KEY, body) + b"\n"
    if body == good_body():
        assert M.parse_log(data, [KEY.public])
    else:
        assert refused("malformed", M.parse_log, data, [KEY.public])


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(M.BODY_KEYS),
    st.one_of(st.none(), st.booleans(), st.integers(-2, 2), st.floats(allow_nan=False), st.text(max_size=8), st.lists(st.integers(), max_size=2)),
)
def test_parser_refuses_bad_field_values(field, value):
    doc = json.loads(good_body())
    if doc[field] == value and type(doc[field]) is type(value):
        return
    doc[field] = value
    valid = (field in ("note", "model") and isinstance(value, str)) or (field == "version" and type(value) is int and value >= 1)
    if valid:
        assert M.parse_log(M.FORMAT_LINE + M.sign_line(KEY, M.canonical(doc)) + b"\n", [KEY.public])
        return
    with pytest.raises(M.ModelError):
        M.parse_log(M.FORMAT_LINE + M.sign_line(KEY, M.canonical(doc)) + b"\n", [KEY.public])


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 255))
def test_parser_any_flipped_byte_is_refused(pos, value):
    data = bytearray(M.FORMAT_LINE + M.sign_line(KEY, good_body()) + b"\n")
    pos %= len(data)
    if data[pos] == value:
        return
    data[pos] = value
    with pytest.raises(M.ModelError):
        M.parse_log(bytes(data), [KEY.public])


def test_every_reason_is_documented():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "MODELS.md").read_text()
    assert [r for r in M.REASONS if f"| `{r}` |" not in doc] == []


def test_writer_signatures_with_models(tmp_path, keyref):
    """A filesystem that checks writer signatures (``signers=``) loads versions written by a
    signing writer (``sign_with=``); the version log, signed on its own, is read without the
    writer check; an unsigned version file is refused before deserialisation."""
    from encfs.errors import SignatureError
    from encfs.signing import write_signing_key

    key = SigningKey.generate()
    write_signing_key(str(tmp_path / "w.sign"), key)
    root = str(tmp_path / "m")
    writer = EncFileSystem(target_protocol="file", key=keyref, sign_with=str(tmp_path / "w.sign"), skip_instance_cache=True)
    reader = EncFileSystem(target_protocol="file", key=keyref, signers=[key.public], skip_instance_cache=True)
    L.save(state_dict(5), root, sign=key, fs=writer)
    assert same(L.load(root, signers=[key.public], fs=reader), state_dict(5))
    unsigned = EncFileSystem(target_protocol="file", key=keyref, skip_instance_cache=True)
    L.save(state_dict(6), root, sign=key, fs=unsigned)
    with pytest.raises((SignatureError, M.ModelError)) as info:
        L.load(root, signers=[key.public], fs=reader)
    assert "signed" in str(info.value)
