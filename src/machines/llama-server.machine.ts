// Lifecycle of the host's llama-server for one plan: stopped -> spawning -> loading -> ready -> stopping, or
// crashed. Pure: the process lives in actor slots that the composition root fills with `.provide()`.
//
// Slot contracts (src/actors implements them):
//   llamaServerProcess  fromCallback, input LlamaServerProcessInput. Spawns `llama-server` on an ephemeral
//                     loopback port with `--rpc` = one local tunnel port per remote stage of `plan` (in the
//                     plan's order) and then `127.0.0.1:ownRpcPort` last, `--tensor-split` from the shares,
//                     every layer offloaded, no mmap, `--cache-ram 0`. Sends back `process.spawned {pid, port}`
//                     and later `process.exited {code, signal, reason}`; on `process.kill` it SIGTERMs; its
//                     cleanup kills the child, so stopping the actor never leaves a process behind.
//   waitLlamaHealthy  fromPromise, input { port }. Resolves once `GET /health` answers ok (the model is
//                     loaded); rejects when the server cannot get there. Bounded here by `loadTimeout`.
//
// Owner protocol: send `llama.start {plan, generation, ownRpcPort}` / `llama.stop`; hears back on `notify`:
// `llama.ready {port, planId, generation}`, `llama.crashed {reason, planId}`, `llama.stopped {planId}` (also
// for a stop while already stopped or crashed).
import { assign, sendTo, setup, type AnyActorRef } from 'xstate';
import type { Plan } from './mesh-types.ts';
import { errorReason, unprovidedCallback, unprovidedPromise, type ProcessEvent, type ProcessKillCommand } from './process-slot.ts';

export type ReadyPlan = Extract<Plan, { kind: 'ready' }>;

export interface LlamaServerInput {
  /** The owner (the node machine): hears every notice below. */
  readonly notify: AnyActorRef;
}

export interface LlamaServerProcessInput {
  readonly plan: ReadyPlan;
  /** How many llama-servers this host has started so far, this one included (1, 2, ...). */
  readonly generation: number;
  /** Port of the host's own rpc-server on 127.0.0.1: the last `--rpc` entry. */
  readonly ownRpcPort: number;
}

export type LlamaServerCommand =
  | ({ readonly type: 'llama.start' } & LlamaServerProcessInput)
  | { readonly type: 'llama.stop' };

/** What the owner hears. */
export type LlamaServerNotice =
  | { readonly type: 'llama.ready'; readonly port: number; readonly planId: string; readonly generation: number }
  | { readonly type: 'llama.crashed'; readonly reason: string; readonly planId: string | null }
  | { readonly type: 'llama.stopped'; readonly planId: string | null };

export type LlamaServerEvent = LlamaServerCommand | ProcessEvent;

export interface LlamaServerContext {
  readonly notify: AnyActorRef;
  /** What the current (or last) process runs; null before the first start. */
  readonly launch: LlamaServerProcessInput | null;
  readonly pid: number | null;
  readonly port: number | null;
  readonly crashReason: string | null;
}

export const llamaServerMachine = setup({
  types: {
    input: {} as LlamaServerInput,
    context: {} as LlamaServerContext,
    events: {} as LlamaServerEvent,
  },
  actors: {
    llamaServerProcess: unprovidedCallback<ProcessKillCommand, LlamaServerProcessInput>('llamaServerProcess'),
    waitLlamaHealthy: unprovidedPromise<void, { port: number }>('waitLlamaHealthy'),
  },
  delays: {
    /** Loading a big model from local disk takes minutes on slow disks; beyond this it is wedged. */
    loadTimeout: 10 * 60_000,
    /** How long a SIGTERM gets before the slot's cleanup SIGKILLs. */
    killTimeout: 5_000,
  },
  actions: {
    beginLaunch: assign((_, params: LlamaServerProcessInput) => ({
      launch: { plan: params.plan, generation: params.generation, ownRpcPort: params.ownRpcPort },
      pid: null,
      port: null,
      crashReason: null,
    })),
    recordSpawn: assign((_, params: { pid: number; port: number }) => ({ pid: params.pid, port: params.port })),
    recordCrash: assign((_, params: { reason: string }) => ({ crashReason: params.reason })),
    forgetProcess: assign({ pid: null, port: null }),
    askProcessToExit: sendTo('process', { type: 'process.kill' } satisfies ProcessKillCommand),
    notifyReady: sendTo(
      ({ context }) => context.notify,
      ({ context }): LlamaServerNotice => ({
        type: 'llama.ready',
        port: context.port ?? 0,
        planId: context.launch?.plan.id ?? '',
        generation: context.launch?.generation ?? 0,
      }),
    ),
    notifyCrashed: sendTo(
      ({ context }) => context.notify,
      ({ context }): LlamaServerNotice => ({
        type: 'llama.crashed',
        reason: context.crashReason ?? 'unknown',
        planId: context.launch?.plan.id ?? null,
      }),
    ),
    notifyStopped: sendTo(
      ({ context }) => context.notify,
      ({ context }): LlamaServerNotice => ({ type: 'llama.stopped', planId: context.launch?.plan.id ?? null }),
    ),
  },
}).createMachine({
  id: 'llamaServer',
  context: ({ input }) => ({ notify: input.notify, launch: null, pid: null, port: null, crashReason: null }),
  initial: 'stopped',
  states: {
    stopped: {
      on: {
        'llama.start': { target: 'running', actions: { type: 'beginLaunch', params: ({ event }) => event } },
        'llama.stop': { actions: 'notifyStopped' },
      },
    },
    running: {
      invoke: {
        id: 'process',
        src: 'llamaServerProcess',
        input: ({ context }) => context.launch!,
        onError: {
          target: 'crashed',
          actions: { type: 'recordCrash', params: ({ event }) => ({ reason: `llama-server process failed: ${errorReason(event.error)}` }) },
        },
      },
      exit: 'forgetProcess',
      on: {
        'llama.stop': '.stopping',
        'process.exited': {
          target: 'crashed',
          actions: { type: 'recordCrash', params: ({ event }) => ({ reason: `llama-server exited: ${event.reason}` }) },
        },
      },
      initial: 'spawning',
      states: {
        spawning: {
          on: {
            'process.spawned': {
              target: 'loading',
              actions: { type: 'recordSpawn', params: ({ event }) => ({ pid: event.pid, port: event.port }) },
            },
          },
        },
        loading: {
          invoke: {
            id: 'healthy',
            src: 'waitLlamaHealthy',
            input: ({ context }) => ({ port: context.port ?? 0 }),
            onDone: 'ready',
            onError: {
              target: '#llamaServer.crashed',
              actions: { type: 'recordCrash', params: ({ event }) => ({ reason: `llama-server never became healthy: ${errorReason(event.error)}` }) },
            },
          },
          after: {
            loadTimeout: {
              target: '#llamaServer.crashed',
              actions: { type: 'recordCrash', params: { reason: 'llama-server did not become healthy within loadTimeout' } },
            },
          },
        },
        ready: {
          entry: 'notifyReady',
        },
        stopping: {
          entry: 'askProcessToExit',
          on: {
            // The exit we asked for is no crash. (Overrides the parent's `process.exited`.)
            'process.exited': { target: '#llamaServer.stopped', actions: 'notifyStopped' },
            'llama.stop': {},
          },
          after: {
            // Leaving `running` stops the process actor, whose cleanup SIGKILLs what is left.
            killTimeout: { target: '#llamaServer.stopped', actions: 'notifyStopped' },
          },
        },
      },
    },
    crashed: {
      entry: 'notifyCrashed',
      on: {
        'llama.start': { target: 'running', actions: { type: 'beginLaunch', params: ({ event }) => event } },
        'llama.stop': { target: 'stopped', actions: 'notifyStopped' },
      },
    },
  },
});
