"""Regression tests for the outside audit's findings (the hardening issue), one promise each:
truncation never reads as a shorter valid file, a shared reader never releases unverified
bytes, a write is discarded only by a failed ``with`` that owns it, modes and temporaries
are handled with care, and derived keys live in memory that is wiped."""

from __future__ import annotations

import os
import struct

import fsspec
import numpy as np
import pytest

from encfs import IntegrityError
from encfs import cobblestone as cs
from encfs.filesystem import EncFileSystem
from encfs.sink import TEMP_MARK

from .conftest import write_key


def _payload_start(raw: bytes) -> int:
    return struct.unpack(">I", raw[28:32])[0] + cs.PAYLOAD_PREFIX_SIZE


def _leftovers(d) -> list[str]:
    return [n for n in os.listdir(d) if TEMP_MARK in n]


# -- 1. truncation at a chunk boundary is an error wherever a size or a read is reported ------


@pytest.mark.parametrize("kept_chunks", [0, 1, 3])
def test_file_cut_at_a_chunk_boundary_never_opens(enc, kept_chunks):
    """Cut to header + prefix + k whole chunks + 16 bytes: lengths alone say it is a valid
    file of k * 16 KiB bytes; opening it (any reader) must say it is not."""
    fs, root = enc
    data = os.urandom(5 * cs.CHUNK_SIZE + 100)
    fs.pipe_file(f"{root}/f", data)
    raw = open(f"{root}/f", "rb").read()
    cut = raw[: _payload_start(raw) + kept_chunks * cs.CT_CHUNK_SIZE + cs.TAG_SIZE]
    open(f"{root}/f", "wb").write(cut)
    fs.invalidate_cache()
    assert fs.size(f"{root}/f") == kept_chunks * cs.CHUNK_SIZE  # what lengths alone claim
    with pytest.raises(IntegrityError) as e:
        fs.open(f"{root}/f", "rb")
    assert e.value.chunk_index == kept_chunks
    with pytest.raises(IntegrityError):
        fs.cat_file(f"{root}/f")
    with pytest.raises(IntegrityError):
        fs.cat_file(f"{root}/f", start=0, end=0)


def test_pyarrow_input_file_of_a_cut_file_is_an_error(enc):
    pafs = pytest.importorskip("pyarrow.fs")
    fs, root = enc
    fs.pipe_file(f"{root}/f", os.urandom(3 * cs.CHUNK_SIZE))
    raw = open(f"{root}/f", "rb").read()
    open(f"{root}/f", "wb").write(raw[: _payload_start(raw) + cs.TAG_SIZE])
    fs.invalidate_cache()
    handler = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    with pytest.raises(IntegrityError):
        handler.open_input_file(f"{root}/f").read()


def test_record_dataset_refuses_a_cut_shard(enc, keyref):
    from encfs.loaders.records import EncryptedRecordDataset

    fs, root = enc
    rec = np.arange(4 * 1000 * 8, dtype=np.float32).reshape(4, 1000, 8)
    urls = []
    for k in range(4):
        fs.pipe_file(f"{root}/s{k}", rec[k].tobytes())
        urls.append(f"encfs::file://{root}/s{k}")
    opts = {"encfs": {"key": keyref}}
    assert len(EncryptedRecordDataset(urls, (8,), storage_options=opts)) == 4000
    raw = open(f"{root}/s2", "rb").read()
    open(f"{root}/s2", "wb").write(raw[: _payload_start(raw) + cs.TAG_SIZE])
    with pytest.raises(IntegrityError, match="s2"):
        EncryptedRecordDataset(urls, (8,), storage_options=opts)


# -- 3. only a failed ``with`` that owns the file discards it ----------------------------------


def test_close_inside_except_after_a_later_exception_commits(enc):
    fs, root = enc
    f = fs.open(f"{root}/ckpt", "wb")
    try:
        f.write(b"state before the crash")
        raise RuntimeError("training failed")
    except RuntimeError:
        f.write(b"; emergency")
        f.close()
    assert fs.cat_file(f"{root}/ckpt") == b"state before the crash; emergency"


def test_close_from_a_helpers_finally_commits(enc):
    fs, root = enc

    def save(f):
        try:
            f.write(b"saved")
            raise ValueError("caller's problem")
        finally:
            f.close()

    with pytest.raises(ValueError):
        save(fs.open(f"{root}/g", "wb"))
    assert fs.cat_file(f"{root}/g") == b"saved"


@pytest.mark.parametrize("mode", ["wb", "wt"])
def test_failed_fsspec_open_block_discards(enc, keyref, mode):
    fs, root = enc
    fs.pipe_file(f"{root}/h", b"old")
    with pytest.raises(RuntimeError):
        with fsspec.open(f"encfs::file://{root}/h", mode, encfs={"key": keyref}) as f:
            f.write(b"new half" if "b" in mode else "new half")
            raise RuntimeError("boom")
    assert fs.cat_file(f"{root}/h") == b"old" and not _leftovers(root)


def test_failed_text_mode_block_discards_and_clean_one_commits(enc):
    fs, root = enc
    fs.pipe_file(f"{root}/t", b"old")
    with pytest.raises(RuntimeError):
        with fs.open(f"{root}/t", "w") as f:
            f.write("half")
            raise RuntimeError("boom")
    assert fs.cat_file(f"{root}/t") == b"old" and not _leftovers(root)
    with fs.open(f"{root}/t", "w", encoding="utf-8") as f:
        f.write("new ✓")
    assert fs.cat_file(f"{root}/t") == "new ✓".encode()


def test_checkpoint_written_by_a_failing_context_managers_exit_is_kept(enc):
    """An ``__exit__`` that is not the file's owner (a trainer saving on failure) commits."""
    fs, root = enc

    class Trainer:
        def __enter__(self):
            return self

        def __exit__(self, et, ev, tb):
            f = fs.open(f"{root}/emergency", "wb")
            f.write(b"weights")
            f.close()

    with pytest.raises(RuntimeError):
        with Trainer():
            raise RuntimeError("diverged")
    assert fs.cat_file(f"{root}/emergency") == b"weights"


# -- 4. a new file never takes a symlink's mode ------------------------------------------------


def test_replacing_someone_elses_symlink_gets_the_umask_default_not_0777(enc):
    """Also the second review's 'a symlink planted by another user is replaced, never
    followed' (moved here from tests/test_atomic.py, which it covered in full)."""
    fs, root = enc
    target = f"{root}/elsewhere"
    open(target, "wb").write(b"not yours")
    os.symlink(target, f"{root}/link")
    os.lchown(f"{root}/link", 12345, 12345)  # planted by another user: replaced, not followed
    fs.pipe_file(f"{root}/link", b"secret")
    st = os.lstat(f"{root}/link")
    umask = os.umask(0)
    os.umask(umask)
    assert not os.path.islink(f"{root}/link") and st.st_mode & 0o777 == 0o666 & ~umask
    assert open(target, "rb").read() == b"not yours"
    assert fs.cat_file(f"{root}/link") == b"secret"


def test_writing_through_own_symlink_keeps_the_targets_mode(enc):
    fs, root = enc
    open(f"{root}/real", "wb").write(b"x")
    os.chmod(f"{root}/real", 0o600)
    os.symlink(f"{root}/real", f"{root}/mine")
    fs.pipe_file(f"{root}/mine", b"secret")
    assert os.path.islink(f"{root}/mine") and os.stat(f"{root}/real").st_mode & 0o777 == 0o600
    assert fs.cat_file(f"{root}/real") == b"secret"


# -- 7. a failure at commit leaves no temporary file -------------------------------------------

FULL_AT_COMMIT = """
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
from encfs.filesystem import EncFileSystem
fs = EncFileSystem(key=sys.argv[1], skip_instance_cache=True)
try:
    fs.pipe_file(sys.argv[2], os.urandom(3000))   # buffered until commit's flush, which fails
except OSError as e:
    print("OSError", e.errno, flush=True)
    sys.exit(3)
"""


def test_disk_full_at_commit_leaves_no_temporary(enc, keyref):
    import subprocess
    import sys

    fs, root = enc
    fs.pipe_file(f"{root}/d", b"keep me")
    res = subprocess.run([sys.executable, "-c", FULL_AT_COMMIT, keyref, f"{root}/d"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 3 and res.stdout.startswith("OSError 27"), res.stderr
    assert fs.cat_file(f"{root}/d") == b"keep me" and not _leftovers(root)


# -- 12. temporaries of killed writers are removed, live ones kept ------------------------------

SLOW_WRITER = """
import os, sys, time
from encfs.filesystem import EncFileSystem
fs = EncFileSystem(key=sys.argv[1], skip_instance_cache=True)
with fs.open(sys.argv[2], "wb") as f:
    f.write(os.urandom(100_000))
    print("written", flush=True)
    time.sleep(120)
"""


def _start_writer(keyref: str, path: str):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, keyref, path], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "written"
    return proc


def _age(root, seconds: float) -> None:
    for n in _leftovers(root):
        t = os.stat(f"{root}/{n}").st_mtime - seconds
        os.utime(f"{root}/{n}", (t, t))


def test_stale_temporaries_are_removed_and_live_ones_kept(enc, keyref):
    import signal
    import subprocess
    import sys

    from encfs.sink import remove_stale_temporaries

    fs, root = enc
    dead = _start_writer(keyref, f"{root}/dead")
    dead.send_signal(signal.SIGKILL)
    dead.wait(timeout=30)
    live = _start_writer(keyref, f"{root}/live")
    try:
        assert len(_leftovers(root)) == 2
        _age(root, 3600)
        open(f"{root}/.unrelated.tmp", "wb").write(b"not ours")
        removed = remove_stale_temporaries(None, root)
        left = _leftovers(root)
        assert len(removed) == 1 and "dead" in os.path.basename(removed[0])
        assert len(left) == 1 and "live" in left[0], "a live writer's temporary is never removed"
        assert os.path.exists(f"{root}/.unrelated.tmp")
    finally:
        live.kill()
        live.wait(timeout=30)
    _age(root, 3600)
    # the next write to the directory, in a new process, cleans up by itself
    subprocess.run([sys.executable, "-c", "import sys; from encfs.filesystem import EncFileSystem as E; "
                    "E(key=sys.argv[1], skip_instance_cache=True).pipe_file(sys.argv[2], b'x')", keyref, f"{root}/next"],
                   check=True, timeout=120)
    assert not _leftovers(root)
    assert sorted(fs.ls(root, detail=False)) == [f"{root}/.unrelated.tmp", f"{root}/next"]


# -- 8. the write path leaves no plaintext in freed heap memory --------------------------------

HEAP_SCAN = r"""
import os, re, sys
from encfs.filesystem import EncFileSystem

A, B = os.urandom(16), os.urandom(16)   # plaintext is A+B repeated; A+B never exists as one object
SIZE = 2 << 20
buf = bytearray(SIZE)
for i in range(0, SIZE, 32):
    buf[i : i + 16] = A
    buf[i + 16 : i + 32] = B
fs = EncFileSystem(key=sys.argv[1], backend=sys.argv[3], skip_instance_cache=True)
with fs.open(sys.argv[2], "wb") as f:
    view = memoryview(buf)
    for i in range(0, SIZE, 1000):
        f.write(view[i : i + 1000])
    view.release()
buf[:] = bytes(SIZE)   # the caller wipes its own copy

def hits():
    found = 0
    with open("/proc/self/maps") as m, open("/proc/self/mem", "rb", 0) as mem:
        for line in m:
            parts = line.split()
            if "rw" not in parts[1] or (len(parts) > 5 and parts[5].startswith("/")):
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            try:
                data = os.pread(mem.fileno(), hi - lo, lo)
            except OSError:
                continue
            start = data.find(A)
            while start != -1:
                if data[start + 16 : start + 32] == B:
                    found += 1
                start = data.find(A, start + 1)
            del data
    return found

print(hits(), flush=True)
"""


@pytest.mark.parametrize("backend", ["python", "auto"])
def test_small_writes_leave_no_plaintext_in_the_heap(enc, keyref, backend):
    import subprocess
    import sys

    fs, root = enc
    res = subprocess.run([sys.executable, "-c", HEAP_SCAN, keyref, f"{root}/p", backend], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout.strip()) == 0, "plaintext of the write path remains in process memory"
    assert len(fs.cat_file(f"{root}/p")) == 2 << 20


# -- 10. what a transaction does when a commit fails midway ------------------------------------


def test_transaction_commit_failure_keeps_earlier_discards_rest(enc):
    from encfs import TransactionError

    fs, root = enc
    fs.pipe_file(f"{root}/b", b"old b")
    with pytest.raises(TransactionError) as e:
        with fs.transaction:
            for name in "abc":
                with fs.open(f"{root}/{name}", "wb") as f:
                    f.write(f"new {name}".encode())
            # the second commit fails: its temporary file vanished (as on a full or broken disk)
            second = fs.transaction.files[1]
            os.unlink(second._w._sink.tmp)
    assert e.value.committed == [f"{root}/a"] and e.value.failed == f"{root}/b"
    assert fs.cat_file(f"{root}/a") == b"new a"
    assert fs.cat_file(f"{root}/b") == b"old b"
    assert not fs.exists(f"{root}/c") and not _leftovers(root)
    assert not fs._intrans, "the transaction is over: later writes commit normally"
    fs.pipe_file(f"{root}/d", b"d")
    assert fs.cat_file(f"{root}/d") == b"d"


# -- 9. a hostile passphrase stanza cannot buy more than one ordinary unlock -------------------


def _with_argon2_params(raw: bytes, memory_kib: int, iterations: int) -> bytes:
    """The same file with its passphrase stanza's Argon2 cost rewritten (MAC then fails, but
    the reader must refuse before it spends anything)."""
    from encfs.format import parse

    header = parse(raw)
    (stanza,) = [s for s in header.stanzas if s.type == "passphrase"]
    new = stanza.params[:16] + struct.pack(">III", memory_kib, iterations, 1)
    return raw.replace(stanza.params, new, 1)


def test_passphrase_stanza_above_the_read_bound_is_refused_before_argon2(tmp_path, monkeypatch):
    from encfs import FormatError
    from encfs.keys import passphrase

    monkeypatch.setenv("PW", "correct horse")
    fs = EncFileSystem(key="passphrase:env:PW", skip_instance_cache=True)
    fs.pipe_file(f"{tmp_path}/f", b"data")
    raw = open(f"{tmp_path}/f", "rb").read()
    open(f"{tmp_path}/hostile", "wb").write(_with_argon2_params(raw, 1 << 20, 4))
    runs = []
    real = passphrase.Argon2id
    monkeypatch.setattr(passphrase, "Argon2id", lambda **kw: runs.append(kw) or real(**kw))
    reader = EncFileSystem(key="passphrase:env:PW", skip_instance_cache=True)
    with pytest.raises(FormatError, match="more than this reader allows"):
        reader.cat_file(f"{tmp_path}/hostile")
    assert runs == [], "no Argon2id run for a stanza over the bound"
    assert reader.cat_file(f"{tmp_path}/f") == b"data" and len(runs) == 1


def test_raising_the_read_bound_opens_files_written_with_stronger_parameters(tmp_path, monkeypatch):
    from encfs import FormatError
    from encfs.keys import Argon2Params, Passphrase
    from encfs.secret import SecretBytes

    strong = Argon2Params(memory_kib=4096, iterations=1, lanes=1)  # above the (test) default of 1 MiB
    writer = Passphrase(SecretBytes(b"pw"), params=strong)
    fs = EncFileSystem(key=writer, skip_instance_cache=True)
    fs.pipe_file(f"{tmp_path}/f", b"strong")
    assert fs.cat_file(f"{tmp_path}/f") == b"strong", "the writer's own parameters are within its bound"
    plain = EncFileSystem(key=Passphrase(SecretBytes(b"pw")), skip_instance_cache=True)
    with pytest.raises(FormatError, match="raise the bound"):
        plain.cat_file(f"{tmp_path}/f")
    raised = EncFileSystem(key=Passphrase(SecretBytes(b"pw"), max_params=strong), skip_instance_cache=True)
    assert raised.cat_file(f"{tmp_path}/f") == b"strong"
    monkeypatch.setenv("ENCFS_ARGON2_MAX_MEMORY_KIB", "4096")
    monkeypatch.setenv("PW", "pw")
    assert EncFileSystem(key="passphrase:env:PW", skip_instance_cache=True).cat_file(f"{tmp_path}/f") == b"strong"


# -- 18. derived keys go straight into wipeable memory -----------------------------------------


def test_no_key_derivation_returns_bytes(tmp_path, monkeypatch, keyref):
    """Every KDF and key unwrap on the read and write paths writes into locked memory
    (``derive_into``/``decrypt_into``); the ``bytes``-returning calls are never used."""
    from cryptography.hazmat.primitives.ciphers import aead

    from encfs import cobblestone, format
    from encfs.keys import base, passphrase

    def only_into(cls, forbidden):
        class Strict:
            def __init__(self, *a, **kw):
                self._inner = cls(*a, **kw)

            def __getattr__(self, name):
                if name == forbidden:
                    raise AssertionError(f"{cls.__name__}.{name} returns key bytes that are never wiped")
                return getattr(self._inner, name)

        return Strict

    monkeypatch.setattr(cobblestone, "HKDFExpand", only_into(cobblestone.HKDFExpand, "derive"))
    monkeypatch.setattr(format, "HKDF", only_into(format.HKDF, "derive"))
    monkeypatch.setattr(base, "HKDF", only_into(base.HKDF, "derive"))
    monkeypatch.setattr(passphrase, "Argon2id", only_into(passphrase.Argon2id, "derive"))
    monkeypatch.setattr(base, "AESGCM", only_into(aead.AESGCM, "decrypt"))
    monkeypatch.setenv("PW", "pw")
    ident = write_key(tmp_path / "id.key", x25519=True)
    fs = EncFileSystem(key=[keyref, "passphrase:env:PW", ident], skip_instance_cache=True)
    fs.pipe_file(f"{tmp_path}/f", b"through every recipient type")
    for ref in (keyref, "passphrase:env:PW", ident):
        assert EncFileSystem(key=ref, skip_instance_cache=True).cat_file(f"{tmp_path}/f") == b"through every recipient type"


# -- 14 (part). an object replaced while it is read is an encfs error -------------------------


def test_s3_object_replaced_while_open_is_a_file_changed_error(s3, keyref):
    from encfs import FileChangedError

    s3fs_, bucket, _ = s3
    fs = EncFileSystem(fs=s3fs_, key=keyref, skip_instance_cache=True)
    old, new = os.urandom(6 << 20), os.urandom(6 << 20)
    fs.pipe_file(f"{bucket}/x", old)
    with fs.open(f"{bucket}/x", "rb") as f:
        assert f.read(1000) == old[:1000]
        fs.pipe_file(f"{bucket}/x", new)
        with pytest.raises(FileChangedError, match="replaced or rewritten") as e:
            f.seek(5 << 20)  # beyond the first read's window
            f.read(1000)
    assert e.value.path.endswith("/x") and isinstance(e.value, OSError)
    assert fs.cat_file(f"{bucket}/x") == new


def test_cli_staging_files_are_never_taken_for_stale(tmp_path):
    """A directory run stages outputs under temporary names until every file succeeded; a
    clean-up by another process meanwhile must not remove them (they stay locked)."""
    import fsspec.implementations.local as local

    from encfs.cli import _Outputs
    from encfs.sink import fill_atomically, remove_stale_temporaries

    out = _Outputs(local.LocalFileSystem())
    sink = out.sink(f"{tmp_path}/out/a", 0o600, staged=True)
    fill_atomically(sink, lambda s: s.write(b"staged"))
    _age(f"{tmp_path}/out", 3600)
    assert remove_stale_temporaries(None, f"{tmp_path}/out") == []
    out.publish()
    assert open(f"{tmp_path}/out/a", "rb").read() == b"staged" and not _leftovers(f"{tmp_path}/out")


# -- 6. what the format does not promise, shown (SECURITY.md, "What encfs does not protect") ----
# These pass because the gaps exist; the signed-manifest work closes them, and then these
# tests change into refusals.


def test_gap_two_whole_files_under_the_same_key_can_be_swapped(enc):
    fs, root = enc
    fs.pipe_file(f"{root}/a", b"labels for shard a")
    fs.pipe_file(f"{root}/b", b"labels for shard b")
    a, b = open(f"{root}/a", "rb").read(), open(f"{root}/b", "rb").read()
    open(f"{root}/a", "wb").write(b)
    open(f"{root}/b", "wb").write(a)
    assert fs.cat_file(f"{root}/a") == b"labels for shard b"  # authentic, but not this path's


def test_gap_a_file_can_be_rolled_back_to_an_older_ciphertext(enc):
    fs, root = enc
    fs.pipe_file(f"{root}/model", b"weights v1")
    v1 = open(f"{root}/model", "rb").read()
    fs.pipe_file(f"{root}/model", b"weights v2")
    open(f"{root}/model", "wb").write(v1)
    assert fs.cat_file(f"{root}/model") == b"weights v1"


def test_gap_a_public_key_holder_can_write_files_the_identity_reads_as_authentic(tmp_path):
    from encfs.keys import load_reference, public_reference

    ident_ref = write_key(tmp_path / "id.key", x25519=True)
    public = public_reference(load_reference(ident_ref).recipient.public)
    EncFileSystem(recipients=public, skip_instance_cache=True).pipe_file(f"{tmp_path}/forged", b"poisoned shard")
    assert EncFileSystem(identities=ident_ref, skip_instance_cache=True).cat_file(f"{tmp_path}/forged") == b"poisoned shard"


# -- memory: what SECURITY.md says about locked, dump-excluded buffers -------------------------


def _vm_flags(addr: int) -> set[str]:
    """The VmFlags of the mapping holding ``addr``, from /proc/self/smaps."""
    flags: set[str] = set()
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                flags = set(line.split()[1:])
    return flags


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs /proc/self/smaps (Linux)")
def test_key_and_window_memory_is_locked_and_left_out_of_core_dumps(enc):
    from encfs.securemem import buffer_address

    fs, root = enc
    fs.pipe_file(f"{root}/f", os.urandom(100_000))
    with fs.open(f"{root}/f", "rb") as f:
        f.read(10)
        window = f._window.buffer
        key = f._r._keys.key
        for addr in (buffer_address(window), buffer_address(key._arr)):
            flags = _vm_flags(addr)
            assert "dd" in flags, "excluded from core dumps"
            if window.locked:
                assert "lo" in flags, "locked in RAM"
    assert window.released and key.wiped


# -- 3 (second audit). owners the frame walk must see, and handlers it must not mistake -------


def _owner_cases(fs, p):
    """(name, body, keeps_old): body writes b'PARTIAL' to ``p`` through a wrapper and fails."""
    import codecs
    import contextlib
    import io

    def closing():
        with contextlib.closing(fs.open(p, "wb")) as f:
            f.write(b"PARTIAL")
            raise RuntimeError

    def text_wrapper():
        with io.TextIOWrapper(fs.open(p, "wb"), encoding="utf-8") as t:
            t.write("PARTIAL")
            raise RuntimeError

    def buffered():
        with io.BufferedWriter(fs.open(p, "wb")) as t:
            t.write(b"PARTIAL")
            raise RuntimeError

    def stream_writer():
        with codecs.getwriter("utf-8")(fs.open(p, "wb")) as w:
            w.write("PARTIAL")
            raise RuntimeError

    @contextlib.contextmanager
    def opened():
        f = fs.open(p, "wb")
        try:
            yield f
        finally:
            f.close()

    def generator_cm():
        with opened() as f:
            f.write(b"PARTIAL")
            raise RuntimeError

    def exit_stack_callback():
        with contextlib.ExitStack() as st:
            f = fs.open(p, "wb")
            st.callback(f.close)
            f.write(b"PARTIAL")
            raise RuntimeError

    def exit_stack_context():
        with contextlib.ExitStack() as st:
            st.enter_context(fs.open(p, "wb")).write(b"PARTIAL")
            raise RuntimeError

    class Holder:
        def __init__(this):
            this._f = fs.open(p, "wb")

        def __enter__(this):
            return this

        def __exit__(this, *exc):
            this._f.close()

    def own_wrapper():
        with Holder() as h:
            h._f.write(b"PARTIAL")
            raise RuntimeError

    def explicit_finally():
        f = fs.open(p, "wb")
        try:
            f.write(b"PARTIAL")
            raise RuntimeError
        finally:
            f.close()  # documented: an explicit close commits

    return [
        ("contextlib.closing", closing, True),
        ("io.TextIOWrapper", text_wrapper, True),
        ("io.BufferedWriter", buffered, True),
        ("codecs StreamWriter", stream_writer, True),
        ("@contextmanager with finally close", generator_cm, True),
        ("ExitStack.callback(f.close)", exit_stack_callback, True),
        ("ExitStack.enter_context", exit_stack_context, True),
        ("own wrapper, __exit__(this, *exc), self._f", own_wrapper, True),
        ("explicit close in finally", explicit_finally, False),
    ]


@pytest.mark.parametrize("case", range(9))
def test_failed_with_of_any_owner_keeps_the_old_file(enc, case):
    fs, root = enc
    p = f"{root}/w{case}"
    fs.pipe_file(p, b"OLD")
    name, body, keeps_old = _owner_cases(fs, p)[case]
    with pytest.raises(RuntimeError):
        body()
    fs.invalidate_cache()
    assert fs.cat_file(p) == (b"OLD" if keeps_old else b"PARTIAL"), name
    assert not _leftovers(root)


def test_checkpoint_opened_and_closed_inside_a_failing_exit_is_kept(enc):
    """An ``__exit__`` that holds the file as ``self.f`` but opened it itself, while the failure
    unwinds, is a handler writing an emergency checkpoint, not a failing owner."""
    fs, root = enc
    fs.pipe_file(f"{root}/ckpt", b"OLD")

    class Trainer:
        def __enter__(self):
            return self

        def __exit__(self, et, e, tb):
            self.f = fs.open(f"{root}/ckpt", "wb")
            self.f.write(b"EMERGENCY")
            self.f.close()

    with pytest.raises(RuntimeError):
        with Trainer():
            raise RuntimeError("training crashed")
    assert fs.cat_file(f"{root}/ckpt") == b"EMERGENCY"


def test_failed_to_parquet_through_a_file_object_keeps_the_old_file(enc):
    """pyarrow removes a *path* destination with ``os.remove`` when ``write_table`` fails,
    bypassing the filesystem (README, Known issues); through a file object encfs keeps the
    old file."""
    pd = pytest.importorskip("pandas")
    fs, root = enc
    fs.pipe_file(f"{root}/t.parquet", b"OLD")
    df = pd.DataFrame({"a": range(10)})
    with pytest.raises(Exception):
        with fs.open(f"{root}/t.parquet", "wb") as f:
            df.to_parquet(f, compression="nonsense-codec")
    assert fs.cat_file(f"{root}/t.parquet") == b"OLD"


# -- errors name the file (read-path issue) -----------------------------------------------------


def test_errors_name_the_file_through_every_api(enc, other_keyref):
    pa = pytest.importorskip("pyarrow.parquet")
    pd = pytest.importorskip("pandas")
    from encfs import FormatError, IntegrityError, NoMatchingKeyError

    fs, root = enc
    pd.DataFrame({"a": range(5)}).to_parquet(f"{root}/plain.parquet")  # a stray plaintext file
    fs.pipe_file(f"{root}/bad", os.urandom(50_000))
    raw = bytearray(open(f"{root}/bad", "rb").read())
    raw[-100] ^= 1
    open(f"{root}/bad", "wb").write(raw)
    fs.pipe_file(f"{root}/other", b"x")
    wrong = EncFileSystem(key=other_keyref, skip_instance_cache=True)
    for call, err, path in [
        (lambda: fs.cat_file(f"{root}/plain.parquet"), FormatError, "plain.parquet"),
        (lambda: pa.read_table(f"{root}/plain.parquet", filesystem=fs), FormatError, "plain.parquet"),
        (lambda: fs.open(f"{root}/bad").read(), IntegrityError, "bad"),
        (lambda: wrong.cat_file(f"{root}/other"), NoMatchingKeyError, "other"),
    ]:
        with pytest.raises(err) as e:
            call()
        assert e.value.path == f"{root}/{path}" and str(e.value).startswith(f"{root}/{path}: ")
    with pytest.raises(FormatError, match="allow_plaintext=True"):
        pd.read_parquet(f"encfs::file://{root}/plain.parquet", storage_options={"encfs": {"key": fs.keyring._key[0]}})


def test_cli_local_names_with_double_colons_and_unknown_protocols(tmp_path, keyref):
    """A local name fsspec would take for a protocol chain ('out::gz') is a local path; an
    unknown protocol is one typed line, not 'unexpected ValueError'."""
    import subprocess
    import sys

    (tmp_path / "plain").write_bytes(b"secret")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "encfs.cli", *args], capture_output=True, cwd=tmp_path, timeout=120)

    assert run("encrypt", "-k", keyref, "--no-progress", "--", "plain", "out::gz").returncode == 0
    assert (tmp_path / "out::gz").exists()
    assert run("decrypt", "-k", keyref, "--", "out::gz", "-").stdout == b"secret"
    res = run("decrypt", "-k", keyref, "--", "zz://x", "-")
    assert res.returncode == 1 and res.stderr.decode().startswith("encfs: error: zz://x: not a path or URL")
    assert b"Traceback" not in res.stderr and b"unexpected" not in res.stderr


def test_write_errors_name_the_file(enc):
    from encfs import EncfsError

    fs, root = enc
    f = fs.open(f"{root}/w", "wb", autocommit=False)
    f.discard()
    with pytest.raises(EncfsError, match="discarded") as e:
        f.commit()
    assert e.value.path == f"{root}/w" and str(e.value).startswith(f"{root}/w: ")
    nokey = EncFileSystem(skip_instance_cache=True)
    with pytest.raises(EncfsError, match="no encryption key") as e:
        nokey.pipe_file(f"{root}/x", b"x")
    assert e.value.path == f"{root}/x"


# -- second audit of the rewritten paths ----------------------------------------------------------


class _RaisingProxy:
    def __getattr__(self, name):
        raise RuntimeError("Working outside of application context.")


class _EndlessList(list):
    def __iter__(self):
        while True:
            yield None


@pytest.mark.parametrize("extra", [_RaisingProxy(), _EndlessList()], ids=["raising-proxy", "endless-container"])
def test_owner_walk_over_hostile_objects_neither_hangs_nor_raises(enc, extra):
    """The frame walk looks at someone else's objects: bounded, and never lets their errors out
    of close() (the user's own exception propagates; the old file is kept)."""
    fs, root = enc
    p = f"{root}/out"
    fs.pipe_file(p, b"OLD")

    class Saver:
        def __init__(self):
            self.extra, self.f = extra, fs.open(p, "wb")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    with pytest.raises(KeyError):
        with Saver() as s:
            s.f.write(b"NEW")
            raise KeyError("user error")
    assert s.f.closed and fs.cat_file(p) == b"OLD" and not _leftovers(root)


def test_readline_and_iteration_are_whole_under_threads(enc):
    """Each readline() of a file object shared by threads is one line of the plaintext."""
    import sys
    import threading

    fs, root = enc
    lines = [b"%06d:%s\n" % (i, b"x" * (i % 97)) for i in range(3000)]
    fs.pipe_file(f"{root}/lines", b"".join(lines))
    valid, bad = set(lines), []
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with fs.open(f"{root}/lines", "rb") as f:

            def work(seed: int) -> None:
                import random

                rng = random.Random(seed)
                for _ in range(150):
                    f.seek(rng.choice([0, 7 * 1000, 20_000, 100_000]))
                    line = f.readline()
                    if line and line not in valid and not any(x.endswith(line) for x in lines):
                        bad.append(line[:40])

            ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
    finally:
        sys.setswitchinterval(old)
    assert not bad, bad[:3]


@pytest.mark.parametrize("backend", ["python", "auto", "native"])
def test_closing_a_chunk_reader_waits_for_reads_in_progress(enc, keyref, backend):
    """close() racing read_chunks: reads finish with plaintext or see 'closed', never a false
    truncation from a descriptor closed under them."""
    import threading

    from encfs import EncfsError

    pytest.importorskip("encfs._native") if backend != "python" else None
    fs, root = enc
    fs = EncFileSystem(key=keyref, backend=backend, skip_instance_cache=True)
    data = os.urandom(18 * cs.CHUNK_SIZE)
    fs.pipe_file(f"{root}/f", data)
    wrong = []
    for _ in range(20):
        r = fs.open_reader(f"{root}/f")

        def work():
            out = bytearray(cs.CHUNK_SIZE)
            for i in range(100):
                try:
                    r.read_chunks(i % 18, 1, memoryview(out))
                except ValueError:
                    return
                except EncfsError as e:
                    wrong.append(repr(e))
                    return
                if bytes(out) != data[(i % 18) * cs.CHUNK_SIZE : (i % 18 + 1) * cs.CHUNK_SIZE]:
                    wrong.append("bytes")
                    return

        ts = [threading.Thread(target=work) for _ in range(4)]
        for t in ts:
            t.start()
        r.close()
        for t in ts:
            t.join()
    assert not wrong, wrong[:3]


def test_fork_local_factories_may_reenter():
    """Found by CI (a hang): a ForkLocal factory made a filesystem, garbage collection ran
    another filesystem's finalizer, which took a ForkLocal too, on the same thread."""
    import threading

    from encfs.forking import ForkLocal

    inner = ForkLocal(lambda: 1)
    outer = ForkLocal(lambda: inner.get() + 1)
    result = []
    t = threading.Thread(target=lambda: result.append(outer.get()), daemon=True)
    t.start()
    t.join(timeout=10)
    assert result == [2], "a factory that gets another ForkLocal must not deadlock"
