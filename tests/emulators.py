"""Object-store emulators on loopback for the gcsfs and adlfs tests (tests/test_gcs_azure.py).

Each emulator runs as a subprocess on a free 127.0.0.1 port for the whole test session, is
waited for until it answers, and is stopped at the end. Where an emulator (or the client
package that talks to it) is missing, the tests that need it skip, saying what to install; under
``CI=true`` a missing emulator fails them instead.

* GCS: the pip package ``gcp-storage-emulator``, started by this file (``python
  tests/emulators.py gcs PORT``) with one gap filled: it answers ``DELETE`` on a resumable
  upload session (how a client cancels an upload: gcsfs's ``GCSFile.discard``) with 501, where
  GCS drops the session and answers 499. Unfilled, every aborted upload costs gcsfs ~30 s of
  retries and ends in ``HttpError 501``. ``GCS_EMULATOR_UNPATCHED=1`` runs it as shipped.
* Azure: Azurite's blob service (npm package ``azurite``), found at ``$AZURITE_BLOB``, else
  ``<repo>/.azurite/node_modules/.bin/azurite-blob`` (``npm install --prefix .azurite
  azurite``), else ``azurite-blob`` on ``PATH``; in-memory, with the well-known dev account.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 60.0

AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
"""Azurite's published development account key (not a secret: every Azurite has it)."""


def azurite_connection_string(endpoint: str) -> str:
    return f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};BlobEndpoint={endpoint}/{AZURITE_ACCOUNT};"


def missing(what: str) -> None:
    """Skip the calling test because ``what`` is not installed; fail under ``CI=true``."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} (CI=true requires it)", pytrace=False)
    pytest.skip(what)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    """A subprocess serving HTTP on ``port``; its output goes to ``log`` (shown if it fails)."""

    def __init__(self, name: str, argv: list[str], port: int, log: Path, ready_path: str = "/", env: dict | None = None):
        self.name, self.port, self.log = name, port, log
        self.url = f"http://127.0.0.1:{port}"
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=log.parent)
        self._wait(ready_path)

    def _wait(self, ready_path: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                urllib.request.urlopen(self.url + ready_path, timeout=2).close()
                return
            except urllib.error.HTTPError:
                return  # it answers (an error status is still an answer)
            except OSError:
                time.sleep(0.1)
        self.stop()
        tail = self.log.read_text(errors="replace")[-3000:]
        pytest.fail(f"{self.name} did not start on {self.url} (exit {self.proc.returncode}); its output:\n{tail}", pytrace=False)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log_file.close()


@pytest.fixture(scope="session")
def gcs_endpoint(tmp_path_factory):
    """``http://127.0.0.1:PORT`` of a gcp-storage-emulator (in memory) for the whole session."""
    try:
        import gcp_storage_emulator  # noqa: F401
    except ImportError:
        missing("gcp-storage-emulator is not installed (pip install gcp-storage-emulator)")
    port = free_port()
    log = tmp_path_factory.mktemp("gcs-emulator") / "emulator.log"
    emu = Emulator("gcp-storage-emulator", [sys.executable, __file__, "gcs", str(port)], port, log)
    yield emu.url
    emu.stop()


def azurite_command() -> str | None:
    for candidate in (os.environ.get("AZURITE_BLOB"), str(REPO / ".azurite" / "node_modules" / ".bin" / "azurite-blob"), shutil.which("azurite-blob")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="session")
def azurite_endpoint(tmp_path_factory):
    """``http://127.0.0.1:PORT`` of Azurite's blob service (in memory) for the whole session."""
    cmd = azurite_command()
    if cmd is None or shutil.which("node") is None:
        missing("Azurite is not installed (npm install --prefix .azurite azurite; needs node)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("azurite")
    argv = [cmd, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence", "--skipApiVersionCheck", "--loose", "--disableTelemetry", "--silent"]
    emu = Emulator("Azurite", argv, port, workdir / "azurite.log", ready_path=f"/{AZURITE_ACCOUNT}?comp=list")
    yield emu.url
    emu.stop()


def _serve_gcs(port: int) -> None:
    """Run gcp-storage-emulator in memory on 127.0.0.1:``port``, with resumable-upload
    cancellation (``DELETE`` on the upload endpoint: the session is dropped, 499) added."""
    import logging

    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound

    logging.basicConfig(level=logging.WARNING)

    if os.environ.get("GCS_EMULATOR_UNPATCHED") != "1":

        class _Cancelled:
            value, phrase = 499, "Client Closed Request"

        def cancel_upload(request, response, storage, *args, **kwargs):
            ids = request.query.get("upload_id") or [""]
            try:
                storage.delete_resumable_file_obj(ids[0])
                response.status = _Cancelled
            except NotFound:
                response.status = server.HTTPStatus.NOT_FOUND

        upload_route = rf"^{server.settings.UPLOAD_API_ENDPOINT}/b/(?P<bucket_name>[-.\w]+)/o$"
        for regex, handlers in server.HANDLERS:
            if regex == upload_route:
                handlers.setdefault(server.DELETE, cancel_upload)
                break
        else:  # pragma: no cover - a later emulator changed its routes
            raise SystemExit("gcp-storage-emulator: upload route not found; cannot add upload cancellation")

    srv = server.create_server("127.0.0.1", port, in_memory=True)
    srv.run()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "gcs":
        _serve_gcs(int(sys.argv[2]))
    else:
        raise SystemExit("usage: python tests/emulators.py gcs PORT")
