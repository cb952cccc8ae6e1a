#!/usr/bin/env bash
# Set up AMBLE on a fresh machine: Fashion-MNIST (Debian package, when apt is available and no copy
# is found), a virtual environment in .venv with the CPU build of PyTorch, and the package itself.
# Usage: scripts/setup.sh [--dev]     (--dev adds the test and lint tools, and Ray). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--dev" ] && extras="[dev,ray]"  # the tests run Ray locally too

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python=$candidate; break; fi
  done
fi
if [ -z "$python" ] || ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: AMBLE needs Python 3.11 or newer; set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

# Fashion-MNIST: Debian's dataset-fashion-mnist puts the IDX files in /usr/share/datasets/fashion-mnist.
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -z "${AMBLE_DATA_DIR:-}" ] && command -v apt-get >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo="sudo"
  if [ "$(id -u)" -eq 0 ] || [ -n "$sudo" ]; then
    echo "setup: installing Fashion-MNIST (apt-get install dataset-fashion-mnist)"
    $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
      || { $sudo apt-get update -qq >/dev/null && $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null; } \
      || echo "setup: could not install dataset-fashion-mnist; amble will try a download or tell you what to do" >&2
  fi
fi

# The tests run a real Redis (Debian's redis-server); only --dev needs it.
if [ -n "$extras" ] && ! command -v redis-server >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo="sudo"
  echo "setup: installing redis-server (apt-get install redis-server) for the tests"
  $sudo apt-get install -y -qq redis-server >/dev/null 2>&1 \
    || { $sudo apt-get update -qq >/dev/null && $sudo apt-get install -y -qq redis-server >/dev/null; } \
    || echo "setup: could not install redis-server; the Redis tests will fail until it is installed" >&2
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $python"
  "$python" -m venv .venv
fi
stamp=".venv/.amble-setup$extras"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing AMBLE$extras into .venv (PyTorch CPU build)"
  # torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build.
  .venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".$extras"
  touch "$stamp"
fi
echo "setup: ready (.venv/bin/amble)"
