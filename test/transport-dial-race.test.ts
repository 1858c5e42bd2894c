// The one-connection-per-pair rule under random dial races: several peers dial each other at random moments
// (some twice, some both ways), over networks of different latencies; afterwards every pair holds exactly one
// live connection, the same one on both sides, and every dial() resolved with it.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { asEndpointId } from '../src/machines/mesh-types.ts';
import { MemoryNetwork } from '../src/io/transport/memory-transport.ts';
import { keepIncoming } from '../src/io/transport/mesh-endpoint.ts';
import type { MeshConnection } from '../src/io/transport/transport.ts';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

describe('simultaneous dials', () => {
  it('the acceptor rule never keeps both connections of a pair, nor neither', () => {
    const a = asEndpointId('aa');
    const b = asEndpointId('bb');
    // Both dial at once: each side is dialing when the other's connection arrives.
    const aKeepsBs = keepIncoming(a, b, true, false);
    const bKeepsAs = keepIncoming(b, a, true, false);
    expect([aKeepsBs, bKeepsAs]).toEqual([false, true]);
    // A restarted peer (nothing of ours pending or held) is always let in.
    expect(keepIncoming(a, b, false, false)).toBe(true);
    expect(keepIncoming(b, a, false, false)).toBe(true);
  });

  it('random races among four peers end with one shared connection per dialed pair', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 0, max: 3 }),
        fc.array(
          fc.record({ from: fc.integer({ min: 0, max: 3 }), to: fc.integer({ min: 0, max: 3 }), at: fc.integer({ min: 0, max: 6 }) }),
          { minLength: 1, maxLength: 12 },
        ),
        async (delayMs, dials) => {
          const net = new MemoryNetwork({ delayMs });
          const eps = [0, 1, 2, 3].map(() => net.createEndpoint());
          const results: Promise<{ from: number; to: number; conn: MeshConnection }>[] = [];
          for (const d of dials) {
            if (d.from === d.to) continue;
            results.push(
              sleep(d.at).then(async () => ({
                from: d.from,
                to: d.to,
                conn: await eps[d.from]!.dial(eps[d.to]!.id, eps[d.to]!.addrs(), { timeoutMs: 2_000 }),
              })),
            );
          }
          const done = await Promise.all(results);
          await sleep(4 * delayMs + 20);
          for (const { from, to, conn } of done) {
            const mine = eps[from]!.connection(eps[to]!.id);
            const theirs = eps[to]!.connection(eps[from]!.id);
            expect(conn.isClosed).toBe(false);
            expect(mine).toBe(conn);
            expect(theirs).toBeDefined();
            // The same connection seen from both ends: one dialed it, the other accepted it.
            expect([mine!.dialer, theirs!.dialer].sort()).toEqual(['local', 'remote']);
          }
          for (const ep of eps) {
            const peers = ep.connections().map((c) => c.remoteId);
            expect(new Set(peers).size).toBe(peers.length);
          }
          await Promise.all(eps.map((e) => e.close()));
        },
      ),
      { numRuns: 60 },
    );
  }, 120_000);
});
