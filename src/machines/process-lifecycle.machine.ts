// One lifecycle for a child process that serves on a loopback port (rpc-server, llama-server):
// stopped -> running.spawning -> running.loading -> running.ready -> running.stopping -> stopped, or crashed.
// Pure: the process and the readiness wait live in two actor slots that the composition root fills with
// `.provide()`; a kind of process is a short spec (event prefix, slot names, timeouts, what its owner hears).
//
// Slot contracts (src/actors/process.actor.ts implements the process side for both kinds):
//   <processSlot>  fromCallback, input TLaunch. Spawns the child on an ephemeral loopback port; sends back
//                  `process.spawned {pid, port}` once it knows both, then `process.exited {code, signal,
//                  reason}` when the child exits (on its own, or after a `process.kill` it receives). Its
//                  cleanup kills the child, so stopping the actor never leaves a process behind. Throwing (or
//                  failing to spawn) ends in `crashed`.
//   <readySlot>    fromPromise, input { port }. Resolves once the child is ready; rejects (honouring its abort
//                  signal) when it cannot get there. Bounded here by the `loadTimeout` delay.
//
// Owner protocol: send `<prefix>.start` (with the kind's start fields) / `<prefix>.stop`; hears back on
// `notify` the kind's ready / crashed / stopped notices (stopped also for a stop while already stopped or
// crashed, so an owner can always wait for it).
import {
  assign,
  sendTo,
  setup,
  type AnyActorRef,
  type CallbackActorLogic,
  type EventObject,
  type MachineContext,
  type PromiseActorLogic,
  type ProvidedActor,
  type StateMachine,
} from 'xstate';
import { errorReason, unprovidedCallback, unprovidedPromise, type ProcessEvent, type ProcessKillCommand } from './process-slot.ts';

export interface ProcessLifecycleInput {
  /** The owner (the node machine): hears every notice of the kind. */
  readonly notify: AnyActorRef;
}

export interface ProcessLifecycleContext<TLaunch> {
  readonly notify: AnyActorRef;
  /** What the current (or last) process runs; null before the first start. */
  readonly launch: TLaunch | null;
  readonly pid: number | null;
  readonly port: number | null;
  /** Why the last run ended badly; null while nothing went wrong. */
  readonly crashReason: string | null;
}

/** `<prefix>.start` with the kind's fields, and `<prefix>.stop`. */
export type ProcessLifecycleCommand<P extends string, TStart extends object> =
  | ({ readonly type: `${P}.start` } & TStart)
  | { readonly type: `${P}.stop` };

export interface ProcessLifecycleSpec<
  P extends string,
  TStart extends object,
  TLaunch,
  TNotice extends EventObject,
  TProcessSlot extends string,
  TReadySlot extends string,
> {
  /** The machine's id (targets inside it are `#id.crashed`, `#id.stopped`); kebab-cased, the process's name in crash reasons. */
  readonly id: string;
  /** Event prefix of the owner protocol: `rpc` -> `rpc.start`, `rpc.stop`. */
  readonly prefix: P;
  /** Slot names for `.provide()`, and the id of the invoked readiness wait. */
  readonly slots: { readonly process: TProcessSlot; readonly ready: TReadySlot; readonly readyId: string };
  /** Crash reasons after the name: it failed to get ready ("never listened"); it missed `loadTimeout`. */
  readonly notReady: { readonly failed: string; readonly timedOut: string };
  /** `load`: beyond this between spawn and ready it is wedged; `kill`: what a SIGTERM gets (default 5 s). */
  readonly timeoutsMs: { readonly load: number; readonly kill?: number };
  /** What the process slot gets for this run, from the start command and the last run's. */
  readonly launch: (start: TStart, previous: TLaunch | null) => TLaunch;
  readonly notice: {
    readonly ready: (c: ProcessLifecycleContext<TLaunch>) => TNotice;
    readonly crashed: (c: ProcessLifecycleContext<TLaunch>) => TNotice;
    readonly stopped: (c: ProcessLifecycleContext<TLaunch>) => TNotice;
  };
}

/** The machine of one kind: the shared lifecycle, typed with the kind's events, context and slots. */
export type ProcessLifecycleMachine<
  P extends string,
  TStart extends object,
  TLaunch extends object,
  TProcessSlot extends string,
  TReadySlot extends string,
> = Retyped<
  ReturnType<typeof buildLifecycle>,
  ProcessLifecycleContext<TLaunch>,
  ProcessLifecycleCommand<P, TStart> | ProcessEvent,
  | { src: TProcessSlot; logic: CallbackActorLogic<ProcessKillCommand, TLaunch>; id: string | undefined }
  | { src: TReadySlot; logic: PromiseActorLogic<void, { port: number }>; id: string | undefined }
>;

/** The lifecycle machine of one kind of process. */
export function processLifecycleMachine<
  P extends string,
  TStart extends object,
  TLaunch extends object,
  TNotice extends EventObject,
  TProcessSlot extends string,
  TReadySlot extends string,
>(spec: ProcessLifecycleSpec<P, TStart, TLaunch, TNotice, TProcessSlot, TReadySlot>): ProcessLifecycleMachine<P, TStart, TLaunch, TProcessSlot, TReadySlot> {
  // XState cannot check a config whose event names are generic, so the machine is built once over wide
  // types and handed out under the kind's own (the spec ties them together).
  return buildLifecycle(spec as unknown as WideSpec) as unknown as ProcessLifecycleMachine<P, TStart, TLaunch, TProcessSlot, TReadySlot>;
}

/** Swaps a machine's context, events and actor slots, keeping what its config determined (states, delays...). */
type Retyped<M, TContext extends MachineContext, TEvent extends EventObject, TActor extends ProvidedActor> =
  M extends StateMachine<
    infer _Context, infer _Event, infer _Children, infer _Actor, infer TAction, infer TGuard, infer TDelay, infer TStateValue,
    infer TTag, infer TInput, infer TOutput, infer TEmitted, infer TMeta, infer TSchema, infer TTransitionMeta
  >
    ? StateMachine<
        TContext, TEvent, Record<string, AnyActorRef | undefined>, TActor, TAction, TGuard, TDelay, TStateValue,
        TTag, TInput, TOutput, TEmitted, TMeta, TSchema, TTransitionMeta
      >
    : never;

type WideLaunch = object;
type WideSpec = ProcessLifecycleSpec<string, object, WideLaunch, EventObject, string, string>;
type WideContext = ProcessLifecycleContext<WideLaunch>;

function buildLifecycle(spec: WideSpec) {
  // rpcServer -> rpc-server
  const name = spec.id.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`);
  const start = `${spec.prefix}.start`;
  const stop = `${spec.prefix}.stop`;
  const crashed = `#${spec.id}.crashed`;
  const stopped = `#${spec.id}.stopped`;
  const slots: Record<string, CallbackActorLogic<ProcessKillCommand, WideLaunch> | PromiseActorLogic<void, { port: number }>> = {
    [spec.slots.process]: unprovidedCallback<ProcessKillCommand, WideLaunch>(spec.slots.process),
    [spec.slots.ready]: unprovidedPromise<void, { port: number }>(spec.slots.ready),
  };
  const begin = { target: 'running', actions: { type: 'beginLaunch', params: ({ event }: { event: EventObject }) => ({ start: event }) } } as const;

  return setup({
    types: {
      input: {} as ProcessLifecycleInput,
      context: {} as WideContext,
      events: {} as ProcessEvent | { readonly type: string },
    },
    actors: slots,
    delays: {
      loadTimeout: spec.timeoutsMs.load,
      killTimeout: spec.timeoutsMs.kill ?? 5_000,
    },
    actions: {
      beginLaunch: assign(({ context }, params: { start: object }) => ({
        launch: spec.launch(params.start, context.launch),
        pid: null,
        port: null,
        crashReason: null,
      })),
      recordSpawn: assign((_, params: { pid: number; port: number }) => ({ pid: params.pid, port: params.port })),
      recordCrash: assign((_, params: { reason: string }) => ({ crashReason: params.reason })),
      forgetProcess: assign({ pid: null, port: null }),
      askProcessToExit: sendTo('process', { type: 'process.kill' } satisfies ProcessKillCommand),
      notifyReady: sendTo(({ context }) => context.notify, ({ context }) => spec.notice.ready(context)),
      notifyCrashed: sendTo(({ context }) => context.notify, ({ context }) => spec.notice.crashed(context)),
      notifyStopped: sendTo(({ context }) => context.notify, ({ context }) => spec.notice.stopped(context)),
    },
  }).createMachine({
    id: spec.id,
    context: ({ input }) => ({ notify: input.notify, launch: null, pid: null, port: null, crashReason: null }),
    initial: 'stopped',
    states: {
      stopped: {
        on: {
          [start]: begin,
          [stop]: { actions: 'notifyStopped' },
        },
      },
      running: {
        invoke: {
          id: 'process',
          src: spec.slots.process,
          input: ({ context }) => context.launch!,
          onError: {
            target: 'crashed',
            actions: { type: 'recordCrash', params: ({ event }) => ({ reason: `${name} process failed: ${errorReason(event.error)}` }) },
          },
        },
        exit: 'forgetProcess',
        on: {
          [stop]: '.stopping',
          'process.exited': {
            target: 'crashed',
            actions: { type: 'recordCrash', params: ({ event }) => ({ reason: `${name} exited: ${(event as Extract<ProcessEvent, { type: 'process.exited' }>).reason}` }) },
          },
        },
        initial: 'spawning',
        states: {
          spawning: {
            on: {
              'process.spawned': {
                target: 'loading',
                actions: {
                  type: 'recordSpawn',
                  params: ({ event }) => event as Extract<ProcessEvent, { type: 'process.spawned' }>,
                },
              },
            },
          },
          loading: {
            invoke: {
              id: spec.slots.readyId,
              src: spec.slots.ready,
              input: ({ context }) => ({ port: context.port ?? 0 }),
              onDone: 'ready',
              onError: {
                target: crashed,
                actions: { type: 'recordCrash', params: ({ event }) => ({ reason: `${name} ${spec.notReady.failed}: ${errorReason(event.error)}` }) },
              },
            },
            after: {
              loadTimeout: {
                target: crashed,
                actions: { type: 'recordCrash', params: { reason: `${name} ${spec.notReady.timedOut}` } },
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
              'process.exited': { target: stopped, actions: 'notifyStopped' },
              [stop]: {},
            },
            after: {
              // Leaving `running` stops the process actor, whose cleanup SIGKILLs what is left.
              killTimeout: { target: stopped, actions: 'notifyStopped' },
            },
          },
        },
      },
      crashed: {
        entry: 'notifyCrashed',
        on: {
          [start]: begin,
          [stop]: { target: 'stopped', actions: 'notifyStopped' },
        },
      },
    },
  });
}
