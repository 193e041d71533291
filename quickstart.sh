#!/usr/bin/env bash
# One-command set-up + run. Safe to run twice.
#   ./quickstart.sh demo   set up, then run `dice demo` on the embedded digits data
#   ./quickstart.sh test   set up (with dev tools), then run the whole test suite
# Installs: apt packages (python3-venv if needed, dataset-fashion-mnist), a .venv,
# torch==2.13.0 (CPU build) first, then this project.
set -euo pipefail
cd "$(dirname "$0")"
what="${1:-demo}"; shift || true

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }
apt_install() {
  command -v apt-get >/dev/null || return 0
  if [ ! -f /var/lib/apt/periodic/dice-updated ] ; then
    as_root apt-get update -qq && as_root mkdir -p /var/lib/apt/periodic && as_root touch /var/lib/apt/periodic/dice-updated || true
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv .venv 2>/dev/null; then
    rm -rf .venv
    apt_install python3-venv
    "$PY" -m venv .venv
  fi
fi
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  apt_install dataset-fashion-mnist || echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST runs will need --data-dir" >&2
fi
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  "${PIP[@]}" "torch==2.13.0"
fi
extra=""
[ "$what" = "test" ] && extra="[dev]"
"${PIP[@]}" -e ".${extra}"

case "$what" in
  demo) exec .venv/bin/dice demo "$@" ;;
  test) exec .venv/bin/python -m pytest "$@" ;;
  setup) echo "set up in .venv" ;;
  *) echo "usage: ./quickstart.sh demo|test|setup" >&2; exit 2 ;;
esac
