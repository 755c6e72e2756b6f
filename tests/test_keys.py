"""Key references, providers, separation of duties, and keeping key bytes out of sight."""

from __future__ import annotations

import pickle

import pytest

from encfs import FormatError, KeyReferenceError, NoMatchingKeyError
from encfs.filesystem import EncFileSystem
from encfs.keys import Argon2Params, KeyRing, Passphrase, SymmetricKey, X25519Identity, key_file_text, load_reference, public_reference
from encfs.keys import passphrase as pp
from encfs.secret import SecretBytes

from .conftest import write_key


def _fs(tmp_path, **kw):
    return EncFileSystem(skip_instance_cache=True, **kw)


def test_keyfile_and_env_references_name_the_same_key(tmp_path, monkeypatch):
    ref = write_key(tmp_path / "a.key")
    monkeypatch.setenv("MY_KEY", (tmp_path / "a.key").read_text())
    _fs(tmp_path, key=ref).pipe_file(str(tmp_path / "f"), b"hello")
    assert _fs(tmp_path, key="env:MY_KEY").cat_file(str(tmp_path / "f")) == b"hello"


def test_default_key_from_environment(tmp_path, monkeypatch):
    ref = write_key(tmp_path / "a.key")
    monkeypatch.setenv("ENCFS_KEY", ref)
    fs = _fs(tmp_path)
    fs.pipe_file(str(tmp_path / "f"), b"x")
    assert _fs(tmp_path, key=ref).cat_file(str(tmp_path / "f")) == b"x"


def test_x25519_separation_of_duties(tmp_path):
    ident_ref = write_key(tmp_path / "id.key", x25519=True)
    ident = load_reference(ident_ref)
    pub = public_reference(ident.recipient.public)
    writer = _fs(tmp_path, recipients=pub)
    writer.pipe_file(str(tmp_path / "f"), b"secret data")
    with pytest.raises(NoMatchingKeyError, match="x25519:"):
        writer.cat_file(str(tmp_path / "f"))
    assert _fs(tmp_path, key=ident_ref).cat_file(str(tmp_path / "f")) == b"secret data"
    assert "x25519:" + ident.key_id.hex() in _fs(tmp_path, key=ident_ref).open(str(tmp_path / "f")).header.labels()


def test_several_recipients_each_open_the_file(tmp_path, monkeypatch):
    a = write_key(tmp_path / "a.key")
    b = write_key(tmp_path / "b.key", x25519=True)
    monkeypatch.setenv("PW", "hunter2 with spaces")
    _fs(tmp_path, key=[a, b, "passphrase:env:PW"]).pipe_file(str(tmp_path / "f"), b"multi")
    for ref in (a, b, "passphrase:env:PW"):
        assert _fs(tmp_path, key=ref).cat_file(str(tmp_path / "f")) == b"multi"
    monkeypatch.setenv("PW", "wrong")
    with pytest.raises(NoMatchingKeyError, match="wrong passphrase"):
        _fs(tmp_path, key="passphrase:env:PW").cat_file(str(tmp_path / "f"))


def test_comma_separated_references(tmp_path):
    a, b = write_key(tmp_path / "a.key"), write_key(tmp_path / "b.key")
    _fs(tmp_path, key=f"{a},{b}").pipe_file(str(tmp_path / "f"), b"ab")
    assert _fs(tmp_path, key=b).cat_file(str(tmp_path / "f")) == b"ab"


def test_passphrase_file_uses_first_line(tmp_path):
    (tmp_path / "pw").write_text("line one\nline two\n")
    _fs(tmp_path, key=f"passphrase:file:{tmp_path / 'pw'}").pipe_file(str(tmp_path / "f"), b"p")
    assert Passphrase(SecretBytes(b"line one")).unwrap(
        _fs(tmp_path, key=f"passphrase:file:{tmp_path / 'pw'}").open(str(tmp_path / "f")).header.stanzas[0],
        _fs(tmp_path, key=f"passphrase:file:{tmp_path / 'pw'}").open(str(tmp_path / "f")).header.context,
    ) is not None


def test_passphrase_parameters_travel_in_the_stanza(tmp_path, monkeypatch):
    monkeypatch.setattr(pp, "DEFAULT_PARAMS", Argon2Params(memory_kib=2048, iterations=2, lanes=2))
    monkeypatch.setenv("PW", "pw")
    fs = _fs(tmp_path, key="passphrase:env:PW")
    fs.pipe_file(str(tmp_path / "f"), b"argon")
    params = fs.open(str(tmp_path / "f")).header.stanzas[0].params
    assert int.from_bytes(params[16:20], "big") == 2048 and int.from_bytes(params[20:24], "big") == 2
    monkeypatch.setattr(pp, "DEFAULT_PARAMS", Argon2Params(memory_kib=1024, iterations=1, lanes=1))
    # a reader whose default is cheaper refuses the costlier file unless its bound is raised
    with pytest.raises(FormatError, match="more than this reader allows"):
        _fs(tmp_path, key="passphrase:env:PW").cat_file(str(tmp_path / "f"))
    from encfs.secret import SecretBytes

    raised = pp.Passphrase(SecretBytes(b"pw"), max_params=Argon2Params(memory_kib=2048, iterations=2, lanes=2))
    assert _fs(tmp_path, key=raised).cat_file(str(tmp_path / "f")) == b"argon"


def test_default_argon2_parameters_are_rfc9106():
    assert pp.Argon2Params() == Argon2Params(memory_kib=65536, iterations=3, lanes=4)


@pytest.mark.parametrize("m,t,p", [(4 * 1024 * 1024 + 1, 1, 1), (1024, 0, 1), (1024, 65, 1), (1024, 1, 0), (8, 1, 2)])
def test_hostile_argon2_parameters_are_refused_before_running(m, t, p):
    with pytest.raises(FormatError, match="argon2"):
        Argon2Params(m, t, p).check()


@pytest.mark.parametrize(
    "ref,match",
    [
        ("nonsense", "malformed"),
        ("vault:secret/x", "unknown key reference scheme"),
        ("kms:arn", "expected kms:arn:aws:kms"),
        ("env:DEFINITELY_NOT_SET_123", "not set"),
        ("keyfile:/nonexistent/key", "cannot read"),
        ("x25519:abc", "32 bytes|base64"),
        ("passphrase:what:x", "passphrase"),
    ],
)
def test_bad_references_are_typed_errors(ref, match):
    with pytest.raises(KeyReferenceError, match=match):
        load_reference(ref)


def test_bad_key_files(tmp_path):
    (tmp_path / "two").write_text("encfs-key-v1:" + "A" * 43 + "\nencfs-key-v1:" + "A" * 43 + "\n")
    (tmp_path / "junk").write_text("hello\n")
    (tmp_path / "short").write_text("encfs-key-v1:AAAA\n")
    for name, match in (("two", "exactly one"), ("junk", "not an encfs key file"), ("short", "32 bytes")):
        with pytest.raises(KeyReferenceError, match=match):
            load_reference(f"keyfile:{tmp_path / name}")


def test_key_bytes_never_in_repr_errors_or_pickles(tmp_path):
    sym = SymmetricKey.generate()
    ident = X25519Identity.generate()
    secrets_hex = [sym.secret.bytes().hex(), ident.secret.bytes().hex()]
    texts = [repr(sym), str(sym), repr(ident), repr(sym.secret), repr(KeyRing([sym, ident]))]
    for t in texts:
        for s in secrets_hex:
            assert s not in t and s[:16] not in t
    with pytest.raises(TypeError, match="reference"):
        pickle.dumps(sym.secret)
    (tmp_path / "k").write_text(key_file_text(sym))
    fs = _fs(tmp_path, key=f"keyfile:{tmp_path / 'k'}")
    fs.pipe_file(str(tmp_path / "f"), b"x")
    other = _fs(tmp_path, key=write_key(tmp_path / "o.key"))
    with pytest.raises(NoMatchingKeyError) as e:
        other.cat_file(str(tmp_path / "f"))
    b64 = key_file_text(sym).split(":")[1].strip()
    assert b64 not in str(e.value) and secrets_hex[0] not in str(e.value)


def test_wipe_zeroes_key_material(tmp_path):
    ref = write_key(tmp_path / "k.key")
    fs = _fs(tmp_path, key=ref)
    fs.pipe_file(str(tmp_path / "f"), b"x")
    key = fs.keyring._loaded[ref]
    view = key.secret.view()
    assert any(view)
    fs.wipe_keys()
    assert not any(view) and key.secret.wiped
    view.release()
    assert fs.cat_file(str(tmp_path / "f")) == b"x", "keys reload from their reference after a wipe"


def test_file_close_wipes_its_chunk_key(tmp_path):
    fs = _fs(tmp_path, key=write_key(tmp_path / "k.key"))
    fs.pipe_file(str(tmp_path / "f"), b"x" * 100)
    f = fs.open(str(tmp_path / "f"))
    secret = f._r._keys.key
    view = secret.view()
    assert any(view)
    f.close()
    assert secret.wiped and not any(view)
    view.release()


def test_public_only_recipient_cannot_be_an_identity(tmp_path):
    pub = public_reference(X25519Identity.generate().recipient.public)
    assert KeyRing(pub).identities() == []


# -- moved from tests/test_review_fixes.py (the first and second reviews' findings) ------------

import os  # noqa: E402
import stat  # noqa: E402
import struct  # noqa: E402

import fsspec  # noqa: E402

from encfs import format as fmt  # noqa: E402


@pytest.mark.parametrize("m,t,p", [(4 * 1024 * 1024, 1, 1), ((1 << 20) + 8, 1, 1), (1 << 20, 5, 1), (1024, 11, 1), (1024, 1, 17)])
def test_argon2_bounds_are_tight(m, t, p):
    """From the first review (tests/test_review_fixes.py, commit 927ed62): the Argon2id bounds are
    tight: just past each limit is refused, the limits themselves pass.
    """
    with pytest.raises(FormatError, match="argon2"):
        Argon2Params(m, t, p).check()
    Argon2Params(1 << 20, 4, 16).check()


def test_two_passphrase_stanzas_are_refused(tmp_path, monkeypatch, keyref):
    """From the first review (tests/test_review_fixes.py, commit 927ed62), extended in the second: at
    most one passphrase stanza, enforced on write, on rewrap and on read.
    """
    from fsspec.implementations.local import LocalFileSystem

    from encfs.rewrap import rewrap

    monkeypatch.setenv("P1", "one")
    monkeypatch.setenv("P2", "two")
    with pytest.raises(KeyReferenceError, match="at most one passphrase"):
        EncFileSystem(key=["passphrase:env:P1", "passphrase:env:P2"], skip_instance_cache=True).pipe_file(f"{tmp_path}/f", b"x")
    assert not os.path.exists(f"{tmp_path}/f")
    fs = EncFileSystem(key=[keyref, "passphrase:env:P1"], skip_instance_cache=True)
    fs.pipe_file(f"{tmp_path}/f", b"x")
    before = open(f"{tmp_path}/f", "rb").read()
    with pytest.raises(FormatError, match="at most one passphrase"):
        rewrap(LocalFileSystem(), f"{tmp_path}/f", KeyRing(keyref), add=[load_reference("passphrase:env:P2")])
    assert open(f"{tmp_path}/f", "rb").read() == before
    h = fmt.parse(before)
    two = [h.stanzas[1], h.stanzas[1], h.stanzas[0]]
    enc_body = struct.pack(">H", 3) + b"".join(st.encode() for st in two)
    head = before[:32] + enc_body + h.mac
    open(f"{tmp_path}/g", "wb").write(head + bytes(h.length - len(head)) + before[h.length :])
    with pytest.raises(FormatError, match="more than one passphrase"):
        EncFileSystem(key=keyref, skip_instance_cache=True).cat_file(f"{tmp_path}/g")


def test_instance_cache_separates_keys_and_environment(monkeypatch, tmp_path):
    """From the first review (tests/test_review_fixes.py, commit 927ed62): fsspec's instance cache
    never hands one key's filesystem to another key or ``$ENCFS_KEY``.
    """
    a = EncFileSystem(key=Passphrase(SecretBytes(b"alice")))
    b = EncFileSystem(key=Passphrase(SecretBytes(b"bob")))
    assert a is not b
    monkeypatch.setenv("ENCFS_KEY", "env:ONE")
    one = fsspec.filesystem("encfs")
    monkeypatch.setenv("ENCFS_KEY", "env:TWO")
    assert fsspec.filesystem("encfs") is not one


@pytest.mark.parametrize(
    "ref",
    ["encfs-key-v1:" + "A" * 43, "keyfile:encfs-key-v1:" + "B" * 43, "Zm9vYmFyYmF6cXV4eHh4eHh4eHh4eHh4eHh4eHh4eHg", "passphrase:hunter2-literal"],
)
def test_misused_references_never_echo_their_value(ref):
    """From the first review (tests/test_review_fixes.py, commit 927ed62): a key or passphrase given
    where a reference belongs is refused without echoing it.
    """
    with pytest.raises(KeyReferenceError) as e:
        load_reference(ref)
    value = ref.split(":")[-1]
    assert value not in str(e.value)


def test_passphrase_file_first_line_is_split_on_newline_only(tmp_path):
    """From the first review (tests/test_review_fixes.py, commit 927ed62): ``passphrase:file:`` takes
    the first line, split on newlines only (a form feed stays).
    """
    (tmp_path / "pw").write_bytes(b"pass\x0cword\r\nsecond\n")
    key = load_reference(f"passphrase:file:{tmp_path / 'pw'}")
    assert bytes(key._pass.view()) == b"pass\x0cword"


def test_noncanonical_base64_keys_are_refused(tmp_path):
    """From the first review (tests/test_review_fixes.py, commit 927ed62): non-canonical base64 in an
    ``x25519:`` reference is refused.
    """
    good = "A" * 42 + "E"
    with pytest.raises(KeyReferenceError, match="canonical|43"):
        load_reference("x25519:" + "A" * 42 + "B")
    with pytest.raises(KeyReferenceError, match="43"):
        load_reference("x25519:" + "A" * 42 + "=")
    import base64

    assert load_reference("x25519:" + good).public == base64.urlsafe_b64decode(good + "=")


def test_wrong_passphrase_does_not_match_another_key(tmp_path, monkeypatch):
    """From the first review (tests/test_review_fixes.py, commit 927ed62): a wrong passphrase is
    ``NoMatchingKeyError``, never another key's match.
    """
    monkeypatch.setenv("P", "right")
    EncFileSystem(key="passphrase:env:P", skip_instance_cache=True).pipe_file(f"{tmp_path}/f", b"x")
    monkeypatch.setenv("P", "wrong")
    with pytest.raises(NoMatchingKeyError):
        EncFileSystem(key="passphrase:env:P", skip_instance_cache=True).cat_file(f"{tmp_path}/f")


def test_keygen_never_overwrites_without_force(tmp_path):
    """From the second review (tests/test_review_fixes.py, commit 8c32070): ``encfs keygen`` never
    overwrites a key file without ``--force``, and writes it 0600.
    """
    from encfs.cli import main

    assert main(["keygen", "-o", str(tmp_path / "k")]) == 0
    first = (tmp_path / "k").read_text()
    assert main(["keygen", "-o", str(tmp_path / "k")]) == 1
    assert (tmp_path / "k").read_text() == first
    assert main(["keygen", "-o", str(tmp_path / "k"), "--force"]) == 0
    assert (tmp_path / "k").read_text() != first
    assert stat.S_IMODE(os.stat(tmp_path / "k").st_mode) == 0o600
