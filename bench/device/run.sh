#!/usr/bin/env bash
# Runs the whole mesh benchmark (bench/mesh.bench.ts) on the borrowed GPU machine, in ONE `run` call: unpacks
# what bench/device/pack.sh put in .device/ (carried) into /tmp, builds llama.cpp with CUDA there (skipped when
# /tmp already has this build), then runs the bench with the given arguments. See README.md beside it.
#   bash bench/device/run.sh --quick --reps 1 --embd 4096 --layers 6 --ff 4096 --type f16
# Writes under $OUT (the run tool brings it back; default /tmp/mesh-device-out): summary.txt (machine, times),
# bench.md (the tables), bench-log.txt (the bench's stderr), build-tail.txt, gpu.csv (nvidia-smi every 5 s).
# environment:
#   MESH_DEVICE_DIR=/tmp/mesh-device   where node, node_modules, the source, the build and the model cache go
#   MESH_DEVICE_BIN_DIR=DIR            use these llama.cpp binaries, build nothing (local tests of this script)
#   MESH_DEVICE_CUDA_ARCHS=90          CMAKE_CUDA_ARCHITECTURES
#   MESH_DEVICE_DEADLINE=570           seconds after start at which the bench is stopped (the call's limit is 600)
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT="$PWD"
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
OUT="${OUT:-/tmp/mesh-device-out}"
BASE="${MESH_DEVICE_DIR:-/tmp/mesh-device}"
DEADLINE="${MESH_DEVICE_DEADLINE:-570}"
mkdir -p "$OUT" "$BASE"
S="$OUT/summary.txt"
say() { printf '[device %3ss] %s\n' "$(el)" "$*" | tee -a "$S" >&2; }
fail() { say "FAILED: $*"; exit 1; }
: >"$S"

# ---- the machine --------------------------------------------------------------------------------------
{
  echo "date: $(date -u +%FT%TZ)  host: $(hostname)  kernel: $(uname -r)"
  nvidia-smi -L 2>&1 || echo "nvidia-smi: none"
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>/dev/null || true
  echo "cpus: $(nproc)  memory: $(free -g | awk '/^Mem:/ { print $2 " GiB" }')"
  for t in cmake ninja nvcc gcc g++ ccache xz; do printf '%s: %s\n' "$t" "$(command -v $t || { [ "$t" = nvcc ] && ls /usr/local/cuda/bin/nvcc 2>/dev/null; } || echo missing)"; done
  echo "args: $*"
} 2>&1 | tee -a "$S" >&2

# ---- unpack (a piece is kept when .device/MANIFEST.txt gives it the same key as last time) ----------
[ -f .device/MANIFEST.txt ] || fail ".device/ is missing: run bench/device/pack.sh here and pass '.device' in the run tool's carry"
key_of() { sed -n "s/^$1 key=\([^ ]*\).*/\1/p" .device/MANIFEST.txt; }
unpacked() { [ "$(cat "$BASE/$1.key" 2>/dev/null)" = "$(key_of "$1")" ]; }
if ! unpacked node; then
  mkdir -p "$BASE/bin" && xz -dc .device/node.xz >"$BASE/bin/node" && chmod +x "$BASE/bin/node" || fail "unpacking node"
  key_of node >"$BASE/node.key"
fi
if ! unpacked node_modules; then
  rm -rf "$BASE/node_modules" && tar -xJf .device/node_modules.tar.xz -C "$BASE" || fail "unpacking node_modules"
  key_of node_modules >"$BASE/node_modules.key"
fi
SRC="$BASE/llama/mesh/src"
BUILD="$BASE/llama/mesh/build"
if ! unpacked llama-src; then
  rm -rf "$SRC" && mkdir -p "$BASE/llama/mesh" && tar -xJf .device/llama-src.tar.xz -C "$BASE/llama/mesh" || fail "unpacking llama-src"
  key_of llama-src >"$BASE/llama-src.key"
fi
export PATH="$BASE/bin:$PATH"
# the working tree's imports resolve from ./node_modules: a link to the unpacked one (never replace a real one)
if [ -L node_modules ] || [ ! -e node_modules ]; then ln -sfn "$BASE/node_modules" node_modules
else say "node_modules here is a real folder: using it as it is"; fi
say "unpacked: node $(node -v), node_modules ($(ls "$BASE/node_modules" | wc -l) entries), llama.cpp $(cut -c1-12 "$SRC/MESH_LLAMA_COMMIT.txt") + $(paste -sd' ' "$SRC/MESH_PATCHES.txt")"

# ---- llama.cpp with CUDA: native/build.sh's cmake options, plus CUDA ---------------------------------
if [ -n "${MESH_DEVICE_BIN_DIR:-}" ]; then
  BIN="$(cd "$MESH_DEVICE_BIN_DIR" && pwd)"; say "MESH_DEVICE_BIN_DIR: using $BIN, building nothing"
else
  BIN="$BUILD/bin"
  NVCC="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)"
  [ -x "$NVCC" ] || fail "no nvcc"
  ARGS=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_RPC=ON -DGGML_NATIVE=ON
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
    -DGGML_CUDA=ON -DCMAKE_CUDA_COMPILER="$NVCC" -DCMAKE_CUDA_ARCHITECTURES="${MESH_DEVICE_CUDA_ARCHS:-90}")
  NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" # as native/build.sh: no AMX (a VM may announce it unusable)
  echo 'int main(void) { return 0; }' | cc -march=native $NO_AMX -x c -o /dev/null - >/dev/null 2>&1 &&
    ARGS+=(-DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX")
  # as native/build.sh: the RPC client's TLS-PSK support (patch 0003) when OpenSSL >= 1.1.1 compiles and links
  TLS=off
  probe="$(mktemp)"
  printf '%s\n' '#include <stdio.h>' '#include <openssl/ssl.h>' '#include <openssl/opensslv.h>' \
    '#if OPENSSL_VERSION_NUMBER < 0x10101000L' '#error OpenSSL 1.1.1 or newer is needed' '#endif' \
    'int main(void) { SSL_CTX *c = SSL_CTX_new(TLS_client_method()); SSL_CTX_set_psk_use_session_callback(c, 0);' \
    '  puts(OPENSSL_VERSION_TEXT); return 0; }' | cc -x c - -lssl -lcrypto -o "$probe" >/dev/null 2>&1 &&
    ssl="$("$probe" | head -1)" && [ -n "$ssl" ] && TLS=on
  rm -f "$probe"
  if grep -q GGML_RPC_TLS "$SRC/ggml/src/ggml-rpc/CMakeLists.txt" 2>/dev/null; then
    if [ "$TLS" = on ]; then ARGS+=(-DGGML_RPC_TLS=ON); say "RPC TLS-PSK client: on ($ssl)"
    else ARGS+=(-DGGML_RPC_TLS=OFF); say "RPC TLS-PSK client: off (no OpenSSL >= 1.1.1 headers and libraries here)"; fi
  fi
  TARGETS="llama-server ggml-rpc-server llama-bench"
  KEY="$(printf '%s\n' "$(cat "$BASE/llama-src.key")" "${ARGS[@]}" $TARGETS | sha256sum | cut -c1-16)"
  if [ "$(cat "$BASE/llama/mesh/build.key" 2>/dev/null)" = "$KEY" ] && [ -x "$BIN/llama-server" ] && [ -x "$BIN/ggml-rpc-server" ]; then
    say "llama.cpp CUDA build in $BIN is up to date: not building"
  else
    say "building llama.cpp (CUDA ${MESH_DEVICE_CUDA_ARCHS:-90}, Ninja, -j$(nproc)): $TARGETS"
    b0=$(date +%s); rm -f "$BASE/llama/mesh/build.key"
    { cmake -S "$SRC" -B "$BUILD" "${ARGS[@]}" && cmake --build "$BUILD" -j "$(nproc)" --target $TARGETS; } >"$BASE/build.log" 2>&1
    rc=$?
    { grep -E ' error|Error |FAILED' "$BASE/build.log" | head -20; tail -30 "$BASE/build.log"; } >"$OUT/build-tail.txt"
    [ "$rc" = 0 ] || { tail -30 "$BASE/build.log" >&2; fail "llama.cpp build (exit $rc), see build-tail.txt"; }
    { printf 'variant=mesh\nbackend=cuda\nllama_commit=%s\n' "$(cat "$SRC/MESH_LLAMA_COMMIT.txt")"
      sed 's/^/patch=/' "$SRC/MESH_PATCHES.txt"
      printf 'rpc_tls=%s\nbuilt_by=bench/device/run.sh\nbuilt_at=%s\n' "$TLS" "$(date -u +%FT%TZ)"; } >"$BIN/mesh-build.txt"
    echo "$KEY" >"$BASE/llama/mesh/build.key"
    say "build took $(( $(date +%s) - b0 )) s"
  fi
fi

# ---- which tree runs: a committed snapshot when one travels (.device/tree.tar, from `git archive`), so that
# work in progress in the working tree cannot break the run; else the working tree itself -------------------
if [ -f .device/tree.tar ]; then
  TREE="$BASE/tree"
  rm -rf "$TREE" && mkdir -p "$TREE" && tar -xf .device/tree.tar -C "$TREE" || fail "unpacking .device/tree.tar"
  ln -sfn "$BASE/node_modules" "$TREE/node_modules"
  cd "$TREE" || fail "cd $TREE"
  say "running the committed tree of .device/tree.tar ($(cat .device-tree-rev 2>/dev/null || echo unknown revision))"
fi

# ---- the bench ---------------------------------------------------------------------------------------
# Nothing may download: the binaries are given (native/build.sh is never run), tsx only compiles locally.
export MESH_LLAMA_BIN_DIR="$BIN" MESH_LLAMA_BUILD_ROOT="$BASE/llama" MESH_LLAMA_SKIP_BUILD=1
export XDG_CACHE_HOME="$BASE/cache" npm_config_offline=true NODE_OPTIONS="${NODE_OPTIONS:-} --max-old-space-size=8192"
sampler=""
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 5 >"$OUT/gpu.csv" 2>&1 &
  sampler=$!
fi
left=$(( DEADLINE - $(el) ))
[ "$left" -gt 30 ] || fail "only $left s left before the deadline: no bench"
say "bench: node --import tsx bench/mesh.bench.ts $* (stopped after $left s)"
b0=$(date +%s)
timeout --signal=TERM --kill-after=10 "$left" node --import tsx bench/mesh.bench.ts "$@" >"$OUT/bench.md" 2>"$OUT/bench-log.txt"
rc=$?
[ -n "$sampler" ] && kill "$sampler" 2>/dev/null
say "bench exit $rc after $(( $(date +%s) - b0 )) s$([ "$rc" = 124 ] && echo ' (stopped at the deadline)'); total $(el) s"
echo "---- bench-log.txt (tail) ----" >&2; tail -25 "$OUT/bench-log.txt" >&2
echo "---- bench.md ----" >&2; cat "$OUT/bench.md" >&2
exit "$rc"
