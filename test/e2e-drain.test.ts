// Planned changes drain first (issue 12, item 1), with real node processes on loopback: a long greedy answer
// streams through a lite client C while a new node D joins and the plan changes. The host lets the request
// finish on the running plan (no cut, no continuation) before the kill -> fresh start, and the new plan serves
// right after. Then the host leaves gracefully while a request streams: it finishes before the host goes.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { E2E_MODEL, hostServesPlan, llamaChildren, makeE2eMesh, type E2eMesh, type E2eNode } from './e2e-support.ts';

const BODY = { model: 'mesh', messages: [{ role: 'user', content: 'Talk for a long time.' }], max_tokens: 2500, temperature: 0, ignore_eos: true, stream: true };
/** A context long enough for an answer that outlasts a join (2500 tokens, ~8-25 s here, within the 30 s
 * drain). VRAM: a hosts; d, bigger than b, replaces it when it joins (the plan changes); b + d serve after a leaves. */
const LONG = { MESH_INFERENCE_CTX: '8192' };

async function streamAll(node: E2eNode, during: () => Promise<void>): Promise<{ finishes: string[]; error: Error | null; chunks: number; endedAt: number }> {
  const s = await node.client(180_000).chat.completions.create(BODY as never);
  const finishes: string[] = [];
  let chunks = 0;
  let error: Error | null = null;
  let started: Promise<void> | null = null;
  try {
    for await (const chunk of s as unknown as AsyncIterable<{ choices: { finish_reason: string | null }[] }>) {
      chunks++;
      if (chunks === 3) started = during();
      const f = chunk.choices[0]?.finish_reason;
      if (f) finishes.push(f);
    }
  } catch (err) {
    error = err as Error;
  }
  const endedAt = Date.now();
  await started;
  return { finishes, error, chunks, endedAt };
}

describe('e2e: a planned change lets the request in flight finish first', { timeout: 300_000 }, () => {
  let mesh: E2eMesh;
  let a: E2eNode;
  let b: E2eNode;
  let c: E2eNode;

  beforeAll(async () => {
    mesh = await makeE2eMesh({ ...E2E_MODEL, contextLength: 8192 });
    a = await mesh.start({ name: 'a', vram: 2, env: LONG });
    b = await mesh.start({ name: 'b', vram: 1.6, join: a.token, env: LONG });
    c = await mesh.start({ name: 'c', model: null, join: a.token });
    await a.waitStatus((s) => hostServesPlan([b.id, a.id])(s) && s.links.length === 2, 120_000, 'a hosting with b');
    await c.waitStatus((s) => s.plan?.kind === 'ready' && s.links.includes(a.id as never), 60_000, 'c routed to a');
  }, 300_000);

  afterAll(async () => {
    await mesh?.cleanup();
  });

  /** What C and A said about the request, for a failure's message. */
  const story = () =>
    [...c.lines().filter((l) => /continu|cut/.test(l)), ...a.lines().filter((l) => /planned change|SIGTERM|plan:|crash/.test(l))].map((l) => l.slice(0, 300)).join('\n');
  const continued = (n: E2eNode) => n.lines().some((l) => /continuing the request on the mesh as it is now/.test(l));

  it('a join that changes the plan waits for the answer in flight, then restarts', async () => {
    const llamaBefore = llamaChildren(a).find((p) => p.name === 'llama-server')!.pid;
    let d: E2eNode | null = null;
    const got = await streamAll(c, async () => {
      d = await mesh.start({ name: 'd', vram: 1.8, join: a.token, env: LONG });
    });
    expect(got.error).toBeNull();
    expect(got.finishes).toEqual(['length']);
    expect(continued(c), story()).toBe(false); // never cut: it finished on the plan it started on
    const drainLine = a.lines().find((l) => /a planned change: letting 1 request\(s\) in flight finish first/.test(l));
    expect(drainLine, `the join did not change the plan while the answer streamed:\n${story()}`).toBeDefined();
    // The new plan (with d) serves afterwards, on a fresh llama-server.
    const after = await a.waitStatus((s) => s.plan?.kind === 'ready' && s.plan.stages.some((st) => st.id === d!.id) && s.processes.llamaServer.state === 'ready', 120_000, 'the plan with d serving');
    expect(after.plan?.kind).toBe('ready');
    expect(llamaChildren(a).find((p) => p.name === 'llama-server')!.pid).not.toBe(llamaBefore);
  });

  it('a host that leaves gracefully finishes the answer in flight before it goes', async () => {
    await a.waitStatus((s) => s.processes.llamaServer.state === 'ready', 120_000, 'a serving');
    const before = a.lines().filter((l) => /a planned change: letting/.test(l)).length;
    const got = await streamAll(c, () => a.stop());
    expect(got.error).toBeNull();
    expect(got.finishes).toEqual(['length']);
    expect(continued(c), story()).toBe(false);
    expect(a.lines().filter((l) => /a planned change: letting 1 request\(s\) in flight finish first/.test(l)).length).toBe(before + 1);
  });
});
