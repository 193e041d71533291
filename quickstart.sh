#!/usr/bin/env bash
# One-command set-up + run. Safe to run twice (each step is skipped when already done).
#   ./quickstart.sh demo   set up, then run `dice demo` on the embedded digits data
#   ./quickstart.sh test   set up (with dev tools and Chromium for the report's browser test),
#                          then run the whole test suite
#   ./quickstart.sh setup  set up only
# Installs: apt packages (python3-venv if needed, dataset-fashion-mnist, the fortunes text corpus
# of the language model: fortunes fortunes-de fortunes-es fortunes-it; for `test`: chromium,
# fonts-dejavu-core), a .venv, torch==2.13.0 (CPU build) first, then this project.
set -euo pipefail
cd "$(dirname "$0")"
what="${1:-demo}"; shift || true

say() { echo "quickstart: $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }
apt_install() {
  command -v apt-get >/dev/null || return 1
  if [ ! -f /var/lib/apt/periodic/dice-updated ] ; then
    say "apt-get update"
    as_root apt-get update -qq && as_root mkdir -p /var/lib/apt/periodic && as_root touch /var/lib/apt/periodic/dice-updated || true
  fi
  say "apt-get install $* (one line per package)"
  set +e
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    -o Dpkg::Use-Pty=0 "$@" | grep --line-buffered -E '^(Setting up|E:)'
  set -e
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || return 1; done
}
pip_install() {  # shows what it downloads and installs, not what is already there
  say "pip install $*"
  local st
  set +e
  .venv/bin/python -m pip install --disable-pip-version-check --progress-bar off "$@" 2>&1 \
    | grep --line-buffered -v '^Requirement already satisfied'
  st=("${PIPESTATUS[@]}")
  set -e
  return "${st[0]}"
}

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $PY"
  if ! "$PY" -m venv .venv 2>/dev/null; then
    rm -rf .venv
    apt_install python3-venv
    "$PY" -m venv .venv
  fi
fi
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  apt_install dataset-fashion-mnist || say "warning: could not install dataset-fashion-mnist; Fashion-MNIST runs will need --data-dir"
fi
if [ ! -f /usr/share/games/fortunes/it/leggi ]; then
  apt_install fortunes fortunes-de fortunes-es fortunes-it || say "warning: could not install the fortunes corpus; the language-model configs (configs/lm-*.yaml) will need it"
fi
if [ "$what" = test ] && ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null \
   && [ -z "${DICE_BROWSER:-}" ]; then
  apt_install chromium fonts-dejavu-core || say "warning: could not install chromium; the report's browser test will be skipped"
fi
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  pip_install "torch==2.13.0"
fi
extra=""
[ "$what" = "test" ] && extra="[dev]"
pip_install -e ".${extra}"

case "$what" in
  demo) exec .venv/bin/dice demo "$@" ;;
  test) exec .venv/bin/python -m pytest "$@" ;;
  setup) say "set up in .venv" ;;
  *) echo "usage: ./quickstart.sh demo|test|setup" >&2; exit 2 ;;
esac
