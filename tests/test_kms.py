"""AWS KMS recipients against a real KMS API on loopback (moto server), KMS calls counted at a
proxy in front of it (``X-Amz-Target``), independently of encfs's own counters."""

from __future__ import annotations

import base64
import json
import multiprocessing
import os
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from encfs.errors import FormatError, IntegrityError, KeyReferenceError, NoMatchingKeyError
from encfs.filesystem import EncFileSystem
from encfs.keys import kms

from .independent_reader import parse_header as independent_parse_header
from .latency_proxy import LatencyProxy

pytest.importorskip("boto3")


@pytest.fixture(scope="module")
def kms_proxy(s3_endpoint):
    with LatencyProxy(s3_endpoint, latency=0) as proxy:
        yield proxy


@pytest.fixture
def kms_key(kms_proxy):
    """A fresh KMS key (and an alias to it) on the moto server; calls counted from here on."""
    import boto3

    c = boto3.client("kms", region_name="us-east-1", endpoint_url=kms_proxy.url)
    arn = c.create_key(Description="encfs test")["KeyMetadata"]["Arn"]
    alias = f"alias/encfs-{uuid.uuid4().hex[:8]}"
    c.create_alias(AliasName=alias, TargetKeyId=arn)
    kms.local_cache().clear()
    kms_proxy.reset()
    return arn, alias, kms_proxy


def ref(key: str, proxy: LatencyProxy, **opts: object) -> str:
    q = "&".join(f"{k}={v}" for k, v in {"region": "us-east-1", "endpoint": proxy.url, **opts}.items())
    return f"kms:{key}?{q}"


def calls(proxy: LatencyProxy, op: str) -> int:
    return sum(1 for r in proxy.requests if r.target == f"TrentService.{op}")


def write_files(root: Path, key: str, n: int, size: int = 3000) -> dict[str, bytes]:
    enc = EncFileSystem(key=key, skip_instance_cache=True)
    out = {}
    for i in range(n):
        data = os.urandom(size) + i.to_bytes(4, "big")
        enc.pipe_file(str(root / f"f{i:04d}"), data)
        out[str(root / f"f{i:04d}")] = data
    return out


def test_one_data_key_per_writing_session_and_one_decrypt_per_reader(tmp_path, kms_key):
    arn, _, proxy = kms_key
    files = write_files(tmp_path, ref(arn, proxy), 20)
    assert calls(proxy, "GenerateDataKey") == 1
    kms.local_cache().clear()
    reader = EncFileSystem(key=ref(arn, proxy), skip_instance_cache=True)
    for path, data in files.items():
        assert reader.cat_file(path) == data
    assert calls(proxy, "Decrypt") == 1
    assert reader.open(next(iter(files))).header.stanzas[0].type == "kms"


def test_an_alias_reads_what_the_key_arn_wrote_and_kek_renewal_by_uses(tmp_path, kms_key):
    arn, alias, proxy = kms_key
    files = write_files(tmp_path, ref(alias, proxy, kek_max_uses=5), 12)
    assert calls(proxy, "GenerateDataKey") == 3  # 5 + 5 + 2 files
    kms.local_cache().clear()
    reader = EncFileSystem(key=ref(alias, proxy), skip_instance_cache=True)
    assert all(reader.cat_file(p) == d for p, d in files.items())
    assert calls(proxy, "Decrypt") == 3
    assert calls(proxy, "DescribeKey") == 1  # the alias resolved once, to match stanzas by ARN


def test_the_cache_lifetime_bounds_reuse(tmp_path, kms_key):
    arn, _, proxy = kms_key
    files = write_files(tmp_path, ref(arn, proxy), 6)
    kms.local_cache().clear()
    reader = EncFileSystem(key=ref(arn, proxy, cache_max_uses=2), skip_instance_cache=True)
    for p, d in files.items():
        assert reader.cat_file(p) == d
    assert calls(proxy, "Decrypt") == 3


def test_another_kms_key_cannot_open_and_says_which_keys_were_needed(tmp_path, kms_key):
    arn, _, proxy = kms_key
    import boto3

    other = boto3.client("kms", region_name="us-east-1", endpoint_url=proxy.url).create_key()["KeyMetadata"]["Arn"]
    files = write_files(tmp_path, ref(arn, proxy), 1)
    with pytest.raises(NoMatchingKeyError, match="kms:"):
        EncFileSystem(key=ref(other, proxy), skip_instance_cache=True).cat_file(next(iter(files)))


def test_a_header_moved_onto_another_files_payload_fails(tmp_path, kms_key):
    arn, _, proxy = kms_key
    files = list(write_files(tmp_path, ref(arn, proxy), 2, size=40000))
    a, b = (Path(p).read_bytes() for p in files)
    h = EncFileSystem(key=ref(arn, proxy), skip_instance_cache=True).open(files[0]).header.length
    Path(files[1]).write_bytes(a[:h] + b[h:])
    with pytest.raises(IntegrityError, match="commitment"):
        EncFileSystem(key=ref(arn, proxy), skip_instance_cache=True).cat_file(files[1])


def test_the_dataset_binds_the_kek(tmp_path, kms_key):
    """A stanza whose dataset name was changed is refused by KMS (the encryption context
    differs), however the rest of the header is arranged."""
    arn, _, proxy = kms_key
    path = next(iter(write_files(tmp_path, ref(arn, proxy, dataset="train"), 1)))
    raw = bytearray(Path(path).read_bytes())
    i = raw.find(b"train")
    raw[i : i + 5] = b"trail"
    Path(path).write_bytes(bytes(raw))
    kms.local_cache().clear()
    with pytest.raises((NoMatchingKeyError, FormatError)):
        EncFileSystem(key=ref(arn, proxy), skip_instance_cache=True).cat_file(path)


def test_a_reader_without_the_kms_type_rejects_the_file_clearly(tmp_path, kms_key):
    """docs/FORMAT.md: an old reader (the independent reader knows key, passphrase, x25519)
    rejects a kms stanza as an unknown recipient type."""
    arn, _, proxy = kms_key
    path = next(iter(write_files(tmp_path, ref(arn, proxy), 1)))
    with pytest.raises(Exception, match="(?i)unknown|kms"):
        independent_parse_header(Path(path).read_bytes())


@pytest.mark.parametrize(
    "bad, why",
    [
        ("kms:", "malformed"),
        ("kms:notakey", "expected kms:arn"),
        ("kms:alias/x?nope=1", "unknown option"),
        ("kms:alias/x?kek_max_uses=zero", "must be a number"),
        ("kms:alias/x?attempts=0", "positive"),
        ("kms:alias/x?region=a&region=b", "twice"),
    ],
)
def test_malformed_references_are_refused(bad, why):
    with pytest.raises(KeyReferenceError, match=why):
        EncFileSystem(key=bad, skip_instance_cache=True).keyring.recipients()


@pytest.mark.parametrize("params", [b"", b"\x02" + b"\x00" * 10, struct.pack(">BH", 1, 200) + b"arn:x", struct.pack(">BH", 1, 5) + b"arn:x" + struct.pack(">H", 0)])
def test_malformed_kms_stanza_params_are_format_errors(params):
    with pytest.raises(FormatError):
        kms.KmsParams.decode(params)


def test_kms_params_round_trip():
    p = kms.KmsParams("arn:aws:kms:us-east-1:123456789012:key/x", "ds", os.urandom(170))
    assert kms.KmsParams.decode(p.encode()) == p


# -- the agent -----------------------------------------------------------------------------------


@pytest.fixture
def agent(tmp_path_factory, monkeypatch, kms_proxy):
    """An ``encfs agent`` in its own process on a private socket, calling the KMS behind the
    counting proxy; stopped afterwards."""
    from encfs import agent as agent_mod

    sock = str(tmp_path_factory.mktemp("agent") / "private" / "agent.sock")
    pid = agent_mod.start(sock, max_age=3600, max_uses=1_000_000, endpoint=kms_proxy.url, region="us-east-1")
    monkeypatch.setenv(agent_mod.SOCK_ENV, sock)
    yield agent_mod.Connection(sock), pid
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        pass


def _read_share(args: tuple[str, list[str], str]) -> int:
    """A worker process: open each of its files once; return how many read back whole."""
    key, paths, sock = args
    os.environ["ENCFS_AGENT_SOCK"] = sock
    from encfs.filesystem import EncFileSystem as Fs

    enc = Fs(key=key, skip_instance_cache=True)
    return sum(1 for p in paths if len(enc.cat_file(p)) == 3004)


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_eight_workers_reading_1000_files_make_one_kms_decrypt(tmp_path, kms_key, agent, start_method):
    arn, _, proxy = kms_key
    conn, _ = agent
    key = ref(arn, proxy)
    files = sorted(write_files(tmp_path, key, 1000))
    kms.local_cache().clear()
    proxy.reset()
    shares = [(key, files[i::8], conn.path) for i in range(8)]
    with multiprocessing.get_context(start_method).Pool(8) as pool:
        assert sum(pool.map(_read_share, shares)) == 1000
    assert calls(proxy, "Decrypt") == 1
    status = conn.request({"op": "status"})
    assert status["keks"] == 1 and status["requests"] >= 1000


def test_clear_makes_the_next_open_ask_kms_again(tmp_path, kms_key, agent):
    arn, _, proxy = kms_key
    conn, _ = agent
    key = ref(arn, proxy)
    files = write_files(tmp_path, key, 3)
    reader = EncFileSystem(key=key, skip_instance_cache=True)
    path, data = next(iter(files.items()))
    assert reader.cat_file(path) == data and calls(proxy, "Decrypt") == 1
    assert reader.cat_file(path) == data and calls(proxy, "Decrypt") == 1
    assert conn.request({"op": "clear"}) == {"cleared": True}
    assert conn.request({"op": "status"})["keks"] == 0
    assert reader.cat_file(path) == data and calls(proxy, "Decrypt") == 2


def test_a_dead_agent_means_a_warning_and_direct_kms_calls_never_a_hang(tmp_path, kms_key, agent):
    arn, _, proxy = kms_key
    conn, pid = agent
    key = ref(arn, proxy)
    files = write_files(tmp_path, key, 2)
    os.kill(pid, 9)
    time.sleep(0.2)
    from encfs import agent as agent_mod

    agent_mod._warned.clear()
    t = time.monotonic()
    with pytest.warns(RuntimeWarning, match="not answering"):
        assert all(EncFileSystem(key=key, skip_instance_cache=True).cat_file(p) == d for p, d in files.items())
    assert time.monotonic() - t < 10
    assert calls(proxy, "Decrypt") == 1  # this process's own cache, after the agent died


def test_the_agent_socket_directory_is_private(agent):
    conn, _ = agent
    d = Path(conn.path).parent
    assert (d.stat().st_mode & 0o777) == 0o700
    assert (Path(conn.path).stat().st_mode & 0o077) == 0


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
def test_the_agent_does_not_answer_another_user(agent):
    """Even with the directory opened up, a peer of another uid gets no answer (SO_PEERCRED)."""
    conn, _ = agent
    d = Path(conn.path).parent
    d.chmod(0o755)
    Path(conn.path).chmod(0o666)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.setuid(65534)
        try:
            conn.request({"op": "status"})
            os.write(w, b"answered")
        except Exception as e:
            os.write(w, type(e).__name__.encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    got = os.read(r, 100)
    d.chmod(0o700)
    assert got != b"answered" and got, got


def test_agent_cli_start_status_clear_stop(tmp_path):
    sock = str(tmp_path / "a" / "agent.sock")
    run = lambda *a: subprocess.run([sys.executable, "-m", "encfs.cli", "agent", *a, "--socket", sock], capture_output=True, text=True, timeout=60)
    out = run("start")
    assert out.returncode == 0, out.stderr
    assert f"ENCFS_AGENT_SOCK={sock}; export ENCFS_AGENT_SOCK;" in out.stdout
    assert '"keks": 0' in run("status").stdout
    assert '"cleared": true' in run("clear").stdout
    assert run("stop").returncode == 0
    deadline = time.monotonic() + 10
    while os.path.exists(sock) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(sock)
    gone = run("status")
    assert gone.returncode == 1 and "no agent answers" in gone.stderr


# -- faults: a stub KMS endpoint ------------------------------------------------------------------


class StubKms:
    """A KMS endpoint on loopback that answers every call with one configured fault (moto does
    not model throttling, disabled keys or denied policies): an error code, no answer
    (``("hang", seconds)``), or a "decryption" to a KEK of its own choosing
    (``("decrypts-to", kek)``: a hostile or misconfigured endpoint)."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.fault = ("AccessDeniedException", 400)
        self.calls: list[str] = []
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                req = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                stub.calls.append(self.headers.get("x-amz-target", ""))
                code, status = stub.fault
                if code == "hang":
                    time.sleep(status)
                    return
                if code == "decrypts-to":
                    body = json.dumps({"Plaintext": base64.b64encode(status).decode(), "KeyId": req.get("KeyId", ""),
                                       "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}).encode()
                    status = 200
                else:
                    body = ('{"__type": "%s", "message": "stub says %s"}' % (code, code)).encode()
                self.send_response(status)
                self.send_header("content-type", "application/x-amz-json-1.1")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def stub_kms():
    s = StubKms()
    yield s
    s.close()


@pytest.fixture
def kms_file(tmp_path, kms_key):
    arn, _, proxy = kms_key
    path, data = next(iter(write_files(tmp_path, ref(arn, proxy), 1).items()))
    kms.local_cache().clear()
    return arn, path


def stub_ref(arn: str, stub: StubKms, **opts: object) -> str:
    q = "&".join(f"{k}={v}" for k, v in {"region": "us-east-1", "endpoint": stub.url, "attempts": 3, "timeout": 1, **opts}.items())
    return f"kms:{arn}?{q}"


@pytest.mark.parametrize(
    "code, error, retried",
    [
        ("AccessDeniedException", kms.KmsAccessDeniedError, False),
        ("DisabledException", kms.KmsKeyDisabledError, False),
        ("KMSInvalidStateException", kms.KmsKeyDisabledError, False),
        ("NotFoundException", kms.KmsKeyNotFoundError, False),
        ("ThrottlingException", kms.KmsUnavailableError, True),
    ],
)
def test_kms_faults_on_read_are_typed_errors_naming_key_and_file(kms_file, stub_kms, code, error, retried):
    arn, path = kms_file
    stub_kms.fault = (code, 400)
    t = time.monotonic()
    with pytest.raises(error) as e:
        EncFileSystem(key=stub_ref(arn, stub_kms), skip_instance_cache=True).cat_file(path)
    assert e.value.code == code and arn in str(e.value) and path in str(e.value)
    assert len(stub_kms.calls) == (3 if retried else 1), stub_kms.calls
    assert time.monotonic() - t < 15


def test_kms_that_never_answers_fails_within_its_bounds(kms_file, stub_kms):
    arn, path = kms_file
    stub_kms.fault = ("hang", 5)
    t = time.monotonic()
    with pytest.raises(kms.KmsUnavailableError, match="Timeout"):
        EncFileSystem(key=stub_ref(arn, stub_kms, attempts=2), skip_instance_cache=True).cat_file(path)
    assert time.monotonic() - t < 8


def test_kms_refusing_a_writer_leaves_no_file(tmp_path, stub_kms):
    stub_kms.fault = ("AccessDeniedException", 400)
    arn = "arn:aws:kms:us-east-1:123456789012:key/11111111-2222-3333-4444-555555555555"
    enc = EncFileSystem(key=stub_ref(arn, stub_kms), skip_instance_cache=True)
    with pytest.raises(kms.KmsAccessDeniedError):
        with enc.open(str(tmp_path / "out"), "wb") as f:
            f.write(b"data")
    assert os.listdir(tmp_path) == []
    assert stub_kms.calls == ["TrentService.GenerateDataKey"]


def test_a_kms_fault_met_by_the_agent_is_raised_in_the_client(kms_file, stub_kms, tmp_path, monkeypatch):
    """The agent calls the KMS it was started with (here the stub), whatever endpoint a reader's
    reference names; the fault it meets reaches the reader as the same typed error."""
    from encfs import agent as agent_mod

    arn, path = kms_file
    stub_kms.fault = ("DisabledException", 400)
    sock = str(tmp_path / "stub-agent" / "agent.sock")
    pid = agent_mod.start(sock, 60, 100, endpoint=stub_kms.url, region="us-east-1")
    monkeypatch.setenv(agent_mod.SOCK_ENV, sock)
    try:
        with pytest.raises(kms.KmsKeyDisabledError, match="DisabledException") as e:
            EncFileSystem(key=stub_ref(arn, stub_kms), skip_instance_cache=True).cat_file(path)
        assert path in str(e.value)
    finally:
        os.kill(pid, 15)


# -- rotation --------------------------------------------------------------------------------------


def test_rotation_dual_key_period_then_rewrap_moves_headers_to_the_new_key(tmp_path, kms_key):
    """While a rotation is under way a reader holding both keys reads every file; ``encfs rewrap
    --add kms:NEW --remove kms:OLD`` then moves every header to the new key, payloads untouched;
    afterwards the old key opens nothing."""
    old_arn, _, proxy = kms_key
    import boto3

    new_arn = boto3.client("kms", region_name="us-east-1", endpoint_url=proxy.url).create_key()["KeyMetadata"]["Arn"]
    old, new = ref(old_arn, proxy), ref(new_arn, proxy)
    (tmp_path / "a").mkdir()
    files = {**write_files(tmp_path / "a", old, 3, size=50_000)}
    (tmp_path / "b").mkdir()
    files.update(write_files(tmp_path / "b", new, 2, size=50_000))
    both = EncFileSystem(key=[old, new], skip_instance_cache=True)
    assert all(both.cat_file(p) == d for p, d in files.items())

    payloads = {}
    for p in files:
        h = both.open(p).header.length
        payloads[p] = Path(p).read_bytes()[h:]
    out = subprocess.run(
        [sys.executable, "-m", "encfs.cli", "rewrap", "-k", old, "--add", new, "--remove", old, str(tmp_path / "a")],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "rewrapped 3" in out.stderr and "failed 0" in out.stderr, out.stderr
    kms.local_cache().clear()
    only_new = EncFileSystem(key=new, skip_instance_cache=True)
    only_old = EncFileSystem(key=old, skip_instance_cache=True)
    for p, d in files.items():
        assert only_new.cat_file(p) == d
        h = only_new.open(p).header.length
        assert Path(p).read_bytes()[h:] == payloads[p]  # the payload was not re-encrypted
        with pytest.raises(NoMatchingKeyError):
            only_old.cat_file(p)


def test_removing_a_kms_key_a_file_does_not_have_is_refused(tmp_path, kms_key):
    arn, _, proxy = kms_key
    import boto3

    other = boto3.client("kms", region_name="us-east-1", endpoint_url=proxy.url).create_key()["KeyMetadata"]["Arn"]
    path = next(iter(write_files(tmp_path, ref(arn, proxy), 1)))
    from encfs.errors import EncfsError
    from encfs.keys import KeyRing, load_reference
    from encfs.rewrap import rewrap

    before = Path(path).read_bytes()
    with pytest.raises(EncfsError, match="no stanza matches"):
        rewrap(EncFileSystem(skip_instance_cache=True, key=ref(arn, proxy)).fs, path, KeyRing(ref(arn, proxy)), remove=[load_reference(ref(other, proxy))])
    assert Path(path).read_bytes() == before


def test_audit_log_1000_opens_give_1000_use_events_plus_the_kms_events(tmp_path, kms_key, monkeypatch):
    import json

    from encfs import audit

    arn, _, proxy = kms_key
    log = tmp_path / "audit.log"
    monkeypatch.setenv(audit.LOG_ENV, str(log))
    (tmp_path / "d").mkdir()
    files = write_files(tmp_path / "d", ref(arn, proxy), 10)
    kms.local_cache().clear()
    reader = EncFileSystem(key=ref(arn, proxy), skip_instance_cache=True)
    for _ in range(100):
        for p in files:
            with reader.open(p) as f:
                f.read(10)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    ops = [x["op"] for x in lines]
    assert ops.count("kms-generate") == 1 and ops.count("wrap") == 10
    assert ops.count("unwrap") == 1000
    assert ops.count("unwrap-kms") == 1 and ops.count("unwrap-cache") == 999
    assert calls(proxy, "Decrypt") == 1
    assert {x["path"] for x in lines if x["op"] == "unwrap"} == set(files)
    assert all(x["key"] == arn for x in lines if x["op"].startswith("unwrap-") or x["op"] == "kms-generate")
    assert audit.verify(log).ok
    text = log.read_text().splitlines()
    text[500] = text[500].replace('"ok"', '"denied"', 1)
    log.write_text("\n".join(text) + "\n")
    bad = audit.verify(log)
    assert not bad.ok and bad.bad_line == 501, bad
