"""Audit fixes: key material never kept by exceptions, typed one-line errors, '-' as stdout,
no symlink following, source modes kept, all-or-nothing directory runs, atomic single files.

CLI behaviour is checked through the real command (a subprocess); results are checked
against the plaintext and the files on disk."""

from __future__ import annotations

import base64
import os
import pty
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from encfs import cobblestone as cs
from encfs.errors import ConfigError, EncfsError, KeyReferenceError
from encfs.keys import SymmetricKey, X25519Identity, key_file_text, load_reference

MAGIC = b"\x89ENCFS\r\n"


def run(*args: str, input: bytes | None = None, env: dict | None = None, cwd: Path | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "encfs.cli", *args], capture_output="stdout" not in kw, input=input,
        env={**os.environ, **(env or {})}, cwd=cwd, timeout=120, **kw,
    )


def one_line_error(res: subprocess.CompletedProcess) -> str:
    """The CLI's error contract: exit 1, exactly one stderr line 'encfs: error: ...', no traceback."""
    err = res.stderr.decode()
    assert res.returncode == 1, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("encfs: warning:")]
    assert len(lines) == 1 and lines[0].startswith("encfs: error: "), err
    return lines[0]


def keyfile(tmp_path: Path, name: str = "k.key") -> str:
    assert run("keygen", "-o", str(tmp_path / name)).returncode == 0
    return f"keyfile:{tmp_path / name}"


def files_under(root: Path) -> dict[str, bytes]:
    """Every regular file below ``root`` (relative path -> content), symlinks not followed."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[p.relative_to(root).as_posix()] = p.read_bytes()
    return out


# --- 5. key material in exception objects --------------------------------------------------


def _fresh_key_lines() -> tuple[str, bytes, str]:
    """A random symmetric key: its key-file line, raw bytes, base64url text."""
    key = SymmetricKey.generate()
    raw = key.secret.bytes()
    b64 = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    key.wipe()
    return f"encfs-key-v1:{b64}", raw, b64


def _malformed(kind: str) -> tuple[bytes, bytes, str]:
    line, raw, b64 = _fresh_key_lines()
    other, _, _ = _fresh_key_lines()
    bad_char = b64[:20] + "!" + b64[21:]
    content = {
        "bad-utf8-comment": b"# \xff comment\n" + line.encode() + b"\n",
        "bad-utf8-in-key-line": line.encode() + b"\xff\n",
        "bad-utf8-before-key": b"\xc3\x28" + line.encode() + b"\n",
        "two-key-lines": f"{line}\n{other}\n".encode(),
        "bad-base64": f"encfs-key-v1:{bad_char}\n".encode(),
        "truncated-key": line[:-4].encode() + b"\n",
        "wrong-prefix": f"encfs-kee-v1:{b64}\n".encode(),
        "identity-prefix-bad-base64": f"encfs-x25519-identity-v1:{bad_char}\n".encode(),
        "valid-key-plus-junk-line": f"# c\n{line}\njunk\n".encode(),
        "valid-key-plus-junk-same-line": f"{line}junk\n".encode(),
    }[kind]
    return content, raw, b64


def _load_and_catch(ref: str) -> BaseException | None:
    """Load ``ref`` and return what it raised. This frame holds the reference only."""
    try:
        load_reference(ref)
    except BaseException as e:  # noqa: BLE001 - the point is to inspect whatever comes out
        return e
    return None


def _everything_kept_by(exc: BaseException):
    """Every object an exception keeps reachable the ways loggers and debuggers show them:
    args, message, context/cause chain, and every traceback frame's locals."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        yield str(e)
        yield from e.args
        tb = e.__traceback__
        while tb is not None:
            yield from tb.tb_frame.f_locals.values()
            tb = tb.tb_next
        todo += [e.__context__, e.__cause__]


def _assert_no_key(exc: BaseException, raw: bytes, b64: str) -> None:
    fragments = [b64, b64[:16], b64[-16:]]
    for value in _everything_kept_by(exc):
        text = repr(value)
        for f in fragments:
            assert f not in text, f"key text kept by {type(value).__name__}: {text[:80]}"
        assert raw.hex() not in text and repr(raw)[2:-1] not in text
        if isinstance(value, (bytes, bytearray)):
            assert raw[:12] not in value and b64[:16].encode() not in value
        elif isinstance(value, memoryview):
            try:
                data = value.tobytes()
            except ValueError:  # released
                continue
            assert raw[:12] not in data and b64[:16].encode() not in data


KINDS = [
    "bad-utf8-comment", "bad-utf8-in-key-line", "bad-utf8-before-key", "two-key-lines", "bad-base64",
    "truncated-key", "wrong-prefix", "identity-prefix-bad-base64", "valid-key-plus-junk-line",
    "valid-key-plus-junk-same-line",
]


@pytest.mark.parametrize("kind", KINDS)
def test_malformed_key_file_errors_keep_no_key_material(tmp_path, kind):
    content, raw, b64 = _malformed(kind)
    (tmp_path / "bad.key").write_bytes(content)
    exc = _load_and_catch(f"keyfile:{tmp_path / 'bad.key'}")
    assert isinstance(exc, KeyReferenceError), repr(exc)
    assert exc.__context__ is None and exc.__cause__ is None
    _assert_no_key(exc, raw, b64)


@pytest.mark.parametrize("kind", ["bad-utf8-in-key-line", "two-key-lines", "bad-base64", "truncated-key", "valid-key-plus-junk-line"])
def test_malformed_env_key_errors_keep_no_key_material(monkeypatch, kind):
    content, raw, b64 = _malformed(kind)
    monkeypatch.setitem(os.environb, b"ENCFS_TEST_BAD_KEY", content)
    exc = _load_and_catch("env:ENCFS_TEST_BAD_KEY")
    assert isinstance(exc, KeyReferenceError), repr(exc)
    _assert_no_key(exc, raw, b64)


def test_key_files_in_other_line_endings_still_load(tmp_path):
    """The byte-level parser keeps accepting what the text parser did (CRLF, CR, blanks)."""
    key = SymmetricKey.generate()
    text = key_file_text(key)
    for name, data in (("crlf", text.replace("\n", "\r\n")), ("cr", text.replace("\n", "\r")), ("blank", "\n  \n" + text.replace("encfs", "  encfs", 1) + "\n\n")):
        (tmp_path / name).write_text(data, newline="")
        loaded = load_reference(f"keyfile:{tmp_path / name}")
        assert isinstance(loaded, SymmetricKey) and loaded.key_id == key.key_id
    ident = X25519Identity.generate()
    (tmp_path / "id").write_text(key_file_text(ident))
    assert load_reference(f"keyfile:{tmp_path / 'id'}").key_id == ident.key_id


def test_non_canonical_base64_is_refused(tmp_path):
    key = SymmetricKey.generate()
    line = key_file_text(key).splitlines()[1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(line[-1])
    (tmp_path / "k").write_text(line[:-1] + alphabet[last | 1] + "\n")  # a low bit set: same 32 bytes, other text
    with pytest.raises(KeyReferenceError, match="canonical"):
        load_reference(f"keyfile:{tmp_path / 'k'}")


# --- 11. untyped errors ---------------------------------------------------------------------


def test_unreadable_key_references_are_typed(tmp_path):
    (tmp_path / "binary").write_bytes(b"\x7fELF\xff\xfe\x00" + bytes(range(256)) * 4)
    (tmp_path / "huge").write_bytes(b"# padding\n" * 7000)  # 70 000 bytes of valid comments
    (tmp_path / "adir").mkdir()
    cases = {
        "keyfile:~nosuchuser_encfs_test/k": "nosuchuser",
        f"keyfile:{tmp_path / 'binary'}": "binary|UTF-8",
        f"keyfile:{tmp_path / 'huge'}": "64 KiB",
        f"keyfile:{tmp_path / 'adir'}": "directory",
        f"keyfile:{tmp_path / 'missing'}": "cannot read",
        f"passphrase:file:{tmp_path / 'binary'}": "UTF-8",
        f"passphrase:file:{tmp_path / 'huge'}": "64 KiB",
    }
    if Path("/bin/ls").is_file():
        cases["keyfile:/bin/ls"] = "64 KiB|binary|UTF-8"
    for ref, match in cases.items():
        with pytest.raises(KeyReferenceError, match=match):
            load_reference(ref)
    (tmp_path / "p").write_bytes(b"plaintext")
    assert run("encrypt", "-k", keyfile(tmp_path), str(tmp_path / "p"), str(tmp_path / "c.enc")).returncode == 0
    for ref, match in cases.items():
        line = one_line_error(run("decrypt", "-k", ref, str(tmp_path / "c.enc"), str(tmp_path / "out")))
        assert ref in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "var,value", [("ENCFS_BACKEND", "bogus"), ("ENCFS_NATIVE_MIN_CHUNKS", "many"), ("ENCFS_NATIVE_MIN_CHUNKS", "-3")]
)
def test_bad_environment_settings_are_config_errors(tmp_path, monkeypatch, var, value):
    from encfs import backend

    monkeypatch.setattr(backend, "_BACKENDS", {})
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=var):
        backend.get_backend()
    key = keyfile(tmp_path)
    (tmp_path / "p").write_bytes(b"data" * 100)
    line = one_line_error(run("encrypt", "-k", key, str(tmp_path / "p"), str(tmp_path / "c"), env={var: value}))
    assert var in line and repr(value) in line
    assert not (tmp_path / "c").exists()


def test_unexpected_errors_are_one_line_unless_debug():
    script = textwrap.dedent(
        """
        import sys, encfs.cli as cli
        def boom(*a, **k):
            raise RuntimeError("kaboom")
        cli.get_backend = boom
        sys.exit(cli.main(sys.argv[1:]))
        """
    )
    res = subprocess.run([sys.executable, "-c", script, "doctor"], capture_output=True, timeout=60)
    line = one_line_error(res)
    assert "RuntimeError" in line and "kaboom" in line and "--debug" in line
    res = subprocess.run([sys.executable, "-c", script, "--debug", "doctor"], capture_output=True, timeout=60)
    assert res.returncode != 0 and b"Traceback" in res.stderr and b"kaboom" in res.stderr
    res = subprocess.run([sys.executable, "-c", script, "doctor", "--debug"], capture_output=True, timeout=60)
    assert b"Traceback" in res.stderr


# --- 14. '-' means stdout ---------------------------------------------------------------------


def test_encrypt_dash_writes_ciphertext_to_stdout(tmp_path):
    key = keyfile(tmp_path)
    data = os.urandom(50_000)
    (tmp_path / "p").write_bytes(data)
    res = run("encrypt", "-k", key, str(tmp_path / "p"), "-", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "-").exists(), "'-' is stdout, not a file named '-'"
    assert res.stdout[:8] == MAGIC
    (tmp_path / "c.enc").write_bytes(res.stdout)
    assert run("decrypt", "-k", key, str(tmp_path / "c.enc"), "-").stdout == data
    piped = run("encrypt", "-k", key, "-", "-", input=data, cwd=tmp_path)
    assert piped.returncode == 0 and not (tmp_path / "-").exists()
    back = run("decrypt", "-k", key, "-", "-", input=piped.stdout, cwd=tmp_path)
    assert back.returncode == 0 and back.stdout == data and not (tmp_path / "-").exists()
    assert run("encrypt", "-k", key, str(tmp_path / "p"), "./-", cwd=tmp_path).returncode == 0
    assert (tmp_path / "-").read_bytes()[:8] == MAGIC, "'./-' still names a file"


def test_encrypt_refuses_a_terminal_as_stdout(tmp_path):
    key = keyfile(tmp_path)
    (tmp_path / "p").write_bytes(b"x" * 100)
    master, slave = pty.openpty()
    try:
        res = run("encrypt", "-k", key, str(tmp_path / "p"), "-", stdout=slave, stderr=subprocess.PIPE, cwd=tmp_path)
    finally:
        os.close(slave)
        os.close(master)
    assert "terminal" in one_line_error(res)
    assert not (tmp_path / "-").exists()


def test_a_tree_cannot_go_to_stdout(tmp_path):
    key = keyfile(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"x")
    assert "directory" in one_line_error(run("encrypt", "-k", key, str(tmp_path / "d"), "-"))


# --- 14. symlinks are not followed -------------------------------------------------------------


def test_tree_walks_never_follow_symlinks(tmp_path):
    key = keyfile(tmp_path)
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "secret.txt").write_bytes(b"OUTSIDE-SECRET")
    (outside / "dir" / "also.txt").write_bytes(b"OUTSIDE-DIR")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"inside a")
    (src / "sub" / "b.txt").write_bytes(b"inside b")
    (src / "link.txt").symlink_to(outside / "secret.txt")
    (src / "sub" / "linkdir").symlink_to(outside / "dir")
    res = run("encrypt", "--no-progress", "-k", key, str(src), str(tmp_path / "enc"))
    assert res.returncode == 0, res.stderr
    err = res.stderr.decode()
    assert "link.txt" in err and "sub/linkdir" in err and "symlink" in err
    assert set(files_under(tmp_path / "enc")) == {"a.txt", "sub/b.txt"}
    assert not (tmp_path / "enc" / "link.txt").exists() and not (tmp_path / "enc" / "sub" / "linkdir").exists()
    # decrypt of a tree: a symlink to ciphertext outside it is skipped as well
    assert run("encrypt", "-k", key, str(outside / "secret.txt"), str(outside / "secret.enc")).returncode == 0
    (tmp_path / "enc" / "planted").symlink_to(outside / "secret.enc")
    res = run("decrypt", "--no-progress", "-k", key, str(tmp_path / "enc"), str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    assert files_under(tmp_path / "out") == {"a.txt": b"inside a", "sub/b.txt": b"inside b"}
    assert b"planted" in res.stderr


# --- 14. modes ----------------------------------------------------------------------------------


def test_local_outputs_take_the_source_mode(tmp_path):
    key = keyfile(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    modes = {"private": 0o600, "group": 0o640, "public": 0o644, "exec": 0o750}
    for name, mode in modes.items():
        (src / name).write_bytes(name.encode() * 10)
        os.chmod(src / name, mode)
    umask = dict(preexec_fn=lambda: os.umask(0o022))
    assert run("encrypt", "--no-progress", "-k", key, str(src), str(tmp_path / "enc"), **umask).returncode == 0
    assert run("decrypt", "--no-progress", "-k", key, str(tmp_path / "enc"), str(tmp_path / "out"), **umask).returncode == 0
    for name, mode in modes.items():
        assert os.stat(tmp_path / "enc" / name).st_mode & 0o777 == mode, name
        assert os.stat(tmp_path / "out" / name).st_mode & 0o777 == mode, name
        assert (tmp_path / "out" / name).read_bytes() == name.encode() * 10
    # single files, and over an existing destination with other permissions
    (tmp_path / "single.out").write_bytes(b"old")
    os.chmod(tmp_path / "single.out", 0o666)
    assert run("decrypt", "-k", key, str(tmp_path / "enc" / "private"), str(tmp_path / "single.out"), **umask).returncode == 0
    assert os.stat(tmp_path / "single.out").st_mode & 0o777 == 0o600
    assert (tmp_path / "single.out").read_bytes() == b"private" * 10


# --- 14. failed runs leave nothing ---------------------------------------------------------------


def _tamper_last_chunk(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-cs.TAG_SIZE - 1] ^= 0x01  # a byte of the final chunk's ciphertext
    path.write_bytes(bytes(data))


def test_failed_directory_decrypt_removes_what_it_wrote(tmp_path):
    key = keyfile(tmp_path)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "newdir").mkdir()
    plain = {"a.bin": os.urandom(40_000), "b.bin": os.urandom(20_000), "c.bin": os.urandom(10), "sub/d.bin": os.urandom(70_000), "newdir/e": b"e"}
    for name, data in plain.items():
        (src / name).write_bytes(data)
    assert run("encrypt", "--no-progress", "-k", key, str(src), str(tmp_path / "enc")).returncode == 0
    _tamper_last_chunk(tmp_path / "enc" / "c.bin")  # a.bin, b.bin decrypt first; c.bin fails
    dst = tmp_path / "dst"
    (dst / "sub").mkdir(parents=True)
    before = {"keep.txt": b"pre-existing", "a.bin": b"old a", "sub/other": b"other"}
    for name, data in before.items():
        (dst / name).write_bytes(data)
    res = run("decrypt", "--no-progress", "-k", key, str(tmp_path / "enc"), str(dst))
    line = one_line_error(res)
    assert "c.bin" in line
    assert files_under(dst) == before, "only the files that were there before remain, unchanged"
    assert not (dst / "newdir").exists(), "directories this run created are removed"
    assert not [p for p in dst.rglob("*") if ".encfs-tmp-" in p.name]
    # into a destination that did not exist: nothing at all is left
    line = one_line_error(run("decrypt", "--no-progress", "-k", key, str(tmp_path / "enc"), str(tmp_path / "fresh")))
    assert not (tmp_path / "fresh").exists()


def test_single_file_decrypt_never_leaves_partial_plaintext(tmp_path):
    key = keyfile(tmp_path)
    data = os.urandom(3 * cs.CHUNK_SIZE + 100)
    (tmp_path / "p").write_bytes(data)
    assert run("encrypt", "-k", key, str(tmp_path / "p"), str(tmp_path / "c")).returncode == 0
    _tamper_last_chunk(tmp_path / "c")
    one_line_error(run("decrypt", "-k", key, str(tmp_path / "c"), str(tmp_path / "new")))
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").write_bytes(b"previous contents")
    one_line_error(run("decrypt", "-k", key, str(tmp_path / "c"), str(tmp_path / "old")))
    assert (tmp_path / "old").read_bytes() == b"previous contents"
    assert not [p for p in tmp_path.iterdir() if ".encfs-tmp-" in p.name]


def test_tree_round_trip_and_summary(tmp_path):
    key = keyfile(tmp_path)
    src = tmp_path / "src"
    (src / "x" / "y").mkdir(parents=True)
    plain = {"one": os.urandom(33_000), "x/two": b"", "x/y/three": os.urandom(5)}
    for name, data in plain.items():
        (src / name).write_bytes(data)
    res = run("encrypt", "--no-progress", "-k", key, str(src), str(tmp_path / "enc"))
    assert res.returncode == 0 and f"encrypted 3 file(s), {sum(map(len, plain.values()))} bytes" in res.stderr.decode()
    res = run("decrypt", "--no-progress", "-k", key, str(tmp_path / "enc"), str(tmp_path / "out"))
    assert res.returncode == 0 and "decrypted 3 file(s)" in res.stderr.decode()
    assert files_under(tmp_path / "out") == plain
    # a single file into an existing directory lands inside it, as with cp
    (tmp_path / "into").mkdir()
    assert run("decrypt", "-k", key, str(tmp_path / "enc" / "one"), str(tmp_path / "into")).returncode == 0
    assert (tmp_path / "into" / "one").read_bytes() == plain["one"]


def test_clean_removes_stale_temporaries(tmp_path):
    from encfs import sink

    if not hasattr(sink, "remove_stale_temporaries"):
        pytest.skip("encfs.sink.remove_stale_temporaries has not landed")
    stale = tmp_path / ".f.encfs-tmp-0123456789ab"
    stale.write_bytes(b"left by a killed writer")
    os.utime(stale, (1, 1))
    fresh = tmp_path / ".g.encfs-tmp-ba9876543210"
    fresh.write_bytes(b"recent")
    (tmp_path / "normal").write_bytes(b"keep")
    res = run("clean", str(tmp_path), "--older-than", "60")
    assert res.returncode == 0, res.stderr
    assert not stale.exists() and fresh.exists() and (tmp_path / "normal").exists()
    assert str(stale) in res.stdout.decode()
    assert "seconds" in run("clean", str(tmp_path), "--older-than", "soon").stderr.decode()
