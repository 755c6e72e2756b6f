"""encfs.loaders: feeding encrypted datasets to PyTorch.

``ShardSet`` (the files, opened afresh per process), ``read_batch``/``read_records``
(batches decrypted into locked memory, one native call per run of chunks) and the map-style
datasets over them: ``EncryptedRecordDataset`` (fixed-size records), ``EncryptedNpyDataset``
(``.npy`` rows) and ``EncryptedFileDataset`` (one file per sample, user ``decode``).
"""

from .arrays import EncryptedNpyDataset, read_npy_header
from .batch import Batch, RecordBatch, read_batch, read_records
from .files import EncryptedFileDataset
from .records import EncryptedRecordDataset, collate_locked
from .shards import ShardSet, limit_worker_threads

__all__ = [
    "Batch",
    "EncryptedFileDataset",
    "EncryptedNpyDataset",
    "EncryptedRecordDataset",
    "RecordBatch",
    "ShardSet",
    "collate_locked",
    "limit_worker_threads",
    "read_batch",
    "read_npy_header",
    "read_records",
]
