"""The commands an rclone or s3fs user reaches for (ls, cat, verify), key ids and bare key
paths, doctor's readable output, and encfs:: URLs on the command line: each through the real
command, run as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MAGIC = b"\x89ENCFS\r\n"


def run(*args: str, input: bytes | None = None, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "encfs.cli", *args], capture_output=True, input=input,
        env={**os.environ, **(env or {})}, cwd=cwd, timeout=120,
    )


def ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, res.stderr.decode()
    return res


def one_line_error(res: subprocess.CompletedProcess) -> str:
    err = res.stderr.decode()
    assert res.returncode == 1 and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("encfs: warning:")]
    assert len(lines) == 1 and lines[0].startswith("encfs: error: "), err
    return lines[0]


def keyfile(tmp_path: Path, name: str = "k.key", *extra: str) -> str:
    ok(run("keygen", *extra, "-o", str(tmp_path / name)))
    return f"keyfile:{tmp_path / name}"


@pytest.fixture
def tree(tmp_path):
    """An encrypted tree: enc/a.bin (100 000 bytes), enc/empty, enc/sub/b.txt; and its key."""
    key = keyfile(tmp_path)
    src = tmp_path / "plain"
    (src / "sub").mkdir(parents=True)
    files = {"a.bin": os.urandom(100_000), "empty": b"", "sub/b.txt": b"hello\n"}
    for name, data in files.items():
        (src / name).write_bytes(data)
    ok(run("encrypt", "--no-progress", "-k", key, str(src), str(tmp_path / "enc")))
    return tmp_path / "enc", key, files


def _tamper(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 1
    path.write_bytes(bytes(raw))


# --- ls, cat, verify -------------------------------------------------------------------------


def test_ls_shows_plaintext_sizes_without_a_key(tree):
    enc, _, files = tree
    text = ok(run("ls", str(enc))).stdout.decode().splitlines()
    assert [ln.split() for ln in text] == [["100000", "a.bin"], ["0", "empty"], ["-", "sub/"]]
    rows = [json.loads(ln) for ln in ok(run("ls", "-R", "--json", str(enc))).stdout.decode().splitlines()]
    sizes = {r["name"]: r["size"] for r in rows if r["type"] == "file"}
    assert sizes == {name: len(data) for name, data in files.items()}
    assert all(r["encrypted"] is True and r["ciphertext_size"] > r["size"] for r in rows if r["type"] == "file")
    single = ok(run("ls", f"encfs::file://{enc / 'a.bin'}")).stdout.decode().split()
    assert single[0] == "100000"
    (enc / "plain.txt").write_bytes(b"not encrypted")
    line = [ln for ln in ok(run("ls", str(enc))).stdout.decode().splitlines() if "plain.txt" in ln][0]
    assert "not an encfs file" in line


def test_cat_decrypts_to_stdout_in_order(tree):
    enc, key, files = tree
    out = ok(run("cat", "-k", key, str(enc / "sub" / "b.txt"), str(enc / "a.bin"), str(enc / "sub" / "*.txt"))).stdout
    assert out == files["sub/b.txt"] + files["a.bin"] + files["sub/b.txt"]
    assert "directory" in one_line_error(run("cat", "-k", key, str(enc)))
    assert "no configured key" in one_line_error(run("cat", str(enc / "a.bin"), env={"ENCFS_KEY": ""}))


def test_verify_passes_a_sound_tree(tree):
    enc, key, _ = tree
    res = ok(run("verify", "--no-progress", "-k", key, str(enc)))
    assert res.stdout == b"" and b"3 file(s): 3 ok, 0 bad" in res.stderr


def test_verify_reports_each_bad_file_and_exits_1(tree, tmp_path):
    enc, key, _ = tree
    _tamper(enc / "a.bin", 50_000)  # a middle chunk: only a full read finds it
    (enc / "sub" / "plain.txt").write_bytes(b"not encrypted at all, not even a header")
    other = keyfile(tmp_path, "other.key")
    ok(run("encrypt", "-k", other, "-", str(enc / "other.enc"), input=b"x" * 10))
    res = run("verify", "--no-progress", "-k", key, str(enc), str(enc / "*.bin"))  # overlaps: each file once
    assert res.returncode == 1
    bad = dict(ln.split(": ", 2)[:2] for ln in res.stdout.decode().splitlines())
    assert bad == {
        str(enc / "a.bin"): "IntegrityError",
        str(enc / "sub" / "plain.txt"): "FormatError",
        str(enc / "other.enc"): "NoMatchingKeyError",
    }
    assert "chunk 2 failed authentication" in res.stdout.decode()
    assert b"5 file(s): 2 ok, 3 bad" in res.stderr
    rows = [json.loads(ln) for ln in run("verify", "--json", "--no-progress", "-j", "2", "-k", key, str(enc)).stdout.splitlines()]
    assert sorted((Path(r["path"]).name, r["ok"], r.get("error")) for r in rows) == [
        ("a.bin", False, "IntegrityError"), ("b.txt", True, None), ("empty", True, None),
        ("other.enc", False, "NoMatchingKeyError"), ("plain.txt", False, "FormatError"),
    ]


def test_verify_shows_progress_on_stderr_and_needs_a_key(tree):
    enc, key, _ = tree
    res = ok(run("verify", "-k", key, str(enc / "a.bin"), env={"TQDM_MININTERVAL": "0"}))
    assert res.stdout == b""
    assert "no key to verify with" in one_line_error(run("verify", str(enc), env={"ENCFS_KEY": ""}))
    assert "no file matches" in one_line_error(run("verify", "-k", key, str(enc / "*.nothing")))


# --- keys ------------------------------------------------------------------------------------


def _recipients(path: Path) -> list[str]:
    info = json.loads(ok(run("inspect", "--json", str(path))).stdout)
    return [f"{r['type']}:{r['key_id']}" for r in info["recipients"]]


def test_key_id_matches_what_headers_show(tmp_path):
    sym = keyfile(tmp_path, "a.key")
    keyfile(tmp_path, "id.key", "--x25519")
    pub = ok(run("pubkey", str(tmp_path / "id.key"))).stdout.decode().strip()
    ok(run("encrypt", "-r", sym, "-r", pub, "-", str(tmp_path / "c.enc"), input=b"data"))
    in_header = _recipients(tmp_path / "c.enc")
    ids = {ref: ok(run("key", "id", ref, cwd=tmp_path)).stdout.decode().strip() for ref in (sym, "a.key", "id.key", f"keyfile:{tmp_path / 'id.key'}", pub)}
    assert ids[sym] == ids["a.key"] and ids[sym].startswith("key:") and ids[sym] in in_header
    assert ids["id.key"] == ids[pub] == ids[f"keyfile:{tmp_path / 'id.key'}"] and ids[pub].startswith("x25519:")
    assert ids[pub] in in_header
    res = run("key", "id", "missing.key", cwd=tmp_path)
    assert "keyfile:PATH" in one_line_error(res)


def test_rewrap_remove_takes_references_and_key_files(tmp_path):
    a, b = keyfile(tmp_path, "a.key"), keyfile(tmp_path, "b.key")
    keyfile(tmp_path, "id.key", "--x25519")
    pub = ok(run("pubkey", str(tmp_path / "id.key"))).stdout.decode().strip()
    c = tmp_path / "c.enc"
    ok(run("encrypt", "-r", a, "-r", b, "-r", pub, "-", str(c), input=b"secret data"))
    assert len(_recipients(c)) == 3
    ok(run("rewrap", "-k", b, "--remove", pub, str(c)))  # an x25519: public reference
    ok(run("rewrap", "-k", b, "--remove", "a.key", str(c), cwd=tmp_path))  # a bare key file
    assert _recipients(c) == [ok(run("key", "id", b)).stdout.decode().strip()]
    assert ok(run("decrypt", "-k", b, str(c), "-")).stdout == b"secret data"
    assert run("decrypt", "-k", a, str(c), "-").returncode == 1
    line = one_line_error(run("rewrap", "-k", b, "--remove", b, str(c)))
    assert "refusing" in line


def test_bare_key_paths_are_keyfiles_or_refused_with_the_fix(tmp_path):
    keyfile(tmp_path, "team.key")
    res = ok(run("encrypt", "-k", "team.key", "-", "c.enc", input=b"hello", cwd=tmp_path))
    notes = [ln for ln in res.stderr.decode().splitlines() if "taken as" in ln]
    assert notes == [f"encfs: note: -k team.key: taken as keyfile:{tmp_path / 'team.key'}"]
    assert ok(run("decrypt", "-k", "team.key", "c.enc", "-", cwd=tmp_path)).stdout == b"hello"
    line = one_line_error(run("decrypt", "-k", "nosuch.key", "c.enc", "-", cwd=tmp_path))
    assert "-k nosuch.key: no such file" in line and "-k keyfile:PATH" in line
    line = one_line_error(run("decrypt", "-i", "bogus:thing", "c.enc", "-", cwd=tmp_path))
    assert "-i bogus:thing: not a key reference" in line
    (tmp_path / "env:TEAM").write_text((tmp_path / "team.key").read_text())  # a file named like a reference
    line = one_line_error(run("decrypt", "-k", "env:TEAM", "c.enc", "-", cwd=tmp_path))
    assert "both a key reference and a file" in line and "-k keyfile:./env:TEAM" in line


def test_key_errors_speak_in_flags(tmp_path):
    key = keyfile(tmp_path)
    line = one_line_error(run("encrypt", "-", str(tmp_path / "c.enc"), input=b"x", env={"ENCFS_KEY": ""}))
    assert "-k or -r" in line and "key=" not in line and "recipients=" not in line
    ok(run("encrypt", "-k", key, "-", str(tmp_path / "c.enc"), input=b"x"))
    line = one_line_error(run("decrypt", str(tmp_path / "c.enc"), "-", env={"ENCFS_KEY": ""}))
    assert "pass -k or -i" in line
    (tmp_path / "plain").write_bytes(b"plaintext")
    line = one_line_error(run("decrypt", "-k", key, str(tmp_path / "plain"), "-"))
    assert "--allow-plaintext" in line and "storage_options" not in line


# --- doctor ----------------------------------------------------------------------------------


def test_doctor_prints_readable_lines_and_json():
    text = ok(run("doctor")).stdout.decode()
    assert "{" not in text and "'built'" not in text, "no raw dicts"
    lines = text.splitlines()
    assert lines[0].startswith("encfs ") and any(ln.startswith("cipher backend: ") for ln in lines)
    native = [ln for ln in lines if ln.startswith("native library: ")]
    assert len(native) == 1
    info = json.loads(ok(run("doctor", "--json")).stdout)
    assert isinstance(info["native"], dict) and "built" in info["native"]
    if info["native"]["built"]:
        assert info["native"]["openssl_version"] in native[0]
        assert any(ln.startswith("memory locking: ") for ln in lines)
    else:
        assert "not built" in native[0]


# --- encfs:: URLs ----------------------------------------------------------------------------


def test_encfs_urls_encrypt_once_and_decrypt_with_k(tmp_path):
    key = keyfile(tmp_path)
    data = os.urandom(70_000)
    (tmp_path / "plain.bin").write_bytes(data)
    ok(run("encrypt", "-k", key, str(tmp_path / "plain.bin"), f"encfs::file://{tmp_path / 'x'}"))
    raw = (tmp_path / "x").read_bytes()
    assert raw.startswith(MAGIC) and MAGIC not in raw[8:], "encrypted exactly once"
    assert json.loads(ok(run("inspect", "--json", str(tmp_path / "x"))).stdout)["plaintext_size"] == len(data)
    ok(run("decrypt", "-k", key, f"encfs::file://{tmp_path / 'x'}", str(tmp_path / "out")))
    assert (tmp_path / "out").read_bytes() == data
    assert ok(run("decrypt", "-k", key, f"encfs://{tmp_path / 'x'}", "-")).stdout == data
    assert ok(run("cat", "-k", key, f"encfs::file://{tmp_path / 'x'}")).stdout == data
    ok(run("verify", "--no-progress", "-k", key, f"encfs::file://{tmp_path}/x"))
    # a tree through an encfs:: destination
    (tmp_path / "t" / "d").mkdir(parents=True)
    (tmp_path / "t" / "d" / "f").write_bytes(b"tree file")
    ok(run("encrypt", "--no-progress", "-k", key, str(tmp_path / "t"), f"encfs::file://{tmp_path / 'tenc'}"))
    assert (tmp_path / "tenc" / "d" / "f").read_bytes().count(MAGIC) == 1
    assert ok(run("cat", "-k", key, str(tmp_path / "tenc" / "d" / "f"))).stdout == b"tree file"


def test_double_encryption_is_refused_in_one_line(tmp_path):
    key = keyfile(tmp_path)
    (tmp_path / "plain.bin").write_bytes(b"plaintext")
    ok(run("encrypt", "-k", key, str(tmp_path / "plain.bin"), str(tmp_path / "c.enc")))
    cases = [
        (("encrypt", "-k", key, str(tmp_path / "plain.bin"), f"encfs::encfs::file://{tmp_path / 'y'}"), "encrypt twice"),
        (("encrypt", "-k", key, str(tmp_path / "c.enc"), str(tmp_path / "y")), "refusing to encrypt it twice"),
        (("encrypt", "-k", key, "-", str(tmp_path / "y")), "refusing to encrypt it twice"),
        (("encrypt", "-k", key, f"encfs::file://{tmp_path / 'c.enc'}", str(tmp_path / "y")), "encrypt takes plaintext"),
        (("decrypt", "-k", key, str(tmp_path / "c.enc"), f"encfs::file://{tmp_path / 'y'}"), "would encrypt it again"),
        (("cat", "-k", key, f"encfs::encfs::file://{tmp_path / 'c.enc'}"), "encrypt twice"),
    ]
    for argv, why in cases:
        stdin = (tmp_path / "c.enc").read_bytes() if "-" in argv else None
        assert why in one_line_error(run(*argv, input=stdin)), argv
        assert not (tmp_path / "y").exists()
    # a tree holding one encrypted file: refused as a whole, nothing written
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a").write_bytes(b"fine")
    (tmp_path / "t" / "b").write_bytes((tmp_path / "c.enc").read_bytes())
    line = one_line_error(run("encrypt", "--no-progress", "-k", key, str(tmp_path / "t"), str(tmp_path / "tenc")))
    assert "b: already an encfs file" in line and not (tmp_path / "tenc").exists()
    # nothing goes to stdout before the refusal
    res = run("encrypt", "-k", key, "-", "-", input=(tmp_path / "c.enc").read_bytes())
    assert res.stdout == b"" and "refusing to encrypt it twice" in one_line_error(res)


# --- storage options (S3-compatible store: a moto server on 127.0.0.1) ----------------------


def test_storage_options_and_endpoint_url_reach_s3(s3, tmp_path):
    fs, bucket, _ = s3
    endpoint = s3[2]["client_kwargs"]["endpoint_url"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # credentials only from -o
    env["AWS_SHARED_CREDENTIALS_FILE"] = env["AWS_CONFIG_FILE"] = str(tmp_path / "none")

    def cli(*argv, input=None):
        return subprocess.run([sys.executable, "-m", "encfs.cli", *argv], capture_output=True, input=input, env=env, timeout=120)

    key = keyfile(tmp_path)
    creds = ["--endpoint-url", endpoint, "-o", "key=testing", "-o", "secret=testing", "-o", "client_kwargs.region_name=us-east-1"]
    (tmp_path / "p" / "sub").mkdir(parents=True)
    data = os.urandom(40_000)
    (tmp_path / "p" / "a.bin").write_bytes(data)
    (tmp_path / "p" / "sub" / "b.txt").write_bytes(b"hello")
    ok(cli("encrypt", "--no-progress", "-k", key, *creds, str(tmp_path / "p"), f"encfs::s3://{bucket}/enc"))
    assert fs.cat_file(f"{bucket}/enc/a.bin").startswith(MAGIC)
    per_hop = ["--endpoint-url", endpoint, "-o", "s3.key=testing", "-o", "s3.secret=testing"]
    rows = [json.loads(ln) for ln in ok(cli("ls", "-R", "--json", *per_hop, f"s3://{bucket}/enc")).stdout.splitlines()]
    assert {r["name"]: r["size"] for r in rows if r["type"] == "file"} == {"a.bin": 40_000, "sub/b.txt": 5}
    assert ok(cli("cat", "-k", key, *creds, f"encfs::s3://{bucket}/enc/a.bin")).stdout == data
    ok(cli("verify", "--no-progress", "-k", key, *per_hop, f"s3://{bucket}/enc"))
    ok(cli("decrypt", "--no-progress", "-k", key, *creds, f"s3://{bucket}/enc", str(tmp_path / "out")))
    assert (tmp_path / "out" / "a.bin").read_bytes() == data
    # errors that are the storage's: one line each
    assert "storage: NoCredentialsError" in one_line_error(cli("ls", f"s3://{bucket}/enc"))
    line = one_line_error(cli("ls", "--endpoint-url", "http://127.0.0.1:1", "-o", "key=x", "-o", "secret=y", f"s3://{bucket}/enc"))
    assert line.startswith("encfs: error: storage: ")
    assert "Protocol not known" in one_line_error(cli("ls", "nosuchproto://x/y"))
    assert "expected KEY=VALUE" in one_line_error(cli("ls", "-o", "novalue", f"s3://{bucket}"))
