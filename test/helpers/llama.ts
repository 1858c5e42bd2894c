// Test helper: real llama.cpp processes on loopback (ggml-rpc-server, llama-server) on free ports,
// readiness waits, greedy completions with exact token ids, generated tiny models, and cleanup.
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { generateLlamaGguf, type LlamaModelSpec } from '../../src/io/gguf/gguf-writer.ts';
import { buildBinDir, type LlamaVariant } from '../../src/io/llama/llama-binaries.ts';
import { spawnManaged, type ManagedProcess } from '../../src/io/llama/processes.ts';
import { rpcHello } from '../../src/io/llama/rpc-traffic.ts';

/** The binaries are not there: the message says how to get them. */
export class LlamaBinariesMissing extends Error {
  override readonly name = 'LlamaBinariesMissing';
}

export interface LlamaBinaries {
  readonly dir: string;
  /** `user` = $MESH_LLAMA_BIN_DIR; `mesh` = native/build.sh with our patches; `stock` = unpatched. */
  readonly variant: 'user' | LlamaVariant;
  readonly llamaServer: string;
  readonly rpcServer: string;
}

export interface LlamaBinariesOptions {
  /** Only this variant; default: $MESH_LLAMA_BIN_DIR, else our build, else a stock build. */
  readonly variant?: LlamaVariant;
}

const hasBinaries = (dir: string) => existsSync(join(dir, 'llama-server')) && existsSync(join(dir, 'ggml-rpc-server'));

/**
 * Finds llama-server and ggml-rpc-server (synchronously, for beforeAll and test bodies). Throws
 * LlamaBinariesMissing, never skips: a test that needs them must fail loudly without them.
 * Our patched build and a stock one both serve these tests: patched binaries fall back to the stock
 * protocol unless an rpc-server is given its own GGUF.
 */
export function llamaBinaries(opts: LlamaBinariesOptions = {}): LlamaBinaries {
  const candidates: { dir: string; variant: LlamaBinaries['variant'] }[] = [];
  const userDir = process.env.MESH_LLAMA_BIN_DIR;
  if (!opts.variant && userDir) candidates.push({ dir: userDir, variant: 'user' });
  if (!opts.variant || opts.variant === 'mesh') candidates.push({ dir: buildBinDir('mesh'), variant: 'mesh' });
  if (!opts.variant || opts.variant === 'stock') {
    candidates.push({ dir: buildBinDir('stock'), variant: 'stock' });
  }
  // An explicit MESH_LLAMA_BIN_DIR is the user's choice: no falling back past it.
  const searched = candidates[0]?.variant === 'user' ? candidates.slice(0, 1) : candidates;
  const found = searched.find((c) => hasBinaries(c.dir));
  if (!found) {
    const how =
      opts.variant === 'stock'
        ? 'Build them with `bash native/build.sh --variant stock`.'
        : 'Build them with `npm run build:native`, or point MESH_LLAMA_BIN_DIR at a directory holding llama-server and ggml-rpc-server.';
    throw new LlamaBinariesMissing(
      `llama.cpp binaries not found (looked for llama-server and ggml-rpc-server in ${searched.map((c) => c.dir).join(', ')}). ${how}`,
    );
  }
  return {
    dir: found.dir,
    variant: found.variant,
    llamaServer: join(found.dir, 'llama-server'),
    rpcServer: join(found.dir, 'ggml-rpc-server'),
  };
}

/** A TCP port that was free a moment ago (callers check that their server really got it). */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const addr = s.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      s.close(() => resolve(port));
    });
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function exitedEarly(p: ManagedProcess, what: string): Error {
  const info = p.exitInfo();
  return new Error(
    `${what} exited (code ${info?.code}, signal ${info?.signal}) before it was ready; last output:\n` +
      p.tail().slice(-30).join('\n'),
  );
}

export interface RpcServerHandle {
  readonly process: ManagedProcess;
  readonly port: number;
  /** "127.0.0.1:PORT", as `--rpc` wants it. */
  readonly address: string;
  stop(): Promise<void>;
}

export interface RpcServerOptions {
  /** Which binaries; default llamaBinaries(). */
  readonly binaries?: LlamaBinaries;
  /** CPU threads (-t); default 1, so that split and solo runs compute alike on a 2-core machine. */
  readonly threads?: number;
  readonly extraArgs?: readonly string[];
  readonly env?: Readonly<Record<string, string>>;
  readonly readyTimeoutMs?: number;
}

/** Starts a ggml-rpc-server on 127.0.0.1 and waits until it answers HELLO. */
export async function startRpcServer(opts: RpcServerOptions = {}): Promise<RpcServerHandle> {
  const bins = opts.binaries ?? llamaBinaries();
  const deadline = Date.now() + (opts.readyTimeoutMs ?? 20_000);
  for (let attempt = 0; ; attempt++) {
    const port = await freePort();
    const proc = spawnManaged({
      name: `rpc-server:${port}`,
      file: bins.rpcServer,
      // A numeric host: "localhost" is refused ("Invalid host address") with exit status 0.
      args: ['-H', '127.0.0.1', '-p', String(port), '-t', String(opts.threads ?? 1), ...(opts.extraArgs ?? [])],
      // Keep traffic on TCP where a counting proxy can see it, even on a host with RDMA.
      env: { GGML_RPC_NO_RDMA: '1', ...opts.env },
    });
    const handle: RpcServerHandle = {
      process: proc,
      port,
      address: `127.0.0.1:${port}`,
      stop: async () => void (await proc.stop(3_000)),
    };
    for (;;) {
      if (proc.exitInfo()) break;
      try {
        await rpcHello(handle.address, 1_000);
        return handle;
      } catch {
        if (Date.now() > deadline) {
          await handle.stop();
          throw new Error(`rpc-server on port ${port} did not answer HELLO in time; output:\n${proc.tail().join('\n')}`);
        }
        await sleep(50);
      }
    }
    // It exits (status 0) when the port was taken between freePort() and bind: try another port.
    await proc.exited;
    if (attempt >= 3 || Date.now() > deadline) throw exitedEarly(proc, 'ggml-rpc-server');
  }
}

export interface LlamaServerHandle {
  readonly process: ManagedProcess;
  readonly port: number;
  /** "http://127.0.0.1:PORT". */
  readonly url: string;
  stop(): Promise<void>;
}

export interface LlamaServerOptions {
  readonly model: string;
  /** Which binaries; default llamaBinaries(). */
  readonly binaries?: LlamaBinaries;
  /** rpc-server addresses for `--rpc`, in order; the last one gets the output layer. */
  readonly rpc?: readonly string[];
  /** `--tensor-split`, one share per device in `--rpc` order. */
  readonly tensorSplit?: readonly number[];
  /** CPU threads (-t, -tb); default 1. */
  readonly threads?: number;
  /** Context size (-c); default 512. */
  readonly ctx?: number;
  /**
   * CPU weight repacking (llama.cpp's extra buffer types); default off (`--no-repack`). The repacked
   * kernels round differently from the plain CPU kernels an rpc-server runs, so a solo run with them
   * drifts from a split run after a few dozen tokens (seen at token 39); and on a CPU that announces
   * AMX to a VM that cannot run it, the AMX repack of Q8_0 dies of SIGILL.
   */
  readonly repack?: boolean;
  readonly extraArgs?: readonly string[];
  readonly env?: Readonly<Record<string, string>>;
  readonly readyTimeoutMs?: number;
}

/**
 * Starts llama-server on a free loopback port and waits for `/health` to say ok. Defaults chosen
 * for exact comparisons: flash attention off, no CPU repacking, one slot, no prompt cache in RAM, all
 * layers offloaded (to the rpc-servers when there are any).
 */
export async function startLlamaServer(opts: LlamaServerOptions): Promise<LlamaServerHandle> {
  const bins = opts.binaries ?? llamaBinaries();
  const threads = String(opts.threads ?? 1);
  const deadline = Date.now() + (opts.readyTimeoutMs ?? 60_000);
  for (let attempt = 0; ; attempt++) {
    const port = await freePort();
    const args = [
      '-m', opts.model,
      '--host', '127.0.0.1', '--port', String(port),
      '-c', String(opts.ctx ?? 512),
      '-t', threads, '-tb', threads,
      '-fa', 'off',
      '-np', '1',
      '--cache-ram', '0',
      '-ngl', '999',
      ...(opts.repack ? [] : ['--no-repack']),
      ...(opts.rpc && opts.rpc.length > 0 ? ['--rpc', opts.rpc.join(',')] : []),
      ...(opts.tensorSplit ? ['--tensor-split', opts.tensorSplit.join(',')] : []),
      ...(opts.extraArgs ?? []),
    ];
    const proc = spawnManaged({ name: `llama-server:${port}`, file: bins.llamaServer, args, env: opts.env });
    const handle: LlamaServerHandle = {
      process: proc,
      port,
      url: `http://127.0.0.1:${port}`,
      stop: async () => void (await proc.stop(3_000)),
    };
    for (;;) {
      if (proc.exitInfo()) break;
      try {
        const res = await fetch(`${handle.url}/health`, { signal: AbortSignal.timeout(2_000) });
        if (res.status === 200) return handle;
      } catch {
        // Not listening yet.
      }
      if (Date.now() > deadline) {
        await handle.stop();
        throw new Error(`llama-server did not become healthy in time; last output:\n${proc.tail().slice(-30).join('\n')}`);
      }
      await sleep(100);
    }
    await proc.exited;
    const portTaken = proc.tail().some((l) => /address already in use|couldn't bind/i.test(l));
    if (!portTaken || attempt >= 3) throw exitedEarly(proc, 'llama-server');
  }
}

export interface Completion {
  /** Generated token ids, exactly as sampled (llama-server's `return_tokens`). */
  readonly tokens: readonly number[];
  readonly content: string;
  readonly raw: Record<string, unknown>;
}

/** A greedy completion of exactly `nPredict` tokens (unless an end-of-generation token comes first). */
export async function greedyCompletion(
  server: { readonly url: string },
  prompt: string,
  nPredict: number,
  extra: Record<string, unknown> = {},
): Promise<Completion> {
  const res = await fetch(`${server.url}/completion`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({
      prompt,
      n_predict: nPredict,
      temperature: 0,
      top_k: 1,
      seed: 1,
      cache_prompt: false,
      return_tokens: true,
      stream: false,
      ...extra,
    }),
    signal: AbortSignal.timeout(120_000),
  });
  const text = await res.text();
  if (!res.ok) throw new Error(`llama-server /completion answered ${res.status}: ${text.slice(0, 500)}`);
  const raw = JSON.parse(text) as Record<string, unknown>;
  const tokens = raw.tokens;
  if (!Array.isArray(tokens) || !tokens.every((t) => Number.isInteger(t))) {
    throw new Error(`llama-server /completion gave no token ids: ${text.slice(0, 500)}`);
  }
  return { tokens: tokens as number[], content: String(raw.content ?? ''), raw };
}

/** The tiny model of FIELD-FACTS: 8 layers, width 64, ff 192 (a few MB, loads in well under a second). */
export const TINY_MODEL: LlamaModelSpec = { layers: 8, embd: 64, ff: 192, type: 'f16', seed: 1 };

export interface TempModel {
  readonly path: string;
  readonly dir: string;
  remove(): Promise<void>;
}

/** Generates a model into a fresh temporary directory; `remove()` deletes it. */
export async function makeTempModel(spec: LlamaModelSpec = TINY_MODEL): Promise<TempModel> {
  const dir = await mkdtemp(join(tmpdir(), 'mesh-model-'));
  const path = join(dir, 'model.gguf');
  await generateLlamaGguf(path, spec);
  return { path, dir, remove: () => rm(dir, { recursive: true, force: true }) };
}
