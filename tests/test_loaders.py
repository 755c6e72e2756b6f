"""encfs.loaders with a real torch DataLoader and worker processes."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from encfs.loaders import EncryptedRecordDataset  # noqa: E402


@pytest.fixture
def shards(tmp_path, keyref):
    import fsspec

    rng = np.random.default_rng(3)
    arrays = [rng.normal(size=(n, 33)).astype(np.float32) for n in (700, 1, 1299)]
    opts = {"encfs": {"key": keyref}}
    urls = []
    for k, a in enumerate(arrays):
        url = f"encfs::file://{tmp_path}/shard-{k}.bin"
        with fsspec.open(url, "wb", **opts) as f:
            f.write(a.tobytes())
        urls.append(url)
    return urls, opts, np.concatenate(arrays)


def test_items_match_plaintext(shards):
    urls, opts, ref = shards
    ds = EncryptedRecordDataset(urls, (33,), np.float32, storage_options=opts)
    assert len(ds) == len(ref) == 2000
    for i in (0, 699, 700, 701, 1999, -1, 1234):
        assert torch.equal(ds[i], torch.from_numpy(ref[i]))
    with pytest.raises(IndexError):
        ds[2000]


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_workers_see_the_same_data(shards, workers):
    from torch.utils.data import DataLoader

    urls, opts, ref = shards
    ds = EncryptedRecordDataset(urls, (33,), np.float32, storage_options=opts)
    batches = list(DataLoader(ds, batch_size=128, shuffle=False, num_workers=workers))
    assert torch.equal(torch.cat(batches), torch.from_numpy(ref))


def test_wrong_record_size_is_refused(shards):
    urls, opts, _ = shards
    with pytest.raises(ValueError, match="multiple"):
        EncryptedRecordDataset(urls, (5,), np.float32, storage_options=opts)
