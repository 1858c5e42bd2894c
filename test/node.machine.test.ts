// The node machine with a fake network and fake processes on XState's SimulatedClock: the lifecycle,
// re-election without restarts, kill -> fresh start on a plan change, the hand-off, crashes, a graceful stop.
import { createActor, fromCallback, SimulatedClock } from 'xstate';
import { describe, expect, it } from 'vitest';
import { SETTLE_MS } from '../src/machines/election.machine.ts';
import { llamaServerMachine, type LlamaServerProcessInput } from '../src/machines/llama-server.machine.ts';
import type { Announcement, EndpointId } from '../src/machines/mesh-types.ts';
import { DRAIN_TIMEOUT_MS, ELECTION_QUIET_MS, nodeMachine } from '../src/machines/node.machine.ts';
import type { MeshMessage, NetworkCommand, NetworkEvent } from '../src/machines/protocol.ts';
import { rpcServerMachine, type RpcServerProcessInput } from '../src/machines/rpc-server.machine.ts';
import { announcement, fakeProcess, flush, readyAtOnce, type FakeProcess } from './machine-fakes.ts';
import { fakeFacts } from './support/fake-facts.ts';

function harness(self: Announcement) {
  const clock = new SimulatedClock();
  const commands: NetworkCommand[] = [];
  const net: { deliver: ((e: NetworkEvent) => void) | null } = { deliver: null };
  const rpcRuns: FakeProcess<RpcServerProcessInput>[] = [];
  const llamaRuns: FakeProcess<LlamaServerProcessInput>[] = [];
  const machine = nodeMachine.provide({
    actors: {
      network: fromCallback<NetworkCommand, { self: EndpointId }>(({ sendBack, receive }) => {
        net.deliver = sendBack;
        receive((cmd) => commands.push(cmd));
      }),
      rpcServer: rpcServerMachine.provide({ actors: { rpcServerProcess: fakeProcess(rpcRuns), waitRpcServerListening: readyAtOnce } }),
      llamaServer: llamaServerMachine.provide({ actors: { llamaServerProcess: fakeProcess(llamaRuns), waitLlamaHealthy: readyAtOnce } }),
    },
  });
  const actor = createActor(machine, { clock, input: { self, facts: fakeFacts() } }).start();
  const h = {
    actor,
    clock,
    commands,
    rpcRuns,
    llamaRuns,
    alive: (runs: FakeProcess<unknown>[]) => runs.filter((p) => p.alive),
    state: () => actor.getSnapshot().value,
    /** Advances the clock in small steps, letting promise actors settle in between. */
    async advance(ms: number) {
      for (let t = 0; t < ms; t += 10) {
        clock.increment(10);
        await flush();
      }
    },
    /** A peer connects and introduces itself (its first message completes our handshake). */
    async connect(peer: Announcement) {
      net.deliver!({ type: 'net.peer.connected', id: peer.id, direct: true });
      h.message(peer.id, { type: 'gossip', announcements: [peer] });
      await flush();
    },
    /** Delivers a message; gossip about unsigned announcements gets their owners' (stand-in) signatures. */
    message(from: EndpointId, message: MeshMessage) {
      if (message.type === 'gossip') {
        const facts = fakeFacts();
        message = { ...message, announcements: message.announcements.map((a) => (a.sig === undefined ? facts.sign(a) : a)) };
      }
      net.deliver!({ type: 'net.message', from, message });
    },
    sentTo: (to: EndpointId, type: MeshMessage['type']) =>
      commands.filter((c): c is Extract<NetworkCommand, { type: 'net.send' }> => c.type === 'net.send' && c.to === to && c.message.type === type),
  };
  return h;
}

const ME = announcement('me', 16);

describe('node machine', () => {
  it('a node that fits the model alone goes joining -> electing -> starting -> serving with one of each process', async () => {
    const h = harness(ME);
    expect(h.state()).toBe('electing');
    await h.advance(SETTLE_MS + 50);
    expect(h.state()).toBe('serving');
    expect(h.alive(h.rpcRuns)).toHaveLength(1);
    expect(h.alive(h.llamaRuns)).toHaveLength(1);
    expect(h.llamaRuns[0]!.input.plan.stages.map((s) => s.id)).toEqual(['me']);
    expect(h.actor.getSnapshot().context.self.serving).toBe(true);
  });

  it('a mesh change that cannot change the plan (a lite client joins) re-elects and restarts nothing', async () => {
    const h = harness(ME);
    await h.advance(SETTLE_MS + 50);
    const client = announcement('client', 0, { role: 'client', connectedTo: ['me' as EndpointId] });
    await h.connect(client);
    expect(h.state()).toBe('electing');
    await h.advance(ELECTION_QUIET_MS + 50);
    expect(h.state()).toBe('serving');
    expect(h.rpcRuns).toHaveLength(1);
    expect(h.llamaRuns).toHaveLength(1);
    expect(h.actor.getSnapshot().context.self.connectedTo).toEqual(['client']);
    // The handshake told the client everything we know.
    expect(h.sentTo(client.id, 'gossip').length).toBeGreaterThan(0);
  });

  it('a plan change goes stopping (kill) -> starting (fresh start)', async () => {
    const h = harness(announcement('me', 8));
    // Alone with 8 GB the 10 GB model waits: nothing runs.
    await h.advance(SETTLE_MS + 50);
    expect(h.state()).toBe('serving');
    expect(h.rpcRuns).toHaveLength(0);
    // A bigger node arrives: it hosts alone, so we stay out of the plan and run nothing.
    const big = announcement('big', 24, { connectedTo: ['me' as EndpointId] });
    await h.connect(big);
    await h.advance(SETTLE_MS + ELECTION_QUIET_MS + 50);
    const plan = h.actor.getSnapshot().context.running;
    expect(plan?.kind === 'ready' && plan.host).toBe('big');
    expect(h.alive(h.rpcRuns)).toHaveLength(0);
    expect(h.state()).toBe('serving');
  });

  it('a host kills its processes when the plan moves the host elsewhere', async () => {
    const h = harness(ME);
    await h.advance(SETTLE_MS + 50);
    expect(h.alive(h.llamaRuns)).toHaveLength(1);
    const bigger = announcement('bigger', 24, { connectedTo: ['me' as EndpointId] });
    await h.connect(bigger);
    await h.advance(SETTLE_MS + ELECTION_QUIET_MS + 50);
    expect(h.alive(h.llamaRuns)).toHaveLength(0);
    expect(h.alive(h.rpcRuns)).toHaveLength(0);
    expect(h.llamaRuns).toHaveLength(1); // killed, not restarted
    expect(h.actor.getSnapshot().context.self.serving).toBe(false);
  });

  it('a planned change with a request in flight drains first (bounded), then kills', async () => {
    const h = harness(ME);
    await h.advance(SETTLE_MS + 50);
    expect(h.alive(h.llamaRuns)).toHaveLength(1);
    h.actor.send({ type: 'requests.inflight', count: 1 });
    const bigger = announcement('bigger', 24, { connectedTo: ['me' as EndpointId] });
    await h.connect(bigger);
    await h.advance(SETTLE_MS + ELECTION_QUIET_MS + 50);
    expect(h.state()).toBe('draining');
    expect(h.alive(h.llamaRuns)).toHaveLength(1); // still answering
    await h.advance(1_000);
    expect(h.llamaRuns[0]!.alive).toBe(true);
    h.actor.send({ type: 'requests.inflight', count: 0 });
    await h.advance(100);
    expect(h.llamaRuns[0]!.alive).toBe(false); // drained: the kill -> fresh start goes on
    // Bounded: a request that never ends holds the change for DRAIN_TIMEOUT_MS at most (the newcomer answers
    // its heartbeats meanwhile, so the change stays).
    const h2 = harness(ME);
    await h2.advance(SETTLE_MS + 50);
    h2.actor.send({ type: 'requests.inflight', count: 1 });
    const newcomer = announcement('bigger', 24, { connectedTo: ['me' as EndpointId] });
    await h2.connect(newcomer);
    const keepAlive = async (ms: number) => {
      for (let t = 0; t < ms; t += 250) {
        for (const hb of h2.sentTo(newcomer.id, 'heartbeat').splice(0)) h2.message(newcomer.id, { type: 'heartbeat-ack', n: (hb.message as { n: number }).n });
        h2.commands.splice(0);
        await h2.advance(250);
      }
    };
    await keepAlive(SETTLE_MS + ELECTION_QUIET_MS + 250);
    expect(h2.state()).toBe('draining');
    await keepAlive(DRAIN_TIMEOUT_MS - 1_000);
    expect(h2.llamaRuns[0]!.alive).toBe(true);
    await keepAlive(1_500);
    expect(h2.llamaRuns[0]!.alive).toBe(false);
    // A change that goes away during the drain restarts nothing: the newcomer stops answering and is gone.
    const h3 = harness(ME);
    await h3.advance(SETTLE_MS + 50);
    h3.actor.send({ type: 'requests.inflight', count: 1 });
    await h3.connect(announcement('bigger', 24, { connectedTo: ['me' as EndpointId] }));
    await h3.advance(SETTLE_MS + ELECTION_QUIET_MS + 50);
    expect(h3.state()).toBe('draining');
    await h3.advance(5_000);
    expect(h3.state()).toBe('serving');
    expect(h3.llamaRuns).toHaveLength(1);
    expect(h3.llamaRuns[0]!.alive).toBe(true);
  });

  it('a graceful stop of a host with a request in flight lets it finish before saying leaving', async () => {
    const h = harness(ME);
    await h.advance(SETTLE_MS + 50);
    const peer = announcement('peer', 4, { connectedTo: ['me' as EndpointId] });
    await h.connect(peer);
    await h.advance(ELECTION_QUIET_MS + 50);
    h.actor.send({ type: 'requests.inflight', count: 1 });
    h.actor.send({ type: 'node.stop', reason: 'SIGTERM' });
    await h.advance(500);
    expect(h.actor.getSnapshot().value).toEqual({ leaving: 'draining' });
    expect(h.sentTo(peer.id, 'leaving')).toHaveLength(0);
    expect(h.alive(h.llamaRuns)).toHaveLength(1);
    h.actor.send({ type: 'requests.inflight', count: 0 });
    await h.advance(1_100); // the linger for the answer's last bytes
    expect(h.sentTo(peer.id, 'leaving')).toHaveLength(1);
    expect(h.actor.getSnapshot().status).toBe('done');
  });

  it('a worker starts its rpc-server, admits only its host, and tells the host rpc-ready for the plan', async () => {
    const h = harness(announcement('me', 6));
    await h.advance(SETTLE_MS + 50);
    const host = announcement('host', 8, { connectedTo: ['me' as EndpointId] });
    await h.connect(host);
    await h.advance(SETTLE_MS + ELECTION_QUIET_MS + 50);
    const ctx = h.actor.getSnapshot().context;
    expect(ctx.running?.kind === 'ready' && ctx.running.host).toBe('host');
    expect(h.alive(h.rpcRuns)).toHaveLength(1);
    expect(h.llamaRuns).toHaveLength(0);
    expect(ctx.rpcTunnelPolicy).toEqual({ host: 'host', planId: ctx.running!.id });
    expect(h.sentTo(host.id, 'rpc-ready').map((c) => c.message)).toEqual([{ type: 'rpc-ready', planId: ctx.running!.id }]);
    expect(h.state()).toBe('serving');
  });

  it('a host starts llama-server only once every worker said rpc-ready for its plan', async () => {
    const h = harness(announcement('me', 8));
    await h.advance(SETTLE_MS + 50);
    const worker = announcement('worker', 6, { connectedTo: ['me' as EndpointId] });
    await h.connect(worker);
    await h.advance(SETTLE_MS + ELECTION_QUIET_MS + 50);
    const plan = h.actor.getSnapshot().context.running;
    expect(plan?.kind === 'ready' && plan.stages.map((s) => s.id)).toEqual(['worker', 'me']);
    expect(h.alive(h.rpcRuns)).toHaveLength(1);
    expect(h.llamaRuns).toHaveLength(0);
    expect(h.state()).toBe('starting');
    // An rpc-ready for another plan does not count.
    h.message(worker.id, { type: 'rpc-ready', planId: 'some-other-plan' });
    await h.advance(20);
    expect(h.llamaRuns).toHaveLength(0);
    h.message(worker.id, { type: 'rpc-ready', planId: plan!.id });
    await h.advance(20);
    expect(h.alive(h.llamaRuns)).toHaveLength(1);
    expect(h.llamaRuns[0]!.input.plan.id).toBe(plan!.id);
    expect(h.state()).toBe('serving');
  });

  it('a crashed rpc-server is a mesh change: the node re-elects and brings it back', async () => {
    const h = harness(ME);
    await h.advance(SETTLE_MS + 50);
    h.rpcRuns[0]!.crash('segfault');
    await flush();
    expect(h.actor.getSnapshot().context.self.serving).toBe(false);
    expect(h.state()).toBe('electing');
    await h.advance(ELECTION_QUIET_MS + 50);
    expect(h.alive(h.rpcRuns)).toHaveLength(1);
    expect(h.rpcRuns).toHaveLength(2);
    expect(h.state()).toBe('serving');
  });

  it('a crashed llama-server is restarted for the same plan', async () => {
    const h = harness(ME);
    await h.advance(SETTLE_MS + 50);
    h.llamaRuns[0]!.crash('abort');
    await h.advance(ELECTION_QUIET_MS + 50);
    expect(h.llamaRuns).toHaveLength(2);
    expect(h.alive(h.llamaRuns)).toHaveLength(1);
    expect(h.llamaRuns[1]!.input.generation).toBe(2);
  });

  it('a graceful stop says leaving to every link, kills its processes and ends', async () => {
    const h = harness(ME);
    await h.advance(SETTLE_MS + 50);
    const peer = announcement('peer', 4, { connectedTo: ['me' as EndpointId] });
    await h.connect(peer);
    await h.advance(ELECTION_QUIET_MS + 50);
    h.actor.send({ type: 'node.stop', reason: 'user pressed ctrl-c' });
    await flush();
    expect(h.actor.getSnapshot().status).toBe('done');
    expect(h.alive(h.rpcRuns)).toHaveLength(0);
    expect(h.alive(h.llamaRuns)).toHaveLength(0);
    expect(h.sentTo(peer.id, 'leaving').map((c) => c.message)).toEqual([{ type: 'leaving', reason: 'user pressed ctrl-c' }]);
  });

  it('a peer that says leaving is stopped and dropped', async () => {
    const h = harness(ME);
    await h.advance(SETTLE_MS + 50);
    const peer = announcement('peer', 4, { connectedTo: ['me' as EndpointId] });
    await h.connect(peer);
    expect(Object.keys(h.actor.getSnapshot().context.peers)).toEqual(['peer']);
    h.message(peer.id, { type: 'leaving', reason: 'bye' });
    await flush();
    const ctx = h.actor.getSnapshot().context;
    expect(ctx.peers).toEqual({});
    expect(ctx.links).toEqual([]);
    expect(ctx.self.connectedTo).toEqual([]);
  });
});
