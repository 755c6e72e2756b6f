"""Hugging Face ``datasets`` over encfs: the URL form and storage options datasets can route.

datasets (5.x) does not read fsspec chains the way fsspec does. In ``encfs::file:///d/*.parquet``
it takes the ``encfs`` hop for a local path (``xopen`` opens a file named ``encfs``), keys
options by that hop's guessed protocol (``file``), so ``storage_options={"encfs": ...}`` is
dropped, and glob results come back as ``encfs::file:///d/a.parquet::file:///d/*.parquet``.
It also normalises every URL as a path, so ``proto:///abs`` becomes ``proto://abs`` and an
absolute local path behind a protocol loses its leading slash. What it does route is a
single-hop URL: ``encfs://PATH`` with everything else under ``storage_options["encfs"]``.
:func:`datasets_args` rewrites to that form (a local target is reached through fsspec's
``dir`` filesystem rooted at ``/``, so that ``encfs://data/x`` means ``/data/x``).

Without ``streaming=True`` (``keep_in_memory=True`` included), datasets downloads each file
(``fs.get_file``: decrypted) into its cache and writes Arrow files there: plaintext at rest;
a remote ``cache_dir`` cannot be loaded back (``as_dataset`` refuses one), and
``load_from_disk`` copies remote files into a local temporary directory. :func:`load_dataset`
streams by default and warns with :class:`PlaintextCacheWarning` otherwise;
:func:`warn_if_datasets_download` is the same warning from ``EncFileSystem.get_file``, for
calls that bypass the helper. datasets' writers (``to_parquet``, ``to_csv``,
``save_to_disk``) open ``encfs::`` URLs through fsspec and need nothing from here.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Union

import fsspec

DataFiles = Union[str, list, dict]

_PREFIX = "encfs::"


class PlaintextCacheWarning(UserWarning):
    """Decrypted data is being written to local disk by Hugging Face ``datasets``."""


def _split(url: str) -> tuple[str, str]:
    """``encfs::PROTO://PATH`` (or ``encfs::/abs``) -> (target protocol, target path)."""
    rest = url[len(_PREFIX) :]
    if "::" in rest:
        raise ValueError(f"{url!r}: only one hop after encfs:: is supported with datasets")
    protocol, sep, _ = rest.partition("://")
    protocol = protocol if sep else "file"
    cls = fsspec.get_filesystem_class(protocol)
    return protocol, cls._strip_protocol(rest)


def _needs_root(protocol: str, path: str) -> bool:
    """Whether ``path`` needs its leading slash (which datasets strips) to mean the same file."""
    cls = fsspec.get_filesystem_class(protocol)
    return path.startswith("/") and cls._strip_protocol(path.lstrip("/")) != cls._strip_protocol(path)


def datasets_args(data_files: DataFiles, storage_options: dict | None = None) -> tuple[DataFiles, dict]:
    """Rewrite ``encfs::`` URLs (a string, list, or dict of splits) and their storage options
    into what ``datasets.load_dataset`` routes: ``encfs://PATH`` URLs and a ``"encfs"`` entry
    holding the key and the target. Storage options may be flat (``{"key": ...}``, as for
    pandas) or keyed by protocol (``{"encfs": {...}, "s3": {...}}``); other URLs and their
    options pass through unchanged. All ``encfs::`` URLs must share one target protocol."""
    opts = dict(storage_options or {})
    targets: set[tuple[str, bool]] = set()

    def rewrite(url: Any) -> Any:
        if not isinstance(url, str) or not url.startswith(_PREFIX):
            return url
        protocol, path = _split(url)
        rooted = _needs_root(protocol, path)
        targets.add((protocol, rooted))
        return "encfs://" + path.lstrip("/")

    if isinstance(data_files, dict):
        files: DataFiles = {split: rewrite(v) if isinstance(v, str) else [rewrite(u) for u in v] for split, v in data_files.items()}
    elif isinstance(data_files, str):
        files = rewrite(data_files)
    else:
        files = [rewrite(u) for u in data_files]
    if not targets:
        return files, opts
    if len(targets) > 1:
        raise ValueError(f"encfs:: data files on several targets {sorted(targets)}: load them separately")
    ((protocol, rooted),) = targets
    protocols = set(fsspec.available_protocols())
    flat = {k: v for k, v in opts.items() if k not in protocols}
    # flat options reach encfs, which sends the target's own options on to the target
    encfs_opts = {**flat, **opts.get("encfs", {})}
    target_opts = {**opts.get(protocol, {}), **encfs_opts.pop("target_options", {})}
    if rooted:
        target_opts = {"path": "/", "target_protocol": protocol, "target_options": target_opts}
        protocol = "dir"
    encfs_opts.update(target_protocol=protocol, target_options=target_opts)
    return files, {**opts, "encfs": encfs_opts}


def load_dataset(path: str, data_files: DataFiles, storage_options: dict | None = None, *, streaming: bool = True, **kwargs: Any) -> Any:
    """``datasets.load_dataset`` over ``encfs::`` URLs, streaming by default (nothing decrypted
    is written). ``streaming=False`` works but writes decrypted downloads and Arrow files to
    the datasets cache; it warns with :class:`PlaintextCacheWarning`."""
    import datasets

    files, options = datasets_args(data_files, storage_options)
    if not streaming:
        warn_plaintext_cache(stacklevel=3)
    return datasets.load_dataset(path, data_files=files, storage_options=options, streaming=streaming, **kwargs)


def warn_plaintext_cache(stacklevel: int = 2) -> None:
    """Emit :class:`PlaintextCacheWarning` (``stacklevel`` as for ``warnings.warn``)."""
    warnings.warn(
        PlaintextCacheWarning(
            "datasets.load_dataset without streaming=True writes the decrypted data to its cache "
            "(downloads and Arrow files under cache_dir / HF_DATASETS_CACHE) as plaintext; "
            "use streaming=True to keep it encrypted at rest"
        ),
        stacklevel=stacklevel,
    )


def warn_if_datasets_download(lpath: str) -> None:
    """Called by ``EncFileSystem.get_file``: warn when its caller (past fsspec's own ``get`` /
    ``download``) is Hugging Face ``datasets``, i.e. datasets is putting a decrypted copy on
    local disk: its download cache (``load_dataset`` without streaming) or a temporary
    directory (``load_from_disk``)."""
    frame = sys._getframe(1)
    while frame is not None:
        module = str(frame.f_globals.get("__name__", "")).partition(".")[0]
        if module not in ("fsspec", "encfs"):
            break
        frame = frame.f_back
    if frame is None or module != "datasets":
        return
    warnings.warn(
        PlaintextCacheWarning(
            f"Hugging Face datasets is writing a decrypted copy to local disk ({lpath}): plaintext at rest; "
            "read with load_dataset(..., streaming=True) (encfs.hf.load_dataset) to keep it encrypted"
        ),
        stacklevel=3,
    )
