// End to end, the hand-off: a worker moves from one host to another. W (--role worker, .9 of the model)
// serves host H1 (.5); H2 (.6) joins and, having more VRAM than H1, becomes host with W as its worker.
// W must drop H1's rpc tunnels at once and serve H2 with a fresh rpc-server (an rpc-server serves one
// client at a time); H1 stops its llama-server and stands by; the new mesh gives the same greedy tokens.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  greedyTokens,
  hostServesPlan,
  llamaChildren,
  makeE2eMesh,
  servesPlan,
  soloReferenceTokens,
  type E2eMesh,
  type E2eNode,
} from './e2e-support.ts';

const PROMPT = 'A worker serves one host at a time, so';
const N_TOKENS = 32;

describe('e2e: a worker handed off to a new host', { timeout: 240_000 }, () => {
  let mesh: E2eMesh;
  let w: E2eNode;
  let h1: E2eNode;
  let reference: number[];

  beforeAll(async () => {
    mesh = await makeE2eMesh();
    reference = await soloReferenceTokens(mesh.model, PROMPT, N_TOKENS);
    h1 = await mesh.start({ name: 'h1', vram: 0.5 });
    w = await mesh.start({ name: 'w', vram: 0.9, role: 'worker', join: h1.token });
    await h1.waitStatus(hostServesPlan([w.id, h1.id]), 120_000, 'h1 hosting with w');
  }, 240_000);

  afterAll(async () => {
    await mesh?.cleanup();
  });

  it('moves the worker to the new host: old tunnels closed, a fresh rpc-server, the new host serves', async () => {
    expect((await greedyTokens(w, PROMPT, N_TOKENS)).tokens).toEqual(reference);
    const oldRpc = llamaChildren(w).find((p) => p.name === 'ggml-rpc-server')!.pid;
    const h2 = await mesh.start({ name: 'h2', vram: 0.6, join: h1.token });
    await h2.waitStatus(hostServesPlan([w.id, h2.id]), 120_000, 'h2 hosting with w');
    const ws = await w.waitStatus((s) => servesPlan([w.id, h2.id])(s), 30_000, 'w serving h2');
    expect(ws.node.role).toBe('worker');
    // A fresh rpc-server for the new host.
    const newRpc = llamaChildren(w).find((p) => p.name === 'ggml-rpc-server')!.pid;
    expect(newRpc).not.toBe(oldRpc);
    // The old host let go: no llama-server, no rpc-server; it stands by and routes to h2.
    await h1.waitStatus((s) => s.node.role === 'standby' && s.processes.llamaServer.state === 'down' && s.processes.rpcServer.state === 'down', 30_000, 'h1 standing by');
    expect(llamaChildren(h1)).toEqual([]);
    // The old host's tunnels to w are gone (it holds none), and w carries only h2's.
    expect((await h1.status()).tunnels.pipes).toBe(0);
    const traffic = (await h2.status()).rpcTraffic[w.id];
    expect(traffic?.totals.count ?? 0).toBeGreaterThan(0);
    for (const node of [h2, h1, w]) expect((await greedyTokens(node, PROMPT, N_TOKENS)).tokens).toEqual(reference);
  });
});
