// Model-based tests of the rpc-server and llama-server lifecycles: walk every simple path of each machine's
// graph (@xstate/graph), replay it against a controllable fake process on SimulatedClock, and after every
// step assert what the state promises about the fake process table and the owner's notices. States are told
// apart by value and by whether a crash now backs off (a second crash in a row), so the back-off is walked too.
import { getSimplePaths } from '@xstate/graph';
import { createActor, fromCallback, fromPromise, SimulatedClock, type AnyActorRef, type EventObject } from 'xstate';
import { describe, expect, it } from 'vitest';
import { llamaServerMachine, type ReadyPlan } from '../src/machines/llama-server.machine.ts';
import { asEndpointId } from '../src/machines/mesh-types.ts';
import type { ProcessEvent, ProcessKillCommand } from '../src/machines/process-slot.ts';
import { rpcServerMachine } from '../src/machines/rpc-server.machine.ts';

interface FakeProc {
  alive: boolean;
  killAsked: boolean;
  readonly pid: number;
  readonly send: (e: ProcessEvent) => void;
}

const PLAN: ReadyPlan = {
  kind: 'ready',
  id: 'p1',
  host: asEndpointId('h'),
  stages: [{ id: asEndpointId('h'), share: 1 }],
  model: { name: 'm', bytes: 1, fingerprint: 'f' },
};

interface Lifecycle {
  readonly name: string;
  readonly machine: typeof rpcServerMachine | typeof llamaServerMachine;
  readonly id: string;
  readonly prefix: 'rpc' | 'llama';
  readonly start: EventObject;
  readonly slots: (proc: ReturnType<typeof fromCallback>, probe: ReturnType<typeof fromPromise>, backoff: ReturnType<typeof fromCallback>) => object;
  readonly probeId: string;
  readonly loadTimeout: number;
}

const LIFECYCLES: Lifecycle[] = [
  {
    name: 'rpc-server',
    machine: rpcServerMachine,
    id: 'rpcServer',
    prefix: 'rpc',
    start: { type: 'rpc.start' },
    slots: (proc, probe, backoff) => ({ rpcServerProcess: proc, waitRpcServerListening: probe, rpcServerBackoff: backoff }),
    probeId: 'listening',
    loadTimeout: 30_000,
  },
  {
    name: 'llama-server',
    machine: llamaServerMachine,
    id: 'llamaServer',
    prefix: 'llama',
    start: { type: 'llama.start', plan: PLAN, generation: 1, ownRpcPort: 7 } as EventObject,
    slots: (proc, probe, backoff) => ({ llamaServerProcess: proc, waitLlamaHealthy: probe, llamaServerBackoff: backoff }),
    probeId: 'healthy',
    loadTimeout: 600_000,
  },
];

for (const lc of LIFECYCLES) {
  describe(`${lc.name} lifecycle graph`, () => {
    const events: (EventObject & Record<string, unknown>)[] = [
      lc.start,
      { type: `${lc.prefix}.stop` },
      { type: 'process.spawned', pid: 1, port: 2 },
      { type: 'process.exited', code: 1, signal: null, reason: 'boom' },
      { type: `xstate.done.actor.${lc.probeId}` },
      { type: `xstate.error.actor.${lc.probeId}`, error: new Error('probe failed') },
      { type: `xstate.after.loadTimeout.${lc.id}.running.loading` },
      { type: `xstate.after.killTimeout.${lc.id}.running.stopping` },
      { type: 'process.unresponsive', reason: 'stopped' },
      { type: `xstate.after.killTimeout.${lc.id}.running.killing` },
      { type: 'backoff.elapsed' },
    ];
    const dummyOwner = createActor(fromCallback(() => {})).start();
    const paths = getSimplePaths(lc.machine as typeof rpcServerMachine, {
      input: { notify: dummyOwner },
      events: events as never,
      serializeState: (s) => JSON.stringify([s.value, s.context.crashes >= 1]),
    });

    it('has paths to every state', () => {
      const reached = new Set(paths.map((p) => JSON.stringify(p.state.value)));
      const states = ['"stopped"', '{"running":"spawning"}', '{"running":"loading"}', '{"running":"ready"}', '{"running":"stopping"}', '{"running":"killing"}'];
      for (const v of [...states, '{"crashed":"idle"}', '{"crashed":"backingOff"}']) {
        expect(reached, v).toContain(v);
      }
    });

    it(`replays all ${paths.length} simple paths against a fake process and keeps each state's promise`, async () => {
      for (const path of paths) {
        const clock = new SimulatedClock();
        const procs: FakeProc[] = [];
        const probes: { resolve: () => void; reject: (e: Error) => void }[] = [];
        const notices: EventObject[] = [];
        let pid = 1;
        const proc = fromCallback<ProcessKillCommand>(({ sendBack, receive }) => {
          const p: FakeProc = { alive: true, killAsked: false, pid: pid++, send: sendBack };
          procs.push(p);
          receive(() => {
            p.killAsked = true;
          });
          return () => {
            p.alive = false;
          };
        });
        const probe = fromPromise<void>(() => new Promise<void>((resolve, reject) => probes.push({ resolve, reject })));
        const backoffs: { elapse: () => void }[] = [];
        const backoff = fromCallback(({ sendBack }) => {
          backoffs.push({ elapse: () => sendBack({ type: 'backoff.elapsed' }) });
        });
        const owner = createActor(fromCallback<EventObject>(({ receive }) => receive((n) => notices.push(n)))).start();
        const machine = (lc.machine as typeof rpcServerMachine).provide({ actors: lc.slots(proc as never, probe as never, backoff as never) as never });
        const actor = createActor(machine, { clock, input: { notify: owner as AnyActorRef } }).start();
        const current = () => procs.at(-1)!;
        const describePath = path.steps.map((s) => s.event.type).join(' > ');

        for (const step of path.steps.slice(1)) {
          const e = step.event;
          if (e.type === 'process.spawned') current().send({ type: 'process.spawned', pid: current().pid, port: 9000 + current().pid });
          else if (e.type === 'process.exited') {
            current().alive = false;
            current().send({ type: 'process.exited', code: 1, signal: null, reason: 'boom' });
          } else if (e.type.startsWith('xstate.done.actor.')) probes.at(-1)!.resolve();
          else if (e.type.startsWith('xstate.error.actor.')) probes.at(-1)!.reject(new Error('probe failed'));
          else if (e.type.includes('loadTimeout')) clock.increment(lc.loadTimeout);
          else if (e.type.includes('killTimeout')) clock.increment(5_000);
          else if (e.type === 'process.unresponsive') current().send({ type: 'process.unresponsive', reason: 'stopped' });
          else if (e.type === 'backoff.elapsed') backoffs.at(-1)!.elapse();
          else actor.send(e as never);
          await new Promise((r) => setImmediate(r));

          const value = actor.getSnapshot().value;
          expect(value, describePath).toEqual(step.state.value);
          // What each state promises, read off the fake process table and the owner's notices.
          const live = procs.filter((p) => p.alive);
          const crashed = typeof value === 'object' && 'crashed' in value;
          const running = typeof value === 'object' && 'running' in value ? value.running : null;
          if (value === 'stopped' || crashed) expect(live, describePath).toHaveLength(0);
          else expect(live, describePath).toHaveLength(1);
          if (crashed) expect(notices.at(-1)?.type, describePath).toBe(`${lc.prefix}.crashed`);
          // Backing off: no second crash in a row without a wait.
          if (crashed && value.crashed === 'backingOff') expect(actor.getSnapshot().context.crashes, describePath).toBeGreaterThanOrEqual(2);
          if (running === 'ready') expect(notices.at(-1)?.type, describePath).toBe(`${lc.prefix}.ready`);
          if (running === 'stopping' || running === 'killing') expect(live[0]!.killAsked, describePath).toBe(true);
          if (value === 'stopped' && path.steps.indexOf(step) > 0 && e.type !== lc.start.type) {
            expect(notices.at(-1)?.type, describePath).toBe(`${lc.prefix}.stopped`);
          }
        }
        actor.stop();
        expect(procs.filter((p) => p.alive), `${describePath}: a stopped machine leaves no process`).toHaveLength(0);
      }
    });
  });
}
