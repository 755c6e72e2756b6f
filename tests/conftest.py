"""Shared fixtures: key files, the ../shared/vectors location, a moto S3 server on loopback."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") == "true" else "dev"))

SHARED_VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors"
LOCAL_VECTORS = Path(__file__).resolve().parent / "vectors"


def shared_vectors(name: str) -> Path:
    """The ../shared/vectors/<name> folder; skip without it, but fail under CI=true."""
    path = SHARED_VECTORS / name
    if not path.is_dir():
        msg = f"shared vectors not found at {path}"
        if os.environ.get("CI") == "true":
            pytest.fail(msg + " (CI=true requires them)")
        pytest.skip(msg)
    return path


def require_native() -> None:
    """Skip the calling test module when encfs._native is not built; fail under CI=true."""
    try:
        import encfs._native  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the build
        if os.environ.get("CI") == "true":
            pytest.fail(f"encfs._native is not built, and CI=true requires it: {exc}", pytrace=False)
        pytest.skip(f"encfs._native is not built ({exc}); 'pip install -e .' with gcc and libssl-dev", allow_module_level=True)


HANG_GUARD_S = 300  # only to turn a deadlock into a failure instead of a stuck CI job


def run_threads(n: int, fn, timeout: float = HANG_GUARD_S) -> list[str]:
    """Run ``fn(i)`` in ``n`` threads started together; return their failure messages. A thread
    still running after ``timeout`` seconds fails the test (a deadlock, not a stuck CI job)."""
    failures: list[str] = []
    barrier = threading.Barrier(n)

    def body(i: int) -> None:
        try:
            barrier.wait()
            fn(i)
        except BaseException as e:  # collected, reported by the test
            failures.append(f"thread {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"threads still running after {timeout} s (deadlock?): {stuck}"
    return failures


def seal_span(key: bytes, nonce: bytes, first: int, pt: bytes, final: bool) -> bytearray:
    """Reference ciphertext of chunks ``first..`` sealing ``pt``, from the pure-Python backend."""
    from encfs.backend import PythonBackend, split_plaintext

    out = bytearray(len(pt) + split_plaintext(len(pt), final) * 16)
    c = PythonBackend().chunk_cipher(memoryview(key), nonce)
    assert c.encrypt_into(first, memoryview(pt), memoryview(out), final) == len(out)
    return out


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch):
    monkeypatch.delenv("ENCFS_KEY", raising=False)
    monkeypatch.delenv("ENCFS_SIGNERS", raising=False)


@pytest.fixture(autouse=True)
def _cheap_argon2(monkeypatch):
    """Argon2id at test cost; tests that need the real defaults set them explicitly."""
    from encfs.keys import passphrase

    monkeypatch.setattr(passphrase, "DEFAULT_PARAMS", passphrase.Argon2Params(memory_kib=1024, iterations=1, lanes=1))


def write_key(path: Path, x25519: bool = False) -> str:
    from encfs.keys import SymmetricKey, X25519Identity, key_file_text

    key = X25519Identity.generate() if x25519 else SymmetricKey.generate()
    path.write_text(key_file_text(key))
    return f"keyfile:{path}"


@pytest.fixture
def keyref(tmp_path) -> str:
    return write_key(tmp_path / "k.key")


@pytest.fixture
def signer(tmp_path):
    """A writer's Ed25519 signing key and the path of its key file (``sign_with=``)."""
    from encfs.signing import SigningKey, write_signing_key

    key = SigningKey.generate()
    path = tmp_path / "writer.sign"
    write_signing_key(str(path), key)
    return key, str(path)


@pytest.fixture
def other_keyref(tmp_path) -> str:
    return write_key(tmp_path / "other.key")


@pytest.fixture
def enc(tmp_path, keyref):
    """An encfs filesystem over local disk, rooted in a temp dir, plus the dir."""
    from encfs.filesystem import EncFileSystem

    fs = EncFileSystem(target_protocol="file", key=keyref, skip_instance_cache=True)
    root = tmp_path / "data"
    root.mkdir()
    return fs, str(root)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API (moto server) on 127.0.0.1, for the whole session."""
    moto_server = pytest.importorskip("moto.server")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint):
    """A fresh bucket on the moto server and an s3fs filesystem pointing at it."""
    s3fs = pytest.importorskip("s3fs")
    import uuid

    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"}}
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    bucket = f"b{uuid.uuid4().hex[:12]}"
    fs.call_s3("create_bucket", Bucket=bucket)
    return fs, bucket, opts
