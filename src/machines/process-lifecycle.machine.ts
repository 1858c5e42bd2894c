// One lifecycle for a child process that serves on a loopback port (rpc-server, llama-server):
// stopped -> running.spawning -> running.loading -> running.ready -> running.stopping -> stopped, or crashed.
// A process that stops answering its liveness probe is killed (running.killing) and crashed. The same run key
// (llama-server: the plan) crashing again before it stayed ready for `stable` waits in crashed.backingOff
// (1 s, doubling, to 60 s: backoffDelayMs) before a start runs it again.
// Pure: the process and the readiness wait live in two actor slots that the composition root fills with
// `.provide()`; a kind of process is a short spec (event prefix, slot names, timeouts, what its owner hears).
//
// Slot contracts (src/actors/process.actor.ts implements the process side for both kinds):
//   <processSlot>  fromCallback, input TLaunch. Spawns the child on an ephemeral loopback port; sends back
//                  `process.spawned {pid, port}` once it knows both, then `process.exited {code, signal,
//                  reason}` when the child exits (on its own, or after a `process.kill` it receives). Its
//                  cleanup kills the child, so stopping the actor never leaves a process behind. Throwing (or
//                  failing to spawn) ends in `crashed`.
//                  It probes the child's liveness from `process.spawned` on and sends `process.unresponsive
//                  {reason}` once its bound of missed probes is reached; `process.kill {force: true}` is SIGKILL.
//   <readySlot>    fromPromise, input { port }. Resolves once the child is ready; rejects (honouring its abort
//                  signal) when it cannot get there. Bounded here by the `loadTimeout` delay.
//   <backoffSlot>  fromCallback, input BackoffInput: `backoff.scheduled {nextAttemptAt}` at once, then
//                  `backoff.elapsed` after `delayMs` (process-slot.ts). It holds the wall clock and the log line.
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
import {
  backoffDelayMs,
  errorReason,
  unprovidedCallback,
  unprovidedPromise,
  type BackoffEvent,
  type BackoffInput,
  type ProcessEvent,
  type ProcessKillCommand,
} from './process-slot.ts';

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
  /** The most recent crash's reason, kept across starts (the status page); null before any. */
  readonly lastCrash: string | null;
  /**
   * Crashes in a row of the run key `crashKey` (llama-server: the plan id) with no `stable` stretch of ready in
   * between: 0 after one, or after a start of another key. Read by the owner (the crashed notice carries it).
   */
  readonly crashes: number;
  readonly crashKey: string | null;
  /** While crashed.backingOff: why, how many crashes, the delay and when the next attempt runs (epoch ms, once known). */
  readonly backoff: LifecycleBackoff | null;
  /** A start that arrived during the back-off: it runs when the back-off ends. */
  readonly pending: TLaunch | null;
}

export interface LifecycleBackoff {
  readonly reason: string;
  readonly crashes: number;
  readonly delayMs: number;
  readonly nextAttemptAt: number | null;
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
  TBackoffSlot extends string,
> {
  /** The machine's id (targets inside it are `#id.crashed`, `#id.stopped`); kebab-cased, the process's name in crash reasons. */
  readonly id: string;
  /** Event prefix of the owner protocol: `rpc` -> `rpc.start`, `rpc.stop`. */
  readonly prefix: P;
  /** Slot names for `.provide()`, and the id of the invoked readiness wait. */
  readonly slots: { readonly process: TProcessSlot; readonly ready: TReadySlot; readonly readyId: string; readonly backoff: TBackoffSlot };
  /** Crash reasons after the name: it failed to get ready ("never listened"); it missed `loadTimeout`. */
  readonly notReady: { readonly failed: string; readonly timedOut: string };
  /**
   * `load`: beyond this between spawn and ready it is wedged; `kill`: what a SIGTERM gets (default 5 s);
   * `stable`: ready this long and the crashes in a row start again from 0 (default 60 s).
   */
  readonly timeoutsMs: { readonly load: number; readonly kill?: number; readonly stable?: number };
  /** What the process slot gets for this run, from the start command and the last run's. */
  readonly launch: (start: TStart, previous: TLaunch | null) => TLaunch;
  /** What counts as "the same run" for the back-off (llama-server: the plan id). */
  readonly runKey: (launch: TLaunch) => string;
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
  TBackoffSlot extends string,
> = Retyped<
  ReturnType<typeof buildLifecycle>,
  ProcessLifecycleContext<TLaunch>,
  ProcessLifecycleCommand<P, TStart> | ProcessEvent | BackoffEvent,
  | { src: TProcessSlot; logic: CallbackActorLogic<ProcessKillCommand, TLaunch>; id: string | undefined }
  | { src: TReadySlot; logic: PromiseActorLogic<void, { port: number }>; id: string | undefined }
  | { src: TBackoffSlot; logic: CallbackActorLogic<EventObject, BackoffInput>; id: string | undefined }
>;

/** The lifecycle machine of one kind of process. */
export function processLifecycleMachine<
  P extends string,
  TStart extends object,
  TLaunch extends object,
  TNotice extends EventObject,
  TProcessSlot extends string,
  TReadySlot extends string,
  TBackoffSlot extends string,
>(
  spec: ProcessLifecycleSpec<P, TStart, TLaunch, TNotice, TProcessSlot, TReadySlot, TBackoffSlot>,
): ProcessLifecycleMachine<P, TStart, TLaunch, TProcessSlot, TReadySlot, TBackoffSlot> {
  // XState cannot check a config whose event names are generic, so the machine is built once over wide
  // types and handed out under the kind's own (the spec ties them together).
  return buildLifecycle(spec as unknown as WideSpec) as unknown as ProcessLifecycleMachine<P, TStart, TLaunch, TProcessSlot, TReadySlot, TBackoffSlot>;
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
type WideSpec = ProcessLifecycleSpec<string, object, WideLaunch, EventObject, string, string, string>;
type WideContext = ProcessLifecycleContext<WideLaunch>;

function buildLifecycle(spec: WideSpec) {
  // rpcServer -> rpc-server
  const name = spec.id.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`);
  const start = `${spec.prefix}.start`;
  const stop = `${spec.prefix}.stop`;
  const running = `#${spec.id}.running`;
  const crashed = `#${spec.id}.crashed`;
  const stopped = `#${spec.id}.stopped`;
  const slots: Record<
    string,
    CallbackActorLogic<ProcessKillCommand, WideLaunch> | PromiseActorLogic<void, { port: number }> | CallbackActorLogic<EventObject, BackoffInput>
  > = {
    [spec.slots.process]: unprovidedCallback<ProcessKillCommand, WideLaunch>(spec.slots.process),
    [spec.slots.ready]: unprovidedPromise<void, { port: number }>(spec.slots.ready),
    [spec.slots.backoff]: unprovidedCallback<EventObject, BackoffInput>(spec.slots.backoff),
  };
  const begin = { target: running, actions: { type: 'beginLaunch', params: ({ event }: { event: EventObject }) => ({ start: event }) } } as const;
  const sameKey = (context: WideContext, launch: WideLaunch) => context.crashKey !== null && context.crashKey === spec.runKey(launch);

  return setup({
    types: {
      input: {} as ProcessLifecycleInput,
      context: {} as WideContext,
      events: {} as ProcessEvent | BackoffEvent | { readonly type: string },
    },
    actors: slots,
    delays: {
      loadTimeout: spec.timeoutsMs.load,
      killTimeout: spec.timeoutsMs.kill ?? 5_000,
      stableAfter: spec.timeoutsMs.stable ?? 60_000,
    },
    guards: {
      // A start of another run key needs no back-off: it is not what crashed.
      startsAnotherKey: ({ context, event }) => !sameKey(context, spec.launch(event, context.launch)),
      mustBackOff: ({ context }) => backoffDelayMs(context.crashes) > 0,
      hasPendingStart: ({ context }) => context.pending !== null,
    },
    actions: {
      beginLaunch: assign(({ context }, params: { start: object }) => {
        const launch = spec.launch(params.start, context.launch);
        const keep = sameKey(context, launch);
        return { launch, pid: null, port: null, crashReason: null, pending: null, crashes: keep ? context.crashes : 0, crashKey: keep ? context.crashKey : null };
      }),
      holdStart: assign(({ context, event }) => ({ pending: spec.launch(event, context.pending ?? context.launch) })),
      runPending: assign(({ context }) => ({ launch: context.pending, pending: null, pid: null, port: null, crashReason: null })),
      dropPending: assign({ pending: null }),
      recordSpawn: assign((_, params: { pid: number; port: number }) => ({ pid: params.pid, port: params.port })),
      recordCrash: assign((_, params: { reason: string }) => ({ crashReason: params.reason })),
      // Every way into `crashed` passes here once: one more crash in a row of this run key, or the first of a new one.
      countCrash: assign(({ context }) => {
        const key = context.launch === null ? null : spec.runKey(context.launch);
        const crashes = key !== null && key === context.crashKey ? context.crashes + 1 : 1;
        return { crashes, crashKey: key, lastCrash: context.crashReason };
      }),
      forgetCrashes: assign({ crashes: 0, crashKey: null }),
      beginBackoff: assign(({ context }) => ({
        backoff: { reason: context.crashReason ?? 'unknown', crashes: context.crashes, delayMs: backoffDelayMs(context.crashes), nextAttemptAt: null },
      })),
      noteNextAttempt: assign(({ context, event }) => ({
        backoff: context.backoff === null ? null : { ...context.backoff, nextAttemptAt: (event as Extract<BackoffEvent, { type: 'backoff.scheduled' }>).nextAttemptAt },
      })),
      endBackoff: assign({ backoff: null }),
      forgetProcess: assign({ pid: null, port: null }),
      askProcessToExit: sendTo('process', { type: 'process.kill' } satisfies ProcessKillCommand),
      killProcess: sendTo('process', { type: 'process.kill', force: true } satisfies ProcessKillCommand),
      notifyReady: sendTo(({ context }) => context.notify, ({ context }) => spec.notice.ready(context)),
      notifyCrashed: sendTo(({ context }) => context.notify, ({ context }) => spec.notice.crashed(context)),
      notifyStopped: sendTo(({ context }) => context.notify, ({ context }) => spec.notice.stopped(context)),
    },
  }).createMachine({
    id: spec.id,
    context: ({ input }) => ({
      notify: input.notify,
      launch: null,
      pid: null,
      port: null,
      crashReason: null,
      lastCrash: null,
      crashes: 0,
      crashKey: null,
      backoff: null,
      pending: null,
    }),
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
          'process.unresponsive': {
            target: '.killing',
            actions: {
              type: 'recordCrash',
              params: ({ event }) => ({ reason: `${name} unresponsive, killed: ${(event as Extract<ProcessEvent, { type: 'process.unresponsive' }>).reason}` }),
            },
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
            // Ready this long: whatever crashed before is behind us.
            after: { stableAfter: { actions: 'forgetCrashes' } },
          },
          // It stopped answering: SIGKILL (a stopped process cannot act on SIGTERM), then crashed once it is gone.
          killing: {
            entry: 'killProcess',
            on: {
              'process.exited': { target: crashed },
              'process.unresponsive': {},
              // Leaving `running` stops the process actor, whose cleanup finishes the kill.
              [stop]: { target: stopped, actions: 'notifyStopped' },
            },
            after: { killTimeout: { target: crashed } },
          },
          stopping: {
            entry: 'askProcessToExit',
            on: {
              // The exit we asked for is no crash. (Overrides the parent's `process.exited`.)
              'process.exited': { target: stopped, actions: 'notifyStopped' },
              'process.unresponsive': {},
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
        entry: ['countCrash', 'notifyCrashed'],
        on: {
          [stop]: { target: 'stopped', actions: ['dropPending', 'notifyStopped'] },
        },
        initial: 'deciding',
        states: {
          deciding: {
            always: [{ guard: 'mustBackOff', target: 'backingOff' }, { target: 'idle' }],
          },
          // The same run crashed again soon: a start waits here (the latest one wins) until the delay is over.
          backingOff: {
            entry: 'beginBackoff',
            exit: 'endBackoff',
            invoke: {
              id: 'backoff',
              src: spec.slots.backoff,
              input: ({ context }): BackoffInput => ({
                name,
                reason: context.crashReason ?? 'unknown',
                crashes: context.crashes,
                delayMs: backoffDelayMs(context.crashes),
              }),
              // No back-off to wait on: a start held meanwhile runs now rather than never.
              onError: [
                {
                  guard: 'hasPendingStart',
                  target: running,
                  actions: [{ type: 'recordCrash', params: ({ event }) => ({ reason: `${name} back-off failed: ${errorReason(event.error)}` }) }, 'runPending'],
                },
                { target: 'idle', actions: { type: 'recordCrash', params: ({ event }) => ({ reason: `${name} back-off failed: ${errorReason(event.error)}` }) } },
              ],
            },
            on: {
              'backoff.scheduled': { actions: 'noteNextAttempt' },
              'backoff.elapsed': [{ guard: 'hasPendingStart', target: running, actions: 'runPending' }, { target: 'idle' }],
              [start]: [{ guard: 'startsAnotherKey', ...begin }, { actions: 'holdStart' }],
            },
          },
          idle: {
            on: { [start]: begin },
          },
        },
      },
    },
  });
}
