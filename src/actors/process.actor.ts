// The process slot of a lifecycle machine (src/machines/process-lifecycle.machine.ts), for any child that
// serves on a port: starts it, sends `process.spawned` once it is up, `process.exited` when it exits or could
// not start, stops it gracefully on `process.kill`, and stops it in the cleanup too (SIGKILL after the
// grace), so a stopped actor never leaves a process behind. From `process.spawned` on it probes the child's
// liveness (the kind's probe) and sends `process.unresponsive` once the probe has failed `misses` times in a row.
// Also the lifecycle's back-off slot (backoffLogic): the wall clock and the log line of a back-off.
import { fromCallback, type EventObject } from 'xstate';
import type { BackoffEvent, BackoffInput, ProcessEvent, ProcessKillCommand } from '../machines/process-slot.ts';
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
  /** How to tell that the child still works; none: it is never declared unresponsive. */
  readonly liveness?: Liveness<TServer>;
}

/**
 * A liveness probe and its bound: probe every `intervalMs` (each probe bounds itself: it must settle), and
 * after `misses` failed probes in a row the child is unresponsive.
 */
export interface Liveness<TServer> {
  /** null: alive; otherwise why not (one line). Must settle within its own bound; `signal` aborts it. */
  readonly probe: (server: TServer, signal: AbortSignal) => Promise<string | null>;
  readonly intervalMs: number;
  readonly misses: number;
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
        let exited = false;
        void s.exited.then((exit) => {
          exited = true;
          if (!cleanedUp) send({ type: 'process.exited', code: exit.code, signal: exit.signal, reason: spec.exitReason(exit, log) });
        });
        if (spec.liveness !== undefined) {
          void watchLiveness(s, spec.liveness, ctrl.signal, () => exited || cleanedUp, (reason) => {
            log?.error({ reason }, `${spec.name} does not answer: killing it`);
            send({ type: 'process.unresponsive', reason });
          });
        }
      },
      (err: unknown) => {
        if (cleanedUp) return;
        log?.error({ err }, `${spec.name} could not start`);
        send({ type: 'process.exited', code: null, signal: null, reason: (err as Error).message });
      },
    );

    receive((event) => {
      if (event.type !== 'process.kill') return;
      if (server !== null) void server.stop(event.force === true ? 0 : grace);
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

/** Probes until `over()`, or until `misses` probes in a row failed: then `unresponsive` once, and no more probes. */
async function watchLiveness<TServer>(
  server: TServer,
  liveness: Liveness<TServer>,
  signal: AbortSignal,
  over: () => boolean,
  unresponsive: (reason: string) => void,
): Promise<void> {
  let missed = 0;
  const failures: string[] = [];
  let lastGood = Date.now();
  for (;;) {
    await sleep(liveness.intervalMs, signal);
    if (signal.aborted || over()) return;
    const why = await liveness.probe(server, signal).catch((err: unknown) => (signal.aborted ? null : String(err)));
    if (signal.aborted || over()) return;
    if (why === null) {
      missed = 0;
      failures.length = 0;
      lastGood = Date.now();
      continue;
    }
    missed += 1;
    failures.push(why);
    if (missed >= liveness.misses) {
      const secs = ((Date.now() - lastGood) / 1000).toFixed(1);
      unresponsive(`${missed} liveness probes failed in a row, ${secs} s since the last good one: ${[...new Set(failures)].join('; ')}`);
      return;
    }
  }
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      signal.removeEventListener('abort', done);
      resolve();
    }
    signal.addEventListener('abort', done, { once: true });
  });
}

/**
 * The lifecycle's back-off slot (BackoffInput, process-slot.ts): says when the next attempt runs, logs it with
 * the reason, and answers `backoff.elapsed` after the delay.
 */
export function backoffLogic(logger: Logger | undefined) {
  return fromCallback<EventObject, BackoffInput>(({ input, sendBack }) => {
    const nextAttemptAt = Date.now() + input.delayMs;
    logger?.warn(
      { crashes: input.crashes, retryInMs: input.delayMs, nextAttemptAt: new Date(nextAttemptAt).toISOString(), reason: input.reason },
      `${input.name} crashed ${input.crashes} times in a row: next attempt in ${(input.delayMs / 1000).toFixed(0)} s (back-off)`,
    );
    sendBack({ type: 'backoff.scheduled', nextAttemptAt } satisfies BackoffEvent);
    const timer = setTimeout(() => sendBack({ type: 'backoff.elapsed' } satisfies BackoffEvent), input.delayMs);
    return () => clearTimeout(timer);
  });
}
