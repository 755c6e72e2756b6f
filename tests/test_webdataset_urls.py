"""``webdataset.WebDataset("encfs::...")`` with the real webdataset library (``encfs.loaders.webdataset``).

Ten encrypted WebDataset-layout shards, read by webdataset's own pipeline from the natural URL
with a brace range, compared sample by sample with the plaintext: in this process, in
DataLoader fork and spawn workers, with the key from ``register`` or ``$ENCFS_KEY``, over
moto S3; a wrong key, a tampered and a truncated shard raise encfs's typed errors.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile

import fsspec
import numpy as np
import pytest

wds = pytest.importorskip("webdataset")
torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader  # noqa: E402

from encfs.errors import ConfigError, IntegrityError, NoMatchingKeyError  # noqa: E402
from encfs.loaders import webdataset as encfs_wds  # noqa: E402

from .test_loader_datasets import _epoch_error  # noqa: E402

gopen, shardlists = encfs_wds.gopen, encfs_wds.shardlists  # the modules (webdataset.gopen is also a function)

SHARDS = 10
PER_SHARD = 4


def _sample_bytes(k: int, j: int) -> dict:
    key = f"{k * 100 + j:06d}"
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(k * 100 + j).normal(size=700 + 100 * j))  # 6-9 KB: shards span chunks
    return {"__key__": key, "cls": str((k * 7 + j) % 10).encode(), "npy": buf.getvalue()}


def _tar(samples: list[dict]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for s in samples:
            for field in ("cls", "npy"):
                info = tarfile.TarInfo(f"{s['__key__']}.{field}")
                info.size = len(s[field])
                t.addfile(info, io.BytesIO(s[field]))
    return buf.getvalue()


@pytest.fixture
def shards(tmp_path, keyref):
    """Ten encrypted shards ``shard-0000k.tar`` under tmp_path and their samples, in order."""
    opts = {"encfs": {"key": keyref}}
    samples = []
    for k in range(SHARDS):
        shard = [_sample_bytes(k, j) for j in range(PER_SHARD)]
        with fsspec.open(f"encfs::file://{tmp_path}/shard-{k:05d}.tar", "wb", **opts) as f:
            f.write(_tar(shard))
        samples += shard
    return {"root": tmp_path, "url": f"encfs::file://{tmp_path}/shard-{{00000..00009}}.tar", "samples": samples, "key": keyref}


@pytest.fixture(autouse=True)
def _unregistered():
    """Every test starts and ends with webdataset as it ships (no encfs opener, its expand_urls)."""
    saved = shardlists.expand_urls, gopen.gopen_schemes.pop("encfs", None), dict(encfs_wds._options)
    shardlists.expand_urls = encfs_wds._webdataset_expand
    yield
    shardlists.expand_urls = saved[0]
    gopen.gopen_schemes.pop("encfs", None)
    if saved[1] is not None:
        gopen.gopen_schemes["encfs"] = saved[1]
    encfs_wds._options.clear()
    encfs_wds._options.update(saved[2])


def _plain(sample: dict) -> dict:
    return {k: sample[k] for k in ("__key__", "cls", "npy")}


def test_natural_url_reads_every_sample_in_order(shards):
    assert shardlists.expand_urls(shards["url"])[0] == "encfs"  # why: webdataset splits on "::"
    encfs_wds.register(key=shards["key"])
    ds = wds.WebDataset(shards["url"], shardshuffle=False)
    got = list(ds)
    assert [_plain(s) for s in got] == shards["samples"]
    assert [s["__url__"] for s in got[::PER_SHARD]] == [f"encfs::file://{shards['root']}/shard-{k:05d}.tar" for k in range(SHARDS)]
    decoded = wds.WebDataset(shards["url"], shardshuffle=False).decode().to_tuple("npy", "cls")
    for (arr, cls), plain in zip(decoded, shards["samples"]):
        assert np.array_equal(arr, np.load(io.BytesIO(plain["npy"]))) and cls == int(plain["cls"])


def test_resampled_urls_expand_too(shards):
    encfs_wds.register(key=shards["key"])
    ds = wds.WebDataset(shards["url"], resampled=True, shardshuffle=False, seed=5).with_epoch(30)
    plain = {s["__key__"]: s for s in shards["samples"]}
    got = [_plain(s) for s in ds]
    assert len(got) == 30 and all(s == plain[s["__key__"]] for s in got)
    assert len({s["__key__"][:4] for s in got}) > 1  # drawn from several shards


def test_expand_urls_keeps_encfs_chains_only():
    mixed = "a-{0..1}.tar::encfs::simplecache::s3://b/x-{00..01}.tar::encfs::file:///d/y.tar"
    got = encfs_wds.expand_urls(mixed, {"encfs": {"key": "keyfile:/k"}})
    assert got == ["a-0.tar", "a-1.tar", "encfs::simplecache::s3://b/x-00.tar", "encfs::simplecache::s3://b/x-01.tar", "encfs::file:///d/y.tar"]
    assert [type(u).__name__ for u in got] == ["str", "str", "ShardURL", "ShardURL", "ShardURL"]
    again = pickle.loads(pickle.dumps(got[2]))
    assert again == got[2] and again.storage_options == {"encfs": {"key": "keyfile:/k"}}
    plain = "p-{0..2}.tar::q.tar"
    assert encfs_wds.expand_urls(plain) == encfs_wds._webdataset_expand(plain)


def _by_key(samples) -> list[dict]:
    return sorted((_plain(s) for s in samples), key=lambda s: s["__key__"])


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_two_workers(shards, context):
    """The key comes from register() only: spawn workers get it from the pickled ShardURLs."""
    encfs_wds.register(key=shards["key"])
    ds = wds.WebDataset(shards["url"], shardshuffle=False)
    loader = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context=context)
    got = list(loader)
    assert len(got) == SHARDS * PER_SHARD
    assert _by_key(got) == shards["samples"]


def test_key_from_environment(shards, monkeypatch):
    monkeypatch.setenv("ENCFS_KEY", shards["key"])
    encfs_wds.register()
    loader = DataLoader(wds.WebDataset(shards["url"], shardshuffle=False), batch_size=None, num_workers=2, multiprocessing_context="fork")
    assert _by_key(loader) == shards["samples"]


def test_wrong_key_raises_no_matching_key(shards, other_keyref):
    encfs_wds.register(key=other_keyref)
    with pytest.raises(NoMatchingKeyError) as e:
        next(iter(wds.WebDataset(shards["url"], shardshuffle=False)))
    assert e.value.path == str(shards["root"] / "shard-00000.tar")
    loader = DataLoader(wds.WebDataset(shards["url"], shardshuffle=False), batch_size=None, num_workers=2, multiprocessing_context="fork")
    error = _epoch_error(loader)
    assert isinstance(error, NoMatchingKeyError) and "shard-0000" in str(error), error


def test_tampered_shard_raises_integrity_error(shards):
    path = shards["root"] / "shard-00003.tar"
    size = os.path.getsize(path)
    assert size > 2 * (16 << 10) + 4096  # 3+ chunks: size // 2 is past the header and chunk 0, before the final chunk
    with open(path, "r+b") as f:
        f.seek(size // 2)
        b = f.read(1)
        f.seek(size // 2)
        f.write(bytes([b[0] ^ 1]))
    encfs_wds.register(key=shards["key"])
    got = []
    with pytest.raises(IntegrityError, match=str(path)):
        for s in wds.WebDataset(shards["url"], shardshuffle=False):
            got.append(_plain(s))
    assert got == shards["samples"][: len(got)] and 3 * PER_SHARD <= len(got) < 4 * PER_SHARD  # verified prefix only
    loader = DataLoader(wds.WebDataset(shards["url"], shardshuffle=False), batch_size=None, num_workers=2, multiprocessing_context="fork")
    error = _epoch_error(loader)
    assert isinstance(error, IntegrityError) and f"{path}: chunk 1 failed authentication" in str(error), error


def test_truncated_shard_raises_integrity_error(shards):
    path = shards["root"] / "shard-00007.tar"
    os.truncate(path, os.path.getsize(path) - 100)
    encfs_wds.register(key=shards["key"])
    with pytest.raises(IntegrityError, match=str(path)):
        list(wds.WebDataset(shards["url"], shardshuffle=False))


def test_shard_cache_is_refused(shards, tmp_path):
    cache = tmp_path / "wds-cache"
    cache.mkdir()
    encfs_wds.register(key=shards["key"])
    with pytest.raises(ConfigError, match="decrypted shard on local disk"):
        next(iter(wds.WebDataset(shards["url"], shardshuffle=False, cache_dir=str(cache))))
    assert not [p for p in cache.rglob("*") if p.is_file()]


def test_shard_writer_encrypts(tmp_path, keyref):
    encfs_wds.register(key=keyref)
    samples = [_sample_bytes(0, j) for j in range(5)]
    with wds.ShardWriter(f"encfs::file://{tmp_path}/w-%05d.tar", maxcount=2, verbose=0) as sink:
        for s in samples:
            sink.write(s)
    assert sorted(p.name for p in tmp_path.glob("w-*.tar")) == ["w-00000.tar", "w-00001.tar", "w-00002.tar"]
    assert all(b"ustar" not in p.read_bytes() for p in tmp_path.glob("w-*.tar"))  # ciphertext on disk
    assert [_plain(s) for s in wds.WebDataset(f"encfs::file://{tmp_path}/w-{{00000..00002}}.tar", shardshuffle=False)] == samples
    with pytest.raises(RuntimeError), wds.TarWriter(f"encfs::file://{tmp_path}/failed.tar") as w:
        w.write(samples[0])
        raise RuntimeError("a failed with block discards the shard")
    assert not (tmp_path / "failed.tar").exists()


def test_s3_fork_workers(s3, keyref):
    fs, bucket, s3opts = s3
    opts = {"encfs": {"key": keyref}, "s3": s3opts}
    samples = []
    for k in range(3):
        shard = [_sample_bytes(k, j) for j in range(PER_SHARD)]
        with fsspec.open(f"encfs::s3://{bucket}/shard-{k}.tar", "wb", **opts) as f:
            f.write(_tar(shard))
        samples += shard
    encfs_wds.register(key=keyref, s3=s3opts)
    url = f"encfs::s3://{bucket}/shard-{{0..2}}.tar"
    assert [_plain(s) for s in wds.WebDataset(url, shardshuffle=False)] == samples
    loader = DataLoader(wds.WebDataset(url, shardshuffle=False), batch_size=None, num_workers=2, multiprocessing_context="fork")
    assert _by_key(loader) == samples
