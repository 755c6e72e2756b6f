"""Recipient types are one registration each (encfs/keys/registry.py): a new type registered
with one call is loaded by reference, accepted by KeyRing, written and opened; what is not
registered stays an error; the per-header limits are checked by one function everywhere."""

from __future__ import annotations

import os

import pytest

from encfs import format as fmt
from encfs.errors import FormatError, KeyReferenceError, NoMatchingKeyError
from encfs.keys import KeyRing, Passphrase, SymmetricKey, X25519Identity, X25519Recipient, load_reference, new_file_key, registry
from encfs.keys.base import hkdf32, open_stanza, seal_stanza
from encfs.secret import SecretBytes


class ToyKey:
    """A recipient type defined outside encfs, as a plug-in (or the KMS type) would be: a
    32-byte secret looked up by name, wrapping with the common AES-GCM stanza body."""

    type = "toy"

    def __init__(self, name: str, secret: bytes, source: str = "<memory>"):
        self.key_id = name.encode()
        self._secret = SecretBytes(secret)
        self.source = source

    def _wrap_key(self) -> SecretBytes:
        return hkdf32(self._secret.view(), b"", b"toy wrap")

    def wrap(self, file_key, context):
        return seal_stanza(self.type, self.key_id, b"", self._wrap_key(), file_key, context)

    def matches(self, stanza):
        return stanza.type == self.type and stanza.key_id == self.key_id

    def unwrap(self, stanza, context):
        check_toy_stanza(stanza)
        return open_stanza(stanza, self._wrap_key(), context)

    def wipe(self):
        self._secret.wipe()


TOY_SECRETS = {"alpha": bytes(range(32)), "beta": bytes(range(1, 33))}


def check_toy_stanza(stanza):
    if stanza.params or not stanza.key_id:
        raise FormatError("malformed toy stanza")


def load_toy(value: str, ref: str) -> ToyKey:
    if value not in TOY_SECRETS:
        raise KeyReferenceError(f"{ref}: no such toy key")
    return ToyKey(value, TOY_SECRETS[value], ref)


@pytest.fixture
def isolated_registry(monkeypatch):
    """Registrations made by a test are undone after it."""
    monkeypatch.setattr(registry, "_TYPES", dict(registry._TYPES))
    monkeypatch.setattr(registry, "_SCHEMES", dict(registry._SCHEMES))
    monkeypatch.setattr(registry, "_CLASSES", registry._CLASSES)


@pytest.fixture
def toy(isolated_registry):
    """The toy type, registered by the one call a plug-in makes."""
    return registry.register(registry.RecipientType("toy", (ToyKey,), check_toy_stanza, schemes={"toy": load_toy}, max_per_header=1))


def _header(ring: KeyRing) -> tuple[bytes, SecretBytes]:
    file_key = new_file_key()
    h = fmt.Header(fmt.new_file_id(), [])
    h.stanzas = [r.wrap(file_key, h.context) for r in ring.recipients()]
    return fmt.seal(h, file_key), file_key


def _open(ring: KeyRing, raw: bytes) -> bytes:
    h = fmt.parse(raw)
    key = ring.unwrap(h)
    fmt.verify(h, key)
    return key.bytes()


# -- the built-in types -----------------------------------------------------------------------


def test_builtin_types_are_registered():
    assert registry.names() == ["key", "kms", "passphrase", "sig", "x25519"]
    assert registry.get("sig").classes == () and registry.get("sig").max_per_header == 4
    assert {"keyfile", "env", "kms", "passphrase", "x25519"} <= set(registry.schemes())
    assert [t.key_file_prefix for t in registry.key_file_types()] == ["encfs-key-v1:", "encfs-x25519-identity-v1:"]
    assert registry.get("passphrase").max_per_header == 1
    assert registry.get("key").max_per_header is None and registry.get("x25519").max_per_header is None
    for obj in (SymmetricKey.generate(), X25519Identity.generate(), X25519Identity.generate().recipient, Passphrase(SecretBytes(b"pw"))):
        assert registry.is_key_object(obj)
    for obj in ("keyfile:x", b"bytes", object(), None):
        assert not registry.is_key_object(obj)


def test_builtin_stanza_shape_checks_are_registered():
    bad = {
        "key": (fmt.Stanza("key", b"1234567", b"", b"x"), "malformed key stanza"),
        "x25519": (fmt.Stanza("x25519", b"12345678", b"short", b"x"), "malformed x25519 stanza"),
        "passphrase": (fmt.Stanza("passphrase", b"", b"\x00" * 27, b"x"), "malformed passphrase stanza"),
    }
    for name, (stanza, match) in bad.items():
        with pytest.raises(FormatError, match=match):
            registry.get(name).check_stanza(stanza)
    costly = fmt.Stanza("passphrase", b"", bytes(16) + (2 << 20).to_bytes(4, "big") + (1).to_bytes(4, "big") * 2, b"x")
    with pytest.raises(FormatError, match="argon2 memory"):
        registry.get("passphrase").check_stanza(costly)
    registry.get("key").check_stanza(fmt.Stanza("key", b"12345678", b"", b"x"))
    registry.get("x25519").check_stanza(fmt.Stanza("x25519", b"12345678", bytes(32), b"x"))


def test_names_are_never_registered_twice(isolated_registry):
    for rtype in (
        registry.RecipientType("key", (ToyKey,), check_toy_stanza),
        registry.RecipientType("toy", (ToyKey,), check_toy_stanza, schemes={"x25519": load_toy}),
        registry.RecipientType("toy", (ToyKey,), check_toy_stanza, key_file_prefix="encfs-key-v1:", from_secret=SymmetricKey),
        registry.RecipientType("Toy", (ToyKey,), check_toy_stanza),
        registry.RecipientType("toy", (ToyKey,), check_toy_stanza, key_file_prefix="toy-v1:"),
        registry.RecipientType("toy", (ToyKey,), check_toy_stanza, schemes={"no_underscores": load_toy}),
    ):
        with pytest.raises(ValueError):
            registry.register(rtype)
    with pytest.raises(ValueError, match="already registered"):
        registry.register_scheme("keyfile", load_toy)
    assert registry.get("toy") is None and registry.loader("no_underscores") is None


# -- a new type is one registration ---------------------------------------------------------


def test_unregistered_type_and_scheme_are_errors_not_fallbacks(tmp_path):
    with pytest.raises(KeyReferenceError, match="unknown key reference scheme 'toy'.*keyfile:"):
        load_reference("toy:alpha")
    sym = SymmetricKey.generate()
    file_key = new_file_key()
    h = fmt.Header(fmt.new_file_id(), [])
    h.stanzas = [ToyKey("alpha", TOY_SECRETS["alpha"]).wrap(file_key, h.context), sym.wrap(file_key, h.context)]
    raw = fmt.seal(h, file_key)
    with pytest.raises(FormatError, match=r"unknown recipient type\(s\) \['toy'\]"):
        KeyRing(sym).unwrap(fmt.parse(raw))
    for spec in (ToyKey("alpha", TOY_SECRETS["alpha"]), [sym, ToyKey("alpha", TOY_SECRETS["alpha"])]):
        with pytest.raises(TypeError, match="registered type, got ToyKey"):
            KeyRing(spec)


def test_registered_type_is_loaded_written_and_opened(toy):
    ring = KeyRing("toy:alpha")
    (recipient,) = ring.recipients()
    assert isinstance(recipient, ToyKey) and recipient.source == "toy:alpha"
    raw, file_key = _header(ring)
    assert [s.type for s in fmt.parse(raw).stanzas] == ["toy"]
    assert _open(ring, raw) == file_key.bytes()
    assert _open(KeyRing(ToyKey("alpha", TOY_SECRETS["alpha"])), raw) == file_key.bytes(), "key objects are accepted as is"
    with pytest.raises(NoMatchingKeyError, match="toy:"):
        _open(KeyRing("toy:beta"), raw)
    with pytest.raises(KeyReferenceError, match="toy:gamma: no such toy key"):
        load_reference("toy:gamma")


def test_registered_type_sits_beside_the_builtin_ones(toy, tmp_path, monkeypatch):
    sym = SymmetricKey.generate()
    ident = X25519Identity.generate()
    monkeypatch.setenv("PW", "pw")
    ring = KeyRing([sym, "toy:alpha", X25519Recipient(ident.recipient.public), "passphrase:env:PW"])
    raw, file_key = _header(ring)
    assert [s.type for s in fmt.parse(raw).stanzas] == ["key", "toy", "x25519", "passphrase"]
    for reader in (KeyRing(sym), KeyRing("toy:alpha"), KeyRing(ident), KeyRing("passphrase:env:PW")):
        assert _open(reader, raw) == file_key.bytes()


def test_registered_stanza_shape_check_runs_on_unwrap(toy):
    ring = KeyRing("toy:alpha")
    raw, _ = _header(ring)
    h = fmt.parse(raw)
    h.stanzas = [fmt.Stanza("toy", b"alpha", b"extra", h.stanzas[0].body)]
    with pytest.raises(FormatError, match="malformed toy stanza"):
        ring.unwrap(h)


def test_registered_type_through_the_filesystem(toy, tmp_path):
    fs_mod = pytest.importorskip("encfs.filesystem")
    fs = fs_mod.EncFileSystem(key="toy:alpha", skip_instance_cache=True)
    fs.pipe_file(str(tmp_path / "f"), b"plug-in data")
    assert fs_mod.EncFileSystem(key="toy:alpha", skip_instance_cache=True).cat_file(str(tmp_path / "f")) == b"plug-in data"
    assert fs_mod.EncFileSystem(key=ToyKey("alpha", TOY_SECRETS["alpha"]), skip_instance_cache=True).cat_file(str(tmp_path / "f")) == b"plug-in data"


# -- the per-header limit: one function, each caller's error type ---------------------------


@pytest.mark.parametrize("name", ["passphrase", "toy"])
def test_per_header_limit_is_one_check_with_each_callers_error(toy, monkeypatch, name):
    monkeypatch.setenv("P1", "one")
    monkeypatch.setenv("P2", "two")
    refs = {"passphrase": ["passphrase:env:P1", "passphrase:env:P2"], "toy": ["toy:alpha", "toy:beta"]}[name]
    sym = SymmetricKey.generate()
    # configuring recipients: KeyReferenceError
    with pytest.raises(KeyReferenceError, match=f"more than one {name} recipient: a header holds at most one {name} stanza"):
        KeyRing([sym, *refs]).recipients()
    # sealing a header: FormatError
    file_key = new_file_key()
    h = fmt.Header(fmt.new_file_id(), [])
    h.stanzas = [load_reference(r).wrap(file_key, h.context) for r in refs] + [sym.wrap(file_key, h.context)]
    with pytest.raises(FormatError, match=f"more than one {name} stanza: a header holds at most one {name} stanza"):
        fmt.seal(h, file_key)
    # opening a header: FormatError, before any identity is tried
    ok = fmt.Header(h.file_id, h.stanzas[1:])
    raw = bytearray(fmt.seal(ok, file_key))
    two = fmt.Header(h.file_id, h.stanzas)
    body = len(two.stanzas).to_bytes(2, "big") + b"".join(s.encode() for s in two.stanzas)
    raw[32 : 32 + len(body) + fmt.MAC_SIZE] = body + ok.mac  # the stanzas start at offset 32
    with pytest.raises(FormatError, match=f"more than one {name} stanza"):
        KeyRing(sym).unwrap(fmt.parse(bytes(raw)))


def test_per_header_limit_counts_only_limited_types():
    registry.check_per_header(["key"] * 10 + ["x25519"] * 10 + ["passphrase"] + ["unregistered"] * 3)
    with pytest.raises(KeyReferenceError, match="more than one passphrase recipient"):
        registry.check_per_header(["passphrase", "key", "passphrase"], KeyReferenceError, "recipient")


# -- $ENCFS_KEY and the KeyRing surface ------------------------------------------------------


def test_keyring_default_comes_from_encfs_env(monkeypatch):
    from encfs import env

    pub = X25519Identity.generate().recipient
    monkeypatch.setenv(env.KEY, f" x25519:{pub_b64(pub)} ")
    (r,) = KeyRing().recipients()
    assert isinstance(r, X25519Recipient) and r.public == pub.public
    with pytest.raises(NoMatchingKeyError, match="no encryption key configured"):
        KeyRing(identities=[]).recipients()  # a side given explicitly: no default
    monkeypatch.setattr(env, "default_key", lambda: None)
    with pytest.raises(NoMatchingKeyError, match="no encryption key configured"):
        KeyRing().recipients()  # read through env.default_key(), not os.environ directly


def pub_b64(recipient: X25519Recipient) -> str:
    from encfs.keys.sources import b64encode

    return b64encode(recipient.public)


def test_keyring_has_no_references_method():
    assert not hasattr(KeyRing, "references")


def test_key_modules_wipe_with_cleanse_only():
    """Buffers are zeroed by ``securemem.cleanse``, not by slice assignment, in the key code."""
    import encfs.format
    import encfs.keys

    folder = os.path.dirname(encfs.keys.__file__)
    for path in [encfs.format.__file__] + [os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".py")]:
        with open(path, encoding="utf-8") as f:
            assert "[:] = bytes(len(" not in f.read(), path
