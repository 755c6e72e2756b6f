"""Passphrases at dataset scale (issue 14): Argon2id runs once per passphrase and salt, not
once per file. Each test counts the Argon2id runs by wrapping ``encfs.keys.passphrase.Argon2id``."""

from __future__ import annotations

import os
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from encfs import FormatError, NoMatchingKeyError
from encfs.filesystem import EncFileSystem
from encfs.format import parse
from encfs.keys import passphrase


@pytest.fixture
def runs(monkeypatch):
    """The Argon2id runs made while the test runs (one entry, its keyword arguments, per run)."""
    made: list[dict] = []
    real = passphrase.Argon2id

    def counting(**kw):
        made.append(kw)
        return real(**kw)

    monkeypatch.setattr(passphrase, "Argon2id", counting)
    monkeypatch.setenv("PW", "correct horse")
    monkeypatch.setenv("WRONG", "battery staple")
    return made


def _fs(ref: str = "passphrase:env:PW") -> EncFileSystem:
    return EncFileSystem(key=ref, skip_instance_cache=True)


def _payload(i: int) -> bytes:
    return f"file {i} ".encode() * (i % 7 + 1)


def _write(fs: EncFileSystem, root, names) -> list[str]:
    paths = [f"{root}/{n}" for n in names]
    for n, p in zip(names, paths):
        fs.pipe_file(p, _payload(n))
    return paths


def _stanza(path: str):
    (stanza,) = [s for s in parse(open(path, "rb").read()).stanzas if s.type == "passphrase"]
    return stanza


def _passphrase_of(fs: EncFileSystem) -> passphrase.Passphrase:
    (ident,) = fs.keyring.identities()
    return ident


def test_one_writer_runs_argon2_once_for_a_hundred_files(tmp_path, runs):
    fs = _fs()
    paths = _write(fs, tmp_path, range(100))
    assert len(runs) == 1, "one salt and wrap key for everything one writer writes"
    stanzas = [_stanza(p) for p in paths]
    assert len({s.params for s in stanzas}) == 1, "every stanza carries the writer's one salt and parameters"
    assert len({s.body[:12] for s in stanzas}) == 100, "every wrap draws its own nonce"
    assert [fs.cat_file(p) for p in paths] == [_payload(i) for i in range(100)]
    assert len(runs) == 1, "the writer reads its own files with the key it already has"


def test_a_fresh_reader_runs_argon2_once_for_files_sharing_a_salt(tmp_path, runs):
    paths = _write(_fs(), tmp_path, range(100))
    del runs[:]
    reader = _fs()
    assert [reader.cat_file(p) for p in paths] == [_payload(i) for i in range(100)]
    assert len(runs) == 1
    assert [reader.cat_file(p) for p in paths[:10]] == [_payload(i) for i in range(10)]
    assert len(runs) == 1, "opening a file again runs nothing"


def test_two_writer_sessions_cost_a_reader_two_runs(tmp_path, runs):
    paths = _write(_fs(), tmp_path, range(0, 10)) + _write(_fs(), tmp_path, range(10, 20))
    assert len({_stanza(p).params[:16] for p in paths}) == 2, "each writer draws its own salt"
    del runs[:]
    reader = _fs()
    assert [reader.cat_file(p) for p in paths] == [_payload(i) for i in range(20)]
    assert len(runs) == 2


def test_a_wrong_passphrase_still_fails_at_one_run_per_salt(tmp_path, runs):
    paths = _write(_fs(), tmp_path, range(0, 5)) + _write(_fs(), tmp_path, range(5, 10))
    del runs[:]
    wrong = _fs("passphrase:env:WRONG")
    for p in paths:
        with pytest.raises(NoMatchingKeyError, match="wrong passphrase"):
            wrong.cat_file(p)
    assert len(runs) == 2, "the cached (wrong) key is tried again; the AES-GCM tag refuses it"
    assert _fs().cat_file(paths[0]) == _payload(0)


def test_a_cached_key_never_opens_a_stanza_with_other_parameters(tmp_path, runs):
    """Same salt, other (affordable) parameters: another cache entry, and the tag refuses."""
    (path,) = _write(_fs(), tmp_path, [1])
    raw = open(path, "rb").read()
    stanza = _stanza(path)
    m, t, lanes = struct.unpack(">III", stanza.params[16:])
    other = stanza.params[:16] + struct.pack(">III", m // 2, t, lanes)
    open(f"{tmp_path}/other", "wb").write(raw.replace(stanza.params, other, 1))
    del runs[:]
    reader = _fs()
    assert reader.cat_file(path) == _payload(1) and len(runs) == 1
    with pytest.raises(NoMatchingKeyError):
        reader.cat_file(f"{tmp_path}/other")
    assert len(runs) == 2 and runs[1]["memory_cost"] == m // 2


def test_a_stanza_over_the_read_bound_is_refused_with_no_run_and_nothing_cached(tmp_path, runs):
    (path,) = _write(_fs(), tmp_path, [1])
    raw = open(path, "rb").read()
    stanza = _stanza(path)
    hostile = stanza.params[:16] + struct.pack(">III", 1 << 20, 4, 1)  # same salt, far more cost
    open(f"{tmp_path}/hostile", "wb").write(raw.replace(stanza.params, hostile, 1))
    del runs[:]
    reader = _fs()
    with pytest.raises(FormatError, match="more than this reader allows"):
        reader.cat_file(f"{tmp_path}/hostile")
    assert runs == [] and _passphrase_of(reader).cached_keys() == 0
    assert reader.cat_file(path) == _payload(1) and len(runs) == 1
    with pytest.raises(FormatError, match="more than this reader allows"):
        reader.cat_file(f"{tmp_path}/hostile")
    assert len(runs) == 1, "a key cached for the salt does not lift the bound"


def test_the_reader_cache_is_bounded_and_wiped_by_wipe_keys(tmp_path, runs, monkeypatch):
    monkeypatch.setattr(passphrase, "CACHE_SIZE", 3)
    paths = [_write(_fs(), tmp_path, [i])[0] for i in range(5)]  # five writers, five salts
    del runs[:]
    reader = _fs()
    assert [reader.cat_file(p) for p in paths] == [_payload(i) for i in range(5)]
    pp = _passphrase_of(reader)
    assert len(runs) == 5 and pp.cached_keys() == 3
    assert reader.cat_file(paths[4]) == _payload(4) and len(runs) == 5, "recent: cached"
    assert reader.cat_file(paths[0]) == _payload(0) and len(runs) == 6, "least recently used: evicted"
    held = list(pp._cache.values())
    assert len(held) == 3 and not any(k.wiped for k in held)
    reader.wipe_keys()
    assert all(k.wiped for k in held) and pp.cached_keys() == 0 and pp._pass.wiped
    assert reader.cat_file(paths[0]) == _payload(0) and len(runs) == 7, "reloaded from its reference"


def test_wipe_also_wipes_the_writers_wrap_key(tmp_path, runs):
    fs = _fs()
    _write(fs, tmp_path, [1])
    pp = _passphrase_of(fs)
    key = pp._writing[2]
    fs.wipe_keys()
    assert key.wiped and pp._writing is None
    with pytest.raises(ValueError, match="wiped"):
        pp.wrap(passphrase.SecretBytes(bytes(32)), b"context")


def test_a_writer_draws_a_fresh_salt_after_many_wraps(tmp_path, runs, monkeypatch):
    monkeypatch.setattr(passphrase, "MAX_WRAPS_PER_KEY", 3)
    fs = _fs()
    paths = _write(fs, tmp_path, range(7))
    assert len(runs) == 3
    assert len({_stanza(p).params for p in paths}) == 3
    assert [_fs().cat_file(p) for p in paths] == [_payload(i) for i in range(7)]


def test_threads_reading_concurrently_derive_once(tmp_path, runs, monkeypatch):
    paths = _write(_fs(), tmp_path, range(32))
    del runs[:]
    counting = passphrase.Argon2id

    def slow(**kw):  # widen the window in which other threads ask for the same key
        time.sleep(0.2)
        return counting(**kw)

    monkeypatch.setattr(passphrase, "Argon2id", slow)
    reader = _fs()
    start = threading.Barrier(8, timeout=30)

    def read(p):
        if p in paths[:8]:
            start.wait()
        return reader.cat_file(p)

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(read, paths))
    assert got == [_payload(i) for i in range(32)]
    assert len(runs) == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_keeps_the_cache(tmp_path, runs):
    paths = _write(_fs(), tmp_path, range(2))
    del runs[:]
    reader = _fs()
    assert reader.cat_file(paths[0]) == _payload(0) and len(runs) == 1
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only if it read without running Argon2id
        code = 1
        try:
            code = 0 if reader.cat_file(paths[1]) == _payload(1) and len(runs) == 1 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


def test_a_key_reference_is_loaded_once_by_threads_opening_files_together(tmp_path, monkeypatch):
    """Found by CI: two threads loading the same reference at once made two Passphrase objects,
    each with its own cache (two Argon2id runs). The key ring loads each reference once."""
    from encfs.keys import refs

    calls = []
    real = refs.load_reference

    def slow_load(ref):
        calls.append(ref)
        time.sleep(0.05)
        return real(ref)

    monkeypatch.setattr(refs, "load_reference", slow_load)
    monkeypatch.setenv("PW", "pw")
    ring = refs.KeyRing("passphrase:env:PW")
    with ThreadPoolExecutor(8) as pool:
        loaded = list(pool.map(lambda _: ring.identities()[0], range(8)))
    assert len(calls) == 1 and all(k is loaded[0] for k in loaded)
