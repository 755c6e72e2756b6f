"""Storage options go where fsspec users expect them: flat options of the target (s3fs's
``secret``, ``endpoint_url``, ``client_kwargs``, even its access ``key``) configure the target
behind ``encfs::``, and a misspelt encfs option is an error, not silently ignored."""

from __future__ import annotations

import os

import fsspec
import pytest

from encfs import ConfigError
from encfs.filesystem import EncFileSystem


def test_unknown_option_is_refused_with_a_suggestion(keyref):
    with pytest.raises(ConfigError, match="did you mean 'key' for 'keys'") as e:
        EncFileSystem(target_protocol="file", keys=keyref, skip_instance_cache=True)
    assert "valid:" in str(e.value) and "allow_plaintext" in str(e.value)
    with pytest.raises(ConfigError, match="allow_plaintext"):
        fsspec.open("encfs::memory://x", "rb", encfs={"key": keyref, "allow_plaintxt": True}).open()


def test_options_of_a_ready_target_cannot_be_set_here(keyref):
    with pytest.raises(ConfigError, match="ready target"):
        EncFileSystem(fs=fsspec.filesystem("memory"), key=keyref, auto_mkdir=True, skip_instance_cache=True)


def test_flat_target_options_reach_the_local_target(tmp_path, keyref):
    fs = EncFileSystem(target_protocol="file", key=keyref, auto_mkdir=True, skip_instance_cache=True)
    assert fs.fs.auto_mkdir is True
    explicit = EncFileSystem(target_protocol="file", target_options={"auto_mkdir": False}, auto_mkdir=True, key=keyref, skip_instance_cache=True)
    assert explicit.fs.auto_mkdir is False, "an explicit target_options entry wins"


def test_flat_s3_options_configure_s3fs_behind_encfs(s3, keyref):
    _, bucket, opts = s3
    endpoint = opts["client_kwargs"]["endpoint_url"]
    url = f"encfs::s3://{bucket}/flat.bin"
    flat = {"key": keyref, "endpoint_url": endpoint, "client_kwargs": {"region_name": "us-east-1"}, "skip_instance_cache": True}
    with fsspec.open(url, "wb", **flat) as f:
        f.write(b"through flat options")
    with fsspec.open(url, "rb", **flat) as f:
        assert f.read() == b"through flat options"
    raw = fsspec.filesystem("s3", **opts, skip_instance_cache=True).cat_file(f"{bucket}/flat.bin")
    assert raw.startswith(b"\x89ENCFS") and b"through flat options" not in raw


def test_s3_access_key_passed_flat_goes_to_s3fs(s3, keyref, monkeypatch):
    """``key`` that is no encfs key reference is s3fs's access key id; the encfs key then comes
    from ``$ENCFS_KEY``."""
    _, bucket, opts = s3
    monkeypatch.setenv("ENCFS_KEY", keyref)
    endpoint = opts["client_kwargs"]["endpoint_url"]
    fs, path = fsspec.core.url_to_fs(f"encfs::s3://{bucket}/k.bin", key="testing", secret="testing", endpoint_url=endpoint, skip_instance_cache=True)
    assert fs.fs.key == "testing"
    fs.pipe_file(path, b"env key")
    assert fs.cat_file(path) == b"env key"
    assert os.environ["ENCFS_KEY"] == keyref
