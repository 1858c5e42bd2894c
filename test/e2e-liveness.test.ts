// End to end, nothing waits forever (issue 12, items 2 and 3), on a real solo node (`bin/mesh-inference.js`, real
// llama.cpp): a SIGSTOPped llama-server is killed and replaced within the liveness bound, and /api/status says
// why; a SIGSTOPped rpc-server too, and llama-server restarts with the new one (it still answers the same
// greedy tokens); a llama-server SIGKILLed again and again for the same plan comes back after 1 s, 2 s, 4 s of
// back-off, shown in /api/status (processes.llamaServer.backoff) and in the log.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { NodeStatus } from '../src/node/status.ts';
import { greedyTokens, hostServing, isAlive, llamaChildren, makeE2eMesh, type E2eMesh, type E2eNode } from './e2e-support.ts';

const PROMPT = 'Nothing waits forever';
const N_TOKENS = 16;
/** The liveness bound (3 probes 2 s apart, 2 s each: ~10 s) plus a fresh start, on two busy cores. */
const DETECT_BOUND_MS = 30_000;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function childPid(node: E2eNode, name: RegExp): number | null {
  return llamaChildren(node).find((p) => name.test(p.name))?.pid ?? null;
}

/** Waits until `name` runs under a pid other than `old`; returns it. */
async function nextPid(node: E2eNode, name: RegExp, old: number | null, timeoutMs: number): Promise<number> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const pid = childPid(node, name);
    if (pid !== null && pid !== old) return pid;
    if (Date.now() > end) throw new Error(`no new ${name} within ${timeoutMs} ms:\n${node.lines().slice(-20).join('\n')}`);
    await sleep(25);
  }
}

describe('e2e: liveness and back-off of the node\'s processes', { timeout: 240_000 }, () => {
  let mesh: E2eMesh;
  let solo: E2eNode;
  let reference: number[];

  beforeAll(async () => {
    mesh = await makeE2eMesh();
    solo = await mesh.start({ name: 'solo', vram: 2 });
    await solo.waitStatus(hostServing, 90_000, 'solo serving');
    reference = (await greedyTokens(solo, PROMPT, N_TOKENS)).tokens;
  }, 120_000);

  afterAll(async () => {
    await mesh?.cleanup();
  });

  it('a SIGSTOPped llama-server is killed and replaced within the bound; /api/status says why', async () => {
    const stopped = childPid(solo, /llama-server/)!;
    expect(stopped).not.toBeNull();
    process.kill(stopped, 'SIGSTOP');
    const t0 = performance.now();
    const s = await solo.waitStatus(
      (x) => x.processes.llamaServer.lastCrash !== null && /unresponsive/.test(x.processes.llamaServer.lastCrash),
      DETECT_BOUND_MS,
      'llama-server declared unresponsive',
    );
    const detectedMs = performance.now() - t0;
    console.log(`llama-server SIGSTOPped -> declared unresponsive after ${detectedMs.toFixed(0)} ms: ${s.processes.llamaServer.lastCrash}`);
    expect(s.processes.llamaServer.lastCrash).toMatch(/^llama-server unresponsive, killed: 3 liveness probes failed in a row, [\d.]+ s since the last good one: \/health: no answer within 2000 ms \(process \d+ is stopped/);
    // Not before 2 probes have been missed (it must not fire at the first slow answer).
    expect(detectedMs).toBeGreaterThan(4_000);
    await solo.waitStatus(hostServing, DETECT_BOUND_MS, 'serving again');
    console.log(`llama-server SIGSTOPped -> serving again after ${(performance.now() - t0).toFixed(0)} ms`);
    expect(isAlive(stopped)).toBe(false);
    expect(childPid(solo, /llama-server/)).not.toBe(stopped);
    expect((await greedyTokens(solo, PROMPT, N_TOKENS)).tokens).toEqual(reference);
  });

  it('a SIGSTOPped rpc-server is killed and replaced, and llama-server restarts with the new one', async () => {
    const rpc = childPid(solo, /ggml-rpc-serv/)!;
    const llama = childPid(solo, /llama-server/)!;
    process.kill(rpc, 'SIGSTOP');
    const t0 = performance.now();
    const s = await solo.waitStatus(
      (x) => x.processes.rpcServer.lastCrash !== null && /unresponsive/.test(x.processes.rpcServer.lastCrash),
      DETECT_BOUND_MS,
      'rpc-server declared unresponsive',
    );
    console.log(`rpc-server SIGSTOPped -> declared unresponsive after ${(performance.now() - t0).toFixed(0)} ms: ${s.processes.rpcServer.lastCrash}`);
    expect(s.processes.rpcServer.lastCrash).toMatch(new RegExp(`^rpc-server unresponsive, killed: 3 liveness probes failed in a row, [\\d.]+ s since the last good one: process ${rpc} is stopped`));
    await solo.waitStatus(hostServing, DETECT_BOUND_MS, 'serving again');
    console.log(`rpc-server SIGSTOPped -> serving again after ${(performance.now() - t0).toFixed(0)} ms`);
    expect(isAlive(rpc)).toBe(false);
    // The old llama-server held a connection to the rpc-server that is gone: it was replaced too, and the new
    // one answers (an idle llama-server left behind would crash at the first request).
    expect(isAlive(llama)).toBe(false);
    expect((await greedyTokens(solo, PROMPT, N_TOKENS)).tokens).toEqual(reference);
  });

  it('a llama-server that keeps crashing for the same plan restarts after 1 s, 2 s, 4 s, shown in /api/status and the log', async () => {
    // A node of its own: the crashes above count for the solo node's plan for 60 s.
    const crashy = await mesh.start({ name: 'crashy', vram: 2 });
    await crashy.waitStatus(hostServing, 90_000, 'crashy serving');
    const backoffs = new Map<number, NonNullable<NodeStatus['processes']['llamaServer']['backoff']>>();
    let polling = true;
    const poller = (async () => {
      while (polling) {
        try {
          const b = (await crashy.status()).processes.llamaServer.backoff;
          if (b !== null && !backoffs.has(b.crashes)) backoffs.set(b.crashes, b);
        } catch {
          // busy: poll again
        }
        await sleep(100);
      }
    })();
    const gaps: number[] = [];
    let pid = childPid(crashy, /llama-server/)!;
    expect((await crashy.status()).processes.llamaServer.crashes).toBe(0);
    try {
      for (let i = 0; i < 4; i++) {
        process.kill(pid, 'SIGKILL');
        const killedAt = performance.now();
        pid = await nextPid(crashy, /llama-server/, pid, 60_000);
        gaps.push(performance.now() - killedAt);
      }
      await crashy.waitStatus(hostServing, 60_000, 'serving after the crashes');
    } finally {
      polling = false;
      await poller;
    }
    console.log(`kill -> next llama-server: ${gaps.map((g) => `${g.toFixed(0)} ms`).join(', ')}; back-offs seen: ${JSON.stringify([...backoffs.values()])}`);
    // First crash: at once (no back-off); then 1 s, 2 s, 4 s.
    expect(gaps[0]).toBeLessThan(1_000 + 5_000); // generous: a busy machine
    expect(gaps[1]).toBeGreaterThanOrEqual(1_000);
    expect(gaps[2]).toBeGreaterThanOrEqual(2_000);
    expect(gaps[3]).toBeGreaterThanOrEqual(4_000);
    expect([...backoffs.keys()].sort()).toEqual([2, 3, 4]);
    for (const [crashes, delayMs] of [[2, 1_000], [3, 2_000], [4, 4_000]] as const) {
      const b = backoffs.get(crashes)!;
      expect(b.delayMs).toBe(delayMs);
      expect(b.reason).toMatch(/^llama-server exited: .*killed by SIGKILL/);
      expect(b.nextAttemptAt).toBeGreaterThan(Date.now() - 60_000);
    }
    const s = await crashy.status();
    expect(s.processes.llamaServer.crashes).toBe(4);
    expect(s.processes.llamaServer.backoff).toBeNull();
    const logged = crashy.lines().filter((l) => /llama-server crashed \d+ times in a row: next attempt in/.test(l));
    expect(logged.map((l) => /crashed (\d+) times in a row: next attempt in (\d+) s/.exec(l)!.slice(1).join('/'))).toEqual(['2/1', '3/2', '4/4']);
    expect((await greedyTokens(crashy, PROMPT, N_TOKENS)).tokens).toEqual(reference);
  });
});
