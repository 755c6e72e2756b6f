"""Listing cost on object stores: plaintext sizes from one listing request per page, counted
against a real S3 API (moto server), and still exact; pandas and pyarrow over a 200-file prefix."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator

import pytest

from encfs import format as fmt
from encfs.errors import ConfigError, FormatError, HeaderFullError
from encfs.filesystem import EncFileSystem
from encfs.keys import X25519Identity

N = 200


@contextlib.contextmanager
def requests(s3fs_fs) -> Iterator[list[str]]:
    """Every HTTP request the s3fs client sends inside the block, as 'METHOD path'."""
    sent: list[str] = []

    def hook(request=None, **_kw):
        sent.append(f"{request.method} {request.url.split('?')[0]}")

    fs_client = s3fs_fs.s3
    fs_client.meta.events.register("before-send.s3.*", hook)
    try:
        s3fs_fs.invalidate_cache()
        yield sent
    finally:
        fs_client.meta.events.unregister("before-send.s3.*", hook)


def _sizes(n: int) -> list[int]:
    """Plaintext sizes around the chunk boundaries and in between."""
    base = [0, 1, 15, 16, 17, 16383, 16384, 16385, 40_000]
    return [base[i] if i < len(base) else (i * 7919) % 70_000 for i in range(n)]


@pytest.fixture
def bucket_of_200(s3, keyref):
    fs, bucket, opts = s3
    enc = EncFileSystem(fs=fs, key=keyref, skip_instance_cache=True)
    sizes = _sizes(N)
    for i, n in enumerate(sizes):
        enc.pipe_file(f"{bucket}/train/part-{i:04d}.bin", os.urandom(n))
    return enc, bucket, sizes


def test_find_and_ls_cost_one_listing_and_one_check_with_exact_sizes(s3, keyref, bucket_of_200):
    fs = s3[0]
    enc, bucket, sizes = bucket_of_200
    with requests(fs) as plain:
        fs.find(f"{bucket}/train", detail=True)
    with requests(fs) as ours:
        found = enc.find(f"{bucket}/train", detail=True)
    assert len(plain) == 1, plain
    assert len(ours) == len(plain) + 1, ours  # the listing, plus one header read that checks the assumed length
    assert [e["size"] for _, e in sorted(found.items())] == sizes
    assert all(e["encrypted"] is True for e in found.values())
    with requests(fs) as ours:
        listed = enc.ls(f"{bucket}/train", detail=True)
    assert len(ours) == 2, ours
    assert sorted((e["name"], e["size"]) for e in listed) == sorted(found and ((k, v["size"]) for k, v in found.items()))
    # What was listed is what opening each file reports and reads.
    for name in list(found)[:12]:
        with enc.open(name, "rb") as f:
            assert f.size == found[name]["size"] == len(f.read())


def test_probe_reads_every_header_and_agrees(s3, keyref, bucket_of_200):
    fs = s3[0]
    enc, bucket, sizes = bucket_of_200
    probing = EncFileSystem(fs=fs, key=keyref, list_sizes="probe", skip_instance_cache=True)
    with requests(fs) as sent:
        found = probing.find(f"{bucket}/train", detail=True)
    assert len(sent) == 1 + N
    assert [e["size"] for _, e in sorted(found.items())] == sizes


def test_a_prefix_written_with_another_header_length_is_detected_and_probed(s3, keyref):
    """Every file here has a 2048-byte header; a reader assuming 1024 finds out from its one
    check and reads every header, so the sizes it lists are still exact. Given the same
    header_length, the reader lists with no header read beyond the check."""
    fs, bucket, _ = s3
    writer = EncFileSystem(fs=fs, key=keyref, header_length=2048, skip_instance_cache=True)
    sizes = _sizes(20)
    for i, n in enumerate(sizes):
        writer.pipe_file(f"{bucket}/big/{i:03d}", os.urandom(n))
    assert int.from_bytes(fs.cat_file(f"{bucket}/big/000", start=28, end=32), "big") == 2048
    default = EncFileSystem(fs=fs, key=keyref, skip_instance_cache=True)
    with requests(fs) as sent:
        found = default.find(f"{bucket}/big", detail=True)
    assert [e["size"] for _, e in sorted(found.items())] == sizes
    assert len(sent) > 2
    with requests(fs) as sent:
        found = writer.find(f"{bucket}/big", detail=True)
    assert [e["size"] for _, e in sorted(found.items())] == sizes and len(sent) == 2


def test_files_that_cannot_have_the_assumed_length_are_probed(s3, keyref):
    """A plaintext object and a cut-off encfs file beside encfs files: their sizes are impossible
    for a 1024-byte header, so they are read and reported as what they are."""
    fs, bucket, _ = s3
    enc = EncFileSystem(fs=fs, key=keyref, skip_instance_cache=True)
    for i in range(5):
        enc.pipe_file(f"{bucket}/mix/{i}", os.urandom(10_000 * i))
    fs.pipe_file(f"{bucket}/mix/notes.txt", b"plain text, not encrypted")  # 25 bytes: below any header
    whole = fs.cat_file(f"{bucket}/mix/4")
    fs.pipe_file(f"{bucket}/mix/cut", whole[: fmt.STANDARD_HEADER + 56 + 16400])  # ends on a chunk boundary
    with requests(fs) as sent:
        found = enc.find(f"{bucket}/mix", detail=True)
    probed = {s.rsplit("/", 1)[-1] for s in sent if s.startswith("GET") and "list-type" not in s}
    assert "cut" in probed
    assert found[f"{bucket}/mix/3"]["size"] == 30_000 and found[f"{bucket}/mix/3"]["encrypted"] is True
    assert found[f"{bucket}/mix/cut"]["encrypted"].startswith("invalid:")
    assert found[f"{bucket}/mix/notes.txt"]["encrypted"] is False
    with pytest.raises(FormatError):
        enc.cat_file(f"{bucket}/mix/cut")


def test_info_of_one_file_reads_its_header(s3, keyref):
    """A single ``info`` is exact for any header length: its one file is the check."""
    fs, bucket, _ = s3
    EncFileSystem(fs=fs, key=keyref, header_length=4096, skip_instance_cache=True).pipe_file(f"{bucket}/one", b"x" * 5000)
    assert EncFileSystem(fs=fs, key=keyref, skip_instance_cache=True).info(f"{bucket}/one")["size"] == 5000


def test_local_listing_reads_headers_so_mixed_lengths_are_exact(tmp_path, keyref):
    a = EncFileSystem(key=keyref, skip_instance_cache=True)
    b = EncFileSystem(key=keyref, header_length=1536, skip_instance_cache=True)
    a.pipe_file(str(tmp_path / "d" / "a"), b"1" * 20_000)
    b.pipe_file(str(tmp_path / "d" / "b"), b"2" * 20_000)
    assert a.probe_sizes
    assert {e["name"].rsplit("/", 1)[-1]: e["size"] for e in a.ls(str(tmp_path / "d"))} == {"a": 20_000, "b": 20_000}


def test_writers_use_the_standard_length_and_refuse_recipients_that_do_not_fit(tmp_path, keyref):
    many = [X25519Identity.generate().recipient for _ in range(9)]
    enc = EncFileSystem(key=keyref, recipients=many, skip_instance_cache=True)
    with pytest.raises(HeaderFullError, match=r"header_length=1536"):
        enc.pipe_file(str(tmp_path / "x"), b"data")
    assert not (tmp_path / "x").exists()
    roomy = EncFileSystem(key=keyref, recipients=many, header_length=1536, skip_instance_cache=True)
    roomy.pipe_file(str(tmp_path / "x"), b"data")
    assert int.from_bytes((tmp_path / "x").read_bytes()[28:32], "big") == 1536
    one = EncFileSystem(key=keyref, skip_instance_cache=True)
    one.pipe_file(str(tmp_path / "y"), b"data")
    assert int.from_bytes((tmp_path / "y").read_bytes()[28:32], "big") == fmt.STANDARD_HEADER


@pytest.mark.parametrize("bad", [1000, 512, 0, 3 << 20, "1024", True])
def test_bad_header_length_or_list_sizes_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="header_length"):
        EncFileSystem(header_length=bad, skip_instance_cache=True)
    with pytest.raises(ConfigError, match="list_sizes"):
        EncFileSystem(list_sizes="sometimes", skip_instance_cache=True)


def test_pandas_and_pyarrow_read_a_200_file_prefix(s3, keyref):
    pd = pytest.importorskip("pandas")
    pq = pytest.importorskip("pyarrow.parquet")
    ds = pytest.importorskip("pyarrow.dataset")
    import pyarrow as pa

    fs, bucket, opts = s3
    enc = EncFileSystem(fs=fs, key=keyref, skip_instance_cache=True)
    frames = []
    for i in range(N):
        df = pd.DataFrame({"part": [i] * (i % 7 + 1), "v": [f"row-{i}-{j}" * (i % 5 + 1) for j in range(i % 7 + 1)]})
        frames.append(df)
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        enc.pipe_file(f"{bucket}/pq/part-{i:04d}.parquet", buf.getvalue())
    expected = pd.concat(frames, ignore_index=True).sort_values(["part", "v"], ignore_index=True)
    so = {"encfs": {"key": keyref}, "s3": opts}
    got = pd.read_parquet(f"encfs::s3://{bucket}/pq/", storage_options=so)
    pd.testing.assert_frame_equal(got.sort_values(["part", "v"], ignore_index=True), expected)
    table = ds.dataset(f"{bucket}/pq", filesystem=enc, format="parquet").to_table(use_threads=False)
    assert table.num_rows == len(expected)
    assert sorted(table.column("v").to_pylist()) == sorted(expected["v"])
    one = pq.ParquetFile(enc.open(f"{bucket}/pq/part-0042.parquet")).read()
    assert one.equals(pa.Table.from_pandas(frames[42], preserve_index=False))
