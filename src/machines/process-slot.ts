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
  | { readonly type: 'process.exited'; readonly code: number | null; readonly signal: string | null; readonly reason: string };

/** What a machine sends to its process actor: ask for a graceful exit (SIGTERM), answered by `process.exited`. */
export interface ProcessKillCommand {
  readonly type: 'process.kill';
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
