// The contract between a process-lifecycle machine (rpc-server, llama-server) and the actor that runs the
// child process (src/actors, filled in by the composition root with `.provide()`), plus a loud default.
import { fromCallback, fromPromise } from 'xstate';

/**
 * Events a process actor sends back to its machine. A process actor is `fromCallback` logic that spawns
 * the child on start, sends `process.spawned` once it has a pid and a port, `process.exited` when the
 * child exits on its own or after `process.kill`, and kills the child (SIGKILL if need be) in its cleanup,
 * so that a stopped actor never leaves a process behind.
 */
export type ProcessEvent =
  | { readonly type: 'process.spawned'; readonly pid: number; readonly port: number }
  | { readonly type: 'process.exited'; readonly code: number | null; readonly signal: string | null; readonly reason: string }
  // The child is there but does not answer its liveness probe (a SIGSTOPped or wedged process): sent once,
  // after the actor's bound of missed probes; the machine then kills it (`process.kill {force}`).
  | { readonly type: 'process.unresponsive'; readonly reason: string };

/**
 * What a machine sends to its process actor: ask for a graceful exit (SIGTERM), answered by `process.exited`;
 * `force`: SIGKILL at once (a process that does not answer gets no grace: a stopped one cannot take SIGTERM).
 */
export interface ProcessKillCommand {
  readonly type: 'process.kill';
  readonly force?: boolean;
}

/**
 * The back-off slot of a lifecycle machine: a `fromCallback` that, given how long to wait, answers at once
 * `backoff.scheduled {nextAttemptAt}` (epoch ms: the machine has no clock of its own) and `backoff.elapsed`
 * once the delay is over. The wall clock and the log line belong to the actor (src/actors/process.actor.ts).
 */
export interface BackoffInput {
  /** "llama-server" */
  readonly name: string;
  readonly reason: string;
  /** Crashes of the same run key in a row, this one included. */
  readonly crashes: number;
  readonly delayMs: number;
}

export type BackoffEvent =
  | { readonly type: 'backoff.scheduled'; readonly nextAttemptAt: number }
  | { readonly type: 'backoff.elapsed' };

/**
 * How long the lifecycle waits before it runs the same thing again after `crashes` crashes in a row: the first
 * crash restarts at once (one crash is a mesh event like any other), then 1 s, doubling, up to `maxMs`.
 */
export function backoffDelayMs(crashes: number, firstMs = 1_000, maxMs = 60_000): number {
  if (crashes < 2) return 0;
  return Math.min(maxMs, firstMs * 2 ** Math.min(crashes - 2, 30));
}

/** Raised by a default slot that the composition root forgot to fill: says which slot, never pretends to work. */
export class SlotNotProvidedError extends Error {
  override readonly name = 'SlotNotProvidedError';
  constructor(readonly slot: string) {
    super(`actor slot "${slot}" was not provided: the composition root must fill it with machine.provide({ actors })`);
  }
}

/** Default for a `fromCallback` slot: fails at start, so the owner's onError names the missing slot. */
export function unprovidedCallback<TEvent extends { type: string }, TInput>(slot: string) {
  return fromCallback<TEvent, TInput>(() => {
    throw new SlotNotProvidedError(slot);
  });
}

/** Default for a `fromPromise` slot: rejects with the slot's name. */
export function unprovidedPromise<TOutput, TInput>(slot: string) {
  return fromPromise<TOutput, TInput>(async () => {
    throw new SlotNotProvidedError(slot);
  });
}

/** A readable reason out of whatever an actor failed with. */
export function errorReason(error: unknown): string {
  return error instanceof Error ? `${error.name}: ${error.message}` : String(error);
}
