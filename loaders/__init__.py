"""encfs.loaders: feeding encrypted datasets to PyTorch.

``ShardSet`` (the files, opened afresh per process), ``read_batch``/``read_records``
(batches decrypted into locked memory, one native call per run of chunks) and the map-style
datasets over them: ``EncryptedRecordDataset`` (fixed-size records), ``EncryptedNpyDataset``
(``.npy`` rows), ``EncryptedFileDataset`` (one file per sample, user ``decode``) and
``EncryptedParquetDataset`` (Parquet rows, read by row group; needs pyarrow when used); and the
iterable ``EncryptedTarDataset`` (WebDataset-layout tar shards, one sequential read per shard,
resumable with ``TarProgress``); and ``save``/``load``/``save_pretrained``/``from_pretrained``
(``models``): encrypted, signed, versioned model checkpoints.
"""

from .arrays import EncryptedNpyDataset, read_npy_header
from .batch import Batch, RecordBatch, read_batch, read_records
from .files import EncryptedFileDataset
from .records import EncryptedRecordDataset, collate_locked
from .shards import ShardSet, limit_worker_threads

_LAZY = {
    "BufferPool": "pool",
    "EncryptedLoader": "loader",
    "wipe_batch": "loader",
    "EpochOrder": "order",
    "epoch_order": "order",
    "combine_states": "order",
    "EncryptedParquetDataset": "parquet",
    "EncryptedTarDataset": "tars",
    "TarProgress": "tars",
    "combine_tar_states": "tars",
    "save": "models",
    "load": "models",
    "save_pretrained": "models",
    "from_pretrained": "models",
    "versions": "models",
    "ModelError": "models",
    "VersionEntry": "models",
}
"""Names whose modules import torch, pyarrow or safetensors: loaded on first use, so that importing
``encfs.loaders`` stays light."""


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "Batch",
    "BufferPool",
    "EncryptedFileDataset",
    "EncryptedLoader",
    "EpochOrder",
    "EncryptedNpyDataset",
    "EncryptedParquetDataset",
    "EncryptedRecordDataset",
    "EncryptedTarDataset",
    "ModelError",
    "RecordBatch",
    "ShardSet",
    "TarProgress",
    "VersionEntry",
    "collate_locked",
    "combine_states",
    "combine_tar_states",
    "epoch_order",
    "from_pretrained",
    "limit_worker_threads",
    "load",
    "read_batch",
    "read_npy_header",
    "read_records",
    "save",
    "save_pretrained",
    "versions",
    "wipe_batch",
]
