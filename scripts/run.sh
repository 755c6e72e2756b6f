#!/usr/bin/env bash
# One entry point for the README's two commands:
#   bash scripts/run.sh main   set up .venv, then encrypt a synthetic dataset and train through encfs:: URLs
#   bash scripts/run.sh test   set up .venv, then run the whole test suite
# Needs python3 (3.10+), pip, gcc and the OpenSSL 3 headers (Debian/Ubuntu: libssl-dev).
# Installs Intel IPsec-MB (libipsec-mb-dev, the fast AES-256-GCM path) where it can: as root
# with apt-get on x86-64. Elsewhere one warning line, and the native code uses OpenSSL.
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-}"
case "$what" in main|test) ;; *) echo "usage: bash scripts/run.sh main|test" >&2; exit 2 ;; esac

IPSEC_HEADER=/usr/include/intel-ipsec-mb.h

# libipsec-mb-dev installed when missing (skipped with ENCFS_IPSEC_MB=0); never fatal.
ensure_ipsec_mb() {
  [ "${ENCFS_IPSEC_MB:-}" = 0 ] && return 0
  [ "$(uname -m)" = x86_64 ] || return 0
  [ -f "$IPSEC_HEADER" ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    if apt-get install -y -q libipsec-mb-dev >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libipsec-mb-dev >/dev/null 2>&1; }; then
      return 0
    fi
  fi
  echo "warning: could not install libipsec-mb-dev (needs root, apt-get and the network); AES-256-GCM runs on OpenSSL" >&2
}
ensure_ipsec_mb

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# Machine pins (torch 2.13.0, the CPU build here) live in scripts/constraints.txt, not in the
# library's metadata: every install below goes through them.
PIP=(.venv/bin/python -m pip install -q -c scripts/constraints.txt)
# The build requirements of pyproject.toml, installed here because the editable install
# builds without isolation (so the native extension is built against this venv's cffi).
"${PIP[@]}" --upgrade pip 'setuptools>=77' 'cffi>=1.17'
"${PIP[@]}" --no-build-isolation -e '.[torch,pyarrow,s3,dev]'
# An extension built before IPsec-MB was installed is rebuilt with it.
if [ "${ENCFS_IPSEC_MB:-}" != 0 ] && [ -f "$IPSEC_HEADER" ] \
  && ! .venv/bin/python -c "from encfs._native import lib; raise SystemExit(not lib.encfs_aes_built(lib.ENCFS_AES_IPSEC_MB))" 2>/dev/null; then
  .venv/bin/python setup.py -q build_ext --inplace --force >/dev/null 2>&1 || true
fi
.venv/bin/python -c "import encfs._native" 2>/dev/null \
  || echo "warning: native backend not built (install gcc and libssl-dev); using the python backend" >&2
# The Azure tests run against Azurite (tests/emulators.py), an npm package; the GCS emulator
# came with the dev extra above.
if [ "$what" = test ] && [ ! -x .azurite/node_modules/.bin/azurite-blob ]; then
  if command -v npm >/dev/null 2>&1; then
    npm install --prefix .azurite --no-audit --no-fund --silent azurite@3.35.0 >/dev/null 2>&1 \
      || echo "warning: npm could not install azurite: the Azure tests skip (and fail under CI=true)" >&2
  else
    echo "warning: no npm (Node.js): the Azure tests skip (and fail under CI=true)" >&2
  fi
fi

if [ "$what" = main ]; then
  exec .venv/bin/python benchmarks/main_job.py "${@:2}"
fi
exec .venv/bin/python -m pytest "${@:2}"
