// Model-based test of the node machine: walk its graph (@xstate/graph) over the events that can really happen
// in each state (plans from the election, process notices, mesh changes, rpc-ready, timers, a stop), then
// replay every shortest path against a fake election, a fake network and fake processes on SimulatedClock,
// and after every step assert what the state promises about the fake process table.
import { getShortestPaths } from '@xstate/graph';
import { createActor, fromCallback, fromPromise, SimulatedClock, type EventObject } from 'xstate';
import { describe, expect, it } from 'vitest';
import { llamaServerMachine, type LlamaServerProcessInput } from '../src/machines/llama-server.machine.ts';
import { asEndpointId, type Announcement, type EndpointId, type Plan } from '../src/machines/mesh-types.ts';
import { DRAIN_TIMEOUT_MS, ELECTION_QUIET_MS, nodeMachine, type NodeContext } from '../src/machines/node.machine.ts';
import { roleIn } from '../src/machines/node-plan.ts';
import type { ProcessEvent, ProcessKillCommand } from '../src/machines/process-slot.ts';
import type { NetworkCommand, NetworkEvent } from '../src/machines/protocol.ts';
import { rpcServerMachine, type RpcServerProcessInput } from '../src/machines/rpc-server.machine.ts';
import { fakeFacts } from '../test/support/fake-facts.ts';

const ME = asEndpointId('me');
const W = asEndpointId('w');
const H = asEndpointId('h');
const model = { name: 'm', bytes: 10e9, fingerprint: 'f' };
const SELF: Announcement = {
  id: ME, epoch: 1, seq: 0, name: 'me', role: 'auto', vramBytes: 16e9, model, version: 1, serving: false, addrs: [], connectedTo: [],
};
const ready = (id: string, host: EndpointId, stages: EndpointId[]): Plan => ({
  kind: 'ready', id, host, stages: stages.map((s) => ({ id: s, share: 1 / stages.length })), model,
});
const PLANS: Plan[] = [
  ready('solo', ME, [ME]),
  ready('host-with-worker', ME, [W, ME]),
  ready('worker-of-h', H, [ME, H]),
  { kind: 'waiting', id: 'waiting', reason: 'not enough VRAM' },
];

type Ev = EventObject & Record<string, unknown>;

// Only what can really happen next: the election speaks only when the plan id changes; a process notice
// only comes from a process in that phase.
function feasible(snapshot: { value: unknown; context: NodeContext; status: string }): Ev[] {
  if (snapshot.status !== 'active') return [];
  const c = snapshot.context;
  const out: Ev[] = [];
  const value = snapshot.value as string | Record<string, string>;
  const leaving = typeof value === 'object' && 'leaving' in value;
  if (!leaving) {
    for (const plan of PLANS) if (plan.id !== c.plan?.id) out.push({ type: 'election.planned', plan });
    out.push({ type: 'mesh.changed' });
    out.push({ type: 'node.stop', reason: 'test' });
  }
  // A request starts or ends on a host's API: a planned change with one in flight drains first.
  if (c.llama === 'ready') out.push({ type: 'requests.inflight', count: c.inFlight === 0 ? 1 : 0 });
  if (value === 'draining') out.push({ type: 'xstate.after.drainTimeout.node.draining' });
  if (leaving && value.leaving === 'draining') out.push({ type: 'xstate.after.drainTimeout.node.leaving.draining' });
  if (leaving && value.leaving === 'lingering') out.push({ type: 'xstate.after.drainLinger.node.leaving.lingering' });
  if (c.rpc === 'starting') out.push({ type: 'rpc.ready', port: 1 });
  if (c.rpc === 'ready' || c.rpc === 'starting') out.push({ type: 'rpc.crashed', reason: 'x' });
  if (c.rpc === 'stopping') out.push({ type: 'rpc.stopped' });
  if (c.llama === 'starting') out.push({ type: 'llama.ready', port: 2, planId: '', generation: 0 });
  if (c.llama === 'ready' || c.llama === 'starting') out.push({ type: 'llama.crashed', reason: 'x', planId: null });
  if (c.llama === 'stopping') out.push({ type: 'llama.stopped', planId: null });
  if (c.running?.id === 'host-with-worker' && c.rpcReady[W] !== 'host-with-worker' && !leaving) {
    out.push({ type: 'net.message', from: W, message: { type: 'rpc-ready', planId: 'host-with-worker' } });
  }
  if (snapshot.value === 'electing') out.push({ type: 'xstate.after.electionQuiet.node.electing' });
  if (leaving && value.leaving === 'going') out.push({ type: 'xstate.after.leaveTimeout.node.leaving.going' });
  return out;
}

interface Proc<T> {
  readonly input: T;
  readonly pid: number;
  alive: boolean;
  killAsked: boolean;
  readonly send: (e: ProcessEvent) => void;
}

describe('node graph', () => {
  const paths = getShortestPaths(nodeMachine, {
    input: { self: SELF, facts: fakeFacts() },
    events: feasible as never,
    serializeState: (s) => {
      const c = (s as unknown as { context: NodeContext }).context;
      return JSON.stringify([s.value, s.status, c.plan?.id, c.running?.id, c.rpc, c.llama, c.rpcReady, c.rpcReadySent, c.rpcTunnelPolicy, c.inFlight]);
    },
  });

  it('reaches every state of the node', () => {
    const reached = new Set(paths.map((p) => JSON.stringify(p.state.value)));
    for (const v of ['joining', 'electing', 'starting', 'serving', 'draining', 'stopping', { leaving: 'draining' }, { leaving: 'lingering' }, { leaving: 'going' }, 'stopped']) {
      if (v === 'joining') continue; // left at once without a bootstrap peer
      expect(reached, JSON.stringify(v)).toContain(JSON.stringify(v));
    }
    expect(paths.length).toBeGreaterThan(100); // one per distinct (state, plan, processes, hand-off) combination
  });

  it('replays every shortest path against fakes and keeps every state promise', async () => {
    for (const path of paths) {
      const clock = new SimulatedClock();
      const rpcs: Proc<RpcServerProcessInput>[] = [];
      const llamas: Proc<LlamaServerProcessInput>[] = [];
      const probes = { rpc: [] as (() => void)[], llama: [] as (() => void)[] };
      let pid = 1;
      const proc = <T,>(list: Proc<T>[]) =>
        fromCallback<ProcessKillCommand, T>(({ sendBack, receive, input }) => {
          const p: Proc<T> = { input, pid: pid++, alive: true, killAsked: false, send: sendBack };
          list.push(p);
          sendBack({ type: 'process.spawned', pid: p.pid, port: 9000 + p.pid });
          receive(() => {
            p.killAsked = true;
          });
          return () => {
            p.alive = false;
          };
        });
      const probe = (list: (() => void)[]) => fromPromise<void, { port: number }>(() => new Promise<void>((resolve) => list.push(resolve)));
      let plan: ((e: EventObject) => void) | null = null;
      let net: ((e: NetworkEvent) => void) | null = null;
      let gossipSeq = 0;
      const machine = nodeMachine.provide({
        actors: {
          network: fromCallback<NetworkCommand, { self: EndpointId }>(({ sendBack }) => {
            net = sendBack;
          }),
          election: fromCallback(({ sendBack }) => {
            plan = sendBack;
          }) as never,
          rpcServer: rpcServerMachine.provide({ actors: { rpcServerProcess: proc(rpcs), waitRpcServerListening: probe(probes.rpc) } }),
          llamaServer: llamaServerMachine.provide({ actors: { llamaServerProcess: proc(llamas), waitLlamaHealthy: probe(probes.llama) } }),
        },
      });
      const actor = createActor(machine, { clock, input: { self: SELF, facts: fakeFacts() } }).start();
      const live = <T,>(list: Proc<T>[]) => list.filter((p) => p.alive);
      const exit = <T,>(p: Proc<T> | undefined, reason: string) => {
        if (p === undefined || !p.alive) return;
        p.alive = false;
        p.send({ type: 'process.exited', code: 1, signal: null, reason });
      };
      const trail = path.steps.map((s) => s.event.type + ((s.event as { plan?: Plan }).plan ? `(${(s.event as { plan: Plan }).plan.id})` : '')).join(' > ');
      // A new llama-server is allowed only after its predecessor crashed or the election changed the plan.
      let llamaCount = 0;
      let restartAllowed = true;
      let lastLlamaPlan: string | null = null;

      for (const step of path.steps.slice(1)) {
        const e = step.event as Ev;
        switch (e.type) {
          case 'election.planned':
            if ((e.plan as Plan).id !== lastLlamaPlan) restartAllowed = true;
            plan!({ type: 'election.planned', plan: e.plan } as EventObject);
            break;
          case 'mesh.changed':
            // Gossip that teaches the node something new (a new fact, signed by its owner) is a mesh change; a
            // new seq alone is a refresh that changes nothing.
            ++gossipSeq;
            net!({
              type: 'net.message',
              from: asEndpointId('c'),
              message: {
                type: 'gossip',
                announcements: [fakeFacts().sign({ ...SELF, id: asEndpointId('c'), name: `c${gossipSeq}`, role: 'client', model: null, seq: gossipSeq })],
              },
            });
            break;
          case 'rpc.ready':
            expect(probes.rpc.length, `${trail}: no rpc-server is loading`).toBeGreaterThan(0);
            probes.rpc.pop()!(); // the probe of the current process (older ones belong to stopped actors)
            probes.rpc.length = 0;
            break;
          case 'llama.ready':
            expect(probes.llama.length, `${trail}: no llama-server is loading`).toBeGreaterThan(0);
            probes.llama.pop()!();
            probes.llama.length = 0;
            break;
          case 'rpc.crashed':
            exit(live(rpcs)[0], 'crash');
            break;
          case 'llama.crashed':
            restartAllowed = true;
            exit(live(llamas)[0], 'crash');
            break;
          case 'rpc.stopped':
            exit(rpcs.find((p) => p.alive && p.killAsked), 'SIGTERM');
            break;
          case 'llama.stopped':
            exit(llamas.find((p) => p.alive && p.killAsked), 'SIGTERM');
            break;
          case 'net.message':
            net!({ type: 'net.message', from: W, message: e.message as never });
            break;
          case 'xstate.after.electionQuiet.node.electing':
            clock.increment(ELECTION_QUIET_MS);
            break;
          case 'xstate.after.leaveTimeout.node.leaving.going':
            clock.increment(10_000);
            break;
          case 'xstate.after.drainLinger.node.leaving.lingering':
            clock.increment(1_000);
            break;
          case 'xstate.after.drainTimeout.node.draining':
          case 'xstate.after.drainTimeout.node.leaving.draining':
            clock.increment(DRAIN_TIMEOUT_MS);
            break;
          default:
            actor.send(e as never);
        }
        await new Promise((r) => setImmediate(r));

        const snap = actor.getSnapshot();
        expect(snap.value, trail).toEqual(step.state.value);
        const c = snap.context;
        // At every step: at most one of each process.
        expect(live(rpcs).length, trail).toBeLessThanOrEqual(1);
        expect(live(llamas).length, trail).toBeLessThanOrEqual(1);
        // A host restarts llama-server exactly when its plan changed (or the last one crashed).
        if (llamas.length > llamaCount) {
          expect(restartAllowed, `${trail}: llama-server restarted without a plan change`).toBe(true);
          llamaCount = llamas.length;
          restartAllowed = false;
          lastLlamaPlan = llamas.at(-1)!.input.plan.id;
          // ... and only with every remote worker's rpc-ready for that plan.
          for (const s of llamas.at(-1)!.input.plan.stages) if (s.id !== ME) expect(c.rpcReady[s.id], trail).toBe(lastLlamaPlan);
        }
        const role = roleIn(c.running, ME);
        if (snap.value === 'serving') {
          expect(live(rpcs).length, trail).toBe(role === 'host' || role === 'worker' ? 1 : 0);
          expect(live(llamas).length, trail).toBe(role === 'host' ? 1 : 0);
          if (role === 'host') expect(live(llamas)[0]!.input.plan.id, trail).toBe(c.running!.id);
        }
        // A worker admits its host exactly when it has told it rpc-ready for this plan and rpc-server.
        if (role === 'worker' && (snap.value === 'starting' || snap.value === 'serving')) {
          expect(c.rpcTunnelPolicy, trail).toEqual(c.rpcReadySent === c.running!.id ? { host: H, planId: c.running!.id } : null);
        }
        if (role !== 'worker' && snap.value !== 'electing') expect(c.rpcTunnelPolicy, trail).toBeNull();
        if (snap.value === 'stopping' || (typeof snap.value === 'object' && 'leaving' in snap.value && snap.value.leaving === 'going')) expect(c.rpcTunnelPolicy, trail).toBeNull();
        // Draining keeps what runs now: the processes of the running plan stay up.
        if (snap.value === 'draining' && role === 'host') expect(live(llamas).length, trail).toBe(1);
        if (snap.status === 'done') {
          expect(live(rpcs), `${trail}: processes outlive the node`).toHaveLength(0);
          expect(live(llamas), `${trail}: processes outlive the node`).toHaveLength(0);
        }
      }
      actor.stop();
      expect(live(rpcs).length + live(llamas).length, `${trail}: stopping the actor leaves processes`).toBe(0);
    }
  }, 300_000);
});
