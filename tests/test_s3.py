"""encfs over S3: a real S3 API (moto server) on 127.0.0.1, reached through s3fs."""

from __future__ import annotations

import os
import pickle

import fsspec
import pytest

from encfs import IntegrityError
from encfs.filesystem import EncFileSystem


def _enc(s3, keyref):
    fs, bucket, _ = s3
    return EncFileSystem(fs=fs, key=keyref, skip_instance_cache=True), bucket


def test_url_roundtrip_and_ranged_reads(s3, keyref):
    fs, bucket, opts = s3
    data = os.urandom(300_000)
    url = f"encfs::s3://{bucket}/train/x.bin"
    with fsspec.open(url, "wb", encfs={"key": keyref}, s3=opts) as f:
        f.write(data)
    raw = fs.cat_file(f"{bucket}/train/x.bin")
    assert raw[:8] == b"\x89ENCFS\r\n" and data[:1000] not in raw
    with fsspec.open(url, "rb", encfs={"key": keyref}, s3=opts) as f:
        f.seek(123_456)
        assert f.read(50_000) == data[123_456:173_456]
        f.seek(-10, 2)
        assert f.read() == data[-10:]
    enc = fsspec.filesystem("encfs", target_protocol="s3", target_options=opts, key=keyref, skip_instance_cache=True)
    assert enc.cat_file(f"{bucket}/train/x.bin", 16380, 16400) == data[16380:16400]
    assert enc.ls(f"{bucket}/train", detail=True)[0]["size"] == 300_000


def test_multipart_upload_commits_whole_file(s3, keyref):
    enc, bucket = _enc(s3, keyref)
    data = os.urandom(12 * 1024 * 1024 + 3)
    with enc.open(f"{bucket}/big.bin", "wb", block_size=5 * 1024 * 1024) as f:
        for i in range(0, len(data), 1 << 20):
            f.write(data[i : i + (1 << 20)])
    assert enc.info(f"{bucket}/big.bin")["size"] == len(data)
    assert enc.cat_file(f"{bucket}/big.bin") == data


def test_failed_upload_is_aborted(s3, keyref):
    enc, bucket = _enc(s3, keyref)
    fs = s3[0]
    with pytest.raises(RuntimeError):
        with enc.open(f"{bucket}/aborted.bin", "wb", block_size=5 * 1024 * 1024) as f:
            f.write(os.urandom(11 * 1024 * 1024))
            raise RuntimeError("crash mid-upload")
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/aborted.bin")
    uploads = fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
    assert uploads == []


def test_failed_small_overwrite_keeps_old_object(s3, keyref):
    enc, bucket = _enc(s3, keyref)
    enc.pipe_file(f"{bucket}/o", b"old")
    with pytest.raises(RuntimeError):
        with enc.open(f"{bucket}/o", "wb") as f:
            f.write(b"new")
            raise RuntimeError
    s3[0].invalidate_cache()
    assert enc.cat_file(f"{bucket}/o") == b"old"


def test_tampered_object_is_an_integrity_error(s3, keyref):
    enc, bucket = _enc(s3, keyref)
    fs = s3[0]
    enc.pipe_file(f"{bucket}/t", os.urandom(50_000))
    raw = bytearray(fs.cat_file(f"{bucket}/t"))
    raw[-100] ^= 1
    fs.pipe_file(f"{bucket}/t", bytes(raw))
    with pytest.raises(IntegrityError):
        enc.cat_file(f"{bucket}/t")


def test_pickled_filesystem_reads_in_another_process_shape(s3, keyref):
    enc, bucket = _enc(s3, keyref)
    enc.pipe_file(f"{bucket}/p", b"pickle me")
    clone = pickle.loads(pickle.dumps(enc))
    assert clone.cat_file(f"{bucket}/p") == b"pickle me"


def test_dead_endpoint_is_an_error_not_garbage(keyref):
    s3fs = pytest.importorskip("s3fs")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = s3fs.S3FileSystem(
        key="testing", secret="testing", skip_instance_cache=True,
        client_kwargs={"endpoint_url": f"http://127.0.0.1:{port}"},
        config_kwargs={"connect_timeout": 1, "read_timeout": 1, "retries": {"max_attempts": 1}},
    )
    enc = EncFileSystem(fs=dead, key=keyref, skip_instance_cache=True)
    from botocore.exceptions import EndpointConnectionError

    with pytest.raises((OSError, EndpointConnectionError), match="(?i)connect"):
        enc.cat_file("bucket/x")
    with pytest.raises((OSError, EndpointConnectionError), match="(?i)connect"):
        enc.pipe_file("bucket/y", b"data")
