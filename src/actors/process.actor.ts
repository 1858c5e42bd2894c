// The process slot of a lifecycle machine (src/machines/process-lifecycle.machine.ts), for any child that
// serves on a port: starts it, sends `process.spawned` once it is up, `process.exited` when it exits or could
// not start, stops it gracefully on `process.kill`, and stops it in the cleanup too (SIGKILL after the
// grace), so a stopped actor never leaves a process behind.
import { fromCallback } from 'xstate';
import type { ProcessEvent, ProcessKillCommand } from '../machines/process-slot.ts';
import type { Logger } from '../io/host/logger.ts';
import { DEFAULT_STOP_GRACE_MS, type ExitInfo } from '../io/llama/processes.ts';

/** What a launcher (src/io/llama/*-process.ts) hands back once its child is up. */
export interface ServingProcess {
  readonly port: number;
  readonly process: { readonly pid: number };
  /** Resolves (never rejects) when it exits. */
  readonly exited: Promise<ExitInfo>;
  stop(graceMs?: number): Promise<ExitInfo>;
}

export interface ProcessActorSpec<TInput, TServer extends ServingProcess> {
  /** For logs: "rpc-server". */
  readonly name: string;
  /** Starts the child; aborting `signal` kills what it spawned and rejects. */
  readonly start: (input: TInput, signal: AbortSignal, log: Logger | undefined) => Promise<TServer>;
  /** The machine's crash reason for an exit (also logged by the spec when it wants). */
  readonly exitReason: (exit: ExitInfo, log: Logger | undefined) => string;
  /** Fields that tell this run's log lines apart. */
  readonly logFields: (input: TInput) => Record<string, unknown>;
  readonly logger?: Logger;
  /** SIGTERM -> SIGKILL grace on stop (default 5 s). */
  readonly killGraceMs?: number;
  /** Every process this logic starts, once up (the status page, tests). */
  readonly onStarted?: (server: TServer, input: TInput) => void;
}

export function processActorLogic<TInput, TServer extends ServingProcess>(spec: ProcessActorSpec<TInput, TServer>) {
  return fromCallback<ProcessKillCommand, TInput>(({ input, sendBack, receive }) => {
    const log = spec.logger?.child(spec.logFields(input));
    const send = (event: ProcessEvent) => sendBack(event);
    const grace = spec.killGraceMs ?? DEFAULT_STOP_GRACE_MS;
    const ctrl = new AbortController();
    let server: TServer | null = null;
    let cleanedUp = false;

    spec.start(input, ctrl.signal, log).then(
      (s) => {
        if (cleanedUp) {
          void s.stop(grace);
          return;
        }
        server = s;
        spec.onStarted?.(s, input);
        send({ type: 'process.spawned', pid: s.process.pid, port: s.port });
        void s.exited.then((exit) => {
          if (!cleanedUp) send({ type: 'process.exited', code: exit.code, signal: exit.signal, reason: spec.exitReason(exit, log) });
        });
      },
      (err: unknown) => {
        if (cleanedUp) return;
        log?.error({ err }, `${spec.name} could not start`);
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
