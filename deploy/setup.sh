#!/usr/bin/env bash
# Sets up a development/demo environment on Debian/Ubuntu: mosquitto (when missing), .venv with
# every dependency. llama-cpp-python is compiled from source the first time (about 10 minutes on
# 2 cores); the wheel is kept (see install_llama), so later runs take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}

say() { printf '==> %s\n' "$*"; }
# shellcheck source=deploy/llama.sh
. deploy/llama.sh

pick_python() {
  for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "error: Python 3.11+ is required (set PYTHON=/path/to/python3.11)" >&2
  return 1
}

ensure_mosquitto() {
  if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
    return 0
  fi
  say "mosquitto is not installed; installing it with apt-get"
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
      echo "error: mosquitto is missing and this user cannot install packages." >&2
      echo "       Run: sudo apt-get update && sudo apt-get install -y mosquitto   (then re-run make)" >&2
      return 1
    fi
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: mosquitto is missing and apt-get is not available; install mosquitto 2.x with your package manager" >&2
    return 1
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq mosquitto
}

ensure_chromium() {
  # Debian's chromium + chromium-driver drive the web console tests (tests/bridge/test_stack.py);
  # best effort: without them those tests skip and say why.
  if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    return 0
  fi
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
      say "chromium is missing (the console's browser tests will skip): sudo apt-get install -y chromium chromium-driver"
      return 0
    fi
  fi
  command -v apt-get >/dev/null 2>&1 || { say "chromium is missing and apt-get is not available; browser tests will skip"; return 0; }
  say "installing chromium and chromium-driver with apt-get (for the web console tests)"
  { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver; } ||
    say "could not install chromium; the console's browser tests will skip"
}

ensure_venv() {
  local python; python=$(pick_python)
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV with $python"
    "$python" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
}

install_llama() {
  if "$VENV/bin/python" -c 'import llama_cpp' 2>/dev/null; then
    return 0
  fi
  local wheels; wheels=$(llama_wheel_dir)
  build_llama_wheel "$VENV/bin/python"
  "$VENV/bin/python" -m pip install --quiet --find-links "$wheels" --only-binary llama-cpp-python "$LLAMA_SPEC"
  say "llama-cpp-python installed from $wheels"
}

ensure_mosquitto
ensure_chromium
ensure_venv
install_llama
say "installing autoglm-edge and its dependencies"
"$VENV/bin/python" -m pip install --quiet -e ".[dev]"
say "setup done"
