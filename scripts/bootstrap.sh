#!/usr/bin/env bash
# Create .venv and install the project with its app and test extras at the exact versions of requirements.lock
# (every package, for Python 3.11 on Linux x86-64: the versions the test suite passed with).
#
#   ./scripts/bootstrap.sh                install from the lock (what CI does)
#   ./scripts/bootstrap.sh --resolve      re-resolve pyproject.toml's version ranges instead (newest releases)
#   ./scripts/bootstrap.sh --update-lock  re-resolve in a fresh temporary venv, rewrite requirements.lock from it,
#                                         then install .venv from the new lock (README: "The locked environment")
#
# TORCH_SPEC picks the torch build (default: the CPU wheel; on a CUDA machine TORCH_SPEC='torch==2.13.0', the
# version of the lock). torch is installed first, as it is, so that the lock's `torch==2.13.0` accepts either build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=${TORCH_SPEC:-torch==2.13.0}
LOCK=requirements.lock
MODE=${1:-}
case "$MODE" in ""|--resolve|--update-lock) ;; *) echo "usage: $0 [--resolve | --update-lock]" >&2; exit 2 ;; esac

resolve_into() {  # a venv folder: pyproject.toml's ranges resolved by pip
  "$1/bin/pip" install -q -U pip 'setuptools>=77.0.3'
  "$1/bin/pip" install -q "$TORCH"
  "$1/bin/pip" install -q -e '.[app,dev]'
}

if [ "$MODE" = --update-lock ]; then
  fresh=$(mktemp -d)
  trap 'rm -rf "$fresh"' EXIT
  "$PYTHON" -m venv "$fresh/venv"
  resolve_into "$fresh/venv"
  {
    echo "# Exact versions of every package of the project with its app and dev extras (Python 3.11, Linux x86-64),"
    echo "# written by ./scripts/bootstrap.sh --update-lock; scripts/bootstrap.sh installs from it."
    echo "# torch has no local label (+cpu): the CPU and the CUDA build of this version both satisfy it."
    "$fresh/venv/bin/pip" freeze --all --exclude-editable | grep -v '^pip==' | sed -E 's/^(torch==[^+]+)\+.*/\1/'
  } > "$LOCK.tmp"
  mv "$LOCK.tmp" "$LOCK"
  echo "bootstrap: wrote $LOCK ($(grep -vc '^#' "$LOCK") packages)"
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if [ "$MODE" = --resolve ]; then
  resolve_into .venv
else
  if ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "bootstrap: $LOCK is for Python 3.11, .venv has $(.venv/bin/python -V); set PYTHON=python3.11" \
         "(and remove .venv), or use --resolve" >&2
    exit 1
  fi
  .venv/bin/pip install -q -U pip 'setuptools>=77.0.3'
  .venv/bin/pip install -q "$TORCH"
  .venv/bin/pip install -q --no-deps -r "$LOCK"  # every package is in the lock: nothing else is resolved
  .venv/bin/pip install -q --no-deps -e .
  .venv/bin/pip check
fi
echo "bootstrap: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
