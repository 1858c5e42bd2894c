// Where API requests go: the pure decision, and the bounded wait of the proxy machine on SimulatedClock.
import { createActor, fromCallback, SimulatedClock, type EventObject } from 'xstate';
import { describe, expect, it } from 'vitest';
import { asEndpointId, type Plan } from '../src/machines/mesh-types.ts';
import { decideRoute, proxyMachine, routeFacts, type ProxyEvent, type RouteFacts } from '../src/machines/proxy.machine.ts';
import { MODEL } from './machine-fakes.ts';

const ME = asEndpointId('me');
const HOST = asEndpointId('host');
const ready = (host: string): Plan => ({
  kind: 'ready',
  id: `plan-${host}`,
  host: asEndpointId(host),
  stages: [{ id: asEndpointId(host), share: 1 }],
  model: MODEL,
});
const waiting: Plan = { kind: 'waiting', id: 'w', reason: 'need 11.0 GB of VRAM, the mesh has 8.0 GB' };
const facts = (f: Partial<RouteFacts>): RouteFacts => ({ self: ME, plan: null, settled: true, llamaPort: null, links: [], ...f });

describe('decideRoute', () => {
  it('serves locally on the host whose llama-server is ready', () => {
    expect(decideRoute(facts({ plan: ready('me'), llamaPort: 8081 }))).toEqual({ kind: 'local', port: 8081 });
  });
  it('forwards to the host over the mesh from a worker or a lite client', () => {
    expect(decideRoute(facts({ plan: ready('host'), links: [HOST] }))).toEqual({ kind: 'remote', host: HOST });
  });
  it('refuses with the plan reason when the plan waits', () => {
    expect(decideRoute(facts({ plan: waiting }))).toEqual({ kind: 'refused', status: 503, reason: waiting.reason, retryAfterS: 30 });
  });
  it('has no answer yet while restarting, before any plan, or without a link to the host', () => {
    expect(decideRoute(facts({ plan: null }))).toBeNull();
    expect(decideRoute(facts({ plan: ready('me'), settled: false, llamaPort: 8081 }))).toBeNull();
    expect(decideRoute(facts({ plan: ready('me'), llamaPort: null }))).toBeNull();
    expect(decideRoute(facts({ plan: ready('host'), links: [] }))).toBeNull();
  });
  it('a request that came over the mesh is served locally or refused at once, never forwarded', () => {
    expect(decideRoute(facts({ plan: ready('me'), llamaPort: 8081 }), 'mesh')).toEqual({ kind: 'local', port: 8081 });
    expect(decideRoute(facts({ plan: ready('host'), links: [HOST] }), 'mesh')).toMatchObject({ kind: 'refused', status: 503, retryAfterS: 2 });
    expect(decideRoute(facts({ plan: ready('host'), settled: false }), 'mesh')).toMatchObject({ kind: 'refused' });
    expect(decideRoute(facts({ plan: waiting }), 'mesh')).toEqual({ kind: 'refused', status: 503, reason: waiting.reason, retryAfterS: 30 });
    // Hosting but restarting, or no plan yet: wait (bounded), as any request.
    expect(decideRoute(facts({ plan: ready('me'), settled: false, llamaPort: 8081 }), 'mesh')).toBeNull();
    expect(decideRoute(facts({ plan: null }), 'mesh')).toBeNull();
  });
  it('reads the facts off a node snapshot', () => {
    const snapshot = {
      context: { self: { id: ME }, running: ready('host'), llamaPort: null, links: [HOST] },
      matches: (s: 'serving') => s === 'serving',
    };
    expect(routeFacts(snapshot)).toEqual(facts({ plan: ready('host'), links: [HOST] }));
  });
});

describe('proxy machine', () => {
  function harness(initial: RouteFacts) {
    const clock = new SimulatedClock();
    const watchers: ((e: ProxyEvent) => void)[] = [];
    let stopped = 0;
    const watchMesh = fromCallback<EventObject, Record<string, never>>(({ sendBack }) => {
      watchers.push(sendBack);
      return () => {
        stopped++;
      };
    });
    const actor = createActor(proxyMachine.provide({ actors: { watchMesh } }), { clock, input: { facts: initial } }).start();
    return { actor, clock, update: (f: RouteFacts) => watchers.at(-1)!({ type: 'mesh.updated', facts: f }), stopped: () => stopped };
  }

  it('routes at once when it can', () => {
    const h = harness(facts({ plan: ready('host'), links: [HOST] }));
    expect(h.actor.getSnapshot().status).toBe('done');
    expect(h.actor.getSnapshot().output).toEqual({ kind: 'remote', host: HOST });
  });

  it('waits while the mesh restarts and routes once the host is ready', () => {
    const h = harness(facts({ plan: ready('me'), settled: false }));
    expect(h.actor.getSnapshot().value).toEqual({ pending: 'waiting' });
    h.update(facts({ plan: ready('me'), settled: true, llamaPort: 9000 }));
    expect(h.actor.getSnapshot().output).toEqual({ kind: 'local', port: 9000 });
    expect(h.stopped()).toBe(1);
  });

  it('gives up with 503 after maxWait, and updates that decide nothing do not extend the bound', () => {
    const h = harness(facts({ plan: null }));
    h.clock.increment(59_000);
    h.update(facts({ plan: ready('me'), settled: false }));
    expect(h.actor.getSnapshot().status).toBe('active');
    h.clock.increment(1_000);
    expect(h.actor.getSnapshot().output).toMatchObject({ kind: 'refused', status: 503, retryAfterS: 5 });
  });
});
