#!/usr/bin/env bash
# Concentric's one entry point on a fresh machine (needs only Python 3.11+ and pip):
#   ./dev.sh serve   set everything up, then start Concentric on the built-in dev model
#   ./dev.sh test    set everything up, then run the test suite
# Setup creates .venv here and installs the package with its test extras, once (again only when
# pyproject.toml changes). CONCENTRIC_TORCH chooses the torch requirement; the default is the
# CPU build that this project's build machines carry locally.
set -euo pipefail
cd "$(dirname "$0")"

setup() {
  local py
  py=$(command -v python3.11 || command -v python3)
  [ -x .venv/bin/python ] || "$py" -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
  local stamp=.venv/.concentric-installed
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    python -m pip install -q --upgrade pip
    python -m pip install -q "${CONCENTRIC_TORCH:-torch==2.13.0}"
    python -m pip install -q -e ".[test]"
    touch "$stamp"
  fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  serve) setup; exec concentric serve --open "$@" ;;
  demo)  setup; exec concentric demo "$@" ;;
  test)  setup; exec python -m pytest "$@" ;;
  *) echo "usage: ./dev.sh serve|test [args...]" >&2; exit 2 ;;
esac
