// The console's page in headless Chromium against the real API server and event hub, with states set by the
// test (no mesh: the real-mesh test is e2e-console.test.ts): with --api-key the page asks for the key, sends it
// with fetch and goes live; a change of the state reaches the page without a reload; a dropped stream is
// reconnected with a fresh snapshot.
import { existsSync } from 'node:fs';
import type { FastifyInstance } from 'fastify';
import { chromium, type Browser } from 'playwright-core';
import { afterAll, describe, expect, it } from 'vitest';
import { buildApiServer } from '../src/io/http/api-server.ts';
import type { MeshState } from '../src/machines/mesh-events.ts';
import type { EndpointId } from '../src/machines/mesh-types.ts';
import { MeshEventHub } from '../src/node/event-hub.ts';

const CHROMIUM = process.env['MESH_CHROMIUM'] ?? '/usr/bin/chromium';
const A = 'a'.repeat(64) as EndpointId;
const B = 'b'.repeat(64) as EndpointId;
const C = 'c'.repeat(64) as EndpointId;
const node = (id: EndpointId, name: string, vramBytes: number) => ({ id, name, role: 'auto', vramBytes, model: 'm', serving: true, connectedTo: [] });

function state(nodes: MeshState['nodes'], stages: { id: EndpointId; name: string; share: number }[], planId: string): MeshState {
  return {
    self: { id: A, name: 'alpha', meshId: 'm1', role: 'host' },
    nodes,
    peers: Object.fromEntries(nodes.filter((n) => n.id !== A).map((n) => [n.id, { id: n.id, name: n.name, state: 'up.connected', lastDown: null, link: { kind: 'quic-direct' as const, rttMs: 3 } }])),
    plan: { id: planId, kind: 'ready', host: A, stages, model: 'm', reason: null },
    runningPlanId: planId,
    machines: { node: 'serving', election: 'settled', rpcServer: 'running.ready', llamaServer: 'running.ready' },
    processes: { rpcServer: { state: 'ready', port: 1 }, llamaServer: { state: 'ready', port: 2, generation: 1 } },
    load: { planId, generation: 1, phase: 'ready', percent: 100 },
    lastCrash: null,
    tunnels: [],
    requests: { inFlight: [], recent: [] },
  };
}

describe('the console page (Chromium, real API server, states set by the test)', () => {
  let app: FastifyInstance | null = null;
  let browser: Browser | null = null;
  afterAll(async () => {
    await browser?.close();
    await app?.close();
  });

  it('asks for the API key, goes live with it, follows changes without a reload, and reconnects with a fresh snapshot', async () => {
    expect(existsSync(CHROMIUM), `${CHROMIUM} missing: apt-get install chromium (.ci/run does)`).toBe(true);
    let current = state([node(A, 'alpha', 300), node(B, 'beta', 200)], [{ id: B, name: 'beta', share: 0.4 }, { id: A, name: 'alpha', share: 0.6 }], 'p1');
    const hub = new MeshEventHub({ read: () => current, tickMs: 60_000 });
    hub.start();
    app = buildApiServer({
      upstream: async () => ({ kind: 'unavailable', reason: 'no mesh in this test', retryAfterS: 1 }),
      status: () => ({}),
      apiKey: 'open-sesame',
      console: { snapshot: () => hub.snapshot(), subscribe: (l) => hub.subscribe(l) },
    });
    app.addHook('onClose', async () => hub.stop());
    await app.listen({ host: '127.0.0.1', port: 0 });
    const url = `http://127.0.0.1:${(app.server.address() as { port: number }).port}/`;

    browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'] });
    const page = await browser.newPage();
    const problems: string[] = [];
    page.on('pageerror', (err) => problems.push(String(err)));
    await page.goto(url);
    await page.waitForSelector('#key-form:not([hidden])', { timeout: 10_000 });
    expect(await page.textContent('#conn')).toBe('needs the API key');
    expect(await page.$$('#plan-bar .stage')).toHaveLength(0);
    await page.fill('#key', 'open-sesame');
    await page.click('#key-form button');
    await page.waitForFunction(() => document.querySelectorAll('#plan-bar .stage').length === 2, undefined, { timeout: 10_000 });
    expect(await page.textContent('#conn')).toBe('live');
    expect(await page.$$eval('#plan-bar .stage .stage-name', (els) => els.map((e) => e.textContent))).toEqual(['beta', 'alpha']);
    await page.evaluate(() => ((window as unknown as { __marker: number }).__marker = 7));

    // A change: a third node and a new plan.
    current = state([node(A, 'alpha', 300), node(B, 'beta', 200), node(C, 'gamma', 100)], [{ id: B, name: 'beta', share: 0.3 }, { id: C, name: 'gamma', share: 0.2 }, { id: A, name: 'alpha', share: 0.5 }], 'p2');
    hub.refresh();
    await page.waitForFunction(() => document.querySelectorAll('#plan-bar .stage').length === 3, undefined, { timeout: 10_000 });
    expect(await page.$$eval('#nodes .node-name', (els) => els.map((e) => e.textContent).sort())).toEqual(['alpha', 'beta', 'gamma']);
    expect(await page.$$eval('#plan-bar .stage', (els) => els.map((e) => e.getAttribute('data-share')))).toEqual(['0.3', '0.2', '0.5']);

    // The stream drops (the node restarts its API, say): the page reconnects with the key and a fresh snapshot.
    current = state([node(A, 'alpha', 300), node(B, 'beta', 200)], [{ id: B, name: 'beta', share: 0.4 }, { id: A, name: 'alpha', share: 0.6 }], 'p3');
    app.server.closeAllConnections();
    await page.waitForFunction(() => document.querySelectorAll('#plan-bar .stage').length === 2, undefined, { timeout: 15_000 });
    expect(await page.evaluate(() => (window as unknown as { __marker?: number }).__marker)).toBe(7);
    expect(problems).toEqual([]);
  }, 60_000);
});
