// Actor logic for the rpc-server machine's slots (src/machines/rpc-server.machine.ts): the process itself
// (rpcServerProcess) and the listening check (waitRpcServerListening), over src/io/llama/rpc-server-process.ts.
import { connect } from 'node:net';
import { fromCallback, fromPromise } from 'xstate';
import type { ProcessEvent, ProcessKillCommand } from '../machines/process-slot.ts';
import type { RpcServerProcessInput } from '../machines/rpc-server.machine.ts';
import type { Logger } from '../io/host/logger.ts';
import { DEFAULT_STOP_GRACE_MS, summarizeTail, type ExitInfo } from '../io/llama/processes.ts';
import { startRpcServer, type RpcServerProcess } from '../io/llama/rpc-server-process.ts';

export interface RpcServerActorConfig {
  /** Path of ggml-rpc-server. */
  readonly binary: string;
  /** This node's GGUF, served by name when the binary has our patch. */
  readonly gguf?: string | null;
  readonly ggufSupported?: boolean;
  readonly threads?: number;
  readonly devices?: readonly string[];
  readonly env?: Readonly<Record<string, string>>;
  readonly readyTimeoutMs?: number;
  /** SIGTERM -> SIGKILL grace on stop (default 5 s). */
  readonly killGraceMs?: number;
  readonly logger?: Logger;
  /** Every process this logic starts, once ready (the status page, tests). */
  readonly onStarted?: (server: RpcServerProcess, run: number) => void;
}

/**
 * The `rpcServerProcess` slot. Starts the server (ready = it answered HELLO), then sends `process.spawned`;
 * sends `process.exited` when it exits or could not start; `process.kill` stops it gracefully; the
 * cleanup stops it too (SIGKILL after the grace), so a stopped actor leaves no process behind.
 */
export function rpcServerProcessLogic(config: RpcServerActorConfig) {
  return fromCallback<ProcessKillCommand, RpcServerProcessInput>(({ input, sendBack, receive }) => {
    const log = config.logger?.child({ run: input.run });
    const send = (event: ProcessEvent) => sendBack(event);
    const grace = config.killGraceMs ?? DEFAULT_STOP_GRACE_MS;
    const ctrl = new AbortController();
    let server: RpcServerProcess | null = null;
    let cleanedUp = false;

    startRpcServer({
      binary: config.binary,
      gguf: config.gguf,
      ggufSupported: config.ggufSupported,
      threads: config.threads,
      devices: config.devices,
      env: config.env,
      readyTimeoutMs: config.readyTimeoutMs,
      logger: log,
      signal: ctrl.signal,
    }).then(
      (s) => {
        if (cleanedUp) {
          void s.stop(grace);
          return;
        }
        server = s;
        config.onStarted?.(s, input.run);
        send({ type: 'process.spawned', pid: s.process.pid, port: s.port });
        void s.exited.then((exit) => {
          if (!cleanedUp) send({ type: 'process.exited', code: exit.code, signal: exit.signal, reason: exitReason(exit) });
        });
      },
      (err: unknown) => {
        if (cleanedUp) return;
        log?.error({ err }, 'rpc-server could not start');
        send({ type: 'process.exited', code: null, signal: null, reason: (err as Error).message });
      },
    );

    receive((event) => {
      if (event.type !== 'process.kill') return;
      if (server !== null) void server.stop(grace);
      // Not up yet: aborting the start kills what it spawned; the rejection reports the exit.
      else ctrl.abort(new Error('stopped while starting'));
    });

    return () => {
      cleanedUp = true;
      ctrl.abort(new Error('actor stopped'));
      if (server !== null) void server.stop(grace);
    };
  });
}

/** The `waitRpcServerListening` slot: resolves once the port accepts a TCP connection (retrying until aborted). */
export const waitRpcServerListeningLogic = fromPromise<void, { port: number }>(async ({ input, signal }) => {
  // A plain connect, not HELLO: the process slot has already seen HELLO answered, and a HELLO here could
  // queue behind a client the server is already serving (it serves one at a time) and look like a hang.
  for (;;) {
    signal.throwIfAborted();
    if (await canConnect(input.port, signal)) return;
    await new Promise((r) => setTimeout(r, 50));
  }
});

function canConnect(port: number, signal: AbortSignal): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = connect({ host: '127.0.0.1', port });
    const done = (ok: boolean) => {
      signal.removeEventListener('abort', onAbort);
      sock.destroy();
      resolve(ok);
    };
    const onAbort = () => done(false);
    signal.addEventListener('abort', onAbort, { once: true });
    sock.once('connect', () => done(true));
    sock.once('error', () => done(false));
  });
}

/** One line for the machine's crash reason: how it ended and its last meaningful output. */
export function exitReason(exit: ExitInfo): string {
  const how = exit.signal !== null ? `killed by ${exit.signal}` : `exited with status ${exit.code}`;
  const last = summarizeTail(exit.tail, 2);
  return `${how}${exit.requested ? ' (stop requested)' : ''}${last.length > 0 ? `: ${last.join(' | ')}` : ''}`;
}
