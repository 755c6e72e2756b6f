"""cffi builder (API mode, out-of-line) for ``encfs._native``.

Used by setup.py through ``cffi_modules``, or directly:
``python native/build_native.py [TMPDIR]`` compiles into TMPDIR (default native/_build).
``ENCFS_NATIVE_SANITIZE=1`` adds ``-fsanitize=address,undefined -fno-omit-frame-pointer -g``
to compile and link; such a build must be loaded with libasan in ``LD_PRELOAD``.

API-mode calls release the GIL for the duration of every C call (cffi wraps each call in
``Py_BEGIN_ALLOW_THREADS`` / ``Py_END_ALLOW_THREADS``; see the generated ``_native.c``), so
Python threads keep running while a batch is decrypted.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import cffi

HERE = Path(__file__).resolve().parent

CDEF = """
#define ENCFS_KEY_SIZE ...
#define ENCFS_NONCE_SIZE ...
#define ENCFS_TAG_SIZE ...
#define ENCFS_CHUNK_SIZE ...
#define ENCFS_CT_CHUNK_SIZE ...
#define ENCFS_MAX_THREADS ...
#define ENCFS_E_ARG ...
#define ENCFS_E_FORMAT ...
#define ENCFS_E_SPACE ...
#define ENCFS_E_AUTH ...
#define ENCFS_E_RANGE ...
#define ENCFS_E_CRYPTO ...
#define ENCFS_E_OVERLAP ...
#define ENCFS_E_IO ...
#define ENCFS_E_TRUNCATED ...

int64_t encfs_decrypt_chunks(const uint8_t *key, const uint8_t *base_nonce, uint64_t first_index,
                             const uint8_t *ct, size_t ct_len, uint8_t *out, size_t out_cap,
                             int nthreads, int64_t *failed_index);
int64_t encfs_pread_decrypt_chunks(int fd, int64_t offset, const uint8_t *key, const uint8_t *base_nonce,
                                   uint64_t first_index, size_t ct_len, uint8_t *out, size_t out_cap,
                                   int nthreads, int64_t *failed_index, int *os_error);
int64_t encfs_encrypt_chunks(const uint8_t *key, const uint8_t *base_nonce, uint64_t first_index,
                             const uint8_t *pt, size_t pt_len, int final, uint8_t *out,
                             size_t out_cap, int nthreads);
int64_t encfs_gcm_seal(const uint8_t *key, size_t key_len, const uint8_t *iv, size_t iv_len,
                       const uint8_t *aad, size_t aad_len, const uint8_t *pt, size_t pt_len,
                       uint8_t *out, size_t out_cap);
int64_t encfs_gcm_open(const uint8_t *key, size_t key_len, const uint8_t *iv, size_t iv_len,
                       const uint8_t *aad, size_t aad_len, const uint8_t *ct, size_t ct_len,
                       uint8_t *out, size_t out_cap);

void *encfs_secure_alloc(size_t n, int *locked);
void encfs_secure_free(void *p, size_t n, int locked);
int encfs_secure_lock(void *p, size_t n);
int encfs_secure_relock(void *p, size_t n);
void encfs_secure_unlock(void *p, size_t n, int locked);
void encfs_cleanse(void *p, size_t n);
uint64_t encfs_mlock_fallbacks(void);
uint64_t encfs_locked_bytes(void);
int encfs_mlock_probe(void);
const char *encfs_openssl_version(void);
"""


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
    builder = cffi.FFI()
    builder.cdef(CDEF)
    builder.set_source(
        "encfs._native",
        '#include "encfs_native.h"\n',
        sources=[(here / "encfs_native.c").as_posix()],
        include_dirs=[here.as_posix()],
        libraries=["crypto", "pthread"],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        depends=[(here / "encfs_native.h").as_posix()],
    )
    return builder


ffibuilder = make_builder()


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "_build"
    out.mkdir(parents=True, exist_ok=True)
    print(make_builder(absolute=True).compile(tmpdir=str(out), verbose=False))
