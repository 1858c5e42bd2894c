// Finds the llama.cpp binaries a node runs (llama-server, ggml-rpc-server, llama-bench), tells whether
// they carry our patches, and builds them with native/build.sh when asked.
import { spawn } from 'node:child_process';
import { accessSync, constants as fsConstants, existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const NATIVE_DIR = fileURLToPath(new URL('../../../native/', import.meta.url));
export const BUILD_SCRIPT = join(NATIVE_DIR, 'build.sh');

/** `mesh` = the release with native/patches applied; `stock` = the same release untouched. */
export type LlamaVariant = 'mesh' | 'stock';

/** Patch ids that a patched RPC backend names in its marker string. */
export const MESH_PATCH_SET_TENSOR_GGUF = 'set-tensor-gguf';
/** The string our patch compiles into the RPC backend (see native/patches/0001-rpc-set-tensor-gguf.patch). */
const PATCH_MARKER = Buffer.from('mesh-inference-patches: ');

export interface LlamaBinaries {
  readonly dir: string;
  /** Where the directory came from: MESH_LLAMA_BIN_DIR, or native/build.sh's output. */
  readonly source: 'MESH_LLAMA_BIN_DIR' | 'native-build';
  readonly llamaServer: string;
  readonly rpcServer: string;
  /** Only when built (the default targets include it) or present in the user's directory. */
  readonly llamaBench: string | undefined;
  /** Our patches found in the RPC code these binaries run, e.g. ["set-tensor-gguf/1"]; empty for stock. */
  readonly patches: readonly string[];
  /** Whether weights can be loaded from each worker's own GGUF (SET_TENSOR_GGUF). */
  readonly setTensorGguf: boolean;
  /** Whether llama.cpp's RPC client can dial a worker's data port with TLS itself (patch 0003, built with OpenSSL). */
  readonly rpcTlsPsk: boolean;
  /** native/build.sh's record of the build (variant, backend, patches, key), when there is one. */
  readonly build: Readonly<Record<string, string>> | undefined;
}

export class LlamaBinariesError extends Error {
  override readonly name = 'LlamaBinariesError';
}

export interface FindOptions {
  readonly variant?: LlamaVariant;
  /** Defaults to process.env. */
  readonly env?: NodeJS.ProcessEnv;
}

function buildRoot(env: NodeJS.ProcessEnv): string {
  return env.MESH_LLAMA_BUILD_ROOT ? resolve(env.MESH_LLAMA_BUILD_ROOT) : join(NATIVE_DIR, 'build');
}

/** Where native/build.sh puts a variant's binaries. */
export function buildBinDir(variant: LlamaVariant = 'mesh', env: NodeJS.ProcessEnv = process.env): string {
  return join(buildRoot(env), variant, 'build', 'bin');
}

/** Where native/build.sh checks out a variant's llama.cpp source (the pinned release; patched for mesh). */
export function buildSourceDir(variant: LlamaVariant = 'mesh', env: NodeJS.ProcessEnv = process.env): string {
  return join(buildRoot(env), variant, 'src');
}

function executable(path: string): boolean {
  try {
    accessSync(path, fsConstants.X_OK);
    return statSync(path).isFile();
  } catch {
    return false;
  }
}

/** Where the binaries are, found without reading them (synchronous: for test set-up too). */
export type LocatedLlamaBinaries = Pick<LlamaBinaries, 'dir' | 'source' | 'llamaServer' | 'rpcServer' | 'llamaBench'>;

/**
 * The one precedence for src, tests and benchmarks: MESH_LLAMA_BIN_DIR first (the mesh variant only: the
 * user's own build), then native/build.sh's output of the variant. Throws LlamaBinariesError saying what is
 * missing and how to get it.
 */
export function locateLlamaBinaries(opts: FindOptions = {}): LocatedLlamaBinaries {
  const env = opts.env ?? process.env;
  const variant = opts.variant ?? 'mesh';
  const userDir = variant === 'mesh' ? env.MESH_LLAMA_BIN_DIR : undefined;
  const dir = userDir ? resolve(userDir) : buildBinDir(variant, env);
  const source = userDir ? 'MESH_LLAMA_BIN_DIR' : 'native-build';

  const howToGet = userDir
    ? `MESH_LLAMA_BIN_DIR=${userDir} must hold llama-server and ggml-rpc-server (a llama.cpp build with -DGGML_RPC=ON); unset it to use our own build`
    : variant === 'mesh'
      ? 'build them with `npm run build:native` (native/build.sh; needs cmake and a C++ compiler), or set MESH_LLAMA_BIN_DIR to a directory with your own llama-server and ggml-rpc-server'
      : 'build them with `native/build.sh --variant stock`';
  if (!existsSync(dir)) {
    throw new LlamaBinariesError(`no llama.cpp binaries (${variant}): ${dir} does not exist; ${howToGet}`);
  }
  const llamaServer = join(dir, 'llama-server');
  // older releases called it rpc-server
  const rpcServer = [join(dir, 'ggml-rpc-server'), join(dir, 'rpc-server')].find(executable);
  const bench = join(dir, 'llama-bench');
  const missing = [
    ...(variant === 'mesh' && !executable(llamaServer) ? ['llama-server'] : []),
    ...(rpcServer ? [] : ['ggml-rpc-server']),
  ];
  if (missing.length > 0) {
    throw new LlamaBinariesError(`no ${missing.join(' or ')} in ${dir}; ${howToGet}`);
  }
  return { dir, source, llamaServer, rpcServer: rpcServer!, llamaBench: executable(bench) ? bench : undefined };
}

/** locateLlamaBinaries, plus what the binaries are: our patches in them and native/build.sh's record. */
export async function findLlamaBinaries(opts: FindOptions = {}): Promise<LlamaBinaries> {
  const found = locateLlamaBinaries(opts);
  const patches = await detectMeshPatches(found.dir, [found.rpcServer, found.llamaServer]);
  return {
    ...found,
    patches,
    setTensorGguf: patches.some((p) => p.startsWith(`${MESH_PATCH_SET_TENSOR_GGUF}/`)),
    rpcTlsPsk: patches.some((p) => p.startsWith('rpc-tls-psk/')),
    build: readBuildRecord(found.dir),
  };
}

function readBuildRecord(dir: string): Record<string, string> | undefined {
  const file = join(dir, 'mesh-build.txt');
  if (!existsSync(file)) return undefined;
  const out: Record<string, string> = {};
  for (const line of readFileSync(file, 'utf8').split('\n')) {
    const eq = line.indexOf('=');
    if (eq <= 0) continue;
    const k = line.slice(0, eq);
    // several patch= lines: keep them all
    out[k] = out[k] === undefined ? line.slice(eq + 1) : `${out[k]}, ${line.slice(eq + 1)}`;
  }
  return out;
}

/**
 * Reads the patch marker out of the RPC backend the binaries run: libggml-rpc next to them when
 * llama.cpp was built with shared libraries, else the executables themselves (static builds).
 */
export async function detectMeshPatches(dir: string, executables: readonly string[]): Promise<string[]> {
  const libs = readdirSync(dir).filter((f) => /^libggml-rpc\.(so|dylib)(\.|$)|^ggml-rpc\.dll$/.test(f));
  const candidates = libs.length > 0 ? libs.map((f) => join(dir, f)) : executables.filter(executable);
  const found = new Set<string>();
  for (const file of candidates) {
    for (const marker of await scanForMarker(file)) {
      for (const p of marker.split(/[ ,]+/).filter(Boolean)) found.add(p);
    }
  }
  return [...found].sort();
}

/** The text after every PATCH_MARKER in a file, up to its NUL; streamed, so a big binary costs no memory. */
async function scanForMarker(file: string): Promise<string[]> {
  const fh = await open(file, 'r');
  const results: string[] = [];
  try {
    const chunkSize = 1 << 20;
    const overlap = 256;
    const buf = Buffer.alloc(chunkSize + overlap);
    let carry = 0;
    let pos = 0;
    for (;;) {
      const { bytesRead } = await fh.read(buf, carry, chunkSize, pos);
      if (bytesRead === 0) break;
      pos += bytesRead;
      const view = buf.subarray(0, carry + bytesRead);
      let i = view.indexOf(PATCH_MARKER);
      while (i >= 0) {
        const end = view.indexOf(0, i);
        if (end < 0) break; // cut by the chunk: found again with the overlap
        results.push(view.subarray(i + PATCH_MARKER.length, end).toString('latin1'));
        i = view.indexOf(PATCH_MARKER, end);
      }
      carry = Math.min(overlap, view.length);
      view.copy(buf, 0, view.length - carry);
    }
  } finally {
    await fh.close();
  }
  return [...new Set(results)];
}

export interface BuildOptions {
  readonly variant?: LlamaVariant;
  readonly env?: NodeJS.ProcessEnv;
  /** Each progress line of native/build.sh (steps with elapsed time). */
  readonly onLine?: (line: string) => void;
  readonly signal?: AbortSignal;
}

/**
 * Runs native/build.sh for a variant (seconds when its build is up to date). Rejects with
 * LlamaBinariesError carrying the script's own explanation (what is missing, how to install it).
 */
export function buildLlamaBinaries(opts: BuildOptions = {}): Promise<void> {
  const variant = opts.variant ?? 'mesh';
  const env = { ...(opts.env ?? process.env) };
  // the user's own binaries make the script skip; building stock must ignore that
  if (variant === 'stock') delete env.MESH_LLAMA_BIN_DIR;
  return new Promise((resolvePromise, reject) => {
    const child = spawn('bash', [BUILD_SCRIPT, '--variant', variant], {
      env,
      stdio: ['ignore', 'pipe', 'pipe'],
      signal: opts.signal,
    });
    const tail: string[] = [];
    const onData = (chunk: Buffer): void => {
      for (const line of chunk.toString('utf8').split('\n')) {
        if (!line) continue;
        tail.push(line);
        if (tail.length > 40) tail.shift();
        opts.onLine?.(line);
      }
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    child.on('error', (e) => reject(new LlamaBinariesError(`cannot run ${BUILD_SCRIPT}: ${e.message}`)));
    child.on('close', (code) => {
      if (code === 0) resolvePromise();
      else reject(new LlamaBinariesError(`native/build.sh --variant ${variant} failed (exit ${code}):\n${tail.join('\n')}`));
    });
  });
}

/** Whether the environment forbids building (then callers that need binaries must say so and stop). */
export function buildDisabled(env: NodeJS.ProcessEnv = process.env): boolean {
  return env.MESH_LLAMA_SKIP_BUILD === '1';
}

/**
 * The binaries of a variant, built first unless building is disabled or the user brought their own.
 * With building disabled and nothing found, throws the finder's explanation.
 */
export async function ensureLlamaBinaries(opts: BuildOptions = {}): Promise<LlamaBinaries> {
  const env = opts.env ?? process.env;
  const variant = opts.variant ?? 'mesh';
  const userOwn = variant === 'mesh' && !!env.MESH_LLAMA_BIN_DIR;
  if (!buildDisabled(env) && !userOwn) await buildLlamaBinaries(opts);
  return findLlamaBinaries({ variant, env });
}
