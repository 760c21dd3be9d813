#!/usr/bin/env bash
# Creates (or reuses) a Python venv of the Python tests and installs the pinned packages of a
# requirements file from PyPI as binary wheels.
#   tools/deploy/setup_venv.sh [VENV_DIR [REQUIREMENTS]]
#     VENV_DIR      default: build/venv-deploy
#     REQUIREMENTS  default: tools/deploy/requirements.txt (the deployment tests);
#                   tools/evals/requirements.txt for the evaluation tests (build/venv-evals)
# Idempotent: when VENV_DIR was made from the same requirements file (same contents) and Python,
# it returns at once. The interpreter is $PYTHON, else python3 (3.11 or newer: rpds-py 2026
# needs it). A requirements file may name sdist-only packages on a `--no-binary` line.
# CTest runs it as the deploy_venv fixture (tests/deploy/CMakeLists.txt) and the evals_venv
# fixture (tests/evals/CMakeLists.txt).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${1:-$root/build/venv-deploy}"
requirements="$(realpath -m "${2:-$root/tools/deploy/requirements.txt}")"
python="${PYTHON:-python3}"
if [[ ! -f "$requirements" ]]; then
  echo "setup_venv: requirements file $requirements not found" >&2
  exit 1
fi

if ! command -v "$python" >/dev/null; then
  echo "setup_venv: $python not found; install Python 3.11+ (Debian: apt-get install python3 python3-venv)" >&2
  exit 1
fi
stamp="$(sha256sum "$requirements" | cut -d' ' -f1) $("$python" -c 'import sys; print(sys.version.split()[0])')"
if [[ -x "$venv/bin/python" && -f "$venv/.moe-stamp" && "$(cat "$venv/.moe-stamp")" == "$stamp" ]]; then
  echo "setup_venv: $venv is up to date"
  exit 0
fi

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup_venv: $python is $("$python" --version 2>&1); the pinned packages need Python 3.11+" >&2
  exit 1
fi
if ! "$python" -c 'import ensurepip' 2>/dev/null; then
  echo "setup_venv: $python cannot create venvs (no ensurepip); Debian: apt-get install python3-venv" >&2
  exit 1
fi
echo "setup_venv: creating $venv"
rm -f "$venv/.moe-stamp"
"$python" -m venv --clear "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
  --only-binary=:all: -r "$requirements"
echo "$stamp" > "$venv/.moe-stamp"
echo "setup_venv: installed $(grep -c '^[A-Za-z]' "$requirements") pinned packages into $venv"
