"""The write path's pipeline: a block's ciphertext is written on another thread while the next
block is encrypted. What must hold: blocks reach the sink whole and in order (never a buffer
overwritten while it is being written), small files start no thread, a failed background
write discards the file, and the pipeline itself bounds what is in flight."""

from __future__ import annotations

import os
import threading
import time

import pytest

from encfs.errors import EncfsError
from encfs.filesystem import EncFileSystem
from encfs.keys import KeyRing
from encfs.pipeline import Pipeline
from encfs.sink import LocalSink
from encfs.writer import PayloadWriter


class SlowSink:
    """A LocalSink whose writes take a while and say which thread made them."""

    def __init__(self, inner: LocalSink, delay: float = 0.003, fail_at: int | None = None):
        self.inner, self.delay, self.fail_at = inner, delay, fail_at
        self.threads: list[str] = []
        self.discarded = False

    def write(self, data):
        if self.fail_at is not None and len(self.threads) == self.fail_at:
            raise OSError(28, "No space left on device")
        self.threads.append(threading.current_thread().name)
        time.sleep(self.delay)
        return self.inner.write(bytes(data))

    def commit(self):
        self.inner.commit()

    def discard(self):
        self.discarded = True
        self.inner.discard()


@pytest.mark.parametrize("piece", [1, 5000, 16384, 3 * 16384 + 7, 1 << 20])
def test_blocks_written_in_the_background_read_back_whole(tmp_path, keyref, piece):
    """Many blocks through a slow sink, written in pieces of every shape: any buffer reused
    while its write was running would fail authentication on reading back."""
    data = os.urandom(40 * 16384 + 123)
    sink = SlowSink(LocalSink(str(tmp_path / "f")))
    w = PayloadWriter(sink, KeyRing(keyref), block_chunks=2)
    for i in range(0, len(data), piece):
        w.write(data[i : i + piece])
    w.seal()
    w.commit()
    assert EncFileSystem(key=keyref, skip_instance_cache=True).cat_file(str(tmp_path / "f")) == data
    assert sink.threads[0] == threading.current_thread().name  # the header
    assert all(t.startswith("encfs-write") for t in sink.threads[1:]), sink.threads


def test_a_one_block_file_is_written_without_a_thread(tmp_path, keyref):
    sink = SlowSink(LocalSink(str(tmp_path / "f")), delay=0)
    w = PayloadWriter(sink, KeyRing(keyref))
    w.write(b"small")
    w.seal()
    w.commit()
    assert set(sink.threads) == {threading.current_thread().name}


@pytest.mark.parametrize("fail_at", [1, 2, 7])
def test_a_failed_background_write_discards_the_file(tmp_path, keyref, fail_at):
    (tmp_path / "f").write_bytes(b"previous")
    sink = SlowSink(LocalSink(str(tmp_path / "f")), fail_at=fail_at)
    w = PayloadWriter(sink, KeyRing(keyref), block_chunks=1)
    with pytest.raises(OSError, match="No space"):
        w.write(os.urandom(20 * 16384))
        w.seal()
    with pytest.raises(EncfsError, match="earlier write failed"):
        w.commit()
    assert sink.discarded
    assert (tmp_path / "f").read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["f", "k.key"]


def test_pipeline_runs_in_order_and_bounds_what_is_pending():
    p = Pipeline(depth=2)
    seen: list[int] = []
    most = 0
    for i in range(20):
        p.put(lambda i=i: (time.sleep(0.001), seen.append(i)))
        most = max(most, len(p))
    p.drain()
    assert seen == list(range(20))
    assert most <= 2 and len(p) == 0


def test_pipeline_raises_a_failure_at_the_next_put_or_drain():
    p = Pipeline(depth=1)

    def boom():
        raise ValueError("bad block")

    p.put(boom)
    with pytest.raises(ValueError, match="bad block"):
        p.put(lambda: None)
        p.drain()
    p.put(boom)
    p.abandon()  # a caller already failing: waits, raises nothing
    assert len(p) == 0


@pytest.mark.parametrize("durable, syncs", [(True, 2), (False, 0)])
def test_durable_decides_whether_a_local_write_is_fsynced(tmp_path, keyref, monkeypatch, durable, syncs):
    """Default: the file and its directory are fsynced before the file appears. ``durable=False``
    skips both; the file still appears whole, by rename."""
    import encfs.sink as sink_mod

    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(sink_mod.os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    enc = EncFileSystem(key=keyref, durable=durable, skip_instance_cache=True)
    data = os.urandom(5 << 20)
    enc.pipe_file(str(tmp_path / "d" / "f"), data)
    assert len(synced) == syncs
    assert enc.cat_file(str(tmp_path / "d" / "f")) == data
    assert os.listdir(tmp_path / "d") == ["f"]


def test_durable_is_an_option_of_encfs_urls(tmp_path, keyref):
    import fsspec

    with fsspec.open(f"encfs::file://{tmp_path}/f", "wb", encfs={"key": keyref, "durable": False}) as f:
        f.write(b"scratch")
    assert EncFileSystem(key=keyref, skip_instance_cache=True).cat_file(str(tmp_path / "f")) == b"scratch"
