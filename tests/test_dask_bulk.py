"""``encfs migrate --dask``: the per-object tasks on a Dask ``LocalCluster`` (two worker
processes) against the moto S3 server, including a worker killed mid-run, and keys travelling
to the cluster as references only (never as key bytes in a task)."""

from __future__ import annotations

import base64
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from encfs import bulk
from encfs.filesystem import EncFileSystem
from encfs.journal import COMMITTED
from encfs.migrate import migrate

try:
    import distributed
    from distributed.diagnostics.plugin import SchedulerPlugin
    from distributed.protocol.pickle import dumps as dask_dumps
except ImportError as exc:  # pragma: no cover - depends on the install
    if os.environ.get("CI") == "true":
        pytest.fail(f"dask.distributed is not installed, and CI=true requires it: {exc}", pytrace=False)
    pytest.skip(f"dask.distributed is not installed ({exc}); pip install 'encfs[dask]'", allow_module_level=True)

pytestmark = pytest.mark.slow

N_SMALL = 100
LARGE = (300_000, 1_100_000, 2_500_000)


@pytest.fixture(scope="module")
def cluster():
    c = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, worker_dashboard_address=None,
        silence_logs=40,
    )
    try:
        yield c
    finally:
        c.close(timeout=30)


def _client(cluster):
    return distributed.Client(cluster.scheduler_address, set_as_default=False, timeout=30)


def _fill(s3fs, prefix: str, seed: int) -> dict[str, bytes]:
    """~100 small objects (some empty, some nested) and a few multi-chunk ones."""
    import random

    rnd = random.Random(seed)
    data = {}
    for i in range(N_SMALL):
        rel = f"d{i % 7}/o{i:03d}.bin" if i % 3 else f"o{i:03d}.bin"
        data[rel] = rnd.randbytes(0 if i == 5 else rnd.randrange(1, 4000))
    for i, n in enumerate(LARGE):
        data[f"big/b{i}.bin"] = rnd.randbytes(n)
    s3fs.pipe({f"{prefix}/{rel}": b for rel, b in data.items()})
    return data


def _key_material(keyref: str) -> list[bytes]:
    """Every form of the key file's secret a payload could carry it in."""
    text = Path(keyref.removeprefix("keyfile:")).read_text()
    line = next(ln for ln in text.splitlines() if ln and not ln.startswith("#"))
    b64 = line.rsplit(":", 1)[-1].strip()
    raw = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))
    assert len(raw) == 32
    return [raw, b64.encode(), base64.b64encode(raw), raw.hex().encode(), line.encode()]


def _journal_states(path: str) -> dict[str, int]:
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT state, count(*) FROM objects GROUP BY state").fetchall())


def _check_dst(enc: EncFileSystem, dst: str, data: dict[str, bytes]) -> None:
    got = bulk.all_files(enc, dst)
    assert sorted(got) == sorted(data)
    for rel, want in data.items():
        assert enc.cat_file(f"{dst}/{rel}") == want, rel


def _enc(opts: dict, keyref: str) -> EncFileSystem:
    import s3fs

    return EncFileSystem(fs=s3fs.S3FileSystem(skip_instance_cache=True, **opts), key=keyref, skip_instance_cache=True)


def test_migrate_cli_on_dask(cluster, s3, s3_endpoint, keyref, tmp_path):
    fs, bucket, opts = s3
    data = _fill(fs, f"{bucket}/plain", seed=1)
    journal = str(tmp_path / "j.sqlite")
    cmd = [
        sys.executable, "-m", "encfs.cli", "migrate", "--dask", cluster.scheduler_address, "--endpoint-url", s3_endpoint,
        "-o", "key=testing", "-o", "secret=testing", "-k", keyref, "--journal", journal, "--json", "--no-progress",
        f"s3://{bucket}/plain", f"encfs::s3://{bucket}/enc",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert '"failed": []' in p.stdout, p.stdout
    assert _journal_states(journal) == {COMMITTED: len(data)}
    _check_dst(_enc(opts, keyref), f"{bucket}/enc", data)
    assert fs.cat_file(f"{bucket}/plain/o000.bin") == data["o000.bin"]  # the source untouched


class _RecordTasks(SchedulerPlugin):
    """On the scheduler (in this process for a LocalCluster): each new task's run spec, pickled
    as it goes on to a worker."""

    def __init__(self):
        self.payloads: list[bytes] = []

    def update_graph(self, scheduler, *, keys, **kwargs):
        for k in keys:
            ts = scheduler.tasks.get(k)
            if ts is not None and ts.run_spec is not None:
                self.payloads.append(dask_dumps(ts.run_spec))


def test_tasks_carry_key_references_not_key_bytes(cluster, s3, keyref, tmp_path, monkeypatch):
    fs, bucket, opts = s3
    data = {f"x{i}.bin": os.urandom(100 + i) for i in range(6)}
    fs.pipe({f"{bucket}/plain/{rel}": b for rel, b in data.items()})
    import s3fs

    src_fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    dst_fs = _enc(opts, keyref)
    dst_fs.keyring.recipients()  # the key loaded in the driver: still only its reference may travel

    sent: list[bytes] = []
    real_submit = bulk.Runner.submit

    def recording_submit(self, tag, fn, *args):
        sent.append(dask_dumps((fn, args)))
        return real_submit(self, tag, fn, *args)

    monkeypatch.setattr(bulk.Runner, "submit", recording_submit)
    plugin = _RecordTasks()
    cluster.scheduler.add_plugin(plugin, name="encfs-record-tasks")
    try:
        out = migrate(src_fs, f"{bucket}/plain", dst_fs, f"{bucket}/enc", src_url="s3://plain", dst_url="encfs::s3://enc",
                      journal_path=str(tmp_path / "j.sqlite"), dask=cluster.scheduler_address, progress=False)
    finally:
        cluster.scheduler.remove_plugin(name="encfs-record-tasks")
    assert not out.failed and out.checked == len(data)
    assert len(sent) == 2 * len(data) and len(plugin.payloads) == 2 * len(data)
    secrets = _key_material(keyref)
    for payload in sent + plugin.payloads:
        assert keyref.encode() in payload  # the reference is what travels...
        for s in secrets:
            assert s not in payload  # ...and never the key itself
    _check_dst(dst_fs, f"{bucket}/enc", data)


class _RecordReschedules(SchedulerPlugin):
    """Tasks taken back from a worker that was running them (it left or died)."""

    def __init__(self):
        self.taken_back: list[str] = []

    def transition(self, key, start, finish, *args, stimulus_id: str = "", **kwargs):
        if start == "processing" and finish in ("released", "waiting", "no-worker", "queued"):
            self.taken_back.append(f"{key} -> {finish} ({stimulus_id})")


def _worker_pids(client) -> dict[str, int]:
    return client.run(os.getpid, on_error="ignore")


def test_worker_killed_mid_run(cluster, s3, keyref, tmp_path):
    fs, bucket, opts = s3
    data = _fill(fs, f"{bucket}/plain", seed=2)
    import s3fs

    src_fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    dst_fs = _enc(opts, keyref)
    journal = str(tmp_path / "j.sqlite")
    client = _client(cluster)
    try:
        client.wait_for_workers(2, timeout=60)
        result: dict = {}
        plugin = _RecordReschedules()
        cluster.scheduler.add_plugin(plugin, name="encfs-record-reschedules")

        def run() -> None:
            try:
                result["out"] = migrate(src_fs, f"{bucket}/plain", dst_fs, f"{bucket}/enc", src_url="s3://plain",
                                        dst_url="encfs::s3://enc", journal_path=journal, dask=cluster.scheduler_address,
                                        progress=False)
            except BaseException as e:  # reported below
                result["error"] = e

        t = threading.Thread(target=run, daemon=True)
        t.start()
        # Kill (SIGKILL) a worker that is running one of our tasks, once the run is under way;
        # again (at most 3 kills) if that task ended just before the kill landed.
        deadline, kills = time.monotonic() + 60, []
        while t.is_alive() and time.monotonic() < deadline and not plugin.taken_back and len(kills) < 3:
            time.sleep(0.2)
            if len(fs.find(f"{bucket}/enc", refresh=True)) < 15:
                continue
            pids = _worker_pids(client)
            busy = [addr for addr, keys in client.processing().items() if keys and addr in pids]
            if busy:
                kills.append((busy[0], pids[busy[0]]))
                os.kill(pids[busy[0]], signal.SIGKILL)
                time.sleep(1.0)  # the scheduler notices the lost worker and takes its tasks back
        assert kills, "the run ended (or never got going) before a worker could be killed mid-run"
        assert plugin.taken_back, f"none of the killed workers {kills} was running a task"
        t.join(120)
        assert not t.is_alive(), "the run did not finish after a worker was killed"
        assert "error" not in result, repr(result.get("error"))
        out = result["out"]
        after = _worker_pids(client)
        print(f"killed workers {kills}; workers after: {after}; tasks taken back from it: "
              f"{plugin.taken_back}; first run: {out.as_dict()}")
        if out.failed:  # a task that failed for good: a rerun must finish the job
            out2 = migrate(src_fs, f"{bucket}/plain", dst_fs, f"{bucket}/enc", src_url="s3://plain", dst_url="encfs::s3://enc",
                           journal_path=journal, dask=cluster.scheduler_address, progress=False)
            print(f"rerun: {out2.as_dict()}")
            assert not out2.failed
        assert _journal_states(journal) == {COMMITTED: len(data)}
        _check_dst(dst_fs, f"{bucket}/enc", data)
    finally:
        cluster.scheduler.remove_plugin(name="encfs-record-reschedules")
        client.close()


def test_unreachable_scheduler_is_a_clear_error():
    from encfs.errors import EncfsError

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(EncfsError, match="could not reach the Dask scheduler"):
        bulk.Runner(2, f"tcp://127.0.0.1:{port}", connect_timeout=2)
    assert time.monotonic() - t0 < 30


def test_lost_scheduler_is_a_clear_error_not_a_hang(tmp_path):
    """A scheduler that dies with tasks in flight: ``finished`` raises within about the connect
    timeout (the driver never waits forever), and closing the runner does not hang either."""
    from encfs.errors import EncfsError

    sched_file = tmp_path / "scheduler.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
         "--no-dashboard", "--scheduler-file", str(sched_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not sched_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        import json

        address = json.loads(sched_file.read_text())["address"]
        runner = bulk.Runner(2, address, connect_timeout=3)
        try:
            for i in range(3):  # no workers: they wait on the scheduler
                runner.submit(i, time.sleep, 0.01)
            proc.kill()
            proc.wait(10)
            t0 = time.monotonic()
            with pytest.raises(EncfsError, match="lost the Dask scheduler"):
                list(runner.finished())
            assert time.monotonic() - t0 < 30
        finally:
            t0 = time.monotonic()
            runner.close()
            assert time.monotonic() - t0 < 60
    finally:
        proc.kill()
        proc.wait(10)


def test_rewrap_and_verify_on_dask(cluster, s3, s3_endpoint, keyref, tmp_path):
    """``rewrap`` and ``verify`` over a prefix run their per-object tasks on the cluster too:
    every header gains the new recipient (payloads untouched), the journal commits each object,
    and ``verify --dask`` authenticates every chunk and finds a tampered object."""
    from .conftest import write_key

    fs, bucket, opts = s3
    data = {f"d{i % 3}/o{i:02d}.bin": os.urandom(1000 + 3000 * i) for i in range(24)}
    enc = _enc(opts, keyref)
    for rel, b in data.items():
        enc.pipe_file(f"{bucket}/enc/{rel}", b)
    other = write_key(tmp_path / "other.key")
    common = ["--endpoint-url", s3_endpoint, "-o", "key=testing", "-o", "secret=testing", "--dask", cluster.scheduler_address, "--no-progress"]
    journal = str(tmp_path / "rewrap.sqlite")
    p = subprocess.run([sys.executable, "-m", "encfs.cli", "rewrap", "-k", keyref, "--add", other, "--journal", journal, "--json", *common,
                        f"s3://{bucket}/enc"], capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    assert _journal_states(journal) == {COMMITTED: len(data)}
    _check_dst(_enc(opts, other), f"{bucket}/enc", data)

    ok = subprocess.run([sys.executable, "-m", "encfs.cli", "verify", "-k", other, "--json", *common, f"s3://{bucket}/enc"],
                        capture_output=True, text=True, timeout=180)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert ok.stdout.count('"ok": true') == len(data)
    raw = bytearray(fs.cat_file(f"{bucket}/enc/d1/o13.bin"))
    raw[-100] ^= 1
    fs.pipe_file(f"{bucket}/enc/d1/o13.bin", bytes(raw))
    bad = subprocess.run([sys.executable, "-m", "encfs.cli", "verify", "-k", other, "--json", *common, f"s3://{bucket}/enc"],
                         capture_output=True, text=True, timeout=180)
    assert bad.returncode == 1
    rows = [json.loads(line) for line in bad.stdout.splitlines()]
    assert [r["path"].endswith("d1/o13.bin") for r in rows if not r["ok"]] == [True]
    assert sum(r["ok"] for r in rows) == len(data) - 1
