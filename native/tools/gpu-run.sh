#!/usr/bin/env bash
# The GPU run, in two phases that each fit one device call (a command may run 10 minutes):
#   native/tools/gpu-run.sh build   CUDA build with native/build.sh (the npm tarball travels in native/cache)
#   native/tools/gpu-run.sh bench   per model in GPU_MODELS ("layers:embd:ff:type ..."), generate it with python3 +
#                                   gguf-py, then run native/tools/gpu-bench.py
# Writes logs and the tables under $OUT (the device tool brings that folder back).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/gpu-out}"
mkdir -p "$OUT"
BIN=native/build/mesh/build/bin

case "${1:-}" in
  build)
    { nvidia-smi -L; nproc; for t in git cmake ninja nvcc python3 ccache; do printf '%s: %s\n' "$t" "$(command -v $t || echo MISSING)"; done; } 2>&1 | tee "$OUT/machine.txt"
    export MESH_LLAMA_CUDA=1 MESH_LLAMA_CUDA_ARCHS="${MESH_LLAMA_CUDA_ARCHS:-90}" MESH_LLAMA_JOBS="$(nproc)"
    start=$(date +%s)
    if command -v git >/dev/null; then
      native/build.sh 2>&1 | tee "$OUT/build.txt"
      rc=${PIPESTATUS[0]}
    else
      # no git to clone the bundle: the same patched source, prepared where git exists (.gpu/src-patched.tar.gz)
      echo "no git here: building .gpu/src-patched.tar.gz with the same cmake options as native/build.sh" | tee "$OUT/build.txt"
      mkdir -p native/build/mesh/src && tar -xzf .gpu/src-patched.tar.gz -C native/build/mesh/src &&
        cmake -S native/build/mesh/src -B native/build/mesh/build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_RPC=ON \
          -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF \
          -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$MESH_LLAMA_CUDA_ARCHS" >>"$OUT/build.txt" 2>&1 &&
        cmake --build native/build/mesh/build -j "$MESH_LLAMA_JOBS" --target llama-server ggml-rpc-server llama-bench >>"$OUT/build.txt" 2>&1
      rc=$?
      tail -5 "$OUT/build.txt"
    fi
    echo "build exit $rc after $(( $(date +%s) - start )) s" | tee -a "$OUT/machine.txt"
    exit "$rc"
    ;;
  bench)
    src=native/build/mesh/src
    [ -x "$BIN/llama-server" ] || { echo "no build in $BIN: run '$0 build' first (on the same warm machine)"; exit 1; }
    rc=0
    # layers:embd:ff:type, one table set per model
    for spec in ${GPU_MODELS:-16:2048:5632:f16}; do
      IFS=: read -r layers embd ff type <<<"$spec"
      model="/tmp/mesh-gpu-$layers-$embd-$ff-$type.gguf"
      start=$(date +%s)
      PYTHONUNBUFFERED=1 python3 native/tools/make-model.py --src "$src" --out "$model" \
        --layers "$layers" --embd "$embd" --ff "$ff" --type "$type" 2>&1 | tail -1
      echo "model made in $(( $(date +%s) - start )) s"
      PYTHONUNBUFFERED=1 python3 native/tools/gpu-bench.py --bin "$BIN" --model "$model" --md "$OUT/gpu-$layers-$embd-$type.md" \
        --logdir "/tmp/gpu-logs-$type" --reps "${GPU_REPS:-2}" 2>&1 | tee -a "$OUT/bench.txt"
      r=${PIPESTATUS[0]}
      # on failure, bring back the ends of the logs that explain it
      [ "$r" = 0 ] || { rc=$r; (cd "/tmp/gpu-logs-$type" && tail -n 40 ./* > "$OUT/logs-tail-$type.txt" 2>/dev/null); }
      rm -f "$model"
    done
    exit "$rc"
    ;;
  *) echo "usage: $0 build|bench" >&2; exit 2 ;;
esac
