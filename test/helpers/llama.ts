// Test helper: real llama.cpp processes on loopback through src's one finder and launchers (with test
// defaults), greedy completions with exact token ids, generated tiny models.
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { generateLlamaGguf, type LlamaModelSpec } from '../../src/io/gguf/gguf-writer.ts';
import { locateLlamaBinaries, type LlamaVariant, type LocatedLlamaBinaries } from '../../src/io/llama/llama-binaries.ts';
import { detectLlamaServerFlags } from '../../src/io/llama/llama-server-args.ts';
import { startLlamaServer as launchLlamaServer, type LlamaServerProcess } from '../../src/io/llama/llama-server-process.ts';
import { freeLoopbackPort, startRpcServer as launchRpcServer, type RpcServerProcess } from '../../src/io/llama/rpc-server-process.ts';

export interface LlamaBinaries extends LocatedLlamaBinaries {
  /** `user` = $MESH_LLAMA_BIN_DIR; `mesh` = native/build.sh with our patches; `stock` = unpatched. */
  readonly variant: 'user' | LlamaVariant;
}

export interface LlamaBinariesOptions {
  /** Default `mesh`: $MESH_LLAMA_BIN_DIR, else our build; `stock` = native/build.sh's stock build. */
  readonly variant?: LlamaVariant;
}

/**
 * llama-binaries.ts's finder, synchronously (for beforeAll and test bodies). Throws its LlamaBinariesError
 * with the build command, never skips: a test that needs them must fail loudly without them.
 */
export function llamaBinaries(opts: LlamaBinariesOptions = {}): LlamaBinaries {
  const variant = opts.variant ?? 'mesh';
  const found = locateLlamaBinaries({ variant });
  return { ...found, variant: found.source === 'MESH_LLAMA_BIN_DIR' ? 'user' : variant };
}

/** A TCP port that was free a moment ago (callers check that their server really got it). */
export const freePort = freeLoopbackPort;

/** Test handles stop with a shorter grace than a node's. */
const STOP_GRACE_MS = 3_000;

export type RpcServerHandle = Omit<RpcServerProcess, 'stop'> & { stop(): Promise<void> };

export interface RpcServerOptions {
  /** Which binary; default llamaBinaries().rpcServer. */
  readonly binary?: string;
  /** CPU threads (-t); default 1, so that split and solo runs compute alike on a 2-core machine. */
  readonly threads?: number;
  readonly extraArgs?: readonly string[];
  readonly env?: Readonly<Record<string, string>>;
  /** Default 20 s. */
  readonly readyTimeoutMs?: number;
}

/** rpc-server-process.ts's launcher with test defaults: one thread, TCP only; ready once it answers HELLO. */
export async function startRpcServer(opts: RpcServerOptions = {}): Promise<RpcServerHandle> {
  const server = await launchRpcServer({
    binary: opts.binary ?? llamaBinaries().rpcServer,
    threads: opts.threads ?? 1,
    extraArgs: opts.extraArgs,
    // Keep traffic on TCP where a counting proxy can see it, even on a host with RDMA.
    env: { GGML_RPC_NO_RDMA: '1', ...opts.env },
    readyTimeoutMs: opts.readyTimeoutMs ?? 20_000,
  });
  return { ...server, stop: async () => void (await server.stop(STOP_GRACE_MS)) };
}

export type LlamaServerHandle = Omit<LlamaServerProcess, 'stop'> & {
  stop(): Promise<void>;
  /** ms from spawn to /health 200 (model loaded, warm-up done). */
  readonly loadMs: number;
};

export interface LlamaServerOptions {
  readonly model: string;
  /** Which binary; default llamaBinaries().llamaServer. */
  readonly binary?: string;
  /** rpc-server addresses for `--rpc`, in order; the last one gets the output layer. None: solo, on this CPU. */
  readonly rpc?: readonly string[];
  /** One share per rpc-server, in `--rpc` order; default equal. */
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
  /** Default 60 s. */
  readonly readyTimeoutMs?: number;
}

/**
 * llama-server-process.ts's launcher with test defaults for exact comparisons: one thread, one slot, a
 * 512-token context, no CPU repacking, TCP only (and the launcher's own: flash attention off, no prompt cache
 * in RAM, every layer offloaded, to the rpc-servers when there are any); resolves once /health says ok.
 */
export async function startLlamaServer(opts: LlamaServerOptions): Promise<LlamaServerHandle> {
  const binary = opts.binary ?? llamaBinaries().llamaServer;
  const threads = opts.threads ?? 1;
  const rpc = opts.rpc ?? [];
  // Read before the clock starts (once per binary): loadMs is the server's own time.
  await detectLlamaServerFlags(binary);
  const started = performance.now();
  const server = await launchLlamaServer({
    binary,
    model: opts.model,
    rpc,
    solo: rpc.length === 0,
    tensorSplit: opts.tensorSplit,
    threads,
    parallel: 1,
    ctxSize: opts.ctx ?? 512,
    extraArgs: ['-tb', String(threads), ...(opts.repack ? [] : ['--no-repack']), ...(opts.extraArgs ?? [])],
    env: { GGML_RPC_NO_RDMA: '1', ...opts.env },
    readyTimeoutMs: opts.readyTimeoutMs ?? 60_000,
  });
  return { ...server, loadMs: performance.now() - started, stop: async () => void (await server.stop(STOP_GRACE_MS)) };
}

export interface Completion {
  /** Generated token ids, exactly as sampled (llama-server's `return_tokens`). */
  readonly tokens: readonly number[];
  readonly content: string;
  readonly raw: Record<string, unknown>;
}

/** A greedy completion of exactly `nPredict` tokens (unless an end-of-generation token comes first). */
export async function greedyCompletion(
  server: { readonly url: string; readonly authHeaders?: Readonly<Record<string, string>> },
  prompt: string,
  nPredict: number,
  extra: Record<string, unknown> = {},
): Promise<Completion> {
  const res = await fetch(`${server.url}/completion`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...server.authHeaders },
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
