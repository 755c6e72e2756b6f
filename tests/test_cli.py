"""The encfs command, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from encfs.errors import HeaderFullError


def run(*args, input=None, env=None, check=True):
    res = subprocess.run([sys.executable, "-m", "encfs.cli", *args], capture_output=True, input=input, env={**os.environ, **(env or {})}, timeout=120)
    if check and res.returncode != 0:
        raise AssertionError(res.stderr.decode())
    return res


def test_keygen_encrypt_decrypt_tree(tmp_path):
    run("keygen", "-o", str(tmp_path / "k.key"))
    assert oct(os.stat(tmp_path / "k.key").st_mode & 0o777) == "0o600"
    assert run("keygen", "-o", str(tmp_path / "k.key"), check=False).returncode == 1
    src = tmp_path / "plain"
    (src / "sub").mkdir(parents=True)
    files = {"a.bin": os.urandom(70_000), "sub/b.txt": b"hello\n", "empty": b""}
    for name, data in files.items():
        (src / name).write_bytes(data)
    key = f"keyfile:{tmp_path / 'k.key'}"
    run("encrypt", "-k", key, str(src), str(tmp_path / "enc"))
    assert (tmp_path / "enc" / "sub" / "b.txt").read_bytes()[:8] == b"\x89ENCFS\r\n"
    run("decrypt", "-k", key, str(tmp_path / "enc"), str(tmp_path / "out"))
    for name, data in files.items():
        assert (tmp_path / "out" / name).read_bytes() == data


def test_stdin_stdout_and_public_key_flow(tmp_path):
    run("keygen", "--x25519", "-o", str(tmp_path / "id.key"))
    pub = run("pubkey", str(tmp_path / "id.key")).stdout.decode().strip()
    assert pub.startswith("x25519:") and pub in (tmp_path / "id.key").read_text()
    data = os.urandom(40_000)
    run("encrypt", "-r", pub, "-", str(tmp_path / "c.enc"), input=data)
    out = run("decrypt", "-i", f"keyfile:{tmp_path / 'id.key'}", str(tmp_path / "c.enc"), "-").stdout
    assert out == data
    res = run("decrypt", "-i", pub, str(tmp_path / "c.enc"), "-", check=False)
    assert res.returncode == 1 and b"no configured key" in res.stderr


def test_inspect_shows_no_secrets(tmp_path):
    run("keygen", "-o", str(tmp_path / "k.key"))
    key = f"keyfile:{tmp_path / 'k.key'}"
    run("encrypt", "-k", key, "-", str(tmp_path / "c.enc"), input=b"x" * 20_000)
    info = json.loads(run("inspect", "--json", "-k", key, str(tmp_path / "c.enc")).stdout)
    assert info["plaintext_size"] == 20_000 and info["chunks"] == 2 and info["suite"] == "cobblestone-256"
    assert info["recipients"][0]["type"] == "key" and "verified" in info
    secret = (tmp_path / "k.key").read_text().split("encfs-key-v1:")[1].strip()
    assert secret not in json.dumps(info)
    plain = run("inspect", str(tmp_path / "c.enc")).stdout.decode()
    assert "plaintext_size: 20000" in plain and "verified" not in plain


def test_rewrap_add_then_remove(tmp_path):
    run("keygen", "-o", str(tmp_path / "a.key"))
    run("keygen", "-o", str(tmp_path / "b.key"))
    a, b = (f"keyfile:{tmp_path / n}" for n in ("a.key", "b.key"))
    data = os.urandom(50_000)
    run("encrypt", "-k", a, "-", str(tmp_path / "c.enc"), input=data)
    payload_before = (tmp_path / "c.enc").read_bytes()[1024:]
    run("rewrap", "-k", a, "--add", b, str(tmp_path / "c.enc"))
    assert (tmp_path / "c.enc").read_bytes()[1024:] == payload_before, "payload untouched"
    assert run("decrypt", "-k", b, str(tmp_path / "c.enc"), "-").stdout == data
    a_id = json.loads(run("inspect", "--json", str(tmp_path / "c.enc")).stdout)["recipients"][0]["key_id"]
    run("rewrap", "-k", b, "--remove", a_id, str(tmp_path / "c.enc"))
    assert run("decrypt", "-k", a, str(tmp_path / "c.enc"), "-", check=False).returncode == 1
    assert run("decrypt", "-k", b, str(tmp_path / "c.enc"), "-").stdout == data
    b_id = json.loads(run("inspect", "--json", str(tmp_path / "c.enc")).stdout)["recipients"][0]["key_id"]
    res = run("rewrap", "-k", b, "--remove", f"key:{b_id}", str(tmp_path / "c.enc"), check=False)
    assert res.returncode == 1 and b"refusing" in res.stderr


def test_rewrap_keeps_the_header_length_and_grows_it_only_when_asked(tmp_path):
    from encfs.filesystem import EncFileSystem
    from encfs.keys import KeyRing, X25519Identity
    from encfs.rewrap import rewrap
    from fsspec.implementations.local import LocalFileSystem

    run("keygen", "-o", str(tmp_path / "a.key"))
    a = f"keyfile:{tmp_path / 'a.key'}"
    data = os.urandom(33_000)
    EncFileSystem(key=a, skip_instance_cache=True).pipe_file(str(tmp_path / "c"), data)
    added = [X25519Identity.generate() for _ in range(12)]
    before = (tmp_path / "c").read_bytes()
    with pytest.raises(HeaderFullError, match="header_length=1536"):
        rewrap(LocalFileSystem(), str(tmp_path / "c"), KeyRing(a), add=[i.recipient for i in added])
    assert (tmp_path / "c").read_bytes() == before
    res = rewrap(LocalFileSystem(), str(tmp_path / "c"), KeyRing(a), add=[i.recipient for i in added], header_length=2048)
    assert not res.in_place and res.header.length == 2048
    for ident in (added[0], added[-1]):
        assert EncFileSystem(key=[ident], skip_instance_cache=True).cat_file(str(tmp_path / "c")) == data


def test_doctor_reports_backend():
    info = json.loads(run("doctor", "--json").stdout)
    assert info["backend"] in ("native", "python") or info["backend"].startswith("auto:")
    assert "native" in info


def test_errors_are_one_line_and_exit_1(tmp_path):
    (tmp_path / "plain").write_bytes(b"not encrypted")
    run("keygen", "-o", str(tmp_path / "k.key"))
    res = run("decrypt", "-k", f"keyfile:{tmp_path / 'k.key'}", str(tmp_path / "plain"), "-", check=False)
    err = res.stderr.decode()
    assert res.returncode == 1 and err.startswith(f"encfs: error: {tmp_path / 'plain'}: not an encfs file")
    assert "allow_plaintext" in err and err.count("\n") == 1, "one line that names the file and the option"
    assert b"Traceback" not in res.stderr
