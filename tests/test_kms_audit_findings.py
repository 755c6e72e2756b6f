"""Security audit findings against the KMS recipients, the key agent and the audit log.

Each test asserts the correct (documented) behaviour, so it fails while its defect exists.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from encfs import audit
from encfs import format as fmt
from encfs.filesystem import EncFileSystem
from encfs.keys import kms
from encfs.secret import SecretBytes

from .conftest import run_threads
from .test_kms import StubKms, agent, calls, kms_key, kms_proxy, ref, stub_kms, stub_ref, write_files  # noqa: F401

pytest.importorskip("boto3")


def FakeKms(kek: bytes = b"A" * 32) -> StubKms:  # noqa: N802
    """A KMS-compatible endpoint that 'decrypts' every ciphertext to one KEK of its choosing."""
    stub = StubKms()
    stub.fault = ("decrypts-to", kek)
    return stub


def _stanza(path: str) -> tuple[fmt.Stanza, bytes]:
    """The kms stanza and context of a file's header, parsed without unwrapping anything."""
    header = fmt.parse(Path(path).read_bytes()[: 1 << 20])
    return header.stanzas[0], header.context


@pytest.fixture(autouse=True)
def _clean_audit():
    audit.reset()
    yield
    audit.reset()


# -- 1. KmsKey._current: a session KEK wiped while another thread is still wrapping under it ------------


def test_concurrent_writers_crossing_kek_max_uses_all_wrap_and_read_back(monkeypatch):
    """Two threads crossing ``kek_max_uses``: the second renews the session and wipes the old KEK
    (``_current``) while the first is still deriving its wrap key from it (``wrap``, outside the
    lock). Outcomes seen: 'ValueError: secret already wiped' (a failed write), or worse, the HKDF
    reading the zeroed buffer, so the file key is wrapped under HKDF(32 zero bytes, file id):
    anyone can unwrap it from the public header. (KMS is faked here so that thousands of renewals
    run in a second; the same happens against moto, less often.)"""
    import sys

    keks: dict[bytes, bytes] = {}
    lock = threading.Lock()
    arn = "arn:aws:kms:us-east-1:123456789012:key/11111111-2222-3333-4444-555555555555"

    def fake_call(opts, operation, **kw):
        assert operation == "GenerateDataKey"
        kek, blob = os.urandom(32), os.urandom(64)
        with lock:
            keks[blob] = kek
        return {"Plaintext": kek, "CiphertextBlob": blob, "KeyId": arn}

    monkeypatch.setattr(kms, "call", fake_call)
    key = kms.load_kms(f"{arn}?region=us-east-1&kek_max_uses=1", "kms-test")
    out: list[tuple[fmt.Stanza, bytes, bytes]] = []

    def body(i: int) -> None:
        for _ in range(300):
            fk = os.urandom(32)
            ctx = fmt.Header(fmt.new_file_id(), []).context
            st = key.wrap(SecretBytes(fk), ctx)
            out.append((st, ctx, fk))

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        failures = run_threads(8, body, timeout=60)
    finally:
        sys.setswitchinterval(old)
    from encfs.keys.base import open_stanza

    zero_kek, unreadable = 0, 0
    for st, ctx, fk in out:
        got = open_stanza(st, kms.wrap_key(SecretBytes(bytes(32)), ctx[12:28]), ctx)
        zero_kek += got is not None and got.bytes() == fk
        blob = kms.KmsParams.decode(st.params).blob
        got = open_stanza(st, kms.wrap_key(SecretBytes(keks[blob]), ctx[12:28]), ctx)
        unreadable += got is None or got.bytes() != fk
    assert not failures and not zero_kek and not unreadable, (
        f"{len(failures)} of 8 writer threads failed (e.g. {failures[:1]}); of {len(out)} stanzas, "
        f"{zero_kek} wrap their file key under an all-zero KEK and {unreadable} do not open with their KEK"
    )


# -- 2. KekCache: an entry handed to one caller is wiped by another before the first derives ------------


def test_kek_cache_does_not_wipe_a_kek_a_concurrent_caller_is_deriving_from():
    """With ``max_uses`` reached (or ``clear``/expiry) the next ``get`` wipes the cached KEK at
    once, while the caller it was just returned to has not derived its wrap key yet."""
    cache = kms.KekCache()
    kek_bytes = os.urandom(32)
    salt = os.urandom(16)
    expected = kms.wrap_key(SecretBytes(kek_bytes), salt).bytes()

    def body(i: int) -> None:
        for _ in range(400):
            wk, _ = cache.use((b"kid",), (3600.0, 1), lambda: SecretBytes(kek_bytes), lambda kek: kms.wrap_key(kek, salt))
            same = wk.bytes() == expected
            assert same, "wrap key derived from a KEK wiped under the caller (zeros)"

    import sys

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        failures = run_threads(6, body, timeout=60)
    finally:
        sys.setswitchinterval(old)
    assert not failures, f"{len(failures)} threads failed, e.g. {failures[:2]}"


# -- 3. The agent's cache is keyed by ciphertext only: any same-uid client poisons it -----------------


def test_agent_cache_cannot_be_poisoned_through_a_client_chosen_endpoint(tmp_path, kms_key, agent):
    """A client names the endpoint (and region, profile, limits) the agent calls KMS at; the agent
    caches whatever that endpoint returns under the stanza's KEK id, and then serves it to every
    other client (for up to max_age): one request denies every reader of the dataset."""
    arn, _, proxy = kms_key
    conn, _ = agent
    path, data = next(iter(write_files(tmp_path, ref(arn, proxy), 1).items()))
    stanza, ctx = _stanza(path)
    p = kms.KmsParams.decode(stanza.params)
    fake = FakeKms()
    try:
        bad_opts = kms.KmsOptions(key=arn, region="us-east-1", endpoint=fake.url, attempts=1, timeout=2)
        wk = conn.wrap_key(bad_opts, p, ctx[12:28])
        assert not fake.calls, "the agent called the endpoint a client chose"
        if isinstance(wk, SecretBytes):
            wk.wipe()
        kms.local_cache().clear()
        assert EncFileSystem(key=ref(arn, proxy), skip_instance_cache=True).cat_file(path) == data
    finally:
        fake.close()
        conn.request({"op": "clear"})


# -- 4. Single flight: a failed fetch is not shared with the waiting threads --------------------------


def test_concurrent_opens_against_an_unanswering_kms_make_one_attempt_not_one_per_thread(tmp_path, kms_key, stub_kms):
    """KekCache: 'one asks, the others wait for its answer'. When the answer is an error, each
    waiting thread asks KMS again, one after the other: N threads take N times the bound."""
    arn, _, proxy = kms_key
    files = write_files(tmp_path, ref(arn, proxy), 4)
    kms.local_cache().clear()
    stub_kms.fault = ("hang", 5)
    reader = EncFileSystem(key=stub_ref(arn, stub_kms, attempts=1, timeout=1), skip_instance_cache=True)
    paths = list(files)
    t = time.monotonic()
    failures = run_threads(4, lambda i: reader.cat_file(paths[i]), timeout=60)
    took = time.monotonic() - t
    assert len(failures) == 4 and all("KmsUnavailableError" in f for f in failures), failures
    assert len(stub_kms.calls) == 1 and took < 2.5, (stub_kms.calls, took)


# -- 5. Audit: a KMS GenerateDataKey whose line failed is used later with no line ---------------------


def test_a_session_kek_whose_kms_generate_line_failed_is_not_used_unlogged(tmp_path, kms_key):
    """``_current`` stores the new session before writing its ``kms-generate`` line; when that line
    cannot be written (AuditError) the KEK stays, and later files are wrapped under a KEK whose
    KMS call the log never shows."""
    arn, _, proxy = kms_key
    enc = EncFileSystem(key=ref(arn, proxy), skip_instance_cache=True)
    audit.configure(tmp_path / "no-such-dir" / "audit.log")
    with pytest.raises(audit.AuditError):
        enc.pipe_file(str(tmp_path / "a"), b"x" * 100)
    log = tmp_path / "audit.log"
    audit.configure(log)
    enc.pipe_file(str(tmp_path / "b"), b"y" * 100)
    stanza, _ = _stanza(str(tmp_path / "b"))
    kid = stanza.key_id.hex()
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert any(x["op"] == "kms-generate" and x.get("kek_id") == kid for x in lines), \
        f"KEK {kid} wraps file b but the log has no kms-generate line for it: {[x['op'] for x in lines]}"


# -- 6. `encfs agent start` reports success for whatever answers on the socket ----------------------


def test_agent_start_does_not_report_a_foreign_socket_as_its_agent(tmp_path):
    """``start`` spawns ``serve`` and then returns the pid of anything that answers ``status`` on
    the path, before its own child has even run: a socket planted in a directory the agent refuses
    (e.g. a pre-created /tmp/encfs-agent-UID of another user) is reported as the agent and its
    path printed for ``eval``; the client never checks who is listening either."""
    from encfs import agent as agent_mod

    d = tmp_path / "shared"
    d.mkdir(mode=0o755)
    d.chmod(0o755)  # not private: serve() refuses this directory
    sock_path = str(d / "agent.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock_path)
    srv.listen(8)
    stop = threading.Event()

    def fake() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                continue
            with c:
                (n,) = struct.unpack(">I", c.recv(4))
                c.recv(n)
                body = json.dumps({"pid": 424242}).encode()
                c.sendall(bytes([agent_mod.INFO]) + struct.pack(">I", len(body)) + body)

    th = threading.Thread(target=fake, daemon=True)
    th.start()
    try:
        with pytest.raises(agent_mod.AgentError):
            pid = agent_mod.start(sock_path, 60, 100, wait=5)
            assert pid != 424242  # (reached only if start() returned)
    finally:
        stop.set()
        th.join(2)
        srv.close()


# -- 7. An agent that accepts but never answers costs every open the full timeout -------------------


def test_an_unanswering_agent_is_waited_for_once_not_on_every_open(tmp_path, kms_key, monkeypatch):
    """docs/KEYS.md: 'If the agent is gone (no socket, no answer within 30 s), a process warns once
    and calls KMS itself'. It warns once but asks the hung agent again on every open, each time
    waiting the full timeout (30 s per file by default: hours for a dataset)."""
    from encfs import agent as agent_mod

    arn, _, proxy = kms_key
    files = write_files(tmp_path, ref(arn, proxy), 8)
    d = tmp_path / "ag"
    d.mkdir(mode=0o700)
    sock_path = str(d / "agent.sock")
    hung = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hung.bind(sock_path)
    hung.listen(64)  # accepts connections (backlog) but never answers, like a stopped agent
    monkeypatch.setenv(agent_mod.SOCK_ENV, sock_path)
    monkeypatch.setattr(agent_mod.Connection._ask, "__defaults__", (0.5,))
    agent_mod._warned.clear()
    kms.local_cache().clear()
    try:
        reader = EncFileSystem(key=ref(arn, proxy), skip_instance_cache=True)
        t = time.monotonic()
        with pytest.warns(RuntimeWarning):
            assert all(reader.cat_file(p) == d_ for p, d_ in files.items())
        took = time.monotonic() - t
    finally:
        hung.close()
    assert took < 2.5, f"8 opens took {took:.1f} s with a 0.5 s agent timeout: the hung agent was asked on every open"


# -- 8. Audit lines' `key` is the reference text, not the KMS key ARN the docs promise ---------------


def test_kms_audit_lines_name_the_key_arn_when_read_through_an_alias(tmp_path, kms_key):
    """docs/KEYS.md audit table: KMS lines carry ``key`` = the KMS key ARN. With an alias reference
    they carry 'alias/...', so a search of the log by key ARN misses them."""
    arn, alias, proxy = kms_key
    files = write_files(tmp_path, ref(arn, proxy), 1)
    kms.local_cache().clear()
    log = tmp_path / "audit.log"
    audit.configure(log)
    EncFileSystem(key=ref(alias, proxy), skip_instance_cache=True).cat_file(next(iter(files)))
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    kms_lines = [x for x in lines if x["op"] in ("unwrap-kms", "unwrap-cache", "kms-generate")]
    assert kms_lines and all(x["key"] == arn for x in kms_lines), [(x["op"], x["key"]) for x in kms_lines]


# -- 9. Agent protocol: a malformed request gets no reply at all -------------------------------------


@pytest.mark.parametrize("body", [b"[]", b"\"wrap_key\""])
def test_agent_answers_a_malformed_request_with_an_error_reply(agent, body):
    """A request that is JSON but not an object (or with non-string fields) raises AttributeError
    in the handler: the agent drops the connection with no ERROR reply (and prints a traceback),
    which a client takes for a dead agent."""
    conn, _ = agent
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(conn.path)
        s.sendall(struct.pack(">I", len(body)) + body)
        status = s.recv(1)
    assert status == bytes([2]), f"no ERROR reply: {status!r}"
    assert conn.request({"op": "status"})["pid"]


# -- 10. fs.wipe_keys() leaves the KEKs KMS unwrapped in the process cache ------------------------------


def test_wipe_keys_wipes_the_keks_this_filesystem_unwrapped(tmp_path, kms_key):
    """docs/KEYS.md (Memory): key bytes are overwritten 'when fs.wipe_keys() is called'. The KMS
    key's ``wipe`` only drops the writer session; the KEK the reader got from KMS stays in the
    process-wide cache and keeps opening files with no KMS call, for up to cache_max_age."""
    arn, _, proxy = kms_key
    files = write_files(tmp_path, ref(arn, proxy), 2)
    kms.local_cache().clear()
    proxy.reset()
    reader = EncFileSystem(key=ref(arn, proxy), skip_instance_cache=True)
    paths = list(files)
    assert reader.cat_file(paths[0]) == files[paths[0]]
    assert calls(proxy, "Decrypt") == 1
    reader.wipe_keys()
    assert len(kms.local_cache()) == 0, "a KEK is still cached after fs.wipe_keys()"


# -- 11. The agent's audit failure reaches the client as AgentError, not AuditError --------------------


def test_an_agent_that_cannot_write_its_audit_log_fails_the_open_with_audit_error(tmp_path, kms_key, monkeypatch):
    """docs/KEYS.md (Fail closed): with the log on, an operation whose line cannot be written fails
    with ``encfs.errors.AuditError``. When the agent's log fails, the client gets ``AgentError``
    (``_error_from`` maps only KmsError types), so code catching AuditError misses it."""
    from encfs import agent as agent_mod
    from encfs.errors import AuditError

    arn, _, proxy = kms_key
    path, _ = next(iter(write_files(tmp_path, ref(arn, proxy), 1).items()))
    kms.local_cache().clear()
    sock = str(tmp_path / "agentdir" / "agent.sock")
    monkeypatch.setenv(audit.LOG_ENV, str(tmp_path / "no-such-dir" / "audit.log"))
    pid = agent_mod.start(sock, 60, 100, endpoint=proxy.url, region="us-east-1")
    try:
        monkeypatch.delenv(audit.LOG_ENV)  # this process logs nothing; only the agent's log is on
        monkeypatch.setenv(agent_mod.SOCK_ENV, sock)
        with pytest.raises(AuditError):
            EncFileSystem(key=ref(arn, proxy), skip_instance_cache=True).cat_file(path)
    finally:
        os.kill(pid, 15)



# -- 12. Plug-ins: a broken plug-in is reported once, then skipped silently (and hides the others) --------


def test_a_broken_plugin_is_never_skipped_silently_and_does_not_hide_the_others(monkeypatch):
    """registry.load_plugins sets ``_plugins_loaded`` before importing: the first lookup raises
    ConfigError for the broken plug-in and stops, so the plug-ins after it are never imported;
    every later lookup returns silently ('unknown scheme' instead of the ConfigError the docs
    promise: 'a plug-in that fails to import is a ConfigError naming it, never skipped')."""
    import importlib.metadata

    from encfs.errors import ConfigError
    from encfs.keys import registry

    loaded: list[str] = []

    class EP:
        def __init__(self, name: str, broken: bool):
            self.name, self.value, self.broken = name, f"{name}_module", broken

        def load(self):
            if self.broken:
                raise ImportError(f"no module named {self.value}")
            loaded.append(self.name)

    eps = [EP("broken", True), EP("good", False)]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None, **kw: eps if group == registry.PLUGIN_GROUP else [])
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.setattr(registry, "_plugin_errors", [])
    with pytest.raises(ConfigError, match="broken"):
        registry.loader("zz-no-such-scheme")
    with pytest.raises(ConfigError, match="broken"):
        registry.loader("zz-no-such-scheme")  # still broken: still an error, not a silent None
    assert loaded == ["good"], "the plug-in after the broken one was never imported"


# -- 13. A hostile header makes one open cost 64 KMS Decrypt calls (and again on every open) ------------


def test_a_hostile_header_cannot_make_one_open_cost_many_kms_calls(tmp_path, kms_key):
    """docs/FORMAT.md bounds what a hostile header can make a reader spend (one Argon2id run: at
    most one passphrase stanza). A kms stanza costs a KMS Decrypt (money, and the account's shared
    KMS request quota): a header of 64 kms stanzas naming the reader's ARN, each with its own
    junk ciphertext (key ids consistent), makes every open of the file send 64 Decrypts, none
    cached ('not for this key' is not remembered), 64 x N for N opens or workers."""
    arn, _, proxy = kms_key
    path, _ = next(iter(write_files(tmp_path, ref(arn, proxy), 1).items()))
    raw = Path(path).read_bytes()
    header = fmt.parse(raw)
    from encfs.errors import EncfsError, FormatError
    from encfs.keys import registry

    def evil(n: int) -> list:
        out = []
        for _ in range(n):
            p = kms.KmsParams(arn, "default", os.urandom(150))
            out.append(fmt.Stanza("kms", p.kek_id, p.encode(), os.urandom(60)))
        return out

    with pytest.raises(FormatError, match="at most 4 kms"):  # a writer never makes such a header
        fmt.seal(fmt.Header(header.file_id, evil(fmt.MAX_STANZAS)), SecretBytes(os.urandom(32)), 20480)
    real_check = registry.check_per_header
    registry.check_per_header = lambda *a, **k: None  # an attacker's writer does not check
    try:
        head = fmt.seal(fmt.Header(header.file_id, evil(fmt.MAX_STANZAS)), SecretBytes(os.urandom(32)), 20480)
        small = fmt.seal(fmt.Header(header.file_id, evil(kms.MAX_PER_HEADER)), SecretBytes(os.urandom(32)), 4096)
    finally:
        registry.check_per_header = real_check
    Path(path).write_bytes(head + raw[header.length :])
    kms.local_cache().clear()
    proxy.reset()
    with pytest.raises(FormatError, match="at most 4 kms"):
        EncFileSystem(key=ref(arn, proxy), skip_instance_cache=True).cat_file(path)
    assert calls(proxy, "Decrypt") == 0, "a header over the limit is refused before any KMS call"
    Path(path).write_bytes(small + raw[header.length :])
    for _ in range(3):
        with pytest.raises(EncfsError):
            EncFileSystem(key=ref(arn, proxy), skip_instance_cache=True).cat_file(path)
    assert calls(proxy, "Decrypt") <= kms.MAX_PER_HEADER, "reopening the hostile file asked KMS again (no negative cache)"


# -- 14. A KMS endpoint that answers slowly, byte by byte, holds a read far past `timeout` ---------------


def test_a_trickling_kms_answer_is_bounded_by_the_timeout(tmp_path, kms_key):
    """docs/KEYS.md: ``timeout`` is 'seconds per call' and failures are 'never a hang'. botocore's
    read timeout is per socket read: an endpoint (or proxy) that sends one byte every 0.6 s never
    trips a 1 s timeout, so the call lasts as long as the peer likes."""
    arn, _, proxy = kms_key
    path, _ = next(iter(write_files(tmp_path, ref(arn, proxy), 1).items()))
    kms.local_cache().clear()

    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("content-length", 0)))
            body = b'{"__type": "AccessDeniedException", "message": "x"}' + b" " * 8
            self.send_response(400)
            self.send_header("content-type", "application/x-amz-json-1.1")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.flush()
            for i in range(12):  # 12 x 0.6 s, each gap under the 1 s read timeout
                time.sleep(0.6)
                self.wfile.write(body[i : i + 1])
                self.wfile.flush()
            self.wfile.write(body[12:])

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        from encfs.errors import EncfsError

        t = time.monotonic()
        with pytest.raises(EncfsError):
            EncFileSystem(key=f"kms:{arn}?region=us-east-1&endpoint={url}&attempts=1&timeout=1", skip_instance_cache=True).cat_file(path)
        took = time.monotonic() - t
    finally:
        server.shutdown()
    assert took < 4, f"a KMS call with timeout=1 and attempts=1 lasted {took:.1f} s"
