// Actor logic for the rpc-server machine's slots (src/machines/rpc-server.machine.ts): the process itself
// (rpcServerProcess, a process.actor.ts over src/io/llama/rpc-server-process.ts) and the listening check
// (waitRpcServerListening).
import { connect } from 'node:net';
import { fromPromise } from 'xstate';
import type { RpcServerProcessInput } from '../machines/rpc-server.machine.ts';
import type { Logger } from '../io/host/logger.ts';
import { summarizeTail, type ExitInfo } from '../io/llama/processes.ts';
import { startRpcServer, type RpcServerInit, type RpcServerProcess } from '../io/llama/rpc-server-process.ts';
import { LIVENESS_INTERVAL_MS, LIVENESS_MISSES, stoppedReason } from '../io/llama/liveness.ts';
import { processActorLogic, type Liveness } from './process.actor.ts';

/** The launch settings of every run (binary, GGUF, threads, devices...): the port is always a free one. */
export type RpcServerActorConfig = Pick<RpcServerInit, 'binary' | 'gguf' | 'ggufSupported' | 'threads' | 'devices' | 'env' | 'readyTimeoutMs'> & {
  /** SIGTERM -> SIGKILL grace on stop (default 5 s). */
  readonly killGraceMs?: number;
  /** /proc state every 2 s, stopped 3 times in a row: unresponsive (default; tests may tighten it). */
  readonly liveness?: Pick<Liveness<RpcServerProcess>, 'intervalMs' | 'misses'>;
  readonly logger?: Logger;
  /** Every process this logic starts, once ready (the status page, tests). */
  readonly onStarted?: (server: RpcServerProcess, run: number) => void;
};

/**
 * The `rpcServerProcess` slot: ready = it answered HELLO (see process.actor.ts for the rest). Liveness: not a
 * HELLO (it serves one client at a time, so a probe queues behind llama-server's connection and looks like a
 * hang), the kernel's word that it is not stopped (/proc; no detection where there is none, macOS).
 */
export function rpcServerProcessLogic(config: RpcServerActorConfig) {
  const { killGraceMs, liveness, logger, onStarted, ...launch } = config;
  return processActorLogic<RpcServerProcessInput, RpcServerProcess>({
    name: 'rpc-server',
    logger,
    killGraceMs,
    logFields: (input) => ({ run: input.run }),
    liveness: {
      probe: (server) => stoppedReason(server.process.pid),
      intervalMs: liveness?.intervalMs ?? LIVENESS_INTERVAL_MS,
      misses: liveness?.misses ?? LIVENESS_MISSES,
    },
    start: (_input, signal, log) => startRpcServer({ ...launch, logger: log, signal }),
    exitReason: (exit) => exitReason(exit),
    onStarted: onStarted && ((s, input) => onStarted(s, input.run)),
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
