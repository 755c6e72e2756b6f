"""Encrypted ``.npy`` files as a map-style Dataset of rows, read by row range.

Each file's ``.npy`` header is parsed from its first bytes, decrypted through the chunk
reader when the dataset is made (one chunk, more only for a header longer than that); rows
are then read by offset like fixed-size records: ``dataset[i]`` decrypts the chunks under row
``i`` and nothing else of the file. The parsed headers travel with the pickled dataset, so
workers never read them again.
"""

from __future__ import annotations

import io
import struct
from typing import Any, Iterable

import numpy as np

from encfs.cobblestone import CHUNK_SIZE
from encfs.errors import FormatError, with_path

from .batch import read_batch
from .records import RecordShards
from .shards import SampleIndex, ShardSet

_MAGIC = b"\x93NUMPY"
NPY_MAX_HEADER_SIZE = 10_000
"""NumPy's default ``max_header_size`` (``numpy.lib.format``)."""


def _header_bytes(shards: ShardSet, k: int, first: int) -> bytes:
    """The first ``first`` plaintext bytes of shard ``k`` (decrypted in locked memory)."""
    with read_batch(shards, [(k, 0, min(first, shards.size(k)))]) as batch:
        return bytes(batch[0])


def read_npy_header(shards: ShardSet, k: int, max_header_size: int = NPY_MAX_HEADER_SIZE) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of the ``.npy`` file ``k``; FormatError naming it if the
    file is not a C-ordered ``.npy`` array without Python objects whose size matches, or its
    header is longer than ``max_header_size`` (NumPy's own limit by default: the header is
    parsed with ``ast.literal_eval``)."""
    path, size = shards.paths[k], shards.size(k)
    head = _header_bytes(shards, k, CHUNK_SIZE)
    if head[:6] != _MAGIC or len(head) < 10:
        raise with_path(FormatError("not a .npy file (bad magic)"), path)
    major = head[6]
    if major == 1:
        length, prefix = struct.unpack("<H", head[8:10])[0], 10
    elif major in (2, 3):
        if len(head) < 12:
            raise with_path(FormatError("truncated .npy header"), path)
        length, prefix = struct.unpack("<I", head[8:12])[0], 12
    else:
        raise with_path(FormatError(f".npy format version {major} is not supported"), path)
    if length > max_header_size:
        raise with_path(FormatError(f".npy header is {length} bytes, over max_header_size={max_header_size}"), path)
    if prefix + length > len(head):
        head = _header_bytes(shards, k, prefix + length)
    fp = io.BytesIO(head[: prefix + length])
    fp.seek(8)
    try:
        if major == 1:
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp, max_header_size=max_header_size)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp, max_header_size=max_header_size)
    except ValueError as e:
        raise with_path(FormatError(f"bad .npy header: {e}"), path) from None
    if dtype.hasobject:
        raise with_path(FormatError(".npy arrays of Python objects are not read (they are pickles)"), path)
    if not dtype.isnative:
        raise with_path(FormatError(f".npy dtype {dtype.str} is not in this machine's byte order"), path)
    if not shape:
        raise with_path(FormatError(".npy holds a scalar, not rows"), path)
    if fortran and len(shape) > 1:
        raise with_path(FormatError("Fortran-ordered .npy arrays are not read by row"), path)
    offset = fp.tell()
    if offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != size:
        raise with_path(FormatError(f".npy header says {shape} x {dtype} but the data is {size - offset} bytes"), path)
    return tuple(int(d) for d in shape), dtype, offset


class EncryptedNpyDataset(RecordShards):
    """The rows of encrypted ``.npy`` files (axis 0, concatenated over files in order).

    Every file must hold rows of the same shape and dtype. ``max_header_size`` as in
    ``numpy.load`` (a longer header is refused). Items are tensors (NumPy arrays
    without torch) of the row shape, over locked memory; ``__getitems__`` reads a batch with
    one ``read_chunks`` call per run of touching chunks (see ``EncryptedRecordDataset``).
    """

    def __init__(
        self,
        urls: str | Iterable[str],
        storage_options: dict | None = None,
        *,
        max_header_size: int = NPY_MAX_HEADER_SIZE,
        worker_threads: int | None = 1,
        manifest: Any = None,
    ):
        self.shards = ShardSet(urls, storage_options, worker_threads=worker_threads, manifest=manifest)
        headers = [read_npy_header(self.shards, k, max_header_size) for k in range(len(self.shards))]
        shape, dtype, _ = headers[0]
        for k, (s, d, _) in enumerate(headers):
            if s[1:] != shape[1:] or d != dtype:
                raise ValueError(f"{self.shards.paths[k]}: rows of {s[1:]} x {d}, but {self.shards.paths[0]} has {shape[1:]} x {dtype}")
        self.record_shape = shape[1:]
        self.dtype = dtype
        self.record_bytes = int(np.prod(self.record_shape, dtype=np.int64)) * dtype.itemsize
        if self.record_bytes <= 0:
            raise ValueError("rows must be at least one byte")
        self.shapes = [h[0] for h in headers]
        self.bases = [h[2] for h in headers]
        self.index = SampleIndex([s[0] for s in self.shapes])
