"""Rebuilding an S3 object as a new head followed by its own bytes, copied by S3 itself.

Rewrapping changes only a file's header, but S3 cannot rewrite part of an object. So the object
is written again as a multipart upload to the same key: part 1 is the new head and the first
bytes after the old one, enough to make part 1 the 5 MiB S3 asks of every part but the last
(read by the client); every other part is an ``UploadPartCopy`` of a range of the object as it
is, done by S3 (up to 5 GiB a part, 1 GiB unless 10,000 parts need more). The client moves the
head and one part, not the object.

Every read and copy names the version whose header was read, by its ETag (``If-Match``,
``CopySourceIfMatch``), and so does the completion (``IfMatch``): an object replaced meanwhile
fails the rebuild (``FileChangedError``) instead of splicing a new head onto another version's
bytes, or overwriting the other writer's object. The upload is completed only once every part
succeeded; any failure, or an interrupt, aborts it (no change, no upload left behind).
"""

from __future__ import annotations

import errno
from concurrent.futures import Future
from typing import Any

from .errors import FileChangedError
from .pipeline import Pipeline
from .remote import RemoteObject, parts, precondition_failed
from .sink import S3_MAX_PART, S3_MAX_PARTS, S3_MIN_PART

COPY_PART = 1 << 30
"""Bytes per copied part (S3 copies these itself; fewer requests, each well under 5 GiB)."""
MIN_COPY = S3_MIN_PART
"""Copy only when at least this much is left after part 1: below it, a whole rewrite moves
little more and costs fewer requests."""
INFLIGHT = 8


def open_source(fs: Any, path: str) -> RemoteObject:
    """The object at ``path`` as it is now (size and ETag from a fresh HEAD, not a cached
    listing), read by ranges that each name that version."""
    entry = fs.info(path, refresh=True)
    return RemoteObject(fs, path, entry["size"], etag=entry.get("ETag"))


def _lead(head_length: int, start: int, size: int) -> int:
    """Bytes from ``start`` that go into part 1 after the head, to make it a whole (5 MiB) S3 part."""
    return min(size - start, max(0, S3_MIN_PART - head_length))


def copies_tail(src: RemoteObject, head_length: int, start: int) -> bool:
    """Whether ``TailCopySink`` applies: the object has an ETag to pin its version by, and
    enough of it is left after part 1 to be worth copying server-side."""
    return bool(src.etag) and src.size - start - _lead(head_length, start, src.size) >= MIN_COPY


class TailCopySink:
    """A sink (``sink.fill_atomically``) for ``src``'s own key: what is written to it is the new
    head; ``commit`` uploads that head and the bytes of ``src`` from ``start`` on (read by the
    client for part 1, copied by S3 for the rest) and completes the upload; ``discard`` aborts."""

    def __init__(self, src: RemoteObject, start: int):
        if not src.etag:
            raise ValueError(f"{src.path}: no ETag to pin the copied version by")
        self.src, self.start = src, start
        self.fs = src.fs
        self.bucket, self.key, self.version = self.fs.split_path(src.path)
        self._head = bytearray()
        self._upload_id: str | None = None
        self._uploads = Pipeline(INFLIGHT, ordered=False)

    def write(self, data: bytes | memoryview) -> int:
        self._head += data
        return len(data)

    def _call(self, method: str, **kw: Any) -> Any:
        try:
            return self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kw)
        except OSError as e:
            if precondition_failed(e):
                msg = f"the object was replaced while it was being rewritten (its ETag is no longer {self.src.etag}); nothing was changed"
                raise FileChangedError(msg) from e
            raise

    def commit(self) -> None:
        src, start = self.src, self.start
        lead = _lead(len(self._head), start, src.size)
        body = bytes(self._head) + src.get(start, lead)
        tail = src.size - start - lead
        step = max(COPY_PART, -(-tail // (S3_MAX_PARTS - 1)))
        if step > S3_MAX_PART:
            raise OSError(errno.EFBIG, f"{src.path}: too large to copy in {S3_MAX_PARTS} parts")
        self._upload_id = self._call("create_multipart_upload")["UploadId"]
        done: list[Future[dict]] = [self._uploads.put(self._upload, body)]
        for number, (offset, length) in enumerate(parts(start + lead, tail, step), start=2):
            done.append(self._uploads.put(self._copy, number, offset, length))
        self._uploads.drain()
        self._call(
            "complete_multipart_upload", UploadId=self._upload_id, MultipartUpload={"Parts": [f.result() for f in done]}, IfMatch=src.etag
        )
        self._upload_id = None
        self.fs.invalidate_cache(src.path)

    def _upload(self, body: bytes) -> dict:
        out = self._call("upload_part", UploadId=self._upload_id, PartNumber=1, Body=body)
        return {"PartNumber": 1, "ETag": out["ETag"]}

    def _copy(self, number: int, offset: int, length: int) -> dict:
        source = {"Bucket": self.bucket, "Key": self.key, **({"VersionId": self.version} if self.version else {})}
        out = self._call(
            "upload_part_copy",
            UploadId=self._upload_id,
            PartNumber=number,
            CopySource=source,
            CopySourceRange=f"bytes={offset}-{offset + length - 1}",
            CopySourceIfMatch=self.src.etag,
        )
        return {"PartNumber": number, "ETag": out["CopyPartResult"]["ETag"]}

    def discard(self) -> None:
        self._head = bytearray()
        try:
            self._uploads.abandon()
        finally:
            if self._upload_id is not None:
                upload_id, self._upload_id = self._upload_id, None
                self.fs.call_s3("abort_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=upload_id)
