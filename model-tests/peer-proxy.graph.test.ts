// Model-based tests of the peer and proxy machines: walk their graphs (@xstate/graph), replay every path
// against fakes on SimulatedClock, and after each step assert what the state promises about what was really
// sent (the fake network's log, the owner's notices, the proxy's decision).
import { getSimplePaths } from '@xstate/graph';
import { createActor, fromCallback, SimulatedClock, type EventObject } from 'xstate';
import { describe, expect, it } from 'vitest';
import { asEndpointId, type Plan } from '../src/machines/mesh-types.ts';
import { peerMachine, RECONNECT_BASE_MS, RECONNECT_CAP_MS, type PeerNotice } from '../src/machines/peer.machine.ts';
import type { NetworkCommand } from '../src/machines/protocol.ts';
import { decideRoute, proxyMachine, type ProxyEvent, type RouteFacts } from '../src/machines/proxy.machine.ts';

const ID = asEndpointId('remote');
const noop = () => createActor(fromCallback(() => {})).start();

describe('peer graph', () => {
  const events: (EventObject & Record<string, unknown>)[] = [
    { type: 'net.peer.connected', id: ID, direct: true },
    { type: 'net.peer.disconnected', id: ID, reason: 'reset' },
    { type: 'net.message', from: ID, message: { type: 'heartbeat', n: 1 } },
    { type: 'net.message', from: ID, message: { type: 'leaving', reason: 'bye' } },
    { type: 'peer.heartbeat.due' },
    { type: 'peer.silence.suspect' },
    { type: 'peer.silence.gone' },
    { type: 'xstate.after.dialTimeout.peer.dialing' },
    { type: 'xstate.after.handshakeTimeout.peer.handshaking' },
    { type: 'xstate.after.reconnectBackoff.peer.gone' },
  ];

  for (const inbound of [false, true]) {
    const paths = getSimplePaths(peerMachine, {
      input: { id: ID, addrs: ['a'], network: noop(), notify: noop(), inbound },
      events: events as never,
      serializeState: (s) => JSON.stringify(s.value),
    });

    it(`${inbound ? 'inbound' : 'outbound'}: reaches every state`, () => {
      const reached = new Set(paths.map((p) => JSON.stringify(p.state.value)));
      for (const v of ['"handshaking"', '{"up":"connected"}', '{"up":"suspect"}', '"gone"', '"left"', ...(inbound ? [] : ['"dialing"'])]) {
        expect(reached, v).toContain(v);
      }
    });

    it(`${inbound ? 'inbound' : 'outbound'}: replays all ${paths.length} simple paths and keeps each state's promise`, () => {
      for (const path of paths) {
        const clock = new SimulatedClock();
        const sent: NetworkCommand[] = [];
        const notices: PeerNotice[] = [];
        const network = createActor(fromCallback<NetworkCommand>(({ receive }) => receive((c) => sent.push(c)))).start();
        const owner = createActor(fromCallback<PeerNotice>(({ receive }) => receive((n) => notices.push(n)))).start();
        const actor = createActor(peerMachine, { clock, input: { id: ID, addrs: ['a'], network, notify: owner, inbound } }).start();
        const trail = path.steps.map((s) => s.event.type + (s.event.type === 'net.message' ? `:${(s.event as { message: { type: string } }).message.type}` : '')).join(' > ');
        for (const step of path.steps.slice(1)) {
          const e = step.event as EventObject;
          const before = { dials: count(sent, 'net.dial'), closes: count(sent, 'net.close'), beats: beats(sent) };
          // State timers run on the clock; the machine's own raised timers are sent as the events they are.
          if (e.type === 'xstate.after.dialTimeout.peer.dialing' || e.type === 'xstate.after.handshakeTimeout.peer.handshaking') {
            clock.increment(5_000);
          } else if (e.type === 'xstate.after.reconnectBackoff.peer.gone') {
            const attempts = actor.getSnapshot().context.attempts;
            clock.increment(Math.min(RECONNECT_CAP_MS, RECONNECT_BASE_MS * 2 ** Math.min(attempts, 8)));
          } else {
            actor.send(e as never);
          }
          const value = actor.getSnapshot().value;
          expect(value, trail).toEqual(step.state.value);
          const lastNotice = notices.filter((n) => n.type !== 'peer.left').at(-1)?.type;
          if (value === 'dialing') expect(count(sent, 'net.dial'), trail).toBe(before.dials + 1);
          if (typeof value === 'object') expect(lastNotice, trail).toBe('peer.up');
          if (value === 'gone' || value === 'handshaking') expect(lastNotice === 'peer.up', trail).toBe(false);
          if (value === 'gone') expect(count(sent, 'net.close'), trail).toBe(before.closes + 1);
          if (value === 'left') {
            expect(notices.at(-1)?.type, trail).toBe('peer.left');
            expect(actor.getSnapshot().status, trail).toBe('done');
          }
          if (e.type === 'peer.heartbeat.due') expect(beats(sent), trail).toBe(before.beats + 1);
        }
      }
    });
  }
});

function count(sent: NetworkCommand[], type: NetworkCommand['type']): number {
  return sent.filter((c) => c.type === type).length;
}
function beats(sent: NetworkCommand[]): number {
  return sent.filter((c) => c.type === 'net.send' && c.message.type === 'heartbeat').length;
}

describe('proxy graph', () => {
  const me = asEndpointId('me');
  const host = asEndpointId('host');
  const model = { name: 'm', bytes: 1, fingerprint: 'f' };
  const plan = (h: typeof me): Plan => ({ kind: 'ready', id: `p-${h}`, host: h, stages: [{ id: h, share: 1 }], model });
  const base: RouteFacts = { self: me, plan: null, settled: false, llamaPort: null, links: [] };
  const variants: Record<string, RouteFacts> = {
    restarting: { ...base, plan: plan(me) },
    local: { ...base, plan: plan(me), settled: true, llamaPort: 8080 },
    remote: { ...base, plan: plan(host), settled: true, links: [host] },
    waitingPlan: { ...base, plan: { kind: 'waiting', id: 'w', reason: 'not enough VRAM' } },
  };

  for (const origin of ['client', 'mesh'] as const)
  for (const [start, facts] of Object.entries({ none: base, ...variants })) {
    const events = [
      ...Object.values(variants).map((f) => ({ type: 'mesh.updated', facts: f })),
      { type: 'xstate.after.maxWait.proxy.pending' },
    ];
    const paths = getSimplePaths(proxyMachine, {
      input: { facts, origin },
      events: events as never,
      serializeState: (s) => JSON.stringify([s.value, s.context.facts, s.context.route]),
    });

    it(`${origin} request from "${start}": replays all ${paths.length} paths and routes as decideRoute says (never remote for a mesh request), or refuses after maxWait`, () => {
      for (const path of paths) {
        const clock = new SimulatedClock();
        let update: ((e: ProxyEvent) => void) | null = null;
        const watchMesh = fromCallback<EventObject, Record<string, never>>(({ sendBack }) => {
          update = sendBack;
        });
        const actor = createActor(proxyMachine.provide({ actors: { watchMesh } }), { clock, input: { facts, origin } }).start();
        let last = facts;
        let timedOut = false;
        for (const step of path.steps.slice(1)) {
          const e = step.event as EventObject & { facts?: RouteFacts };
          if (e.type === 'mesh.updated') {
            last = e.facts!;
            update!({ type: 'mesh.updated', facts: last });
          } else {
            clock.increment(60_000);
            timedOut = true;
          }
        }
        const snap = actor.getSnapshot();
        expect(snap.value).toEqual(path.state.value);
        if (snap.status === 'done') {
          const expected = timedOut && decideRoute(last, origin) === null ? { kind: 'refused', status: 503, reason: 'the mesh is restarting; try again shortly', retryAfterS: 5 } : decideRoute(last, origin);
          expect(snap.output).toEqual(expected);
          if (origin === 'mesh') expect(snap.output!.kind).not.toBe('remote');
        } else {
          expect(decideRoute(last, origin)).toBeNull();
        }
      }
    });
  }
});
