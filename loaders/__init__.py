"""encfs.loaders: feeding encrypted datasets to PyTorch."""

from .records import EncryptedRecordDataset

__all__ = ["EncryptedRecordDataset"]
