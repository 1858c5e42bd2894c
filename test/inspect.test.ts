// `--inspect ws://...`: a host node sends its live actor system to a WebSocket inspector. A local
// WebSocket server receives, while a second node joins and the host starts llama-server for the new plan and
// serves a request, snapshots of the node, peer, election, llama-server and proxy actors with their states.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { WebSocketServer } from 'ws';
import { hostServing, makeE2eModel, servesPlan, startE2eNode, stopAllNodes, type E2eModel, type E2eNode } from './e2e-support.ts';

interface InspectorMessage {
  readonly type: string;
  readonly sessionId: string;
  readonly name?: string;
  readonly snapshot?: { readonly value?: unknown; readonly status?: string };
}

describe('--inspect: the live actors reach a WebSocket inspector', () => {
  let model: E2eModel;
  let wss: WebSocketServer;
  const messages: InspectorMessage[] = [];
  const nodes: E2eNode[] = [];

  beforeAll(async () => {
    model = await makeE2eModel();
    wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
    await new Promise<void>((r) => wss.once('listening', () => r()));
    wss.on('connection', (ws) => {
      ws.on('message', (data) => {
        try {
          messages.push(JSON.parse(String(data)) as InspectorMessage);
        } catch {
          // not ours
        }
      });
    });
    const port = (wss.address() as { port: number }).port;
    const host = await startE2eNode({ name: 'host', model, vram: 0.7, dir: model.dir, extraArgs: ['--inspect', `ws://127.0.0.1:${port}`] });
    nodes.push(host);
    const joiner = await startE2eNode({ name: 'joiner', model, vram: 0.6, join: host.token, dir: model.dir });
    nodes.push(joiner);
    await host.waitStatus((s) => hostServing(s) && servesPlan([joiner.id, host.id])(s), 120_000, 'the host serving with the joiner');
    // One API request: one proxy machine.
    await host.client().chat.completions.create({ model: 'mesh', messages: [{ role: 'user', content: 'hi' }], max_tokens: 4 });
    await new Promise((r) => setTimeout(r, 500));
  }, 240_000);

  afterAll(async () => {
    await stopAllNodes(nodes);
    await new Promise<void>((r) => wss?.close(() => r()));
    await model?.remove();
  });

  it('receives the node, peer, election, llama-server and proxy actors with their state values', () => {
    const nameOf = new Map<string, string>();
    // A spawned peer machine is named after its id, `peer:<endpoint id>`.
    for (const m of messages) if (m.type === '@xstate.actor' && m.name) nameOf.set(m.sessionId, m.name.split(':')[0]!);
    const states = new Map<string, unknown[]>();
    for (const m of messages) {
      if (m.type !== '@xstate.snapshot' && m.type !== '@xstate.actor') continue;
      const name = nameOf.get(m.sessionId);
      if (name === undefined || m.snapshot?.value === undefined) continue;
      const list = states.get(name) ?? [];
      list.push(m.snapshot.value);
      states.set(name, list);
    }
    const seen = (name: string) => (states.get(name) ?? []).map((v) => JSON.stringify(v));
    for (const name of ['node', 'peer', 'election', 'llamaServer', 'proxy']) {
      expect(seen(name).length, `snapshots of ${name}`).toBeGreaterThan(0);
    }
    // The join as the host lived it: a new plan, llama-server loading then ready, the request routed.
    expect(seen('node')).toContain('"serving"');
    expect(seen('node')).toContain('"starting"');
    expect(seen('llamaServer')).toContain(JSON.stringify({ running: 'loading' }));
    expect(seen('llamaServer')).toContain(JSON.stringify({ running: 'ready' }));
    expect(seen('peer').some((v) => v.includes('connected'))).toBe(true);
    expect(seen('proxy')).toContain('"routed"');
  });
});
