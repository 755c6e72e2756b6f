"""Rotation and revocation across a prefix (``encfs rewrap PREFIX``, ``revoke``, ``reencrypt``,
``status``), checked against the plaintext and against which keys open which files."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from encfs.errors import NoMatchingKeyError
from encfs.filesystem import EncFileSystem

from .conftest import write_key


def cli(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "encfs.cli", *args, "--no-progress"] if args[0] not in ("status",) else [sys.executable, "-m", "encfs.cli", *args],
                         capture_output=True, text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, out.stderr
    return out


@pytest.fixture
def tree(tmp_path):
    a, b = write_key(tmp_path / "a.key"), write_key(tmp_path / "b.key")
    enc = EncFileSystem(key=a, skip_instance_cache=True)
    files = {}
    for i in range(12):
        p = tmp_path / "data" / f"d{i % 3}" / f"f{i}.bin"
        files[str(p)] = os.urandom(1000 * (i + 1))
        enc.pipe_file(str(p), files[str(p)])
    return tmp_path, a, b, files


def opens(key: str, files: dict[str, bytes]) -> list[bool]:
    fs = EncFileSystem(key=key, skip_instance_cache=True)
    out = []
    for p, d in files.items():
        try:
            out.append(fs.cat_file(p) == d)
        except NoMatchingKeyError:
            out.append(False)
    return out


def test_rotation_in_two_passes_keeps_every_file_readable(tree):
    """Pass 1 adds the new key everywhere (old and new readers read every file); pass 2
    removes the old one (then only the new key reads); reruns skip what is done."""
    root, a, b, files = tree
    j1, j2 = str(root / "j1.sqlite"), str(root / "j2.sqlite")
    out = json.loads(cli("rewrap", "-k", a, "--add", b, str(root / "data"), "--journal", j1, "--json").stdout)
    assert out["copied"] == 12 and out["failed"] == []
    assert all(opens(a, files)) and all(opens(b, files))
    again = json.loads(cli("rewrap", "-k", a, "--add", b, str(root / "data"), "--journal", j1, "--json").stdout)
    assert again["skipped"] == 12 and again["copied"] == 0
    cli("rewrap", "-k", b, "--remove", a, str(root / "data"), "--journal", j2)
    assert all(opens(b, files)) and not any(opens(a, files))


def test_a_half_done_rotation_converges_without_duplicate_stanzas(tree):
    """Files rewrapped by a run that died are not given the new key twice by the rerun."""
    root, a, b, files = tree
    some = sorted(files)[:5]
    for p in some:
        cli("rewrap", "-k", a, "--add", b, p)
    cli("rewrap", "-k", a, "--add", b, str(root / "data"))
    fs = EncFileSystem(key=a, skip_instance_cache=True)
    for p in files:
        labels = fs.open(p).header.labels()
        assert len(labels) == len(set(labels)) == 2, labels


def test_revoke_leaves_no_header_that_opens_with_the_recipient(tree):
    root, a, b, files = tree
    half = sorted(files)[::2]
    for p in half:
        cli("rewrap", "-k", a, "--add", b, p)
    before = {p: Path(p).read_bytes() for p in files if p not in half}
    cli("revoke", "-k", a, b, str(root / "data"))
    assert not any(opens(b, files))
    assert all(opens(a, files))
    assert all(Path(p).read_bytes() == d for p, d in before.items()), "files without the recipient were left alone"


def test_reencrypt_gives_new_file_keys_and_the_same_plaintext(tree):
    root, a, _, files = tree
    fs = EncFileSystem(key=a, skip_instance_cache=True)
    ids = {p: fs.open(p).header.file_id for p in files}
    out = json.loads(cli("reencrypt", "-k", a, str(root / "data"), "--json").stdout)
    assert out["copied"] == 12 and out["checked"] == 12 and out["failed"] == []
    fs = EncFileSystem(key=a, skip_instance_cache=True)
    assert all(fs.open(p).header.file_id != ids[p] for p in files)
    assert all(opens(a, files))
    assert json.loads(cli("reencrypt", "-k", a, str(root / "data"), "--json").stdout)["skipped"] == 12


def test_status_lists_what_is_not_encrypted(tree):
    root, _, _, _ = tree
    (root / "data" / "d0" / "plain.csv").write_text("a,b\n1,2\n")
    (root / "data" / "empty").write_bytes(b"")
    out = cli("status", str(root / "data"), check=False)
    assert out.returncode == 1
    assert sorted(line.split(": ")[0] for line in out.stdout.splitlines()) == sorted([str(root / "data" / "d0" / "plain.csv"), str(root / "data" / "empty")])
    assert "14 object(s): 12 encrypted" in out.stderr
    (root / "data" / "d0" / "plain.csv").unlink()
    (root / "data" / "empty").unlink()
    assert cli("status", str(root / "data"), check=False).returncode == 0


@pytest.mark.slow
def test_a_killed_rewrap_never_leaves_a_file_that_does_not_open(tmp_path):
    """The default rewrap writes a new file and renames it: killed at any moment (20 random
    points), the file opens with the key it always keeps and reads back whole."""
    a, b = write_key(tmp_path / "a.key"), write_key(tmp_path / "b.key")
    path = tmp_path / "big.bin"
    data = os.urandom(24 << 20)
    EncFileSystem(key=a, skip_instance_cache=True).pipe_file(str(path), data)
    t = time.monotonic()
    cli("rewrap", "-k", a, "--add", b, str(path))
    cli("rewrap", "-k", a, "--remove", b, str(path))
    span = time.monotonic() - t
    rng = random.Random(7)
    completed = 0
    for i in range(20):
        p = subprocess.Popen([sys.executable, "-m", "encfs.cli", "rewrap", "-k", a, "--add", b, str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0, span / 2))
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert EncFileSystem(key=a, skip_instance_cache=True).cat_file(str(path)) == data, f"kill {i}"
        labels = EncFileSystem(key=a, skip_instance_cache=True).open(str(path)).header.labels()
        if len(labels) == 2:
            completed += 1
            assert EncFileSystem(key=b, skip_instance_cache=True).cat_file(str(path)) == data
            cli("rewrap", "-k", a, "--remove", b, str(path))
    assert completed < 20, "every kill came too late to test anything"
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".big.bin")]
    cli("clean", str(tmp_path), check=False)
    assert EncFileSystem(key=a, skip_instance_cache=True).cat_file(str(path)) == data
    assert len(leftovers) <= 20


def test_adding_a_recipient_a_file_has_does_not_duplicate_its_stanza(tree):
    root, a, b, files = tree
    p = sorted(files)[0]
    cli("rewrap", "-k", a, "--add", b, p)
    cli("rewrap", "-k", a, "--add", b, p)
    labels = EncFileSystem(key=a, skip_instance_cache=True).open(p).header.labels()
    assert len(labels) == len(set(labels)) == 2, labels
