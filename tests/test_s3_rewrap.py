"""Rewrap on S3 without moving the payload: the object is rebuilt as a multipart upload whose
first part is the new header (+ enough payload for a 5 MiB part) and whose other parts S3 copies
from the object itself (``encfs.s3copy``). Against the moto server, through the counting proxy.

moto (5.2) honours ``CopySourceRange`` on ``UploadPartCopy`` and ``If-Match`` on ranged GETs, but
ignores ``CopySourceIfMatch`` and ``IfMatch`` on ``CompleteMultipartUpload``; the test of an
object replaced just before its copy therefore emulates S3's 412 for the copy (as s3fs raises it).
"""

from __future__ import annotations

import errno
import hashlib
import os

import pytest

from encfs import format as fmt
from encfs import s3copy
from encfs.errors import FileChangedError, NoMatchingKeyError
from encfs.filesystem import EncFileSystem
from encfs.keys import KeyRing, load_reference
from encfs.rewrap import rewrap
from tests.latency_proxy import LatencyProxy

s3fs = pytest.importorskip("s3fs")

MiB = 1 << 20


@pytest.fixture
def proxied(s3, s3_endpoint):
    """(direct s3fs, s3fs through the counting proxy, bucket, proxy, options)."""
    fs, bucket, opts = s3
    with LatencyProxy(s3_endpoint, latency=0) as proxy:
        popts = {**opts, "client_kwargs": {**opts["client_kwargs"], "endpoint_url": proxy.url}}
        yield fs, s3fs.S3FileSystem(skip_instance_cache=True, **popts), bucket, proxy, popts


def _write(fs, keyref: str, path: str, size: int) -> bytes:
    data = os.urandom(size)
    EncFileSystem(fs=fs, key=keyref, skip_instance_cache=True).pipe_file(path, data)
    return data


def _read(fs, keyref: str, path: str) -> bytes:
    fs.invalidate_cache()
    return EncFileSystem(fs=fs, key=keyref, skip_instance_cache=True).cat_file(path)


def _payload(raw: bytes) -> bytes:
    return raw[fmt.parse_fixed_fields(raw[:4096]) :]


def _uploads(fs, bucket: str) -> list:
    return fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])


def _parts(proxy: LatencyProxy) -> list:
    return [r for r in proxy.requests if r.method == "PUT" and "partNumber=" in r.query and "uploadId=" in r.query]


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_add_then_remove_a_recipient_copies_the_payload_server_side(proxied, keyref, other_keyref, monkeypatch):
    fs, pfs, bucket, proxy, _ = proxied
    monkeypatch.setattr(s3copy, "COPY_PART", 10 * MiB)  # several copied parts (1 GiB in use)
    path = f"{bucket}/big"
    data = _write(fs, keyref, path, 40 * MiB)
    before = fs.cat_file(path)
    proxy.reset()

    res = rewrap(pfs, path, KeyRing(keyref), add=[load_reference(other_keyref)])

    moved = sum(r.bytes_in + r.bytes_out for r in proxy.requests)
    assert moved < 12 * MiB, (moved, proxy.requests)
    parts = _parts(proxy)
    uploaded = [r for r in parts if r.bytes_in]
    copied = [r for r in parts if not r.bytes_in]  # UploadPartCopy: a PUT with no body
    assert len(uploaded) == 1 and "partNumber=1" in uploaded[0].query and uploaded[0].bytes_in >= 5 * MiB
    assert len(copied) == 4 and all("partNumber=1" not in r.query for r in copied), proxy.requests
    assert not any(r.method == "PUT" and not r.query for r in proxy.requests)  # no whole-object PutObject
    after = fs.cat_file(path)
    assert _payload(after) == _payload(before) and after != before
    assert _sha(_read(fs, keyref, path)) == _sha(_read(fs, other_keyref, path)) == _sha(data)
    assert not _uploads(fs, bucket)

    proxy.reset()
    rewrap(pfs, path, KeyRing(keyref), remove=res.added)
    assert sum(r.bytes_in + r.bytes_out for r in proxy.requests) < 12 * MiB
    assert any(not r.bytes_in for r in _parts(proxy))
    assert _payload(fs.cat_file(path)) == _payload(before)
    assert _sha(_read(fs, keyref, path)) == _sha(data)
    with pytest.raises(NoMatchingKeyError):
        _read(fs, other_keyref, path)
    assert not _uploads(fs, bucket)


def _replace(fs, keyref: str, path: str) -> bytes:
    """Another writer's new object at ``path`` (its own encryption, so a splice would not read)."""
    return _write(fs, keyref, path, 6 * MiB)


def test_an_object_replaced_after_its_header_was_read_fails_the_rewrap(proxied, keyref, other_keyref, monkeypatch):
    """Replaced before part 1's payload is read: that ranged GET's If-Match fails (moto enforces it)."""
    from encfs import rewrap as rewrap_module

    fs, pfs, bucket, _, _ = proxied
    path = f"{bucket}/raced"
    _write(fs, keyref, path, 12 * MiB)
    theirs: list[bytes] = []
    real = rewrap_module._reheader

    def reheader_then_overwrite(*a, **kw):
        out = real(*a, **kw)
        theirs.append(_replace(fs, keyref, path))
        return out

    monkeypatch.setattr(rewrap_module, "_reheader", reheader_then_overwrite)
    with pytest.raises(FileChangedError):
        rewrap(pfs, path, KeyRing(keyref), add=[load_reference(other_keyref)])
    assert _read(fs, keyref, path) == theirs[0]
    assert not _uploads(fs, bucket)


def test_an_object_replaced_before_its_copy_fails_the_rewrap(proxied, keyref, other_keyref, monkeypatch):
    """Replaced after part 1 was read, before S3 copies the rest: every copy names the ETag the
    header was read at (``CopySourceIfMatch``), and so does the completion (``IfMatch``). moto
    ignores both, so the S3 answer to a copy whose condition fails (412, which s3fs raises as
    ``OSError(EINVAL, ...pre-conditions...)``) is emulated here."""
    fs, pfs, bucket, _, _ = proxied
    path = f"{bucket}/raced"
    _write(fs, keyref, path, 12 * MiB)
    etag = fs.info(path, refresh=True)["ETag"]
    seen: list[tuple[str, dict]] = []
    theirs: list[bytes] = []
    real = pfs.call_s3

    def call_s3(method, *a, **kw):
        seen.append((method, kw))
        if method == "upload_part_copy":
            if not theirs:
                theirs.append(_replace(fs, keyref, path))
            now = fs.info(path, refresh=True)["ETag"]
            if kw["CopySourceIfMatch"] != now:
                raise OSError(errno.EINVAL, "At least one of the pre-conditions you specified did not hold")
        return real(method, *a, **kw)

    monkeypatch.setattr(pfs, "call_s3", call_s3)
    with pytest.raises(FileChangedError, match="replaced"):
        rewrap(pfs, path, KeyRing(keyref), add=[load_reference(other_keyref)])
    copies = [kw for m, kw in seen if m == "upload_part_copy"]
    assert copies and all(kw["CopySourceIfMatch"] == etag for kw in copies)
    assert copies[0]["CopySourceRange"].startswith("bytes=") and copies[0]["CopySource"] == {"Bucket": bucket, "Key": "raced"}
    assert "complete_multipart_upload" not in [m for m, _ in seen] and "abort_multipart_upload" in [m for m, _ in seen]
    assert _read(fs, keyref, path) == theirs[0]
    assert not _uploads(fs, bucket)


def test_the_completion_names_the_version_that_was_copied(proxied, keyref, other_keyref, monkeypatch):
    fs, pfs, bucket, _, _ = proxied
    path = f"{bucket}/f"
    data = _write(fs, keyref, path, 11 * MiB)
    etag = fs.info(path, refresh=True)["ETag"]
    seen: list[tuple[str, dict]] = []
    real = pfs.call_s3
    monkeypatch.setattr(pfs, "call_s3", lambda method, *a, **kw: (seen.append((method, kw)), real(method, *a, **kw))[1])
    rewrap(pfs, path, KeyRing(keyref), add=[load_reference(other_keyref)])
    (complete,) = [kw for m, kw in seen if m == "complete_multipart_upload"]
    assert complete["IfMatch"] == etag and [p["PartNumber"] for p in complete["MultipartUpload"]["Parts"]] == [1, 2]
    assert _read(fs, other_keyref, path) == data


@pytest.mark.parametrize("fault", ["503", "interrupt"])
def test_a_copy_that_fails_leaves_the_object_unchanged_and_no_upload(proxied, keyref, other_keyref, fault, monkeypatch):
    fs, _, bucket, proxy, popts = proxied
    path = f"{bucket}/f"
    data = _write(fs, keyref, path, 12 * MiB)
    before = fs.cat_file(path)
    impatient = s3fs.S3FileSystem(skip_instance_cache=True, config_kwargs={"retries": {"max_attempts": 1}}, **popts)
    impatient.retries = 1
    if fault == "503":
        proxy.inject("503", when=lambda r: r.method == "PUT" and "partNumber=2" in r.query, times=1000)
        expected: type[BaseException] = OSError
    else:
        real = impatient.call_s3

        def call_s3(method, *a, **kw):
            if method == "upload_part_copy":
                raise KeyboardInterrupt
            return real(method, *a, **kw)

        monkeypatch.setattr(impatient, "call_s3", call_s3)
        expected = KeyboardInterrupt
    with pytest.raises(expected):
        rewrap(impatient, path, KeyRing(keyref), add=[load_reference(other_keyref)])
    if fault == "503":
        assert any(r.status == 503 for r in _parts(proxy))
    assert fs.cat_file(path) == before
    assert _read(fs, keyref, path) == data
    assert not _uploads(fs, bucket)


def test_a_small_object_is_rewritten_whole(proxied, keyref, other_keyref):
    fs, pfs, bucket, proxy, _ = proxied
    path = f"{bucket}/small"
    data = _write(fs, keyref, path, 1 * MiB)
    before = fs.cat_file(path)
    proxy.reset()
    rewrap(pfs, path, KeyRing(keyref), add=[load_reference(other_keyref)])
    assert not _parts(proxy) and sum(1 for r in proxy.requests if r.method == "PUT") == 1  # one PutObject
    assert _payload(fs.cat_file(path)) == _payload(before)
    assert _read(fs, keyref, path) == _read(fs, other_keyref, path) == data


def test_only_objects_with_enough_payload_are_copied_server_side():
    class Obj:
        etag, size = '"x"', 0

    o = Obj()
    o.size = 10 * MiB  # 1 KiB header, so part 1 = 1 KiB of header + 5 MiB - 1 KiB of payload; 5 MiB left to copy
    assert s3copy.copies_tail(o, 1024, 1024)  # type: ignore[arg-type]
    o.size = 10 * MiB - 1
    assert not s3copy.copies_tail(o, 1024, 1024)  # type: ignore[arg-type]
    o.etag = None
    o.size = 1 << 40
    assert not s3copy.copies_tail(o, 1024, 1024)  # type: ignore[arg-type]
