#!/usr/bin/env bash
# Concentric's one entry point on a fresh machine (needs only Python 3.11+ and pip):
#   ./dev.sh serve   set everything up, then start Concentric on the built-in dev model (the
#                    trained one committed in models/dev-trained)
#   ./dev.sh test    set everything up, then run the test suite
# Setup creates .venv here and installs the package with its test extras, once (again only when
# pyproject.toml changes). CONCENTRIC_TORCH chooses the torch requirement; the default is the
# CPU build that this project's build machines carry locally. `test` also installs Debian's
# `prometheus` package when it is missing (tests/api/test_prometheus.py runs a real Prometheus).
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

# The metrics test needs `prometheus` and `promtool`. Install them with apt when missing (as root,
# or through passwordless sudo). When that is impossible, say so and carry on: the test then
# fails with the same explanation. It never skips, because CI must prove the dashboard's queries.
ensure_prometheus() {
  command -v prometheus >/dev/null && command -v promtool >/dev/null && return 0
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
      sudo=(sudo -n)
    else
      echo "dev.sh: prometheus is not installed and cannot be (not root, no passwordless sudo):" \
        "tests/api/test_prometheus.py will fail. Install it: apt-get install prometheus" >&2
      return 0
    fi
  fi
  if ! command -v apt-get >/dev/null; then
    echo "dev.sh: prometheus is not installed and there is no apt-get:" \
      "tests/api/test_prometheus.py will fail. Install Prometheus 2.x (prometheus, promtool)." >&2
    return 0
  fi
  echo "dev.sh: installing Debian's prometheus package (for tests/api/test_prometheus.py)" >&2
  # No recommends: the node exporter is not needed. In a container the package's service does
  # not start; on a VM it may listen on 9090, which the test never uses (it picks a free port).
  if ! { "${sudo[@]}" apt-get update -qq \
    && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }; then
    echo "dev.sh: installing prometheus with apt-get failed:" \
      "tests/api/test_prometheus.py will fail." >&2
  fi
}

# With arguments: exactly `pytest ARGS`. Without: the whole suite in two passes. First every test
# not marked `alone`, on CONCENTRIC_TEST_WORKERS pytest-xdist workers (default 2, this machine's
# cores; 0 runs them in this process), a whole file per worker, so that a module's fixtures
# (compiled graphs, live servers) are built once. Most of those tests wait on subprocesses,
# servers or compilers for much of their time, which the second worker fills. Then the `alone`
# tests, one at a time with nothing beside them: they time themselves (latency under attack,
# drain deadlines) or load every core (the fleet's autoscaling), and another worker's load would
# make them measure it. Both passes always run; the exit status is the first failure's.
run_tests() {
  if [ $# -gt 0 ]; then
    exec python -m pytest "$@"
  fi
  local status=0
  python -m pytest -n "${CONCENTRIC_TEST_WORKERS:-2}" --dist loadfile -m "not alone" || status=$?
  python -m pytest -m alone || { local rc=$?; [ "$status" -ne 0 ] || status=$rc; }
  return "$status"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  serve) setup; exec concentric serve --open "$@" ;;
  demo)  setup; exec concentric demo "$@" ;;
  test)  setup; ensure_prometheus; run_tests "$@" ;;
  *) echo "usage: ./dev.sh serve|test [args...]" >&2; exit 2 ;;
esac
