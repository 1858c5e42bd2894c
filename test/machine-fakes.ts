// Fakes shared by the machine unit tests: a process slot that records what it ran, and helpers to build
// announcements. Not a test file itself.
import { fromCallback, fromPromise, type EventObject } from 'xstate';
import { asEndpointId, PROTOCOL_VERSION, type Announcement, type ModelIdentity, type RolePreference } from '../src/machines/mesh-types.ts';
import type { BackoffEvent, BackoffInput, ProcessEvent, ProcessKillCommand } from '../src/machines/process-slot.ts';

export const GB = 1e9;
export const MODEL: ModelIdentity = { name: 'm', bytes: 10 * GB, fingerprint: 'fp-m' };

export function announcement(id: string, vramGb: number, extra: Partial<Announcement> = {}): Announcement {
  const role: RolePreference = extra.role ?? 'auto';
  return {
    id: asEndpointId(id),
    epoch: 1,
    seq: 0,
    name: id,
    role,
    vramBytes: vramGb * GB,
    model: role === 'client' ? null : MODEL,
    version: PROTOCOL_VERSION,
    serving: false,
    addrs: [`addr-${id}`],
    connectedTo: [],
    ...extra,
  };
}

export interface FakeProcess<TInput> {
  readonly input: TInput;
  readonly pid: number;
  alive: boolean;
  /** Whether the machine asked for SIGKILL (`process.kill {force}`) rather than a graceful stop. */
  forced: boolean;
  /** Make the process die on its own. */
  crash(reason: string): void;
  /** Have the process actor report it unresponsive (its liveness probes failed). */
  hang(reason: string): void;
}

let nextPid = 100;

/** A process slot that spawns at once, exits when killed, and records every run in `runs`. */
export function fakeProcess<TInput>(runs: FakeProcess<TInput>[]) {
  return fromCallback<ProcessKillCommand, TInput>(({ sendBack, receive, input }) => {
    const pid = nextPid++;
    const proc: FakeProcess<TInput> = {
      input,
      pid,
      alive: true,
      forced: false,
      crash: (reason) => {
        if (!proc.alive) return;
        proc.alive = false;
        sendBack({ type: 'process.exited', code: 1, signal: null, reason } satisfies ProcessEvent);
      },
      hang: (reason) => sendBack({ type: 'process.unresponsive', reason } satisfies ProcessEvent),
    };
    runs.push(proc);
    sendBack({ type: 'process.spawned', pid, port: 30000 + pid } satisfies ProcessEvent);
    receive((command) => {
      if (!proc.alive) return;
      proc.alive = false;
      proc.forced = command.force === true;
      const signal = proc.forced ? 'SIGKILL' : 'SIGTERM';
      sendBack({ type: 'process.exited', code: null, signal, reason: proc.forced ? 'killed' : 'terminated' } satisfies ProcessEvent);
    });
    return () => {
      proc.alive = false;
    };
  });
}

/** A readiness probe that succeeds at once (on the next microtask). */
export const readyAtOnce = fromPromise<void, { port: number }>(async () => {});

/** Lets promise actors settle. */
export function flush(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

export interface FakeBackoff {
  readonly input: BackoffInput;
  /** Whether the machine still waits on it (its actor is running). */
  live: boolean;
  /** The delay is over. */
  elapse(): void;
}

/** A back-off slot: records every wait, says the next attempt is at `now() + delayMs`, elapses when told. */
export function fakeBackoff(waits: FakeBackoff[], now: () => number = () => 0) {
  return fromCallback<EventObject, BackoffInput>(({ input, sendBack }) => {
    const wait: FakeBackoff = { input, live: true, elapse: () => sendBack({ type: 'backoff.elapsed' } satisfies BackoffEvent) };
    waits.push(wait);
    sendBack({ type: 'backoff.scheduled', nextAttemptAt: now() + input.delayMs } satisfies BackoffEvent);
    return () => {
      wait.live = false;
    };
  });
}
