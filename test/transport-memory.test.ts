// The transport contract against the in-memory backend, plus what only it can show (determinism, delay).
import { describe, expect, it } from 'vitest';
import { MemoryNetwork } from '../src/io/transport/memory-transport.ts';
import { echo, readAll, transportContract, within } from './transport-contract.ts';

// Idle timeout long enough that a zombie connection outlives the restart tests' probe (1 s).
const net = new MemoryNetwork({ idleTimeoutMs: 3_000 });
let identities = 0;

transportContract({
  name: 'memory',
  endpoint: async (init) => net.createEndpoint(init),
  // One machine: every raw endpoint dials from the same address.
  rawEndpoint: async (identity) => net.createRawEndpoint(identity, 'memory-test-machine'),
  remotePeer: async (options = {}) => {
    const p = net.createEndpoint({ id: options.identity, admission: 'open' });
    p.handle('control', (s) => echo(s));
    let dialed: string | undefined;
    if (options.dialTo) {
      dialed = await p.dial(options.dialTo.id, options.dialTo.addrs).then(
        () => 'ok',
        (e: unknown) => String(e),
      );
    }
    return { id: p.id, addrs: p.addrs(), kill: () => net.kill(p.id), dialed };
  },
  identityAbove: async () => 'f'.repeat(48) + String(identities++).padStart(16, '0'),
  deathCeilingMs: 10_000,
});

describe('memory transport', () => {
  it('adds the configured one-way delay to a round trip', async () => {
    const slow = new MemoryNetwork({ delayMs: 20 });
    const a = slow.createEndpoint();
    const b = slow.createEndpoint();
    b.handle('control', (s) => echo(s));
    const c = await a.dial(b.id, b.addrs());
    const s = await c.openStream('control');
    const t0 = performance.now();
    await s.write(new Uint8Array([1]));
    await s.read();
    // One round trip = two one-way delays; timers may fire late on a busy machine, never early.
    expect(performance.now() - t0).toBeGreaterThanOrEqual(38);
    await a.close();
    await b.close();
  });

  it('gives ids from a counter, so two networks built the same way agree', () => {
    const ids = (): string[] => {
      const n = new MemoryNetwork();
      return [n.createEndpoint().id, n.createEndpoint().id];
    };
    expect(ids()).toEqual(ids());
    expect(ids()[0]).toMatch(/^[0-9a-f]{64}$/);
  });

  it('a write does not alias the caller buffer', async () => {
    const n = new MemoryNetwork();
    const a = n.createEndpoint();
    const b = n.createEndpoint();
    b.handle('control', (s) => echo(s));
    const s = await (await a.dial(b.id, b.addrs())).openStream('control');
    const buf = new Uint8Array([1, 2, 3]);
    const back = readAll(s);
    await s.write(buf);
    buf.fill(9);
    await s.finish();
    expect(await within(back, 2_000, 'echo')).toEqual(new Uint8Array([1, 2, 3]));
  });
});
