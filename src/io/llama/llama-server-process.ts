// Runs the host's llama-server: on 127.0.0.1 at a free port, every layer on the rpc-servers of the plan
// (the host's own last), readiness from `/health`, load progress from its output, weights sent as bytes to an
// rpc-server that refused to load them from its own GGUF (patch 0001's lines), and a crash reported with its
// exit status and last log lines.
//
// Flags, and why (see llamaServerArgs):
//   --rpc A,B,...,OWN     the plan's stages in order; the host's own rpc-server last, so it holds the output
//                         layer and the logits (n_vocab floats per token) never cross the mesh
//   -dev RPC0,...,RPCn    every layer on the rpc-servers even where the host has a local GPU: one code path,
//                         and the host's GPU is reached through its own rpc-server like any worker's
//   -ngl 999              offload every layer (to those devices)
//   --tensor-split        the plan's shares, one per device in `--rpc` order (a stage with several devices
//                         has its share divided among them)
//   -lm none              no mmap (mmap crashes unified-memory machines with less VRAM than the model);
//                         `--no-mmap` on releases older than `--load-mode`
//   --cache-ram 0         no prompt cache in host RAM: it copies the KV back from the servers at each request
//   -fit off              the plan already sized everything; fitting asks every device for its free memory
//                         at start (an RPC round trip each) and may shrink the context behind our back
//   -fa off               CPU flash attention depends on thread counts, so split output would differ from
//                         solo output; off keeps "mesh == solo" exact (configurable for GPU meshes)
//   -c 4096               a bounded KV cache (default: the model's trained context, up to 128k+ tokens)
//   --metrics             /metrics for the status page and the benchmark; costs nothing per token
//   --alias NAME          the model's name in /v1/models and answers, not the host's file path
//   (warmup kept)         the empty warm-up decode runs the whole pipeline once before /health says ok, so a
//                         broken stage fails the start, not the first user's request
//   --api-key-file F      a random key per start that only this node knows (llamaServerKeyFor): the node's
//                         API adds it when it forwards; F is a 0600 file in a 0700 temp dir, removed once
//                         the server is bound, so the key is never in argv (`ps` shows argv to every user).
//                         Releases without the flag get it as $LLAMA_API_KEY (readable by the same user only,
//                         like the file). /health stays open (llama.cpp's one public route besides the web UI)
//   --no-webui --no-agent --no-ui-mcp-proxy
//                         no web UI, no built-in tools/agent, no MCP CORS proxy (each only where this release
//                         has the flag); --tools and the MCP server lists are off by default and their
//                         environment variables are removed (below)
//   --cors-origins https://mesh-inference.invalid --no-cors-credentials
//                         no browser origin matches (the reserved .invalid TLD), so no web page may read its
//                         answers; llama.cpp's default is "*" with credentials
// Environment: every LLAMA_ARG_* variable (llama.cpp reads one per flag: LLAMA_ARG_TOOLS, LLAMA_ARG_AGENT,
// LLAMA_ARG_UI_MCP_PROXY... enable shell tools and a CORS proxy), LLAMA_API_KEY, HF_TOKEN and
// MTMD_BACKEND_DEVICE are removed from what it inherits (llamaServerEnv).
// It runs in llama.cpp's own "router child" mode (env LLAMA_SERVER_ROUTER_PORT): that mode prints load
// progress as JSON lines on stdout, and, once loaded, exits when its stdin (our watchdog pipe) closes: a
// second guard against orphans on top of processes.ts.
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Logger } from '../host/logger.ts';
import { spawnManaged, summarizeTail, type ExitInfo, type ManagedProcess } from './processes.ts';
import { freeLoopbackPort } from './rpc-server-process.ts';

export interface LlamaServerInit {
  /** Path of `llama-server`. */
  readonly binary: string;
  /** The GGUF on this host. */
  readonly model: string;
  /** rpc-server addresses ("127.0.0.1:PORT": tunnels to the workers, then the host's own) in plan order. */
  readonly rpc: readonly string[];
  /**
   * TLS keys for `rpc` entries that llama-server dials itself (a worker's data port, patch 0003): one line
   * "host:port identity key-hex" each, handed over on a pipe (fd 5), never in argv or the environment.
   */
  readonly tlsKeys?: readonly string[];
  /**
   * No rpc-servers at all: every layer on this machine's own devices (`rpc` empty). Never a node's way to
   * run: the reference that tests and benchmarks compare a split against.
   */
  readonly solo?: boolean;
  /** One share per `rpc` entry (any positive scale); default equal shares. */
  readonly tensorSplit?: readonly number[];
  /** Devices each rpc-server exposes (default 1 each); a stage's share is divided among its devices. */
  readonly devicesPerServer?: readonly number[];
  /** Context size (-c); default 4096. */
  readonly ctxSize?: number;
  /** Default 'off' (see the header). */
  readonly flashAttention?: 'on' | 'off' | 'auto';
  /** CPU threads of the host's llama-server (-t); default llama.cpp's. */
  readonly threads?: number;
  /** Server slots (-np); default llama.cpp's (auto, with a unified KV cache). */
  readonly parallel?: number;
  /** The model's name in the API (`--alias`); default llama.cpp's: the host's file path. */
  readonly alias?: string;
  readonly extraArgs?: readonly string[];
  /** A fixed port; default a free one. */
  readonly port?: number;
  readonly env?: Readonly<Record<string, string>>;
  readonly logger?: Logger;
  /** Load progress, as llama-server reports it. */
  readonly onProgress?: (p: LlamaLoadProgress) => void;
  /**
   * A weight whose bytes llama-server sent to an rpc-server because that server refused to load it from its
   * own GGUF, or was given up on after refusals (patch 0001); never for weights under the patch's size
   * threshold, which always go as bytes by design.
   */
  readonly onWeightsSentAsBytes?: (w: WeightsSentAsBytes) => void;
  /**
   * Bound on spawn -> HTTP port bound. Connecting to every `--rpc` server happens first, and an rpc-server
   * busy with another client accepts the connection but never answers: without a bound that hangs forever.
   */
  readonly launchTimeoutMs?: number;
  readonly signal?: AbortSignal;
}

export interface LlamaLoadProgress {
  /** `starting`: connecting to the rpc-servers; `loading`: weights; `ready`: /health is ok. */
  readonly phase: 'starting' | 'loading' | 'ready';
  /** 0..1 while loading (null when the server does not say). */
  readonly fraction: number | null;
}

/** One `RPC[host:port]: weights sent as bytes: 'NAME' N bytes (REASON)` line of patch 0001's client. */
export interface WeightsSentAsBytes {
  /** The rpc-server, exactly as in `--rpc`. */
  readonly endpoint: string;
  readonly name: string;
  readonly bytes: number;
  /** Why: the server's refusal ("content differs", "unknown tensor name"...) or "not asked: ..." once given up on. */
  readonly reason: string;
}

/** What crossed the network as bytes to one rpc-server, though it could have loaded it from its own GGUF. */
export interface WeightsOverWire {
  /** Distinct weights (a weight uploaded in pieces counts once). */
  readonly tensors: number;
  readonly bytes: number;
  /** The first WEIGHTS_OVER_WIRE_NAMES of them, in upload order. */
  readonly names: readonly string[];
}

export const WEIGHTS_OVER_WIRE_NAMES = 20;

export interface LlamaServerProcess {
  readonly port: number;
  /** "http://127.0.0.1:PORT" */
  readonly url: string;
  /** This start's random API key: every route but /health needs "Authorization: Bearer <apiKey>". */
  readonly apiKey: string;
  /** { authorization: 'Bearer <apiKey>' } */
  readonly authHeaders: Readonly<Record<string, string>>;
  readonly args: readonly string[];
  readonly process: ManagedProcess;
  /** Resolves (never rejects) when it exits. */
  readonly exited: Promise<ExitInfo>;
  progress(): LlamaLoadProgress;
  /** Weights sent as bytes after a GGUF refusal, per `--rpc` endpoint, so far (empty when none). */
  weightsOverWire(): Readonly<Record<string, WeightsOverWire>>;
  /** Polls /health until 200; rejects with LlamaServerError if it exits, or on timeout / abort. */
  waitHealthy(opts?: { timeoutMs?: number; signal?: AbortSignal }): Promise<void>;
  stop(graceMs?: number): Promise<ExitInfo>;
}

/** Start failures and crashes: `message` is one line for logs and status; `tail` the last output lines. */
export class LlamaServerError extends Error {
  override readonly name = 'LlamaServerError';
  constructor(
    message: string,
    readonly exit: ExitInfo | null = null,
    readonly tail: readonly string[] = [],
  ) {
    super(message);
  }
}

const DEFAULT_CTX = 4096;
const PORT_ATTEMPTS = 4;
const PROGRESS_PREFIX = 'cmd_child_to_router:state:';
/** What llama.cpp's router sends a child to make it exit (tools/server/server-models.cpp). */
const ROUTER_EXIT_COMMAND = 'cmd_router_to_child:exit';

/** Which optional flags this llama-server knows, read once per binary from its `--help`. */
export interface LlamaServerFlags {
  readonly loadMode: boolean;
  readonly fit: boolean;
  readonly cacheRam: boolean;
  /** Hardening flags (false on releases without them): see the header. */
  readonly apiKeyFile?: boolean;
  readonly noWebui?: boolean;
  readonly noAgent?: boolean;
  readonly noMcpProxy?: boolean;
  readonly corsOrigins?: boolean;
  readonly noCorsCredentials?: boolean;
}

const flagCache = new Map<string, Promise<LlamaServerFlags>>();

export function detectLlamaServerFlags(binary: string): Promise<LlamaServerFlags> {
  let p = flagCache.get(binary);
  if (p === undefined) {
    p = new Promise((resolve, reject) => {
      execFile(binary, ['--help'], { timeout: 30_000, maxBuffer: 16 * 1024 * 1024 }, (err, stdout, stderr) => {
        const text = `${stdout}\n${stderr}`;
        if (err && !/--port/.test(text)) {
          reject(new LlamaServerError(`cannot run ${binary} --help: ${err.message.split('\n')[0]}`));
          return;
        }
        const has = (flag: string) => new RegExp(`(^|[\\s,])${flag}([\\s,=]|$)`, 'm').test(text);
        resolve({
          loadMode: has('--load-mode'),
          fit: has('--fit'),
          cacheRam: has('--cache-ram'),
          apiKeyFile: has('--api-key-file'),
          noWebui: has('--no-webui'),
          noAgent: has('--no-agent'),
          noMcpProxy: has('--no-ui-mcp-proxy'),
          corsOrigins: has('--cors-origins'),
          noCorsCredentials: has('--no-cors-credentials'),
        });
      });
    });
    flagCache.set(binary, p);
    p.catch(() => flagCache.delete(binary));
  }
  return p;
}

/** The command line for `init` on `port` (pure: the tests check it, the header explains it). */
export function llamaServerArgs(init: LlamaServerInit, port: number, flags: LlamaServerFlags): string[] {
  if (init.solo === true) {
    if (init.rpc.length > 0) throw new RangeError('a solo llama-server takes no rpc-servers');
    return [...endpointArgs(init, port), '-ngl', '999', ...runtimeArgs(init, flags), ...(init.extraArgs ?? [])];
  }
  if (init.rpc.length === 0) throw new RangeError('llama-server needs at least one rpc-server (the host\'s own, last)');
  for (const a of init.rpc) {
    // llama.cpp cannot parse IPv6 `--rpc` entries; every entry we make is a loopback tunnel or server.
    if (!/^[0-9.]+:\d+$/.test(a) && !/^[a-z0-9.-]+:\d+$/i.test(a)) throw new RangeError(`not a host:port rpc address: ${a}`);
  }
  const devices = init.devicesPerServer ?? init.rpc.map(() => 1);
  if (devices.length !== init.rpc.length || devices.some((n) => !Number.isInteger(n) || n < 1)) {
    throw new RangeError('devicesPerServer needs one positive count per rpc-server');
  }
  const shares = init.tensorSplit ?? init.rpc.map(() => 1);
  if (shares.length !== init.rpc.length || shares.some((s) => !(s >= 0) || !Number.isFinite(s)) || !shares.some((s) => s > 0)) {
    throw new RangeError(`tensorSplit needs one non-negative share per rpc-server (${init.rpc.length}), not all zero`);
  }
  // RPC devices are numbered across servers in --rpc order: RPC0.. for the first server's devices, and so on.
  const deviceNames: string[] = [];
  const split: number[] = [];
  devices.forEach((n, i) => {
    for (let d = 0; d < n; d++) {
      deviceNames.push(`RPC${deviceNames.length}`);
      split.push(shares[i]! / n);
    }
  });
  return [
    ...endpointArgs(init, port),
    '--rpc', init.rpc.join(','),
    '-dev', deviceNames.join(','),
    '-ngl', '999',
    '--tensor-split', split.map(formatShare).join(','),
    ...runtimeArgs(init, flags),
    ...(init.extraArgs ?? []),
  ];
}

function endpointArgs(init: LlamaServerInit, port: number): string[] {
  return ['-m', init.model, '--host', '127.0.0.1', '--port', String(port)];
}

/** Memory, caches, context, threads, slots, name: everything but where the layers go. */
function runtimeArgs(init: LlamaServerInit, flags: LlamaServerFlags): string[] {
  return [
    ...(flags.loadMode ? ['-lm', 'none'] : ['--no-mmap']),
    ...(flags.cacheRam ? ['--cache-ram', '0'] : []),
    ...(flags.fit ? ['-fit', 'off'] : []),
    '-fa', init.flashAttention ?? 'off',
    '-c', String(init.ctxSize ?? DEFAULT_CTX),
    '--metrics',
    ...(init.threads !== undefined ? ['-t', String(init.threads)] : []),
    ...(init.parallel !== undefined ? ['-np', String(init.parallel)] : []),
    // Commas separate aliases for llama.cpp: a name with one would become two.
    ...(init.alias ? ['--alias', init.alias.replace(/,/g, ' ')] : []),
    ...hardeningArgs(flags),
  ];
}

/** No origin a browser can have, no credentials. */
export const LLAMA_CORS_ORIGIN = 'https://mesh-inference.invalid';

/** Web UI, agent tools, MCP proxy off; CORS closed (each where this release has the flag; see the header). */
function hardeningArgs(flags: LlamaServerFlags): string[] {
  return [
    ...(flags.noWebui ? ['--no-webui'] : []),
    ...(flags.noAgent ? ['--no-agent'] : []),
    ...(flags.noMcpProxy ? ['--no-ui-mcp-proxy'] : []),
    ...(flags.corsOrigins ? ['--cors-origins', LLAMA_CORS_ORIGIN] : []),
    ...(flags.noCorsCredentials ? ['--no-cors-credentials'] : []),
  ];
}

/** Variables llama.cpp reads as options (or secrets it does not need) that must not reach llama-server. */
export function isLlamaOptionVariable(name: string): boolean {
  return /^LLAMA_ARG_/i.test(name) || ['LLAMA_API_KEY', 'HF_TOKEN', 'MTMD_BACKEND_DEVICE'].includes(name.toUpperCase());
}

/**
 * llama-server's environment on top of this process's: `extra` without llama.cpp's option variables, and
 * every such variable this process has set to undefined, so the child does not inherit it (Node leaves
 * undefined values out of a child's environment).
 */
export function llamaServerEnv(extra: Readonly<Record<string, string>>, inherited: NodeJS.ProcessEnv = process.env): Record<string, string | undefined> {
  const env: Record<string, string | undefined> = {};
  for (const name of Object.keys(inherited)) if (isLlamaOptionVariable(name)) env[name] = undefined;
  for (const [name, value] of Object.entries(extra)) env[name] = isLlamaOptionVariable(name) ? undefined : value;
  return env;
}

/** The key of each llama-server this process runs, by port, while it runs. */
const keysByPort = new Map<number, string>();

/** The API key of the llama-server this process runs on `port`; null when there is none. */
export function llamaServerKeyFor(port: number): string | null {
  return keysByPort.get(port) ?? null;
}

function formatShare(s: number): string {
  // Enough digits for any realistic split, without exponents llama.cpp would not parse.
  return Number(s.toFixed(6)).toString();
}

/**
 * Spawns llama-server and resolves once its HTTP port is bound: it may still be loading (/health 503).
 * Rejects with LlamaServerError when it exits first (status and log tail), or does not get that far in
 * `launchTimeoutMs`.
 */
export async function launchLlamaServer(init: LlamaServerInit): Promise<LlamaServerProcess> {
  const flags = await detectLlamaServerFlags(init.binary);
  const attempts = init.port === undefined ? PORT_ATTEMPTS : 1;
  let last: LlamaServerError | null = null;
  for (let attempt = 1; attempt <= attempts; attempt++) {
    init.signal?.throwIfAborted();
    const port = init.port ?? (await freeLoopbackPort());
    try {
      return await launchOnPort(init, port, llamaServerArgs(init, port, flags), flags);
    } catch (err) {
      if (!(err instanceof LlamaServerError)) throw err;
      last = err;
      const portTaken = err.tail.some((l) => /couldn't bind HTTP server socket/i.test(l));
      if (!portTaken) break;
      init.logger?.warn({ port }, 'llama-server port was taken meanwhile; trying another');
    }
  }
  throw last!;
}

/** launchLlamaServer, then waits for /health to say ok. */
export async function startLlamaServer(init: LlamaServerInit & { readyTimeoutMs?: number }): Promise<LlamaServerProcess> {
  const server = await launchLlamaServer(init);
  try {
    await server.waitHealthy({ timeoutMs: init.readyTimeoutMs, signal: init.signal });
  } catch (err) {
    await server.stop(2_000);
    throw err;
  }
  return server;
}

async function launchOnPort(init: LlamaServerInit, port: number, baseArgs: string[], flags: LlamaServerFlags): Promise<LlamaServerProcess> {
  const apiKey = randomBytes(32).toString('base64url');
  // The key file: a fresh 0700 directory, a 0600 file, removed once the server has read it (bound) or exited.
  let keyDir: string | null = null;
  const removeKeyFile = () => {
    if (keyDir !== null) rmSync(keyDir, { recursive: true, force: true });
    keyDir = null;
  };
  const keyArgs: string[] = [];
  const keyEnv: Record<string, string> = {};
  if (flags.apiKeyFile) {
    keyDir = mkdtempSync(join(tmpdir(), 'mesh-llama-key-'));
    const file = join(keyDir, 'key');
    writeFileSync(file, `${apiKey}\n`, { mode: 0o600 });
    keyArgs.push('--api-key-file', file);
  } else {
    keyEnv['LLAMA_API_KEY'] = apiKey;
  }
  const args = [...baseArgs, ...keyArgs];
  let proc: ManagedProcess;
  try {
    proc = spawnManaged({
      name: 'llama-server',
      file: init.binary,
      args,
      env: {
        ...(llamaServerEnv({ ...init.env, LLAMA_SERVER_ROUTER_PORT: '0', ...(init.tlsKeys?.length ? { GGML_RPC_TLS_FD: '5' } : {}) }) as Record<string, string>),
        ...keyEnv,
      },
      secretFd5: init.tlsKeys?.length ? `${init.tlsKeys.join('\n')}\n` : undefined,
      logger: init.logger,
      // In router-child mode a SIGTERM alone hangs once loaded: its stdin-monitor thread keeps the process
      // alive until stdin ends. The router's own exit command (then EOF) lets it shut down cleanly at once.
      beforeStop: (p) => {
        p.writeStdin(`${ROUTER_EXIT_COMMAND}\n`);
        p.closeStdin();
      },
    });
  } catch (err) {
    removeKeyFile();
    throw err;
  }
  const url = `http://127.0.0.1:${port}`;
  let progress: LlamaLoadProgress = { phase: 'starting', fraction: null };
  const setProgress = (p: LlamaLoadProgress) => {
    if (p.phase === progress.phase && p.fraction === progress.fraction) return;
    progress = p;
    init.onProgress?.(p);
  };
  let bound!: () => void;
  const boundP = new Promise<void>((r) => (bound = r));
  const overWire = new WeightsOverWireTally();
  proc.onLine((line) => {
    const sent = line.includes(WEIGHTS_SENT_MARK) ? parseWeightsSentAsBytes(line) : null;
    if (sent !== null) {
      overWire.add(sent.endpoint, sent);
      init.onWeightsSentAsBytes?.(sent);
    } else if (line.startsWith(PROGRESS_PREFIX)) {
      const p = parseProgressLine(line);
      if (p !== null && progress.phase !== 'ready') setProgress(p);
      bound();
    } else if (/load_model: loading model/.test(line)) {
      // Printed once the HTTP socket is bound (the server binds before it loads).
      bound();
    }
  });

  const authHeaders = { authorization: `Bearer ${apiKey}` };
  keysByPort.set(port, apiKey);
  void proc.exited.then(() => {
    removeKeyFile();
    if (keysByPort.get(port) === apiKey) keysByPort.delete(port);
  });
  const server: LlamaServerProcess = {
    port,
    url,
    apiKey,
    authHeaders,
    args,
    process: proc,
    exited: proc.exited,
    progress: () => progress,
    weightsOverWire: () => overWire.snapshot(),
    async waitHealthy(opts = {}) {
      await waitForHealth(url, { ...opts, process: proc });
      setProgress({ phase: 'ready', fraction: 1 });
    },
    stop: (graceMs) => proc.stop(graceMs),
  };

  const timeoutMs = init.launchTimeoutMs ?? 60_000;
  let timer: NodeJS.Timeout | undefined;
  const onAbort = () => void proc.stop(1_000);
  init.signal?.addEventListener('abort', onAbort, { once: true });
  try {
    const outcome = await Promise.race([
      boundP.then(() => 'bound' as const),
      proc.exited.then(() => 'exited' as const),
      new Promise<'timeout'>((r) => (timer = setTimeout(() => r('timeout'), timeoutMs))),
    ]);
    if (outcome === 'bound') {
      removeKeyFile();
      init.logger?.info({ port, pid: proc.pid, rpc: init.rpc }, 'llama-server launched; loading');
      return server;
    }
    if (outcome === 'timeout') {
      await proc.stop(2_000);
      throw new LlamaServerError(
        `llama-server did not get to loading within ${timeoutMs} ms: an rpc-server of ${init.rpc.join(', ')} accepts but does not answer (busy with another client, or stopped)`,
        proc.exitInfo(),
        proc.tail(),
      );
    }
    const exit = await proc.exited;
    init.signal?.throwIfAborted();
    throw new LlamaServerError(describeExit(exit, 'before its HTTP port was up'), exit, exit.tail);
  } finally {
    removeKeyFile();
    clearTimeout(timer);
    init.signal?.removeEventListener('abort', onAbort);
  }
}

const WEIGHTS_SENT_MARK = ': weights sent as bytes: ';
// After llama.cpp's log prefix (timestamp, level letter) and any colour codes: see patch 0001's rpc_log_weight_bytes.
const WEIGHTS_SENT_LINE = /RPC\[([^\]\s]+)\]: weights sent as bytes: '(.*)' (\d+) bytes \((.*)\)$/;

/** Parses patch 0001's "weights sent as bytes" line (with or without llama.cpp's log prefix); null for others. */
export function parseWeightsSentAsBytes(line: string): WeightsSentAsBytes | null {
  const m = WEIGHTS_SENT_LINE.exec(line.replace(/\x1b\[[0-9;]*m/g, '').trimEnd());
  if (m === null) return null;
  const bytes = Number(m[3]);
  if (!Number.isSafeInteger(bytes)) return null;
  return { endpoint: m[1]!, name: m[2]!, bytes, reason: m[4]! };
}

/** Sums WeightsSentAsBytes per key (an endpoint, or the worker behind it). */
export class WeightsOverWireTally {
  readonly #by = new Map<string, { names: Set<string>; bytes: number; first: string[] }>();

  add(key: string, w: Pick<WeightsSentAsBytes, 'name' | 'bytes'>): void {
    let t = this.#by.get(key);
    if (t === undefined) this.#by.set(key, (t = { names: new Set(), bytes: 0, first: [] }));
    t.bytes += w.bytes;
    if (!t.names.has(w.name)) {
      t.names.add(w.name);
      if (t.first.length < WEIGHTS_OVER_WIRE_NAMES) t.first.push(w.name);
    }
  }

  snapshot(): Record<string, WeightsOverWire> {
    const out: Record<string, WeightsOverWire> = {};
    for (const [key, t] of this.#by) out[key] = { tensors: t.names.size, bytes: t.bytes, names: [...t.first] };
    return out;
  }
}

/** Parses one router-child state line; null for states other than loading / ready. */
export function parseProgressLine(line: string): LlamaLoadProgress | null {
  try {
    const msg = JSON.parse(line.slice(PROGRESS_PREFIX.length)) as { state?: string; payload?: { value?: unknown } };
    if (msg.state === 'loading') {
      const v = msg.payload?.value;
      return { phase: 'loading', fraction: typeof v === 'number' && v >= 0 && v <= 1 ? v : null };
    }
    if (msg.state === 'ready') return { phase: 'ready', fraction: 1 };
  } catch {
    // Not JSON after all: not a progress line.
  }
  return null;
}

export type HealthState = { readonly kind: 'ok' } | { readonly kind: 'loading' } | { readonly kind: 'down'; readonly reason: string };

/** One GET /health: 200 ok, 503 loading, anything else (or no answer in `timeoutMs`) down. */
export async function checkHealth(url: string, timeoutMs = 2_000, signal?: AbortSignal): Promise<HealthState> {
  const s = signal ? AbortSignal.any([signal, AbortSignal.timeout(timeoutMs)]) : AbortSignal.timeout(timeoutMs);
  try {
    const res = await fetch(`${url}/health`, { signal: s });
    await res.arrayBuffer();
    if (res.status === 200) return { kind: 'ok' };
    if (res.status === 503) return { kind: 'loading' };
    return { kind: 'down', reason: `/health answered ${res.status}` };
  } catch (err) {
    signal?.throwIfAborted();
    const cause = (err as { cause?: { code?: string } }).cause?.code;
    return { kind: 'down', reason: cause ?? (err as Error).message };
  }
}

/**
 * Polls `url`/health until it answers 200. Rejects on timeout (default 10 minutes: big models on slow
 * disks), on abort, and at once with LlamaServerError when `process` (if given) exits meanwhile.
 */
export async function waitForHealth(
  url: string,
  opts: { timeoutMs?: number; signal?: AbortSignal; process?: ManagedProcess; intervalMs?: number } = {},
): Promise<void> {
  const deadline = Date.now() + (opts.timeoutMs ?? 10 * 60_000);
  let last: HealthState = { kind: 'down', reason: 'not asked yet' };
  for (;;) {
    opts.signal?.throwIfAborted();
    const exit = opts.process?.exitInfo();
    if (exit) throw new LlamaServerError(describeExit(exit, 'while loading'), exit, exit.tail);
    last = await checkHealth(url, 2_000, opts.signal);
    if (last.kind === 'ok') return;
    if (Date.now() > deadline) {
      throw new LlamaServerError(`llama-server at ${url} was not ready in time (last: ${last.kind === 'down' ? last.reason : 'still loading'})`);
    }
    const wait = opts.intervalMs ?? 100;
    await Promise.race([new Promise((r) => setTimeout(r, wait)), opts.process?.exited ?? new Promise(() => undefined)]);
  }
}

/** One line on how it ended: status or signal, what that usually means, and its last error lines. */
export function describeExit(exit: ExitInfo, when: string): string {
  const how = exit.signal !== null ? `was killed by ${exit.signal}` : `exited with status ${exit.code}`;
  const why =
    exit.code === 134 || exit.signal === 'SIGABRT'
      ? ' (llama.cpp aborted: an rpc-server is unreachable, vanished or refused)'
      : exit.code === 141 || exit.signal === 'SIGPIPE'
        ? ' (SIGPIPE: a socket closed under it)'
        : '';
  const shown = summarizeTail(exit.tail, 3, (l) => l.startsWith(PROGRESS_PREFIX));
  return `llama-server ${how} ${when}${why}${shown.length > 0 ? `: ${shown.join(' | ')}` : ''}`;
}
