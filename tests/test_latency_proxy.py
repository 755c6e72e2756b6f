"""The latency proxy in front of the moto server: bytes round-trip, delay, pacing, counting, faults."""

from __future__ import annotations

import http.client
import os
import socket
import time
from urllib.parse import urlsplit

import pytest

from .conftest import run_threads
from tests.latency_proxy import LatencyProxy

s3fs = pytest.importorskip("s3fs")

MiB = 1024 * 1024


def _fs(url: str):
    return s3fs.S3FileSystem(
        key="testing",
        secret="testing",
        skip_instance_cache=True,
        client_kwargs={"endpoint_url": url, "region_name": "us-east-1"},
    )


@pytest.fixture
def bucket(s3):
    fs, bucket, _ = s3
    return fs, bucket


@pytest.fixture
def proxy(s3_endpoint):
    with LatencyProxy(s3_endpoint, latency=0.0) as p:
        yield p


def _gets(proxy: LatencyProxy, path: str) -> list:
    return [r for r in proxy.requests if r.method == "GET" and r.path == "/" + path]


def test_roundtrip_sizes_and_multipart(bucket, proxy):
    _, name = bucket
    fs = _fs(proxy.url)
    for size in (0, 1024, 12 * MiB + 3):
        data = os.urandom(size)
        path = f"{name}/obj{size}"
        with fs.open(path, "wb", block_size=5 * MiB) as f:
            for i in range(0, size, MiB):
                f.write(data[i : i + MiB])
        assert fs.cat_file(path) == data
        assert _gets(proxy, path)[-1].bytes_out == size
    parts = [r for r in proxy.requests if r.method == "PUT" and "partNumber=" in r.query]
    assert [r.bytes_in for r in parts] == [5 * MiB, 5 * MiB, 2 * MiB + 3]
    assert all(r.status == 200 for r in proxy.requests)


def test_ranged_reads_record_range(bucket, proxy):
    direct, name = bucket
    data = os.urandom(300_000)
    direct.pipe_file(f"{name}/r", data)
    fs = _fs(proxy.url)
    for start, end in [(0, 1), (1000, 70_000), (299_990, 300_000)]:
        assert fs.cat_file(f"{name}/r", start=start, end=end) == data[start:end]
        rec = _gets(proxy, f"{name}/r")[-1]
        assert (rec.range, rec.status, rec.bytes_out) == (f"bytes={start}-{end - 1}", 206, end - start)


def test_latency_delays_each_request(bucket, s3_endpoint):
    direct, name = bucket
    direct.pipe_file(f"{name}/s", b"small")
    with LatencyProxy(s3_endpoint, latency=0.05) as p:
        fs = _fs(p.url)
        fs.cat_file(f"{name}/s")
        t0 = time.perf_counter()
        assert fs.cat_file(f"{name}/s") == b"small"
        assert time.perf_counter() - t0 >= 0.05


def test_bandwidth_caps_download(bucket, s3_endpoint):
    direct, name = bucket
    data = os.urandom(2 * MiB)
    direct.pipe_file(f"{name}/bw", data)
    with LatencyProxy(s3_endpoint, latency=0.0, bandwidth=4 * MiB) as p:
        fs = _fs(p.url)
        t0 = time.perf_counter()
        assert fs.cat_file(f"{name}/bw") == data
        assert time.perf_counter() - t0 >= 0.4


def test_counting_and_reset(bucket, proxy):
    direct, name = bucket
    direct.pipe_file(f"{name}/c", b"count me")
    fs = _fs(proxy.url)
    fs.cat_file(f"{name}/c")
    proxy.reset()
    assert proxy.count() == 0
    for _ in range(7):
        fs.cat_file(f"{name}/c")
    assert proxy.count("GET") == proxy.count("get") == 7
    assert proxy.count() == 7 + proxy.count("HEAD")  # s3fs sizes whole-file reads with a HEAD first
    assert all((r.path, r.query, r.status) == (f"/{name}/c", "", 200) for r in proxy.requests)


def test_503_is_retried(bucket, proxy):
    direct, name = bucket
    data = os.urandom(10_000)
    direct.pipe_file(f"{name}/f", data)
    proxy.inject("503", when=lambda r: r.method == "GET" and r.path == f"/{name}/f")
    assert _fs(proxy.url).cat_file(f"{name}/f") == data
    assert [r.status for r in _gets(proxy, f"{name}/f")] == [503, 200]


@pytest.mark.parametrize("fault", ["reset", "truncate"])
def test_broken_response_never_gives_wrong_bytes(bucket, proxy, fault):
    direct, name = bucket
    data = os.urandom(200_000)
    direct.pipe_file(f"{name}/f", data)
    proxy.inject(fault, when=lambda r: r.method == "GET")
    try:
        got = _fs(proxy.url).cat_file(f"{name}/f")
    except Exception:
        return
    assert got == data
    assert len(_gets(proxy, f"{name}/f")) == 2


def test_stall_delays_answer(bucket, s3_endpoint):
    direct, name = bucket
    direct.pipe_file(f"{name}/st", b"late")
    with LatencyProxy(s3_endpoint, latency=0.0, stall=0.3) as p:
        fs = _fs(p.url)
        p.inject("stall", when=lambda r: r.method == "GET", times=1)
        t0 = time.perf_counter()
        assert fs.cat_file(f"{name}/st") == b"late"
        assert time.perf_counter() - t0 >= 0.3


def test_concurrent_ranged_reads(bucket, s3_endpoint):
    direct, name = bucket
    data = os.urandom(MiB)
    direct.pipe_file(f"{name}/cc", data)
    with LatencyProxy(s3_endpoint, latency=0.01) as p:
        fs = _fs(p.url)

        def work(k: int) -> None:
            for j in range(5):
                start = (k * 5 + j) * 12_000
                assert fs.cat_file(f"{name}/cc", start=start, end=start + 9_000) == data[start : start + 9_000]

        failures = run_threads(16, work, timeout=30)
        assert not failures, failures
        assert p.count("GET") == 80


def test_chunked_upload_forwarded_unchanged(bucket, proxy):
    direct, name = bucket
    data = os.urandom(150_000)
    u = urlsplit(proxy.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.request("PUT", f"/{name}/ch", body=iter([data[:70_000], data[70_000:]]), encode_chunked=True)
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200
    conn.close()
    assert direct.cat_file(f"{name}/ch") == data
    assert proxy.requests[-1].bytes_in == len(data)


def test_upstream_down_gives_502_and_stop_does_not_hang():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    p = LatencyProxy(dead, latency=0.0, stall=30)
    u = urlsplit(p.start())
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.request("GET", "/b/k?x=1")
    resp = conn.getresponse()
    assert resp.status == 502 and b"<Code>BadGateway</Code>" in resp.read()
    assert (p.requests[0].path, p.requests[0].query, p.requests[0].status) == ("/b/k", "x=1", 502)
    idle = socket.create_connection((u.hostname, u.port))
    half = socket.create_connection((u.hostname, u.port))
    half.sendall(b"PUT /b/k HTTP/1.1\r\nContent-Length: 100\r\n\r\nabc")
    p.inject("stall")
    stalled = socket.create_connection((u.hostname, u.port))
    stalled.sendall(b"GET /b/k HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.1)
    thread = p._thread
    t0 = time.perf_counter()
    p.stop()
    assert time.perf_counter() - t0 < 3 and thread is not None and not thread.is_alive()
    assert idle.recv(10) == b"" and stalled.recv(10) == b""
    for c in (conn, idle, half, stalled):
        c.close()
