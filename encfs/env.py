"""The ``ENCFS_*`` environment variables, read in one place and checked: a bad value is a
``ConfigError`` that names the variable and what it accepts, never a bare ``ValueError``."""

from __future__ import annotations

import os

from .errors import ConfigError

KEY = "ENCFS_KEY"
SIGNERS = "ENCFS_SIGNERS"
BACKEND = "ENCFS_BACKEND"
THREADS = "ENCFS_THREADS"
NATIVE_MIN_CHUNKS = "ENCFS_NATIVE_MIN_CHUNKS"
SECUREMEM = "ENCFS_SECUREMEM"
ARGON2_MAX_MEMORY_KIB = "ENCFS_ARGON2_MAX_MEMORY_KIB"
IO_THREADS = "ENCFS_IO_THREADS"
PART_SIZE = "ENCFS_PART_SIZE"
AES = "ENCFS_AES"


def env_int(name: str, default: int, minimum: int) -> int:
    """``$name`` as an integer >= ``minimum``; ``default`` when unset or empty."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text, 10)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {text!r}")
    return value


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    """``$name`` lower-cased, one of ``choices``; ``default`` when unset or empty."""
    text = os.environ.get(name, "").strip().lower()
    if not text:
        return default
    if text not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {text!r}")
    return text


def default_key() -> str | None:
    """``$ENCFS_KEY``: comma-separated key references used when none are passed."""
    return os.environ.get(KEY) or None


def default_signers() -> str | None:
    """``$ENCFS_SIGNERS``: comma-separated trusted writers' public keys (``ed25519:...``) used when
    ``signers=`` is not passed: a host-wide policy that every file read must be signed."""
    return os.environ.get(SIGNERS, "").strip() or None
