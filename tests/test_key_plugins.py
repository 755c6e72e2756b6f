"""Key providers as plug-ins: a package that names a module in the ``encfs.key_providers``
entry-point group adds a recipient type (its stanza type and reference scheme) without
touching encfs. Installed here as a real distribution (a ``.dist-info`` with
``entry_points.txt`` on ``sys.path``) and used through a URL in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PROVIDER = '''
"""A toy "vault": keys named by ``vault:NAME``, held by the provider (here, derived from the
name and a secret the test plants in the environment)."""
import hashlib, hmac, os

from encfs.format import Stanza
from encfs.keys import RecipientType, register
from encfs.keys.base import check_shape, hkdf32, open_stanza, seal_stanza
from encfs.secret import SecretBytes


def check(stanza):
    check_shape(stanza, 8, 0, "8-byte key id")


class VaultKey:
    type = "vault"

    def __init__(self, name, source):
        self.name, self.source = name, source
        self._secret = SecretBytes(hashlib.sha256(os.environ["VAULT_SECRET"].encode() + name.encode()).digest())
        self.key_id = hashlib.sha256(b"vault-id" + name.encode()).digest()[:8]

    def wrap(self, file_key, context):
        return seal_stanza("vault", self.key_id, b"", hkdf32(self._secret.view(), context[12:28], b"vault"), file_key, context)

    def matches(self, stanza):
        return stanza.type == "vault" and hmac.compare_digest(stanza.key_id, self.key_id)

    def unwrap(self, stanza, context):
        check(stanza)
        return open_stanza(stanza, hkdf32(self._secret.view(), context[12:28], b"vault"), context)


register(RecipientType("vault", (VaultKey,), check, schemes={"vault": lambda value, ref: VaultKey(value, ref)}))
'''

SCRIPT = '''
import sys
from encfs.filesystem import EncFileSystem
import fsspec
mode, path = sys.argv[1], sys.argv[2]
if mode == "write":
    with fsspec.open(f"encfs::file://{path}", "wb", encfs={"key": "vault:team-a"}) as f:
        f.write(b"plug-in protected bytes")
elif mode == "read":
    with fsspec.open(f"encfs::file://{path}", "rb", encfs={"key": "vault:team-a"}) as f:
        sys.stdout.write(f.read().decode())
    print(" stanza=" + EncFileSystem(key="vault:team-a").open(path).header.stanzas[0].type)
elif mode == "read-other":
    EncFileSystem(key="vault:team-b").cat_file(path)
'''


def install(site: Path, module: str, source: str, entry: str = "vault") -> None:
    (site / f"{module}.py").write_text(source)
    dist = site / f"{module}-0.1.dist-info"  # (a '-' in the name would end it: 'encfs-...' would shadow encfs)
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[encfs.key_providers]\n{entry} = {module}\n")


def run(site: Path | None, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "VAULT_SECRET": "s3cret"}
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture
def site(tmp_path):
    s = tmp_path / "site"
    s.mkdir()
    install(s, "encfs_vault_demo", textwrap.dedent(PROVIDER))
    return s


def test_an_installed_provider_is_used_through_a_url(tmp_path, site):
    target = tmp_path / "data.bin"
    w = run(site, "write", str(target))
    assert w.returncode == 0, w.stderr
    assert b"plug-in protected bytes" not in target.read_bytes()
    r = run(site, "read", str(target))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "plug-in protected bytes stanza=vault"


def test_the_providers_keys_stay_its_own(tmp_path, site):
    target = tmp_path / "data.bin"
    assert run(site, "write", str(target)).returncode == 0
    other = run(site, "read-other", str(target))
    assert other.returncode != 0 and "NoMatchingKeyError" in other.stderr


def test_without_the_provider_its_files_and_references_are_clear_errors(tmp_path, site):
    target = tmp_path / "data.bin"
    assert run(site, "write", str(target)).returncode == 0
    r = run(None, "read", str(target))
    assert r.returncode != 0
    assert "unknown recipient type(s) ['vault']" in r.stderr and "plug-in that is not installed" in r.stderr
    w = run(None, "write", str(tmp_path / "other.bin"))
    assert w.returncode != 0 and "unknown key reference scheme 'vault'" in w.stderr
    assert not (tmp_path / "other.bin").exists()
    from encfs.errors import FormatError
    from encfs.filesystem import EncFileSystem

    with pytest.raises(FormatError, match="unknown recipient type.*vault"):
        EncFileSystem(key="keyfile:/nonexistent", skip_instance_cache=True).open_reader(str(target))


def test_a_broken_provider_is_named_not_skipped(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    install(site, "encfs_broken_demo", "raise ImportError('missing dependency: hvac')\n", entry="broken")
    r = run(site, "write", str(tmp_path / "x"))
    assert r.returncode != 0
    assert "key provider plug-in(s) failed to load: 'broken'" in r.stderr and "missing dependency: hvac" in r.stderr
