"""Fixed-size records in encrypted files, as a PyTorch map-style Dataset.

Each item is read by plaintext range, so only the chunks under it are fetched and
decrypted. The dataset pickles into DataLoader workers by URL and key reference (never key
bytes); each worker opens its own file handles lazily.
"""

from __future__ import annotations

import bisect
from typing import Any, Sequence

import numpy as np
from fsspec.core import url_to_fs


class EncryptedRecordDataset:
    """Records of ``record_shape`` x ``dtype`` packed back to back in each file of ``urls``.

    ``urls`` are fsspec URLs (``encfs::file:///data/shard-0.bin``, ``encfs::s3://...``);
    ``storage_options`` go to ``url_to_fs`` (e.g. ``{"encfs": {"key": "keyfile:..."}}``).
    Items are ``torch.Tensor`` when torch is importable, else ``numpy.ndarray``.
    """

    def __init__(self, urls: Sequence[str], record_shape: tuple[int, ...], dtype: Any = np.float32, storage_options: dict | None = None):
        if not urls:
            raise ValueError("no files given")
        self.urls = list(urls)
        self.dtype = np.dtype(dtype)
        self.record_shape = tuple(record_shape)
        self.record_bytes = int(np.prod(self.record_shape)) * self.dtype.itemsize
        self.storage_options = dict(storage_options or {})
        self.fs, _ = url_to_fs(self.urls[0], **self.storage_options)
        self.paths = [url_to_fs(u, **self.storage_options)[1] for u in self.urls]
        sizes = [self._authenticated_size(p) for p in self.paths]
        bad = [p for p, s in zip(self.paths, sizes) if s % self.record_bytes]
        if bad:
            raise ValueError(f"{bad[0]}: size is not a multiple of the {self.record_bytes}-byte record")
        counts = [s // self.record_bytes for s in sizes]
        self._starts = [int(x) for x in np.cumsum([0] + counts[:-1])]
        self._len = int(sum(counts))
        self._handles: dict[int, Any] = {}

    def _authenticated_size(self, path: str) -> int:
        """The plaintext size of ``path`` from an open file, whose final chunk is authenticated
        on open: a shard cut at a chunk boundary is an IntegrityError, never fewer records."""
        with self.fs.open(path, "rb") as f:
            return f.size

    def __len__(self) -> int:
        return self._len

    def _handle(self, k: int):
        f = self._handles.get(k)
        if f is None:
            f = self._handles[k] = self.fs.open(self.paths[k], "rb")
        return f

    def __getitem__(self, i: int):
        if not -self._len <= i < self._len:
            raise IndexError(i)
        i %= self._len
        k = bisect.bisect_right(self._starts, i) - 1
        f = self._handle(k)
        f.seek((i - self._starts[k]) * self.record_bytes)
        out = np.empty(self.record_shape, dtype=self.dtype)
        if f.readinto(memoryview(out).cast("B")) != self.record_bytes:
            raise EOFError(f"short record {i} in {self.paths[k]}")
        try:
            import torch
        except ImportError:
            return out
        return torch.from_numpy(out)

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
