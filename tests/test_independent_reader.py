"""Runs every case of tests/vectors/encfs_v1.json through the independent reader.

The reader (tests/independent_reader.py) was written from docs/FORMAT.md alone;
it must not import anything from the encfs package.
"""

import json
import os
import pathlib
import sys

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

sys.path.insert(0, os.path.dirname(__file__))
import independent_reader as ir  # noqa: E402

VECTORS = json.loads((pathlib.Path(__file__).parent / "vectors" / "encfs_v1.json").read_text())
CASES = VECTORS["cases"]
VALID = [c for c in CASES if c["valid"]]
INVALID = [c for c in CASES if not c["valid"]]

SYM_KEY = ir.parse_sym_key_file(VECTORS["keys"]["key"])
X25519_PRIVATE = ir.parse_x25519_identity_file(VECTORS["keys"]["x25519"])
PASSPHRASE = VECTORS["keys"]["passphrase"].encode("utf-8")

# Keys that are well-formed but not the vectors' keys.
WRONG = {
    "key": {"sym_key": bytes(range(32))},
    "x25519": {"x25519_private": bytes(range(1, 33))},
    "passphrase": {"passphrase": b"incorrect horse battery staple"},
}


def right_key(recipient):
    return {
        "key": {"sym_key": SYM_KEY},
        "x25519": {"x25519_private": X25519_PRIVATE},
        "passphrase": {"passphrase": PASSPHRASE},
    }[recipient]


def expected_plaintext(case):
    return eval(case["plaintext_pattern"], {"plaintext_len": case["plaintext_len"]})


def by_name(cases):
    return pytest.mark.parametrize("case", cases, ids=[c["name"] for c in cases])


@by_name(VALID)
def test_valid_case_opens(case):
    data = bytes.fromhex(case["file"])
    got = ir.open_encfs(data, **right_key(case["recipient"]))
    want = expected_plaintext(case)
    assert len(want) == case["plaintext_len"]
    assert got == want


@by_name(VALID)
def test_valid_case_wrong_key_is_no_matching_key(case):
    data = bytes.fromhex(case["file"])
    with pytest.raises(ir.NoMatchingKeyError):
        ir.open_encfs(data, **WRONG[case["recipient"]])


@by_name(VALID)
def test_valid_case_no_key_is_no_matching_key(case):
    with pytest.raises(ir.NoMatchingKeyError):
        ir.open_encfs(bytes.fromhex(case["file"]))


@by_name(INVALID)
def test_invalid_case_raises_named_error(case):
    data = bytes.fromhex(case["file"])
    with pytest.raises(Exception) as exc_info:
        ir.open_encfs(data, **right_key(case["recipient"]))
    assert type(exc_info.value).__name__ == case["error"], (case["note"], exc_info.value)
    # The class must be the reader's own, not a leaked library exception.
    assert type(exc_info.value) in (ir.FormatError, ir.IntegrityError, ir.NoMatchingKeyError)


def test_error_classes_are_distinct_and_local():
    classes = (ir.FormatError, ir.IntegrityError, ir.NoMatchingKeyError)
    assert len(set(classes)) == 3
    assert all(c.__module__ == ir.__name__ for c in classes)


def test_x25519_identity_matches_its_public_key_comment():
    # The identity file's comment names the public key; the private key must produce it.
    comment = [ln for ln in VECTORS["keys"]["x25519"].splitlines() if "public key:" in ln][0]
    public_b64 = comment.split("x25519:", 1)[1].strip()
    pub = X25519PrivateKey.from_private_bytes(X25519_PRIVATE).public_key()
    raw = pub.public_bytes(Encoding.Raw, PublicFormat.Raw)
    import base64
    assert base64.urlsafe_b64encode(raw).rstrip(b"=").decode() == public_b64


def test_key_file_rejects_garbage():
    with pytest.raises(ValueError):
        ir.parse_sym_key_file("encfs-key-v1:tooshort\n")
    with pytest.raises(ValueError):
        ir.parse_sym_key_file(VECTORS["keys"]["x25519"])


@pytest.mark.parametrize("recipient", ["key", "x25519", "passphrase"])
def test_three_recipients_opens_with_each_identity(recipient):
    case = next(c for c in CASES if c["name"] == "three-recipients-20000")
    got = ir.open_encfs(bytes.fromhex(case["file"]), **right_key(recipient))
    assert got == expected_plaintext(case)
