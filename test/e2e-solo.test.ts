// End to end, one node: a real `mesh-inference` process with a generated model that fits its VRAM, so the
// plan is solo (its own rpc-server is the only stage). The official openai client talks to its API,
// streaming and not; a SIGTERM leaves no llama.cpp process behind.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  hostServing,
  isAlive,
  llamaChildren,
  makeE2eMesh,
  type E2eMesh,
  type E2eNode,
} from './e2e-support.ts';

describe('e2e: a solo node', { timeout: 240_000 }, () => {
  let mesh: E2eMesh;
  let node: E2eNode;

  beforeAll(async () => {
    mesh = await makeE2eMesh();
    node = await mesh.start({ name: 'solo', vram: 2 });
    await node.waitStatus(hostServing, 90_000, 'a serving solo host');
  }, 120_000);

  afterAll(async () => {
    await mesh?.cleanup();
  });

  it('elects itself host of a one-stage plan: its own rpc-server holds every layer', async () => {
    const s = await node.status();
    expect(s.plan?.kind).toBe('ready');
    if (s.plan?.kind !== 'ready') return;
    expect(s.plan.host).toBe(node.id);
    expect(s.plan.stages).toEqual([{ id: node.id, share: 1 }]);
    expect(s.processes.rpcServer.state).toBe('ready');
    expect(s.processes.llamaServer.generation).toBe(1);
    expect(s.machines.llamaServer).toEqual({ running: 'ready' });
    const names = llamaChildren(node).map((p) => p.name).sort();
    expect(names).toEqual(['ggml-rpc-server', 'llama-server']);
  });

  it('answers a chat completion through the openai client', async () => {
    const res = await node.client().chat.completions.create({
      model: 'mesh',
      messages: [{ role: 'user', content: 'Say something.' }],
      max_tokens: 16,
      temperature: 0,
    });
    expect(res.choices[0]?.message.content?.length).toBeGreaterThan(0);
    expect(res.usage?.completion_tokens).toBe(16);
  });

  it('streams a chat completion chunk by chunk, ending cleanly', async () => {
    const stream = await node.client().chat.completions.create({
      model: 'mesh',
      messages: [{ role: 'user', content: 'Count.' }],
      max_tokens: 24,
      temperature: 0,
      stream: true,
    });
    let chunks = 0;
    let text = '';
    let finish: string | null | undefined;
    for await (const chunk of stream) {
      chunks++;
      text += chunk.choices[0]?.delta?.content ?? '';
      finish ??= chunk.choices[0]?.finish_reason;
    }
    expect(chunks).toBeGreaterThan(5);
    expect(text.length).toBeGreaterThan(0);
    expect(finish).toBe('length');
  });

  it('lists the model and reports health', async () => {
    const models = await node.client().models.list();
    expect(models.data.length).toBeGreaterThan(0);
    const health = await fetch(`${node.api}/health`);
    expect(health.status).toBe(200);
  });

  it('stops on SIGTERM and leaves no llama.cpp process behind', async () => {
    const children = llamaChildren(node);
    expect(children.length).toBe(2);
    const t0 = Date.now();
    await node.stop();
    const exit = node.proc.exitInfo();
    expect(exit?.code).toBe(0);
    expect(Date.now() - t0).toBeLessThan(15_000);
    await new Promise((r) => setTimeout(r, 200));
    expect(children.filter((c) => isAlive(c.pid))).toEqual([]);
  });
});
