"""encfs: a transparent encrypting fsspec filesystem for ML data (Cobblestone-256 chunks).

    import fsspec
    with fsspec.open("encfs::file:///data/x.bin", "wb", encfs={"key": "keyfile:~/.encfs/k"}) as f:
        f.write(b"...")
"""

from .errors import ConfigError, EncfsError, FileChangedError, FormatError, HeaderFullError, IntegrityError, KeyReferenceError, NoMatchingKeyError, SignatureError, TransactionError

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "EncFileSystem", "EncfsError", "FileChangedError", "FormatError", "HeaderFullError", "IntegrityError", "KeyReferenceError",
    "NoMatchingKeyError", "SignatureError", "TransactionError", "__version__",
]


def __getattr__(name: str):
    if name == "EncFileSystem":
        from .filesystem import EncFileSystem

        return EncFileSystem
    raise AttributeError(name)
