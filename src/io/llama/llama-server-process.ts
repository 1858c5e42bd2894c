// Runs the host's llama-server: on 127.0.0.1 at a free port, with the command line of llama-server-args.ts
// and this start's API key, readiness from `/health`, load progress and weights sent as bytes read from its
// output (llama-server-output.ts), and a crash reported with its exit status and last log lines.
//
// It runs in llama.cpp's own "router child" mode (env LLAMA_SERVER_ROUTER_PORT): that mode prints load
// progress as JSON lines on stdout, and, once loaded, exits when its stdin (our watchdog pipe) closes: a
// second guard against orphans on top of processes.ts.
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Logger } from '../host/logger.ts';
import { detectLlamaServerFlags, llamaServerArgs, llamaServerEnv, type LlamaServerCommand, type LlamaServerFlags } from './llama-server-args.ts';
import {
  describeExit,
  LlamaServerError,
  parseProgressLine,
  parseWeightsSentAsBytes,
  PROGRESS_PREFIX,
  WEIGHTS_SENT_MARK,
  WeightsOverWireTally,
  type LlamaLoadProgress,
  type WeightsOverWire,
  type WeightsSentAsBytes,
} from './llama-server-output.ts';
import { spawnManaged, type ExitInfo, type ManagedProcess } from './processes.ts';
import { freeLoopbackPort } from './rpc-server-process.ts';

/** One start of llama-server: its command line (LlamaServerCommand), and how to launch and watch it. */
export interface LlamaServerInit extends LlamaServerCommand {
  /** Path of `llama-server`. */
  readonly binary: string;
  /**
   * TLS keys for `rpc` entries that llama-server dials itself (a worker's data port, patch 0003): one line
   * "host:port identity key-hex" each, handed over on a pipe (fd 5), never in argv or the environment.
   */
  readonly tlsKeys?: readonly string[];
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

const PORT_ATTEMPTS = 4;
/** What llama.cpp's router sends a child to make it exit (tools/server/server-models.cpp). */
const ROUTER_EXIT_COMMAND = 'cmd_router_to_child:exit';

/** The key of each llama-server this process runs, by port, while it runs. */
const keysByPort = new Map<number, string>();

/** The API key of the llama-server this process runs on `port`; null when there is none. */
export function llamaServerKeyFor(port: number): string | null {
  return keysByPort.get(port) ?? null;
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
