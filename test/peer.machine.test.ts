// The peer machine on XState's SimulatedClock against a recording network: dialing, the handshake,
// heartbeats, suspect and gone from silence, reconnecting with backoff, `leaving`, and delay overrides.
import { createActor, fromCallback, SimulatedClock } from 'xstate';
import { describe, expect, it } from 'vitest';
import { asEndpointId } from '../src/machines/mesh-types.ts';
import { peerMachine, type PeerNotice } from '../src/machines/peer.machine.ts';
import type { MeshMessage, NetworkCommand } from '../src/machines/protocol.ts';

const ID = asEndpointId('remote');

function harness(options: { inbound?: boolean; machine?: typeof peerMachine } = {}) {
  const clock = new SimulatedClock();
  const commands: NetworkCommand[] = [];
  const notices: PeerNotice[] = [];
  const network = createActor(fromCallback<NetworkCommand>(({ receive }) => receive((c) => commands.push(c)))).start();
  const owner = createActor(fromCallback<PeerNotice>(({ receive }) => receive((n) => notices.push(n)))).start();
  const actor = createActor(options.machine ?? peerMachine, {
    clock,
    input: { id: ID, addrs: ['10.0.0.2:4433'], network, notify: owner, inbound: options.inbound },
  }).start();
  return {
    actor,
    clock,
    // SimulatedClock starts timers set during a flush from the end of the increment: step finely.
    tick(ms: number) {
      for (let t = 0; t < ms; t += 50) clock.increment(Math.min(50, ms - t));
    },
    commands,
    notices,
    state: () => actor.getSnapshot().value,
    message: (message: MeshMessage) => actor.send({ type: 'net.message', from: ID, message }),
    connected: () => actor.send({ type: 'net.peer.connected', id: ID, direct: true }),
    heartbeats: () => commands.filter((c) => c.type === 'net.send' && c.message.type === 'heartbeat').length,
    dials: () => commands.filter((c) => c.type === 'net.dial').length,
  };
}

const gossip: MeshMessage = { type: 'gossip', announcements: [] };

describe('peer machine', () => {
  it('dials, handshakes on the first message, then reports up', () => {
    const h = harness();
    expect(h.state()).toBe('dialing');
    expect(h.commands[0]).toEqual({ type: 'net.dial', id: ID, addrs: ['10.0.0.2:4433'] });
    h.connected();
    expect(h.state()).toBe('handshaking');
    h.message(gossip);
    expect(h.state()).toEqual({ up: 'connected' });
    expect(h.notices).toEqual([{ type: 'peer.up', id: ID }]);
  });

  it('an inbound peer skips dialing', () => {
    const h = harness({ inbound: true });
    expect(h.state()).toBe('handshaking');
    expect(h.dials()).toBe(0);
  });

  it('heartbeats every 500 ms and answers heartbeats', () => {
    const h = harness({ inbound: true });
    h.message(gossip);
    h.tick(499);
    expect(h.heartbeats()).toBe(0);
    h.tick(1);
    expect(h.heartbeats()).toBe(1);
    h.message({ type: 'heartbeat-ack', n: 1 });
    h.tick(500);
    expect(h.heartbeats()).toBe(2);
    h.message({ type: 'heartbeat', n: 7 });
    expect(h.commands.at(-1)).toEqual({ type: 'net.send', to: ID, message: { type: 'heartbeat-ack', n: 7 } });
  });

  it('turns suspect after 1.25 s of silence, recovers on any message, and is gone after 2.5 s (<= 3 s)', () => {
    const h = harness({ inbound: true });
    h.message(gossip);
    h.tick(1249);
    expect(h.state()).toEqual({ up: 'connected' });
    h.tick(1);
    expect(h.state()).toEqual({ up: 'suspect' });
    h.message({ type: 'heartbeat-ack', n: 2 }); // silence ends: both timers start over
    expect(h.state()).toEqual({ up: 'connected' });
    h.tick(2499);
    expect(h.state()).toEqual({ up: 'suspect' });
    h.tick(1);
    expect(h.state()).toBe('gone');
    expect(h.notices.at(-1)).toMatchObject({ type: 'peer.down', id: ID });
    expect(h.commands.at(-1)).toMatchObject({ type: 'net.close', id: ID });
  });

  it('the heartbeat cadence does not reset the silence timers', () => {
    const h = harness({ inbound: true });
    h.message(gossip);
    h.tick(2499); // four heartbeats sent, nothing heard back
    expect(h.heartbeats()).toBe(4);
    expect(h.state()).toEqual({ up: 'suspect' });
    h.tick(1);
    expect(h.state()).toBe('gone');
  });

  const evidence = (path: 'quic' | 'direct') => ({ type: 'peer.evidence' as const, id: ID, path, why: 'reset' });

  it('a failed QUIC connection under a tunnel is evidence at once', () => {
    const h = harness({ inbound: true });
    h.message(gossip);
    h.tick(100);
    h.actor.send(evidence('quic'));
    expect(h.state()).toBe('gone');
    expect(h.actor.getSnapshot().context.lastDownReason).toMatch(/QUIC connection failed/);
  });

  it('a reset direct connection counts only together with missed heartbeats', () => {
    const h = harness({ inbound: true });
    h.message(gossip);
    h.actor.send(evidence('direct'));
    expect(h.state()).toEqual({ up: 'connected' }); // heartbeats still arrive: no verdict yet
    h.tick(1250); // silence: suspect, and with the reset remembered, gone at once
    expect(h.state()).toBe('gone');
    expect(h.actor.getSnapshot().context.lastDownReason).toMatch(/missed heartbeats and a reset direct connection/);

    // A message after the reset proves the peer alive: the reset is forgotten.
    const k = harness({ inbound: true });
    k.message(gossip);
    k.actor.send(evidence('direct'));
    k.message({ type: 'heartbeat', n: 1 });
    k.tick(1250);
    expect(k.state()).toEqual({ up: 'suspect' });
    k.tick(1249);
    expect(k.state()).toEqual({ up: 'suspect' });

    // Already suspect (heartbeats missed) when the reset comes: gone at once.
    const j = harness({ inbound: true });
    j.message(gossip);
    j.tick(1300);
    expect(j.state()).toEqual({ up: 'suspect' });
    j.actor.send(evidence('direct'));
    expect(j.state()).toBe('gone');
  });

  it('reconnects with exponential backoff after failed dials', () => {
    const h = harness();
    h.tick(5000); // dial timeout
    expect(h.state()).toBe('gone');
    h.tick(1999);
    expect(h.dials()).toBe(1);
    h.tick(1); // 2 s backoff after the first failure
    expect(h.dials()).toBe(2);
    h.tick(5000 + 4000); // second failure, then 4 s
    expect(h.dials()).toBe(3);
    h.connected();
    h.message(gossip);
    expect(h.actor.getSnapshot().context.attempts).toBe(0);
  });

  it('a peer that dials us back while we back off is taken at once', () => {
    const h = harness();
    h.tick(5000);
    expect(h.state()).toBe('gone');
    h.connected();
    expect(h.state()).toBe('handshaking');
  });

  it('a new connection while up replaces the old one (the peer restarted)', () => {
    const h = harness({ inbound: true });
    h.message(gossip);
    h.connected();
    expect(h.state()).toBe('handshaking');
    expect(h.notices.map((n) => n.type)).toEqual(['peer.up', 'peer.down']);
    h.message(gossip);
    expect(h.notices.map((n) => n.type)).toEqual(['peer.up', 'peer.down', 'peer.up']);
  });

  it('leaving makes it gone at once, from any state, and final', () => {
    const h = harness({ inbound: true });
    h.message(gossip);
    h.message({ type: 'leaving', reason: 'shutting down' });
    expect(h.state()).toBe('left');
    expect(h.actor.getSnapshot().status).toBe('done');
    expect(h.notices.map((n) => n.type)).toEqual(['peer.up', 'peer.down', 'peer.left']);
    expect(h.notices.at(-1)).toEqual({ type: 'peer.left', id: ID, reason: 'left: shutting down' });
  });

  it('takes its bounds from .provide({ delays })', () => {
    const fast = peerMachine.provide({ delays: { heartbeatInterval: 100, suspectAfter: 200, goneAfter: 500 } });
    const h = harness({ inbound: true, machine: fast });
    h.message(gossip);
    h.tick(200);
    expect(h.state()).toEqual({ up: 'suspect' });
    expect(h.heartbeats()).toBe(2);
    h.tick(300);
    expect(h.state()).toBe('gone');
  });
});
