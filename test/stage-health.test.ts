// The host's verdict on a hung stage (src/machines/stage-health.ts) in the node machine, with a fake network and
// fake processes on XState's SimulatedClock: the 1st strike restarts llama-server (the request in flight ends),
// a restart that gets ready clears the suspect, a restart that fails quarantines it (left out of `connectedTo`,
// so the election plans without it) and the quarantine ends after QUARANTINE_MS.
import { createActor, fromCallback, fromPromise, SimulatedClock } from 'xstate';
import { describe, expect, it } from 'vitest';
import { SETTLE_MS } from '../src/machines/election.machine.ts';
import { llamaServerMachine, type LlamaServerProcessInput } from '../src/machines/llama-server.machine.ts';
import type { Announcement, EndpointId } from '../src/machines/mesh-types.ts';
import { ELECTION_QUIET_MS, nodeMachine } from '../src/machines/node.machine.ts';
import type { MeshMessage, NetworkCommand, NetworkEvent } from '../src/machines/protocol.ts';
import { rpcServerMachine, type RpcServerProcessInput } from '../src/machines/rpc-server.machine.ts';
import { QUARANTINE_MS } from '../src/machines/stage-health.ts';
import { announcement, fakeProcess, flush, readyAtOnce, type FakeProcess } from './machine-fakes.ts';
import { fakeFacts } from './support/fake-facts.ts';

/** llama-server's readiness: the first run gets ready at once; later runs only while `restartsGetReady`. */
function readiness(gate: { restartsGetReady: boolean }) {
  let runs = 0;
  return fromPromise<void, { port: number }>(() => (runs++ === 0 || gate.restartsGetReady ? Promise.resolve() : new Promise<void>(() => {})));
}

async function servingHostWithWorker(gate = { restartsGetReady: true }) {
  const clock = new SimulatedClock();
  const net: { deliver: ((e: NetworkEvent) => void) | null } = { deliver: null };
  const rpcRuns: FakeProcess<RpcServerProcessInput>[] = [];
  const llamaRuns: FakeProcess<LlamaServerProcessInput>[] = [];
  const machine = nodeMachine.provide({
    actors: {
      network: fromCallback<NetworkCommand, { self: EndpointId }>(({ sendBack }) => {
        net.deliver = sendBack;
      }),
      rpcServer: rpcServerMachine.provide({ actors: { rpcServerProcess: fakeProcess(rpcRuns), waitRpcServerListening: readyAtOnce } }),
      llamaServer: llamaServerMachine.provide({ actors: { llamaServerProcess: fakeProcess(llamaRuns), waitLlamaHealthy: readiness(gate) } }),
    },
  });
  const actor = createActor(machine, { clock, input: { self: announcement('me', 8), facts: fakeFacts() } }).start();
  // The worker's node stays alive throughout (only its stage hangs): a heartbeat from it every 400 ms.
  let beat = 0;
  const advance = async (ms: number) => {
    for (let t = 0; t < ms; t += 10) {
      clock.increment(10);
      if (net.deliver !== null && actor.getSnapshot().context.peers['worker'] !== undefined && ++beat % 40 === 0) {
        net.deliver({ type: 'net.message', from: 'worker' as EndpointId, message: { type: 'heartbeat', n: beat } });
      }
      await flush();
    }
  };
  const facts = fakeFacts();
  const message = (from: EndpointId, m: MeshMessage) => net.deliver!({ type: 'net.message', from, message: m });
  await advance(SETTLE_MS + 50);
  const worker: Announcement = facts.sign(announcement('worker', 6, { connectedTo: ['me' as EndpointId] }));
  net.deliver!({ type: 'net.peer.connected', id: worker.id, direct: true });
  message(worker.id, { type: 'gossip', announcements: [worker] });
  await advance(SETTLE_MS + ELECTION_QUIET_MS + 50);
  const plan = actor.getSnapshot().context.running!;
  expect(plan.kind === 'ready' && plan.stages.map((s) => s.id)).toEqual(['worker', 'me']);
  message(worker.id, { type: 'rpc-ready', planId: plan.id });
  await advance(20);
  expect(actor.getSnapshot().value).toBe('serving');
  const ctx = () => actor.getSnapshot().context;
  const alive = <T,>(runs: FakeProcess<T>[]) => runs.filter((p) => p.alive);
  const hung = (planId = plan.id) => actor.send({ type: 'stage.hung', id: worker.id, planId, waitedMs: 15_000, boundMs: 15_000 });
  return { actor, advance, plan, worker, llamaRuns, ctx, alive, hung };
}

describe('stage health: a hung stage on the host', () => {
  it('1st strike: llama-server is stopped and started again for the same plan; ready again clears the suspect', async () => {
    const h = await servingHostWithWorker();
    h.hung();
    await h.advance(20);
    expect(h.llamaRuns[0]!.alive).toBe(false); // the request in flight ends with it
    expect(h.ctx().suspects).toEqual({ worker: h.plan.id });
    expect(h.ctx().self.connectedTo).toContain('worker'); // a suspect still counts
    await h.advance(ELECTION_QUIET_MS + 50);
    expect(h.llamaRuns).toHaveLength(2);
    expect(h.alive(h.llamaRuns)).toHaveLength(1);
    expect(h.llamaRuns[1]!.input.plan.id).toBe(h.plan.id);
    expect(h.actor.getSnapshot().value).toBe('serving');
    expect(h.ctx().suspects).toEqual({}); // the restart got ready: every stage answered
  });

  it('a report about another plan (an old llama-server) changes nothing', async () => {
    const h = await servingHostWithWorker();
    h.hung('an-older-plan');
    await h.advance(20);
    expect(h.alive(h.llamaRuns)).toHaveLength(1);
    expect(h.ctx().suspects).toEqual({});
  });

  it('a restart that fails quarantines the suspect: plans leave it out, until the quarantine ends', async () => {
    const h = await servingHostWithWorker({ restartsGetReady: false });
    h.hung();
    await h.advance(ELECTION_QUIET_MS + 50);
    expect(h.ctx().suspects).toEqual({ worker: h.plan.id });
    // The probe: the restart must get through the worker; it crashes before it gets ready (no answer).
    expect(h.alive(h.llamaRuns)).toHaveLength(1);
    h.llamaRuns.at(-1)!.crash('rpc-server did not answer DEVICE_COUNT');
    await h.advance(SETTLE_MS + ELECTION_QUIET_MS + 100);
    expect(h.ctx().quarantined).toEqual(['worker']);
    expect(h.ctx().suspects).toEqual({});
    expect(h.ctx().self.connectedTo).not.toContain('worker');
    expect(h.ctx().links).toContain('worker'); // the node is alive: the link and its heartbeats stay
    expect(h.ctx().running?.kind).toBe('waiting'); // me alone cannot hold the model
    expect(h.alive(h.llamaRuns)).toHaveLength(0);
    await h.advance(QUARANTINE_MS);
    expect(h.ctx().quarantined).toEqual([]);
    expect(h.ctx().self.connectedTo).toContain('worker');
    const back = h.ctx().running;
    expect(back?.kind === 'ready' && back.stages.map((s) => s.id)).toEqual(['worker', 'me']);
  });

  it('a second hang of the restarted llama-server quarantines too', async () => {
    const h = await servingHostWithWorker();
    h.hung();
    await h.advance(ELECTION_QUIET_MS + 50);
    // The restart got ready (the fake answers at once) and cleared the suspect: a new hang is a 1st strike again.
    expect(h.ctx().suspects).toEqual({});
    h.hung();
    await h.advance(20);
    expect(h.ctx().suspects).toEqual({ worker: h.plan.id });
    h.hung(); // hangs again before it got ready
    await h.advance(SETTLE_MS + ELECTION_QUIET_MS + 100);
    expect(h.ctx().quarantined).toEqual(['worker']);
    expect(h.ctx().running?.kind).toBe('waiting');
  });
});
