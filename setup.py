"""Build hook for the optional native extension ``encfs._native`` (cffi + OpenSSL libcrypto).

Metadata lives in pyproject.toml. When the extension cannot be built (no C compiler, no
OpenSSL headers or libcrypto, no cffi), the install still succeeds without it, a warning
says why, and encfs uses the pure-Python ``python`` cipher backend.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

_WARNING = """
******************************************************************************
WARNING: the native extension {name} was not built: {why}
encfs still works, with the pure-Python cipher backend (slower, holds the GIL).
To build it, install a C compiler and the OpenSSL 3 headers (Debian/Ubuntu:
'apt-get install gcc libssl-dev') and reinstall.
******************************************************************************
"""


def _warn(name: str, why: str) -> None:
    print(_WARNING.format(name=name, why=why), file=sys.stderr, flush=True)


class OptionalBuildExt(build_ext):
    """build_ext whose extensions are optional: a failed one is dropped, not fatal."""

    def build_extensions(self) -> None:
        built = []
        for ext in self.extensions:
            try:
                self.build_extension(ext)
            except Exception as exc:  # compiler missing, headers missing, link error
                _warn(ext.name, f"{type(exc).__name__}: {exc}")
            else:
                built.append(ext)
        # Later steps (copying in place, listing outputs) must not look for what failed.
        self.extensions[:] = built


_BUILDER = "native/build_native.py"


def _cffi_modules() -> list[str]:
    if not os.path.exists(_BUILDER):  # e.g. an sdist made without it
        _warn("encfs._native", f"{_BUILDER} is missing")
        return []
    missing = [m for m in ("cffi", "pycparser") if importlib.util.find_spec(m) is None]
    if missing:
        _warn("encfs._native", f"{' and '.join(missing)} not installed")
        return []
    return [f"{_BUILDER}:ffibuilder"]


setup(cffi_modules=_cffi_modules(), cmdclass={"build_ext": OptionalBuildExt})
