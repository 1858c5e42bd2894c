// End to end, a stage that hangs where only the host can see it (issue 12, item 2a): host + worker, real
// processes, the worker's data port reached through a TCP relay (test/support/link-emulator.ts) that is cut
// silently in the middle of a streamed answer: bytes held, nothing closed, the worker's node alive and its
// heartbeats fine (they ride QUIC). llama.cpp's RPC client would wait for the reply forever. The host's tunnel
// watch must see a request owing a reply past its bound, restart llama-server (the stream in flight ends: an
// error or a finish, never a hang), and, since the worker's rpc-server is still held by the cut connection and
// does not answer the restart either, quarantine it; the mesh then serves again: the worker comes back after
// the quarantine over QUIC, and the greedy tokens are solo's.
//
// Why not a SIGSTOPped rpc-server: the worker's own liveness check (/proc state T, docs/node.md "Liveness and
// back-off") kills and replaces that in ~5 s, before the host's 15 s floor, so such a test would pass without
// the watch. A silent path is what only the host can see.
import { createServer } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TcpRelay } from './support/link-emulator.ts';
import { greedyTokens, hostServesPlan, makeE2eMesh, soloReferenceTokens, type E2eMesh, type E2eNode } from './e2e-support.ts';
import { STALL_FLOOR_MS } from '../src/io/transport/tunnel-watch.ts';
import { QUARANTINE_MS } from '../src/machines/stage-health.ts';

const PROMPT = 'A stage that stops answering';
const N_TOKENS = 24;
/** Generous ceilings for a loaded 2-core machine; the figures go to the log. */
const NOTICE_CEILING_MS = STALL_FLOOR_MS + 20_000;
const SERVING_AGAIN_CEILING_MS = STALL_FLOOR_MS + QUARANTINE_MS + 120_000;

async function freeTcpPort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const port = (s.address() as { port: number }).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

/**
 * The time (epoch ms, the node's own) of the first JSON log line of `node` after line `from` whose msg matches
 * `re` and whose time is at least `notBefore`; waits for it up to `timeoutMs`.
 */
async function loggedAt(node: E2eNode, from: number, re: RegExp, timeoutMs: number, notBefore = 0): Promise<number> {
  const t0 = Date.now();
  for (;;) {
    for (const line of node.lines().slice(from)) {
      if (!line.startsWith('{')) continue;
      try {
        const l = JSON.parse(line) as { msg?: unknown; time?: unknown };
        if (typeof l.msg === 'string' && re.test(l.msg) && typeof l.time === 'number' && l.time >= notBefore) return l.time;
      } catch {
        // not a log line
      }
    }
    if (Date.now() - t0 > timeoutMs) throw new Error(`${node.name}: no log line matching ${re} within ${timeoutMs} ms:\n${node.lines().slice(-30).join('\n')}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

describe('e2e: a stage hung behind a silent data path', { timeout: 400_000 }, () => {
  let mesh: E2eMesh;
  let host: E2eNode;
  let worker: E2eNode;
  let relay: TcpRelay;
  let reference: number[];

  beforeAll(async () => {
    mesh = await makeE2eMesh();
    reference = await soloReferenceTokens(mesh.model, PROMPT, N_TOKENS);
    const dataPort = await freeTcpPort();
    relay = await TcpRelay.start({ target: { host: '127.0.0.1', port: dataPort } });
    host = await mesh.start({ name: 'host', vram: 0.7 });
    worker = await mesh.start({
      name: 'worker',
      vram: 0.6,
      join: host.token,
      extraArgs: ['--data-port', String(dataPort)],
      env: { MESH_INFERENCE_DATA_ADVERTISE: relay.address },
    });
    await host.waitStatus(hostServesPlan([worker.id, host.id]), 120_000, 'the 2-stage plan served');
  }, 240_000);

  afterAll(async () => {
    await mesh?.cleanup();
    // Connections that came during the cut wait in the relay: let them through so that it can close.
    relay?.restore();
    await Promise.race([relay?.close(), new Promise((r) => setTimeout(r, 5_000))]);
  }, 120_000);

  it('the host notices within its bound, the stream in flight ends, and the mesh serves again', async () => {
    // The precondition: llama-server's tunnel to the worker goes through the relay (the direct data path).
    const before = await host.status();
    const opened = before.tunnels.connections.filter((c) => c.kind === 'rpc' && c.side === 'opened');
    expect(opened.map((c) => c.path)).toEqual(['direct']);
    expect(relay.counters().forward.bytes).toBeGreaterThan(0);

    const linesBefore = host.lines().length;
    const stream = await host.client(SERVING_AGAIN_CEILING_MS).chat.completions.create({
      model: 'mesh',
      messages: [{ role: 'user', content: 'Talk for a long time.' }],
      max_tokens: 600,
      temperature: 0,
      stream: true,
    });
    let chunks = 0;
    let cutAt = 0;
    let finish: string | null = null;
    let error: Error | null = null;
    try {
      for await (const chunk of stream) {
        chunks++;
        finish = chunk.choices[0]?.finish_reason ?? finish;
        if (chunks === 5) {
          relay.cut();
          cutAt = Date.now();
        }
      }
    } catch (err) {
      error = err as Error;
    }
    const endedMs = Date.now() - cutAt;
    expect(cutAt).toBeGreaterThan(0);
    console.log(`the stream ended ${endedMs} ms after the cut, ${chunks} chunks, ${error ? `error: ${error.message.split('\n')[0]}` : `finish: ${finish}`}`);
    // It ended: with an error, or with a real finish reason; never silently cut, never hanging.
    if (error === null) expect(finish, 'the stream ended with no error and no finish reason: silently cut').toMatch(/^(length|stop)$/);

    // What the host did, from its own log lines (JSON, with their times), relative to the cut.
    const hungAt = await loggedAt(host, linesBefore, /^hung stage: an rpc request got no reply byte/, NOTICE_CEILING_MS);
    const noticedMs = hungAt - cutAt;
    console.log(`data path cut after 5 chunks: hung stage noticed ${noticedMs} ms later`);
    expect(noticedMs).toBeGreaterThanOrEqual(STALL_FLOOR_MS - 1_000); // never before the floor
    expect(noticedMs).toBeLessThan(NOTICE_CEILING_MS);
    // The restart cannot get through either (the cut connection still holds the worker's rpc-server): quarantine,
    // and a plan without the worker (waiting: the host alone is too small).
    const quarantinedAt = await loggedAt(host, linesBefore, /^stage quarantined/, 60_000);
    const waitingAt = await loggedAt(host, linesBefore, /^waiting: /, 30_000, quarantinedAt);
    console.log(`quarantined ${quarantinedAt - cutAt} ms after the cut; plan waiting at ${waitingAt - cutAt} ms`);
    expect(quarantinedAt).toBeGreaterThanOrEqual(hungAt);

    // After the quarantine the worker is taken back; the relay stays cut, so the tunnel falls back to QUIC.
    await loggedAt(host, linesBefore, /^stage quarantine over/, QUARANTINE_MS + 30_000, quarantinedAt);
    await host.waitStatus(hostServesPlan([worker.id, host.id]), SERVING_AGAIN_CEILING_MS, 'the 2-stage plan served again');
    console.log(`serving again ${Date.now() - cutAt} ms after the cut`);
    expect((await greedyTokens(host, PROMPT, N_TOKENS)).tokens).toEqual(reference);
    const after = await host.status();
    expect(after.tunnels.connections.filter((c) => c.kind === 'rpc' && c.side === 'opened').map((c) => c.path)).toEqual(['quic']);
  });
});
