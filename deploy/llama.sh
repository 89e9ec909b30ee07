# The llama-cpp-python wheel, built once per CMAKE_ARGS and kept: `make setup` installs it into the
# dev venv, `make dist` copies it into the wheelhouse. Sourced by deploy/setup.sh and deploy/dist.sh
# (they define `say`).
LLAMA_SPEC="llama-cpp-python==0.3.36"

# llama.cpp is compiled for this CPU (GGML_NATIVE), except its AMX kernels on x86_64: they segfault
# (llama.cpp issue #20824; README "CPUs with AMX"), and without them llama.cpp still repacks the
# weights for AVX-512/AVX2 (bench/repack.py). pip's own cache does not tell builds with other
# CMAKE_ARGS apart, so the wheel is kept in a directory named after them.
llama_cmake_args() {
  if [ -n "${CMAKE_ARGS:-}" ]; then
    printf '%s' "$CMAKE_ARGS"
  elif [ "$(uname -m)" = x86_64 ]; then
    local flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    printf '%s' "-DCMAKE_C_FLAGS='$flags' -DCMAKE_CXX_FLAGS='$flags'"
  fi
}

# Where the wheel for these CMAKE_ARGS is kept.
llama_wheel_dir() {
  printf '%s/%s' "${LLAMA_WHEEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/autoglm-edge/wheels}" "$(
    printf '%s %s' "$LLAMA_SPEC" "$(llama_cmake_args)" | sha256sum | cut -c1-16)"
}

# Build the wheel with the given python unless it is kept already.
build_llama_wheel() {
  local python=$1 cmake_args wheels
  cmake_args=$(llama_cmake_args)
  wheels=$(llama_wheel_dir)
  if ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    return 0
  fi
  say "building $LLAMA_SPEC (first time: compiles llama.cpp, ~10 min on 2 cores; kept in $wheels)"
  say "CMAKE_ARGS=$cmake_args"
  local log; log=$(mktemp -t llama-build.XXXXXX.log)
  set +o pipefail
  CMAKE_ARGS="$cmake_args" "$python" -m pip wheel -v --no-cache-dir --no-deps -w "$wheels" "$LLAMA_SPEC" 2>&1 |
    tee "$log" | grep --line-buffered -oE '^ *\[[0-9]+/[0-9]+\]' |
    awk '{ if (NR % 10 == 1) { printf "    llama.cpp build step %s\n", $1; fflush() } }'
  local status=${PIPESTATUS[0]}
  set -o pipefail
  if [ "$status" -ne 0 ]; then
    tail -40 "$log" >&2
    echo "error: building llama-cpp-python failed (full log: $log). It needs gcc, g++ and cmake." >&2
    return 1
  fi
}
