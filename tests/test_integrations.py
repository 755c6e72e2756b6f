"""Real pyarrow, pandas, numpy and torch reading and writing through encfs."""

from __future__ import annotations

import io

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pd = pytest.importorskip("pandas")


@pytest.fixture
def table():
    n = 50_000
    rng = np.random.default_rng(0)
    return pa.table({"id": np.arange(n), "x": rng.normal(size=n), "label": rng.integers(0, 10, n).astype("int32"), "s": [f"row{i}" for i in range(n)]})


def test_pyarrow_parquet_read_table_and_dataset(enc, table):
    fs, root = enc
    with fs.open(f"{root}/ds/part-0.parquet", "wb") as f:
        pq.write_table(table.slice(0, 25_000), f, row_group_size=5000)
    with fs.open(f"{root}/ds/part-1.parquet", "wb") as f:
        pq.write_table(table.slice(25_000), f, row_group_size=5000)
    raw = open(f"{root}/ds/part-0.parquet", "rb").read()
    assert b"PAR1" not in raw
    got = pq.read_table(f"{root}/ds", filesystem=fs).sort_by("id")
    assert got.equals(table)
    import pyarrow.dataset as ds

    dset = ds.dataset(f"{root}/ds", filesystem=fs, format="parquet")
    assert dset.count_rows() == 50_000
    filtered = dset.to_table(columns=["id", "label"], filter=ds.field("label") == 3)
    assert filtered.num_rows == int((table["label"].to_numpy() == 3).sum())
    pf = pq.ParquetFile(fs.open(f"{root}/ds/part-1.parquet"))
    assert pf.read_row_group(2).equals(table.slice(35_000, 5000))


def test_pandas_through_urls(tmp_path, keyref, table):
    df = table.to_pandas()
    opts = {"encfs": {"key": keyref}}
    url = f"encfs::file://{tmp_path}/df.parquet"
    df.to_parquet(url, storage_options=opts)
    pd.testing.assert_frame_equal(pd.read_parquet(url, storage_options=opts), df)
    csv = f"encfs::file://{tmp_path}/df.csv"
    df.head(1000).to_csv(csv, index=False, storage_options=opts)
    assert b"row1" not in (tmp_path / "df.csv").read_bytes()
    back = pd.read_csv(csv, storage_options=opts)
    pd.testing.assert_frame_equal(back, df.head(1000), check_dtype=False)


def test_numpy_save_and_load(enc):
    fs, root = enc
    arr = np.random.default_rng(1).normal(size=(300, 257)).astype(np.float32)
    with fs.open(f"{root}/a.npy", "wb") as f:
        np.save(f, arr)
    with fs.open(f"{root}/a.npy", "rb") as f:
        np.testing.assert_array_equal(np.load(f), arr)
    with fs.open(f"{root}/a.npy", "rb") as f:
        f.seek(128 + 100 * 257 * 4)
        row = np.frombuffer(f.read(257 * 4), dtype=np.float32)
    np.testing.assert_array_equal(row, arr[100])


def test_numpy_readinto_preallocated_array(enc):
    fs, root = enc
    arr = np.arange(200_000, dtype=np.int64)
    fs.pipe_file(f"{root}/raw", arr.tobytes())
    out = np.empty_like(arr)
    with fs.open(f"{root}/raw", "rb") as f:
        assert f.readinto(memoryview(out).cast("B")) == arr.nbytes
    np.testing.assert_array_equal(out, arr)


def test_torch_checkpoint_roundtrip(enc):
    torch = pytest.importorskip("torch")
    fs, root = enc
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    with fs.open(f"{root}/ckpt.pt", "wb") as f:
        torch.save(model.state_dict(), f)
    with fs.open(f"{root}/ckpt.pt", "rb") as f:
        state = torch.load(io.BytesIO(f.read()), weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v)
    with fs.open(f"{root}/ckpt.pt", "rb") as f:
        state2 = torch.load(f, weights_only=True)
    assert torch.equal(state2["0.weight"], model.state_dict()["0.weight"])


def test_dask_dataframe_through_urls(tmp_path, keyref, table):
    """docs/INTEGRATIONS.md, dask: read and write Parquet prefixes by URL."""
    dd = pytest.importorskip("dask.dataframe")
    df = table.to_pandas().head(5000)
    opts = {"encfs": {"key": keyref}}
    url = f"encfs::file://{tmp_path}/dd"
    dd.from_pandas(df, npartitions=3).to_parquet(url, storage_options=opts)
    assert not any(b"PAR1" in p.read_bytes() for p in (tmp_path / "dd").glob("*.parquet"))
    back = dd.read_parquet(url, storage_options=opts).compute().sort_values("id").reset_index(drop=True)
    pd.testing.assert_frame_equal(back, df, check_dtype=False)


def test_polars_through_a_file_object(tmp_path, keyref, table):
    """docs/INTEGRATIONS.md, polars: its own URL layer does not know fsspec chains
    (``pl.read_parquet("encfs::...", storage_options=...)`` fails in polars), so open the file
    through encfs and hand polars the file object."""
    pl = pytest.importorskip("polars")
    import fsspec

    opts = {"encfs": {"key": keyref}}
    url = f"encfs::file://{tmp_path}/p.parquet"
    with fsspec.open(url, "wb", **opts) as f:
        pl.from_arrow(table).write_parquet(f)
    with fsspec.open(url, "rb", **opts) as f:
        back = pl.read_parquet(f)
    assert back.to_arrow().cast(table.schema).equals(table)
