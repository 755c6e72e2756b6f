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
