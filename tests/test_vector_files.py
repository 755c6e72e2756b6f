"""encfs opens every valid file in tests/vectors/encfs_v1.json and rejects every invalid one
with the named error (the independent reader in independent_reader.py does the same)."""

from __future__ import annotations

import json

import fsspec
import pytest

import encfs
from encfs.filesystem import EncFileSystem
from encfs.keys import Passphrase
from encfs.keys.refs import parse_key_text
from encfs.secret import SecretBytes

from .conftest import LOCAL_VECTORS

VECTORS = json.loads((LOCAL_VECTORS / "encfs_v1.json").read_text())


def _key(kind: str):
    if kind == "passphrase":
        return Passphrase(SecretBytes(VECTORS["keys"]["passphrase"].encode()))
    return parse_key_text(VECTORS["keys"][kind], kind)


@pytest.mark.parametrize("case", VECTORS["cases"], ids=lambda c: c["name"])
def test_vector(case):
    mem = fsspec.filesystem("memory")
    mem.pipe_file(f"/vec/{case['name']}", bytes.fromhex(case["file"]))
    fs = EncFileSystem(fs=mem, key=[_key(case["recipient"])], skip_instance_cache=True)
    if case["valid"]:
        expect = eval(case["plaintext_pattern"], {"plaintext_len": case["plaintext_len"]})
        assert fs.cat_file(f"/vec/{case['name']}") == expect
        assert fs.info(f"/vec/{case['name']}")["size"] == case["plaintext_len"]
    else:
        with pytest.raises(getattr(encfs, case["error"])):
            fs.cat_file(f"/vec/{case['name']}")


def test_vectors_cover_the_boundaries():
    lens = {c.get("plaintext_len") for c in VECTORS["cases"] if c["valid"]}
    assert {0, 1, 16383, 16384, 16385} <= lens
    assert {"key", "x25519", "passphrase"} <= {c["recipient"] for c in VECTORS["cases"]}
