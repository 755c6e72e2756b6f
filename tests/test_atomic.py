"""A failed, interrupted or killed write never leaves a partial file at the destination,
and never disturbs what was there before."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from encfs.filesystem import EncFileSystem
from encfs.sink import TEMP_MARK


def _leftovers(d) -> list[str]:
    return [n for n in os.listdir(d) if TEMP_MARK in n]


def test_exception_inside_with_leaves_nothing(enc):
    fs, root = enc
    with pytest.raises(RuntimeError):
        with fs.open(f"{root}/new", "wb") as f:
            f.write(os.urandom(300_000))
            raise RuntimeError("boom")
    assert not os.path.exists(f"{root}/new") and not _leftovers(root)


def test_failed_overwrite_keeps_the_old_file(enc):
    fs, root = enc
    fs.pipe_file(f"{root}/f", b"old contents")
    with pytest.raises(RuntimeError):
        with fs.open(f"{root}/f", "wb") as f:
            f.write(b"new" * 100_000)
            raise RuntimeError("boom")
    assert fs.cat_file(f"{root}/f") == b"old contents" and not _leftovers(root)


def test_unclosed_writer_is_discarded_not_committed(enc):
    fs, root = enc
    f = fs.open(f"{root}/g", "wb")
    f.write(b"x" * 50_000)
    del f
    import gc

    gc.collect()
    assert not os.path.exists(f"{root}/g") and not _leftovers(root)


def test_temp_files_are_hidden_from_listings(enc):
    fs, root = enc
    fs.pipe_file(f"{root}/a", b"a")
    open(f"{root}/.b{TEMP_MARK}123456", "wb").write(b"partial")
    assert [os.path.basename(p) for p in fs.ls(root, detail=False)] == ["a"]


WRITER = textwrap.dedent(
    """
    import os, sys, time
    from encfs.filesystem import EncFileSystem
    fs = EncFileSystem(key=sys.argv[1], skip_instance_cache=True)
    with fs.open(sys.argv[2], "wb") as f:
        f.write(os.urandom(2_000_000))
        print("written", flush=True)
        time.sleep(60)
        f.write(b"never")
    """
)


def test_killed_process_leaves_destination_intact(enc, keyref):
    fs, root = enc
    fs.pipe_file(f"{root}/victim", b"previous version")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, keyref, f"{root}/victim"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "written"
        assert _leftovers(root), "the writer streams into a temporary file"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert fs.cat_file(f"{root}/victim") == b"previous version"
    assert [os.path.basename(p) for p in fs.ls(root, detail=False)] == ["victim"]


FULL_DISK = textwrap.dedent(
    """
    import os, resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    from encfs.filesystem import EncFileSystem
    fs = EncFileSystem(key=sys.argv[1], skip_instance_cache=True)
    try:
        with fs.open(sys.argv[2], "wb") as f:
            for _ in range(20):
                f.write(os.urandom(100_000))
    except OSError as e:
        print("OSError", e.errno, flush=True)
        sys.exit(3)
    """
)


def test_disk_full_is_an_oserror_and_leaves_nothing(enc, keyref):
    fs, root = enc
    fs.pipe_file(f"{root}/d", b"keep me")
    res = subprocess.run([sys.executable, "-c", FULL_DISK, keyref, f"{root}/d"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 3, res.stderr
    assert res.stdout.startswith("OSError 27")
    assert fs.cat_file(f"{root}/d") == b"keep me" and not _leftovers(root)


def test_memory_backend_write_is_atomic_too(keyref):
    import fsspec

    mem = fsspec.filesystem("memory")
    fs = EncFileSystem(fs=mem, key=keyref, skip_instance_cache=True)
    fs.pipe_file("/atomic/x", b"before")
    with pytest.raises(RuntimeError):
        with fs.open("/atomic/x", "wb") as f:
            f.write(b"y" * 100_000)
            raise RuntimeError
    assert fs.cat_file("/atomic/x") == b"before"
    assert mem.ls("/atomic", detail=False) == ["/atomic/x"]


# -- moved from tests/test_review_fixes.py (the first and second reviews' findings) ------------

import stat  # noqa: E402

import fsspec  # noqa: E402

from encfs import EncfsError  # noqa: E402
from encfs.keys import KeyRing  # noqa: E402


def test_failed_with_block_through_fsspec_open_keeps_old_file(tmp_path, keyref):
    """From the first review (tests/test_review_fixes.py, commit 927ed62): a failed ``with
    fsspec.open(...)`` block discards the new file and keeps the old one.
    """
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
    """From the first review (tests/test_review_fixes.py, commit 927ed62): a pandas write that fails
    midway keeps the old file.
    """
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
    """From the first review (tests/test_review_fixes.py, commit 927ed62): ``fs.transaction`` defers
    files to its end and discards them when it fails.
    """
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

    def discard(self):
        self.inner.discard()


def test_writer_is_poisoned_by_a_failed_write(tmp_path, keyref):
    """From the first review (tests/test_review_fixes.py, commit 927ed62): a failed write (full disk)
    poisons the writer: later writes and ``close()`` raise, nothing appears. A block is written
    in the background while the next is encrypted, so its failure is raised by the write that
    sealed it or, at the latest, by the next block's write or the final ``seal``.
    """
    from encfs.sink import LocalSink
    from encfs.writer import PayloadWriter

    (tmp_path / "f").write_bytes(b"previous")
    w = PayloadWriter(_FlakySink(LocalSink(str(tmp_path / "f"))), KeyRing(keyref), block_chunks=1)
    with pytest.raises(OSError, match="No space"):
        w.write(b"x" * 20000)
        w.seal()
    with pytest.raises(EncfsError, match="earlier write failed"):
        w.write(b"more")
    with pytest.raises(EncfsError, match="earlier write failed"):
        w.seal()
    with pytest.raises(EncfsError, match="earlier write failed"):
        w.commit()
    assert (tmp_path / "f").read_bytes() == b"previous"
    assert not [n for n in os.listdir(tmp_path) if TEMP_MARK in n]


def test_local_writes_keep_mode_and_follow_symlinks(enc):
    """From the first review (tests/test_review_fixes.py, commit 927ed62): replacing a local file keeps
    its mode, and writing through one's own symlink writes the target.
    """
    fs, root = enc
    fs.pipe_file(f"{root}/target", b"v1")
    os.chmod(f"{root}/target", 0o600)
    os.symlink(f"{root}/target", f"{root}/link")
    fs.pipe_file(f"{root}/link", b"v2")
    assert os.path.islink(f"{root}/link")
    assert fs.cat_file(f"{root}/target") == b"v2"
    assert stat.S_IMODE(os.stat(f"{root}/target").st_mode) == 0o600


def test_writes_inside_except_and_finally_are_committed(tmp_path, keyref):
    """From the second review (tests/test_review_fixes.py, commit 8c32070): writes made inside
    ``except`` and ``finally`` blocks (emergency checkpoints) are committed.
    """
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
    """From the second review (tests/test_review_fixes.py, commit 8c32070): a new exception inside an
    ``except`` block still discards the file its ``with`` owns; a discarded file cannot be
    committed.
    """
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


def test_temp_files_are_private_and_final_mode_follows_umask(tmp_path):
    """From the second review (tests/test_review_fixes.py, commit 8c32070): temporary files are created
    0600; the committed file gets the umask's mode.
    """
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


def test_a_write_accepted_in_part_is_finished_or_raises():
    """Buffered streams may take part of a large write and drop the error that stopped them
    (stdout to a closed pipe): every copy encfs makes writes the rest, which raises it."""
    import io

    from encfs.copying import copy_stream, write_all

    class Short(io.RawIOBase):
        def __init__(self, fail_after: int | None):
            self.got, self.fail_after = bytearray(), fail_after

        def writable(self) -> bool:
            return True

        def write(self, b) -> int:
            if self.fail_after is not None and len(self.got) >= self.fail_after:
                raise BrokenPipeError("reader went away")
            n = min(len(b), 1000)
            self.got += bytes(b[:n])
            return n

    data = os.urandom(10_000)
    ok = Short(None)
    write_all(ok, memoryview(data))
    assert bytes(ok.got) == data
    cut = Short(3000)
    with pytest.raises(BrokenPipeError):
        copy_stream(io.BytesIO(data), cut)
    assert len(cut.got) == 3000
