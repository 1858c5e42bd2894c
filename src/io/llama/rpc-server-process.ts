// Runs this node's ggml-rpc-server: bound to 127.0.0.1 on a free port (only the mesh's authenticated
// tunnels reach it), SIGPIPE ignored, serving tensors from the node's own GGUF when the binary has our
// patch, and ready only once it has really answered an RPC HELLO.
import { connect, createServer } from 'node:net';
import type { Logger } from '../host/logger.ts';
import { spawnManaged, summarizeTail, type ExitInfo, type ManagedProcess } from './processes.ts';
import { helloRequest } from './rpc-protocol.ts';
import { rpcHello, type RpcServerVersion } from './rpc-traffic.ts';

export type { RpcServerVersion } from './rpc-traffic.ts';

export interface RpcServerInit {
  /** Path of `ggml-rpc-server` (llama-binaries.ts finds it). */
  readonly binary: string;
  /** The node's GGUF, served by name (`--gguf`); used only when `ggufSupported`. */
  readonly gguf?: string | null;
  /** Whether the binary carries the SET_TENSOR_GGUF patch (LlamaBinaries.setTensorGguf). */
  readonly ggufSupported?: boolean;
  /** CPU threads (`-t`); default: the binary's own default. */
  readonly threads?: number;
  /** Devices (`-d`), e.g. ["CUDA0"]; default: all of them. */
  readonly devices?: readonly string[];
  /** A fixed port; default: a free ephemeral port (and another one if it was taken meanwhile). */
  readonly port?: number;
  /** Appended to the command line (tests and benchmarks: flags under test, e.g. a raw `--gguf`). */
  readonly extraArgs?: readonly string[];
  /** Whole start, spawn to HELLO answered; default 30 s (a CUDA context can take seconds). */
  readonly readyTimeoutMs?: number;
  readonly env?: Readonly<Record<string, string>>;
  readonly logger?: Logger;
  /** Aborting kills the process and rejects the start. */
  readonly signal?: AbortSignal;
}

export interface RpcServerProcess {
  readonly port: number;
  /** "127.0.0.1:PORT", as `--rpc` and the tunnels want it. */
  readonly address: string;
  readonly version: RpcServerVersion;
  /** Whether it was started with `--gguf` (it loads weights from the node's own file). */
  readonly servesGguf: boolean;
  readonly process: ManagedProcess;
  /** Resolves (never rejects) when it exits, for whatever reason. */
  readonly exited: Promise<ExitInfo>;
  /**
   * Sends HELLO and waits for the answer. An rpc-server serves one client at a time, so while llama-server
   * holds it this times out: a probe for an idle server (readiness, hand-off), not for one in use.
   */
  probe(timeoutMs?: number): Promise<RpcServerVersion>;
  stop(graceMs?: number): Promise<ExitInfo>;
}

/** It could not be started, or it exited or hung before answering HELLO. */
export class RpcServerStartError extends Error {
  override readonly name = 'RpcServerStartError';
  constructor(
    message: string,
    /** Its last output lines, for the log. */
    readonly tail: readonly string[] = [],
  ) {
    super(message);
  }
}

/** Attempts when the chosen port was taken between choosing it and the server binding it. */
const PORT_ATTEMPTS = 4;

export async function startRpcServer(init: RpcServerInit): Promise<RpcServerProcess> {
  const deadline = Date.now() + (init.readyTimeoutMs ?? 30_000);
  const attempts = init.port === undefined ? PORT_ATTEMPTS : 1;
  let lastError: RpcServerStartError | null = null;
  for (let attempt = 1; attempt <= attempts; attempt++) {
    init.signal?.throwIfAborted();
    const port = init.port ?? (await freeLoopbackPort());
    const result = await startOnPort(init, port, deadline);
    if (result.kind === 'ready') return result.server;
    lastError = result.error;
    // A taken port makes ggml-rpc-server exit (status 0!) at once: try another; anything else is final.
    if (!result.portTaken) break;
    init.logger?.warn({ port }, 'rpc-server port was taken meanwhile; trying another');
  }
  throw lastError!;
}

type StartResult =
  | { kind: 'ready'; server: RpcServerProcess }
  | { kind: 'failed'; error: RpcServerStartError; portTaken: boolean };

async function startOnPort(init: RpcServerInit, port: number, deadline: number): Promise<StartResult> {
  const servesGguf = Boolean(init.gguf) && init.ggufSupported === true;
  const args = [
    // Numeric on purpose: `-H localhost` is refused ("Invalid host address") with exit status 0.
    '-H', '127.0.0.1',
    '-p', String(port),
    ...(init.threads !== undefined ? ['-t', String(init.threads)] : []),
    ...(init.devices !== undefined && init.devices.length > 0 ? ['-d', init.devices.join(',')] : []),
    ...(servesGguf ? ['--gguf', init.gguf!] : []),
    ...(init.extraArgs ?? []),
  ];
  if (init.gguf && init.ggufSupported !== true) {
    init.logger?.info('this ggml-rpc-server has no --gguf patch: weights will be sent over the network');
  }
  const proc = spawnManaged({
    name: 'rpc-server',
    file: init.binary,
    args,
    env: init.env,
    // The whole point of this wrapper: a queued client that disconnects must not kill it (exit 141).
    ignoreSigpipe: true,
    logger: init.logger,
  });
  const address = `127.0.0.1:${port}`;
  const onAbort = () => void proc.stop(1_000);
  init.signal?.addEventListener('abort', onAbort, { once: true });
  try {
    const version = await waitForHello(proc, address, deadline, init.signal);
    const server: RpcServerProcess = {
      port,
      address,
      version,
      servesGguf,
      process: proc,
      exited: proc.exited,
      probe: (timeoutMs = 2_000) => rpcHello(address, timeoutMs),
      stop: (graceMs) => proc.stop(graceMs),
    };
    init.logger?.info({ port, pid: proc.pid, version: `${version.major}.${version.minor}.${version.patch}`, gguf: servesGguf }, 'rpc-server ready');
    return { kind: 'ready', server };
  } catch (err) {
    await proc.stop(1_000);
    if (init.signal?.aborted) throw init.signal.reason ?? err;
    const tail = proc.tail();
    // What this release prints when bind() fails (and then it exits with status 0).
    const portTaken = tail.some((l) => /failed to create server socket|address already in use/i.test(l));
    const error = err instanceof RpcServerStartError ? err : new RpcServerStartError(String(err), tail);
    return { kind: 'failed', error, portTaken };
  } finally {
    init.signal?.removeEventListener('abort', onAbort);
  }
}

async function waitForHello(proc: ManagedProcess, address: string, deadline: number, signal?: AbortSignal): Promise<RpcServerVersion> {
  let lastProblem = '';
  for (;;) {
    signal?.throwIfAborted();
    const exit = proc.exitInfo();
    if (exit !== null) throw exitedBeforeReady(exit);
    const left = deadline - Date.now();
    if (left <= 0) {
      throw new RpcServerStartError(`ggml-rpc-server did not answer HELLO on ${address} in time (${lastProblem})`, proc.tail());
    }
    try {
      // Race the probe against the exit, so that a server that dies answers at once, not at the timeout.
      const r = await Promise.race([rpcHello(address, Math.min(2_000, left)), proc.exited.then((e) => e)]);
      if ('major' in r) return r;
      throw exitedBeforeReady(r);
    } catch (err) {
      if (err instanceof RpcServerStartError) throw err;
      lastProblem = (err as Error).message;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}

function exitedBeforeReady(exit: ExitInfo): RpcServerStartError {
  const how = exit.signal !== null ? `signal ${exit.signal}` : `status ${exit.code}`;
  const last = summarizeTail(exit.tail).join(' | ');
  return new RpcServerStartError(`ggml-rpc-server exited (${how}) before it answered HELLO${last ? `: ${last}` : ''}`, exit.tail);
}

const RPC_CMD_DEVICE_COUNT = 15;

/**
 * How many devices the rpc-server at `address` exposes (HELLO, then DEVICE_COUNT). llama-server numbers RPC
 * devices across servers in `--rpc` order (RPC0, RPC1, ...), so a host needs these counts to name them in
 * `-dev` and to give each one a share. A server busy with another client does not answer: bounded.
 */
export function rpcDeviceCount(address: string, timeoutMs = 5_000): Promise<number> {
  const sep = address.lastIndexOf(':');
  const host = address.slice(0, sep);
  const port = Number(address.slice(sep + 1));
  return new Promise((resolve, reject) => {
    const sock = connect({ host, port, noDelay: true });
    let buf = Buffer.alloc(0);
    let stage: 'hello' | 'count' = 'hello';
    const done = (err: Error | null, n?: number) => {
      clearTimeout(timer);
      sock.destroy();
      if (err) reject(err);
      else resolve(n!);
    };
    const timer = setTimeout(() => done(new RpcServerStartError(`rpc-server at ${address} did not answer DEVICE_COUNT within ${timeoutMs} ms (busy with another client?)`)), timeoutMs);
    sock.once('error', (e) => done(new RpcServerStartError(`rpc-server at ${address}: ${e.message}`)));
    sock.once('close', () => done(new RpcServerStartError(`rpc-server at ${address} closed the connection`)));
    sock.once('connect', () => sock.write(helloRequest()));
    sock.on('data', (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk]);
      for (;;) {
        if (buf.length < 8) return;
        const size = Number(buf.readBigUInt64LE(0));
        if (size > 4096) return done(new RpcServerStartError(`rpc-server at ${address} sent a ${size}-byte reply: not an RPC server?`));
        if (buf.length < 8 + size) return;
        const payload = buf.subarray(8, 8 + size);
        buf = buf.subarray(8 + size);
        if (stage === 'hello') {
          stage = 'count';
          const req = Buffer.alloc(9);
          req[0] = RPC_CMD_DEVICE_COUNT;
          sock.write(req);
        } else {
          if (payload.length < 4) return done(new RpcServerStartError(`rpc-server at ${address} sent a short DEVICE_COUNT reply`));
          return done(null, payload.readUInt32LE(0));
        }
      }
    });
  });
}

/** A TCP port on 127.0.0.1 that was free a moment ago (the caller checks it really got it). */
export function freeLoopbackPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const addr = s.address();
      const port = typeof addr === 'object' && addr !== null ? addr.port : 0;
      s.close(() => resolve(port));
    });
  });
}
