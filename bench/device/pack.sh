#!/usr/bin/env bash
# Packs what the borrowed GPU machine lacks into .device/ (ignored by git), so that one `run` call can build
# llama.cpp with CUDA and run the whole mesh benchmark there (bench/device/run.sh; see README.md beside it):
#   .device/node.xz                 this machine's node binary, stripped (the GPU machine has no Node.js)
#   .device/node_modules.tar.xz     production node_modules (npm ci --omit=dev), plus `openai` (dev dependency
#                                   that test/e2e-support.ts, which the bench imports, needs)
#   .device/llama-src.tar.xz        the pinned llama.cpp release with native/patches applied, no .git, docs or
#                                   models (but models/ggml-vocab-llama-spm.gguf, the generated models' vocab)
#   .device/MANIFEST.txt            what each piece was made from; a piece whose inputs are unchanged is kept
# usage: bench/device/pack.sh [--force]      (run here, from anywhere; needs node, npm/npx, git, xz)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="$PWD"
DEV="$ROOT/.device"
FORCE=0
[ "${1:-}" = --force ] && FORCE=1
. native/pin.env
mkdir -p "$DEV"
touch "$DEV/MANIFEST.txt"
say() { printf '[pack] %s\n' "$*" >&2; }
key_of() { sed -n "s/^$1 key=\([^ ]*\).*/\1/p" "$DEV/MANIFEST.txt"; }
record() { # piece key detail
  grep -v "^$1 " "$DEV/MANIFEST.txt" >"$DEV/MANIFEST.new" || true
  printf '%s key=%s %s\n' "$1" "$2" "$3" >>"$DEV/MANIFEST.new"
  mv "$DEV/MANIFEST.new" "$DEV/MANIFEST.txt"
}
fresh() { [ "$FORCE" = 0 ] && [ -f "$DEV/$2" ] && [ "$(key_of "$1")" = "$3" ]; }
WORK="$(mktemp -d /tmp/mesh-pack.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

# ---- node ------------------------------------------------------------------------------------------
NODE="$(command -v node)"
NODE_KEY="$(node -p 'process.version + "-" + process.arch')-$(sha256sum "$NODE" | cut -c1-16)"
if fresh node node.xz "$NODE_KEY"; then say "node.xz up to date ($NODE_KEY)"
else
  say "node $(node -v) from $NODE: strip + xz (a minute or two)"
  cp "$NODE" "$WORK/node"; strip "$WORK/node" 2>/dev/null || true
  xz -T2 -7 -c "$WORK/node" >"$DEV/node.xz.tmp" && mv "$DEV/node.xz.tmp" "$DEV/node.xz"
  record node "$NODE_KEY" "$(node -v) from $NODE"
fi

# ---- production node_modules ----------------------------------------------------------------------------
NM_KEY="$(cat package.json package-lock.json | sha256sum | cut -c1-16)"
if fresh node_modules node_modules.tar.xz "$NM_KEY"; then say "node_modules.tar.xz up to date"
else
  say "npm ci --omit=dev --ignore-scripts in a temp copy of package.json / package-lock.json"
  mkdir -p "$WORK/nm"; cp package.json package-lock.json "$WORK/nm/"
  (cd "$WORK/nm" && npx --yes npm@10.9.4 ci --omit=dev --ignore-scripts --no-audit --no-fund --loglevel=error >&2)
  # test/e2e-support.ts imports `openai` (a dev dependency, no dependencies of its own): take the locked one
  OPENAI_V="$(node -p 'require("./package-lock.json").packages["node_modules/openai"].version')"
  if [ "$(node -p 'try { require("./node_modules/openai/package.json").version } catch { "" }')" = "$OPENAI_V" ]; then
    cp -r node_modules/openai "$WORK/nm/node_modules/openai"
  else
    (cd "$WORK/nm" && npx --yes npm@10.9.4 pack "openai@$OPENAI_V" --silent >/dev/null && mkdir -p node_modules/openai &&
      tar -xzf "openai-$OPENAI_V.tgz" -C node_modules/openai --strip-components=1 && rm "openai-$OPENAI_V.tgz")
  fi
  for need in tsx/package.json @number0/iroh/package.json @number0/iroh-linux-x64-gnu/package.json openai/package.json \
              esbuild/package.json @esbuild/linux-x64/bin/esbuild xstate/package.json fastify/package.json; do
    [ -e "$WORK/nm/node_modules/$need" ] || { say "FAILED: node_modules/$need missing"; exit 1; }
  done
  ls "$WORK/nm/node_modules/@number0/iroh-linux-x64-gnu/"*.node >/dev/null || { say "FAILED: no iroh .node binary"; exit 1; }
  # what the bench never reads: docs, maps, type declarations
  find "$WORK/nm/node_modules" -type f \( -name '*.map' -o -name '*.md' -o -name '*.d.ts' -o -name '*.d.mts' -o -name '*.d.cts' \) -delete
  say "node_modules: $(du -sh "$WORK/nm/node_modules" | cut -f1) unpacked; xz"
  tar -C "$WORK/nm" -cf - node_modules | xz -T2 -9 >"$DEV/node_modules.tar.xz.tmp"
  mv "$DEV/node_modules.tar.xz.tmp" "$DEV/node_modules.tar.xz"
  record node_modules "$NM_KEY" "npm ci --omit=dev of package-lock.json + openai@$OPENAI_V"
fi

# ---- patched llama.cpp source ---------------------------------------------------------------------------
PATCH_KEY="$(for p in native/patches/*.patch; do basename "$p"; cat "$p"; done | sha256sum | cut -c1-16)"
SRC_KEY="${LLAMA_COMMIT:0:12}-$PATCH_KEY"
if fresh llama-src llama-src.tar.xz "$SRC_KEY"; then say "llama-src.tar.xz up to date"
else
  # the git objects of the pinned commit: native/build.sh's checkout, else its bundle (from npm ci's build)
  GITDIR=""
  for d in native/build/mesh/src native/build/stock/src; do
    if git -C "$d" cat-file -e "$LLAMA_COMMIT^{commit}" 2>/dev/null; then GITDIR="$d"; break; fi
  done
  if [ -z "$GITDIR" ]; then
    B=""
    for b in "native/cache/$LLAMA_NPM_PACKAGE-$LLAMA_NPM_VERSION/gitRelease.bundle" "node_modules/$LLAMA_NPM_PACKAGE/llama/gitRelease.bundle"; do
      [ -f "$b" ] && { B="$b"; break; }
    done
    [ -n "$B" ] || { say "FAILED: no llama.cpp source: run native/build.sh (npm ci does) first"; exit 1; }
    git clone --quiet --bare "$B" "$WORK/llama.git"; GITDIR="$WORK/llama.git"
  fi
  say "llama.cpp ${LLAMA_COMMIT:0:12} from $GITDIR + $(ls native/patches/*.patch | wc -l) patches"
  mkdir -p "$WORK/src"
  git -C "$GITDIR" archive --format=tar "$LLAMA_COMMIT" -- . ':(exclude)docs' ':(exclude)models' ':(exclude)media' | tar -xf - -C "$WORK/src"
  git -C "$GITDIR" archive --format=tar "$LLAMA_COMMIT" -- models/ggml-vocab-llama-spm.gguf | tar -xf - -C "$WORK/src"
  for p in native/patches/*.patch; do (cd "$WORK/src" && git apply --whitespace=nowarn "$ROOT/$p"); done
  for p in native/patches/*.patch; do basename "$p"; done >"$WORK/src/MESH_PATCHES.txt"
  echo "$LLAMA_COMMIT" >"$WORK/src/MESH_LLAMA_COMMIT.txt"
  tar -C "$WORK" -cf - src | xz -T2 -9 >"$DEV/llama-src.tar.xz.tmp"
  mv "$DEV/llama-src.tar.xz.tmp" "$DEV/llama-src.tar.xz"
  record llama-src "$SRC_KEY" "llama.cpp $LLAMA_COMMIT + $(ls native/patches | tr '\n' ' ')"
fi

# ---- what travels --------------------------------------------------------------------------------------
dev=$(du -cb "$DEV"/* | tail -1 | cut -f1)
tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 du -cb 2>/dev/null | awk '$2 == "total" { s += $1 } END { print s + 0 }')
say "$(ls -l "$DEV" | awk 'NR > 1 { printf "%s %.1f MiB; ", $9, $5 / 1048576 }')"
say "travels: .device $(awk -v b="$dev" 'BEGIN { printf "%.1f", b / 1048576 }') MiB + working tree $(awk -v b="$tree" 'BEGIN { printf "%.1f", b / 1048576 }') MiB = $(awk -v b=$((dev + tree)) 'BEGIN { printf "%.1f", b / 1048576 }') MiB (limit 64 MiB)"
[ $((dev + tree)) -lt $((60 * 1048576)) ] || { say "WARNING: over 60 MiB: the run tool refuses over 64 MiB"; exit 1; }
