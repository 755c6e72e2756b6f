"""``UploadSink``: writes to stores with transactional uploads other than S3 (GCS, Azure).

The fake store below has the shape of gcsfs's file object: ``autocommit=False``, pieces sent
one after another by ``_upload_chunk`` (a resumable upload), nothing visible until
``commit``; ``discard`` cancels. It records which thread sent each piece, in what order, so
the tests can check that uploads overlap encryption (they run on the uploader thread), that
pieces arrive in order and whole, and that any failure leaves no object.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from encfs.filesystem import EncFileSystem
from encfs.sink import UploadSink, open_sink

PART = 256 << 10


class Upload(AbstractBufferedFile):
    def _initiate_upload(self) -> None:
        self.fs.started += 1
        self.pieces: list[bytes] = []

    def _upload_chunk(self, final: bool = False) -> bool:
        data = self.buffer.getvalue()
        if self.fs.fail_at is not None and len(self.pieces) == self.fs.fail_at:
            raise ConnectionResetError("upload piece refused")
        time.sleep(self.fs.delay)
        self.pieces.append(data)
        self.fs.senders.append(threading.current_thread().name)
        return True

    def commit(self) -> None:
        self.fs.store[self.path] = b"".join(self.pieces)

    def discard(self) -> None:
        self.fs.discarded += 1
        self.pieces = []


class FakeGCS(AbstractFileSystem):
    """In-memory store with resumable, explicitly committed uploads (``gs`` protocol)."""

    protocol = ("gs", "gcs")
    cachable = False

    def __init__(self, delay: float = 0.0, fail_at: int | None = None, **kw):
        super().__init__(**kw)
        self.store: dict[str, bytes] = {}
        self.delay, self.fail_at = delay, fail_at
        self.started = self.discarded = 0
        self.senders: list[str] = []

    def _open(self, path, mode="rb", block_size=None, autocommit=True, **kw):
        if mode == "rb":
            return _Reader(self, path, mode, block_size=block_size or 1 << 20, size=len(self.store[path]))
        assert not autocommit, "encfs must write with autocommit=False"
        return Upload(self, path, mode, block_size=block_size or PART, autocommit=False)

    def info(self, path, **kw):
        path = self._strip_protocol(path)
        if path in self.store:
            return {"name": path, "size": len(self.store[path]), "type": "file"}
        raise FileNotFoundError(path)

    def ls(self, path, detail=True, **kw):
        path = self._strip_protocol(path).rstrip("/")
        out = [self.info(p) for p in self.store if p.rsplit("/", 1)[0] == path]
        return out if detail else [e["name"] for e in out]

    def cat_file(self, path, start=None, end=None, **kw):
        return self.store[self._strip_protocol(path)][start:end]


class _Reader(AbstractBufferedFile):
    def _fetch_range(self, start, end):
        return self.fs.store[self.path][start:end]


@pytest.fixture
def parts(monkeypatch):
    monkeypatch.setenv("ENCFS_PART_SIZE", str(PART))


def test_open_sink_picks_the_transactional_upload_for_gcs():
    assert isinstance(open_sink(FakeGCS(), "b/x"), UploadSink)


def test_a_large_write_is_uploaded_in_order_on_the_uploader_thread_and_reads_back(parts, keyref):
    fake = FakeGCS(delay=0.01)
    enc = EncFileSystem(fs=fake, key=keyref, skip_instance_cache=True)
    data = os.urandom(12 * PART + 12345)
    with enc.open("b/big", "wb") as f:
        for i in range(0, len(data), 100_000):
            f.write(data[i : i + 100_000])
        assert "b/big" not in fake.store, "visible before commit"
    assert enc.cat_file("b/big") == data
    assert fake.started == 1 and fake.discarded == 0
    assert len(fake.senders) >= 12
    assert all(n.startswith("encfs-upload") for n in fake.senders[:-1]), fake.senders


def test_a_small_write_needs_no_uploader_thread(parts, keyref):
    fake = FakeGCS()
    enc = EncFileSystem(fs=fake, key=keyref, skip_instance_cache=True)
    enc.pipe_file("b/small", b"x" * 1000)
    assert enc.cat_file("b/small") == b"x" * 1000
    assert fake.senders == [threading.current_thread().name]


@pytest.mark.parametrize("fail_at", [0, 1, 5])
def test_a_failed_piece_fails_the_write_and_leaves_no_object(parts, keyref, fail_at):
    fake = FakeGCS(fail_at=fail_at)
    enc = EncFileSystem(fs=fake, key=keyref, skip_instance_cache=True)
    data = os.urandom(10 * PART)
    with pytest.raises(ConnectionResetError):
        with enc.open("b/x", "wb") as f:
            for i in range(0, len(data), 64 << 10):
                f.write(data[i : i + 64 << 10])
    assert "b/x" not in fake.store
    assert fake.discarded == 1


def test_an_error_in_the_writer_discards_the_upload_and_keeps_the_old_object(parts, keyref):
    fake = FakeGCS(delay=0.005)
    enc = EncFileSystem(fs=fake, key=keyref, skip_instance_cache=True)
    old = os.urandom(3 * PART)
    enc.pipe_file("b/x", old)
    with pytest.raises(RuntimeError, match="stop"):
        with enc.open("b/x", "wb") as f:
            f.write(os.urandom(6 * PART))
            raise RuntimeError("stop")
    assert enc.cat_file("b/x") == old
    assert fake.discarded == 1


def test_the_writer_holds_at_most_inflight_blocks(parts, keyref):
    """With a slow store the writer waits: pieces sent but not yet uploaded stay bounded."""
    fake = FakeGCS(delay=0.05)
    sink = UploadSink(fake, "b/y", None, inflight=2)
    for _ in range(6):
        sink.write(b"z" * PART)
        assert len(sink._uploads) <= 2
    sink.commit()
    assert fake.store["b/y"] == b"z" * 6 * PART
