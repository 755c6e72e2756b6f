"""``webdataset.WebDataset("encfs::...")``: webdataset's own pipeline over encrypted shards.

    import webdataset as wds
    from encfs.loaders import webdataset as encfs_wds

    encfs_wds.register(key="keyfile:/secrets/dataset.key")      # once, before making datasets
    ds = wds.WebDataset("encfs::s3://bucket/train/shard-{00000..00099}.tar", shardshuffle=False)

Why a registration: webdataset 1.0 splits a URL string on ``::`` (its "several URL lists"
syntax, ``shardlists.expand_urls``), which cuts an fsspec chain in two, and opens URLs with
its own ``gopen`` table (``gopen.gopen_schemes``), which has no fsspec. ``register`` adds both
(the only extension point webdataset has for either is its module globals):

- an opener for the ``encfs`` scheme in ``gopen_schemes`` (``open_url``: reads and writes
  through ``fsspec``; ``wds.TarWriter``/``ShardWriter`` on ``encfs::`` URLs encrypt), and
- ``expand_urls`` keeping ``encfs::[proto::]...target`` chains whole, so brace ranges expand.

The key: ``register(key=..., **storage_options)`` (key *references*, never key bytes), else
``$ENCFS_KEY``. Expanded URLs are ``ShardURL`` strings that carry the options in effect when
the dataset was made; unpickling one (in a spawn or forkserver DataLoader worker) imports this
module, which installs the opener there. Fork workers inherit everything. (A list of plain
``str`` URLs is not expanded by webdataset and opens with ``register``'s options: fine in this
process and fork workers; in a spawn worker, where ``register`` never ran, such a URL is a
``ConfigError`` rather than an open with ``$ENCFS_KEY`` alone, which would drop the signers and
options given to ``register``: pass ``expand_urls(pattern)``, which makes ``ShardURL``s.)

Errors are never skipped by webdataset's default ``handler`` (``reraise_exception``): a wrong
key raises ``NoMatchingKeyError``, a tampered or truncated shard ``IntegrityError``, from the
worker that read it. A ``handler=wds.warn_and_continue`` of your own does skip them. Refused:
webdataset's shard cache (``cache_dir=``, ``$WDS_CACHE``), which would store decrypted shards
on local disk (``ConfigError``).
"""

from __future__ import annotations

import importlib
import re
import sys
from typing import Any, BinaryIO

from fsspec.core import url_to_fs

from encfs.errors import ConfigError

from .shards import in_worker_process, limit_worker_threads

cache, gopen, shardlists = (importlib.import_module(f"webdataset.{m}") for m in ("cache", "gopen", "shardlists"))
# (modules: ``webdataset.gopen`` the attribute is the function of that name)

__all__ = ["ShardURL", "expand_urls", "open_url", "register"]

SCHEME = "encfs"
_BARE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*$")  # a chain hop: ``simplecache`` in ``encfs::simplecache::s3://``
_JOIN = "\x00"  # stands for ``::`` inside a chain while webdataset expands braces and ${WDS_*}

_options: dict[str, Any] = {}  # register()'s storage options, for URLs made from now on
_registered = False  # whether register() ran in this process (or the parent it forked from)
_webdataset_expand = shardlists.expand_urls  # webdataset's own, before register() wraps it


class ShardURL(str):
    """An expanded ``encfs::`` URL (a ``str``) with the storage options to open it with.
    It pickles as (URL, options): key references, never key bytes."""

    storage_options: dict[str, Any]

    def __new__(cls, url: str, storage_options: dict[str, Any] | None = None) -> ShardURL:
        self = super().__new__(cls, url)
        self.storage_options = dict(storage_options or {})
        return self

    def __reduce__(self) -> tuple:
        return (ShardURL, (str(self), self.storage_options))


def expand_urls(urls: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """webdataset's ``expand_urls`` (split on ``::``, ``${WDS_*}``, braces), except that an
    ``encfs::`` chain stays whole and becomes a ``ShardURL`` with ``storage_options``
    (default: ``register``'s)."""
    opts = _options if storage_options is None else storage_options
    pieces, out, chain = urls.split("::"), [], []
    for piece in pieces:
        if chain or piece == SCHEME:
            chain.append(piece)
            if not _BARE.match(piece):  # the target URL ends the chain
                out.append(_JOIN.join(chain))
                chain = []
        else:
            out.append(piece)
    out += chain  # a chain with no target: left as webdataset would split it
    result: list[str] = []
    for part in out:
        if _JOIN in part:
            result += [ShardURL(u.replace(_JOIN, "::"), opts) for u in _webdataset_expand(part)]
        else:
            result += _webdataset_expand(part)
    return result


def _from_cache() -> bool:
    """Whether webdataset's shard cache (``cache.download``) is the caller of this open."""
    frame = sys._getframe(2)
    for _ in range(4):
        if frame is None:
            return False
        if frame.f_code is cache.download.__code__:
            return True
        frame = frame.f_back
    return False


def open_url(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> BinaryIO:
    """webdataset's opener for ``encfs::`` URLs (``gopen_schemes["encfs"]``): the file
    through fsspec, with the URL's own options (a ``ShardURL``) or ``register``'s."""
    if _from_cache():
        raise ConfigError(f"{url}: webdataset's shard cache (cache_dir=, $WDS_CACHE) would store the decrypted shard on local disk; turn it off for encfs:: URLs")
    if in_worker_process():
        limit_worker_threads()
    if not isinstance(url, ShardURL) and not _registered and in_worker_process():
        raise ConfigError(
            f"{url}: a plain URL string in a DataLoader worker where register() never ran (a spawn or forkserver "
            "worker): it would open with $ENCFS_KEY alone, without the key, signers or options given to register() "
            "in the parent. Pass the URLs through encfs.loaders.webdataset.expand_urls(...), which carries them"
        )
    opts = url.storage_options if isinstance(url, ShardURL) else _options
    fs, path = url_to_fs(str(url), **opts)
    return fs.open(path, mode)


def register(key: str | None = None, **storage_options: Any) -> None:
    """Make webdataset read (and write) ``encfs::`` URLs in this process: the opener and the
    ``::``-aware ``expand_urls``. ``key``: key references (``"keyfile:/path"``; default
    ``$ENCFS_KEY``); ``storage_options`` as for ``fsspec.open`` (``encfs={...}``, ``s3={...}``,
    or flat for the encfs hop). Call it before making datasets; calling again replaces the options."""
    global _registered
    opts = dict(storage_options)
    if key is not None:
        opts[SCHEME] = {**opts.get(SCHEME, {}), "key": key}
    _registered = True
    _options.clear()
    _options.update(opts)
    gopen.gopen_schemes[SCHEME] = open_url
    shardlists.expand_urls = expand_urls


gopen.gopen_schemes.setdefault(SCHEME, open_url)  # here too, for workers that unpickle a ShardURL
