// End to end, joins: a node joining that changes the plan (it has more VRAM than the current worker) makes
// the host kill llama-server, re-elect and start a fresh one with the new `--rpc` list and split, and the
// mesh serves again (same greedy tokens); a node joining that changes nothing restarts nothing.
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  greedyTokens,
  hostServesPlan,
  llamaChildren,
  makeE2eMesh,
  soloReferenceTokens,
  type E2eMesh,
  type E2eNode,
} from './e2e-support.ts';

const PROMPT = 'Every mesh change is a kill and a fresh start, and';
const N_TOKENS = 32;

function llamaArgs(node: E2eNode): { pid: number; rpc: string[]; split: string[] } {
  const p = llamaChildren(node).find((x) => x.name === 'llama-server');
  if (!p) throw new Error(`${node.name} runs no llama-server`);
  const argv = readFileSync(`/proc/${p.pid}/cmdline`, 'utf8').split('\0');
  const after = (flag: string) => argv[argv.indexOf(flag) + 1] ?? '';
  return { pid: p.pid, rpc: after('--rpc').split(','), split: after('--tensor-split').split(',') };
}

describe('e2e: nodes joining a serving mesh', { timeout: 240_000 }, () => {
  let mesh: E2eMesh;
  let a: E2eNode;
  let b: E2eNode;
  let c: E2eNode;
  let reference: number[];

  beforeAll(async () => {
    mesh = await makeE2eMesh();
    reference = await soloReferenceTokens(mesh.model, PROMPT, N_TOKENS);
    a = await mesh.start({ name: 'a', vram: 0.7 });
    b = await mesh.start({ name: 'b', vram: 0.5, join: a.token });
    await a.waitStatus(hostServesPlan([b.id, a.id]), 120_000, 'a hosting with b');
  }, 240_000);

  afterAll(async () => {
    await mesh?.cleanup();
  });

  it('a node with more VRAM than the worker joins: the host restarts llama-server with the new --rpc list and split', async () => {
    const before = llamaArgs(a);
    expect(before.rpc.length).toBe(2);
    const gen = (await a.status()).processes.llamaServer.generation;
    expect(await greedyTokens(a, PROMPT, N_TOKENS).then((r) => r.tokens)).toEqual(reference);

    const t0 = performance.now();
    c = await mesh.start({ name: 'c', vram: 0.6, join: a.token });
    // 0.7 + 0.6 >= 1.1 x: c replaces b (most VRAM first), b stands by.
    const s = await a.waitStatus(hostServesPlan([c.id, a.id]), 120_000, 'a hosting with c');
    const changeMs = performance.now() - t0;
    expect(s.processes.llamaServer.generation).toBe(gen + 1);
    const after = llamaArgs(a);
    expect(after.pid).not.toBe(before.pid);
    expect(after.rpc.length).toBe(2);
    // A fresh start: a new tunnel port to c first, the host's own (fresh) rpc-server last.
    expect(after.rpc[1]).toBe(`127.0.0.1:${s.processes.rpcServer.port}`);
    expect(after.rpc[0]).not.toBe(before.rpc[0]);
    expect(after.split.map(Number)[0]).toBeCloseTo(0.6 / 1.3, 4);
    expect(after.split.map(Number)[1]).toBeCloseTo(0.7 / 1.3, 4);
    expect(await greedyTokens(a, PROMPT, N_TOKENS).then((r) => r.tokens)).toEqual(reference);
    // b's rpc-server is gone once it is not a stage; c computes now.
    await b.waitStatus((x) => x.node.role === 'standby' && x.processes.rpcServer.state === 'down', 30_000, 'b standing by');
    expect(llamaChildren(b)).toEqual([]);
    const traffic = (await a.status()).rpcTraffic[c.id];
    const graphs = (traffic?.commands['GRAPH_COMPUTE']?.count ?? 0) + (traffic?.commands['GRAPH_RECOMPUTE']?.count ?? 0);
    expect(graphs).toBeGreaterThanOrEqual(N_TOKENS);
    console.log(`mesh change (c joined) -> serving again: ${changeMs.toFixed(0)} ms`);
  });

  it('a node that changes nothing joins: no restart, no process of its own', async () => {
    const before = await a.status();
    const pid = llamaArgs(a).pid;
    const d = await mesh.start({ name: 'd', vram: 0.3, join: a.token });
    await d.waitStatus((x) => x.plan?.id === before.plan?.id && x.node.state === 'serving', 60_000, 'd on the same plan');
    await a.waitStatus((x) => x.links.includes(d.id as never) && x.view.some((v) => v.id === d.id), 30_000, 'a knowing d');
    // Past the election's quiet window: a restart would have begun by now.
    await new Promise((r) => setTimeout(r, 1_500));
    const after = await a.status();
    expect(after.plan?.id).toBe(before.plan?.id);
    expect(after.processes.llamaServer.generation).toBe(before.processes.llamaServer.generation);
    expect(llamaArgs(a).pid).toBe(pid);
    expect(after.node.state).toBe('serving');
    expect(llamaChildren(d)).toEqual([]);
    expect(await greedyTokens(d, PROMPT, N_TOKENS).then((r) => r.tokens)).toEqual(reference);
  });
});
