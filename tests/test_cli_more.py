"""Several sources and globs, --keep-going, inspect/rewrap over directories, passphrase:prompt
asking twice, and mtimes kept on local copies: each through the real command (a subprocess)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from .test_cli_commands import MAGIC, keyfile, ok, run


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture
def raw(tmp_path):
    """raw/a.parquet, raw/b.parquet, raw/c.txt, raw/sub/d.parquet, and a symlink raw/l.parquet."""
    src = tmp_path / "raw"
    (src / "sub").mkdir(parents=True)
    files = {"a.parquet": os.urandom(70_000), "b.parquet": b"bee\n", "c.txt": b"sea\n", "sub/d.parquet": b"dee"}
    for name, data in files.items():
        (src / name).write_bytes(data)
    (tmp_path / "outside.parquet").write_bytes(b"outside the tree")
    (src / "l.parquet").symlink_to(tmp_path / "outside.parquet")
    return src, files


# --- 1. several sources and globs ----------------------------------------------------------


def test_glob_encrypts_matches_into_directory_and_decrypts_back(tmp_path, raw):
    src, files = raw
    key = keyfile(tmp_path)
    res = ok(run("encrypt", "-k", key, str(src / "*.parquet"), str(tmp_path / "enc")))
    enc = files_under(tmp_path / "enc")
    assert sorted(enc) == ["a.parquet", "b.parquet"], "matches only; the symlink match is not followed"
    assert all(v.startswith(MAGIC) for v in enc.values())
    assert b"l.parquet" in res.stderr and b"symlink, not followed" in res.stderr
    ok(run("decrypt", "-k", key, str(tmp_path / "enc" / "*.parquet"), str(tmp_path / "out") + "/"))
    assert files_under(tmp_path / "out") == {k: files[k] for k in ("a.parquet", "b.parquet")}


def test_several_sources_files_and_directories(tmp_path, raw):
    src, files = raw
    key = keyfile(tmp_path)
    ok(run("encrypt", "-k", key, str(src / "c.txt"), str(src / "sub"), str(src / "a.parquet"), str(tmp_path / "enc")))
    assert sorted(files_under(tmp_path / "enc")) == ["a.parquet", "c.txt", "sub/d.parquet"]
    ok(run("decrypt", "-k", key, str(tmp_path / "enc" / "c.txt"), str(tmp_path / "enc" / "sub"), str(tmp_path / "out")))
    assert files_under(tmp_path / "out") == {"c.txt": files["c.txt"], "sub/d.parquet": files["sub/d.parquet"]}


def test_single_source_unchanged_and_trailing_slash_means_directory(tmp_path, raw):
    src, files = raw
    key = keyfile(tmp_path)
    ok(run("encrypt", "-k", key, str(src / "c.txt"), str(tmp_path / "c.enc")))  # a file, as today
    assert (tmp_path / "c.enc").read_bytes().startswith(MAGIC)
    ok(run("encrypt", "-k", key, str(src / "c.txt"), str(tmp_path / "newdir") + "/"))  # a new directory
    assert sorted(files_under(tmp_path / "newdir")) == ["c.txt"]
    ok(run("decrypt", "-k", key, str(tmp_path / "newdir" / "c.txt"), str(tmp_path / "plain") + "/"))
    assert (tmp_path / "plain" / "c.txt").read_bytes() == files["c.txt"]
    ok(run("encrypt", "-k", key, str(src), str(tmp_path / "tree")))  # a tree, as today
    assert sorted(files_under(tmp_path / "tree")) == ["a.parquet", "b.parquet", "c.txt", "sub/d.parquet"]


def test_several_sources_refusals(tmp_path, raw):
    src, _ = raw
    key = keyfile(tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "c.txt").write_bytes(b"another c")
    res = run("encrypt", "-k", key, str(src / "c.txt"), str(tmp_path / "other" / "c.txt"), str(tmp_path / "enc"))
    assert res.returncode == 1 and b"would both be written to c.txt" in res.stderr
    assert not (tmp_path / "enc").exists()
    res = run("encrypt", "-k", key, str(src / "*.nothing"), str(tmp_path / "enc"))
    assert res.returncode == 1 and b"no file matches" in res.stderr
    (tmp_path / "afile").write_bytes(b"x")
    res = run("encrypt", "-k", key, str(src / "c.txt"), str(src / "b.parquet"), str(tmp_path / "afile"))
    assert res.returncode == 1 and b"not a directory" in res.stderr and (tmp_path / "afile").read_bytes() == b"x"


def test_several_sources_all_or_nothing(tmp_path, raw):
    src, _ = raw
    key = keyfile(tmp_path)
    ok(run("encrypt", "-k", key, str(src / "c.txt"), str(src / "c.enc")))  # encrypting it again fails
    res = run("encrypt", "-k", key, str(src / "a.parquet"), str(src / "c.enc"), str(src / "c.txt"), str(tmp_path / "enc"))
    assert res.returncode == 1 and b"already an encfs file" in res.stderr
    assert not (tmp_path / "enc").exists(), "nothing of the run is left"


# --- 2. --keep-going -----------------------------------------------------------------------


def test_keep_going_writes_the_good_files_and_lists_the_bad(tmp_path, raw):
    src, files = raw
    key = keyfile(tmp_path)
    ok(run("encrypt", "-k", key, str(src / "c.txt"), str(src / "c.enc")))
    res = run("encrypt", "--keep-going", "-k", key, str(src / "a.parquet"), str(src / "c.enc"), str(src / "c.txt"), str(tmp_path / "enc"))
    err = res.stderr.decode()
    assert res.returncode == 1 and "Traceback" not in err
    assert "failed for 1 of 3 file(s)" in err and "c.enc: " in err and "already an encfs file" in err
    assert sorted(files_under(tmp_path / "enc")) == ["a.parquet", "c.txt"], "the ones that succeeded stay"
    assert not [p for p in (tmp_path / "enc").iterdir() if p.name.startswith(".")], "no staging file left"

    # decrypt: a damaged file among good ones
    data = bytearray((tmp_path / "enc" / "a.parquet").read_bytes())
    data[5000] ^= 1
    (tmp_path / "enc" / "a.parquet").write_bytes(bytes(data))
    res = run("decrypt", "--keep-going", "-k", key, str(tmp_path / "enc"), str(tmp_path / "out"))
    assert res.returncode == 1 and b"a.parquet" in res.stderr and b"failed for 1 of 2" in res.stderr
    assert files_under(tmp_path / "out") == {"c.txt": files["c.txt"]}
    res = run("decrypt", "-k", key, str(tmp_path / "enc"), str(tmp_path / "out2"))  # without: nothing
    assert res.returncode == 1 and not (tmp_path / "out2").exists()


def test_keep_going_still_stops_on_key_errors(tmp_path, raw):
    src, _ = raw
    res = run("encrypt", "--keep-going", "-k", f"keyfile:{tmp_path / 'missing.key'}", str(src / "c.txt"), str(src / "b.parquet"), str(tmp_path / "enc"))
    assert res.returncode == 1 and not (tmp_path / "enc").exists()


# --- 5. mode and mtime kept ----------------------------------------------------------------


def test_local_copies_keep_mode_and_mtime(tmp_path, raw):
    src, files = raw
    key = keyfile(tmp_path)
    when = 1_500_000_000_123_456_789
    for i, name in enumerate(files):
        os.utime(src / name, ns=(when + i, when + i * 1000))
    os.chmod(src / "c.txt", 0o640)
    ok(run("encrypt", "-k", key, str(src), str(tmp_path / "enc")))
    ok(run("encrypt", "-k", key, str(src / "c.txt"), str(tmp_path / "single.enc")))
    ok(run("encrypt", "-k", key, str(src / "*.parquet"), str(src / "c.txt"), str(tmp_path / "glob")))
    for root in ("enc", "glob"):
        for name in files_under(tmp_path / root):
            assert os.stat(tmp_path / root / name).st_mtime_ns == os.stat(src / name).st_mtime_ns, (root, name)
    assert os.stat(tmp_path / "single.enc").st_mtime_ns == os.stat(src / "c.txt").st_mtime_ns
    assert os.stat(tmp_path / "enc" / "c.txt").st_mode & 0o777 == 0o640
    ok(run("decrypt", "-k", key, str(tmp_path / "enc"), str(tmp_path / "out")))
    ok(run("decrypt", "-k", key, str(tmp_path / "single.enc"), str(tmp_path / "single.txt")))
    for name in files:
        assert os.stat(tmp_path / "out" / name).st_mtime_ns == os.stat(src / name).st_mtime_ns, name
    assert os.stat(tmp_path / "single.txt").st_mtime_ns == os.stat(src / "c.txt").st_mtime_ns
    assert os.stat(tmp_path / "out" / "c.txt").st_mode & 0o777 == 0o640


# --- 3. inspect and rewrap on directories and prefixes --------------------------------------


def test_inspect_and_rewrap_walk_directories(tmp_path, raw):
    src, files = raw
    a, b = keyfile(tmp_path, "a.key"), keyfile(tmp_path, "b.key")
    ok(run("encrypt", "-k", a, str(src), str(tmp_path / "enc")))
    enc = tmp_path / "enc"
    (enc / "link.parquet").symlink_to(tmp_path / "outside.parquet")
    from encfs.sink import temp_name

    Path(temp_name(str(enc / "c.txt"))).write_bytes(b"an unfinished write")
    res = ok(run("inspect", "--json", str(enc)))
    infos = [json.loads(line) for line in res.stdout.decode().splitlines()]
    assert sorted(Path(i["path"]).relative_to(enc).as_posix() for i in infos) == sorted(files)
    assert {i["plaintext_size"] for i in infos} == {len(v) for v in files.values()}
    assert b"link.parquet: symlink, not followed" in res.stderr and b"unfinished encfs temporary" in res.stderr
    glob = ok(run("inspect", "--json", str(enc / "*.parquet")))
    assert len(glob.stdout.decode().splitlines()) == 2, "a.parquet, b.parquet; the symlink match skipped"

    res = ok(run("rewrap", "-k", a, "--add", b, str(enc), "--journal", str(tmp_path / "j.sqlite"), "--json"))
    summary = json.loads(res.stdout)
    assert summary["objects"] == summary["copied"] == len(files) and summary["failed"] == [], summary
    ok(run("decrypt", "-k", b, str(enc), str(tmp_path / "out")))
    assert files_under(tmp_path / "out") == files
    assert (tmp_path / "outside.parquet").read_bytes() == b"outside the tree", "the symlink target untouched"


def test_rewrap_directory_stops_with_a_count(tmp_path, raw):
    src, _ = raw
    a, b = keyfile(tmp_path, "a.key"), keyfile(tmp_path, "b.key")
    ok(run("encrypt", "-k", a, str(src / "b.parquet"), str(src / "c.txt"), str(tmp_path / "enc")))
    (tmp_path / "enc" / "z.plain").write_bytes(b"not encrypted")
    res = run("rewrap", "-k", a, "--add", b, str(tmp_path / "enc"), "--journal", str(tmp_path / "j.sqlite"), "--no-progress")
    err = res.stderr.decode()
    assert res.returncode == 1 and "z.plain" in err and "rewrapped 2" in err and "failed 1" in err, err
    res = run("rewrap", "-k", a, "--add", b, str(tmp_path / "enc" / "b.parquet"), str(tmp_path / "enc" / "z.plain"), str(tmp_path / "enc" / "c.txt"))
    err = res.stderr.decode()
    assert res.returncode == 1 and "z.plain" in err and "1 of 3 file(s) before it were rewrapped" in err, err


# --- 4. passphrase:prompt asks twice when encrypting --------------------------------------


def run_on_a_terminal(args: list[str], answers: list[str], timeout: float = 60.0) -> tuple[int, str]:
    """Run the command with a pty as its controlling terminal (what getpass reads), answering
    each passphrase prompt in turn; returns (exit status, everything it wrote to the terminal)."""
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.execv(sys.executable, [sys.executable, "-m", "encfs.cli", *args])
    out, sent, deadline = b"", 0, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
            prompts = out.count(b"passphrase: ") + out.count(b"(again): ")
            while sent < min(prompts, len(answers)):
                os.write(fd, answers[sent].encode() + b"\n")
                sent += 1
        else:
            os.kill(pid, 9)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def test_passphrase_prompt_asks_twice_when_encrypting(tmp_path):
    (tmp_path / "p.txt").write_bytes(b"secret rows\n")
    args = ["encrypt", "--no-progress", "-k", "passphrase:prompt", str(tmp_path / "p.txt")]
    rc, text = run_on_a_terminal([*args, str(tmp_path / "bad.enc")], ["correct horse", "correct hose"])
    assert rc == 1 and "the two passphrases differ" in text and "(again)" in text, text
    assert not (tmp_path / "bad.enc").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    rc, text = run_on_a_terminal([*args, str(tmp_path / "good.enc")], ["correct horse", "correct horse"])
    assert rc == 0, text
    assert text.count("passphrase") == 2
    res = ok(run("decrypt", "-k", "passphrase:env:PW", str(tmp_path / "good.enc"), "-", env={"PW": "correct horse"}))
    assert res.stdout == b"secret rows\n"
    rc, text = run_on_a_terminal(["decrypt", "--no-progress", "-k", "passphrase:prompt", str(tmp_path / "good.enc"), str(tmp_path / "out.txt")], ["correct horse"])
    assert rc == 0 and "(again)" not in text, "decrypting asks once"
    assert (tmp_path / "out.txt").read_bytes() == b"secret rows\n"


@pytest.mark.parametrize("command", ["decrypt", "cat"])
def test_a_reader_that_stops_early_is_no_error(tmp_path, command):
    """``encfs decrypt X - | head`` ends quietly with 141 (SIGPIPE's status), as cat does."""
    import subprocess

    key = keyfile(tmp_path)
    data = os.urandom(3_000_000)
    (tmp_path / "p").write_bytes(data)
    ok(run("encrypt", "-k", key, str(tmp_path / "p"), str(tmp_path / "e")))
    args = [command, "-k", key, str(tmp_path / "e")] + (["-"] if command == "decrypt" else [])
    proc = subprocess.Popen([sys.executable, "-m", "encfs.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(10) == data[:10]
    proc.stdout.close()
    proc.wait(60)
    assert proc.returncode == 141 and b"error" not in proc.stderr.read()
