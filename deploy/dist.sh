#!/usr/bin/env bash
# `make dist`: a wheelhouse from which deploy/install-agent.sh and deploy/install-bridge.sh install
# offline: the project's wheel, the llama-cpp-python wheel built for this target (kept by
# deploy/llama.sh: built once per CMAKE_ARGS, e.g. CUDA; README "Production install"), and every
# runtime dependency of the `agent`, `bridge` and `postgres` extras as wheels. No dev extras.
# The wheels are for this machine's Python version and architecture: build on (or for) the target.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
OUT=${WHEELHOUSE:-dist/wheelhouse}

say() { printf '==> %s\n' "$*"; }
# shellcheck source=deploy/llama.sh
. deploy/llama.sh

[ -x "$PYTHON" ] || { echo "error: $PYTHON not found: run \`make setup\` first or set PYTHON=/path/to/python3.11" >&2; exit 1; }
rm -rf "$OUT"
mkdir -p "$OUT"
build_llama_wheel "$PYTHON"
cp "$(llama_wheel_dir)"/llama_cpp_python-*.whl "$OUT/"
say "building the autoglm-edge wheel"
"$PYTHON" -m pip wheel --quiet --no-deps -w "$OUT" .
project=$(ls "$OUT"/autoglm_edge-*.whl)
say "collecting the runtime dependencies (agent, bridge, postgres) as wheels"
"$PYTHON" -m pip wheel --quiet --prefer-binary --find-links "$OUT" -w "$OUT" "${project}[agent,bridge,postgres]"
say "wheelhouse $OUT: $(ls "$OUT" | wc -l) wheels, $(du -sh "$OUT" | cut -f1)"
