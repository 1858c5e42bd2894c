#!/usr/bin/env bash
# Builds llama.cpp's llama-server, ggml-rpc-server and llama-bench from the pinned npm package's git
# bundle (no network but, at most, one `npm pack`), with our patches from native/patches applied.
# Plain bash + cmake so that it also runs where there is no Node.js (the borrowed GPU machine).
#
# usage: native/build.sh [--variant mesh|stock] [--targets "a b c"] [--force] [--check] [--print-bin-dir]
#   --variant stock   the same release without our patches (tests use it to check that patched and
#                     stock binaries interoperate); default: mesh (patched)
#   --check           build nothing: say whether the cached build is reusable, and if not, why (exit 3)
# environment:
#   MESH_LLAMA_SKIP_BUILD=1   do nothing (e.g. `npm install` on a machine that brings its own binaries)
#   MESH_LLAMA_BIN_DIR=DIR    binaries of the user's own: nothing is built, src/io/llama-binaries.ts uses DIR
#   MESH_LLAMA_CUDA=1|0       force the CUDA backend on / off (default: on when `nvidia-smi -L` lists a GPU)
#   MESH_LLAMA_CUDA_ARCHS     CMAKE_CUDA_ARCHITECTURES (default: native, i.e. the GPUs of this machine)
#   MESH_LLAMA_TLS=1|0        the RPC client's TLS-PSK support (patch 0003, links OpenSSL): force on / off
#                             (default: on when OpenSSL >= 1.1.1 headers and libraries are found)
#   MESH_LLAMA_JOBS=N         parallel compile jobs (default: number of CPUs)
#   MESH_LLAMA_CMAKE_ARGS     extra cmake arguments (part of the cache key)
#   MESH_LLAMA_TARGETS        targets to build (default: llama-server ggml-rpc-server llama-bench)
#   MESH_LLAMA_BUILD_ROOT     where source trees and build trees go (default: native/build)
#   MESH_LLAMA_BUNDLE=FILE    use this gitRelease.bundle instead of looking for the npm package
#   MESH_LLAMA_CACHE_DIR      where the npm tarball is kept and unpacked (default native/cache)
set -euo pipefail
# Everything runs inside main(), which bash parses whole before running: editing or updating this file
# while a build is running cannot change what that build does next.
main() {

NATIVE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$NATIVE_DIR/.." && pwd)"
# shellcheck source=pin.env
. "$NATIVE_DIR/pin.env"

VARIANT=mesh
FORCE=0
PRINT_BIN_DIR=0
CHECK=0
TARGETS="${MESH_LLAMA_TARGETS:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --variant) VARIANT="${2:-}"; shift 2 ;;
    --variant=*) VARIANT="${1#*=}"; shift ;;
    --targets) TARGETS="${2:-}"; shift 2 ;;
    --targets=*) TARGETS="${1#*=}"; shift ;;
    --force) FORCE=1; shift ;;
    --check) CHECK=1; shift ;;
    --print-bin-dir) PRINT_BIN_DIR=1; shift ;;
    -h|--help) sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "native/build.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done
case "$VARIANT" in
  mesh) PATCH_DIR="$NATIVE_DIR/patches"; TARGETS="${TARGETS:-llama-server ggml-rpc-server llama-bench}" ;;
  stock) PATCH_DIR=""; TARGETS="${TARGETS:-ggml-rpc-server llama-server}" ;;
  *) echo "native/build.sh: --variant must be 'mesh' or 'stock', not '$VARIANT'" >&2; exit 2 ;;
esac

BUILD_ROOT="${MESH_LLAMA_BUILD_ROOT:-$NATIVE_DIR/build}"
VARIANT_DIR="$BUILD_ROOT/$VARIANT"
SRC_DIR="$VARIANT_DIR/src"
OUT_DIR="$VARIANT_DIR/build"
BIN_DIR="$OUT_DIR/bin"
CACHE_DIR="${MESH_LLAMA_CACHE_DIR:-$NATIVE_DIR/cache}"
LOG="$VARIANT_DIR/build.log"

if [ "$PRINT_BIN_DIR" = 1 ]; then echo "$BIN_DIR"; exit 0; fi

T0=$(date +%s)
elapsed() { local s=$(( $(date +%s) - T0 )); printf '%02d:%02d' $((s / 60)) $((s % 60)); }
step() { printf '[native %s] %s\n' "$(elapsed)" "$*" >&2; }
die() {
  printf '\n[native %s] FAILED: %s\n' "$(elapsed)" "$1" >&2
  shift
  for line in "$@"; do printf '    %s\n' "$line" >&2; done
  printf '    (to install without building llama.cpp: MESH_LLAMA_SKIP_BUILD=1, or MESH_LLAMA_BIN_DIR=<your binaries>)\n' >&2
  exit 1
}

if [ "${MESH_LLAMA_SKIP_BUILD:-0}" = 1 ]; then
  step "MESH_LLAMA_SKIP_BUILD=1: not building llama.cpp"
  exit 0
fi
if [ -n "${MESH_LLAMA_BIN_DIR:-}" ] && [ "$VARIANT" = mesh ]; then
  step "MESH_LLAMA_BIN_DIR=$MESH_LLAMA_BIN_DIR: using those binaries, not building"
  exit 0
fi

OS="$(uname -s)"
ARCH="$(uname -m)"
install_hint() { # what to run to get a missing tool, per platform
  case "$OS" in
    Darwin) echo "macOS: $2" ;;
    *) if command -v apt-get >/dev/null 2>&1; then echo "Debian/Ubuntu: sudo apt-get install -y $1"
       elif command -v dnf >/dev/null 2>&1; then echo "Fedora/RHEL: sudo dnf install -y $1"
       elif command -v apk >/dev/null 2>&1; then echo "Alpine: sudo apk add $1"
       else echo "install '$1' with your system's package manager"; fi ;;
  esac
}

# ---------------------------------------------------------------------------------------------
step "1/5 checking tools"
command -v cmake >/dev/null 2>&1 || die "cmake is missing" "$(install_hint cmake 'brew install cmake')"
command -v git >/dev/null 2>&1 || die "git is missing (it unpacks llama.cpp's source from the npm package's git bundle)" \
  "$(install_hint git 'xcode-select --install')"
CXX_BIN="${CXX:-}"
if [ -z "$CXX_BIN" ]; then
  for c in c++ g++ clang++; do if command -v "$c" >/dev/null 2>&1; then CXX_BIN="$c"; break; fi; done
fi
CC_BIN="${CC:-}"
if [ -z "$CC_BIN" ]; then
  for c in cc gcc clang; do if command -v "$c" >/dev/null 2>&1; then CC_BIN="$c"; break; fi; done
fi
[ -n "$CXX_BIN" ] && [ -n "$CC_BIN" ] || die "no C/C++ compiler found (cc and c++)" \
  "$(install_hint 'g++' 'xcode-select --install')"
GENERATOR="Unix Makefiles"
if command -v ninja >/dev/null 2>&1; then GENERATOR="Ninja"
elif ! command -v make >/dev/null 2>&1; then die "neither ninja nor make is installed" "$(install_hint 'make' 'xcode-select --install')"; fi
if [ -z "${MESH_LLAMA_JOBS:-}" ]; then
  MESH_LLAMA_JOBS="$( (command -v nproc >/dev/null && nproc) || sysctl -n hw.ncpu 2>/dev/null || echo 2)"
fi

# Backend: CUDA when asked, or when a GPU is listed; Metal on macOS; CPU otherwise.
BACKEND=cpu
if [ "$OS" = Darwin ]; then BACKEND=metal; fi
CUDA_WHY=""
if [ "${MESH_LLAMA_CUDA:-}" = 1 ]; then BACKEND=cuda; CUDA_WHY="MESH_LLAMA_CUDA=1"
elif [ "${MESH_LLAMA_CUDA:-}" != 0 ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
  BACKEND=cuda; CUDA_WHY="nvidia-smi lists $(nvidia-smi -L | grep -c '^GPU ') GPU(s)"
fi
if [ "$BACKEND" = cuda ]; then
  NVCC="$(command -v nvcc || true)"
  [ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ] && NVCC=/usr/local/cuda/bin/nvcc
  [ -n "$NVCC" ] || die "CUDA build wanted ($CUDA_WHY) but nvcc is not installed" \
    "install the CUDA toolkit (https://developer.nvidia.com/cuda-downloads, or $(install_hint nvidia-cuda-toolkit '-'))" \
    "or build for the CPU with MESH_LLAMA_CUDA=0"
fi

CMAKE_ARGS=(
  -G "$GENERATOR"
  -DCMAKE_BUILD_TYPE=Release
  -DCMAKE_C_COMPILER="$CC_BIN" -DCMAKE_CXX_COMPILER="$CXX_BIN"
  -DGGML_RPC=ON -DGGML_NATIVE=ON
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
)
case "$BACKEND" in
  cuda) CMAKE_ARGS+=(-DGGML_CUDA=ON -DCMAKE_CUDA_COMPILER="$NVCC" -DCMAKE_CUDA_ARCHITECTURES="${MESH_LLAMA_CUDA_ARCHS:-native}") ;;
  metal) CMAKE_ARGS+=(-DGGML_METAL=ON -DGGML_METAL_EMBED_LIBRARY=ON) ;;
  cpu) CMAKE_ARGS+=(-DGGML_CUDA=OFF -DGGML_METAL=OFF) ;;
esac
# No AMX. -march=native enables it wherever the CPU announces it, but a VM can announce AMX without
# letting a process use the tile state: llama-server then dies of SIGILL (tilezero) as soon as it
# repacks Q8_0 weights for AMX on its own CPU (seen on this project's dev VM). ggml ignores its
# GGML_AMX_* options under GGML_NATIVE, so the ISA is turned off at the compiler: GCC and clang let
# an explicit -mno-* win over -march=native whatever the order. These flags are in CMAKE_ARGS, hence in
# the options key: a build made before them is rebuilt, and ccache hashes the command line.
case "$ARCH" in
  x86_64|amd64|i?86)
    NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    # shellcheck disable=SC2086 # a list of flags
    if echo 'int main(void) { return 0; }' | "$CC_BIN" -march=native $NO_AMX -x c -o /dev/null - >/dev/null 2>&1; then
      CMAKE_ARGS+=(-DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX")
    fi ;;
esac
# The RPC client's TLS 1.3 PSK support (patch 0003) needs OpenSSL >= 1.1.1. -DGGML_RPC_TLS is always
# passed for the mesh variant, so it is in the options key: a build made without it (or before it) is rebuilt.
TLS=off
TLS_NOTE=""
OPENSSL_ROOT=""
if [ "$VARIANT" = mesh ]; then
  if [ "$OS" = Darwin ] && command -v brew >/dev/null 2>&1; then OPENSSL_ROOT="$(brew --prefix openssl@3 2>/dev/null || true)"; fi
  openssl_probe() { # prints OpenSSL's version when a TLS 1.3 PSK client compiles and links
    local flags=() out
    [ -n "$OPENSSL_ROOT" ] && flags=(-I"$OPENSSL_ROOT/include" -L"$OPENSSL_ROOT/lib")
    out="$(mktemp)"
    printf '%s\n' '#include <stdio.h>' '#include <openssl/ssl.h>' '#include <openssl/opensslv.h>' \
      '#if OPENSSL_VERSION_NUMBER < 0x10101000L' '#error OpenSSL 1.1.1 or newer is needed' '#endif' \
      'int main(void) { SSL_CTX *c = SSL_CTX_new(TLS_client_method()); SSL_CTX_set_psk_use_session_callback(c, 0);' \
      '  puts(OPENSSL_VERSION_TEXT); return 0; }' |
      "$CC_BIN" -x c - "${flags[@]}" -lssl -lcrypto -o "$out" >/dev/null 2>&1 && "$out" 2>/dev/null | head -1
    rm -f "$out"
  }
  case "${MESH_LLAMA_TLS:-}" in
    0) TLS_NOTE="off (MESH_LLAMA_TLS=0)" ;;
    *) if ssl_version="$(openssl_probe)" && [ -n "$ssl_version" ]; then TLS=on; TLS_NOTE="on ($ssl_version)"
       elif [ "${MESH_LLAMA_TLS:-}" = 1 ]; then die "MESH_LLAMA_TLS=1 but OpenSSL >= 1.1.1 (headers and libraries) is not found" \
         "$(install_hint libssl-dev 'brew install openssl@3')"
       else TLS_NOTE="off: no OpenSSL >= 1.1.1 found (for the encrypted data path: $(install_hint libssl-dev 'brew install openssl@3'))"; fi ;;
  esac
  if [ "$TLS" = on ]; then CMAKE_ARGS+=(-DGGML_RPC_TLS=ON); [ -n "$OPENSSL_ROOT" ] && CMAKE_ARGS+=(-DOPENSSL_ROOT_DIR="$OPENSSL_ROOT")
  else CMAKE_ARGS+=(-DGGML_RPC_TLS=OFF); fi
fi
if [ -n "${MESH_LLAMA_CMAKE_ARGS:-}" ]; then
  # shellcheck disable=SC2206 # word splitting is the point: a list of -D options
  EXTRA=( ${MESH_LLAMA_CMAKE_ARGS} )
  CMAKE_ARGS+=("${EXTRA[@]}")
fi

hash_stdin() {
  if command -v sha256sum >/dev/null 2>&1; then sha256sum | cut -c1-64
  elif command -v shasum >/dev/null 2>&1; then shasum -a 256 | cut -c1-64
  else openssl dgst -sha256 | sed 's/.*= //'; fi
}

# The CPU as the compiler sees it for -march=native: a build for another CPU is never reused.
cpu_identity() {
  if "$CC_BIN" -march=native -Q --help=target >/dev/null 2>&1; then
    "$CC_BIN" -march=native -Q --help=target 2>/dev/null | grep -E '^\s+-m' | tr -s ' \t' ' '
  elif [ "$OS" = Darwin ]; then
    sysctl -n machdep.cpu.brand_string hw.optional 2>/dev/null; uname -m
  else
    grep -m1 -E '^(model name|flags|Features)' /proc/cpuinfo 2>/dev/null; grep -m1 '^flags' /proc/cpuinfo 2>/dev/null; uname -m
  fi
}
compiler_identity() {
  command -v "$CC_BIN"; "$CC_BIN" --version 2>&1 | head -1
  command -v "$CXX_BIN"; "$CXX_BIN" --version 2>&1 | head -1
  if [ "$BACKEND" = cuda ]; then echo "$NVCC"; "$NVCC" --version 2>&1 | tail -2
    nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader 2>/dev/null || true; fi
}
patch_files() { if [ -n "$PATCH_DIR" ] && [ -d "$PATCH_DIR" ]; then find "$PATCH_DIR" -maxdepth 1 -name '*.patch' | LC_ALL=C sort; fi; }
patches_identity() { local p; for p in $(patch_files); do basename "$p"; cat "$p"; done; }

CPU_FILE="$VARIANT_DIR/cpu.txt"
CPU_KEY="$(cpu_identity | hash_stdin)"
COMPILER_KEY="$(compiler_identity | hash_stdin)"
PATCH_KEY="$(patches_identity | hash_stdin)"
OPTIONS_KEY="$(printf '%s\n' "$BACKEND" "$TARGETS" "${CMAKE_ARGS[@]}" | hash_stdin)"
BUILD_KEY="$(printf 'source=%s\npatches=%s\noptions=%s\ncompiler=%s\ncpu=%s\n' \
  "$LLAMA_COMMIT" "$PATCH_KEY" "$OPTIONS_KEY" "$COMPILER_KEY" "$CPU_KEY" | hash_stdin)"

all_targets_present() { local t; for t in $TARGETS; do [ -x "$BIN_DIR/$t" ] || return 1; done; }
if [ "$CHECK" = 1 ]; then
  reasons=()
  differs() { [ "$(cat "$VARIANT_DIR/$1" 2>/dev/null || true)" != "$2" ]; }
  differs cpu.key "$CPU_KEY" && reasons+=("cpu")
  differs compiler.key "$COMPILER_KEY" && reasons+=("compiler")
  differs options.key "$OPTIONS_KEY" && reasons+=("options")
  differs patches.applied "$PATCH_KEY" && reasons+=("patches")
  all_targets_present || reasons+=("binaries-missing")
  differs build.key "$BUILD_KEY" && [ ${#reasons[@]} -eq 0 ] && reasons+=("unfinished")
  if [ ${#reasons[@]} -eq 0 ]; then echo "up-to-date $BIN_DIR"; exit 0; fi
  echo "stale: ${reasons[*]}"; exit 3
fi
if [ "$FORCE" = 0 ] && [ -f "$VARIANT_DIR/build.key" ] && [ "$(cat "$VARIANT_DIR/build.key")" = "$BUILD_KEY" ] && all_targets_present; then
  step "up to date: $BIN_DIR ($VARIANT, $BACKEND, key ${BUILD_KEY:0:12})"
  exit 0
fi
mkdir -p "$VARIANT_DIR"
# One build per tree at a time (`npm install` in a second shell, tests that build on demand): wait for
# the other one, or take over its lock if its process is gone.
LOCK="$VARIANT_DIR/.lock"
waited=0
until mkdir "$LOCK" 2>/dev/null; do
  holder="$(cat "$LOCK/pid" 2>/dev/null || true)"
  if [ -n "$holder" ] && ! kill -0 "$holder" 2>/dev/null; then rm -rf "$LOCK"; continue; fi
  [ "$waited" = 0 ] && step "      another build of $VARIANT is running (pid ${holder:-?}); waiting for it"
  waited=$((waited + 1))
  [ "$waited" -gt 3600 ] && die "gave up waiting for the build holding $LOCK (pid ${holder:-?})"
  sleep 1
done
echo $$ >"$LOCK/pid"
trap 'rm -rf "$LOCK"' EXIT
if [ "$waited" != 0 ] && [ "$FORCE" = 0 ] && [ "$(cat "$VARIANT_DIR/build.key" 2>/dev/null || true)" = "$BUILD_KEY" ] && all_targets_present; then
  step "up to date (built by the other run): $BIN_DIR"
  exit 0
fi
cpu_identity >"$CPU_FILE.new"; mv "$CPU_FILE.new" "$CPU_FILE"
step "      $BACKEND backend${CUDA_WHY:+ ($CUDA_WHY)}, $GENERATOR, $MESH_LLAMA_JOBS jobs, compiler $CXX_BIN, key ${BUILD_KEY:0:12}"
[ -n "$TLS_NOTE" ] && step "      RPC TLS-PSK client: $TLS_NOTE"

# ---------------------------------------------------------------------------------------------
step "2/5 locating llama.cpp source ($LLAMA_NPM_PACKAGE@$LLAMA_NPM_VERSION, commit ${LLAMA_COMMIT:0:12})"
sri_sha512() { # Subresource Integrity string of a file, as npm writes it
  local b64
  if command -v openssl >/dev/null 2>&1; then b64="$(openssl dgst -sha512 -binary "$1" | openssl base64 -A)"
  elif command -v node >/dev/null 2>&1; then b64="$(node -e 'process.stdout.write(require("crypto").createHash("sha512").update(require("fs").readFileSync(process.argv[1])).digest("base64"))' "$1")"
  elif command -v python3 >/dev/null 2>&1; then b64="$(python3 -c 'import base64,hashlib,sys;print(base64.b64encode(hashlib.sha512(open(sys.argv[1],"rb").read()).digest()).decode())' "$1")"
  else die "cannot compute sha512 (need openssl, node or python3)" "$(install_hint openssl 'brew install openssl')"; fi
  echo "sha512-$b64"
}
TGZ="$CACHE_DIR/$LLAMA_NPM_PACKAGE-$LLAMA_NPM_VERSION.tgz"
UNPACKED="$CACHE_DIR/$LLAMA_NPM_PACKAGE-$LLAMA_NPM_VERSION"
BUNDLE=""
need_bundle() { [ ! -d "$SRC_DIR/.git" ] || [ "$(git -C "$SRC_DIR" rev-parse -q --verify HEAD 2>/dev/null || true)" != "$LLAMA_COMMIT" ]; }
if need_bundle; then
  if [ -n "${MESH_LLAMA_BUNDLE:-}" ]; then
    [ -f "$MESH_LLAMA_BUNDLE" ] || die "MESH_LLAMA_BUNDLE=$MESH_LLAMA_BUNDLE does not exist"
    BUNDLE="$MESH_LLAMA_BUNDLE"; step "      bundle from MESH_LLAMA_BUNDLE"
  elif [ -f "$REPO_DIR/node_modules/$LLAMA_NPM_PACKAGE/llama/gitRelease.bundle" ] &&
       grep -q "\"version\": *\"$LLAMA_NPM_VERSION\"" "$REPO_DIR/node_modules/$LLAMA_NPM_PACKAGE/package.json" 2>/dev/null; then
    # npm already checked this package against package-lock's integrity when it installed it
    BUNDLE="$REPO_DIR/node_modules/$LLAMA_NPM_PACKAGE/llama/gitRelease.bundle"; step "      bundle from node_modules/$LLAMA_NPM_PACKAGE"
  elif [ -f "$UNPACKED/gitRelease.bundle" ]; then
    BUNDLE="$UNPACKED/gitRelease.bundle"; step "      bundle from native/cache (verified when it was unpacked)"
  else
    # The light route: only the package's tarball (35 MB), not the 730 MB it brings as a dependency.
    mkdir -p "$CACHE_DIR"
    if [ ! -f "$TGZ" ]; then
      command -v npm >/dev/null 2>&1 || die "llama.cpp's source is missing: no $TGZ and no npm to fetch it" \
        "on a machine with npm: npm pack $LLAMA_NPM_PACKAGE@$LLAMA_NPM_VERSION --pack-destination native/cache" \
        "then copy that .tgz to native/cache/ here (or set MESH_LLAMA_BUNDLE to a gitRelease.bundle)"
      step "      npm pack $LLAMA_NPM_PACKAGE@$LLAMA_NPM_VERSION (35 MB, once)"
      (cd "$CACHE_DIR" && npm pack "$LLAMA_NPM_PACKAGE@$LLAMA_NPM_VERSION" --silent >/dev/null) ||
        die "npm pack $LLAMA_NPM_PACKAGE@$LLAMA_NPM_VERSION failed (is the npm registry reachable?)"
    fi
    got="$(sri_sha512 "$TGZ")"
    [ "$got" = "$LLAMA_NPM_INTEGRITY" ] || die "$TGZ does not match the pinned integrity" \
      "expected $LLAMA_NPM_INTEGRITY" "got      $got" "delete it and run again to fetch it anew"
    step "      $(basename "$TGZ"): integrity ok"
    rm -rf "$UNPACKED.tmp"; mkdir -p "$UNPACKED.tmp"
    tar -xzf "$TGZ" -C "$UNPACKED.tmp" package/llama/gitRelease.bundle package/llama/llama.cpp.info.json ||
      die "$TGZ has no package/llama/gitRelease.bundle"
    mv "$UNPACKED.tmp/package/llama/gitRelease.bundle" "$UNPACKED.tmp/package/llama/llama.cpp.info.json" "$UNPACKED.tmp/"
    rm -rf "$UNPACKED.tmp/package" "$UNPACKED"; mv "$UNPACKED.tmp" "$UNPACKED"
    BUNDLE="$UNPACKED/gitRelease.bundle"
  fi
  head_commit="$(git bundle list-heads "$BUNDLE" 2>/dev/null | awk '$2 == "HEAD" { print $1 }')"
  [ "$head_commit" = "$LLAMA_COMMIT" ] || die "the bundle $BUNDLE holds commit '${head_commit:-none}', not the pinned $LLAMA_COMMIT" \
    "native/pin.env pins $LLAMA_NPM_PACKAGE@$LLAMA_NPM_VERSION; is another version installed?"
  step "      cloning the bundle into $SRC_DIR"
  rm -rf "$SRC_DIR"
  git clone --quiet --no-checkout "$BUNDLE" "$SRC_DIR" || die "git clone of $BUNDLE failed"
  git -C "$SRC_DIR" -c advice.detachedHead=false checkout --quiet --detach "$LLAMA_COMMIT" || die "checkout of $LLAMA_COMMIT failed"
  rm -f "$VARIANT_DIR/patches.applied"
fi

# ---------------------------------------------------------------------------------------------
step "3/5 applying patches"
if [ "$(cat "$VARIANT_DIR/patches.applied" 2>/dev/null || true)" != "$PATCH_KEY" ]; then
  # Back to the pristine release first; git rewrites only the files that differ, so the rebuild stays
  # incremental (and ccache serves files whose content comes back the same).
  git -C "$SRC_DIR" reset --quiet --hard "$LLAMA_COMMIT"
  git -C "$SRC_DIR" clean --quiet -fd
  rm -f "$VARIANT_DIR/patches.applied"
  n=0
  for p in $(patch_files); do
    out="$(git -C "$SRC_DIR" apply --whitespace=nowarn "$p" 2>&1)" ||
      die "patch $(basename "$p") does not apply to llama.cpp ${LLAMA_COMMIT:0:12}" "$out"
    step "      applied $(basename "$p")"
    n=$((n + 1))
  done
  [ "$n" -gt 0 ] || step "      none ($VARIANT)"
  echo "$PATCH_KEY" >"$VARIANT_DIR/patches.applied"
else
  step "      already applied ($(patch_files | wc -l | tr -d ' ') patches)"
fi

# ---------------------------------------------------------------------------------------------
step "4/5 configuring (cmake)"
if [ -f "$OUT_DIR/CMakeCache.txt" ]; then
  # objects built with -march=native for another CPU, or by another compiler, must not be reused
  if [ "$(cat "$VARIANT_DIR/cpu.key" 2>/dev/null || true)" != "$CPU_KEY" ] ||
     [ "$(cat "$VARIANT_DIR/compiler.key" 2>/dev/null || true)" != "$COMPILER_KEY" ] ||
     ! grep -q "^CMAKE_GENERATOR:INTERNAL=$GENERATOR\$" "$OUT_DIR/CMakeCache.txt"; then
    step "      CPU, compiler or generator changed: starting from an empty build tree"
    rm -rf "$OUT_DIR"
  fi
fi
mkdir -p "$OUT_DIR"
echo "$CPU_KEY" >"$VARIANT_DIR/cpu.key"
echo "$COMPILER_KEY" >"$VARIANT_DIR/compiler.key"
if command -v ccache >/dev/null 2>&1; then
  # Paths relative to the build root so the stock and patched trees share cache entries, and the CPU
  # identity hashed in so an entry compiled for another CPU is never served.
  export CCACHE_BASEDIR="$BUILD_ROOT"
  export CCACHE_EXTRAFILES="$CPU_FILE"
  export CCACHE_NOHASHDIR=1
  CCACHE_NOTE="ccache on"
else
  CCACHE_NOTE="no ccache (rebuilds are slower: $(install_hint ccache 'brew install ccache'))"
fi
: >"$LOG"
if [ "$(cat "$VARIANT_DIR/options.key" 2>/dev/null || true)" != "$OPTIONS_KEY" ] || [ ! -f "$OUT_DIR/CMakeCache.txt" ]; then
  cmake -S "$SRC_DIR" -B "$OUT_DIR" "${CMAKE_ARGS[@]}" >>"$LOG" 2>&1 || {
    tail -25 "$LOG" >&2
    die "cmake configure failed (full log: $LOG)"
  }
  echo "$OPTIONS_KEY" >"$VARIANT_DIR/options.key"
  step "      configured ($CCACHE_NOTE)"
else
  step "      configuration unchanged ($CCACHE_NOTE)"
fi

# ---------------------------------------------------------------------------------------------
step "5/5 building $TARGETS (log: $LOG)"
rm -f "$VARIANT_DIR/build.key"
# shellcheck disable=SC2086 # TARGETS is a list
set +e
cmake --build "$OUT_DIR" --config Release -j "$MESH_LLAMA_JOBS" --target $TARGETS 2>&1 | tee -a "$LOG" | {
  last=0
  while IFS= read -r line; do
    # make prints "[ 42%]", ninja "[123/456]": report one line every 15 s
    pct=""
    case "$line" in
      "["*"%]"*) pct="$(printf '%s' "$line" | sed -n 's/^\[ *\([0-9]*\)%\].*/\1/p')" ;;
      "["*/*"]"*) pct="$(printf '%s' "$line" | sed -n 's/^\[\([0-9]*\)\/\([0-9]*\)\].*/\1 \2/p' | awk '{ if ($2 > 0) printf "%d", 100 * $1 / $2 }')" ;;
    esac
    now=$(date +%s)
    if [ -n "$pct" ] && [ $((now - last)) -ge 15 ]; then
      step "      ${pct}%"
      last=$now
    fi
  done
}
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" -ne 0 ]; then
  grep -E 'error|Error|fatal' "$LOG" | head -20 >&2 || true
  die "the build failed (exit $rc); full log: $LOG"
fi
all_targets_present || die "the build finished but $BIN_DIR lacks one of: $TARGETS"
if [ "$TLS" = on ] && ! grep -q "RPC TLS-PSK client enabled" "$OUT_DIR/CMakeFiles/CMakeOutput.log" "$LOG" 2>/dev/null &&
   ! grep -q "^GGML_RPC_TLS:BOOL=ON" "$OUT_DIR/CMakeCache.txt"; then
  die "OpenSSL was found but the RPC backend was configured without TLS (see $LOG)"
fi

{
  echo "variant=$VARIANT"
  echo "backend=$BACKEND"
  echo "llama_commit=$LLAMA_COMMIT"
  echo "source=$LLAMA_NPM_PACKAGE@$LLAMA_NPM_VERSION"
  for p in $(patch_files); do echo "patch=$(basename "$p") $(hash_stdin <"$p" | cut -c1-16)"; done
  echo "targets=$TARGETS"
  [ "$VARIANT" = mesh ] && echo "rpc_tls=$TLS"
  echo "build_key=$BUILD_KEY"
  echo "built_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$BIN_DIR/mesh-build.txt"
echo "$BUILD_KEY" >"$VARIANT_DIR/build.key"
step "done: $BIN_DIR${TLS_NOTE:+ (RPC TLS-PSK client: $TLS)}"
}

# On the same line as the call: bash reads a script as it runs it, so after main returns it would read on
# at a byte offset that an edit made meanwhile (a `git pull` during `npm install`) has moved.
main "$@"; exit $?
