// Requests survive the mesh's failures (issue 12, item 1), with real node processes on loopback and the
// official `openai` client: a long greedy chat streamed through a lite client C, undisturbed first (the
// reference); then the same request while a worker is SIGKILLed mid-stream, and again while the host is
// SIGKILLed mid-stream. Each disturbed stream must prove the kill landed mid-stream (chunks received, no finish
// yet), that C sent a continuation, and end with exactly the reference text, one id and one finish_reason.
// VRAM caps: a .70, b .60, d .58, e .56 of the model (1.1 x needed): a+b serve, then a+d, then d+e.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { hostServesPlan, makeE2eMesh, type E2eMesh, type E2eNode } from './e2e-support.ts';

const BODY = {
  model: 'mesh',
  messages: [{ role: 'user', content: 'Talk for a long time about meshes.' }],
  max_tokens: 300,
  temperature: 0,
  ignore_eos: true,
  stream: true,
};

interface Streamed {
  readonly text: string;
  readonly ids: ReadonlySet<string>;
  readonly finishes: readonly string[];
  readonly chunks: number;
  /** At the moment `interrupt` ran: chunks so far, and whether a finish had come. */
  readonly atInterrupt: { readonly chunks: number; readonly finished: boolean } | null;
  readonly error: Error | null;
}

async function stream(node: E2eNode, interruptAt: number | null, interrupt: () => void = () => {}): Promise<Streamed> {
  const s = await node.client(180_000).chat.completions.create(BODY as never);
  let text = '';
  let chunks = 0;
  const ids = new Set<string>();
  const finishes: string[] = [];
  let atInterrupt: Streamed['atInterrupt'] = null;
  let error: Error | null = null;
  try {
    for await (const chunk of s as unknown as AsyncIterable<{ id: string; choices: { delta: { content?: string }; finish_reason: string | null }[] }>) {
      chunks++;
      ids.add(chunk.id);
      const c = chunk.choices[0];
      if (c?.delta.content) text += c.delta.content;
      if (c?.finish_reason) finishes.push(c.finish_reason);
      if (chunks === interruptAt) {
        atInterrupt = { chunks, finished: finishes.length > 0 };
        interrupt();
      }
    }
  } catch (err) {
    error = err as Error;
  }
  return { text, ids, finishes, chunks, atInterrupt, error };
}

describe('e2e: a request survives the death of a worker and of the host', { timeout: 300_000 }, () => {
  let mesh: E2eMesh;
  let a: E2eNode;
  let b: E2eNode;
  let c: E2eNode;
  let d: E2eNode;
  let e: E2eNode;
  let reference: Streamed;

  beforeAll(async () => {
    mesh = await makeE2eMesh();
    a = await mesh.start({ name: 'a', vram: 0.7 });
    b = await mesh.start({ name: 'b', vram: 0.6, join: a.token });
    d = await mesh.start({ name: 'd', vram: 0.58, join: a.token });
    e = await mesh.start({ name: 'e', vram: 0.56, join: a.token });
    c = await mesh.start({ name: 'c', model: null, join: a.token });
    await a.waitStatus((s) => hostServesPlan([b.id, a.id])(s) && s.links.length === 4, 120_000, 'a hosting with b, all linked');
    await c.waitStatus((s) => s.plan?.kind === 'ready' && s.links.includes(a.id as never), 60_000, 'c routed to a');
    reference = await stream(c, null);
  }, 300_000);

  afterAll(async () => {
    await mesh?.cleanup();
  });

  const continuations = (n: E2eNode) => n.lines().filter((l) => /continuing the request on the mesh as it is now/.test(l)).length;

  it('the undisturbed reference is a whole answer', () => {
    expect(reference.error).toBeNull();
    expect(reference.finishes).toEqual(['length']);
    expect(reference.text.length).toBeGreaterThan(100);
    expect(reference.ids.size).toBe(1);
  });

  /**
   * Streams through C and kills `victim` at the 20th chunk: the kill landed mid-stream (no finish yet), C sent a
   * continuation, and the answer is whole: no error, one finish_reason, one id, exactly the reference text.
   */
  async function expectSurvivesKillOf(victim: E2eNode): Promise<void> {
    const before = continuations(c);
    const got = await stream(c, 20, () => victim.kill());
    expect(got.atInterrupt).toEqual({ chunks: 20, finished: false });
    expect(got.error).toBeNull();
    expect(continuations(c)).toBeGreaterThan(before);
    expect(got.finishes).toEqual(['length']);
    expect(got.ids.size).toBe(1);
    expect(got.text).toBe(reference.text);
  }

  it('a worker SIGKILLed mid-stream: the answer continues to exactly the reference text', async () => {
    await expectSurvivesKillOf(b);
  });

  it('the host SIGKILLed mid-stream: the answer continues on the new host to exactly the reference text', async () => {
    await a.waitStatus((s) => hostServesPlan([d.id, a.id])(s), 120_000, 'a hosting with d');
    await c.waitStatus((s) => s.plan?.kind === 'ready' && s.plan.host === a.id, 60_000, 'c routed to a again');
    await expectSurvivesKillOf(a);
  });
});
