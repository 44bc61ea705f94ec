#!/usr/bin/env bash
# Sets up .venv from the lock file (idempotent; fast when nothing changed) and installs adaptclip
# into it, generating the gRPC code from proto/. Needs only python3.11 + pip; with --test it also
# installs the Debian packages the test suite uses (redis-server, openssl) when they are absent.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi

lock_hash=$(sha256sum requirements.lock | cut -d' ' -f1)
if [ "$(cat .venv/.lock-hash 2>/dev/null)" != "$lock_hash" ]; then
  .venv/bin/python -m pip install --quiet --upgrade "pip==26.3"
  .venv/bin/python -m pip install --quiet -r requirements.lock
  echo "$lock_hash" > .venv/.lock-hash
fi
# --no-build-isolation: build with the locked grpcio-tools and setuptools, not whatever is newest.
.venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .

if [ "${1:-}" = "--test" ]; then
  missing=()
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  command -v openssl >/dev/null 2>&1 || missing+=(openssl)  # tests make their own CA and certificates
  if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi
