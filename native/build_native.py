"""cffi builder (API mode, out-of-line) for ``encfs._native``.

Used by setup.py through ``cffi_modules``, or directly:
``python native/build_native.py [TMPDIR]`` compiles into TMPDIR (default native/_build).
``ENCFS_NATIVE_SANITIZE=1`` adds ``-fsanitize=address,undefined -fno-omit-frame-pointer -g``
to compile and link; such a build must be loaded with libasan in ``LD_PRELOAD``.

Intel IPsec-MB (Debian/Ubuntu: ``libipsec-mb-dev``) is linked in from its static archive
``libIPSec_MB.a`` when the compiler finds it and ``intel-ipsec-mb.h``, so a built extension
never needs the package at run time; ``ENCFS_IPSEC_MB=0`` builds without it. Without it the
extension runs AES-256-GCM on OpenSSL only.

API-mode calls release the GIL for the duration of every C call (cffi wraps each call in
``Py_BEGIN_ALLOW_THREADS`` / ``Py_END_ALLOW_THREADS``; see the generated ``_native.c``), so
Python threads keep running while a batch is decrypted.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cffi

HERE = Path(__file__).resolve().parent

HEADER = HERE / "encfs_native.h"


def cdef_from_header(text: str) -> str:
    """The cffi ``cdef`` for ``encfs_native.h``: its declarations as written, each
    ``#define ENCFS_X value`` as ``#define ENCFS_X ...`` (cffi takes the value from the
    compiler), comments, includes and the include guard left out. The header is the one
    statement of the C API; nothing restates it here."""
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    out: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            out.append(line.rstrip())
            continue
        define = re.fullmatch(r"#\s*define\s+(ENCFS_\w+)\s+\S.*", stripped)
        if define:
            out.append(f"#define {define.group(1)} ...")
    return "\n".join(line for line in out if line) + "\n"


CDEF = cdef_from_header(HEADER.read_text())


def _compiler() -> str | None:
    cc = os.environ.get("CC", "").split()
    return shutil.which(cc[0]) if cc else shutil.which("cc") or shutil.which("gcc")


def ipsec_mb_archive() -> str | None:
    """The path of ``libIPSec_MB.a`` when IPsec-MB can be linked in: header and static
    archive both found by the compiler, and ``ENCFS_IPSEC_MB`` is not ``0``."""
    if os.environ.get("ENCFS_IPSEC_MB", "").strip() == "0":
        return None
    cc = _compiler()
    if cc is None:
        return None
    try:
        header = subprocess.run([cc, "-E", "-x", "c", "-"], input="#include <intel-ipsec-mb.h>\n", capture_output=True, text=True, timeout=60)
        found = subprocess.run([cc, "-print-file-name=libIPSec_MB.a"], capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return found if header.returncode == 0 and os.path.isabs(found) and os.path.isfile(found) else None


def _flags() -> tuple[list[str], list[str]]:
    compile_args = ["-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    link_args: list[str] = []
    if os.environ.get("ENCFS_NATIVE_SANITIZE") == "1":
        sanitize = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
        compile_args += sanitize + ["-O1", "-fno-sanitize-recover=undefined"]
        link_args += sanitize
    else:
        compile_args += ["-O2"]
    return compile_args, link_args


def make_builder(absolute: bool = False) -> cffi.FFI:
    """A fresh FFI builder for ``encfs._native`` (flags read from the environment now).

    setuptools insists on source paths relative to setup.py's folder (the working
    directory when it runs); ``ffi.compile(tmpdir=...)`` changes directory, so direct
    builds need ``absolute=True``.
    """
    compile_args, link_args = _flags()
    here = HERE if absolute else Path(os.path.relpath(HERE))
    archive = ipsec_mb_archive()
    if archive:
        compile_args.append("-DENCFS_HAVE_IPSEC_MB=1")
        # The archive's GCM code is asm with no executable-stack note; say so, not the default.
        link_args += ["-Wl,-z,noexecstack"]
    builder = cffi.FFI()
    builder.cdef(CDEF)
    builder.set_source(
        "encfs._native",
        '#include "encfs_native.h"\n',
        sources=[(here / name).as_posix() for name in ("encfs_native.c", "encfs_aes.c")],
        include_dirs=[here.as_posix()],
        libraries=["crypto", "pthread"],
        extra_objects=[archive] if archive else [],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        depends=[(here / name).as_posix() for name in (HEADER.name, "encfs_aes.h")],
    )
    return builder


ffibuilder = make_builder()


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "_build"
    out.mkdir(parents=True, exist_ok=True)
    print(make_builder(absolute=True).compile(tmpdir=str(out), verbose=False))
