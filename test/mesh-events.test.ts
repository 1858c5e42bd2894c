// /api/events without a mesh: the diff of the node's state into typed events (src/machines/mesh-events.ts),
// the catalogue in docs/console.md against the types, and the route on a real fastify listener (a snapshot
// first, then every event in order; the API key and the Host check; the console's page without the key).
import { readFileSync } from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import type { FastifyInstance } from 'fastify';
import { buildApiServer } from '../src/io/http/api-server.ts';
import { diffMeshState, dottedState, MESH_EVENT_TYPES, type MeshEvent, type MeshEventBody, type MeshState, type PeerView } from '../src/machines/mesh-events.ts';
import type { EndpointId } from '../src/machines/mesh-types.ts';
import { MeshEventHub } from '../src/node/event-hub.ts';

const A = 'a'.repeat(64) as EndpointId;
const B = 'b'.repeat(64) as EndpointId;

function base(): MeshState {
  return {
    self: { id: A, name: 'alpha', meshId: 'm1', role: 'host' },
    nodes: [{ id: A, name: 'alpha', role: 'auto', vramBytes: 100, model: 'm', serving: true, connectedTo: [] }],
    peers: {},
    plan: { id: 'p1', kind: 'ready', host: A, stages: [{ id: A, name: 'alpha', share: 1 }], model: 'm', reason: null },
    runningPlanId: 'p1',
    machines: { node: 'running', election: 'idle', rpcServer: 'running.ready', llamaServer: 'running.ready' },
    processes: { rpcServer: { state: 'ready', port: 1 }, llamaServer: { state: 'ready', port: 2, generation: 1 } },
    load: { planId: 'p1', generation: 1, phase: 'ready', percent: 100 },
    lastCrash: null,
    tunnels: [],
    requests: { inFlight: [], recent: [] },
  };
}
const peer = (state: string, link: PeerView['link'] = { kind: 'quic-direct', rttMs: 1 }): PeerView => ({ id: B, name: 'beta', state, lastDown: state === 'gone' ? 'silent' : null, link });
const types = (events: MeshEventBody[]) => events.map((e) => e.type);

describe('diffMeshState', () => {
  it('tells nothing when nothing changed', () => {
    expect(diffMeshState(base(), base())).toEqual([]);
  });

  it('a peer: admitted, suspect, recovered, gone, removed; a link that changes kind or RTT by enough', () => {
    const s0 = base();
    const s1 = { ...s0, peers: { [B]: peer('handshaking', null) } };
    const s2 = { ...s0, peers: { [B]: peer('up.connected') } };
    const s3 = { ...s0, peers: { [B]: peer('up.suspect') } };
    const s4 = { ...s0, peers: { [B]: peer('up.connected') } };
    const s5 = { ...s0, peers: { [B]: peer('gone', null) } };
    expect(types(diffMeshState(s0, s1))).toEqual(['peer.state']);
    expect(types(diffMeshState(s1, s2))).toEqual(['peer.admitted']);
    expect(types(diffMeshState(s2, s3))).toEqual(['peer.suspect']);
    expect(types(diffMeshState(s3, s4))).toEqual(['peer.recovered']);
    expect(diffMeshState(s4, s5)).toEqual([{ type: 'peer.gone', peer: peer('gone', null) }]);
    expect(types(diffMeshState(s5, s0))).toEqual(['peer.removed']);
    const rtt = (rttMs: number, kind: 'quic-direct' | 'direct-tls' = 'quic-direct') => ({ ...s0, peers: { [B]: peer('up.connected', { kind, rttMs }) } });
    expect(diffMeshState(rtt(10), rtt(11))).toEqual([]);
    expect(diffMeshState(rtt(10), rtt(20))).toEqual([{ type: 'link.changed', peer: B, link: { kind: 'quic-direct', rttMs: 20 } }]);
    expect(types(diffMeshState(rtt(10), rtt(10, 'direct-tls')))).toEqual(['link.changed']);
  });

  it('the view, the plan and the machines', () => {
    const s0 = base();
    const joined = { ...s0, nodes: [...s0.nodes, { id: B, name: 'beta', role: 'auto', vramBytes: 50, model: 'm', serving: false, connectedTo: [A] }] };
    expect(diffMeshState(s0, joined)).toEqual([{ type: 'node.seen', node: joined.nodes[1] }]);
    expect(diffMeshState(joined, s0)).toEqual([{ type: 'node.forgotten', id: B }]);
    const plan2 = { ...s0, plan: { ...s0.plan!, id: 'p2', stages: [{ id: B, name: 'beta', share: 0.4 }, { id: A, name: 'alpha', share: 0.6 }] } };
    expect(diffMeshState(s0, plan2)).toEqual([{ type: 'plan.elected', plan: plan2.plan }]);
    expect(types(diffMeshState(s0, { ...s0, runningPlanId: 'p2' }))).toEqual(['plan.running']);
    expect(diffMeshState(s0, { ...s0, machines: { ...s0.machines, election: 'electing' } })).toEqual([{ type: 'machine.state', machine: 'election', state: 'electing' }]);
  });

  it("llama-server's life: spawning, loading with each new percent, ready, crashed with its reason, stopped", () => {
    const s0 = { ...base(), machines: { ...base().machines, llamaServer: 'stopped' }, load: null };
    const at = (llamaServer: string, extra: Partial<MeshState> = {}): MeshState => ({ ...s0, machines: { ...s0.machines, llamaServer }, ...extra });
    const load = (percent: number | null) => ({ load: { planId: 'p1', generation: 1, phase: 'loading' as const, percent } });
    const llama = (events: MeshEventBody[]) => events.filter((e) => e.type.startsWith('llama.'));
    expect(llama(diffMeshState(s0, at('running.spawning')))).toEqual([{ type: 'llama.spawning', planId: 'p1', generation: 1 }]);
    expect(llama(diffMeshState(at('running.spawning'), at('running.loading', load(null))))).toEqual([{ type: 'llama.loading', planId: 'p1', generation: 1, percent: null }]);
    expect(llama(diffMeshState(at('running.loading', load(null)), at('running.loading', load(40))))).toEqual([{ type: 'llama.loading', planId: 'p1', generation: 1, percent: 40 }]);
    expect(llama(diffMeshState(at('running.loading', load(40)), at('running.loading', load(40))))).toEqual([]);
    expect(llama(diffMeshState(at('running.loading', load(40)), at('running.ready', load(40))))).toEqual([{ type: 'llama.ready', planId: 'p1', generation: 1, port: 2 }]);
    expect(llama(diffMeshState(at('running.ready'), at('crashed.deciding', { lastCrash: 'exit 134' })))).toEqual([{ type: 'llama.crashed', planId: 'p1', generation: 1, reason: 'exit 134' }]);
    expect(types(llama(diffMeshState(at('running.ready'), at('stopped'))))).toEqual(['llama.stopped']);
  });

  it('tunnels: a data path chosen, the last of a kind closed', () => {
    const t = { peer: B, kind: 'rpc', side: 'dialed', path: 'direct', count: 1 };
    const s0 = base();
    expect(diffMeshState(s0, { ...s0, tunnels: [t] })).toEqual([{ type: 'tunnel.path', tunnel: t }]);
    expect(diffMeshState({ ...s0, tunnels: [t] }, { ...s0, tunnels: [{ ...t, count: 2 }] })).toEqual([]);
    expect(diffMeshState({ ...s0, tunnels: [t] }, s0)).toEqual([{ type: 'tunnel.closed', tunnel: t }]);
  });

  it('dottedState flattens state values', () => {
    expect(dottedState('idle')).toBe('idle');
    expect(dottedState({ up: 'suspect' })).toBe('up.suspect');
    expect(dottedState({ running: { a: 'b' } })).toBe('running.a.b');
    expect(dottedState(undefined)).toBe('none');
  });

  it('docs/console.md lists every event type, in the order of the types', () => {
    const doc = readFileSync(new URL('../docs/console.md', import.meta.url), 'utf8');
    const listed = [...doc.matchAll(/^\| `([a-z]+(?:\.[a-z]+)?)` \|/gm)].map((m) => m[1]).filter((t) => MESH_EVENT_TYPES.includes(t as never) || t!.includes('.'));
    expect(listed).toEqual([...MESH_EVENT_TYPES]);
  });
});

describe('GET /api/events and the console', () => {
  let app: FastifyInstance | null = null;
  afterEach(async () => {
    await app?.close();
    app = null;
  });

  async function serve(apiKey: string | null, state: MeshState = base()) {
    let current = state;
    const hub = new MeshEventHub({ read: () => current, tickMs: 60_000 });
    hub.start();
    app = buildApiServer({
      upstream: async () => ({ kind: 'unavailable', reason: 'no mesh in this test', retryAfterS: 1 }),
      status: () => ({}),
      apiKey,
      console: { snapshot: () => hub.snapshot(), subscribe: (l) => hub.subscribe(l) },
    });
    app.addHook('onClose', async () => hub.stop());
    await app.listen({ host: '127.0.0.1', port: 0 });
    const addr = app.server.address() as { port: number };
    return { url: `http://127.0.0.1:${addr.port}`, hub, set: (s: MeshState) => ((current = s), hub.refresh()) };
  }

  async function read(url: string, headers: Record<string, string>, count: number): Promise<MeshEvent[]> {
    const res = await fetch(`${url}/api/events`, { headers, signal: AbortSignal.timeout(5_000) });
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toMatch(/^text\/event-stream/);
    const reader = res.body!.getReader();
    const out: MeshEvent[] = [];
    let buf = '';
    while (out.length < count) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += new TextDecoder().decode(value);
      let cut: number;
      while ((cut = buf.indexOf('\n\n')) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const id = /^id: (\d+)$/m.exec(block)?.[1];
        const data = /^data: (.*)$/m.exec(block)?.[1];
        if (data === undefined) continue;
        const e = JSON.parse(data) as MeshEvent;
        expect(Number(id)).toBe(e.seq);
        out.push(e);
      }
    }
    await reader.cancel();
    return out;
  }

  it('a snapshot first, then each change and each request, numbered in order', async () => {
    const s = await serve(null);
    const got = read(s.url, {}, 5);
    await new Promise((r) => setTimeout(r, 200));
    s.set({ ...base(), peers: { [B]: peer('up.connected') } });
    s.hub.request({ phase: 'started', id: 'r1', route: 'chat', stream: false, maxTokens: 8, startedAt: 1 });
    s.hub.request({ phase: 'finished', id: 'r1', route: 'chat', stream: false, maxTokens: 8, startedAt: 1, outcome: 'stop', promptTokens: 3, completionTokens: 8, durationMs: 100, firstTokenMs: 30, tokensPerSecond: 100, continuations: 0, error: null });
    s.set({ ...base(), peers: { [B]: peer('up.suspect') } });
    const events = await got;
    expect(events.map((e) => e.type)).toEqual(['snapshot', 'peer.admitted', 'request.started', 'request.finished', 'peer.suspect']);
    expect(events.slice(1).map((e) => e.seq)).toEqual([1, 2, 3, 4]);
    // A client that connects now gets the state with the request in it.
    const snap = (await read(s.url, {}, 1))[0]!;
    if (snap.type !== 'snapshot') throw new Error('no snapshot first');
    expect(snap.state.requests.recent.map((r) => [r.id, r.tokensPerSecond])).toEqual([['r1', 100]]);
    expect(snap.state.peers[B]?.state).toBe('up.suspect');
  });

  it('with --api-key: /api/events needs the key; the page and its files do not; a foreign Host gets 421', async () => {
    const s = await serve('sekrit');
    expect((await fetch(`${s.url}/api/events`)).status).toBe(401);
    expect((await fetch(`${s.url}/api/events`, { headers: { authorization: 'Bearer wrong!' } })).status).toBe(401);
    expect((await read(s.url, { authorization: 'Bearer sekrit' }, 1))[0]!.type).toBe('snapshot');
    for (const path of ['/', '/console/', '/console/console.js', '/console/console.css', '/console/vendor/cytoscape.min.js', '/console/vendor/uPlot.iife.min.js']) {
      const res = await fetch(`${s.url}${path}`);
      expect(res.status, path).toBe(200);
      await res.arrayBuffer();
    }
    expect(await (await fetch(`${s.url}/`)).text()).toContain('/console/console.js');
    expect((await fetch(`${s.url}/console/vendor/other.js`)).status).toBe(404);
    expect((await fetch(`${s.url}/api/status`)).status).toBe(401);
    // Only GETs of the page pass without the key.
    expect((await fetch(`${s.url}/console/`, { method: 'POST' })).status).toBe(401);
    const { request } = await import('node:http');
    const status = await new Promise<number>((resolve, reject) => {
      const req = request(`${s.url}/`, { headers: { host: 'evil.example:80' } }, (res) => (res.resume(), resolve(res.statusCode ?? 0)));
      req.on('error', reject);
      req.end();
    });
    expect(status).toBe(421);
    // No way past the key through the page's paths.
    for (const path of ['/console/../api/status', '/console/..%2fapi/status', '/console/%2e%2e/api/events', '/console//api/status']) {
      const got = await new Promise<{ code: number; body: string }>((resolve, reject) => {
        const req = request(`${s.url}/`, { path }, (res) => {
          let body = '';
          res.on('data', (c) => (body += c));
          res.on('end', () => resolve({ code: res.statusCode ?? 0, body }));
        });
        req.on('error', reject);
        req.end();
      });
      expect(got.code, path).not.toBe(200);
      expect(got.body, path).not.toContain('snapshot');
    }
  });
});
