// Lifecycle of this node's ggml rpc-server: stopped -> spawning -> loading -> ready -> stopping, or crashed.
// Pure: the process itself lives in actor slots that the composition root fills with `.provide()`.
//
// Slot contracts (src/actors implements them):
//   rpcServerProcess  fromCallback, input RpcServerProcessInput. Spawns `rpc-server` bound to 127.0.0.1 on an
//                     ephemeral port; sends back `process.spawned {pid, port}` once it knows both, then
//                     `process.exited {code, signal, reason}` when the child exits (on its own or after a
//                     `process.kill` it receives). Its cleanup kills the child, so stopping this actor never
//                     leaves a process behind. Throwing (or failing to spawn) ends in `crashed`.
//   waitRpcServerListening  fromPromise, input { port }. Resolves once the port accepts connections; rejects
//                     (honouring its abort signal) when it cannot. Bounded here by the `loadTimeout` delay.
//
// Owner protocol: send `rpc.start` / `rpc.stop`; hears back on `notify`: `rpc.ready {port}`,
// `rpc.crashed {reason}`, `rpc.stopped` (also for a stop while already stopped or crashed, so an owner can
// always wait for it).
import { assign, sendTo, setup, type AnyActorRef } from 'xstate';
import { errorReason, unprovidedCallback, unprovidedPromise, type ProcessEvent, type ProcessKillCommand } from './process-slot.ts';

export interface RpcServerInput {
  /** The owner (the node machine): hears every notice below. */
  readonly notify: AnyActorRef;
}

export interface RpcServerProcessInput {
  /** 1 for the first start of this machine, then 2, 3...: tells the logs which run a process belongs to. */
  readonly run: number;
}

export type RpcServerCommand = { readonly type: 'rpc.start' } | { readonly type: 'rpc.stop' };

/** What the owner hears. */
export type RpcServerNotice =
  | { readonly type: 'rpc.ready'; readonly port: number }
  | { readonly type: 'rpc.crashed'; readonly reason: string }
  | { readonly type: 'rpc.stopped' };

export type RpcServerEvent = RpcServerCommand | ProcessEvent;

export interface RpcServerContext {
  readonly notify: AnyActorRef;
  readonly run: number;
  readonly pid: number | null;
  readonly port: number | null;
  /** Why the last run ended badly; null while nothing went wrong. */
  readonly crashReason: string | null;
}

export const rpcServerMachine = setup({
  types: {
    input: {} as RpcServerInput,
    context: {} as RpcServerContext,
    events: {} as RpcServerEvent,
  },
  actors: {
    rpcServerProcess: unprovidedCallback<ProcessKillCommand, RpcServerProcessInput>('rpcServerProcess'),
    waitRpcServerListening: unprovidedPromise<void, { port: number }>('waitRpcServerListening'),
  },
  delays: {
    /** An rpc-server listens within a second; much longer means it is wedged. */
    loadTimeout: 30_000,
    /** How long a SIGTERM gets before the slot's cleanup SIGKILLs. */
    killTimeout: 5_000,
  },
  actions: {
    beginRun: assign(({ context }) => ({ run: context.run + 1, pid: null, port: null, crashReason: null })),
    recordSpawn: assign((_, params: { pid: number; port: number }) => ({ pid: params.pid, port: params.port })),
    recordCrash: assign((_, params: { reason: string }) => ({ crashReason: params.reason })),
    forgetProcess: assign({ pid: null, port: null }),
    askProcessToExit: sendTo('process', { type: 'process.kill' } satisfies ProcessKillCommand),
    notifyReady: sendTo(
      ({ context }) => context.notify,
      ({ context }): RpcServerNotice => ({ type: 'rpc.ready', port: context.port ?? 0 }),
    ),
    notifyCrashed: sendTo(
      ({ context }) => context.notify,
      ({ context }): RpcServerNotice => ({ type: 'rpc.crashed', reason: context.crashReason ?? 'unknown' }),
    ),
    notifyStopped: sendTo(({ context }) => context.notify, { type: 'rpc.stopped' } satisfies RpcServerNotice),
  },
}).createMachine({
  id: 'rpcServer',
  context: ({ input }) => ({ notify: input.notify, run: 0, pid: null, port: null, crashReason: null }),
  initial: 'stopped',
  states: {
    stopped: {
      on: {
        'rpc.start': { target: 'running', actions: 'beginRun' },
        'rpc.stop': { actions: 'notifyStopped' },
      },
    },
    running: {
      invoke: {
        id: 'process',
        src: 'rpcServerProcess',
        input: ({ context }) => ({ run: context.run }),
        onError: {
          target: 'crashed',
          actions: { type: 'recordCrash', params: ({ event }) => ({ reason: `rpc-server process failed: ${errorReason(event.error)}` }) },
        },
      },
      exit: 'forgetProcess',
      on: {
        'rpc.stop': '.stopping',
        'process.exited': {
          target: 'crashed',
          actions: { type: 'recordCrash', params: ({ event }) => ({ reason: `rpc-server exited: ${event.reason}` }) },
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
            id: 'listening',
            src: 'waitRpcServerListening',
            input: ({ context }) => ({ port: context.port ?? 0 }),
            onDone: 'ready',
            onError: {
              target: '#rpcServer.crashed',
              actions: { type: 'recordCrash', params: ({ event }) => ({ reason: `rpc-server never listened: ${errorReason(event.error)}` }) },
            },
          },
          after: {
            loadTimeout: {
              target: '#rpcServer.crashed',
              actions: { type: 'recordCrash', params: { reason: 'rpc-server did not listen within loadTimeout' } },
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
            'process.exited': { target: '#rpcServer.stopped', actions: 'notifyStopped' },
            'rpc.stop': {},
          },
          after: {
            // Leaving `running` stops the process actor, whose cleanup SIGKILLs what is left.
            killTimeout: { target: '#rpcServer.stopped', actions: 'notifyStopped' },
          },
        },
      },
    },
    crashed: {
      entry: 'notifyCrashed',
      on: {
        'rpc.start': { target: 'running', actions: 'beginRun' },
        'rpc.stop': { target: 'stopped', actions: 'notifyStopped' },
      },
    },
  },
});
