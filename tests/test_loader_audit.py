"""Regression tests for an outside audit of the loaders: a resume state refuses another
dataset, record datasets shuffle by shard, and a tar sample's members must be adjacent."""

from __future__ import annotations

import io
import tarfile

import fsspec
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from encfs.loaders import EncryptedLoader, EncryptedRecordDataset, EncryptedTarDataset  # noqa: E402


def _records(tmp_path, keyref, name: str, n: int, width: int) -> tuple[list[str], dict]:
    opts = {"encfs": {"key": keyref}}
    url = f"encfs::file://{tmp_path}/{name}.bin"
    with fsspec.open(url, "wb", **opts) as f:
        f.write(np.arange(n * width, dtype=np.uint8).tobytes())
    return [url], opts


def test_resume_state_of_another_dataset_is_refused(tmp_path, keyref):
    urls_a, opts = _records(tmp_path, keyref, "a", 160, 64)
    a = EncryptedRecordDataset(urls_a, (64,), np.uint8, storage_options=opts)
    urls_b, _ = _records(tmp_path, keyref, "b", 160, 128)
    b = EncryptedRecordDataset(urls_b, (128,), np.uint8, storage_options=opts)
    loader = EncryptedLoader(a, batch_size=4, num_workers=0, seed=1)
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="another"):
        EncryptedLoader(b, batch_size=4, num_workers=0, seed=1).load_state_dict(state)
    same = EncryptedLoader(a, batch_size=4, num_workers=0, seed=1)
    same.load_state_dict(state)
    assert len(same) == (160 - 8) // 4, "the same dataset resumes after the 8 samples consumed"


def test_record_datasets_shuffle_by_shard(tmp_path, keyref):
    opts = {"encfs": {"key": keyref}}
    urls = []
    for k, n in enumerate((30, 50, 20)):
        url = f"encfs::file://{tmp_path}/s{k}.bin"
        with fsspec.open(url, "wb", **opts) as f:
            f.write(np.zeros(n * 8, dtype=np.uint8).tobytes())
        urls.append(url)
    ds = EncryptedRecordDataset(urls, (8,), np.uint8, storage_options=opts)
    assert ds.shard_sizes == [30, 50, 20]


def test_tar_sample_members_must_be_adjacent(tmp_path, keyref):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name in ("k/1.x", "k/2.x", "k/1.y"):
            info = tarfile.TarInfo(name)
            info.size = 1
            t.addfile(info, io.BytesIO(b"z"))
    opts = {"encfs": {"key": keyref}}
    url = f"encfs::file://{tmp_path}/bad.tar"
    with fsspec.open(url, "wb", **opts) as f:
        f.write(buf.getvalue())
    with pytest.raises(ValueError, match="bad.tar.*appears again"):
        list(EncryptedTarDataset([url], storage_options=opts, shuffle=False))
