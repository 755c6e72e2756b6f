"""Regression tests for findings of the first external review (one test per finding)."""

from __future__ import annotations

import os
import stat
import struct

import fsspec
import numpy as np
import pytest

from encfs import EncfsError, FormatError, KeyReferenceError, NoMatchingKeyError
from encfs import format as fmt
from encfs.filesystem import EncFileSystem
from encfs.keys import KeyRing, Passphrase, load_reference
from encfs.keys.passphrase import Argon2Params
from encfs.secret import SecretBytes
from encfs.sink import TEMP_MARK


def test_failed_with_block_through_fsspec_open_keeps_old_file(tmp_path, keyref):
    url = f"encfs::file://{tmp_path}/f.bin"
    opts = {"encfs": {"key": keyref}}
    with fsspec.open(url, "wb", **opts) as f:
        f.write(b"old")
    with pytest.raises(RuntimeError):
        with fsspec.open(url, "wb", **opts) as f:
            f.write(b"partial new contents")
            raise RuntimeError("crash")
    with fsspec.open(url, "rb", **opts) as f:
        assert f.read() == b"old"
    assert not [n for n in os.listdir(tmp_path) if TEMP_MARK in n]


def test_failed_pandas_write_keeps_old_file(tmp_path, keyref):
    pd = pytest.importorskip("pandas")
    opts = {"encfs": {"key": keyref}}
    url = f"encfs::file://{tmp_path}/df.csv"
    pd.DataFrame({"a": range(100)}).to_csv(url, index=False, storage_options=opts)

    class Boom:
        def __str__(self):
            raise RuntimeError("row 60000 cannot be formatted")

    bad = pd.DataFrame({"a": [1] * 60000 + [Boom()]})
    with pytest.raises(RuntimeError):
        bad.to_csv(url, index=False, storage_options=opts)
    assert len(pd.read_csv(url, storage_options=opts)) == 100


def test_fsspec_transaction_commits_or_discards(tmp_path, keyref):
    fs = EncFileSystem(key=keyref, skip_instance_cache=True)
    with pytest.raises(RuntimeError):
        with fs.transaction:
            with fs.open(f"{tmp_path}/t1", "wb") as f:
                f.write(b"one")
            raise RuntimeError
    assert not fs.exists(f"{tmp_path}/t1")
    with fs.transaction:
        with fs.open(f"{tmp_path}/t2", "wb") as f:
            f.write(b"two")
        assert not fs.exists(f"{tmp_path}/t2"), "deferred until the transaction ends"
    assert fs.cat_file(f"{tmp_path}/t2") == b"two"


class _FlakySink:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def write(self, data):
        self.calls += 1
        if self.calls == 2:
            raise OSError(28, "No space left on device")
        return self.inner.write(data)

    def commit(self):
        self.inner.commit()

    def abort(self):
        self.inner.abort()


def test_writer_is_poisoned_by_a_failed_write(tmp_path, keyref):
    from encfs.sink import LocalSink
    from encfs.writer import PayloadWriter

    (tmp_path / "f").write_bytes(b"previous")
    w = PayloadWriter(_FlakySink(LocalSink(str(tmp_path / "f"))), KeyRing(keyref), block_chunks=1)
    with pytest.raises(OSError):
        w.write(b"x" * 20000)
    with pytest.raises(EncfsError, match="earlier write failed"):
        w.write(b"more")
    with pytest.raises(EncfsError, match="earlier write failed"):
        w.close()
    assert (tmp_path / "f").read_bytes() == b"previous"
    assert not [n for n in os.listdir(tmp_path) if TEMP_MARK in n]


def test_readers_survive_fork_into_dataloader_workers(tmp_path, keyref):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    from encfs.loaders import EncryptedRecordDataset

    arr = np.arange(64 * 5000, dtype=np.float32).reshape(5000, 64)
    url = f"encfs::file://{tmp_path}/r.bin"
    opts = {"encfs": {"key": keyref}}
    with fsspec.open(url, "wb", **opts) as f:
        f.write(arr.tobytes())
    ds = EncryptedRecordDataset([url], (64,), np.float32, storage_options=opts)
    assert torch.equal(ds[0], torch.from_numpy(arr[0]))
    ds.__dict__["_handles"][0].read(100_000)
    dl = DataLoader(ds, batch_size=250, num_workers=2, multiprocessing_context="fork")
    assert torch.equal(torch.cat(list(dl)), torch.from_numpy(arr))


def test_open_reader_used_after_fork(tmp_path, keyref):
    fs = EncFileSystem(key=keyref, skip_instance_cache=True)
    data = os.urandom(300_000)
    fs.pipe_file(f"{tmp_path}/x", data)
    f = fs.open(f"{tmp_path}/x", "rb", readahead=2)
    f.read(40_000)
    pid = os.fork()
    if pid == 0:
        try:
            f.seek(0)
            ok = f.read() == data
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    assert f.read() == data[40_000:]
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


@pytest.mark.parametrize("m,t,p", [(4 * 1024 * 1024, 1, 1), ((1 << 20) + 8, 1, 1), (1 << 20, 5, 1), (1024, 11, 1), (1024, 1, 17)])
def test_argon2_bounds_are_tight(m, t, p):
    with pytest.raises(FormatError, match="argon2"):
        Argon2Params(m, t, p).check()
    Argon2Params(1 << 20, 4, 16).check()


def test_two_passphrase_stanzas_are_refused(tmp_path, monkeypatch, keyref):
    from fsspec.implementations.local import LocalFileSystem

    from encfs.rewrap import rewrap

    monkeypatch.setenv("P1", "one")
    monkeypatch.setenv("P2", "two")
    with pytest.raises(KeyReferenceError, match="at most one passphrase"):
        EncFileSystem(key=["passphrase:env:P1", "passphrase:env:P2"], skip_instance_cache=True).pipe_file(f"{tmp_path}/f", b"x")
    assert not os.path.exists(f"{tmp_path}/f")
    fs = EncFileSystem(key=[keyref, "passphrase:env:P1"], skip_instance_cache=True)
    fs.pipe_file(f"{tmp_path}/f", b"x")
    before = open(f"{tmp_path}/f", "rb").read()
    with pytest.raises(FormatError, match="at most one passphrase"):
        rewrap(LocalFileSystem(), f"{tmp_path}/f", KeyRing(keyref), add=[load_reference("passphrase:env:P2")])
    assert open(f"{tmp_path}/f", "rb").read() == before
    h = fmt.parse(before)
    two = [h.stanzas[1], h.stanzas[1], h.stanzas[0]]
    enc_body = struct.pack(">H", 3) + b"".join(st.encode() for st in two)
    head = before[:32] + enc_body + h.mac
    open(f"{tmp_path}/g", "wb").write(head + bytes(h.length - len(head)) + before[h.length :])
    with pytest.raises(FormatError, match="more than one passphrase"):
        EncFileSystem(key=keyref, skip_instance_cache=True).cat_file(f"{tmp_path}/g")


def test_instance_cache_separates_keys_and_environment(monkeypatch, tmp_path):
    a = EncFileSystem(key=Passphrase(SecretBytes(b"alice")))
    b = EncFileSystem(key=Passphrase(SecretBytes(b"bob")))
    assert a is not b
    monkeypatch.setenv("ENCFS_KEY", "env:ONE")
    one = fsspec.filesystem("encfs")
    monkeypatch.setenv("ENCFS_KEY", "env:TWO")
    assert fsspec.filesystem("encfs") is not one


def test_listing_survives_a_malformed_file(enc):
    fs, root = enc
    fs.pipe_file(f"{root}/good", b"g" * 1000)
    raw = open(f"{root}/good", "rb").read()
    open(f"{root}/bad-version", "wb").write(raw[:8] + b"\x09" + raw[9:])
    open(f"{root}/bad-size", "wb").write(raw[: 1024 + 56 + 10])
    entries = {os.path.basename(e["name"]): e for e in fs.ls(root)}
    assert entries["good"]["size"] == 1000 and entries["good"]["encrypted"] is True
    assert entries["bad-version"]["encrypted"].startswith("invalid")
    assert entries["bad-size"]["encrypted"].startswith("invalid")
    assert len(fs.find(root)) == 3
    with pytest.raises(FormatError):
        fs.cat_file(f"{root}/bad-version")


def test_header_length_cache_follows_file_versions(enc, tmp_path):
    from .conftest import write_key

    fs, root = enc
    path = f"{root}/v"
    fs.pipe_file(path, b"a" * 10_000)
    assert fs.info(path)["size"] == 10_000
    many = [write_key(tmp_path / f"k{i}.key", x25519=True) for i in range(8)]
    big = EncFileSystem(key=many, skip_instance_cache=True)
    big.pipe_file(path, b"b" * (10_000 - 512))
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert big.info(path)["ciphertext_size"] == os.path.getsize(path)
    assert fs.info(path)["size"] == big.cat_file(path).__len__() == 9488


@pytest.mark.parametrize(
    "ref",
    ["encfs-key-v1:" + "A" * 43, "keyfile:encfs-key-v1:" + "B" * 43, "Zm9vYmFyYmF6cXV4eHh4eHh4eHh4eHh4eHh4eHh4eHg", "passphrase:hunter2-literal"],
)
def test_misused_references_never_echo_their_value(ref):
    with pytest.raises(KeyReferenceError) as e:
        load_reference(ref)
    value = ref.split(":")[-1]
    assert value not in str(e.value)


def test_key_stanza_shape_is_enforced(enc, keyref):
    fs, root = enc
    fs.pipe_file(f"{root}/s", b"x")
    raw = open(f"{root}/s", "rb").read()
    h = fmt.parse(raw)
    st = h.stanzas[0]
    odd = fmt.Stanza(st.type, st.key_id, b"extra", st.body)
    body = struct.pack(">H", 1) + odd.encode()
    head = raw[:32] + body + h.mac
    open(f"{root}/s", "wb").write(head + bytes(h.length - len(head)) + raw[h.length :])
    with pytest.raises(FormatError, match="malformed key stanza"):
        fs.cat_file(f"{root}/s")


def test_local_writes_keep_mode_and_follow_symlinks(enc):
    fs, root = enc
    fs.pipe_file(f"{root}/target", b"v1")
    os.chmod(f"{root}/target", 0o600)
    os.symlink(f"{root}/target", f"{root}/link")
    fs.pipe_file(f"{root}/link", b"v2")
    assert os.path.islink(f"{root}/link")
    assert fs.cat_file(f"{root}/target") == b"v2"
    assert stat.S_IMODE(os.stat(f"{root}/target").st_mode) == 0o600


def test_passphrase_file_first_line_is_split_on_newline_only(tmp_path):
    (tmp_path / "pw").write_bytes(b"pass\x0cword\r\nsecond\n")
    key = load_reference(f"passphrase:file:{tmp_path / 'pw'}")
    assert bytes(key._pass.view()) == b"pass\x0cword"


def test_noncanonical_base64_keys_are_refused(tmp_path):
    good = "A" * 42 + "E"
    with pytest.raises(KeyReferenceError, match="canonical|43"):
        load_reference("x25519:" + "A" * 42 + "B")
    with pytest.raises(KeyReferenceError, match="43"):
        load_reference("x25519:" + "A" * 42 + "=")
    import base64

    assert load_reference("x25519:" + good).public == base64.urlsafe_b64decode(good + "=")


def test_wrong_passphrase_does_not_match_another_key(tmp_path, monkeypatch):
    monkeypatch.setenv("P", "right")
    EncFileSystem(key="passphrase:env:P", skip_instance_cache=True).pipe_file(f"{tmp_path}/f", b"x")
    monkeypatch.setenv("P", "wrong")
    with pytest.raises(NoMatchingKeyError):
        EncFileSystem(key="passphrase:env:P", skip_instance_cache=True).cat_file(f"{tmp_path}/f")


# -- second review ---------------------------------------------------------------------------


def test_writes_inside_except_and_finally_are_committed(tmp_path, keyref):
    fs = EncFileSystem(key=keyref, skip_instance_cache=True)
    opts = {"encfs": {"key": keyref}}
    try:
        raise ValueError("handled")
    except ValueError:
        with fs.open(f"{tmp_path}/in-except", "wb") as f:
            f.write(b"saved in except")
        fs.pipe_file(f"{tmp_path}/pipe-in-except", b"piped")
        with fsspec.open(f"encfs::file://{tmp_path}/url-in-except", "wb", **opts) as f:
            f.write(b"url")
    try:
        try:
            raise KeyboardInterrupt
        finally:
            with fs.open(f"{tmp_path}/in-finally", "wb") as f:
                f.write(b"checkpoint")
    except KeyboardInterrupt:
        pass
    assert fs.cat_file(f"{tmp_path}/in-except") == b"saved in except"
    assert fs.cat_file(f"{tmp_path}/pipe-in-except") == b"piped"
    assert fs.cat_file(f"{tmp_path}/url-in-except") == b"url"
    assert fs.cat_file(f"{tmp_path}/in-finally") == b"checkpoint"


def test_a_new_failure_inside_except_still_discards(tmp_path, keyref):
    fs = EncFileSystem(key=keyref, skip_instance_cache=True)
    with pytest.raises(RuntimeError):
        try:
            raise ValueError("first")
        except ValueError:
            with fs.open(f"{tmp_path}/f", "wb") as f:
                f.write(b"half")
                raise RuntimeError("second")
    assert not fs.exists(f"{tmp_path}/f")
    f = fs.open(f"{tmp_path}/g", "wb", autocommit=False)
    f.discard()
    with pytest.raises(EncfsError, match="discarded"):
        f.commit()
    assert not fs.exists(f"{tmp_path}/g")


def test_threads_sharing_one_reader_get_their_own_chunks(tmp_path, keyref, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from encfs import backend
    from encfs import cobblestone as cs

    monkeypatch.setattr(backend, "_BACKENDS", {})
    monkeypatch.setenv("ENCFS_BACKEND", "python")
    fs = EncFileSystem(key=keyref, skip_instance_cache=True)
    data = b"".join(bytes([i]) * cs.CHUNK_SIZE for i in range(40))
    fs.pipe_file(f"{tmp_path}/c", data)
    reader = fs.open_reader(f"{tmp_path}/c")

    def check(i: int) -> bool:
        out = bytearray(cs.CHUNK_SIZE)
        reader.read_into(i % 40, 1, memoryview(out))
        return bytes(out) == bytes([i % 40]) * cs.CHUNK_SIZE

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(check, range(2000)))
    reader.close()


def test_temp_files_are_private_and_final_mode_follows_umask(tmp_path):
    from encfs.sink import LocalSink

    sink = LocalSink(str(tmp_path / "new"))
    assert stat.S_IMODE(os.stat(sink.tmp).st_mode) == 0o600
    sink.write(b"x")
    sink.commit()
    old = os.umask(0o027)
    try:
        sink = LocalSink(str(tmp_path / "new2"))
        sink.write(b"y")
        sink.commit()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "new2").st_mode) == 0o640


def test_keygen_never_overwrites_without_force(tmp_path):
    from encfs.cli import main

    assert main(["keygen", "-o", str(tmp_path / "k")]) == 0
    first = (tmp_path / "k").read_text()
    assert main(["keygen", "-o", str(tmp_path / "k")]) == 1
    assert (tmp_path / "k").read_text() == first
    assert main(["keygen", "-o", str(tmp_path / "k"), "--force"]) == 0
    assert (tmp_path / "k").read_text() != first
    assert stat.S_IMODE(os.stat(tmp_path / "k").st_mode) == 0o600


def test_random_reads_keep_small_buffers(enc):
    from encfs import cobblestone as cs

    fs, root = enc
    fs.pipe_file(f"{root}/r", os.urandom(300 * cs.CHUNK_SIZE))
    with fs.open(f"{root}/r", "rb") as f:
        for pos in (5, 90 * cs.CHUNK_SIZE + 7, 200 * cs.CHUNK_SIZE, 17):
            f.seek(pos)
            f.read(4096)
        assert sum(len(b) for b in f._ct_bufs) <= 2 * cs.CT_CHUNK_SIZE
        assert len(f._win) <= 2 * cs.CHUNK_SIZE


def test_listing_survives_a_vanished_file(enc, monkeypatch):
    fs, root = enc
    fs.pipe_file(f"{root}/a", b"a")
    fs.pipe_file(f"{root}/b", b"b")
    real = fs.fs.cat_file

    def flaky(path, start=None, end=None, **kw):
        if path.endswith("/b"):
            raise FileNotFoundError(path)
        return real(path, start=start, end=end, **kw)

    monkeypatch.setattr(fs.fs, "cat_file", flaky)
    monkeypatch.setattr(fs.fs, "cat_ranges", lambda paths, *a, **k: [FileNotFoundError(p) for p in paths])
    fs.invalidate_cache()
    entries = {os.path.basename(e["name"]): e for e in fs.ls(root)}
    assert entries["a"]["encrypted"] is True and entries["b"]["encrypted"].startswith("invalid")


def test_someone_elses_symlink_is_replaced_not_followed(enc):
    fs, root = enc
    victim = f"{root}/victim"
    open(victim, "wb").write(b"do not touch")
    os.symlink(victim, f"{root}/planted")
    os.lchown(f"{root}/planted", 65534, 65534)
    fs.pipe_file(f"{root}/planted", b"new")
    assert open(victim, "rb").read() == b"do not touch"
    assert not os.path.islink(f"{root}/planted") and fs.cat_file(f"{root}/planted") == b"new"
